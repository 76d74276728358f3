"""The four models of step 3 (and the optional EMA), each with its own ZeRO stage and LoRA setting.

actor (trained, from SFT) behind a HybridEngine; reference (frozen copy of the SFT model, optionally
offloaded); critic (trained, from the RM; only for estimators that need one, ``with_critic``);
reward (frozen RM; absent with ``with_reward=False``, when a reward function scores alone). Built
from plain values: the model groups, the zero/hardware/lora groups and the ppo section; each model
loads through ``rlhf.models.build.load_trainable`` (dropout, gradient checkpointing, LoRA).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rlhf.algos.ema import EMA
from rlhf.engine.hybrid import HybridEngine, position_ids_from_mask
from rlhf.engine.setup import OptimSpec, build_eval_engine, build_train_engine, with_stage

log = logging.getLogger(__name__)


@dataclass
class RLHFEngine:
    actor: Any  # DeepSpeed engine (trained)
    ref: Any  # frozen module or ZeRO-3 inference engine
    critic: Any  # DeepSpeed engine (trained); None for critic-free estimators
    reward: Any  # frozen module or ZeRO-3 inference engine; None without a reward model
    hybrid: HybridEngine
    tokenizer: Any
    ema: Optional[EMA] = None  # rank 0 only
    ema_on: bool = False

    def update_ema(self) -> None:
        """EMA step over the merged actor weights (every rank joins the ZeRO-3 gather)."""
        if not self.ema_on:
            return
        state = self.hybrid.full_state()
        if self.ema is not None:
            self.ema.update((k, v) for k, v in state.items() if v.is_floating_point())


def _module(m):
    return m.module if hasattr(m, "module") else m


def policy_logprobs(model, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] sequences -> [B, T-1] log-prob of each next token (positions from the mask)."""
    from rlhf.algos.logprobs import gather_logprobs

    logits = model(input_ids=seq, attention_mask=mask, position_ids=position_ids_from_mask(mask)).logits
    return gather_logprobs(logits[:, :-1], seq[:, 1:])


def critic_values(model, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T-1] value of the state before each next token."""
    return model(input_ids=seq, attention_mask=mask)[:, :-1]


def reward_scores(model, seq: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B] reward model score at the last real token."""
    return _module(model).score(seq, mask)


def build_rlhf_engine(*, actor_cfg, actor_path: str, critic_cfg, critic_path: Optional[str], tokenizer, ppo, zero,
                      hardware, lora, world: int, total_steps: int, dtype, device,
                      with_critic: bool = True, with_reward: bool = True) -> RLHFEngine:
    from rlhf.models.build import load_trainable
    from rlhf.models.lora import lora_param_groups

    actor_stage = zero.stage if ppo.actor_zero is None else ppo.actor_zero
    critic_stage = zero.stage if ppo.critic_zero is None else ppo.critic_zero
    if (with_critic or with_reward) and not critic_path:
        raise ValueError("step 3 needs a reward model directory for its critic/reward: set critic.path")

    def spec(lr, wd, steps=total_steps):
        return OptimSpec(lr=lr, weight_decay=wd, betas=[0.9, 0.95], eps=1e-8, scheduler=ppo.scheduler,
                         warmup_steps=ppo.warmup_steps, total_steps=steps,
                         micro_batch_size=ppo.train_batch_size, grad_accum=1, grad_clip=ppo.grad_clip)

    # 1. actor: trained, LoRA per ppo.actor_lora, behind the hybrid engine
    actor_lora = ppo.actor_lora and lora.rank > 0
    actor = load_trainable(actor_cfg, actor_path, dtype=dtype, disable_dropout=ppo.actor_disable_dropout,
                           gradient_checkpointing=ppo.actor_gradient_checkpointing, lora=lora if actor_lora else None)
    actor_engine = build_train_engine(actor, lora_param_groups(actor, lora, ppo.actor_lr, ppo.actor_weight_decay),
                                      # PTX takes its own optimizer step after each PPO step
                                      spec(ppo.actor_lr, ppo.actor_weight_decay, total_steps * (2 if ppo.ptx else 1)),
                                      zero, hardware, world,
                                      stage=actor_stage)
    hybrid = HybridEngine(actor_engine, tokenizer, gather=ppo.hybrid_gather, device=device, lora=actor_lora,
                          accelerator=hardware.accelerator)
    # EMA of the merged actor weights (what gets saved), kept on rank 0 only
    ema = None
    if ppo.ema:
        state = hybrid.full_state()  # a collective under ZeRO-3: every rank takes part
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            ema = EMA(((k, v) for k, v in state.items() if v.is_floating_point()), ppo.ema_beta)
    # 2. reference: frozen SFT copy (sharded with the actor under ZeRO-3, optionally offloaded)
    ref = load_trainable(actor_cfg, actor_path, dtype=dtype, disable_dropout=True)
    ref = build_eval_engine(ref, zero, hardware, world, stage=actor_stage, offload=ppo.offload_reference and
                            actor_stage == 3, micro_batch_size=ppo.train_batch_size)
    # 3. critic: trained, from the reward model (critic-free estimators build none)
    critic_engine = None
    if with_critic:
        critic = load_trainable(critic_cfg, critic_path, kind="reward", dtype=dtype,
                                disable_dropout=ppo.critic_disable_dropout,
                                gradient_checkpointing=ppo.critic_gradient_checkpointing,
                                lora=lora if ppo.critic_lora else None)
        critic_zero = with_stage(zero, critic_stage)
        critic_engine = build_train_engine(critic, lora_param_groups(critic, lora, ppo.critic_lr, ppo.critic_weight_decay),
                                           spec(ppo.critic_lr, ppo.critic_weight_decay), critic_zero, hardware, world)
    # 4. reward: frozen reward model (none when a reward function scores alone)
    reward = None
    if with_reward:
        reward = load_trainable(critic_cfg, critic_path, kind="reward", dtype=dtype, disable_dropout=True)
        reward = build_eval_engine(reward, zero, hardware, world, stage=critic_stage,
                                   micro_batch_size=ppo.train_batch_size)
    critic_s = (f"ZeRO-{critic_stage}" + (" + LoRA" if ppo.critic_lora and lora.rank > 0 else "")
                if with_critic else "none")
    log.info("step-3 models: actor ZeRO-%d%s, reference %s, critic %s, reward model %s, EMA %s",
             actor_stage, " + LoRA" if actor_lora else "", "ZeRO-3 sharded" if actor_stage == 3 else "full copy",
             critic_s, "frozen" if with_reward else "none", "on" if ema else "off")
    return RLHFEngine(actor_engine, ref, critic_engine, reward, hybrid, tokenizer, ema, bool(ppo.ema))
