"""Step 3: RLHF with PPO (DeepSpeed-Chat semantics, reference.md §1) and its critic-free variants.

Four models (rlhf/engine/rlhf_engine.py): actor from the SFT model behind the hybrid engine,
frozen reference, critic from the reward model, frozen reward model; optional EMA of the actor.
``ppo.advantage`` picks the estimator (rlhf.algos.ppo.ADVANTAGES): gae trains the critic; grpo,
rloo and reinforce_pp build none and compare the ``ppo.samples_per_prompt`` answers of a prompt.
Answers are scored by the reward model (``ppo.reward_model``) plus ``reward.fn_weight`` times a
reward function (``reward.fn``, rlhf/rewards.py); either may be used alone.

Steps:
  1. start the run; resolve the actor (``actor.path``) and critic/reward (``critic.path``) dirs;
  2. data: step-3 share of the prompts (left padded), optional PTX text;
  3. build the four models and the hybrid engine; score the held-out demo rule (start), or
     restore a checkpoint;
  4. loop (``_loop``): ``generate_experience`` on ``generation_batches`` prompt batches drawn
     from a resumable ``PromptCursor``, then ``train_rlhf`` for ``ppo_epochs`` over mini-batches;
     KL controller, EMA, metrics, checkpoints; the trainer's ``Stopwatch`` times each part;
  5. score the held-out rule (end); save actor, critic and EMA; summary.json with the time split.
"""
from __future__ import annotations

import copy
import itertools
import logging
import time
from pathlib import Path
from typing import Any, Dict, List

import torch

from rlhf.algos import ppo as P
from rlhf.algos.logprobs import masked_whiten
from rlhf.algos.masks import rollout_masks
from rlhf.config import loads_step2_model
from rlhf.engine.rlhf_engine import RLHFEngine, critic_values, policy_logprobs, reward_scores
from rlhf.engine.trainer import Stopwatch
from rlhf.eval.rules import uses_demo
from rlhf.stages import build, common

log = logging.getLogger(__name__)


TIME_PARTS = ("generation", "experience", "actor_train", "critic_train")  # + other: the rest of the loop


