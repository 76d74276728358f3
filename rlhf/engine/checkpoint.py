"""Resumable checkpoints, written atomically.

A checkpoint is a directory ``<run_dir>/checkpoints/step-NNNNNNNN`` holding, for every trained
DeepSpeed engine, DeepSpeed's own state (module, optimizer, scheduler, ZeRO shards), each rank's
RNG states, and ``meta.json`` (global step, loop position, tracker run id, stage extras such as
the KL controller) and ``extra.safetensors`` (tensors such as the EMA weights). It is written under a temporary name and renamed only
when every rank has finished, so a kill during the write never leaves a directory that looks
complete; ``resume=auto`` only considers directories whose ``meta.json`` says ``complete``.
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np
import torch
import torch.distributed as dist

from rlhf.engine.setup import barrier

log = logging.getLogger(__name__)

PREFIX = "step-"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def rng_state() -> Dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def is_complete(path: Path) -> bool:
    meta = path / "meta.json"
    try:
        return path.name.startswith(PREFIX) and json.loads(meta.read_text()).get("complete") is True
    except (OSError, ValueError):
        return False


def find_latest(run_dir: Path) -> Optional[Path]:
    """Newest complete checkpoint under ``run_dir/checkpoints`` (half-written ones are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    done = sorted((p for p in root.iterdir() if is_complete(p)), key=lambda p: p.name)
    return done[-1] if done else None


def resolve_resume(resume: Optional[str], run_dir: Path) -> Optional[Path]:
    """``resume=auto`` -> newest complete checkpoint in run_dir (None if there is none yet);
    ``resume=<path>`` -> that checkpoint, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        found = find_latest(run_dir)
        log.info("resume=auto: %s", found or f"no complete checkpoint in {run_dir}/checkpoints, starting fresh")
        return found
    path = Path(resume)
    if not path.is_dir():
        raise FileNotFoundError(f"resume={resume}: no such checkpoint directory")
    if not is_complete(path):
        raise ValueError(f"resume={resume}: the checkpoint is incomplete (no complete meta.json); "
                         "it was probably interrupted while being written")
    return path


class Checkpointer:
    """Saves every ``every_n_steps`` optimizer steps and/or ``every_minutes``; keeps the last K."""

    def __init__(self, run_dir: Path, ckpt_cfg, engines: Dict[str, Any], tracker=None,
                 extra_state: Optional[Callable[[], Dict[str, Any]]] = None):
        self.root = Path(run_dir) / "checkpoints"
        self.cfg = ckpt_cfg
        self.engines = engines
        self.tracker = tracker
        self.extra_state = extra_state or (lambda: {})
        self.last_time = time.monotonic()
        self.last_step = -1

    def due(self, step: int) -> bool:
        if step == self.last_step:
            return False
        by_steps = self.cfg.every_n_steps > 0 and step % self.cfg.every_n_steps == 0
        by_time = self.cfg.every_minutes > 0 and (time.monotonic() - self.last_time) >= 60 * self.cfg.every_minutes
        if by_time and dist.is_initialized() and dist.get_world_size() > 1:  # ranks must agree
            flag = torch.tensor([int(by_time)])
            dist.broadcast(flag, 0)
            by_time = bool(flag.item())
        return by_steps or by_time

    def maybe_save(self, step: int, loop_state: Dict[str, Any]) -> Optional[Path]:
        return self.save(step, loop_state) if self.due(step) else None

    def save(self, step: int, loop_state: Dict[str, Any]) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{PREFIX}{step:08d}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(tmp / name), tag="state", save_latest=False)
        torch.save(rng_state(), tmp / f"rng-rank{_rank()}.pt")
        extra = self.extra_state()  # may be a collective (EMA gather): every rank calls it
        barrier()
        if _rank() == 0:
            tensors = {k: v.detach().cpu().contiguous() for k, v in extra.items() if isinstance(v, torch.Tensor)}
            extra = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
            if tensors:
                from safetensors.torch import save_file

                save_file(tensors, str(tmp / "extra.safetensors"))
            meta = {"step": step, "loop": loop_state, "extra": extra, "complete": True,
                    "run_id": getattr(self.tracker, "run_id", None), "time": time.time()}
            with open(tmp / "meta.json", "w") as f:
                json.dump(meta, f, default=_to_jsonable)
                f.flush()
                os.fsync(f.fileno())
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            self._prune()
            log.info("checkpoint %s", final)
        barrier()
        self.last_time, self.last_step = time.monotonic(), step
        return final

    def _prune(self) -> None:
        keep = max(self.cfg.keep_last, 1)
        done = sorted((p for p in self.root.iterdir() if is_complete(p)), key=lambda p: p.name)
        for old in done[:-keep]:
            shutil.rmtree(old, ignore_errors=True)

    def load(self, path: Path) -> Dict[str, Any]:
        """Restore engines and this rank's RNG from ``path``; returns meta.json's content."""
        for name, engine in self.engines.items():
            loaded, _ = engine.load_checkpoint(str(path / name), tag="state")
            if loaded is None:
                raise RuntimeError(f"checkpoint {path}: could not load the '{name}' engine state")
        rng = path / f"rng-rank{_rank()}.pt"
        if rng.exists():
            set_rng_state(torch.load(rng, weights_only=False))  # our own file, written above
        meta = json.loads((path / "meta.json").read_text())
        if (path / "extra.safetensors").exists():
            from safetensors.torch import load_file

            meta["extra"].update(load_file(str(path / "extra.safetensors")))
        self.last_step = meta["step"]
        log.info("resumed from %s (step %d)", path, meta["step"])
        return meta


def _to_jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")
