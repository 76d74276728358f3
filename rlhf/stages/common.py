"""What every stage does the same way: start/finish a run, load and export models, score the demo.

Stages differ only in their loop; everything they share lives here or below (data, models,
engine, algos, tracking).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from rlhf.engine.checkpoint import Checkpointer, resolve_resume
from rlhf.engine.setup import (OptimSpec, barrier, clear_sharded_loading, device_for, dtype_for, gathered,
                               init_distributed, seed_everything, set_sharded_loading,
                               set_threads)
from rlhf.models.families import Family
from rlhf.tracking import Tracker

log = logging.getLogger(__name__)


@dataclass
class Context:
    cfg: DictConfig
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype
    run_dir: Path
    cache_dir: Path
    tracker: Tracker
    resume_from: Optional[Path] = None  # checkpoint to resume (resume=auto|<path>)
    t0: float = field(default_factory=time.perf_counter)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def start(cfg: DictConfig, name: str, run_dir: Optional[Path] = None) -> Context:
    """Join the process group, seed, open tracking in ``run_dir`` (default: cfg.run_dir)."""
    from rlhf.engine.memory import check_fits

    check_fits(cfg)  # before anything is allocated: stop with the smallest change that fits
    rank, world = init_distributed(cfg.hardware, cfg.launch.timeout_s)
    set_threads(cfg.hardware)
    # ZeRO-3: models are built already sharded (deepspeed.zero.Init) when every engine of the stage is ZeRO-3
    set_sharded_loading(cfg.zero, cfg.hardware, world,
                        (cfg.ppo.actor_zero, cfg.ppo.critic_zero) if name in ("ppo", "grpo") else ())
    seed_everything(int(cfg.seed))
    if cfg.anomaly:  # debug=anomaly: the backward op that produced a NaN/inf raises, named
        torch.autograd.set_detect_anomaly(True, check_nan=True)
        log.warning("autograd anomaly detection is on (debug=anomaly): slow, for finding a NaN's source")
    run_dir = Path(run_dir or cfg.run_dir)
    cache_dir = Path(cfg.cache_dir)
    if rank == 0:  # lock, refuse another run's dir or a resume with other settings; before config.yaml
        from rlhf.engine import rundir

        rundir.claim(cfg, run_dir)
    resume_from = resolve_resume(cfg.resume, run_dir)
    run_id = json.loads((resume_from / "meta.json").read_text()).get("run_id") if resume_from else None
    tracker = Tracker(run_dir, cfg.logger, OmegaConf.to_container(cfg, resolve=True), rank=rank,
                      name=f"{name}-{Path(cfg.run_dir).name}", resume_id=run_id)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    log.info("stage %s: %d rank(s), run dir %s", name, world, run_dir)
    return Context(cfg, rank, world, device_for(cfg.hardware), dtype_for(cfg.hardware.precision, cfg.model.dtype),
                   run_dir, cache_dir, tracker, resume_from)


def checkpointing(ctx: Context, engines: Dict[str, Any], extra_state=None):
    """A Checkpointer for ``engines``; restores them when the run resumes. Returns
    (checkpointer, meta or None): meta["loop"] is where the loop stopped, meta["extra"] the
    stage's extra state."""
    ckpt = Checkpointer(ctx.run_dir, ctx.cfg.checkpoint, engines, ctx.tracker, extra_state)
    if ctx.resume_from is None:
        return ckpt, None
    meta = ckpt.load(ctx.resume_from)
    ctx.tracker.truncate(meta["step"])
    return ckpt, meta


def finish(ctx: Context, metrics: Dict[str, Any]) -> Dict[str, Any]:
    """Write summary.json: the stage's metrics, wall time, and the model really trained (its name,
    ``model_type``, class and parameter count, read back from the saved directory)."""
    from rlhf.models.load import describe_saved

    metrics = dict(metrics, wall_time_s=time.perf_counter() - ctx.t0, world_size=ctx.world)
    metrics.setdefault("model", str(ctx.cfg.model.name))
    wanted = str(ctx.cfg.get("optimized_metric", "objective"))
    if wanted != "objective":  # what sweeps read (Optuna's return value, best.json)
        if wanted not in metrics:
            raise KeyError(f"optimized_metric={wanted}: stage {ctx.cfg.stage.name} reports no such metric; "
                           f"it reports {', '.join(sorted(k for k, v in metrics.items() if isinstance(v, (int, float))))}")
        metrics["objective"] = metrics[wanted]
    if metrics.get("model_dir") and Path(metrics["model_dir"], "config.json").is_file():
        metrics.update(describe_saved(metrics["model_dir"]))
    out = ctx.tracker.summary(metrics)
    ctx.tracker.close()
    clear_sharded_loading()
    log.info("stage %s done in %.0f s: %s", ctx.cfg.stage.name, metrics["wall_time_s"], ctx.run_dir)
    barrier()
    from rlhf.engine import rundir

    rundir.release(ctx.run_dir)
    return out


