"""sweeps/expected holds every published row the sweeps reproduce, each saying whether it needs a GPU."""
from __future__ import annotations

import csv

import pytest

from tests.conftest import ROOT

EXPECTED = ROOT / "sweeps" / "expected"


def rows(name):
    with open(EXPECTED / name, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name,count", [("zero_offload.csv", 43), ("lora_rank.csv", 11), ("largest_model.csv", 7),
                                        ("dschat_e2e.csv", 3)])
def test_every_published_row_is_there(name, count):
    table = rows(name)
    assert len(table) == count
    assert all(r["needs GPU"] for r in table)


def test_toolkit_tables_keep_their_cells():
    ds = rows("zero_offload.csv")
    assert [r["model"] for r in ds].count("Pangu-2.6b") == 7 and [r["model"] for r in ds].count("GLM-10B-Chinese") == 11
    # a continuation row of the source, realigned: ChatGLM-6B, 8 GPUs, batch 8, accumulation 2, 50 minutes
    row = next(r for r in ds if r["time/epoch"] == "50 min")
    assert (row["model"], row["GPUs"], row["batch size"], row["grad accum steps"]) == ("ChatGLM-6B", "8*v100 16g", "8", "2")
    lora = rows("lora_rank.csv")
    assert (lora[0]["model"], lora[0]["GPU memory"], lora[3]["LoRA rank"], lora[3]["trainable params"]) == \
        ("Pangu-2.6b", "1*79421MB", "100", "151 MB")
