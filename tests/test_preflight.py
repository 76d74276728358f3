"""Fail fast, once: the launching process checks the critic, the accelerator and the memory fit before any
rank starts, and a refused single run prints one line and exits non-zero within seconds."""
from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlhf.engine.preflight import PreflightError, accelerator_problem, critic_problem, preflight
from tests.conftest import ROOT, compose_cfg

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


def run_py(*args: str, timeout: int = 120):
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return out, time.perf_counter() - t0


def lines(text: str):
    return [ln for ln in text.splitlines() if ln.strip()]


@no_gpu
def test_a_gpu_preset_on_this_cpu_machine_stops_in_seconds_with_one_line(tmp_path):
    out, seconds = run_py("experiment=dschat/opt-13b-dgx8", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    assert seconds < 60, seconds  # imports only (~5 s quiet); building the 13B models would take far longer
    (line,) = lines(out.stderr)
    assert line.startswith("error: hardware=dgx8 needs CUDA GPUs but this machine has none")
    assert not list(tmp_path.glob("failure-rank*.json"))  # no rank was started


def test_a_13b_critic_is_refused_naming_the_small_reward_model(tmp_path):
    out, _ = run_py("stage=ppo", "model=opt-13b", "hardware=dgx8", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2
    (line,) = lines(out.stderr)
    assert "not a trained reward model" in line and "reward=opt-350m" in line and "critic.path=" in line


def test_dry_run_prints_a_fitting_plan_and_the_launch_command(tmp_path):
    out, _ = run_py("experiment=dschat/opt-13b-dgx8", "launch.dry_run=true", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Chosen: zero=3, lora rank 128 (adapters only) -> fits" in out.stdout
    cmd = shlex.split(lines(out.stdout)[-1])
    assert Path(cmd[0]).name == "deepspeed" and cmd[1:3] == ["--num_nodes=1", "--num_gpus=8"]


def test_critic_rules(tmp_path):
    ppo = ("stage=ppo", "model=opt-1.3b", "reward=opt-350m", "hardware=a6000")
    assert "reward.path=facebook/opt-350m" in critic_problem(compose_cfg(*ppo))
    assert critic_problem(compose_cfg(*ppo, "ppo.allow_untrained_critic=true")) is None
    bare = tmp_path / "bare"  # an LM directory without a value head
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    assert "critic.path=" in critic_problem(compose_cfg(*ppo, f"critic.path={bare}"))
    (bare / "value_head.safetensors").write_bytes(b"")  # what stage=rm saves next to the weights
    assert critic_problem(compose_cfg(*ppo, f"critic.path={bare}")) is None
    # the pipeline trains its reward model first; without step 2 it needs one too
    assert critic_problem(compose_cfg("stage=pipeline", *ppo[1:])) is None
    assert critic_problem(compose_cfg("stage=pipeline", *ppo[1:], "pipeline.steps=[1,3]")) is not None
    assert critic_problem(compose_cfg("stage=ppo")) is None  # tiny demo models are exempt


@no_gpu
def test_accelerator_rules():
    assert "needs CUDA" in accelerator_problem(compose_cfg("hardware=a6000").hardware)
    assert accelerator_problem(compose_cfg("hardware=cpu2").hardware) is None
    assert accelerator_problem(compose_cfg("hardware=v100x16").hardware) is None  # ranks start on other nodes
    with pytest.raises(PreflightError, match="hardware=a6000 needs CUDA"):
        preflight(compose_cfg("stage=sft", "hardware=a6000"))
    preflight(compose_cfg("stage=sft", "hardware=a6000"), accelerator=False)  # a dry run: tiny model fits
