"""Reward-model ranking losses and metrics (reference.md §1 step 2).

Sequences are right padded: ``ids[b] = prompt + answer + pad ... pad``. The end of a sequence is
the first ``pad_id`` at or after its prompt (``prompt_len``; 0 if not given), or T when there is
none; its score is the value head's output at its last real token, index ``end - 1``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def pairwise_loss(chosen_scores: Tensor, rejected_scores: Tensor) -> Tensor:
    """Bradley-Terry ranking loss: chosen_scores [B], rejected_scores [B] -> 0-dim
    ``mean(-logsigmoid(chosen - rejected))``."""
    return -F.logsigmoid(chosen_scores - rejected_scores).mean()


def sequence_end(ids: Tensor, pad_id: int, start: int = 0) -> int:
    """First index >= ``start`` where ``ids`` [T] equals ``pad_id``, or T if there is none."""
    pads = (ids[start:] == pad_id).nonzero()
    return start + int(pads[0]) if len(pads) else ids.shape[0]


def divergent_pairwise_loss(chosen_values: Tensor, rejected_values: Tensor, chosen_ids: Tensor,
                            rejected_ids: Tensor, pad_id: int, prompt_len: Tensor | None = None
                            ) -> tuple[Tensor, Tensor, Tensor]:
    """DeepSpeed-Chat's step-2 loss over the divergent part of each (chosen, rejected) pair.

    chosen_values [B, T], rejected_values [B, T] (per-token value-head outputs), chosen_ids [B, T],
    rejected_ids [B, T] (right padded with ``pad_id``), prompt_len [B] or None (where to start
    looking for the pad; use it when pad_id may occur inside the prompt)
    -> (loss 0-dim, chosen_end_scores [B], rejected_end_scores [B]).
    Per pair: span = [first index where the ids differ, max(chosen end, rejected end)); pair
    loss = mean over the span of ``-logsigmoid(chosen_values - rejected_values)``. Identical ids
    (or an empty span) use only the last real token, index chosen end - 1 (DeepSpeed-Chat uses
    index T - 1, which may be a pad). loss = mean of the pair losses.
    """
    losses, chosen_end, rejected_end = [], [], []
    for b in range(chosen_ids.shape[0]):
        start = 0 if prompt_len is None else int(prompt_len[b])
        c_end = sequence_end(chosen_ids[b], pad_id, start)
        r_end = sequence_end(rejected_ids[b], pad_id, start)
        if min(c_end, r_end) == 0:
            raise ValueError(f"pair {b} starts with pad_id={pad_id}: left padded, or pass prompt_len")
        differ = (chosen_ids[b] != rejected_ids[b]).nonzero()
        first, end = (int(differ[0]), max(c_end, r_end)) if len(differ) else (c_end - 1, c_end)
        if first >= end:
            first, end = c_end - 1, c_end
        margin = chosen_values[b, first:end] - rejected_values[b, first:end]
        losses.append(-F.logsigmoid(margin).mean())
        chosen_end.append(chosen_values[b, c_end - 1])
        rejected_end.append(rejected_values[b, r_end - 1])
    return torch.stack(losses).mean(), torch.stack(chosen_end), torch.stack(rejected_end)


def ranking_metrics(chosen_scores: Tensor, rejected_scores: Tensor) -> dict[str, Tensor]:
    """Reward-model eval metrics: chosen_scores [B], rejected_scores [B] -> dict of detached 0-dim
    tensors: "acc" (share with chosen > rejected, ties count as wrong), "chosen_mean",
    "rejected_mean", "margin_mean" (mean of chosen - rejected)."""
    c, r = chosen_scores.detach().float(), rejected_scores.detach().float()
    return {
        "acc": (c > r).float().mean(),
        "chosen_mean": c.mean(),
        "rejected_mean": r.mean(),
        "margin_mean": (c - r).mean(),
    }
