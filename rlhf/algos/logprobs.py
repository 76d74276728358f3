"""Log-probabilities of labels under logits, and masked reductions.

Shapes: B batch, T sequence length, V vocabulary. A *mask* is a 0/1 tensor (bool, int or float)
broadcastable to the tensor it masks; masked-out entries never reach a result, even when they
hold inf or NaN (they are selected away with ``torch.where`` before any arithmetic).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def gather_logprobs(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-softmax of ``logits`` taken at ``labels``, computed in float32.

    logits [B, T, V] (any float dtype), labels [B, T] (int64 token ids) -> [B, T] float32.
    No shift is applied: ``out[b, t] = log_softmax(logits[b, t])[labels[b, t]]``.
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def sequence_logprobs(logits: Tensor, input_ids: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probability of the masked (answer) tokens of each sequence.

    logits [B, T, V], input_ids [B, T], mask [B, T] (1 on the answer tokens) -> [B] float32.
    Causal shift: ``logits[:, t]`` predicts ``input_ids[:, t + 1]``; token ``t + 1`` counts iff
    ``mask[:, t + 1]`` is 1 (so ``mask[:, 0]`` is never used).
    """
    token_lp = gather_logprobs(logits[:, :-1], input_ids[:, 1:])
    keep = mask[:, 1:] != 0
    return torch.where(keep, token_lp, torch.zeros_like(token_lp)).sum(dim=-1)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x * mask`` over ``dim`` (all dims if None); masked entries are dropped, not
    multiplied. x [...], mask broadcastable to x -> reduced tensor (0-dim if dim is None)."""
    weight = mask.to(x.dtype)
    x = torch.where(weight != 0, x, torch.zeros_like(x)) * weight
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the entries where ``mask`` is 1.

    x [...], mask broadcastable to x; ``dim`` None reduces everything (0-dim result), an int
    reduces that dim only. An all-zero mask gives 0 (the denominator is clamped at 1e-8), not NaN.
    """
    weight = mask.to(x.dtype).expand_as(x)
    denom = weight.sum() if dim is None else weight.sum(dim=dim)
    return masked_sum(x, weight, dim) / denom.clamp(min=1e-8)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the masked entries, x [...], mask like x -> 0-dim tensor.

    ``unbiased`` applies Bessel's correction n / (n - 1) with n = mask.sum() (needs n >= 2).
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.to(x.dtype).expand_as(x).sum()
        if n < 2:
            raise ValueError(f"masked_var(unbiased=True) needs at least 2 masked entries, got {n}")
        var = var * n / (n - 1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """Normalise ``x`` to zero mean and unit variance over the masked entries.

    x [B, T], mask [B, T] -> [B, T]: ``(x - mean) / sqrt(var + 1e-8)`` with the masked mean and
    unbiased masked variance over the whole batch; ``shift_mean=False`` adds the mean back (only
    rescales). Entries where mask is 0 are set to 0.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return torch.where(mask != 0, out, torch.zeros_like(out))


def answer_mask(attention_mask: Tensor, prompt_len: Tensor) -> Tensor:
    """1 on the answer tokens of each row: real tokens from ``prompt_len`` on, counted from the
    row's first real token (so any padding side works).

    attention_mask [N, T] (0/1), prompt_len [N] (int) -> [N, T] of attention_mask's dtype.
    E.g. mask [0, 1, 1, 1, 1] (left padded) with prompt_len 2 -> [0, 0, 0, 1, 1].
    """
    start = attention_mask.long().argmax(dim=1) + prompt_len.long()  # first answer position per row
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).unsqueeze(0)
    return attention_mask * (positions >= start.unsqueeze(1)).to(attention_mask.dtype)


def perplexity(mean_nll: float) -> float:
    """exp(mean token NLL), capped at exp(50) so a diverged run reports a number, not inf."""
    return math.exp(min(mean_nll, 50.0))
