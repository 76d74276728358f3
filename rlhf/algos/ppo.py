"""PPO for RLHF with DeepSpeed-Chat semantics (reference.md §1 step 3).

All per-token tensors are *aligned*: position t of ``logprobs``, ``values``, ``rewards`` and
``action_mask`` refers to the same generated token (the caller does the causal shift, e.g. with
``gather_logprobs(logits[:, :-1], ids[:, 1:])`` and ``mask[:, 1:]``). ``action_mask`` is 1 on the
answer tokens and 0 on the prompt, after the end of the answer (EOS) and on padding; it is assumed
contiguous (zeros, ones, zeros). Stats dicts hold detached 0-dim tensors (call ``.item()``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from rlhf.algos.logprobs import masked_mean, masked_whiten

Tensor = torch.Tensor


def last_true_index(mask: Tensor) -> Tensor:
    """Index of the last nonzero entry of each row, mask [B, T] -> [B] int64 (-1 if the row is
    all zero)."""
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask != 0, positions, torch.full_like(positions, -1)).max(dim=1).values


def kl_penalized_rewards(logprobs: Tensor, ref_logprobs: Tensor, scores: Tensor,
                         action_mask: Tensor, kl_ctl: float) -> Tensor:
    """Per-token PPO reward: KL penalty on every answer token, the score on the last one.

    logprobs [B, T], ref_logprobs [B, T] (actor / reference log-prob of each token), scores [B]
    (already clipped where it should be: :func:`total_scores`), action_mask [B, T] -> rewards [B, T]:
    ``-kl_ctl * (logprobs - ref_logprobs)`` where action_mask is 1, 0 elsewhere, plus the score at
    the last position where action_mask is 1 (rows with no answer token get no score).
    """
    keep = action_mask != 0
    kl = -kl_ctl * (logprobs - ref_logprobs)
    rewards = torch.where(keep, kl, torch.zeros_like(kl))
    last = last_true_index(action_mask)
    score = scores.to(rewards.dtype)
    score = torch.where(last >= 0, score, torch.zeros_like(score))
    return rewards.scatter_add(1, last.clamp(min=0).unsqueeze(1), score.unsqueeze(1))


def total_scores(rm: Tensor, fn: Tensor, fn_weight: float, clip_reward_value: float) -> Tensor:
    """The score of each answer: rm [B] (reward model), fn [B] (reward function) -> [B]
    ``clamp(rm, -clip_reward_value, clip_reward_value) + fn_weight * fn``.

    The clip guards against the learned model's outliers (DeepSpeed-Chat clips its score); a
    reward function's scores are the user's own and pass unclipped. Clipping the sum instead
    lets a reward model that scores at the clip hide the function entirely.
    """
    return rm.clamp(-clip_reward_value, clip_reward_value) + fn_weight * fn.to(rm.dtype)


def leave_one_out_scores(scores: Tensor, group_size: int, valid: Tensor | None = None) -> Tensor:
    """Scores minus the mean score of the other answers to the same prompt (RLOO's baseline).

    scores [B] with B = prompts * group_size, the answers of one prompt adjacent
    (``repeat_interleave`` order); valid [B] (bool, optional): rows that count towards the other
    answers' baselines. A row with no valid other answer in its group keeps its score. -> [B].
    """
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    if group_size == 1:
        return scores
    g = scores.view(-1, group_size)
    w = (torch.ones_like(g) if valid is None else valid.view(-1, group_size).to(g.dtype))
    others_sum = (g * w).sum(1, keepdim=True) - g * w
    others_n = w.sum(1, keepdim=True) - w
    base = torch.where(others_n > 0, others_sum / others_n.clamp(min=1), torch.zeros_like(g))
    return (g - base).reshape(-1)


def gae_advantages(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float,
                   lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the answer tokens (reverse loop over T).

    rewards [B, T], values [B, T], mask [B, T] -> (advantages [B, T], returns [B, T]), detached.
    Rewards and values where mask is 0 (after the end of the answer, padding) count as 0, so the
    value after the last answer token is 0 (episode end). With r, v masked:
    ``delta_t = r_t + gamma * v_{t+1} - v_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``,
    ``returns = A + v``; both outputs are 0 where mask is 0 (the recursion restarts there).
    """
    keep = mask != 0
    zeros = torch.zeros_like(values)
    r = torch.where(keep, rewards, zeros).detach()
    v = torch.where(keep, values, zeros).detach()
    next_v = torch.cat([v[:, 1:], zeros[:, :1]], dim=1)
    delta = r + gamma * next_v - v
    advantages = torch.zeros_like(v)
    running = zeros[:, 0]
    for t in reversed(range(v.shape[1])):
        running = torch.where(keep[:, t], delta[:, t] + gamma * lam * running, zeros[:, 0])
        advantages[:, t] = running
    returns = torch.where(keep, advantages + v, zeros)
    return advantages, returns


def reward_to_go(rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """Discounted sum of the rewards from each answer token to the end of the answer.

    rewards [B, T], mask [B, T] -> returns [B, T], detached: ``R_t = r_t + gamma * R_{t+1}`` over
    masked tokens (rewards where mask is 0 count as 0); 0 where mask is 0.
    """
    keep = mask != 0
    r = torch.where(keep, rewards, torch.zeros_like(rewards)).detach()
    out = torch.zeros_like(r)
    running = r[:, 0] * 0
    for t in reversed(range(r.shape[1])):
        running = torch.where(keep[:, t], r[:, t] + gamma * running, torch.zeros_like(running))
        out[:, t] = running
    return out


def group_normalized_scores(scores: Tensor, group_size: int, valid: Tensor | None = None,
                            eps: float = 1e-6) -> Tensor:
    """GRPO's advantage of an answer: ``(score - group mean) / (group std + eps)``.

    scores [B] with B = prompts * group_size, a prompt's answers adjacent; valid [B] (bool,
    optional): rows that count. Mean and (unbiased) std are over the valid rows of the group; a
    row of a group with fewer than two valid rows, and every invalid row, gets 0. -> [B].
    """
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(f"{scores.shape[0]} scores do not split into groups of {group_size}")
    g = scores.view(-1, group_size).to(torch.float32)
    w = torch.ones_like(g) if valid is None else valid.view(-1, group_size).to(g.dtype)
    n = w.sum(1, keepdim=True)
    mean = (g * w).sum(1, keepdim=True) / n.clamp(min=1)
    var = (((g - mean) * w) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    out = (g - mean) / (var.sqrt() + eps)
    out = torch.where((n >= 2) & (w > 0), out, torch.zeros_like(out))
    return out.reshape(-1).to(scores.dtype)


@dataclass(frozen=True)
class AdvantageInputs:
    """What an estimator may use, all from one rollout (aligned as in the module docstring).

    scores [B] (reward per answer), logprobs / ref_logprobs [B, T], values [B, T] or None (no
    critic), mask [B, T] (answer tokens), valid [B] (bool: answers kept), group_size (answers per
    prompt, adjacent), kl_coef (KL penalty per token), gamma, lam.
    """

    scores: Tensor
    logprobs: Tensor
    ref_logprobs: Tensor
    values: Tensor | None
    mask: Tensor
    valid: Tensor
    group_size: int
    kl_coef: float
    gamma: float
    lam: float


def _gae(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    rewards = kl_penalized_rewards(x.logprobs, x.ref_logprobs, x.scores, x.mask, x.kl_coef)
    return gae_advantages(rewards, x.values, x.mask, x.gamma, x.lam)


def _grpo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    adv = group_normalized_scores(x.scores, x.group_size, x.valid).unsqueeze(1) * (x.mask != 0)
    return adv, adv


def _rloo(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    shaped = leave_one_out_scores(x.scores, x.group_size, x.valid)
    rewards = kl_penalized_rewards(x.logprobs, x.ref_logprobs, shaped, x.mask, x.kl_coef)
    returns = reward_to_go(rewards, x.mask, x.gamma)
    return returns, returns


def _reinforce_pp(x: AdvantageInputs) -> tuple[Tensor, Tensor]:
    rewards = kl_penalized_rewards(x.logprobs, x.ref_logprobs, x.scores, x.mask, x.kl_coef)
    returns = reward_to_go(rewards, x.mask, x.gamma)
    adv = masked_whiten(returns, x.mask) if (x.mask != 0).sum() > 1 else returns
    return adv, returns


@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: ``fn(AdvantageInputs) -> (advantages [B, T], returns [B, T])``.

    critic: it needs a value model (returns are its regression target); kl_in_loss: the KL to the
    reference is a loss term (``kl_loss``, coefficient kl_ctl) instead of a per-token reward.
    """

    fn: Callable[[AdvantageInputs], tuple[Tensor, Tensor]]
    critic: bool
    kl_in_loss: bool = False


# ppo.advantage -> estimator. Critic-free ones need several answers per prompt (ppo.samples_per_prompt).
ADVANTAGES: dict[str, Estimator] = {
    # DeepSpeed-Chat/InstructGPT: KL-penalised token rewards, critic values, GAE(gamma, lam)
    "gae": Estimator(_gae, critic=True),
    # GRPO (DeepSeekMath): the answer's score normalised by its prompt's group mean/std on every
    # token; the KL to the reference is a k3 loss term
    "grpo": Estimator(_grpo, critic=False, kl_in_loss=True),
    # RLOO: score minus the mean of the prompt's other answers, KL-penalised token rewards, reward-to-go
    "rloo": Estimator(_rloo, critic=False),
    # REINFORCE++: KL-penalised token rewards, reward-to-go, whitened over the whole batch
    "reinforce_pp": Estimator(_reinforce_pp, critic=False),
}


def get_estimator(name: str) -> Estimator:
    if name not in ADVANTAGES:
        raise ValueError(f"ppo.advantage={name!r}: expected one of {', '.join(ADVANTAGES)}")
    return ADVANTAGES[name]


def kl_loss(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k3 estimate of KL(actor || reference) as a loss (GRPO): masked mean of
    ``exp(d) - 1 - d`` with d = ref_logprobs - logprobs; [B, T] each -> 0-dim, with grad."""
    keep = mask != 0
    d = torch.where(keep, ref_logprobs - logprobs, torch.zeros_like(logprobs))
    return masked_mean(torch.expm1(d) - d, mask)


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                cliprange: float) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate for the actor.

    logprobs [B, T] (current policy, with grad), old_logprobs [B, T] (at rollout time),
    advantages [B, T], mask [B, T] -> (loss 0-dim, stats). With ratio = exp(logp - old_logp):
    loss = masked mean of ``max(-A * ratio, -A * clamp(ratio, 1 - c, 1 + c))``.
    stats: "clipfrac" share of masked tokens where the clipped term is the larger one
    (strictly), "approx_kl" masked mean of ``(ratio - 1) - log ratio`` (k3, >= 0).
    """
    keep = mask != 0
    log_ratio = torch.where(keep, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
        }
    return loss, stats


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor,
               cliprange_value: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss for the critic.

    values [B, T] (current critic, with grad), old_values [B, T] (at rollout time), returns [B, T],
    mask [B, T] -> (loss 0-dim, stats). With v_clip = clamp(v, old - c, old + c):
    loss = 0.5 * masked mean of ``max((v - R)^2, (v_clip - R)^2)``.
    stats: "clipfrac" share of masked tokens where the clipped error is strictly larger.
    """
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    err = (values - returns) ** 2
    err_clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(err, err_clipped), mask)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((err_clipped > err).to(err.dtype), mask)}
    return loss, stats


def kl_estimates(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """KL(actor || reference) estimates from sampled tokens, for logging / the KL controller.

    logprobs [B, T], ref_logprobs [B, T], mask [B, T] -> dict of detached 0-dim tensors:
    "kl": per sequence, the sum over masked tokens of ``logp - logp_ref`` (k1), averaged over B;
    "k3": same aggregation of ``exp(d) - 1 - d`` with d = logp_ref - logp (unbiased, >= 0);
    "kl_token_mean": masked mean of ``logp - logp_ref`` over all tokens of the batch.
    """
    with torch.no_grad():
        keep = mask != 0
        zeros = torch.zeros_like(logprobs)
        k1 = torch.where(keep, logprobs - ref_logprobs, zeros)
        k3 = torch.where(keep, torch.expm1(-k1) + k1, zeros)
        return {
            "kl": k1.sum(dim=1).mean(),
            "k3": k3.sum(dim=1).mean(),
            "kl_token_mean": masked_mean(k1, mask),
        }


class FixedKLController:
    """Constant KL coefficient (DeepSpeed-Chat's default); ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Ignore the measured KL (same interface as AdaptiveKLController)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Proportional KL controller of Ziegler et al. (2019).

    ``update(current_kl, n_steps)``: error = clip(current_kl / target - 1, -0.2, 0.2);
    ``value *= 1 + error * n_steps / horizon`` (n_steps: samples/steps seen since the last update).
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be > 0, got {target=}, {horizon=}")
        self.value, self.target, self.horizon = float(init_kl_coef), float(target), float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
        self.target, self.horizon = float(state["target"]), float(state["horizon"])
