"""Batch collators: pad with the tokenizer's pad id on the tokenizer's padding side.

The pad id and padding side come from the model family (``rlhf.models.families``) through the
tokenizer; nothing is guessed here. Prompts for generation are always LEFT padded, so every
prompt ends at the same position and generation continues right after it.
"""
from __future__ import annotations

import operator
from typing import Sequence

import torch

IGNORE_INDEX = -100


def _check(pad_id, padding_side: str = "right") -> int:
    try:
        if isinstance(pad_id, bool):
            raise TypeError
        pad_id = operator.index(pad_id)
    except TypeError:
        raise ValueError(f"pad_id must be an int (the tokenizer's pad token id; set it in FAMILIES), got {pad_id!r}") from None
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    return pad_id


def pad(seqs: Sequence, value: int, side: str) -> torch.Tensor:
    """Stack 1-D int sequences into [N, max_len], padded with ``value`` on ``side``."""
    seqs = [torch.as_tensor(s, dtype=torch.long).reshape(-1) for s in seqs]
    width = max((len(s) for s in seqs), default=0)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            if side == "right":
                out[i, : len(s)] = s
            else:
                out[i, width - len(s):] = s
    return out


def _mask(seqs: Sequence, side: str) -> torch.Tensor:
    return pad([torch.ones(len(s), dtype=torch.long) for s in seqs], 0, side)


class SFTCollator:
    """Rows {"input_ids", "labels"?} -> {"input_ids", "attention_mask", "labels"} ([B, T]);
    labels default to input_ids, padded with -100."""

    def __init__(self, pad_id: int, padding_side: str):
        self.pad_id, self.padding_side = _check(pad_id, padding_side), padding_side

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] if r.get("labels") is not None else r["input_ids"] for r in rows]
        return {
            "input_ids": pad(ids, self.pad_id, self.padding_side),
            "attention_mask": _mask(ids, self.padding_side),
            "labels": pad(labels, IGNORE_INDEX, self.padding_side),
        }


class PairCollator:
    """Rows {"chosen_input_ids", "rejected_input_ids", "prompt_len"} -> ``input_ids`` and
    ``attention_mask`` of shape [2B, T] (first B rows chosen, last B rejected, DeepSpeed-Chat's
    layout, one common width) and ``prompt_len`` [B]."""

    def __init__(self, pad_id: int, padding_side: str):
        self.pad_id, self.padding_side = _check(pad_id, padding_side), padding_side

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        return {
            "input_ids": pad(seqs, self.pad_id, self.padding_side),
            "attention_mask": _mask(seqs, self.padding_side),
            "prompt_len": torch.as_tensor([int(r.get("prompt_len", 0)) for r in rows], dtype=torch.long),
        }


class PromptCollator:
    """Rows {"input_ids"} -> {"input_ids", "attention_mask"}, always left padded (generation)."""

    def __init__(self, pad_id: int):
        self.pad_id = _check(pad_id)

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = [r["input_ids"] for r in rows]
        return {"input_ids": pad(ids, self.pad_id, "left"), "attention_mask": _mask(ids, "left")}