class PPOTrainer:
    """DeepSpeed-Chat's trainer API: ``generate_experience(prompts)`` and ``train_rlhf(exp)``. ``watch``
    adds up the seconds of each part (TIME_PARTS) for the run's time split."""

    def __init__(self, rlhf: RLHFEngine, ppo, device, verify=None, reward_fn=None):
        self.m, self.cfg, self.device, self.verify, self.reward_fn = rlhf, ppo, device, verify, reward_fn
        self.estimator = P.get_estimator(ppo.advantage)
        self.kl_ctl = (P.AdaptiveKLController(ppo.kl_ctl, ppo.kl_target, ppo.kl_horizon) if ppo.adaptive_kl
                       else P.FixedKLController(ppo.kl_ctl))
        self.watch = Stopwatch(TIME_PARTS, device)

    def score(self, seq, mask, prompts: List[str], answers: List[str]) -> Dict[str, torch.Tensor]:
        """Per answer: reward model score (0 without one), reward function score (0 without one)
        and the total (``rlhf.algos.ppo.total_scores``: the reward model's score clipped, the
        function's weighted score added unclipped) [B] each."""
        rm = (reward_scores(self.m.reward, seq, mask).float() if self.m.reward is not None
              else torch.zeros(seq.shape[0], device=seq.device))
        fn = (self.reward_fn(prompts, answers).to(rm.device) if self.reward_fn is not None else torch.zeros_like(rm))
        weight = self.reward_fn.weight if self.reward_fn is not None else 0.0
        return {"rm": rm, "fn": fn, "total": P.total_scores(rm, fn, weight, self.cfg.clip_reward_value)}

    @torch.no_grad()
    def generate_experience(self, batch: Dict[str, torch.Tensor]) -> Dict[str, Any]:
        """Sample answers, then score them: log-probs, reference log-probs, values (with a critic),
        rewards, advantages (``ppo.advantage``)."""
        c = self.cfg
        prompt, pmask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
        if c.samples_per_prompt > 1:  # the answers to one prompt stay adjacent (group baseline)
            prompt = prompt.repeat_interleave(c.samples_per_prompt, dim=0)
            pmask = pmask.repeat_interleave(c.samples_per_prompt, dim=0)
        before = self.watch.seconds["generation"]
        with self.watch("generation"):
            seq = self.m.hybrid.generate_sequences(prompt, pmask, max_new_tokens=c.max_answer_len,
                                                   min_new_tokens=c.min_answer_len, do_sample=True,
                                                   temperature=c.temperature, top_k=c.top_k, top_p=c.top_p)
        with self.watch("experience"):
            exp = self._experience(prompt, pmask, seq)
        exp["stats"]["generation_s"] = self.watch.seconds["generation"] - before
        return exp

    def _experience(self, prompt, pmask, seq) -> Dict[str, Any]:
        """The scoring half of ``generate_experience``: forwards of actor, reference, critic and reward."""
        c, tok = self.cfg, self.m.tokenizer
        answer = seq[:, prompt.shape[1]:]
        mask, action_mask, answer_len, valid = rollout_masks(pmask, answer, tok.eos_token_id)
        critic = self.m.critic
        self.m.actor.eval()
        logprobs = policy_logprobs(self.m.actor, seq, mask)
        ref_logprobs = policy_logprobs(self.m.ref, seq, mask)
        values = None
        if critic is not None:
            critic.eval()
            values = critic_values(critic, seq, mask) * action_mask  # values after the end zeroed
            critic.train()
        self.m.actor.train()
        texts = prompts = None
        if self.verify is not None or self.reward_fn is not None:
            texts = tok.batch_decode(answer, skip_special_tokens=True)
            prompts = tok.batch_decode(prompt, skip_special_tokens=True)
        scored = self.score(seq, mask, prompts, texts)
        scores = scored["total"]
        shaped = (P.leave_one_out_scores(scores, c.samples_per_prompt, valid.bool())
                  if c.reward_baseline == "group" else scores)
        adv, returns = self.estimator.fn(P.AdvantageInputs(
            scores=shaped, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, mask=action_mask,
            valid=valid.bool(), group_size=c.samples_per_prompt, kl_coef=self.kl_ctl.value,
            gamma=c.gamma, lam=c.lam))  # the reward model's score was clipped in score()
        if c.whiten_advantages and action_mask.sum() > 1:
            adv = masked_whiten(adv, action_mask)
        kl = P.kl_estimates(logprobs, ref_logprobs, action_mask)
        ok = valid.bool()
        stats = {"reward": float(scores[ok].mean()) if valid.any() else 0.0,
                 "kl": float(kl["kl"]), "answer_len": float(answer_len.float().mean()),
                 "valid_share": float(valid.float().mean()), "generation_s": 0.0, "answers": float(seq.shape[0]),
                 "generated_tokens": float(answer_len.sum())}
        if self.reward_fn is not None and valid.any():
            stats["reward_fn"] = float(scored["fn"][ok].mean())
            if self.m.reward is not None:
                stats["reward_rm"] = float(scored["rm"][ok].mean())
        if self.verify is not None:
            stats["rule_rate"] = sum(self.verify(p, a) for p, a in zip(prompts, texts)) / len(texts)
        exp = {"seq": seq, "mask": mask, "action_mask": action_mask, "logprobs": logprobs,
               "ref_logprobs": ref_logprobs, "advantages": adv, "returns": returns, "stats": stats}
        if values is not None:
            exp["values"] = values
        return exp

    def train_rlhf(self, exp: Dict[str, Any], unsup: Dict[str, torch.Tensor] | None = None) -> Dict[str, float]:
        """One PPO update of actor (and critic, if any) on a mini-batch of experience (plus PTX)."""
        c, actor, critic = self.cfg, self.m.actor, self.m.critic
        seq, mask, am = exp["seq"], exp["mask"], exp["action_mask"]
        with self.watch("actor_train"):
            logp = policy_logprobs(actor, seq, mask)
            actor_loss, a_stats = P.policy_loss(logp, exp["logprobs"], exp["advantages"], am, c.cliprange)
            out = {"actor_clipfrac": float(a_stats["clipfrac"]), "approx_kl": float(a_stats["approx_kl"])}
            if self.estimator.kl_in_loss:  # GRPO: KL to the reference as a loss term, weight kl_ctl
                kl_term = P.kl_loss(logp, exp["ref_logprobs"], am)
                actor_loss = actor_loss + self.kl_ctl.value * kl_term
                out["kl_loss"] = float(kl_term.detach())
            actor.backward(actor_loss)
            actor.step()
            out["actor_loss"] = float(actor_loss.detach())
            if unsup is not None:  # PTX: pre-training loss keeps public-benchmark skills
                unsup = {k: v.to(self.device) for k, v in unsup.items()}
                ptx_loss = actor(**unsup).loss * c.unsup_coef
                actor.backward(ptx_loss)
                actor.step()
                out["ptx_loss"] = float(ptx_loss.detach()) / max(c.unsup_coef, 1e-12)
        if critic is not None:
            with self.watch("critic_train"):
                values = critic_values(critic, seq, mask)
                critic_loss, v_stats = P.value_loss(values, exp["values"], exp["returns"], am, c.cliprange_value)
                critic.backward(critic_loss)
                critic.step()
                out.update(critic_loss=float(critic_loss.detach()), critic_clipfrac=float(v_stats["clipfrac"]))
        return out


