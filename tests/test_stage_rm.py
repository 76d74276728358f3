"""Step 2 on the tiny models: ranking loss paths and two ranks under ZeRO-3."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from rlhf.models.reward import load_reward_model
from rlhf.stages import rm
from tests.conftest import ROOT, compose_cfg, shared_cache

QUICK = ("logger=none", "logger.progress=false", "data.demo_size=400", "data.heldout_prompts=8")


@pytest.mark.slow  # a 3-epoch learning run per loss (~25 s each): full suite only, keeps test-fast under 3 minutes
@pytest.mark.parametrize("loss_mode,floor", [
    ("divergent", 0.7),  # the default ranking loss
    ("last", 0.6),
])
def test_rm_loss_falls_and_accuracy_beats_chance(tmp_path, loss_mode, floor):
    # 3 epochs of the default demo's step-2 share, held-out acc (160 pairs; chance ~0.5) over seeds
    # 1234, 1, 2, 3 at one thread and 1234, 1 at two (demo v7): divergent 0.78-0.86, last 0.69-0.84
    cfg = compose_cfg("stage=rm", "logger=none", "logger.progress=false", f"rm.loss_mode={loss_mode}",
                      "rm.epochs=3", run_dir=tmp_path)
    summary = rm.run(cfg)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert sum(losses[-5:]) < sum(losses[:5])
    assert summary["acc"] > summary["acc_initial"] and summary["acc"] >= floor
    assert summary["chosen_mean"] > summary["rejected_mean"]
    assert summary["margin_mean"] == pytest.approx(summary["chosen_mean"] - summary["rejected_mean"], abs=1e-4)
    # the saved model (base + value head) scores like the summary says: chosen above rejected
    model = load_reward_model(cfg.model, str(tmp_path / "model")).eval()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "model")
    good, bad = ("Human: What is 2 plus 2?\n Assistant: 2 plus 2 is 4.</s>",
                 "Human: What is 2 plus 2?\n Assistant: I do not know.</s>")
    enc = tok([good, bad], return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        scores = model.score(enc["input_ids"], enc["attention_mask"])
    assert scores[0] > scores[1]


def test_rm_rejects_a_bad_loss_mode(tmp_path):
    with pytest.raises(ValueError, match="rm.loss_mode"):
        rm.run(compose_cfg("stage=rm", *QUICK, "rm.loss_mode=hinge", "rm.max_steps=1", run_dir=tmp_path))


@pytest.mark.slow
@pytest.mark.dist
def test_two_ranks_zero3_train_the_reward_model(tmp_path):
    out = subprocess.run(
        [sys.executable, "run.py", "stage=rm", "hardware=cpu2", "zero=3", "logger=none", "logger.progress=false",
         "rm.epochs=2",
         f"run_dir={tmp_path}", f"cache_dir={shared_cache()}"],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["world_size"] == 2
    # the demo's 800 step-2 pairs split over two ranks, 100 steps: observed acc 0.44 -> 0.81
    assert summary["acc"] > summary["acc_initial"] and summary["acc"] >= 0.7
    assert (tmp_path / "model" / "value_head.safetensors").exists()


def test_throughput_counts_pairs_not_sequences(tmp_path):
    """samples/s of a pairwise stage counts preference pairs (every peer's convention), not the
    2 sequences each pair trains on: 4 steps x 8 pairs = 32 pairs in train_time_s."""
    cfg = compose_cfg("stage=rm", *QUICK, "rm.max_steps=4", "rm.micro_batch_size=8", "rm.epochs=1",
                      run_dir=tmp_path)
    summary = rm.run(cfg)
    assert summary["samples_per_s"] * summary["train_time_s"] == pytest.approx(32, rel=1e-6)
