"""Masks of a step-3 rollout: which generated tokens are the answer, which positions are actions.

Shapes: B rollouts, P prompt length (left padded), A generated length, T = P + A. Masks are int64 0/1.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from rlhf.algos.logprobs import answer_mask

Tensor = torch.Tensor


def through_first(tokens: Tensor, stop_id: int) -> Tensor:
    """1 on every token up to and including the first ``stop_id`` of its row, 0 after it.

    tokens [B, A] -> [B, A] int64. E.g. [5, 2, 1, 1] with stop_id 2 -> [1, 1, 0, 0]; a row
    without ``stop_id`` is all ones.
    """
    stop = (tokens == stop_id).long()
    return ((stop.cumsum(1) - stop) == 0).long()


class RolloutMasks(NamedTuple):
    mask: Tensor  # [B, T] attention mask of prompt + answer (answer up to and including the first EOS)
    action_mask: Tensor  # [B, T-1] 1 where the next token is an answer token of a valid rollout
    answer_len: Tensor  # [B] answer tokens (the EOS counted)
    valid: Tensor  # [B] 1 when the answer has at least ``min_answer_tokens`` tokens, else 0


def rollout_masks(prompt_mask: Tensor, answer: Tensor, eos_id: int, min_answer_tokens: int = 2) -> RolloutMasks:
    """The masks of sequences ``prompt + answer`` (prompts left padded, as generation needs).

    prompt_mask [B, P], answer [B, A] (the generated tokens) -> RolloutMasks. Position t of
    ``action_mask`` scores the token t + 1 (log-probs and values are shifted by one), so it is 1
    from t = P - 1 on, over the answer; rows shorter than ``min_answer_tokens`` are all 0 (dropped).
    E.g. prompt_mask [0, 1, 1], answer [5, 2, 1, 1], eos 2 -> mask [0, 1, 1, 1, 1, 0, 0],
    action_mask [0, 0, 1, 1, 0, 0], answer_len 2, valid 1.
    """
    ans = through_first(answer, eos_id)
    mask = torch.cat([prompt_mask, ans.to(prompt_mask.dtype)], dim=1)
    answer_len = ans.sum(1)
    valid = (answer_len >= min_answer_tokens).long()
    actions = answer_mask(mask, prompt_mask.long().sum(1))[:, 1:] * valid.unsqueeze(1).to(mask.dtype)
    return RolloutMasks(mask, actions, answer_len, valid)