def _minibatches(exps: List[Dict[str, Any]], size: int):
    """Split each experience batch into mini-batches of ``size`` rows (shapes kept per batch)."""
    keys = ("seq", "mask", "action_mask", "logprobs", "ref_logprobs", "values", "advantages", "returns")
    for e in exps:
        for i in range(0, e["seq"].shape[0], size):
            yield {k: e[k][i:i + size] for k in keys if k in e}


def _mean(rows: List[Dict[str, float]]) -> Dict[str, float]:
    keys = {k for r in rows for k in r}
    return {k: sum(r[k] for r in rows if k in r) / max(sum(k in r for r in rows), 1) for k in keys}


def _extra_state(trainer: PPOTrainer, m: RLHFEngine, rule_start) -> Dict[str, Any]:
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


def check(cfg):
    """The step-3 estimator and reward function or None (every step-3 rule is
    rlhf.config.validate's, checked before launch)."""
    from rlhf.rewards import load_reward_fn

    est = P.get_estimator(cfg.ppo.advantage)
    return est, (load_reward_fn(cfg.reward.fn, cfg.reward.fn_weight) if cfg.reward.fn else None)


GRPO_GROUP = 4  # answers per prompt stage=grpo samples when ppo.samples_per_prompt is left at 1


def run_grpo(cfg, run_dir=None) -> Dict[str, Any]:
    """Step 3 as GRPO (``pipeline.algo=grpo``): this stage with ``ppo.advantage=grpo``. Left at
    the PPO default of one answer per prompt, ``ppo.samples_per_prompt`` becomes GRPO_GROUP and
    ``ppo.generation_batch_size`` is divided by it (the answers per rollout stay the same)."""
    from omegaconf import read_write

    cfg = copy.deepcopy(cfg)
    c = cfg.ppo
    if c.advantage not in ("gae", "grpo"):
        raise ValueError(f"stage grpo runs ppo.advantage=grpo, got ppo.advantage={c.advantage}: for another "
                         "estimator use pipeline.algo=ppo (or stage=ppo) with ppo.advantage set")
    with read_write(cfg):
        c.advantage = "grpo"
        if c.samples_per_prompt == 1 and c.generation_batch_size % GRPO_GROUP == 0:
            c.samples_per_prompt, c.generation_batch_size = GRPO_GROUP, c.generation_batch_size // GRPO_GROUP
            log.info("grpo: %d answers to each of %d prompts per rollout", GRPO_GROUP, c.generation_batch_size)
    return run(cfg, run_dir, stage="grpo")


