"""Launch a composed run: inline for one process, rank workers for several.

The Hydra job stays the parent: it pins the run directory, writes the resolved config there, and
starts the ranks (torchrun on one node, the DeepSpeed launcher for a hostfile), which all read that
one config, so every rank agrees on the run directory.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def resolve_paths(cfg: DictConfig) -> DictConfig:
    """Fill run_dir (Hydra's output dir) and cache_dir (<project>/.cache) with absolute paths."""
    if not cfg.run_dir:
        from hydra.core.hydra_config import HydraConfig

        cfg.run_dir = HydraConfig.get().runtime.output_dir
    cfg.run_dir = str(Path(cfg.run_dir).resolve())
    cfg.cache_dir = str(Path(cfg.cache_dir or PROJECT_ROOT / ".cache").resolve())
    return cfg


def world_size(cfg: DictConfig) -> int:
    return int(cfg.hardware.nodes) * int(cfg.hardware.procs_per_node)


def rank_command(cfg: DictConfig, config_path: Path, port: int) -> List[str]:
    """The command that starts every rank of this run (one line per launcher)."""
    hw = cfg.hardware
    worker = ["-m", "launchers.worker", str(config_path)]
    if hw.launcher == "local":
        if hw.nodes != 1:
            raise ValueError(f"hardware.launcher=local runs on one node; hardware.nodes={hw.nodes} "
                             "needs launcher=deepspeed (hostfile) or hydra/launcher=submitit_slurm")
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={hw.procs_per_node}",
                "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}", *worker]
    if hw.launcher == "deepspeed":
        cmd = ["deepspeed", f"--num_nodes={hw.nodes}", f"--num_gpus={hw.procs_per_node}",
               f"--master_port={port}"]
        if hw.nodes > 1:
            if not hw.hostfile:
                raise ValueError(f"hardware.hostfile is required for {hw.nodes} nodes")
            cmd.append(f"--hostfile={hw.hostfile}")
        return [*cmd, "--module", "launchers.worker", str(config_path)]
    if hw.launcher == "slurm":
        raise ValueError("hardware.launcher=slurm: submit with hydra/launcher=submitit_slurm; "
                         "each Slurm task then runs as one rank")
    raise ValueError(f"hardware.launcher must be local, deepspeed or slurm, got '{hw.launcher}'")


def launch(cfg: DictConfig) -> Dict[str, Any]:
    """Run the stage inline (one process) or start its ranks and wait; return its summary."""
    cfg = resolve_paths(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    config_path = run_dir / "config.yaml"
    OmegaConf.save(cfg, config_path, resolve=True)
    n = world_size(cfg)
    if n == 1:
        if cfg.launch.dry_run:
            print(f"{sys.executable} -m launchers.worker {config_path}")
            return {}
        from rlhf.stages import run_stage

        return run_stage(cfg)
    from rlhf.engine.setup import free_port

    cmd = rank_command(cfg, config_path, cfg.hardware.master_port or free_port())
    if cfg.launch.dry_run:
        print(shlex.join(cmd))
        return {"command": shlex.join(cmd)}
    env = dict(os.environ)
    if cfg.hardware.accelerator == "cpu":
        threads = cfg.launch.omp_threads or max(1, (os.cpu_count() or 1) // n)
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")])
    log.info("starting %d ranks: %s", n, shlex.join(cmd))
    proc = subprocess.run(cmd, env=env, cwd=str(PROJECT_ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"rank workers failed (exit {proc.returncode}); see the log above and {run_dir}")
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def worker_main(config_path: str) -> Dict[str, Any]:
    """One rank: read the parent's resolved config and run the stage."""
    from rlhf.config import Config
    from rlhf.stages import run_stage

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_path))
    return run_stage(cfg)
