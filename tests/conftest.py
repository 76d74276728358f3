"""Shared fixtures: compose the real config tree, a per-session cache of tiny models and data."""
from __future__ import annotations

import os
from pathlib import Path

# The tests use embedded tiny models only: a hub id must fail at once, not after ~23 s of retries
# (huggingface_hub reads this when first imported, so before anything imports it; run.py
# subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from rlhf.config import compose, register  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
register()


def compose_cfg(*overrides: str, run_dir: str | Path | None = None, cache_dir: str | Path | None = None):
    """The config ``python run.py <overrides>`` would get (run_dir/cache_dir filled in)."""
    cfg = compose(list(overrides), CONF)
    if run_dir is not None:
        cfg.run_dir = str(run_dir)
    cfg.cache_dir = str(cache_dir or shared_cache())
    return cfg


def shared_cache() -> Path:
    """One cache for the whole session (tiny models, demo data, tokenised data)."""
    path = Path(os.environ.get("RLHF_TEST_CACHE", ROOT / ".cache" / "tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (`make test` runs `-n <cores> --dist loadgroup`): one worker per test file,
    so a module fixture (a trained model, a run) is built once; the files sharing the session's
    default pipeline run (~7 minutes) form one group, queued first so the other worker takes the rest
    meanwhile instead of waiting for it at the end."""
    by_file: dict[str, list] = {}
    for item in items:
        by_file.setdefault(item.nodeid.split("::")[0], []).append(item)
    pipeline_files = {f for f, its in by_file.items() if any("default_pipeline" in it.fixturenames for it in its)}
    for f, its in by_file.items():
        for item in its:
            if not item.get_closest_marker("xdist_group"):
                item.add_marker(pytest.mark.xdist_group("default_pipeline" if f in pipeline_files else f))
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda it: it.nodeid.split("::")[0] not in pipeline_files)  # stable: order kept within


@pytest.fixture
def compose_config():
    return compose_cfg


@pytest.fixture(scope="session")
def default_pipeline(tmp_path_factory):
    """`python run.py pipeline.compare=[dpo]`: the default SFT -> RM -> PPO pipeline on the tiny
    default (what `make run` runs), plus DPO from the same SFT model; the shipped presets and the
    hardware profile's thread count, nothing pinned. -> (run dir, stdout)."""
    import subprocess
    import sys

    run_dir = tmp_path_factory.mktemp("pipeline")
    out = subprocess.run([sys.executable, "run.py", "logger=none", "logger.progress=false",
                          f"cache_dir={shared_cache()}", f"run_dir={run_dir}", "pipeline.compare=[dpo]"],
                         cwd=ROOT, capture_output=True, text=True, timeout=2400)
    assert out.returncode == 0, out.stderr[-4000:]
    return run_dir, out.stdout
