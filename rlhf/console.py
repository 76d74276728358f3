"""What a run prints: library log levels and progress bars set once, so the console shows the
project's own lines (stage start/end, one progress bar per loop, the final table) and nothing else.

``quiet_libraries()`` runs at the entry points (run.py, rank workers) before any library logs;
``op_build_notice()`` says once, before DeepSpeed compiles its CPU ops on a machine's first run,
why the next minute is silent.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

# the project's own detail loggers: their INFO lines go to the run's log file (run.log), not the console
FILE_ONLY_LOGGERS = ("rlhf.data",)

NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "compilers", "torch.distributed", "datasets", "transformers", "peft",
                 "urllib3", "filelock", "huggingface_hub", "wandb")


def quiet_libraries(accelerator: str = "") -> None:
    """Library chatter off (warnings and errors still show): W&B banners, datasets/transformers
    progress bars, DeepSpeed's accelerator and compiler lines; the data layer's INFO lines (sources,
    blend shares, tokenisation) go to run.log only."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "setting accelerator to CPU" warning per process
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:  # the console only: a FileHandler keeps every line
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) \
                and not any(isinstance(f, _FileOnly) for f in handler.filters):
            handler.addFilter(_FileOnly())
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - a dependency
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - a dependency
        pass


class _FileOnly(logging.Filter):
    """Drops INFO lines of FILE_ONLY_LOGGERS (warnings and errors pass)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not record.name.startswith(FILE_ONLY_LOGGERS)


def _extensions_dir() -> Path:
    import torch

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    tag = f"py{__import__('sys').version_info.major}{__import__('sys').version_info.minor}_cpu"
    return Path(root) / tag if torch.cuda.is_available() is False else Path(root)


def op_build_notice(op: str = "deepspeed_shm_comm") -> None:
    """One line before DeepSpeed's first build of a CPU op (a silent minute otherwise)."""
    try:
        if not (_extensions_dir() / op).exists():
            log.info("DeepSpeed compiles its CPU op %s on this machine's first run (about a minute, once)", op)
    except Exception:  # a notice only
        pass


@contextlib.contextmanager
def swallow_stdout():
    """Drop what a library prints to stdout inside the block (DeepSpeed's 'op built successfully')."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield
