"""The config ``python run.py <overrides>`` would get, for the bench's workload (cache and run dir set)."""
from __future__ import annotations

from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent


def compose(overrides: List[str], cache: Path, run_dir: Path | None = None):
    from rlhf.config import compose as compose_config

    cfg = compose_config(overrides, ROOT / "conf")
    cfg.cache_dir = str(cache)
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    return cfg
