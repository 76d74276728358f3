"""The stage registry: ``stage.name`` -> one description of the stage. The only dispatch table.

Each entry says where the stage's ``run`` lives, which DeepSpeed-Chat step it is, its key metric
(pipeline table, sweeps), and the models it holds (role, trained or frozen). The pipeline, the
sweeps' tables and the config resolver read these instead of keeping their own tables.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple


@dataclass(frozen=True)
class Stage:
    run: str  # "module:function", imported on use so a stage pulls in only what it needs
    step: Optional[int] = None  # DeepSpeed-Chat step (1 sft, 2 reward model, 3 RLHF); None: not a training step
    key_metric: Optional[str] = None  # the summary.json metric the pipeline table and sweeps show first
    models: Tuple[Tuple[str, bool], ...] = ()  # (role, trained) of every model the stage holds

    @property
    def roles(self) -> Tuple[str, ...]:
        """The config roles (actor, reward) whose model the stage reads."""
        names = {"actor": "actor", "policy": "actor", "reference": "actor", "critic": "reward", "reward": "reward"}
        return tuple(dict.fromkeys(names[r] for r, _ in self.models if r in names))


STAGES: Dict[str, Stage] = {
    "sft": Stage("rlhf.stages.sft:run", 1, "eval_ppl", (("actor", True),)),
    "rm": Stage("rlhf.stages.rm:run", 2, "acc", (("reward", True),)),
    "ppo": Stage("rlhf.stages.ppo:run", 3, "reward_mean",
                 (("actor", True), ("reference", False), ("critic", True), ("reward", False))),
    # GRPO: the ppo stage with ppo.advantage=grpo (pipeline.algo=grpo); no critic
    "grpo": Stage("rlhf.stages.ppo:run_grpo", 3, "reward_mean", (("actor", True), ("reference", False), ("reward", False))),
    "dpo": Stage("rlhf.stages.dpo:run", 3, "acc", (("policy", True), ("reference", False))),
    "pipeline": Stage("rlhf.stages.pipeline:run", None, None, (("actor", True), ("reward", True))),
    "chat": Stage("rlhf.stages.chat:run", None, None, (("actor", False),)),
    "plan": Stage("rlhf.stages.plan:run", None, None, (("actor", False), ("reward", False))),
    "pretrain": Stage("rlhf.stages.pretrain:run", 1, "eval_ppl", (("actor", True),)),
    "eval": Stage("rlhf.stages.eval:run", None, None, (("actor", False),)),
}


def get_stage(name: str) -> Callable[[Any], Dict[str, Any]]:
    if name not in STAGES:
        raise ValueError(f"stage.name='{name}' is not a stage; known stages: {', '.join(sorted(STAGES))}")
    module, fn = STAGES[name].run.split(":")
    return _unless_finished(getattr(importlib.import_module(module), fn))


def _unless_finished(run: Callable[..., Dict[str, Any]]) -> Callable[..., Dict[str, Any]]:
    """``resume=auto`` on a run that already ended reports its summary instead of training again."""
    def wrapped(cfg, run_dir=None, **kw):
        import logging
        from pathlib import Path

        from rlhf.engine.rundir import finished

        where = Path(run_dir or cfg.run_dir)
        summary = finished(cfg, where)
        if summary is not None:
            logging.getLogger(__name__).info("%s: the run is already complete (summary.json); nothing to do", where)
            print(f"already complete: {where / 'summary.json'}")
            return summary
        return run(cfg, run_dir=run_dir, **kw) if run_dir is not None or kw else run(cfg)
    return wrapped


def run_stage(cfg) -> Dict[str, Any]:
    return get_stage(cfg.stage.name)(cfg)
