"""Launchers: the exact commands for one node of 8 GPUs (deepspeed), two nodes from a hostfile and
Slurm (dry runs, no GPU needed); really starting two CPU ranks (torchrun, the DeepSpeed launcher,
submitit tasks) that share one run directory; failures reported, not hidden."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from launchers.local import classify, launch, rank_command, record_failure, worker_failure, write_failure
from launchers.slurm import export_rank_env, slurm_task
from rlhf.config import quote_numeric_choices
from tests.conftest import CONF, ROOT, compose_cfg

TINY_RUN = ["sft.max_steps=2", "data.demo_size=200", "data.heldout_prompts=8", "logger=none"]


def run_py(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "run.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def last_line(text: str) -> str:
    return [ln for ln in text.splitlines() if ln.strip()][-1]


def test_dgx8_dry_run_prints_the_deepspeed_launcher_command(tmp_path):
    out = run_py("stage=sft", "hardware=dgx8", "launch.dry_run=true", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    cmd = shlex.split(last_line(out.stdout))
    assert Path(cmd[0]).name == "deepspeed"
    assert cmd[1:3] == ["--num_nodes=1", "--num_gpus=8"] and cmd[3].startswith("--master_port=")
    assert cmd[4:] == ["--no_local_rank", "--module", "launchers.worker", str(tmp_path / "config.yaml")]
    # the parent pinned the run directory: every rank reads this config
    saved = (tmp_path / "config.yaml").read_text()
    assert f"run_dir: {tmp_path}" in saved and "procs_per_node: 8" in saved
    assert not (tmp_path / "summary.json").exists()  # nothing ran


def test_v100x16_dry_run_uses_the_hostfile(tmp_path):
    hostfile = tmp_path / "hosts"
    out = run_py("stage=sft", "hardware=v100x16", f"hardware.hostfile={hostfile}", "hardware.master_port=29600",
                 "launch.dry_run=true", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    cmd = shlex.split(last_line(out.stdout))
    assert cmd[1:] == ["--num_nodes=2", "--num_gpus=8", "--master_port=29600", f"--hostfile={hostfile}",
                       "--no_local_rank", "--module", "launchers.worker", str(tmp_path / "config.yaml")]


def test_slurm_dry_run_prints_the_batch_script(tmp_path):
    out = run_py("stage=sft", "hardware=v100x16", "hardware.launcher=slurm", "launch.slurm.partition=gpu",
                 "launch.slurm.time_min=60", "launch.dry_run=true", f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    script = (tmp_path / "launch.sbatch").read_text()
    assert script in out.stdout
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --time=60", f"#SBATCH --output={tmp_path}/slurm-%j.out"]:
        assert line in script.splitlines()
    srun = next(ln for ln in script.splitlines() if ln.startswith("srun "))
    assert "RANK=$SLURM_PROCID" in srun and "WORLD_SIZE=$SLURM_NTASKS" in srun
    assert f"-m launchers.worker {tmp_path / 'config.yaml'}" in srun
    assert last_line(out.stdout) == f"sbatch --wait {tmp_path / 'launch.sbatch'}"


def test_rank_commands_for_local_and_errors(tmp_path):
    cfg = compose_cfg("hardware=cpu2", run_dir=tmp_path)
    cmd = rank_command(cfg, tmp_path / "config.yaml", 1234)
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1"]
    with pytest.raises(ValueError, match="launcher=deepspeed"):
        rank_command(compose_cfg("hardware=cpu2", "hardware.nodes=2"), tmp_path / "c.yaml", 1)
    with pytest.raises(ValueError, match="hostfile is required"):
        rank_command(compose_cfg("hardware=v100x16", "hardware.hostfile=null"), tmp_path / "c.yaml", 1)


def test_missing_hostfile_fails_before_starting_anything(tmp_path):
    cfg = compose_cfg("stage=sft", "hardware=v100x16", f"hardware.hostfile={tmp_path}/nope", run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="hardware.hostfile"):
        launch(cfg)


def test_slurm_preset_sizes_jobs_from_the_hardware_profile():
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=quote_numeric_choices(["hydra/launcher=slurm", "hardware=v100x16"]),
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 8, 8)


def test_a_slurm_task_becomes_one_rank(monkeypatch):
    env = dict(SUBMITIT_EXECUTOR="slurm", SLURM_JOB_ID="4242", SLURM_PROCID="9", SLURM_NTASKS="16",
               SLURM_LOCALID="1", SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES="2", SLURM_NODEID="1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.setenv(k, "")  # recorded, so the teardown removes what export_rank_env sets
    task = slurm_task(16)
    assert (task.rank, task.local_rank, task.world_size, task.master_addr) == (9, 1, 16, "gpu07")
    export_rank_env(task, master_port=29555)
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("9", "16", "1")
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("gpu07", "29555")
    with pytest.raises(ValueError, match="16 tasks but the hardware profile asks for 8 ranks"):
        slurm_task(8)
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert slurm_task(16) is None  # a one-task job starts its ranks itself
    monkeypatch.delenv("SUBMITIT_EXECUTOR")
    assert slurm_task(16) is None


def test_failures_are_classified_for_the_sweep_table(tmp_path):
    import torch

    from rlhf.engine.memory import DoesNotFit

    assert classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB\nmore"))["status"] == "OOM"
    assert classify(DoesNotFit("opt-13b on a6000 does not fit"))["status"] == "OOM"  # the planner's refusal
    assert classify(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ... out of memory"))["status"] \
        == "OOM"
    failed = classify(ValueError("batch_size should be a positive integer\ntraceback lines"))
    assert failed == {"status": "failed", "error": "batch_size should be a positive integer", "error_type": "ValueError"}
    # rank workers: the lowest failing rank's report; no report and SIGKILL = host OOM
    write_failure(tmp_path, ValueError("rank 1 broke"), rank=1)
    write_failure(tmp_path, torch.OutOfMemoryError("CUDA out of memory"), rank=0)
    err = worker_failure(tmp_path, 1, n=2)
    assert (err.status, str(err)) == ("OOM", "rank 0: CUDA out of memory")
    assert worker_failure(tmp_path / "none", -9).status == "OOM"
    assert worker_failure(tmp_path / "none", 1).status == "failed"
    cfg = compose_cfg("stage=sft", run_dir=tmp_path)
    summary = record_failure(tmp_path, err, cfg)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert summary["status"] == "OOM" and summary["objective"] is None


def test_a_failing_single_run_raises_with_its_error(tmp_path):
    out = run_py("stage=sft", "sft.micro_batch_size=0", *TINY_RUN[1:], f"hydra.run.dir={tmp_path}")
    assert out.returncode != 0
    assert "batch_size" in out.stderr


def _assert_two_rank_run(run_dir: Path) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert (run_dir / "config.yaml").exists() and (run_dir / "model" / "config.json").exists()


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("launcher, command", [
    ("local", "torch.distributed.run --nproc_per_node=2"),  # local = torchrun for several ranks
    # the dgx8/v100x16 launcher path (deepspeed runner, --no_local_rank, --module) for real, on 2 CPU ranks
    ("deepspeed", "deepspeed --num_nodes=1 --num_gpus=2"),
])
def test_cpu2_really_starts_two_ranks(tmp_path, launcher, command):
    out = run_py("stage=sft", "hardware=cpu2", f"hardware.launcher={launcher}", *TINY_RUN, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 0, out.stderr[-3000:]
    assert command in out.stdout + out.stderr
    _assert_two_rank_run(tmp_path)


@pytest.mark.slow
@pytest.mark.dist
def test_submitit_tasks_are_ranks_of_one_run(tmp_path):
    """hydra/launcher=submitit_local with one task per rank: the same code path as a Slurm job."""
    out = run_py("-m", "stage=sft", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2",
                 "hardware=cpu2", *TINY_RUN, f"hydra.sweep.dir={tmp_path}", timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    (job,) = [p.parent for p in tmp_path.glob("*/summary.json")]
    _assert_two_rank_run(job)
    logs = "".join(p.read_text() for p in tmp_path.glob(".submitit/*/*_log.out"))
    assert "global_rank=0(2)" in logs and "global_rank=1(2)" in logs
