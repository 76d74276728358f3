"""Run tracking: metrics.jsonl and summary.json always, W&B when enabled, a progress bar.

Only rank 0 writes. W&B runs offline unless the user is logged in (and ``WANDB_MODE`` does not
say offline/disabled), so it never blocks on a missing network; an offline run can be uploaded
later with ``wandb sync <run_dir>/wandb``. ``metrics.jsonl`` is fsynced at every checkpoint, and a
torn last line (a kill mid-write) is dropped when the file is reopened.
"""
from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from rlhf.config import LoggerConfig

log = logging.getLogger(__name__)


def atomic_write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=_jsonable)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, Path):
        return str(x)
    return str(x)


def _clean(v):
    v = _jsonable(v) if isinstance(v, torch.Tensor) else v
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


def wandb_mode(requested: str) -> str:
    """auto: online when an API key is configured and ``WANDB_MODE`` is not offline/disabled;
    offline otherwise. online/offline/disabled are taken as asked."""
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        return "offline"
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def _read_rows(path: Path, rewrite: bool = False) -> list:
    """The rows of a metrics.jsonl; a torn (unparsable) last line is dropped, and with ``rewrite``
    removed from the file, so appending continues on a clean line."""
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    rows = []
    for i, ln in enumerate(lines):
        try:
            rows.append(json.loads(ln))
        except ValueError:
            if i != len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON (only a torn last line is skipped)") from None
            log.warning("%s: dropping a torn last line (%d bytes)", path, len(ln))
    if rewrite and (len(rows) != len(lines) or (text and not text.endswith("\n"))):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def peak_memory() -> Dict[str, float]:
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_host_mem_gb": rss_kb / 2**20}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


class Tracker:
    """Writes ``metrics.jsonl`` (one JSON object per log call) and ``summary.json`` in run_dir."""

    def __init__(self, run_dir: str | Path, logger: LoggerConfig, config: Dict[str, Any],
                 rank: int = 0, name: Optional[str] = None, resume_id: Optional[str] = None):
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.cfg = logger
        self.last: Dict[str, Any] = {}
        self.t0 = time.perf_counter()
        self._wandb = None
        self.run_id: Optional[str] = resume_id
        self.config = config  # checkpoints keep it: a resume compares its settings against it
        if rank != 0:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.rows = len(_read_rows(self.run_dir / "metrics.jsonl", rewrite=True))
        self._file = open(self.run_dir / "metrics.jsonl", "a")
        if logger.wandb and logger.mode != "disabled":
            self._start_wandb(config, name, resume_id)

    def _start_wandb(self, config, name, resume_id):
        try:
            import wandb
        except ImportError:  # pragma: no cover - wandb is a dependency
            log.warning("wandb is not installed; logging to local files only")
            return
        mode = wandb_mode(self.cfg.mode)
        self._wandb = wandb.init(
            project=self.cfg.project, entity=self.cfg.entity, group=self.cfg.group, name=name,
            config=config, dir=str(self.run_dir), mode=mode, id=resume_id,
            resume="allow" if resume_id else None, reinit="finish_previous",
        )
        self.run_id = self._wandb.id
        log.info("W&B run %s (%s)", self.run_id, mode)

    def truncate(self, step: int, rows: Optional[int] = None) -> None:
        """Drop metric rows logged after ``step`` or, when ``rows`` is given (the count a checkpoint
        recorded), every row after the first ``rows``: a resumed run redoes them. ``last`` is
        restored from the rows kept, so final metrics of a run resumed at its end are intact."""
        if self.rank != 0:
            return
        path = self.run_dir / "metrics.jsonl"
        self._file.close()
        kept = [r for r in _read_rows(path) if r.get("step", 0) <= step]
        if rows is not None:
            kept = kept[:rows]
        path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.rows = len(kept)
        self.last = {k: v for r in kept for k, v in r.items() if k not in ("step", "time_s")}
        self._file = open(path, "a")

    def sync(self) -> None:
        """Flush metrics.jsonl to disk (called at every checkpoint)."""
        if self.rank == 0 and not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())

    def log(self, metrics: Dict[str, Any], step: int) -> None:
        metrics = {k: _clean(v) for k, v in metrics.items()}
        self.last.update(metrics)
        if self.rank != 0:
            return
        row = {"step": step, "time_s": round(time.perf_counter() - self.t0, 3), **metrics}
        self._file.write(json.dumps(row, default=_jsonable) + "\n")
        self._file.flush()
        self.rows += 1
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def summary(self, metrics: Dict[str, Any], name: str = "summary.json") -> Dict[str, Any]:
        out = {k: _clean(v) for k, v in metrics.items()}
        out.setdefault("wall_time_s", time.perf_counter() - self.t0)
        out.update(peak_memory())
        if self.rank == 0:
            atomic_write_json(self.run_dir / name, out)
            if self._wandb is not None:
                self._wandb.summary.update({k: v for k, v in out.items() if isinstance(v, (int, float, str))})
        return out

    def progress(self, total: int, desc: str, initial: int = 0):
        if self.rank != 0 or not self.cfg.progress:
            return _NoBar()
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, file=sys.stderr,
                    mininterval=1.0)

    def close(self) -> None:
        if self.rank != 0:
            return
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None
