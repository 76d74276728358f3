"""A stage run's lifecycle: ``start`` (process group, seed, run dir, tracking), ``checkpointing``
(resume), ``finish`` (summary.json, release the run dir).

Stages differ only in their loop. What they build the same way lives in ``rlhf.stages.build``;
everything else they share lives below (data, models, engine, algos, eval, tracking).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from rlhf.engine.checkpoint import Checkpointer, resolve_resume
from rlhf.engine.setup import (barrier, clear_sharded_loading, device_for, dtype_for, init_distributed,
                               seed_everything, set_sharded_loading, set_threads)
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
