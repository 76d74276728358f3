"""Resumable checkpoints, written atomically.

A checkpoint is a directory ``<run_dir>/checkpoints/step-NNNNNNNN`` holding, for every trained
DeepSpeed engine, DeepSpeed's own state (module, optimizer, scheduler, ZeRO shards), each rank's
RNG states, and ``meta.json`` (global step, loop position, tracker run id, stage extras such as
the KL controller) and ``extra.safetensors`` (tensors such as the EMA weights). It is written under a temporary name and renamed only
when every rank has finished, so a kill during the write never leaves a directory that looks
complete; ``resume=auto`` only considers directories whose ``meta.json`` says ``complete``.

Loading never executes code: RNG states are JSON, extra tensors safetensors, and every DeepSpeed
state file is opened with torch's weights-only unpickler (allow-listing the few DeepSpeed types
its optimizer states hold) before DeepSpeed reads it; a file that needs anything else is refused,
naming it. ``checkpoint.trust=true`` is the explicit opt-in for a foreign checkpoint.
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


class UnsafeCheckpoint(RuntimeError):
    """A checkpoint file that would need code execution (or anything but plain data) to load."""


def rng_state() -> Dict[str, Any]:
    """Every RNG state as plain JSON values (no pickle)."""
    version, keys, gauss = random.getstate()
    name, np_keys, pos, has_gauss, cached = np.random.get_state()
    cuda = [t.tolist() for t in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else None
    return {"python": [version, list(keys), gauss], "numpy": [name, np_keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state().tolist(), "cuda": cuda}


def set_rng_state(state: Dict[str, Any]) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    name, np_keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(np_keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(t, dtype=torch.uint8) for t in state["cuda"]])


def _deepspeed_safe_globals() -> list:
    """The non-tensor types DeepSpeed's state files hold (loss scaler, ZeRO stage, fragment map)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _np_reconstruct():
    try:
        return np._core.multiarray._reconstruct
    except AttributeError:  # numpy < 2
        return np.core.multiarray._reconstruct


def safe_load(path: Path, allow: Optional[list] = None, **kw) -> Any:
    """``torch.load`` with the weights-only unpickler; anything else is refused naming the file."""
    import pickle

    try:
        with torch.serialization.safe_globals(allow or []):
            return torch.load(path, map_location="cpu", weights_only=True, **kw)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpoint(
            f"{path}: refused to load, the file needs more than tensors and plain data to unpickle "
            f"({str(e).splitlines()[0][:300]}). Only load checkpoints this project wrote; set "
            "checkpoint.trust=true to load a foreign checkpoint you trust.") from None


