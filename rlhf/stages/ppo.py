"""Step 3: RLHF with PPO (DeepSpeed-Chat semantics, reference.md §1).

Four models (rlhf/engine/rlhf_engine.py): actor from the SFT model behind the hybrid engine,
frozen reference, critic from the reward model, frozen reward model; optional EMA of the actor.

Steps:
  1. start the run; resolve the actor (``actor.path``) and critic/reward (``critic.path``) dirs;
  2. data: step-3 share of the prompts (left padded), optional PTX text;
  3. build the four models and the hybrid engine; score the held-out demo rule (start);
  4. loop: ``generate_experience`` on ``generation_batches`` prompt batches, then
     ``train_rlhf`` for ``ppo_epochs`` over mini-batches; KL controller, EMA, metrics;
  5. score the held-out rule (end); save actor, critic and EMA; summary.json.
"""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from rlhf.algos import ppo as P
from rlhf.algos.logprobs import masked_whiten
from rlhf.engine.rlhf_engine import RLHFEngine, critic_values, policy_logprobs, reward_scores
from rlhf.stages import common

log = logging.getLogger(__name__)


class PPOTrainer:
    """DeepSpeed-Chat's trainer API: ``generate_experience(prompts)`` and ``train_rlhf(exp)``."""

    def __init__(self, rlhf: RLHFEngine, ppo, device, verify=None):
        self.m, self.cfg, self.device, self.verify = rlhf, ppo, device, verify
        self.kl_ctl = (P.AdaptiveKLController(ppo.kl_ctl, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl
                       else P.FixedKLController(ppo.kl_ctl))

    @torch.no_grad()
    def generate_experience(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """Sample answers, then score them: log-probs, reference log-probs, values, rewards, GAE."""
        c, tok = self.cfg, self.m.tokenizer
        prompt, pmask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if c.samples_per_prompt > 1:  # the answers to one prompt stay adjacent (group baseline)
            prompt = prompt.repeat_interleave(c.samples_per_prompt, dim=0)
            pmask = pmask.repeat_interleave(c.samples_per_prompt, dim=0)
        t0 = time.perf_counter()
        seq = self.m.hybrid.generate_sequences(prompt, pmask, max_new_tokens=c.max_answer_len,
                                               min_new_tokens=c.min_answer_len, do_sample=True,
                                               temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
        gen_s = time.perf_counter() - t0
        # answer mask: real tokens up to and including the first EOS
        n_prompt = prompt.shape[1]
        answer = seq[:, n_prompt:]
        is_eos = answer == tok.eos_token_id
        answer_mask = ((is_eos.long().cumsum(1) - is_eos.long()) == 0).long()
        mask = torch.cat([pmask, answer_mask], dim=1)
        answer_len = answer_mask.sum(1)
        valid = (answer_len > 1).long()  # answers of at most one real token are dropped (masked out)
        action_mask = mask[:, 1:].clone()
        action_mask[:, : n_prompt - 1] = 0
        action_mask *= valid.unsqueeze(1)
        self.m.actor.eval(), self.m.critic.eval()
        logprobs = policy_logprobs(self.m.actor, seq, mask)
        ref_logprobs = policy_logprobs(self.m.ref, seq, mask)
        values = critic_values(self.m.critic, seq, mask) * action_mask  # values after the end zeroed
        scores = reward_scores(self.m.reward, seq, mask)
        self.m.actor.train(), self.m.critic.train()
        shaped = (P.leave_one_out_scores(scores, c.samples_per_prompt, valid.bool())
                  if c.reward_baseline == "group" else scores)
        rewards = P.kl_penalized_rewards(logprobs, ref_logprobs, shaped, action_mask, self.kl_ctl.value,
                                         c.clip_reward_value)
        adv, returns = P.gae_advantages(rewards, values, action_mask, c.gamma, c.lam)
        if c.whiten_advantages and action_mask.sum() > 1:
            adv = masked_whiten(adv, action_mask)
        kl = P.kl_estimates(logprobs, ref_logprobs, action_mask)
        stats = {"reward": float(scores[valid.bool()].mean()) if valid.any() else 0.0,
                 "kl": float(kl["kl"]), "answer_len": float(answer_len.float().mean()),
                 "valid_share": float(valid.float().mean()), "generation_s": gen_s, "answers": float(seq.shape[0]),
                 "generated_tokens": float(answer_len.sum())}
        if self.verify is not None:
            texts = tok.batch_decode(answer, skip_special_tokens=True)
            prompts = tok.batch_decode(prompt, skip_special_tokens=True)
            stats["rule_rate"] = sum(self.verify(p, a) for p, a in zip(prompts, texts)) / len(texts)
        return {"seq": seq, "mask": mask, "action_mask": action_mask, "logprobs": logprobs, "values": values,
                "advantages": adv, "returns": returns, "stats": stats}

    def train_rlhf(self, exp: Dict[str, Any], unsup: Dict[str, torch.Tensor] | None = None) -> Dict[str, float]:
        """One PPO update of actor and critic on a mini-batch of experience (plus PTX)."""
        c, actor, critic = self.cfg, self.m.actor, self.m.critic
        seq, mask, am = exp["seq"], exp["mask"], exp["action_mask"]
        logp = policy_logprobs(actor, seq, mask)
        actor_loss, a_stats = P.policy_loss(logp, exp["logprobs"], exp["advantages"], am, c.cliprange)
        actor.backward(actor_loss)
        actor.step()
        out = {"actor_loss": float(actor_loss), "actor_clipfrac": float(a_stats["clipfrac"]),
               "approx_kl": float(a_stats["approx_kl"])}
        if unsup is not None:  # PTX: pre-training loss keeps public-benchmark skills
            unsup = {k: v.to(self.device) for k, v in unsup.items()}
            ptx_loss = actor(**unsup).loss * c.unsup_coef
            actor.backward(ptx_loss)
            actor.step()
            out["ptx_loss"] = float(ptx_loss) / max(c.unsup_coef, 1e-12)
        values = critic_values(critic, seq, mask)
        critic_loss, v_stats = P.value_loss(values, exp["values"], exp["returns"], am, c.cliprange_value)
        critic.backward(critic_loss)
        critic.step()
        out.update(critic_loss=float(critic_loss), critic_clipfrac=float(v_stats["clipfrac"]))
        return out


def _minibatches(exps: List[Dict[str, Any]], size: int):
    """Split each experience batch into mini-batches of ``size`` rows (shapes kept per batch)."""
    keys = ("seq", "mask", "action_mask", "logprobs", "values", "advantages", "returns")
    for e in exps:
        for i in range(0, e["seq"].shape[0], size):
            yield {k: e[k][i:i + size] for k in keys}


def _mean(rows: List[Dict[str, float]]) -> Dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / max(sum(k in r for r in rows), 1) for k in keys}


def _extra_state(trainer: PPOTrainer, m: RLHFEngine, rule_start, pos) -> Dict[str, Any]:
    """What a PPO checkpoint holds besides the engines: KL controller, start metrics, EMA."""
    out: Dict[str, Any] = {"kl_ctl": trainer.kl_ctl.state_dict(), "rule_start": rule_start}
    if m.ema is not None:
        out.update({f"ema.{k}": v for k, v in m.ema.state_dict()["shadow"].items()})
    return out


def _restore(meta, trainer: PPOTrainer, m: RLHFEngine):
    extra = meta["extra"]
    trainer.kl_ctl.load_state_dict(extra["kl_ctl"])
    if m.ema is not None:
        shadow = {k[len("ema."):]: v for k, v in extra.items() if k.startswith("ema.")}
        m.ema.load_state_dict({**m.ema.state_dict(), "shadow": shadow})
    start = extra["rule_start"]
    if not isinstance(start, dict):  # a checkpoint written before the sampled rate existed
        start = {"rule_rate": start, "rule_rate_sampled": None}
    return start, dict(meta["loop"])


def run(cfg, run_dir=None) -> Dict[str, Any]:
    from rlhf.data.blend import build_step_data, load_unsupervised
    from rlhf.data.collate import PromptCollator, SFTCollator
    from rlhf.data.tokenize import tokenize_prompts, tokenize_text
    from rlhf.engine.rlhf_engine import build_rlhf_engine
    from rlhf.engine.setup import all_reduce_mean, barrier
    from rlhf.engine.trainer import make_loader
    from rlhf.models.load import count_params, resolve_family, resolve_path, save_hf
    from rlhf.models.reward import save_reward_model

    c = cfg.ppo
    rows = c.generation_batch_size * c.samples_per_prompt  # answers per rollout
    if c.samples_per_prompt < 1:
        raise ValueError(f"ppo.samples_per_prompt={c.samples_per_prompt}: must be >= 1")
    if c.reward_baseline not in ("none", "group"):
        raise ValueError(f"ppo.reward_baseline={c.reward_baseline!r}: expected none or group")
    if c.reward_baseline == "group" and c.samples_per_prompt < 2:
        raise ValueError("ppo.reward_baseline=group needs ppo.samples_per_prompt >= 2 (the baseline is the mean "
                         "score of a prompt's other answers)")
    if rows % c.train_batch_size:
        raise ValueError(f"ppo.generation_batch_size={c.generation_batch_size} x ppo.samples_per_prompt="
                         f"{c.samples_per_prompt} = {rows} answers per rollout is not a multiple of "
                         f"ppo.train_batch_size={c.train_batch_size}: each rollout must split into whole mini-batches")
    # 1. start; which checkpoints
    ctx = common.start(cfg, "ppo", run_dir)
    actor_path = resolve_path(cfg.actor, ctx.cache_dir, key="actor")
    critic_path = cfg.critic.path or resolve_path(cfg.reward, ctx.cache_dir, key="reward")
    if not Path(critic_path).exists() and cfg.critic.path:
        raise FileNotFoundError(f"critic.path={cfg.critic.path}: no such directory (a step-2 model dir)")
    actor_family, critic_family = resolve_family(cfg.actor, actor_path), resolve_family(cfg.reward, critic_path)
    tokenizer = common.load_tokenizer(ctx, actor_path, model_cfg=cfg.actor)
    # 2. data: prompts (left padded) and optional PTX text
    data_cache = cfg.data.cache_dir or str(ctx.cache_dir / "data")
    train_rows, _ = build_step_data(cfg.data, 3, ctx.cache_dir, int(cfg.seed))
    prompts, pstats = tokenize_prompts(train_rows, tokenizer, c.max_prompt_len, data_cache, reload=cfg.data.reload)
    loader = make_loader(prompts.select_columns(["input_ids"]), c.generation_batch_size,
                         PromptCollator(tokenizer.pad_token_id), ctx.rank, ctx.world, int(cfg.seed))
    unsup_iter = None
    if c.ptx:
        text = load_unsupervised(cfg.data.unsupervised or "demo", ctx.cache_dir, demo_size=cfg.data.demo_size)
        text_ds, _ = tokenize_text(text, tokenizer, c.max_prompt_len + c.max_answer_len, data_cache)
        unsup_loader = make_loader(text_ds, c.train_batch_size,
                                   SFTCollator(tokenizer.pad_token_id, tokenizer.padding_side),
                                   ctx.rank, ctx.world, int(cfg.seed))
        unsup_iter = itertools.cycle(unsup_loader)
    per_epoch = len(loader) // c.generation_batches
    n_iters = per_epoch * c.epochs if not c.max_steps else min(c.max_steps, per_epoch * c.epochs)
    updates = n_iters * c.ppo_epochs * c.generation_batches * max(rows // c.train_batch_size, 1)
    # 3. models
    m = build_rlhf_engine(actor_cfg=cfg.actor, actor_path=actor_path, critic_cfg=cfg.reward, critic_path=critic_path,
                          tokenizer=tokenizer, ppo=c, zero=cfg.zero, hardware=cfg.hardware, lora=cfg.lora,
                          actor_family=actor_family, critic_family=critic_family, world=ctx.world,
                          total_steps=updates, dtype=ctx.dtype, device=ctx.device)
    verify = None
    if common.uses_demo(ctx):
        from rlhf.data.demo import verify
    trainer = PPOTrainer(m, c, ctx.device, verify)

    def heldout(step: int) -> Dict[str, float | None]:
        module = m.hybrid.to_generation()
        try:
            rules = common.heldout_rule_rates(ctx, module, tokenizer)
        finally:
            m.hybrid.to_training()
        if rules["rule_rate"] is not None:
            ctx.tracker.log({f"eval/{k}": v for k, v in rules.items()}, step=step)
        return rules

    ckpt, meta = common.checkpointing(ctx, {"actor": m.actor, "critic": m.critic},
                                      lambda: _extra_state(trainer, m, rule_start, pos))
    if meta is None:
        rule_start = heldout(0)
        pos = {"step": 0, "epoch": 0, "consumed": 0}
    else:
        rule_start, pos = _restore(meta, trainer, m)
    # 4. loop: experience, then PPO updates
    t_start, gen_s, train_s, tokens, samples = time.perf_counter(), 0.0, 0.0, 0.0, 0
    bar = ctx.tracker.progress(total=n_iters, initial=pos["step"], desc="ppo")
    batches = None

    def next_batch():
        nonlocal batches
        while True:
            if batches is None:
                loader.sampler.set_epoch(pos["epoch"])
                batches = iter(loader)
                for _ in range(pos["consumed"]):  # resumed mid-epoch: skip what was trained on
                    next(batches)
            batch = next(batches, None)
            if batch is not None:
                pos["consumed"] += 1
                return batch
            pos["epoch"], pos["consumed"], batches = pos["epoch"] + 1, 0, None

    while pos["step"] < n_iters:
        exps = [trainer.generate_experience(next_batch()) for _ in range(c.generation_batches)]
        t0 = time.perf_counter()
        train_stats = [trainer.train_rlhf(mb, next(unsup_iter) if unsup_iter else None)
                       for _ in range(c.ppo_epochs) for mb in _minibatches(exps, c.train_batch_size)]
        train_s += time.perf_counter() - t0
        m.update_ema()
        stats = _mean([e["stats"] for e in exps])
        trainer.kl_ctl.update(stats["kl"], n_steps=rows * c.generation_batches)
        gen_s += stats["generation_s"] * len(exps)
        tokens += stats["generated_tokens"] * len(exps)
        samples += sum(e["seq"].shape[0] for e in exps)
        pos["step"] += 1
        step = pos["step"]
        metrics = all_reduce_mean({**stats, **_mean(train_stats)})
        elapsed = time.perf_counter() - t_start
        metrics.update(kl_coef=trainer.kl_ctl.value, actor_lr=m.actor.get_lr()[0],
                       samples_per_s=samples * ctx.world / elapsed, gen_tokens_per_s=tokens * ctx.world / max(gen_s, 1e-9),
                       generation_time_share=gen_s / elapsed)
        if step % c.log_every == 0 or step == n_iters:
            ctx.tracker.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        bar.update(1)
        bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}", refresh=False)
        if c.eval_every and step % c.eval_every == 0 and step < n_iters:
            heldout(step)
        ckpt.maybe_save(step, dict(pos))
    bar.close()
    # 5. score, save, summarise
    rule_end = heldout(pos["step"])
    m.hybrid.release()
    actor_dir = common.export_hf(ctx, m.actor.module, tokenizer, ctx.run_dir / "model")
    common.export_hf(ctx, m.critic.module, tokenizer, ctx.run_dir / "critic", save=save_reward_model)
    ema_dir = None
    if m.ema is not None:
        ema_dir = ctx.run_dir / "ema"
        replica = m.hybrid.build_replica()
        replica.load_state_dict(m.ema.state_dict()["shadow"], strict=True)
        save_hf(replica, tokenizer, ema_dir)
    barrier()
    last = ctx.tracker.last
    total, trainable = count_params(m.actor.module)
    return common.finish(ctx, {
        "stage": "ppo", "model_dir": str(actor_dir), "critic_dir": str(ctx.run_dir / "critic"),
        "ema_dir": str(ema_dir) if ema_dir else None, "steps": pos["step"],
        "rule_rate_start": rule_start["rule_rate"], "rule_rate_sampled_start": rule_start["rule_rate_sampled"],
        **rule_end,
        "reward_mean": last.get("train/reward"), "kl": last.get("train/kl"),
        "actor_loss": last.get("train/actor_loss"), "critic_loss": last.get("train/critic_loss"),
        "answer_len": last.get("train/answer_len"), "generation_time_s": gen_s, "train_time_s": train_s,
        "gen_tokens_per_s": tokens * ctx.world / max(gen_s, 1e-9),
        "samples_per_s": samples * ctx.world / max(time.perf_counter() - t_start, 1e-9),
        "hybrid_path": m.hybrid.path, "hybrid_reason": m.hybrid.reason, "prompts": len(prompts),
        "dropped_prompts": pstats.get("dropped", 0), "params": total, "trainable_params": trainable,
        "objective": (rule_end["rule_rate_sampled"] if rule_end["rule_rate_sampled"] is not None
                      else last.get("train/reward")),
    })
