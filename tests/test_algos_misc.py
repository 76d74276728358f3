"""Log-probs, masked reductions, ranking loss and metrics, EMA: hand-computed numbers."""

import math

import pytest
import torch

from rlhf.algos.ema import EMA, ema_update
from rlhf.algos.logprobs import gather_logprobs, masked_mean, masked_var, sequence_logprobs
from rlhf.algos.ranking import divergent_pairwise_loss, pairwise_loss, ranking_metrics
from tests.numeric import close, softplus

T = torch.tensor




# ---------------------------------------------------------------- log-probs


def test_gather_logprobs_float32_from_bf16():
    logits = T([[[0.0, math.log(3.0)], [2.0, 2.0]]]).to(torch.bfloat16)  # [B=1, T=2, V=2]
    lp = gather_logprobs(logits, T([[1, 0]]))
    assert lp.dtype == torch.float32
    # softmax([0, ln 3]) = [1/4, 3/4]; equal logits -> 1/2 (bf16 rounds ln 3 = 1.0986 to 1.1016)
    close(lp, [[math.log(3.0 / 4.0), math.log(0.5)]], tol=3e-3)


def test_sequence_logprobs_shift_and_mask():
    # V=3; logits chosen so each position has known probabilities
    logits = torch.log(T([[[0.2, 0.3, 0.5], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [1 / 3] * 3]]))
    ids = T([[0, 2, 2, 0]])
    mask = T([[0, 0, 1, 1]])  # tokens 2 and 3 are the answer
    # token 2 (id 2) predicted by position 1: 0.8; token 3 (id 0) by position 2: 0.6
    close(sequence_logprobs(logits, ids, mask), [math.log(0.8) + math.log(0.6)])
    close(sequence_logprobs(logits, ids, T([[1, 1, 0, 0]])), [math.log(0.5)])  # mask[:, 0] unused


def test_masked_mean_dims_and_empty_mask():
    x = T([[1.0, 2.0, math.nan], [4.0, 6.0, 8.0]])
    mask = T([[1, 1, 0], [0, 1, 1]])
    close(masked_mean(x, mask), (1 + 2 + 6 + 8) / 4)          # the NaN is masked away
    close(masked_mean(x, mask, dim=1), [(1 + 2) / 2, (6 + 8) / 2])
    close(masked_mean(x, torch.zeros_like(mask)), 0.0)
    close(masked_var(x, mask), ((1 - 4.25) ** 2 + (2 - 4.25) ** 2 + (6 - 4.25) ** 2
                                + (8 - 4.25) ** 2) / 3)       # unbiased: / (4 - 1)


# ---------------------------------------------------------------- ranking


def test_pairwise_loss():
    loss = pairwise_loss(T([2.0, 0.0]), T([1.0, 1.0]))
    # -logsigmoid(c - r) = log(1 + e^-(c - r)); c - r = 1, -1
    close(loss, (softplus(-1.0) + softplus(1.0)) / 2)


def test_divergent_pairwise_loss_two_pairs_with_pads():
    pad = 0
    chosen_ids = T([[5, 6, 7, 8, 0, 0],
                    [0, 6, 7, 0, 0, 0]])   # pair 1: pad_id also opens the prompt
    rejected_ids = T([[5, 6, 9, 0, 0, 0],
                      [0, 6, 7, 0, 0, 0]])  # pair 1 identical
    chosen_values = T([[0.1, 0.2, 1.0, 2.0, 9.0, 9.0],
                       [0.3, 0.4, 1.5, 9.0, 9.0, 9.0]])
    rejected_values = T([[0.1, 0.2, 0.5, 3.0, 9.0, 9.0],
                         [0.3, 0.4, 0.5, 9.0, 9.0, 9.0]])
    loss, c_end, r_end = divergent_pairwise_loss(chosen_values, rejected_values, chosen_ids,
                                                 rejected_ids, pad, prompt_len=T([2, 1]))
    # pair 0: ends 4 (chosen) and 3 (rejected), first difference at 2 -> span [2, 4)
    #   c - r over span = [1.0 - 0.5, 2.0 - 3.0] = [0.5, -1.0]
    pair0 = (softplus(-0.5) + softplus(1.0)) / 2
    # pair 1: identical, end 3 (pad search starts at prompt_len 1) -> last token index 2
    pair1 = softplus(-(1.5 - 0.5))
    close(loss, (pair0 + pair1) / 2)
    close(c_end, [2.0, 1.5])   # chosen_values at end - 1: index 3, index 2
    close(r_end, [0.5, 0.5])   # rejected_values at index 2, index 2


