"""`make bench` at its smallest size: both sides run every stage and the JSON carries their numbers."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, shared_cache


@pytest.mark.slow
def test_bench_smoke_reports_both_sides_for_every_stage(tmp_path):
    pytest.importorskip("trl", reason="the bench compares against TRL: pip install --no-deps 'trl==1.16.0' "
                                      "(the `bench` extra; not in dev, to keep CI installs small)")
    out = subprocess.run([sys.executable, "-m", "bench", "--size", "smoke", "--runs", "1", "--out", str(tmp_path),
                          "--cache", str(shared_cache())], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert len(rows) == 5, sorted(rows)  # SFT, RM, DPO, step 3 (ours PPO and ours RLOO, each vs TRL RLOO)
    for label, row in rows.items():
        for side in ("ours", "trl"):
            run = row[side][0]
            assert run["samples_per_s"] > 0 and run["peak_rss_mb"] > 100, (label, side, run)
            assert run["torch_threads"] == 1, (label, side)
            assert run["quality"], (label, side)
        assert row["ratio_median"] > 0, label
        if row["stage"] == "rl":
            assert row["ours"][0]["gen_tokens_per_s"] > 0 and row["trl"][0]["gen_tokens_per_s"] > 0, label
        else:
            assert row["ours"][0]["tokens_per_s"] > 0 and row["trl"][0]["tokens_per_s"] > 0, label
    steps = {r["stage"]: (r["ours"][0]["steps"], r["trl"][0]["steps"]) for r in rows.values()}
    assert steps == {"sft": (6, 6), "rm": (6, 6), "dpo": (4, 4), "rl": (2, 2)}, steps  # equal work on both sides
    table = (tmp_path / "table.md").read_text()
    assert "| SFT (sequences) |" in table and "| RM (pairs) |" in table and "Counting:" in table