def model_path(ctx: Context, init_from: Optional[str], model_cfg=None) -> str:
    """The checkpoint a stage starts from: ``<stage>.init_from`` if set, else the path of
    ``model_cfg`` (default ``cfg.model``; DPO passes ``cfg.actor``)."""
    from rlhf.models.load import resolve_path

    if init_from:
        p = Path(init_from)
        if not p.exists():
            raise FileNotFoundError(f"init_from={init_from}: no such directory")
        return str(p)
    return resolve_path(model_cfg or ctx.cfg.model, ctx.cache_dir)


def family(ctx: Context, path: str, model_cfg=None) -> Family:
    """The family of the checkpoint at ``path`` (from its config.json; see ``resolve_family``)."""
    from rlhf.models.load import resolve_family

    return resolve_family(model_cfg or ctx.cfg.model, path)


def load_tokenizer(ctx: Context, path: str, model_cfg=None):
    from rlhf.models.load import config_key
    from rlhf.models.load import load_tokenizer as _load

    model_cfg = model_cfg or ctx.cfg.model
    return _load(path, family(ctx, path, model_cfg), trust_remote_code=model_cfg.trust_remote_code,
                 key=config_key(model_cfg))


def load_policy(ctx: Context, path: str, *, disable_dropout: bool, gradient_checkpointing: bool,
                lora: bool = True, model_cfg=None):
    """A causal LM ready to train (``rlhf.models.build.load_trainable``) with the run's dtype and
    ``lora.*``. ``model_cfg`` defaults to ``cfg.model`` (DPO passes ``cfg.actor``)."""
    from rlhf.models.build import load_trainable

    return load_trainable(model_cfg or ctx.cfg.model, path, dtype=ctx.dtype, disable_dropout=disable_dropout,
                          gradient_checkpointing=gradient_checkpointing, lora=ctx.cfg.lora if lora else None)


def optim_spec(section, total_steps: int, world: int) -> OptimSpec:
    return OptimSpec(lr=section.lr, weight_decay=section.weight_decay, betas=list(section.betas),
                     eps=section.eps, scheduler=section.scheduler, warmup_steps=section.warmup_steps,
                     total_steps=total_steps, micro_batch_size=section.micro_batch_size,
                     grad_accum=section.grad_accum, grad_clip=section.grad_clip)


def param_groups(ctx: Context, model, lr: float, weight_decay: float) -> List[dict]:
    from rlhf.models.lora import lora_param_groups

    return lora_param_groups(model, ctx.cfg.lora, lr, weight_decay)


def loaders(ctx: Context, section, name: str, train_ds, eval_ds, collate, rows_per_sample: int = 1):
    """Seeded distributed loaders for a stage's train/eval data, the loop spec and its step count.
    ``rows_per_sample``: 2 for preference pairs, so samples/s counts pairs (the field's convention)."""
    from rlhf.engine.trainer import LoopSpec, make_loader, total_steps

    seed = int(ctx.cfg.seed)
    loader = make_loader(train_ds, section.micro_batch_size, collate, ctx.rank, ctx.world, seed)
    eval_loader = make_loader(eval_ds, section.eval_batch_size, collate, ctx.rank, ctx.world, seed, shuffle=False)
    spec = LoopSpec(section.epochs, section.max_steps, section.eval_every, section.log_every,
                    section.skip_nonfinite, section.grad_accum, rows_per_sample)
    return loader, eval_loader, spec, total_steps(len(loader), spec, name)


