"""Blend the configured sources into one (train, eval) dataset per pipeline step.

DeepSpeed-Chat's scheme: every source's train and eval rows are cut into disjoint shares by
``data_split`` (``"2,4,4"`` -> 20/40/40% for steps 1/2/3) with a seeded permutation, each step
keeps its share of every source (scaled by the source's ``weight``), and the shares are
concatenated and shuffled with the seed. Step 1 additionally gets every ``sft_only`` source
whole. Step 1 rows are ``{"prompt", "answer"}`` (pair rows contribute their chosen answer);
steps 2 and 3 rows are ``{"prompt", "chosen", "rejected"}``.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from rlhf.data.sources import empty_rows, get_source, load_source_with_stats

logger = logging.getLogger(__name__)

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
SFT_COLUMNS = ("prompt", "answer")


def parse_split(data_split: str) -> list[float]:
    """``"2,4,4"`` -> ``[0.2, 0.4, 0.4]`` (three non-negative shares, normalised)."""
    try:
        parts = [float(x) for x in str(data_split).split(",")]
    except ValueError:
        parts = []
    if len(parts) != 3 or any(x < 0 for x in parts) or sum(parts) <= 0:
        raise ValueError(f"data_split must be three non-negative numbers with a positive sum, e.g. '2,4,4'; got {data_split!r}")
    total = sum(parts)
    return [x / total for x in parts]


def split_indices(n: int, data_split: str, seed: int) -> list[np.ndarray]:
    """Disjoint index shares of ``range(n)`` for steps 1/2/3, covering it exactly.

    A seeded permutation cut at the rounded cumulative shares: the same (n, split, seed) always
    gives the same shares.
    """
    shares = parse_split(data_split)
    perm = np.random.RandomState(seed).permutation(n)
    bounds = [0] + [int(round(c * n)) for c in np.cumsum(shares)[:-1]] + [n]
    return [perm[bounds[i]: bounds[i + 1]] for i in range(3)]


def weighted(indices: np.ndarray, weight: float) -> np.ndarray:
    """Keep ``round(len * weight)`` of ``indices``: a prefix for weight <= 1, cycled above 1."""
    if weight < 0:
        raise ValueError(f"source weight must be >= 0, got {weight}")
    k = int(round(len(indices) * weight))
    if k <= len(indices):
        return indices[:k]
    return np.resize(indices, k)


def _as_sft(ds):
    """Pair rows -> {"prompt", "answer"=chosen}."""
    if "answer" in ds.column_names:
        return ds
    return ds.remove_columns("rejected").rename_column("chosen", "answer")


def _concat_shuffle(parts: list, columns: tuple[str, ...], seed: int):
    from datasets import concatenate_datasets

    parts = [p.select_columns(list(columns)) for p in parts if len(p)]
    if not parts:
        return empty_rows(columns)
    ds = parts[0] if len(parts) == 1 else concatenate_datasets(parts)
    return ds.shuffle(seed=seed)


def build_step_data(data_cfg, step: int, cache_dir, seed: int, stats: dict | None = None):
    """(train, eval) ``datasets.Dataset`` for pipeline step 1, 2 or 3 (see the module doc).

    ``data_cfg`` is a :class:`rlhf.config.DataConfig`; ``cache_dir`` holds the raw and mapped
    source caches and generated demo data; ``seed`` drives the data_split permutation, the 9:1
    eval cuts and the final shuffle. Logs, per source, the rows kept and skipped as bad; a
    ``stats`` dict given is filled with ``bad_rows``: the train rows the sources skipped as bad.
    """
    if step not in (1, 2, 3):
        raise ValueError(f"step must be 1, 2 or 3, got {step!r}")
    parse_split(data_cfg.data_split)  # fail early on a malformed split
    cache_dir = Path(cache_dir)
    sources = list(data_cfg.sources or [])
    sft_only = list(data_cfg.sft_only or []) if step == 1 else []
    if not sources and not sft_only:
        raise ValueError(f"data config {getattr(data_cfg, 'name', '?')!r} has no sources for step {step}")

    train_parts, eval_parts = [], []
    bad_rows = 0
    for i, src_cfg in enumerate(sources):
        source = get_source(src_cfg.name)
        if source.kind != "pairs":
            raise ValueError(
                f"source {source.name!r} holds single answers, not pairs: list it under data.sft_only (step 1 only)"
            )
        train, eval_, stats_ = load_source_with_stats(src_cfg, cache_dir, seed=seed, demo_size=data_cfg.demo_size,
                                                     key=f"data.sources.{i}.path")
        t = train.select(weighted(split_indices(len(train), data_cfg.data_split, seed)[step - 1], src_cfg.weight))
        e = eval_.select(weighted(split_indices(len(eval_), data_cfg.data_split, seed)[step - 1], src_cfg.weight))
        if step == 1:
            t, e = _as_sft(t), _as_sft(e)
        train_parts.append(t)
        eval_parts.append(e)
        bad_rows += stats_["train_bad"]
        logger.info(
            "step %d: source %s keeps %d train / %d eval rows (share %d of %s, weight %g); skipped as bad: %d train, %d eval",
            step, source.name, len(t), len(e), step, data_cfg.data_split, src_cfg.weight,
            stats_["train_bad"], stats_["eval_bad"],
        )
    for i, src_cfg in enumerate(sft_only):
        source = get_source(src_cfg.name)
        train, eval_, stats_ = load_source_with_stats(src_cfg, cache_dir, seed=seed, demo_size=data_cfg.demo_size,
                                                     key=f"data.sft_only.{i}.path")
        t = _as_sft(train.select(weighted(np.arange(len(train)), src_cfg.weight)))
        e = _as_sft(eval_.select(weighted(np.arange(len(eval_)), src_cfg.weight)))
        train_parts.append(t)
        eval_parts.append(e)
        bad_rows += stats_["train_bad"]
        logger.info(
            "step 1: sft-only source %s keeps %d train / %d eval rows (whole, weight %g); skipped as bad: %d train, %d eval",
            source.name, len(t), len(e), src_cfg.weight, stats_["train_bad"], stats_["eval_bad"],
        )

    if stats is not None:
        stats["bad_rows"] = bad_rows
    columns = SFT_COLUMNS if step == 1 else PAIR_COLUMNS
    train_ds = _concat_shuffle(train_parts, columns, seed)
    eval_ds = _concat_shuffle(eval_parts, columns, seed)
    logger.info("step %d data: %d train rows, %d eval rows", step, len(train_ds), len(eval_ds))
    return train_ds, eval_ds


def load_unsupervised(path, cache_dir, *, demo_size: int = 2000):
    """Plain text for pretraining / PTX as a ``datasets.Dataset`` with one column ``text``.

    ``path``: a text file (one text per line), a directory of ``.txt`` files, ``"demo"`` (the
    demo's generated ``pretrain.txt`` under ``<cache_dir>/demo``), or a hub id with a ``text``
    column (its train split). Blank lines are dropped.
    """
    from datasets import load_dataset

    if path is None:
        raise ValueError("no unsupervised data configured (data.unsupervised)")
    cache_dir = Path(cache_dir)
    hf_cache = str(cache_dir / "hf")
    if str(path) == "demo":
        from rlhf.data.demo import default_root, make_demo

        path = make_demo(default_root(cache_dir, demo_size), size=demo_size)["pretrain"]
    p = Path(path).expanduser()
    if p.is_file() or p.is_dir():
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise ValueError(f"unsupervised data {str(path)!r}: no .txt files")
        ds = load_dataset("text", data_files=[str(f) for f in files], split="train", cache_dir=hf_cache)
    elif str(path).startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"unsupervised data {str(path)!r} does not exist")
    else:
        ds = load_dataset(str(path), split="train", cache_dir=hf_cache)
        if "text" not in ds.column_names:
            raise ValueError(f"unsupervised data {str(path)!r} has no 'text' column (columns: {ds.column_names})")
        ds = ds.select_columns(["text"])
    n = len(ds)
    ds = ds.filter(lambda t: isinstance(t, str) and bool(t.strip()), input_columns="text", desc="dropping blank lines")
    logger.info("unsupervised data %s: %d texts (%d blank dropped)", path, len(ds), n - len(ds))
    return ds
