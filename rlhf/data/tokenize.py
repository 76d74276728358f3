"""Tokenise blended rows into memory-mapped Arrow datasets, cached by ``datasets``.

Each ``tokenize_*`` writes ``<cache_dir>/tokenized/<kind>-<key>.arrow`` through
``Dataset.map(cache_file_name=...)`` plus a ``.stats.json`` beside it. The key hashes the
tokenizer identity (its full serialised vocabulary/merges/normalisation and special ids), the
length limits and options, and the input dataset's fingerprint; a later call with the same key
memory-maps the file instead of tokenising again, ``reload=True`` rebuilds it.

Every function returns ``(dataset, stats)`` with ``stats`` at least
``{"kept": int, "dropped": int, "cached": bool, "cache_file": str}``.

Texts: ``prompt + answer`` is tokenised as one string (the tokenizer's own special tokens
included, e.g. a family's bos) and the tokenizer's eos is appended; ``prompt_len`` is the number
of leading tokens that belong to the prompt, found from the fast tokenizer's offsets (slow
tokenizers: prompt and answer are tokenised separately).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Callable

logger = logging.getLogger(__name__)

_VERSION = 1  # bump when the tokenised layout changes: invalidates every cache
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------
# identity and caching


def tokenizer_identity(tokenizer) -> str:
    """A hash of everything that decides the token ids this module produces."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if getattr(tokenizer, "is_fast", False) and backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(
        json.dumps(
            [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.all_special_tokens],
            default=str,
        ).encode()
    )
    return h.hexdigest()


def _eos_id(tokenizer) -> int:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no eos token; set it (FAMILIES)")
    return int(eos)


