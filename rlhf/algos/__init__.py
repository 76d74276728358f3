"""Pure torch algorithm pieces: log-probs, rollout masks, PPO (KL reward, GAE, losses, KL controllers),
DPO losses, reward-model ranking loss, EMA. Imports only torch and the standard library."""

from rlhf.algos.dpo import DPO_LOSSES, dpo_loss
from rlhf.algos.ema import EMA, ema_update
from rlhf.algos.logprobs import (gather_logprobs, masked_mean, masked_sum, masked_var,
                                 masked_whiten, sequence_logprobs)
from rlhf.algos.masks import rollout_masks, through_first
from rlhf.algos.ppo import (AdaptiveKLController, FixedKLController, gae_advantages,
                            kl_estimates, kl_penalized_rewards, last_true_index, policy_loss,
                            value_loss)
from rlhf.algos.ranking import divergent_pairwise_loss, pairwise_loss, ranking_metrics

__all__ = [
    "DPO_LOSSES", "dpo_loss", "EMA", "ema_update", "gather_logprobs", "masked_mean",
    "masked_sum", "masked_var", "masked_whiten", "sequence_logprobs", "AdaptiveKLController",
    "FixedKLController", "gae_advantages", "kl_estimates", "kl_penalized_rewards",
    "last_true_index", "policy_loss", "value_loss", "divergent_pairwise_loss", "pairwise_loss",
    "ranking_metrics", "rollout_masks", "through_first",
]
