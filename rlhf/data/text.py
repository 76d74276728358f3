"""Raw text for ``stage=pretrain``: load documents, split off a held-out share, pack into blocks.

Sources (``pretrain.data``): a ``.txt`` file (one document per non-empty line), a ``.jsonl`` /
``.json`` file (one document per record, in ``pretrain.text_field``), a directory (a
``datasets.save_to_disk`` directory, or every ``.txt``/``.jsonl``/``.json`` file in it) or a hub
dataset id (its ``train`` split). Documents are tokenised without special tokens, each followed by
EOS, concatenated and cut into ``block_size`` blocks: no padding anywhere; the tail shorter than a
block is dropped.
"""
from __future__ import annotations

from itertools import chain
from pathlib import Path
from typing import Dict, List, Tuple

import torch

TEXT_SUFFIXES = (".txt", ".jsonl", ".json")


def _from_files(files: List[Path], text_field: str):
    import datasets

    docs: List[str] = []
    for f in files:
        if f.suffix == ".txt":
            docs += [ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()]
            continue
        ds = datasets.load_dataset("json", data_files=str(f), split="train")
        if text_field not in ds.column_names:
            raise KeyError(f"pretrain.text_field='{text_field}' is not a field of {f} (fields: {', '.join(ds.column_names)})")
        docs += [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    return datasets.Dataset.from_dict({"text": docs})


def load_documents(source: str, text_field: str = "text"):
    """A ``datasets.Dataset`` with one column ``text``, one row per document."""
    import datasets

    p = Path(source)
    if p.is_file():
        if p.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"pretrain.data={source}: a file must be .txt, .jsonl or .json")
        return _from_files([p], text_field)
    if p.is_dir():
        if (p / "dataset_info.json").exists() or (p / "dataset_dict.json").exists():
            ds = datasets.load_from_disk(str(p))
            ds = ds["train"] if isinstance(ds, datasets.DatasetDict) else ds
        else:
            files = sorted(f for f in p.rglob("*") if f.suffix in TEXT_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"pretrain.data={source}: no .txt/.jsonl/.json files in the directory")
            return _from_files(files, text_field)
    else:
        ds = datasets.load_dataset(source, split="train")  # a hub id
    if text_field not in ds.column_names:
        raise KeyError(f"pretrain.text_field='{text_field}' is not a column of {source} "
                       f"(columns: {', '.join(ds.column_names)})")
    return ds.select_columns([text_field]).rename_column(text_field, "text") if text_field != "text" else ds.select_columns(["text"])


def split_documents(docs, eval_share: float, seed: int):
    """(train, held-out) documents: a seeded ``eval_share`` of the documents, at least one."""
    if not 0.0 < eval_share < 1.0:
        raise ValueError(f"pretrain.eval_share must be in (0, 1), got {eval_share}")
    if len(docs) < 2:
        raise ValueError(f"pretrain.data has {len(docs)} document(s): at least 2 are needed (train and held-out)")
    n_eval = max(1, int(round(len(docs) * eval_share)))
    parts = docs.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return parts["train"], parts["test"]


def pack(docs, tokenizer, block_size: int) -> Tuple["datasets.Dataset", Dict[str, int]]:  # noqa: F821
    """Tokenise, join with EOS, cut into ``block_size`` blocks. Returns (dataset of
    ``input_ids`` blocks, stats: documents, tokens, blocks, dropped tail tokens)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token: pretrain joins documents with EOS")
    ids = docs.map(lambda b: {"ids": [x + [eos] for x in tokenizer(b["text"], add_special_tokens=False)["input_ids"]]},
                   batched=True, remove_columns=docs.column_names)
    rows = list(ids["ids"])
    n_tokens = sum(len(x) for x in rows)
    flat = list(chain.from_iterable(rows))
    n = len(flat) // block_size * block_size
    if n == 0:
        raise ValueError(f"pretrain.block_size={block_size} is more than the {len(flat)} tokens of the data: "
                         "lower block_size or add text")
    import datasets

    blocks = datasets.Dataset.from_dict({"input_ids": [flat[i:i + block_size] for i in range(0, n, block_size)]})
    return blocks, {"documents": len(docs), "tokens": n_tokens, "blocks": len(blocks), "dropped_tokens": len(flat) - n}


class PackedCollator:
    """Full blocks -> input_ids, attention_mask (all ones: no padding), labels (= input_ids)."""

    def __call__(self, rows: List[dict]) -> Dict[str, torch.Tensor]:
        ids = torch.tensor([r["input_ids"] for r in rows], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
