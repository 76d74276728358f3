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

NOISY_LOGGERS = ("DeepSpeed", "deepspeed", "compilers", "torch.distributed", "datasets", "transformers", "peft",
                 "urllib3", "filelock", "huggingface_hub", "wandb")


def quiet_libraries(accelerator: str = "") -> None:
    """Library chatter off (warnings and errors still show): W&B banners, datasets/transformers
    progress bars, DeepSpeed's accelerator and compiler lines."""
    os.environ.setdefault("WANDB_SILENT", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # no "setting accelerator to CPU" warning per process
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
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