def verify_loadable(path: Path) -> None:
    """Open every DeepSpeed state file under ``path`` with the weights-only unpickler (memory-mapped,
    so no tensor is read), so that DeepSpeed's own ``torch.load`` never meets code."""
    allow = _deepspeed_safe_globals()
    for f in sorted(Path(path).rglob("*")):
        if not (f.is_file() and f.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt")):
            continue
        try:
            safe_load(f, allow, mmap=True)
        except UnsafeCheckpoint:
            raise
        except Exception:  # not a zip archive (mmap needs one): load it whole
            try:
                safe_load(f, allow)
            except UnsafeCheckpoint:
                raise
            except Exception as e:
                raise ValueError(f"{f}: unreadable checkpoint file ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


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


def check_settings(ckpt_cfg) -> None:
    """``checkpoint.*`` values that make sense, else a ValueError naming the key."""
    if ckpt_cfg.every_n_steps < 0:
        raise ValueError(f"checkpoint.every_n_steps={ckpt_cfg.every_n_steps}: must be >= 0 (0 = off)")
    if ckpt_cfg.every_minutes < 0:
        raise ValueError(f"checkpoint.every_minutes={ckpt_cfg.every_minutes}: must be >= 0 (0 = off)")
    if ckpt_cfg.keep_last < 0:
        raise ValueError(f"checkpoint.keep_last={ckpt_cfg.keep_last}: must be >= 0 (0 keeps the newest one)")


class Checkpointer:
    """Saves every ``every_n_steps`` optimizer steps and/or ``every_minutes``; keeps the last K."""

    def __init__(self, run_dir: Path, ckpt_cfg, engines: Dict[str, Any], tracker=None,
                 extra_state: Optional[Callable[[], Dict[str, Any]]] = None,
                 config: Optional[Dict[str, Any]] = None):
        check_settings(ckpt_cfg)
        self.root = Path(run_dir) / "checkpoints"
        self.config = config if config is not None else getattr(tracker, "config", None)  # the run's resolved config, kept in meta.json (resume compares against it)
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
        tmp = self.root / f".tmp-{PREFIX}{step:08d}"
        try:
            return self._save(step, loop_state)
        except (OSError, RuntimeError) as e:
            better = write_error(e, self.root)
            if better is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise better from e

    def _save(self, step: int, loop_state: Dict[str, Any]) -> Path:
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{PREFIX}{step:08d}"
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier()
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(tmp / name), tag="state", save_latest=False)
        with open(tmp / f"rng-rank{_rank()}.json", "w") as f:
            json.dump(rng_state(), f)
        extra = self.extra_state()  # may be a collective (EMA gather): every rank calls it
        barrier()
        if _rank() == 0:
            tensors = {k: v.detach().cpu().contiguous() for k, v in extra.items() if isinstance(v, torch.Tensor)}
            extra = {k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}
            if tensors:
                from safetensors.torch import save_file

                save_file(tensors, str(tmp / "extra.safetensors"))
            if self.tracker is not None:
                self.tracker.sync()
            meta = {"step": step, "loop": loop_state, "extra": extra, "complete": True,
                    "run_id": getattr(self.tracker, "run_id", None), "time": time.time(),
                    "metrics_rows": getattr(self.tracker, "rows", None), "config": self.config}
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
        """Restore engines and this rank's RNG from ``path``; returns meta.json's content.

        Nothing here can execute code from the checkpoint (see the module docstring)."""
        meta = _read_json(path / "meta.json")
        if not getattr(self.cfg, "trust", False):
            verify_loadable(path)
        for name, engine in self.engines.items():
            loaded, _ = engine.load_checkpoint(str(path / name), tag="state")
            if loaded is None:
                raise RuntimeError(f"checkpoint {path}: could not load the '{name}' engine state")
        rng = path / f"rng-rank{_rank()}.json"
        legacy = path / f"rng-rank{_rank()}.pt"  # checkpoints written before RNG states were JSON
        if rng.exists():
            try:
                set_rng_state(_read_json(rng))
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{rng}: not an RNG state this project wrote ({e})") from None
        elif legacy.exists():
            state = safe_load(legacy, [np.ndarray, np.dtype, np.dtypes.UInt32DType, _np_reconstruct()])
            random.setstate(state["python"])
            np.random.set_state(state["numpy"])
            torch.set_rng_state(state["torch"])
        if (path / "extra.safetensors").exists():
            from safetensors.torch import load_file

            meta["extra"].update(load_file(str(path / "extra.safetensors")))
        self.last_step = meta["step"]
        if self.tracker is not None:  # rows logged after this checkpoint are redone (final eval included)
            self.tracker.truncate(meta["step"], meta.get("metrics_rows"))
        log.info("resumed from %s (step %d)", path, meta["step"])
        return meta


def write_error(err: BaseException, where: Path, min_free: int = 64 * 2**20) -> Optional[OSError]:
    """A full disk surfaces from torch's zip writer as "unexpected pos" / "file write failed":
    an ``OSError(ENOSPC)`` that says so and names the directory (None when the disk is not full)."""
    import errno

    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None
    enospc = isinstance(err, OSError) and err.errno == errno.ENOSPC
    if not enospc and free >= min_free:
        return None
    return OSError(errno.ENOSPC, f"No space left on device while writing a checkpoint in {where} "
                                 f"({free / 2**20:.1f} MiB free; {type(err).__name__}: {str(err).splitlines()[0][:200]}). "
                                 "The previous checkpoint is kept; free space or lower checkpoint.keep_last, "
                                 "then resume with resume=auto")


def _read_json(path: Path) -> Dict[str, Any]:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _to_jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x)}")
