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
    "pretrain": "rlhf.stages.pretrain:run",
    "eval": "rlhf.stages.eval:run",
}


def get_stage(name: str) -> Callable[[Any], Dict[str, Any]]:
    if name not in STAGES:
        raise ValueError(f"stage.name='{name}' is not a stage; known stages: {', '.join(sorted(STAGES))}")
    module, fn = STAGES[name].split(":")
    return getattr(importlib.import_module(module), fn)


def run_stage(cfg) -> Dict[str, Any]:
    return get_stage(cfg.stage.name)(cfg)