def _model_dirs(cfg, ctx, needs_rm_dir: bool):
    """The actor's directory (``actor.path``) and the critic/reward model's (``critic.path``, else
    the reward role's; None when neither a critic nor a reward model is built)."""
    from rlhf.models.load import resolve_path

    actor_path = resolve_path(cfg.actor, ctx.cache_dir, key="actor")
    critic_path = (cfg.critic.path or resolve_path(cfg.reward, ctx.cache_dir, key="reward")) if needs_rm_dir else None
    if cfg.critic.path and not Path(critic_path).exists():
        raise FileNotFoundError(f"critic.path={cfg.critic.path}: no such directory (a step-2 model dir)")
    return actor_path, critic_path


def _data(cfg, ctx, tokenizer):
    """Step 3's share of the prompts (left padded) -> (loader, prompts, stats, PTX batches or None)."""
    from rlhf.data.blend import build_step_data, load_unsupervised
    from rlhf.data.collate import PromptCollator, SFTCollator
    from rlhf.data.tokenize import tokenize_prompts, tokenize_text
    from rlhf.engine.trainer import make_loader

    c = cfg.ppo
    data_cache = cfg.data.cache_dir or str(ctx.cache_dir / "data")
    train_rows, _ = build_step_data(cfg.data, 3, ctx.cache_dir, int(cfg.seed))
    prompts, pstats = tokenize_prompts(train_rows, tokenizer, c.max_prompt_len, data_cache, reload=cfg.data.reload)
    loader = make_loader(prompts.select_columns(["input_ids"]), c.generation_batch_size,
                         PromptCollator(tokenizer.pad_token_id), ctx.rank, ctx.world, int(cfg.seed))
    unsup = None
    if c.ptx:
        text = load_unsupervised(cfg.data.unsupervised or "demo", ctx.cache_dir, demo_size=cfg.data.demo_size)
        text_ds, _ = tokenize_text(text, tokenizer, c.max_prompt_len + c.max_answer_len, data_cache)
        unsup = itertools.cycle(make_loader(text_ds, c.train_batch_size,
                                            SFTCollator(tokenizer.pad_token_id, tokenizer.padding_side),
                                            ctx.rank, ctx.world, int(cfg.seed)))
    per_epoch = len(loader) // c.generation_batches
    n_iters = per_epoch * c.epochs if not c.max_steps else min(c.max_steps, per_epoch * c.epochs)
    if n_iters == 0:
        raise ValueError(f"stage=ppo would run no iteration: the step-3 share has {len(prompts)} usable prompts "
                         f"({len(loader)} batches of ppo.generation_batch_size={c.generation_batch_size} per rank), "
                         f"fewer than ppo.generation_batches={c.generation_batches}; add data (data.data_split, "
                         f"data.demo_size) or lower ppo.generation_batch_size")
    return loader, prompts, pstats, unsup, n_iters


