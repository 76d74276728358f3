"""Launch a composed run: inline for one process, rank workers for several.

The Hydra job stays the parent: it pins the run directory, writes the resolved config there, and
starts the ranks (torchrun on one node, the DeepSpeed launcher for a hostfile, an sbatch script for
hardware.launcher=slurm), which all read that one config, so every rank agrees on the run
directory. Under Hydra's submitit Slurm launcher each Slurm task is one rank (launchers.slurm).

In a multirun every job runs in its own process (``launch.isolate_jobs``): memory peaks are the
job's own, process groups do not leak into the next job, and a failure (exception, OOM, a killed
rank) becomes that job's ``summary.json`` status instead of ending the sweep.
`launch.dry_run=true` prints the exact command(s) (or batch script) and starts nothing.
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


def deepspeed_launcher() -> str:
    """The ``deepspeed`` script of this environment (the one next to this Python), else from PATH."""
    script = Path(sys.executable).parent / "deepspeed"
    return str(script) if script.exists() else "deepspeed"


def rank_command(cfg: DictConfig, config_path: Path, port: int) -> List[str]:
    """The command that starts every rank of this run on this node (torchrun | deepspeed launcher).

    hardware.launcher=slurm is not a command but a batch script: see ``launchers.slurm``.
    """
    hw = cfg.hardware
    worker = ["-m", "launchers.worker", str(config_path)]
    if hw.launcher == "local":
        if hw.nodes != 1:
            raise ValueError(f"hardware.launcher=local runs on one node; hardware.nodes={hw.nodes} "
                             "needs launcher=deepspeed (hostfile) or launcher=slurm")
        return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={hw.procs_per_node}",
                "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={port}", *worker]
    if hw.launcher == "deepspeed":
        cmd = [deepspeed_launcher(), f"--num_nodes={hw.nodes}", f"--num_gpus={hw.procs_per_node}",
               f"--master_port={port}"]
        if hw.nodes > 1:
            if not hw.hostfile:
                raise ValueError(f"hardware.hostfile is required for {hw.nodes} nodes (one line per node: "
                                 f"'<host> slots={hw.procs_per_node}')")
            cmd.append(f"--hostfile={Path(hw.hostfile).expanduser().resolve()}")
        # --no_local_rank: ranks read LOCAL_RANK from the environment; the worker's only argument is the config
        return [*cmd, "--no_local_rank", "--module", "launchers.worker", str(config_path)]
    if hw.launcher == "slurm":
        raise ValueError("hardware.launcher=slurm starts ranks from a batch script (launchers.slurm), "
                         "not from a command on this node")
    raise ValueError(f"hardware.launcher must be local, deepspeed or slurm, got '{hw.launcher}'")


def in_multirun() -> bool:
    """True inside a Hydra multirun job (``-m``, a sweep, an Optuna search)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def launch(cfg: DictConfig) -> Dict[str, Any]:
    """Run the stage inline (one process) or start its ranks and wait; return its summary.

    In a multirun a failing job (exception, OOM, a rank that dies) does not stop the sweep: its
    ``summary.json`` says ``{"status": "OOM" | "failed", "error": <first line>}`` and the job returns
    that, so the sweep's table gets a row saying so. A single run re-raises.
    """
    from launchers.slurm import slurm_task

    cfg = resolve_paths(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    task = None if cfg.stage.inline else slurm_task(world_size(cfg))
    multirun = in_multirun()
    held = False
    try:
        if task is None and not cfg.launch.dry_run:  # lock the run dir, refuse another run's; before config.yaml
            from rlhf.engine.rundir import claim

            held = claim(cfg, run_dir)
        if task is not None:  # one task of a Slurm job (hydra/launcher=submitit_slurm): this process is a rank
            return _run_as_slurm_rank(cfg, run_dir, task)
        _preflight(cfg)
        return _start(cfg, run_dir, isolate=multirun and cfg.launch.isolate_jobs)
    except Exception as err:
        if not multirun:
            _stop_if_refused(err)
            raise
        log.error("job failed; the sweep goes on: %s", err)
        from rlhf.engine.rundir import RunDirInUse, RunDirTaken

        if isinstance(err, (RunDirInUse, RunDirTaken)):  # the directory is another run's: write nothing there
            return dict(classify(err), objective=None)
        if task is not None and task.rank != 0:  # rank 0 of a Slurm job writes the job's summary
            return dict(classify(err), objective=None)
        return record_failure(run_dir, err, cfg)
    finally:
        if held:
            from rlhf.engine.rundir import release

            release(run_dir)


def _preflight(cfg: DictConfig) -> None:
    """Accelerator, critic and memory checks, once, here (rlhf/engine/preflight.py); a dry run skips the
    accelerator check (it starts nothing) and prints the memory plan above the command."""
    from rlhf.engine.preflight import preflight

    preflight(cfg, accelerator=not cfg.launch.dry_run)
    if cfg.launch.dry_run and cfg.stage.name != "plan":
        from rlhf.engine.memory import UnknownSize, format_plan, make_plan

        try:
            print(format_plan(make_plan(cfg)))
        except UnknownSize as err:
            print(f"(no memory plan: {err})")


def _stop_if_refused(err: BaseException) -> None:
    """A preflight refusal of a single run ends the program with its one line (no traceback)."""
    from rlhf.engine.memory import DoesNotFit
    from rlhf.engine.preflight import PreflightError

    if isinstance(err, (PreflightError, DoesNotFit)):
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def _start(cfg: DictConfig, run_dir: Path, isolate: bool) -> Dict[str, Any]:
    config_path = run_dir / "config.yaml"
    OmegaConf.save(cfg, config_path, resolve=True)
    n = world_size(cfg)
    if cfg.stage.inline:
        n = 1
    elif cfg.hardware.launcher == "slurm":
        return _submit_slurm(cfg, run_dir, config_path)
    if n == 1:
        cmd = [sys.executable, "-m", "launchers.worker", str(config_path)]
        if cfg.launch.dry_run:
            print(shlex.join(cmd))
            return {"command": shlex.join(cmd)}
        if not isolate or cfg.stage.inline:
            from rlhf.stages import run_stage

            return run_stage(cfg)
    else:
        from rlhf.engine.setup import free_port

        cmd = rank_command(cfg, config_path, cfg.hardware.master_port or free_port())
        if cfg.launch.dry_run:
            print(shlex.join(cmd))
            return {"command": shlex.join(cmd)}
        if cfg.hardware.launcher == "deepspeed" and cfg.hardware.nodes > 1:
            hostfile = Path(cfg.hardware.hostfile).expanduser()
            if not hostfile.is_file():
                raise FileNotFoundError(f"hardware.hostfile={cfg.hardware.hostfile}: no such file "
                                        f"(one line per node: '<host> slots={cfg.hardware.procs_per_node}')")
    return _run_workers(cmd, cfg, run_dir, n)


def _worker_env(cfg: DictConfig, n: int) -> Dict[str, str]:
    env = dict(os.environ)
    if cfg.hardware.accelerator == "cpu":
        threads = cfg.launch.omp_threads or max(1, (os.cpu_count() or 1) // n)
        env["OMP_NUM_THREADS"] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join([str(PROJECT_ROOT), env.get("PYTHONPATH", "")])
    return env


def _run_workers(cmd: List[str], cfg: DictConfig, run_dir: Path, n: int) -> Dict[str, Any]:
    """Start ``cmd`` (the ranks, or one isolated job process), wait, return the run's summary."""
    for stale in run_dir.glob("failure-rank*.json"):
        stale.unlink()
    log.info("starting %d process(es): %s", n, shlex.join(cmd))
    proc = subprocess.run(cmd, env=_worker_env(cfg, n), cwd=str(PROJECT_ROOT))
    if proc.returncode != 0:
        raise worker_failure(run_dir, proc.returncode, n)
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def _submit_slurm(cfg: DictConfig, run_dir: Path, config_path: Path) -> Dict[str, Any]:
    """hardware.launcher=slurm: write ``launch.sbatch`` (one task per rank) and submit it."""
    from launchers.slurm import sbatch_command, sbatch_script

    script_path = run_dir / "launch.sbatch"
    script = sbatch_script(cfg, config_path)
    script_path.write_text(script)
    cmd = sbatch_command(cfg, script_path)
    if cfg.launch.dry_run:
        print(script)
        print(shlex.join(cmd))
        return {"command": shlex.join(cmd), "script": script}
    log.info("submitting %s", shlex.join(cmd))
    proc = subprocess.run(cmd, cwd=str(PROJECT_ROOT))
    if proc.returncode != 0:
        raise worker_failure(run_dir, proc.returncode, world_size(cfg))
    if not cfg.launch.slurm.wait:
        return {"status": "submitted", "script": str(script_path)}
    summary = run_dir / "summary.json"
    return json.loads(summary.read_text()) if summary.exists() else {}


def _run_as_slurm_rank(cfg: DictConfig, run_dir: Path, task) -> Dict[str, Any]:
    """Inside a Slurm job with one task per rank: export this task's rank and run the stage."""
    from launchers.slurm import export_rank_env
    from rlhf.stages import run_stage

    export_rank_env(task, cfg.hardware.master_port)
    if task.rank == 0:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    try:
        return run_stage(cfg)
    except Exception as err:
        write_failure(run_dir, err, task.rank)
        raise


# ---------------------------------------------------------------- failures


class RunFailed(RuntimeError):
    """The ranks (or the isolated job process) of a run exited with an error."""

    def __init__(self, message: str, status: str = "failed", error_type: str = ""):
        super().__init__(message)
        self.status = status
        self.error_type = error_type


def classify(err: BaseException) -> Dict[str, str]:
    """``{"status": "OOM" | "failed", "error": first line, "error_type": class name}``."""
    if isinstance(err, RunFailed):
        return {"status": err.status, "error": _first_line(err), "error_type": err.error_type or "RunFailed"}
    name = type(err).__name__
    first = _first_line(err)
    oom = isinstance(err, MemoryError) or name == "OutOfMemoryError" or "out of memory" in first.lower()
    return {"status": "OOM" if oom else "failed", "error": first, "error_type": name}


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def write_failure(run_dir: Path, err: BaseException, rank: int) -> None:
    """Each failing rank leaves ``failure-rank<R>.json`` for the parent to report."""
    from rlhf.tracking import atomic_write_json

    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / f"failure-rank{rank}.json", dict(classify(err), rank=rank))
    except OSError:  # reporting must never hide the original error
        log.exception("could not write the failure report")


# A rank's error that says a peer vanished (killed) or stopped answering (collective timeout).
PEER_ERRORS = ("connection reset", "broken pipe", "connection closed", "closed by peer", "timed out",
               "timeout", "connection refused", "socket closed")


def worker_failure(run_dir: Path, returncode: int, n: int = 1) -> RunFailed:
    """The error of the lowest failing rank, or what the exit code says (-9/137: killed, likely host OOM)."""
    reports = sorted(run_dir.glob("failure-rank*.json"), key=lambda p: int(p.stem.split("rank")[-1] or 0))
    if reports:
        r = json.loads(reports[0].read_text())
        silent = sorted(set(range(n)) - {int(p.stem.split("rank")[-1] or 0) for p in reports})
        if n > 1 and silent and any(s in r["error"].lower() for s in PEER_ERRORS):
            # the reporting ranks failed because a peer vanished or stopped answering: name that peer
            who = ", ".join(f"rank {k}" for k in silent)
            return RunFailed(f"{who} died or stopped responding (no error report; killed, crashed or stuck); "
                             f"rank {r.get('rank', '?')} then failed waiting for it: {r['error']}", "failed", "RankLost")
        where = f"rank {r.get('rank', '?')}: " if n > 1 else ""
        return RunFailed(f"{where}{r['error']}", r["status"], r.get("error_type", ""))
    if returncode in (-9, 137):
        return RunFailed(f"a process was killed (exit {returncode}), most likely out of host memory", "OOM")
    return RunFailed(f"rank workers failed (exit {returncode}); see the log above and {run_dir}")


def record_failure(run_dir: Path, err: BaseException, cfg: DictConfig) -> Dict[str, Any]:
    """A sweep job's ``summary.json`` when it failed: its status, the error's first line, no metrics."""
    from rlhf.tracking import atomic_write_json

    summary = dict(classify(err), stage=cfg.stage.name, world_size=world_size(cfg), objective=None)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "summary.json", summary)
    return summary


def worker_main(config_path: str) -> Dict[str, Any]:
    """One rank: read the parent's resolved config and run the stage."""
    from rlhf.config import Config
    from rlhf.stages import run_stage

    logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    cfg = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(config_path))
    from rlhf.console import quiet_libraries

    quiet_libraries(str(cfg.hardware.accelerator))
    try:
        result = run_stage(cfg)
    except Exception as err:
        write_failure(Path(cfg.run_dir), err, int(os.environ.get("RANK", "0")))
        raise
    import torch.distributed as dist

    if dist.is_initialized():  # join the process group's threads before the interpreter tears down: a
        dist.destroy_process_group()  # rank that exits with them running can abort (SIGABRT) after a finished run
    return result
