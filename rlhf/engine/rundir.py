"""A run directory belongs to one run.

``claim(cfg, run_dir)`` is called once before a run writes anything there (by the launching process,
and again by the stage itself, which is a no-op when its process or a parent process already holds
the directory). It

1. takes ``<run_dir>/.lock`` (``fcntl.flock``, held for the run's life): a second process on the
   same directory fails at once, naming the holder's PID;
2. refuses a directory that already holds another run (``metrics.jsonl``, ``summary.json`` or a
   checkpoint) unless the run resumes (``resume=auto`` or a checkpoint inside it) or
   ``run_dir_mode=overwrite``, which moves the old run aside to ``<run_dir>.old-<time>``. A
   pipeline owns the step subdirectories it runs, so ``pipeline.steps=[3]`` may rerun step 3 in a
   directory whose steps 1 and 2 are done;
3. on resume, compares the settings the checkpoint was written with against this run's: a
   different model, LoRA, ZeRO layout, data or optimizer/schedule setting is refused, naming each
   key (a resumed run continues the checkpoint's schedule; settings that do not change the
   training math, such as logging, checkpointing and eval cadence, may change).

Only then is ``config.yaml`` written. ``finished(cfg, run_dir)`` is the summary of a run that
already ended, which ``resume=auto`` reports instead of training again.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Dict, IO, List, Optional

from omegaconf import OmegaConf

log = logging.getLogger(__name__)

LOCK = ".lock"
MODES = ("new", "overwrite")
_held: Dict[Path, IO] = {}  # run dir -> open lock file of the lock this process holds

# Settings a resume may change: they do not touch the training math.
MAY_CHANGE = ("run_dir", "cache_dir", "resume", "run_dir_mode", "logger", "checkpoint", "launch", "plan",
              "hardware.name", "hardware.master_port", "hardware.hostfile", "hardware.launcher",
              "hardware.host_memory_gb", "hardware.gpu_memory_gb", "data.name", "data.reload", "data.cache_dir",
              "data.heldout_prompts", "data.heldout_samples", "*.log_every", "*.eval_every", "*.skip_nonfinite",
              "stage.inline", "*.name")
# Groups a stage's checkpoint depends on, besides these shared ones.
SHARED = ("lora", "zero", "hardware", "data", "seed")
STAGE_GROUPS = {"sft": ("model", "sft"), "rm": ("model", "rm"), "dpo": ("model", "actor", "dpo"),
                "ppo": ("actor", "reward", "critic", "ppo")}


class RunDirInUse(RuntimeError):
    """Another live process holds the run directory."""


class RunDirTaken(ValueError):
    """The run directory holds another run (or a checkpoint written with other settings)."""


# ---------------------------------------------------------------- lock


def _ancestors() -> List[int]:
    try:
        import psutil

        return [p.pid for p in psutil.Process().parents()]
    except Exception:  # psutil missing or /proc unreadable: only the direct parent
        return [os.getppid()]


def holder(run_dir: Path) -> Optional[int]:
    """PID written in the run directory's lock file (None if none)."""
    try:
        return int((Path(run_dir) / LOCK).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def acquire(run_dir: Path) -> bool:
    """Lock ``run_dir`` for this process. False when this process (for the directory or one above
    it) or a parent process (the launcher of this rank) already holds it; raises when another does."""
    run_dir = Path(run_dir).resolve()
    if any(d in _held for d in (run_dir, *run_dir.parents)):
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        pid = holder(run_dir)
        if pid is not None and pid in _ancestors():
            return False
        raise RunDirInUse(f"run_dir={run_dir} is in use by another run (PID {pid}, lock file {run_dir / LOCK}); "
                          "wait for it to end or choose another run_dir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[run_dir] = f
    return True


def release(run_dir: Path) -> None:
    """Drop this process's lock on exactly ``run_dir`` (no-op if it holds none)."""
    f = _held.pop(Path(run_dir).resolve(), None)
    if f is not None:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


# ---------------------------------------------------------------- ownership


def _owned_dirs(cfg, run_dir: Path) -> List[Path]:
    """The directories this run will write its results into (a pipeline: its steps' subdirectories)."""
    if cfg.stage.name != "pipeline":
        return [run_dir]
    from rlhf.config import pipeline_steps

    return [run_dir / name for _, name in pipeline_steps(cfg.pipeline, cfg.ppo)]


def previous_run(d: Path) -> List[str]:
    """What in ``d`` shows that a run already used it."""
    found = [n for n in ("metrics.jsonl", "summary.json") if (d / n).exists() and (d / n).stat().st_size > 0]
    ck = d / "checkpoints"
    if ck.is_dir() and any(p.name.startswith("step-") for p in ck.iterdir()):
        found.append("checkpoints/")
    return found


def _resumes_here(cfg, run_dir: Path) -> bool:
    if not cfg.resume:
        return False
    if cfg.resume == "auto":
        return True
    return run_dir.resolve() in Path(cfg.resume).resolve().parents


def check_owner(cfg, run_dir: Path) -> None:
    mode = cfg.get("run_dir_mode", "new")
    if mode not in MODES:
        raise ValueError(f"run_dir_mode={mode!r}: expected one of {', '.join(MODES)}")
    if _resumes_here(cfg, run_dir):
        return
    taken = {d: previous_run(d) for d in _owned_dirs(cfg, run_dir)}
    taken = {d: v for d, v in taken.items() if v}
    if not taken:
        return
    if mode == "overwrite":
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        release(run_dir)
        os.replace(run_dir, aside)
        run_dir.mkdir(parents=True)
        acquire(run_dir)
        log.warning("run_dir_mode=overwrite: the previous run in %s was moved to %s", run_dir, aside)
        return
    where = "; ".join(f"{d}: {', '.join(v)}" for d, v in taken.items())
    raise RunDirTaken(f"run_dir={run_dir} already holds another run ({where}). A new run never reuses it: "
                      "resume it with resume=auto, move it aside with run_dir_mode=overwrite, or choose another run_dir")


# ---------------------------------------------------------------- resume settings


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _may_change(key: str) -> bool:
    for pat in MAY_CHANGE:
        if pat.startswith("*."):
            if key.endswith(pat[1:]):
                return True
        elif key == pat or key.startswith(pat + "."):
            return True
    return False


def settings_diff(old: Dict[str, Any], new: Dict[str, Any], stage: str) -> List[str]:
    """``["sft.lr: 0.001 in the checkpoint, 0.03 now", ...]`` over the groups ``stage`` depends on.
    Keys the checkpoint does not know (added to the schema since) are not compared."""
    groups = (*STAGE_GROUPS.get(stage, ("model", stage)), *SHARED, "stage")
    a, b = _flat({g: old.get(g) for g in groups if g in old}), _flat({g: new.get(g) for g in groups if g in new})
    return [f"{k}: {a[k]!r} in the checkpoint, {b.get(k)!r} now" for k in sorted(a)
            if k in b and a[k] != b[k] and not _may_change(k)]


def check_resume(cfg, run_dir: Path) -> None:
    from rlhf.engine.checkpoint import resolve_resume

    ckpt = resolve_resume(cfg.resume, run_dir)
    if ckpt is None:
        metrics = run_dir / "metrics.jsonl"
        if cfg.resume == "auto" and finished(cfg, run_dir) is None and metrics.exists() and metrics.stat().st_size:
            aside = metrics.with_name(f"metrics.jsonl.old-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(metrics, aside)  # starting over: the new run's rows must not follow the old ones
            log.warning("resume=auto: no complete checkpoint in %s, starting over; earlier metrics moved to %s",
                        run_dir, aside)
        _check_steps_resume(cfg, run_dir)
        return
    _compare_settings(cfg, ckpt)


def _check_steps_resume(cfg, run_dir: Path) -> None:
    """A pipeline resumed with ``resume=auto``: each step it runs against its own newest checkpoint,
    so a changed step setting is refused before anything is written (the launcher then rewrites the
    pipeline's config.yaml), not when that step starts."""
    if cfg.stage.name != "pipeline" or cfg.resume != "auto":
        return
    from rlhf.engine.checkpoint import resolve_resume
    from rlhf.stages.pipeline import plan

    for name, sub in plan(cfg, run_dir):
        ckpt = resolve_resume("auto", run_dir / name)
        if ckpt is not None:
            _compare_settings(sub, ckpt)


def _compare_settings(cfg, ckpt: Path) -> None:
    """Refuse resuming ``ckpt`` with settings other than the ones it was written with."""
    try:
        old = json.loads((ckpt / "meta.json").read_text()).get("config")
    except (OSError, ValueError):
        old = None
    if not old:
        log.warning("resume from %s: the checkpoint does not record its settings; they are not compared", ckpt)
        return
    new = OmegaConf.to_container(cfg, resolve=True)
    diff = settings_diff(old, new, cfg.stage.name)
    if diff:
        raise RunDirTaken(
            f"resume={cfg.resume} ({ckpt}): these settings differ from the ones the checkpoint was written with: "
            + "; ".join(diff) + ". A resumed run continues the checkpoint's model and schedule: drop these "
            "overrides, or start a new run (another run_dir, init_from=<its model dir>) to change them")


# ---------------------------------------------------------------- entry points


def claim(cfg, run_dir: Path) -> bool:
    """Lock ``run_dir`` and check it may be used by this run (see the module doc). Returns whether
    this call took the lock (the caller then releases it when the run ends)."""
    from rlhf.engine.checkpoint import check_settings

    check_settings(cfg.checkpoint)  # before anything is written
    run_dir = Path(run_dir).resolve()
    took = acquire(run_dir)
    try:
        check_owner(cfg, run_dir)
        check_resume(cfg, run_dir)
    except BaseException:
        if took:
            release(run_dir)
        raise
    return took


def finished(cfg, run_dir: Path) -> Optional[Dict[str, Any]]:
    """With ``resume=auto``: the summary of a run that already ended in ``run_dir`` (None otherwise)."""
    if cfg.get("resume") != "auto":
        return None
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("status") not in (None, "complete"):
        return None  # a failed sweep job's record: run it again
    return summary