def _loop(ctx, trainer: PPOTrainer, cursor, unsup, ckpt, heldout, step: int, n_iters: int) -> Dict[str, float]:
    """Step 4: rollouts of ``generation_batches`` prompt batches, ``ppo_epochs`` of mini-batch updates,
    EMA and KL controller, metrics, eval and checkpoints when due; Ctrl-C stops at an iteration
    boundary. Returns the step reached, throughput counters and the time split of the loop."""
    from rlhf.engine.setup import all_reduce_mean
    from rlhf.engine.trainer import _any_rank, _interrupt, stop_requests

    c, m = trainer.cfg, trainer.m
    rows = c.generation_batch_size * c.samples_per_prompt
    t_start, tokens, samples = time.perf_counter(), 0.0, 0
    bar = ctx.tracker.progress(total=n_iters, initial=step, desc="ppo")
    with stop_requests() as interrupt:
        while step < n_iters:
            exps = [trainer.generate_experience(next(cursor)) for _ in range(c.generation_batches)]
            train_stats = [trainer.train_rlhf(mb, next(unsup) if unsup else None)
                           for _ in range(c.ppo_epochs) for mb in _minibatches(exps, c.train_batch_size)]
            m.update_ema()
            stats = _mean([e["stats"] for e in exps])
            trainer.kl_ctl.update(stats["kl"], n_steps=rows * c.generation_batches)
            tokens += stats["generated_tokens"] * len(exps)
            samples += sum(e["seq"].shape[0] for e in exps)
            step += 1
            metrics = all_reduce_mean({**stats, **_mean(train_stats)})
            elapsed, gen_s = time.perf_counter() - t_start, trainer.watch.seconds["generation"]
            split = trainer.watch.split(elapsed)
            metrics.update(kl_coef=trainer.kl_ctl.value, actor_lr=m.actor.get_lr()[0],
                           samples_per_s=samples * ctx.world / elapsed, gen_tokens_per_s=tokens * ctx.world / max(gen_s, 1e-9),
                           generation_time_share=gen_s / elapsed,
                           **{f"time_{k}": v for k, v in split.items()})  # seconds so far and shares
            if step % c.log_every == 0 or step == n_iters:
                ctx.tracker.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
            bar.update(1)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", kl=f"{metrics['kl']:.3f}", refresh=False)
            if c.eval_every and step % c.eval_every == 0 and step < n_iters:
                heldout(step)
            ckpt.maybe_save(step, {"step": step, **cursor.state()})
            if step < n_iters and _any_rank(interrupt["stop"]):  # Ctrl-C: checkpoint (when on), one line, stop
                _interrupt(step, ckpt, {"step": step, **cursor.state()})
    bar.close()
    wall = time.perf_counter() - t_start
    return {"step": step, "tokens": tokens, "samples": samples, "wall_s": wall,
            "time_split": trainer.watch.split(wall)}


def time_line(split: Dict[str, float]) -> str:
    """One line of a step-3 time split: 'step-3 time 95 s: generation 37%, experience 17%, ...'."""
    names = {"generation": "generation", "experience": "experience", "actor_train": "actor training",
             "critic_train": "critic training", "other": "other"}
    return f"step-3 time {split['wall_s']:.0f} s: " + ", ".join(
        f"{name} {split[p + '_share']:.0%}" for p, name in names.items())