def test_divergent_pairwise_loss_without_pads_or_prompt_len():
    ids_c, ids_r = T([[1, 2, 3]]), T([[1, 4, 5]])
    vc, vr = T([[0.0, 1.0, 2.0]]), T([[0.0, 2.0, 1.0]])
    loss, c_end, r_end = divergent_pairwise_loss(vc, vr, ids_c, ids_r, pad_id=0, prompt_len=None)
    close(loss, (softplus(1.0) + softplus(-1.0)) / 2)  # span [1, 3): c - r = -1, 1
    close(c_end, [2.0])
    close(r_end, [1.0])


def test_divergent_pairwise_loss_rejects_leading_pad():
    ids = T([[0, 2, 3]])
    with pytest.raises(ValueError, match="prompt_len"):
        divergent_pairwise_loss(T([[0.0] * 3]), T([[0.0] * 3]), ids, ids, pad_id=0)


def test_ranking_metrics():
    m = ranking_metrics(T([2.0, 0.0, 1.5, 3.0]), T([1.0, 1.0, 1.5, -1.0]))
    close(m["acc"], 2 / 4)                       # the tie (1.5, 1.5) is not a win
    close(m["chosen_mean"], (2 + 0 + 1.5 + 3) / 4)
    close(m["rejected_mean"], (1 + 1 + 1.5 - 1) / 4)
    close(m["margin_mean"], (1 - 1 + 0 + 4) / 4)


# ---------------------------------------------------------------- EMA


def test_ema_update_in_place():
    ema = [T([1.0, 2.0]), T(4.0)]
    ema_update(ema, [T([3.0, -2.0]), T(0.0)], beta=0.9)
    close(ema[0], [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * -2])  # [1.2, 1.6]
    close(ema[1], 0.9 * 4.0)
    with pytest.raises(ValueError):
        ema_update(ema, [T(0.0)], beta=0.9)


def test_ema_class_update_copy_and_state():
    model = torch.nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(T([[1.0, -1.0]]))
        model.bias.fill_(0.5)
    ema = EMA(model.named_parameters(), beta=0.8)
    with torch.no_grad():
        model.weight.copy_(T([[2.0, 1.0]]))
        model.bias.fill_(-0.5)
    ema.update(model.named_parameters())
    close(ema.shadow["weight"], [[0.8 * 1 + 0.2 * 2, 0.8 * -1 + 0.2 * 1]])  # [1.2, -0.6]
    close(ema.shadow["bias"], [0.8 * 0.5 + 0.2 * -0.5])                    # 0.3

    restored = EMA([], beta=0.0)
    restored.load_state_dict(ema.state_dict())
    assert restored.beta == 0.8
    target = torch.nn.Linear(2, 1)
    restored.copy_to(target)
    close(target.weight, [[1.2, -0.6]])
    close(target.bias, [0.3])
    with pytest.raises(KeyError):
        ema.update([("missing", torch.zeros(1))])


def test_ema_shadow_is_float32_for_bf16_params():
    p = torch.nn.Parameter(torch.ones(1, dtype=torch.bfloat16))
    ema = EMA([("p", p)], beta=0.999)
    assert ema.shadow["p"].dtype == torch.float32
    with torch.no_grad():
        p.fill_(2.0)
    ema.update([("p", p)])
    # 0.999 * 1 + 0.001 * 2 = 1.001: kept in float32 (bf16 would round it back to 1.0)
    close(ema.shadow["p"], [1.001], tol=1e-6)
