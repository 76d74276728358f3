"""The config ``python run.py <overrides>`` would get, composed in-process (no Hydra job)."""
from __future__ import annotations

from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parent.parent


def compose(overrides: List[str], cache: Path, run_dir: Path | None = None):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import open_dict

    from rlhf.config import quote_numeric_choices, register, resolve_models, validate

    register()
    overrides = quote_numeric_choices(list(overrides))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        full = hydra_compose("config", overrides=overrides, return_hydra_config=True)
    choices = dict(full.hydra.runtime.choices)
    with open_dict(full):
        del full["hydra"]
    cfg = resolve_models(full, overrides, choices)
    validate(cfg)
    cfg.cache_dir = str(cache)
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    return cfg
