"""The stage registry: ``stage.name`` -> the function that runs it. The only dispatch table."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict

# name -> "module:function"; imported on use so a stage pulls in only what it needs.
STAGES: Dict[str, str] = {
    "sft": "rlhf.stages.sft:run",
    "rm": "rlhf.stages.rm:run",
    "ppo": "rlhf.stages.ppo:run",
    "pipeline": "rlhf.stages.pipeline:run",
    "chat": "rlhf.stages.chat:run",
    "plan": "rlhf.stages.plan:run",
    "dpo": "rlhf.stages.dpo:run",
}


def get_stage(name: str) -> Callable[[Any], Dict[str, Any]]:
    if name not in STAGES:
        raise ValueError(f"stage.name='{name}' is not a stage; known stages: {', '.join(sorted(STAGES))}")
    module, fn = STAGES[name].split(":")
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