def run(cfg, run_dir=None, stage: str = "ppo") -> Dict[str, Any]:
    from rlhf.engine.rlhf_engine import build_rlhf_engine
    from rlhf.engine.setup import barrier
    from rlhf.engine.trainer import PromptCursor
    from rlhf.models.load import count_params, save_hf
    from rlhf.models.reward import save_reward_model

    c = cfg.ppo
    est, reward_fn = check(cfg)
    # 1. start; which checkpoints
    ctx = common.start(cfg, stage, run_dir)
    actor_path, critic_path = _model_dirs(cfg, ctx, loads_step2_model(c))
    tokenizer = build.load_tokenizer(ctx, actor_path, model_cfg=cfg.actor)
    # 2. data: prompts (left padded) and optional PTX text
    loader, prompts, pstats, unsup, n_iters = _data(cfg, ctx, tokenizer)
    rows = c.generation_batch_size * c.samples_per_prompt  # answers per rollout
    updates = n_iters * c.ppo_epochs * c.generation_batches * max(rows // c.train_batch_size, 1)
    # 3. models
    m = build_rlhf_engine(actor_cfg=cfg.actor, actor_path=actor_path, critic_cfg=cfg.reward, critic_path=critic_path,
                          tokenizer=tokenizer, ppo=c, zero=cfg.zero, hardware=cfg.hardware, lora=cfg.lora,
                          world=ctx.world, total_steps=updates, dtype=ctx.dtype, device=ctx.device,
                          with_critic=est.critic, with_reward=c.reward_model)
    verify = None
    if uses_demo(ctx.cfg.data):
        from rlhf.data.demo import verify
    trainer = PPOTrainer(m, c, ctx.device, verify, reward_fn)

    def heldout(step: int, prefix: str = "eval/") -> Dict[str, float | None]:
        module = m.hybrid.to_generation()
        try:
            rules = build.heldout_rates(ctx, module, tokenizer)
        finally:
            m.hybrid.to_training()
        if rules["rule_rate"] is not None:
            ctx.tracker.log({f"{prefix}{k}": v for k, v in rules.items()}, step=step)
        return rules

    engines = {"actor": m.actor, **({"critic": m.critic} if m.critic is not None else {})}
    ckpt, meta = common.checkpointing(ctx, engines, lambda: _extra_state(trainer, m, rule_start))
    if meta is None:
        rule_start, pos = heldout(0), {"step": 0, "epoch": 0, "consumed": 0}
    else:
        rule_start, pos = _restore(meta, trainer, m)
    # 4. loop: experience, then PPO updates
    loop = _loop(ctx, trainer, PromptCursor(loader, pos["epoch"], pos["consumed"]), unsup, ckpt, heldout,
                 pos["step"], n_iters)
    split = loop["time_split"]
    log.info("%s", time_line(split))
    # 5. the exported actor (ppo.delta_scale of the trained change), scored, saved, summarised
    trained = heldout(loop["step"], prefix="eval/trained_") if c.delta_scale != 1.0 else None
    build.scale_from_start(m.actor.module, cfg.actor, actor_path, c.delta_scale, "ppo.delta_scale")
    rule_end = heldout(loop["step"])
    trained = trained or rule_end
    m.hybrid.release()
    actor_dir = build.export_hf(ctx, m.actor.module, tokenizer, ctx.run_dir / "model")
    critic_dir = None
    if m.critic is not None:
        critic_dir = build.export_hf(ctx, m.critic.module, tokenizer, ctx.run_dir / "critic", save=save_reward_model)
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
        "stage": stage, "advantage": c.advantage, "reward_fn": cfg.reward.fn, "model_dir": str(actor_dir),
        "critic_dir": str(critic_dir) if critic_dir else None,
        "ema_dir": str(ema_dir) if ema_dir else None, "steps": loop["step"],
        "rule_rate_start": rule_start["rule_rate"], "rule_rate_sampled_start": rule_start["rule_rate_sampled"],
        **rule_end, "delta_scale": c.delta_scale, "rule_rate_trained": trained["rule_rate"],
        "rule_rate_sampled_trained": trained["rule_rate_sampled"],
        "reward_mean": last.get("train/reward"), "reward_fn_mean": last.get("train/reward_fn"), "kl": last.get("train/kl"),
        "actor_loss": last.get("train/actor_loss"), "critic_loss": last.get("train/critic_loss"),
        "answer_len": last.get("train/answer_len"), "generation_time_s": split["generation_s"],
        "train_time_s": split["actor_train_s"] + split["critic_train_s"], "time_split": split,
        "gen_tokens_per_s": loop["tokens"] * ctx.world / max(split["generation_s"], 1e-9),
        "samples_per_s": loop["samples"] * ctx.world / max(loop["wall_s"], 1e-9),
        "hybrid_path": m.hybrid.path, "hybrid_reason": m.hybrid.reason, "prompts": len(prompts),
        "dropped_prompts": pstats.get("dropped", 0), "params": total, "trainable_params": trainable,
        "objective": (rule_end["rule_rate_sampled"] if rule_end["rule_rate_sampled"] is not None
                      else last.get("train/reward")),
    })
