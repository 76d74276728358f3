"""Local metrics always, W&B offline unless logged in, atomic summaries, resume-safe metric files."""
from __future__ import annotations

import json

from rlhf.config import LoggerConfig
from rlhf.tracking import Tracker, wandb_mode


def test_auto_mode_is_offline_without_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("auto") == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_offline_wandb_run_and_local_files(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = LoggerConfig(name="wandb", wandb=True, mode="auto", project="rlhf-test", progress=False)
    tracker = Tracker(tmp_path / "run", cfg, {"lr": 0.1}, rank=0, name="t")
    assert tracker.run_id  # an offline W&B run exists
    for step in range(1, 5):
        tracker.log({"train/loss": 1.0 / step}, step=step)
    out = tracker.summary({"final": 0.25})
    tracker.close()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/loss"] for r in rows] == [1.0, 0.5, 1 / 3, 0.25]
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["final"] == 0.25 and saved["peak_host_mem_gb"] > 0 and out["wall_time_s"] >= 0
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*")), "offline W&B files are written in the run dir"


def test_truncate_drops_rows_after_a_checkpoint(tmp_path):
    tracker = Tracker(tmp_path, LoggerConfig(progress=False), {}, rank=0)
    for step in range(1, 7):
        tracker.log({"train/loss": float(step)}, step=step)
    tracker.truncate(4)
    tracker.log({"train/loss": 50.0}, step=5)
    tracker.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