def _write_json_atomic(path: Path, obj: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _cached_map(ds, kind: str, tokenizer, options: dict, cache_dir, reload: bool, build: Callable, features):
    """Run ``build`` (a batched map function that may drop rows and fills a counter dict) over
    ``ds`` into the cache file for (kind, tokenizer, options, ds fingerprint); reuse it if present."""
    from datasets import Dataset

    key_src = {
        "v": _VERSION,
        "kind": kind,
        "tokenizer": tokenizer_identity(tokenizer),
        "options": options,
        "data": ds._fingerprint,
    }
    key = hashlib.sha256(json.dumps(key_src, sort_keys=True).encode()).hexdigest()[:20]
    out_dir = Path(cache_dir) / "tokenized"
    out_dir.mkdir(parents=True, exist_ok=True)
    arrow = out_dir / f"{kind}-{key}.arrow"
    stats_file = out_dir / f"{kind}-{key}.stats.json"
    if not reload and arrow.exists() and stats_file.exists():
        stats = json.loads(stats_file.read_text())
        stats.update(cached=True, cache_file=str(arrow))
        return Dataset.from_file(str(arrow)), stats

    counts: dict[str, int] = {}
    out = ds.map(
        build,
        batched=True,
        remove_columns=ds.column_names,
        features=features,
        fn_kwargs={"counts": counts},
        cache_file_name=str(arrow),
        load_from_cache_file=False,
        new_fingerprint=key,
        desc=f"tokenizing {kind}",
    )
    stats = {"kept": len(out), **counts}
    stats.setdefault("dropped", 0)
    _write_json_atomic(stats_file, stats)
    stats.update(cached=False, cache_file=str(arrow))
    dropped = {k: v for k, v in counts.items() if k != "dropped" and v}
    logger.info("tokenized %s: %d kept, %d dropped %s", kind, stats["kept"], stats["dropped"], dropped or "")
    return out, stats


FILTERS = {  # why a row is dropped -> the setting that decides it
    "too_long": "the prompt alone is longer than {key}={limit} tokens",
    "identical": "chosen and rejected are identical after tokenisation and truncation to {key}={limit}",
    "empty": "the prompt tokenises to nothing",
}


def require_rows(ds, stats: dict, kind: str, key: str, limit: int):
    """``(ds, stats)`` unchanged, or a ``ValueError`` naming the filter when no row survived."""
    n = stats.get("dropped", 0)
    if len(ds) > 0 or n == 0:  # kept rows, or none to start with (the loop names an empty train split)
        return ds, stats
    why = "; ".join(f"{stats[r]} because {FILTERS[r].format(key=key, limit=limit)}" for r in FILTERS if stats.get(r))
    raise ValueError(f"tokenizing {kind}: all {n} rows were dropped ({why}); raise {key} (now {limit}) or use "
                     "shorter data")


def _ids_features(*int_columns: str, text_columns: tuple[str, ...] = ()):
    from datasets import Features, List, Value

    feats = {c: List(Value("int32")) for c in int_columns}
    feats.update({c: Value("string") for c in text_columns})
    if "prompt_len" in feats:
        feats["prompt_len"] = Value("int32")
    return Features(feats)


def _bump(counts: dict, key: str, n: int = 1) -> None:
    counts[key] = counts.get(key, 0) + n


# ----------------------------------------------------------------------------------------------
# encoding


def encode_with_prompt(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """(ids of prompt + answer + eos, number of leading prompt tokens)."""
    eos = _eos_id(tokenizer)
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(prompt + answer, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        cut = len(prompt)
        prompt_len = 0
        for start, end in enc["offset_mapping"]:
            if end > cut or (start == end and start > 0):  # first answer token, or a trailing special
                break
            prompt_len += 1
    else:
        p_ids = list(tokenizer(prompt)["input_ids"])
        if p_ids and p_ids[-1] == eos:  # a tokenizer that appends eos itself
            p_ids = p_ids[:-1]
        ids = p_ids + list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        prompt_len = len(p_ids)
    if not ids or ids[-1] != eos:
        ids.append(eos)
    return ids, prompt_len


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Ids of a prompt for generation (a trailing eos the tokenizer may add is removed)."""
    ids = list(tokenizer(prompt)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and not prompt.endswith(str(tokenizer.eos_token)):
        ids = ids[:-1]
    return ids


# ----------------------------------------------------------------------------------------------
# the four tokenisers


def tokenize_sft(ds, tokenizer, max_seq_len: int, mask_prompt: bool, cache_dir, reload: bool = False,
                 key: str = "<stage>.max_seq_len"):
    """Rows {"prompt", "answer"} (or "chosen") -> columns ``input_ids``, ``labels``, ``prompt_len``.

    Truncated to ``max_seq_len``; ``labels`` equal ``input_ids`` with the prompt tokens set to
    -100 when ``mask_prompt``. Rows whose prompt alone has >= ``max_seq_len`` tokens are dropped
    (``stats["too_long"]``).
    """
    answer_col = "answer" if "answer" in ds.column_names else "chosen"

    def build(batch, counts):
        out = {"input_ids": [], "labels": [], "prompt_len": []}
        for prompt, answer in zip(batch["prompt"], batch[answer_col]):
            ids, pl = encode_with_prompt(tokenizer, prompt, answer)
            if pl >= max_seq_len:
                _bump(counts, "dropped")
                _bump(counts, "too_long")
                continue
            if len(ids) > max_seq_len:
                _bump(counts, "truncated")
            ids = ids[:max_seq_len]
            labels = list(ids)
            if mask_prompt:
                labels[:pl] = [IGNORE_INDEX] * pl
            out["input_ids"].append(ids)
            out["labels"].append(labels)
            out["prompt_len"].append(pl)
        return out

    opts = {"max_seq_len": max_seq_len, "mask_prompt": bool(mask_prompt), "answer": answer_col}
    feats = _ids_features("input_ids", "labels", "prompt_len")
    return require_rows(*_cached_map(ds, "sft", tokenizer, opts, cache_dir, reload, build, feats), "sft", key, max_seq_len)


def tokenize_pairs(ds, tokenizer, max_seq_len: int, cache_dir, reload: bool = False,
                   key: str = "<stage>.max_seq_len"):
    """Rows {"prompt", "chosen", "rejected"} -> ``chosen_input_ids``, ``rejected_input_ids``,
    ``prompt_len`` (prompt tokens shared by both). Both truncated to ``max_seq_len``. Dropped:
    prompts of >= ``max_seq_len`` tokens (``too_long``) and pairs identical after tokenisation
    and truncation (``identical``)."""

    def build(batch, counts):
        out = {"chosen_input_ids": [], "rejected_input_ids": [], "prompt_len": []}
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            c_ids, c_pl = encode_with_prompt(tokenizer, prompt, chosen)
            r_ids, r_pl = encode_with_prompt(tokenizer, prompt, rejected)
            pl = min(c_pl, r_pl)
            c_ids, r_ids = c_ids[:max_seq_len], r_ids[:max_seq_len]
            reason = "too_long" if pl >= max_seq_len else "identical" if c_ids == r_ids else None
            if reason:
                _bump(counts, "dropped")
                _bump(counts, reason)
                continue
            out["chosen_input_ids"].append(c_ids)
            out["rejected_input_ids"].append(r_ids)
            out["prompt_len"].append(pl)
        return out

    feats = _ids_features("chosen_input_ids", "rejected_input_ids", "prompt_len")
    return require_rows(*_cached_map(ds, "pairs", tokenizer, {"max_seq_len": max_seq_len}, cache_dir, reload, build,
                                     feats), "pairs", key, max_seq_len)


def tokenize_prompts(ds, tokenizer, max_prompt_len: int, cache_dir, reload: bool = False,
                     key: str = "ppo.max_prompt_len"):
    """Rows with a "prompt" -> ``input_ids`` of the prompt (for generation) and the ``prompt``
    text. Prompts longer than ``max_prompt_len`` tokens are dropped (``too_long``)."""

    def build(batch, counts):
        out = {"input_ids": [], "prompt": []}
        for prompt in batch["prompt"]:
            ids = encode_prompt(tokenizer, prompt)
            if len(ids) > max_prompt_len or not ids:
                _bump(counts, "dropped")
                _bump(counts, "too_long" if ids else "empty")
                continue
            out["input_ids"].append(ids)
            out["prompt"].append(prompt)
        return out

    feats = _ids_features("input_ids", text_columns=("prompt",))
    return require_rows(*_cached_map(ds, "prompts", tokenizer, {"max_prompt_len": max_prompt_len}, cache_dir, reload,
                                     build, feats), "prompts", key, max_prompt_len)


def tokenize_text(ds, tokenizer, max_seq_len: int, cache_dir, reload: bool = False):
    """Plain text {"text"} -> ``input_ids``, ``labels`` (= input_ids) for pretraining/PTX.

    Each text gets eos appended; the texts of a map batch (1000) are concatenated and cut into
    blocks of ``max_seq_len`` tokens (the last, shorter block is kept if it has >= 2 tokens),
    DeepSpeed-Chat's grouping. Blank texts are dropped (``dropped``).
    """
    eos = _eos_id(tokenizer)

    def build(batch, counts):
        stream: list[int] = []
        for text in batch["text"]:
            if not isinstance(text, str) or not text.strip():
                _bump(counts, "dropped")
                continue
            ids = list(tokenizer(text)["input_ids"])
            stream.extend(ids if ids and ids[-1] == eos else ids + [eos])
        blocks = [stream[i: i + max_seq_len] for i in range(0, len(stream), max_seq_len)]
        blocks = [b for b in blocks if len(b) >= 2]
        _bump(counts, "tokens", sum(len(b) for b in blocks))
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    feats = _ids_features("input_ids", "labels")
    return _cached_map(ds, "text", tokenizer, {"max_seq_len": max_seq_len}, cache_dir, reload, build, feats)
