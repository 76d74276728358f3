"""Shared fixtures: compose the real config tree, a per-session cache of tiny models and data."""
from __future__ import annotations

import os
from pathlib import Path

# The tests use embedded tiny models only: a hub id must fail at once, not after ~23 s of retries
# (huggingface_hub reads this when first imported, so before anything imports it; run.py
# subprocesses inherit it).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per test process, as the stages pin theirs (hardware.threads): `make test` runs one worker
# per core, and OpenMP pools larger than that (torch in-process, DeepSpeed's CPU Adam in the runs the
# tests start) spin against each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rlhf.config import compose, register  # noqa: E402

torch.set_num_threads(1)
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


# ---------------------------------------------------------------- pytest-xdist (`make test`)
# `make test` runs `-n <cores> --dist loadfile`: one worker per test file, so a module fixture (a
# trained model, a run) is built once. The files on the session's default pipeline run (~6 minutes)
# are one work unit, queued first, so the other workers take the rest meanwhile.


def _pipeline_files() -> set:
    """Node-id paths of the test files that use the ``default_pipeline`` fixture."""
    return {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_*.py") if "default_pipeline" in p.read_text()}


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):  # an xdist worker: the order it reports is the order units are queued
        first = _pipeline_files()
        items.sort(key=lambda it: it.nodeid.split("::", 1)[0] not in first)  # stable: order kept within


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class PipelineFirst(LoadFileScheduling):
        pipeline = _pipeline_files()

        def _split_scope(self, nodeid):
            path = nodeid.split("::", 1)[0]
            return "default_pipeline" if path in self.pipeline else path

    config.option.loadscopereorder = False  # keep the queue in collection order: the pipeline unit first
    return PipelineFirst(config, log)


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
