"""Direct preference optimisation losses, chosen by name through ``DPO_LOSSES``.

Inputs are summed sequence log-probabilities of the answers (``sequence_logprobs``), each [B]:
policy_chosen, policy_rejected (trained model), ref_chosen, ref_rejected (frozen reference).
With h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected), every loss function
returns per-example losses [B].
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def _log_ratio_margin(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                      ref_rejected: Tensor) -> Tensor:
    """h [B] = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected), all [B]."""
    return (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected)


def sigmoid_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                 ref_rejected: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """DPO (Rafailov et al. 2023); label_smoothing ε > 0 gives conservative DPO:
    ``-(1 - ε) * logsigmoid(beta * h) - ε * logsigmoid(-beta * h)`` -> [B]."""
    logits = beta * _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)


def ipo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """IPO (Azar et al. 2023): ``(h - 1 / (2 * beta))^2`` -> [B]; label_smoothing is ignored."""
    h = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return (h - 1.0 / (2.0 * beta)) ** 2


def hinge_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
               ref_rejected: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """SLiC-style hinge: ``relu(1 - beta * h)`` -> [B]; label_smoothing is ignored."""
    h = _log_ratio_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected)
    return torch.relu(1.0 - beta * h)


DPO_LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
}


def chosen_nll(policy_chosen: Tensor, chosen_tokens: Tensor) -> Tensor:
    """Mean per-token negative log-likelihood of the chosen answers: ``mean(-policy_chosen /
    chosen_tokens)``, both [B] (summed log-probs, answer token counts) -> 0-dim. Added to a DPO loss
    with a weight (RPO, Pang et al. 2024) it keeps the chosen answers likely: plain DPO only widens
    the margin and may lower both."""
    return (-policy_chosen / chosen_tokens.clamp(min=1).to(policy_chosen.dtype)).mean()


def dpo_loss(name: str, policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
             ref_rejected: Tensor, beta: float, label_smoothing: float = 0.0
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """Mean DPO-family loss ``DPO_LOSSES[name]`` over the batch, all inputs [B] -> (loss 0-dim,
    stats of detached 0-dim tensors): "chosen_reward" mean beta * (policy_chosen - ref_chosen),
    "rejected_reward" mean beta * (policy_rejected - ref_rejected), "margin" mean of their
    difference, "accuracy" share of examples with chosen reward > rejected reward.
    Unknown ``name`` -> ValueError listing the registered names.
    """
    if name not in DPO_LOSSES:
        raise ValueError(f"unknown DPO loss {name!r}; choose one of {sorted(DPO_LOSSES)}")
    losses = DPO_LOSSES[name](policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                              beta, label_smoothing)
    with torch.no_grad():
        chosen_reward = beta * (policy_chosen - ref_chosen).float()
        rejected_reward = beta * (policy_rejected - ref_rejected).float()
        stats = {
            "chosen_reward": chosen_reward.mean(),
            "rejected_reward": rejected_reward.mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
            "accuracy": (chosen_reward > rejected_reward).float().mean(),
        }
    return losses.mean(), stats
