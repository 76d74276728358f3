"""DPO-family losses against hand-computed numbers."""

import math

import pytest
import torch

from rlhf.algos.dpo import DPO_LOSSES, dpo_loss
from tests.numeric import close, softplus

T = torch.tensor

# Two examples. h = (pc - pr) - (rc - rr):
#   example 0: (-1 - -2) - (-1.5 - -1.5) = 1.0
#   example 1: (-3 - -1) - (-2.0 - -2.0) = -2.0
PC, PR = T([-1.0, -3.0]), T([-2.0, -1.0])
RC, RR = T([-1.5, -2.0]), T([-1.5, -2.0])




def test_registry_names():
    assert set(DPO_LOSSES) == {"sigmoid", "ipo", "hinge"}


def test_sigmoid_loss():
    losses = DPO_LOSSES["sigmoid"](PC, PR, RC, RR, 0.5, 0.0)
    # -logsigmoid(beta*h) = log(1 + e^(-beta*h)); beta*h = 0.5, -1.0
    close(losses, [softplus(-0.5), softplus(1.0)])  # [0.474077, 1.313262]


def test_sigmoid_loss_label_smoothing_conservative_dpo():
    losses = DPO_LOSSES["sigmoid"](PC, PR, RC, RR, 0.5, 0.1)
    # -(0.9) logsigmoid(bh) - 0.1 logsigmoid(-bh)
    close(losses, [0.9 * softplus(-0.5) + 0.1 * softplus(0.5),
                   0.9 * softplus(1.0) + 0.1 * softplus(-1.0)])


def test_ipo_loss():
    losses = DPO_LOSSES["ipo"](PC, PR, RC, RR, 0.25, 0.0)
    # (h - 1/(2*0.25))^2 = (h - 2)^2
    close(losses, [(1.0 - 2.0) ** 2, (-2.0 - 2.0) ** 2])  # [1, 16]


def test_hinge_loss():
    losses = DPO_LOSSES["hinge"](PC, PR, RC, RR, 0.5, 0.0)
    # relu(1 - 0.5*h): relu(0.5), relu(2.0); a large margin gives 0
    close(losses, [0.5, 2.0])
    close(DPO_LOSSES["hinge"](T([0.0]), T([-4.0]), T([0.0]), T([0.0]), 0.5, 0.0), [0.0])


def test_dpo_loss_mean_and_stats():
    loss, stats = dpo_loss("sigmoid", PC, PR, RC, RR, beta=0.5)
    close(loss, (softplus(-0.5) + softplus(1.0)) / 2)
    # chosen reward 0.5*(pc - rc) = [0.25, -0.5]; rejected 0.5*(pr - rr) = [-0.25, 0.5]
    close(stats["chosen_reward"], (0.25 - 0.5) / 2)
    close(stats["rejected_reward"], (-0.25 + 0.5) / 2)
    close(stats["margin"], (0.5 + -1.0) / 2)   # differences [0.5, -1.0]
    close(stats["accuracy"], 0.5)               # only example 0 has chosen > rejected


def test_dpo_loss_smoothing_and_gradient():
    pc = PC.clone().requires_grad_()
    loss, _ = dpo_loss("sigmoid", pc, PR, RC, RR, beta=0.5, label_smoothing=0.1)
    close(loss, (0.9 * softplus(-0.5) + 0.1 * softplus(0.5)
                 + 0.9 * softplus(1.0) + 0.1 * softplus(-1.0)) / 2)
    loss.backward()
    # d/dpc of [-(1-e) logsig(b h) - e logsig(-b h)] / 2 = b * (sig(b h) - (1 - e)) / 2
    sig = [1 / (1 + math.exp(-0.5)), 1 / (1 + math.exp(1.0))]
    close(pc.grad, [0.5 * (s - 0.9) / 2 for s in sig])


def test_unknown_loss_names_the_choices():
    with pytest.raises(ValueError, match=r"'robust'.*\['hinge', 'ipo', 'sigmoid'\]"):
        dpo_loss("robust", PC, PR, RC, RR, beta=0.1)


def test_answer_mask_by_hand_for_both_padding_sides():
    from rlhf.algos.logprobs import answer_mask

    mask = torch.tensor([[0, 1, 1, 1, 1],    # left padded: prompt at 1-2, answer 3-4
                         [1, 1, 1, 0, 0],    # right padded: prompt 0, answer 1-2
                         [1, 1, 1, 1, 1]])   # no padding: prompt 0-3, answer 4
    got = answer_mask(mask, torch.tensor([2, 1, 4]))
    assert got.tolist() == [[0, 0, 0, 1, 1], [0, 1, 1, 0, 0], [0, 0, 0, 0, 1]]


def test_chosen_nll_is_the_mean_per_token_nll():
    from rlhf.algos.dpo import chosen_nll

    # summed log-probs -3 over 3 tokens and -1 over 2 tokens: per-token NLL 1.0 and 0.5, mean 0.75
    assert float(chosen_nll(torch.tensor([-3.0, -1.0]), torch.tensor([3, 2]))) == pytest.approx(0.75)
    # an empty answer counts as one token (no division by zero)
    assert float(chosen_nll(torch.tensor([0.0]), torch.tensor([0]))) == 0.0
