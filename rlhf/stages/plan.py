"""Memory plan: model-state memory of every ZeRO stage x offload choice, before anything is allocated.

``python run.py stage=plan model=opt-13b hardware=dgx8 zero=2 lora=none`` prints, for steps 1, 2 and
3 (step 3 holds four models: actor, critic, reference, reward), the per-GPU and host memory of
each setting, marks what fits the hardware profile, and names the smallest change that makes the
chosen setting fit. The same check (``rlhf.engine.memory.check_fits``) stops training stages at
start. Runs in the launching process whatever the hardware (``stage.inline``).

Steps:
  1. count parameters (model.params_b, or model.arch / the tiny model built on the meta device);
  2. estimate every setting and the chosen one (rlhf/engine/memory.py);
  3. print the table, write plan.md and summary.json.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict

from rlhf.engine.memory import format_plan, make_plan
from rlhf.tracking import atomic_write_json


def run(cfg, run_dir=None) -> Dict[str, Any]:
    t0 = time.perf_counter()
    run_dir = Path(run_dir or cfg.run_dir)
    # 1-2. count and estimate
    plan = make_plan(cfg)
    # 3. report
    text = format_plan(plan)
    print(text)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "plan.md").write_text(text + "\n")
    summary = dict(plan, wall_time_s=time.perf_counter() - t0, objective=None)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