def train_engine(ctx: Context, model, section, n_steps: int):
    """DeepSpeed training engine for a stage's model with its section's optimiser settings.
    Returns (engine, total params, trainable params)."""
    from rlhf.engine.setup import build_train_engine
    from rlhf.models.load import count_params

    n_params, n_trainable = count_params(model)
    groups = param_groups(ctx, model, section.lr, section.weight_decay)
    engine = build_train_engine(model, groups, optim_spec(section, n_steps, ctx.world), ctx.cfg.zero,
                                ctx.cfg.hardware, ctx.world)
    return engine, n_params, n_trainable


def export_hf(ctx: Context, module, tokenizer, out_dir: Path, save=None) -> Path:
    """Save the full model (LoRA merged, ZeRO-3 gathered) as an HF directory on rank 0.

    ``save(module, tokenizer, out_dir)`` defaults to ``save_hf`` (causal LMs); reward models pass
    ``save_reward_model``.
    """
    from rlhf.models.load import save_hf

    with gathered(module.parameters()):
        if ctx.is_main:
            (save or save_hf)(module, tokenizer, out_dir)
    barrier()
    return out_dir


def shard_fraction(module) -> float:
    """Share of the model's parameter elements this rank holds (1.0 unless ZeRO-3 partitions)."""
    local = total = 0
    for p in module.parameters():
        full = getattr(p, "ds_numel", None) or p.numel()
        total += full
        local += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else full
    return local / max(total, 1)


def uses_demo(ctx: Context) -> bool:
    return any(s.name.startswith("demo") for s in ctx.cfg.data.sources)


@torch.no_grad()
def generate(module, tokenizer, prompts: List[str], *, max_new_tokens: int, device, do_sample: bool = False,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, batch_size: int = 64) -> List[str]:
    """Answers (decoded text after the prompt) for ``prompts``; prompts left-padded.

    Under ZeRO-3 with several ranks every rank must call this with the same number of batches
    (``synced_gpus``): parameters are gathered collectively layer by layer.
    """
    synced = dist.is_initialized() and dist.get_world_size() > 1 and any(hasattr(p, "ds_id") for p in module.parameters())
    was_training = module.training
    module.eval()
    answers: List[str] = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tokenizer(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                            add_special_tokens=False).to(device)
            out = module.generate(**enc, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                  temperature=temperature if do_sample else None,
                                  top_k=top_k if do_sample and top_k else None,
                                  top_p=top_p if do_sample else None,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                  synced_gpus=synced)
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
        module.train(was_training)
    return answers


def heldout_rule_rates(ctx: Context, module, tokenizer, max_new_tokens: int = 16) -> Dict[str, Optional[float]]:
    """The demo task rule on held-out prompts (both None off the demo):

    - ``rule_rate``: share of prompts whose greedy answer passes (the model's single likeliest answer);
    - ``rule_rate_sampled``: share of ``data.heldout_samples`` answers per prompt sampled at
      temperature 1 that pass (the answer distribution RLHF reshapes). Seeded by ``seed`` and run
      under a forked RNG, so it is repeatable and leaves the training RNG untouched.
    """
    if not uses_demo(ctx):
        return {"rule_rate": None, "rule_rate_sampled": None}
    from rlhf.data.demo import heldout_prompts, rule_rate, task_of

    prompts = heldout_prompts(int(ctx.cfg.data.heldout_prompts), seed=int(ctx.cfg.seed))
    greedy = generate(module, tokenizer, prompts, max_new_tokens=max_new_tokens, device=ctx.device)
    out: Dict[str, Optional[float]] = {"rule_rate": float(rule_rate(prompts, greedy)), "rule_rate_sampled": None}
    for task in sorted({task_of(p) for p in prompts}):
        mine = [(p, a) for p, a in zip(prompts, greedy) if task_of(p) == task]
        out[f"rule_rate_{task}"] = float(rule_rate(*zip(*mine)))
    k = int(ctx.cfg.data.heldout_samples)
    if k > 0:
        repeated = [p for p in prompts for _ in range(k)]
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(int(ctx.cfg.seed))
                sampled = generate(module, tokenizer, repeated, max_new_tokens=max_new_tokens, device=ctx.device,
                                   do_sample=True, temperature=1.0)
        except RuntimeError as e:  # non-finite weights (a diverged run): no distribution to sample from
            log.warning("held-out rule rate: sampling failed (%s); rule_rate_sampled left empty", e)
        else:
            out["rule_rate_sampled"] = float(rule_rate(repeated, sampled))
    return out


def perplexity(mean_nll: float) -> float:
    return math.exp(min(mean_nll, 50.0))
