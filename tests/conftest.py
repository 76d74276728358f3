"""Shared fixtures: compose the real config tree, a per-session cache of tiny models and data."""
from __future__ import annotations

import os
from pathlib import Path

# The tests use embedded tiny models only: a hub id must fail at once, not after ~23 s of retries
# (huggingface_hub reads this when first imported, so before anything imports it; run.py
# subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from omegaconf import open_dict  # noqa: E402

from rlhf.config import quote_numeric_choices, register, resolve_models, validate  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
register()


def compose_cfg(*overrides: str, run_dir: str | Path | None = None, cache_dir: str | Path | None = None):
    """The config ``python run.py <overrides>`` would get (run_dir/cache_dir filled in)."""
    overrides = quote_numeric_choices(list(overrides))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        full = compose("config", overrides=overrides, return_hydra_config=True)
    choices = dict(full.hydra.runtime.choices)
    with open_dict(full):
        del full["hydra"]
    cfg = resolve_models(full, overrides, choices)
    validate(cfg)
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    cfg.cache_dir = str(cache_dir or shared_cache())
    return cfg


def shared_cache() -> Path:
    """One cache for the whole session (tiny models, demo data, tokenised data)."""
    path = Path(os.environ.get("RLHF_TEST_CACHE", ROOT / ".cache" / "tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture
def compose_config():
    return compose_cfg
