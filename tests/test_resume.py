"""Never lose work: kill -9 mid-run and resume to the same result; torn checkpoints ignored;
non-finite losses stop cleanly."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf.engine.checkpoint import find_latest, resolve_resume
from tests.conftest import ROOT, compose_cfg, shared_cache

QUICK = ["logger=none", "logger.progress=false", "data.demo_size=400", "data.heldout_prompts=8",
         "checkpoint.every_n_steps=4", "checkpoint.keep_last=10"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def cli(*args, run_dir: Path, check=True, wait=True):
    cmd = [sys.executable, "run.py", *QUICK, *args, f"run_dir={run_dir}", f"cache_dir={shared_cache()}"]
    if not wait:
        return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    out = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=900)
    if check:
        assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def step_models(tmp_path_factory):
    """A quick step-1 actor and step-2 reward model to start PPO and DPO from."""
    root = tmp_path_factory.mktemp("models")
    cli("stage=pipeline", "pipeline.steps=[1,2]", "sft.max_steps=12", "rm.max_steps=12", run_dir=root)
    return root / "sft" / "model", root / "rm" / "model"


STAGES = {
    "sft": (["stage=sft", "sft.max_steps=12"], "eval_ppl"),
    "rm": (["stage=rm", "rm.max_steps=12"], "acc"),
    "dpo": (["stage=dpo", "dpo.max_steps=12"], "acc"),
    "pretrain": (["stage=pretrain", "pretrain.max_steps=12"], "eval_ppl"),
    "ppo": (["stage=ppo", "ppo.max_steps=12", "ppo.ema=true", "ppo.generation_batch_size=16",
             "ppo.train_batch_size=16"], "reward_mean"),
}


TIMING = ("per_s", "time", "generation_s")  # wall-clock metrics differ between any two runs


def _losses(run_dir: Path):
    """Every logged training metric except timings, per step."""
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], {k: v for k, v in r.items() if k.startswith("train/") and not any(t in k for t in TIMING)})
            for r in rows if any(k.startswith("train/") for k in r)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_and_resume_matches_uninterrupted(tmp_path, step_models, stage):
    args, key = STAGES[stage]
    # each stage is given only the model roles it reads (rm trains `model`; only ppo has a critic)
    args = [*args, *([f"actor.path={step_models[0]}"] if stage != "rm" else []),
            *([f"critic.path={step_models[1]}"] if stage == "ppo" else [])]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    cli(*args, run_dir=whole)
    # kill -9 right after a random checkpoint (step 4 or 8) is complete
    target = broken / "checkpoints" / f"step-{random.Random(stage).choice([4, 8]):08d}" / "meta.json"
    proc = cli(*args, run_dir=broken, wait=False)
    deadline = time.time() + 600
    while not target.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"run ended before the checkpoint: {proc.stderr.read()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (broken / "summary.json").exists()
    cli(*args, "resume=auto", run_dir=broken)
    a = json.loads((whole / "summary.json").read_text())
    b = json.loads((broken / "summary.json").read_text())
    assert a["steps"] == b["steps"] == 12
    assert a[key] == b[key], f"{key}: {a[key]} uninterrupted vs {b[key]} resumed"
    assert _losses(whole) == _losses(broken), "the resumed loss curve differs"
    weights = "model/model.safetensors"
    assert (whole / weights).read_bytes() == (broken / weights).read_bytes(), "final weights differ"
    if stage == "ppo":
        assert (whole / "ema/model.safetensors").read_bytes() == (broken / "ema/model.safetensors").read_bytes()


def _sft(*args, run_dir: Path):
    """The SFT stage in this process (no interpreter start): what ``cli`` runs, minus the process."""
    from rlhf.stages import get_stage

    return get_stage("sft")(compose_cfg("stage=sft", *QUICK, *args, run_dir=run_dir, cache_dir=shared_cache()))


def test_torn_checkpoint_is_ignored(tmp_path):
    _sft("sft.max_steps=8", run_dir=tmp_path)
    good = find_latest(tmp_path)
    assert good is not None and good.name == "step-00000008"
    # a copy whose write was cut short: meta.json truncated mid-file, and a leftover temp dir
    torn = tmp_path / "checkpoints" / "step-00000099"
    shutil.copytree(good, torn)
    text = (torn / "meta.json").read_text()
    (torn / "meta.json").write_text(text[: len(text) // 2])
    shutil.copytree(good, tmp_path / "checkpoints" / ".tmp-step-00000100")
    assert find_latest(tmp_path) == good
    assert resolve_resume("auto", tmp_path) == good
    with pytest.raises(ValueError, match="incomplete"):
        resolve_resume(str(torn), tmp_path)
    with pytest.raises(FileNotFoundError, match="resume="):
        resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    # an absurd learning rate blows the weights up within a few steps
    from rlhf.engine.trainer import NonFiniteLoss

    with pytest.raises(NonFiniteLoss) as err:
        _sft("sft.max_steps=40", "sft.lr=1e30", "sft.warmup_steps=0", "checkpoint.every_n_steps=1", run_dir=tmp_path)
    assert "loss is nan" in str(err.value) or "loss is inf" in str(err.value)
    assert "skip_nonfinite" in str(err.value)  # the message says how to skip instead
    last = find_latest(tmp_path)
    assert last is not None and json.loads((last / "meta.json").read_text())["complete"]
    assert not (tmp_path / "summary.json").exists()


def test_skip_nonfinite_counts_skipped_steps(tmp_path):
    _sft("sft.max_steps=10", "sft.lr=1e30", "sft.skip_nonfinite=true", run_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["skipped_nonfinite"] > 0
    assert summary["steps"] == 10


def test_resume_path_names_missing_checkpoint(compose_config, tmp_path):
    cfg = compose_cfg("stage=sft", *QUICK, f"resume={tmp_path / 'missing'}", run_dir=tmp_path)
    from rlhf.stages import sft

    with pytest.raises(FileNotFoundError, match="resume="):
        sft.run(cfg)
