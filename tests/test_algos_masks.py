"""Masks of a step-3 rollout (rlhf/algos/masks.py), by hand."""
from __future__ import annotations

import torch

from rlhf.algos.masks import rollout_masks, through_first

EOS = 2


def test_through_first_keeps_tokens_up_to_and_including_the_first_eos():
    answer = torch.tensor([[5, 2, 1, 1],     # EOS second, then padding
                           [2, 2, 7, 1],     # EOS first: only it counts
                           [5, 6, 7, 8]])    # no EOS: every token
    assert through_first(answer, EOS).tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]]


def test_rollout_masks_by_hand():
    pmask = torch.tensor([[0, 1, 1],         # left padded prompt of 2 tokens
                          [1, 1, 1],         # prompt of 3 tokens
                          [0, 0, 1]])        # prompt of 1 token
    answer = torch.tensor([[5, 2, 1, 1],     # answer of 2 (EOS counted): valid
                           [2, 1, 1, 1],     # answer of 1 token: dropped
                           [5, 6, 7, 8]])    # no EOS: 4 tokens
    got = rollout_masks(pmask, answer, EOS)
    assert got.mask.tolist() == [[0, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1]]
    # position t scores token t + 1: actions from t = 2 (prompt length 3 - 1) over the answer
    assert got.action_mask.tolist() == [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 1, 1, 1, 1]]
    assert got.answer_len.tolist() == [2, 1, 4]
    assert got.valid.tolist() == [1, 0, 1]
    assert got.mask.dtype == got.action_mask.dtype == torch.int64


def test_min_answer_tokens_sets_what_counts_as_valid():
    pmask, answer = torch.ones(2, 2, dtype=torch.long), torch.tensor([[5, 2, 1], [5, 6, 2]])
    assert rollout_masks(pmask, answer, EOS, min_answer_tokens=3).valid.tolist() == [0, 1]
    assert rollout_masks(pmask, answer, EOS, min_answer_tokens=1).valid.tolist() == [1, 1]
