"""Slurm: a batch script with one task per rank, and ranks inside a submitit-launched Slurm job.

Two ways onto a Slurm cluster, both keeping one run directory for all ranks:

- ``hardware.launcher=slurm`` (``python run.py hardware=v100x16 hardware.launcher=slurm``): the
  Hydra job on the login node pins the run directory, writes ``config.yaml`` and an sbatch script
  (``launch.sbatch``: ``nodes x procs_per_node`` tasks, ``srun`` maps each task's SLURM_PROCID to
  RANK) and submits it with ``sbatch --wait``. ``launch.dry_run=true`` prints the script and the
  ``sbatch`` command.
- ``-m hydra/launcher=slurm`` (conf/hydra/launcher/slurm.yaml over hydra-submitit-launcher's
  ``submitit_slurm``): Hydra submits every run / sweep job as a Slurm job sized from the hardware
  profile. Every task runs the Hydra job (same composed config, same run directory); ``launch()``
  sees it is a task of such a job (``slurm_task``) and runs the stage as that rank. A job with one
  task instead starts the ranks itself (torchrun / deepspeed launcher) inside its allocation.
  ``hydra/launcher=submitit_local`` with ``hydra.launcher.tasks_per_node=2 hardware=cpu2`` takes the
  same path on one machine (tests/test_launchers.py).
"""
from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from omegaconf import DictConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PORT = 29500  # the login node cannot pick a free port on a compute node


def sbatch_script(cfg: DictConfig, config_path: Path) -> str:
    """The batch script that starts ``hardware.nodes x hardware.procs_per_node`` ranks of this run."""
    hw, sl = cfg.hardware, cfg.launch.slurm
    run_dir = Path(cfg.run_dir)
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name=rlhf-{cfg.stage.name}-{cfg.model.name}",
        f"#SBATCH --nodes={hw.nodes}",
        f"#SBATCH --ntasks-per-node={hw.procs_per_node}",
    ]
    if hw.accelerator == "cuda":
        lines.append(f"#SBATCH --gpus-per-node={hw.procs_per_node}")
    lines += [f"#SBATCH --cpus-per-task={sl.cpus_per_task}", f"#SBATCH --time={sl.time_min}",
              f"#SBATCH --output={run_dir}/slurm-%j.out"]
    if sl.partition:
        lines.append(f"#SBATCH --partition={sl.partition}")
    if sl.account:
        lines.append(f"#SBATCH --account={sl.account}")
    lines += [f"#SBATCH {opt}" for opt in sl.extra]
    rank_env = "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS"
    worker = shlex.join([sys.executable, "-m", "launchers.worker", str(config_path)])
    lines += [
        "# One task per rank; every rank reads the config the parent wrote, so all share one run directory.",
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"export MASTER_PORT={hw.master_port or DEFAULT_PORT}",
        f"export PYTHONPATH={shlex.quote(str(PROJECT_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}",
    ]
    if hw.accelerator == "cpu":
        lines.append(f"export OMP_NUM_THREADS={cfg.launch.omp_threads or sl.cpus_per_task}")
    lines += [f"cd {shlex.quote(str(PROJECT_ROOT))}",
              f"srun --kill-on-bad-exit=1 bash -c {shlex.quote(f'{rank_env} exec {worker}')}", ""]
    return "\n".join(lines)


def sbatch_command(cfg: DictConfig, script_path: Path) -> List[str]:
    return ["sbatch", *(["--wait"] if cfg.launch.slurm.wait else []), str(script_path)]


@dataclass(frozen=True)
class SlurmTask:
    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    master_addr: str
    job_id: str


def slurm_task(world_size: int) -> Optional[SlurmTask]:
    """This process's rank when it is one task of a submitit Slurm job with one task per rank.

    None outside such a job, and for a one-task job (which starts its ranks itself). A job whose task
    count differs from the run's ``world_size`` is a sizing mistake and raises, naming the fix.
    """
    if os.environ.get("SUBMITIT_EXECUTOR") not in ("slurm", "local"):  # local: submitit_local, the same path
        return None
    import submitit

    env = submitit.JobEnvironment()
    if env.num_tasks == 1:
        return None
    if env.num_tasks != world_size:
        raise ValueError(
            f"this Slurm job has {env.num_tasks} tasks but the hardware profile asks for {world_size} ranks; "
            "use hydra/launcher=slurm (sized from the hardware profile) or set hydra.launcher.nodes / "
            "tasks_per_node to match hardware.nodes / procs_per_node")
    return SlurmTask(rank=env.global_rank, local_rank=env.local_rank, world_size=env.num_tasks,
                     local_world_size=env.num_tasks // env.num_nodes, master_addr=env.hostnames[0],
                     job_id=str(env.job_id))


def export_rank_env(task: SlurmTask, master_port: int = 0) -> None:
    """The env:// variables torch.distributed (and DeepSpeed) read, for this task's rank."""
    port = master_port or DEFAULT_PORT + int("".join(c for c in task.job_id if c.isdigit()) or 0) % 10000
    os.environ.update(MASTER_ADDR=task.master_addr, MASTER_PORT=str(port), RANK=str(task.rank),
                      WORLD_SIZE=str(task.world_size), LOCAL_RANK=str(task.local_rank),
                      LOCAL_WORLD_SIZE=str(task.local_world_size))
