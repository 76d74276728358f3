"""Sweeps: every sweep/search config composes; sweeps/collect.py turns job directories into the
published tables' layout (failed and OOM jobs as rows saying so); real multiruns on the tiny models
end with table.md/csv/png, one row per job, a deliberately failing job included."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from rlhf.config import quote_numeric_choices
from rlhf.stages import STAGES
from sweeps.collect import collect
from tests.conftest import CONF, ROOT, shared_cache

SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml"))
SEARCHES = sorted(p.stem for p in (CONF / "hparams_search").glob("*.yaml"))
TINY = ["data.demo_size=200", "data.heldout_prompts=8", "logger=none"]
PNG = b"\x89PNG\r\n\x1a\n"


def hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=quote_numeric_choices(list(overrides)), return_hydra_config=True)


@pytest.mark.parametrize("name", SWEEPS)
def test_every_sweep_composes_as_a_multirun_grouped_in_wandb(name):
    cfg = hydra_cfg(f"sweep={name}")
    if name == "eval_models":  # one job that evaluates every listed model into one table, not a multirun
        assert cfg.stage.name == "eval" and cfg.eval.models and cfg.logger.group == name
        return
    assert cfg.hydra.mode.name == "MULTIRUN"  # `python run.py sweep=<name>` sweeps without -m
    assert cfg.hydra.sweeper.params and cfg.logger.group == name
    assert cfg.hydra.callbacks.collect._target_ == "sweeps.collect.CollectTables"


@pytest.mark.parametrize("name", SEARCHES)
def test_every_search_uses_the_optuna_sweeper(name):
    cfg = hydra_cfg(f"hparams_search={name}")
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert cfg.hydra.sweeper.direction == "maximize" and cfg.logger.group == name
    assert cfg.stage.name == name.split("_")[0] and cfg.stage.name in STAGES


def test_sweep_zero_choices_are_group_options():
    """Numeric group options must be quoted in sweep YAMLs (Hydra would read 2 as an int)."""
    params = hydra_cfg("sweep=zero_offload").hydra.sweeper.params
    assert params.zero == "'0','1','2','3','2-offload','3-offload'"
    assert all((CONF / "zero" / f"{opt.strip(chr(39))}.yaml").exists() for opt in params.zero.split(","))


# ---------------------------------------------------------------- collect on hand-made job dirs


def fake_job(sweep: Path, num: int, overrides, cfg, summary) -> Path:
    d = sweep / ",".join(overrides)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    return d


def job_cfg(stage=0, offload=False, batch=8, gpus=1, stage_name="sft"):
    return {"stage": {"name": stage_name}, "model": {"name": "m", "dtype": "auto"},
            "hardware": {"name": "hw", "nodes": 1, "procs_per_node": gpus, "precision": "fp16"},
            "zero": {"stage": stage, "offload_optimizer": offload, "offload_param": False, "pin_memory": True,
                     "overlap_comm": False, "allgather_bucket_size": 500000000,
                     "stage3_max_live_parameters": 1000000000},
            "lora": {"rank": 0, "only_optimize_lora": False},
            "sft": {"micro_batch_size": batch, "grad_accum": 2, "gradient_checkpointing": True, "epochs": 2},
            "rm": {"epochs": 1}, "ppo": {"epochs": 1}, "actor": {"name": "m"}, "reward": {"name": "r"}}


def read_csv(path: Path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_collect_zero_offload_rows_ok_oom_and_missing(tmp_path):
    ok = {"samples_per_s": 10.0, "train_rows": 360, "peak_host_mem_gb": 1.5, "peak_gpu_mem_gb": 30.25}
    fake_job(tmp_path, 0, ["zero='2'"], job_cfg(2), ok)
    fake_job(tmp_path, 1, ["zero='0'"], job_cfg(0, batch=64),
             {"status": "OOM", "error": "CUDA out of memory. Tried to allocate 2.00 GiB"})
    fake_job(tmp_path, 2, ["zero='2-offload'"], job_cfg(2, offload=True), None)  # never wrote a summary
    result = collect(tmp_path, "zero_offload")
    assert (result["jobs"], result["failed"]) == (3, 2)
    rows = read_csv(tmp_path / "table.csv")
    assert len(rows) == 3
    first, oom, missing = rows
    assert (first["ZeRO stage"], first["offload optimizer"], first["batch size"], first["grad accumulation"],
            first["gradient checkpointing"], first["precision"]) == ("2", "no", "8", "2", "yes", "fp16")
    # 360 rows x 2 epochs / 10 samples/s = 72 s = 0.02 h; 1 / 10 samples/s = 0.1 s/sample
    assert (first["hours/epoch"], first["s/sample"], first["GPU mem GB"], first["status"]) == ("0.02", "0.1", "30.25", "ok")
    assert oom["batch size"] == "64" and oom["GPU mem GB"] == "OOM" and oom["s/sample"] == "OOM"
    assert oom["status"] == "OOM: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert missing["status"] == "missing" and missing["offload optimizer"] == "yes"
    md = (tmp_path / "table.md").read_text().splitlines()
    assert sum(1 for ln in md if ln.startswith("| m |")) == 3
    assert (tmp_path / "table.png").read_bytes()[:8] == PNG
    assert len(read_csv(tmp_path / "jobs.csv")) == 3


def test_collect_dschat_e2e_pivots_pipeline_steps(tmp_path):
    steps = {"sft": {"samples_per_s": 2.0, "train_rows": 3600},   # 3600 x 2 epochs / 2 = 3600 s = 1 h
             "rm": {"samples_per_s": 1.0, "train_pairs": 1800},   # 1800 / 1 = 0.5 h
             "ppo": {"samples_per_s": 0.5, "prompts": 3600}}      # 3600 / 0.5 = 2 h
    fake_job(tmp_path, 0, ["model=m"], job_cfg(stage_name="pipeline"), {"stage": "pipeline", "steps": steps})
    bad = dict(job_cfg(stage_name="pipeline", gpus=8), pipeline={"steps": [1, 2, 3], "algo": "ppo"})
    fake_job(tmp_path, 1, ["model=m", "hardware=hw8"], bad, {"status": "failed", "error": "boom"})
    collect(tmp_path, "dschat_e2e")
    rows = read_csv(tmp_path / "table.csv")
    assert rows[0] == {"setup": "m + r RM on hw", "GPUs": "1", "step 1 h": "1", "step 2 h": "0.5", "step 3 h": "2",
                       "total h": "3.5"}
    assert [rows[1][f"step {i} h"] for i in (1, 2, 3)] == ["failed"] * 3 and rows[1]["total h"] == ""


def test_collect_generic_writes_best_trial(tmp_path):
    (tmp_path / "multirun.yaml").write_text(yaml.safe_dump({"hydra": {"sweeper": {"direction": "minimize"}}}))
    for i, (lr, obj) in enumerate([("0.1", 0.5), ("0.01", 0.2), ("0.001", None)]):
        summary = {"objective": obj, "samples_per_s": 4.0} if obj is not None else {"status": "failed", "error": "x"}
        fake_job(tmp_path, i, [f"sft.lr={lr}", "logger=none"], job_cfg(), summary)
    result = collect(tmp_path)  # auto: no sweep name -> generic
    assert result["table"] == "generic"
    rows = read_csv(tmp_path / "table.csv")
    assert [r["sft.lr"] for r in rows] == ["0.1", "0.01", "0.001"] and "logger" not in rows[0]
    assert [r["status"] for r in rows] == ["ok", "ok", "failed: x"]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["objective"] == 0.2 and "sft.lr=0.01" in best["overrides"]
    assert yaml.safe_load((tmp_path / "best_config.yaml").read_text())["sft"]["epochs"] == 2


def test_collect_cli(tmp_path):
    fake_job(tmp_path, 0, ["zero='3'"], job_cfg(3), {"samples_per_s": 1.0, "train_rows": 10})
    out = subprocess.run([sys.executable, "sweeps/collect.py", str(tmp_path), "--table", "zero_offload"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "| ZeRO stage |" in out.stdout.replace("| model | GPUs ", "")
    assert (tmp_path / "table.png").exists()


# ---------------------------------------------------------------- real multiruns (tiny models)


def multirun(tmp_path: Path, *args: str, timeout: int = 600):
    """A real multirun; cache_dir is an absolute path, which must not nest the job directories."""
    out = subprocess.run([sys.executable, "run.py", *args, *TINY, f"cache_dir={shared_cache()}",
                          f"hydra.sweep.dir={tmp_path}"], cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-4000:]
    for name in ("table.md", "table.csv", "table.png"):
        assert (tmp_path / name).exists(), name
    assert (tmp_path / "table.png").read_bytes()[:8] == PNG
    return read_csv(tmp_path / "table.csv")


@pytest.mark.slow
def test_zero_offload_sweep_reports_a_failing_job_and_goes_on(tmp_path):
    rows = multirun(tmp_path, "sweep=zero_offload", "zero=0,3", "sft.micro_batch_size=8,0",
                    "sft.gradient_checkpointing=false", "sft.max_steps=2")
    assert len(rows) == 4 and sorted(r["ZeRO stage"] for r in rows) == ["0", "0", "3", "3"]
    ok = [r for r in rows if r["batch size"] == "8"]
    failed = [r for r in rows if r["batch size"] == "0"]
    assert all(r["status"] == "ok" and float(r["s/sample"]) > 0 and float(r["host mem GB"]) > 0 for r in ok)
    assert all(r["status"].startswith("failed: ") and "batch_size" in r["status"] for r in failed)
    assert all(r["s/sample"] == "failed" for r in failed)
    job = next(tmp_path.glob("*sft.micro_batch_size=0*zero='3'*"))  # a direct child: cache_dir is not in its name
    assert json.loads((job / "summary.json").read_text())["status"] == "failed"
    assert len((tmp_path / "table.md").read_text().splitlines()) >= 6


@pytest.mark.slow
def test_lora_rank_sweep(tmp_path):
    rows = multirun(tmp_path, "sweep=lora_rank", "lora.rank=0,8", "zero=2", "sft.max_steps=2")
    assert [r["LoRA rank"] for r in rows] == ["none", "8"] and all(r["status"] == "ok" for r in rows)
    full, lora = (int(r["trainable params"]) for r in rows)
    assert lora < full / 5  # only the adapters train
    assert all(float(r["minutes/epoch"]) > 0 for r in rows)


@pytest.mark.slow
def test_dschat_e2e_sweep_times_steps_1_2_3(tmp_path):
    rows = multirun(tmp_path, "sweep=dschat_e2e", "model=tiny-opt", "sft.max_steps=2", "rm.max_steps=2",
                    "ppo.max_steps=1")
    (row,) = rows
    assert row["setup"] == "tiny-opt on cpu"
    hours = [float(row[f"step {i} h"]) for i in (1, 2, 3)]
    assert all(h > 0 for h in hours) and float(row["total h"]) == pytest.approx(sum(hours), rel=1e-3)


@pytest.mark.slow
def test_optuna_search_writes_best_trial(tmp_path):
    rows = multirun(tmp_path, "hparams_search=sft_optuna", "hydra.sweeper.n_trials=2", "sft.max_steps=2")
    assert len(rows) == 2 and all(r["status"] == "ok" for r in rows)
    results = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())  # the Optuna sweeper's own
    assert set(results["best_params"]) == {"sft.lr", "sft.warmup_steps"}
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["objective"] == results["best_value"]
    assert yaml.safe_load((tmp_path / "best_config.yaml").read_text())["stage"]["name"] == "sft"


@pytest.mark.slow
@pytest.mark.skipif("ppo" not in STAGES, reason="stage=ppo not registered")
def test_ppo_hparams_sweep(tmp_path):
    rows = multirun(tmp_path, "sweep=ppo_hparams", "ppo.kl_ctl=0.05,0.2", "ppo.cliprange=0.2", "ppo.max_steps=1")
    assert [r["ppo.kl_ctl"] for r in rows] == ["0.05", "0.2"] and all(r["status"] == "ok" for r in rows)


def test_collect_robustness_rows_with_median_and_min(tmp_path):
    def pipeline_cfg(algo, seed, threads):
        return {**job_cfg(stage_name="pipeline"), "seed": seed, "pipeline": {"algo": algo, "steps": [1, 2, 3]},
                "hardware": {"name": "cpu", "threads": threads}}

    runs = [("ppo", 1, 1, 0.5, 0.75, 0.25, 0.5), ("ppo", 1, 2, 0.5, 0.5, 0.25, 0.375),
            ("ppo", 2, 1, 0.75, 0.5, 0.25, 0.75)]
    for i, (algo, seed, threads, g0, g1, s0, s1) in enumerate(runs):
        summary = {"stage": "pipeline", "rule_rate_sft": g0, "rule_rate_final": g1,
                   "rule_rate_sampled_sft": s0, "rule_rate_sampled_final": s1}
        fake_job(tmp_path, i, [f"seed={seed}", f"hardware.threads={threads}", f"pipeline.algo={algo}"],
                 pipeline_cfg(algo, seed, threads), summary)
    fake_job(tmp_path, 3, ["seed=1", "hardware.threads=1", "pipeline.algo=dpo"], pipeline_cfg("dpo", 1, 1),
             {"status": "failed", "error": "boom"})
    collect(tmp_path, "robustness")
    rows = read_csv(tmp_path / "table.csv")
    assert [(r["algo"], r["seed"], r["threads"]) for r in rows] == [
        ("dpo", "1", "1"), ("dpo", "median", "0 runs"), ("dpo", "min", "0 runs"),
        ("ppo", "1", "1"), ("ppo", "1", "2"), ("ppo", "2", "1"), ("ppo", "median", "3 runs"), ("ppo", "min", "3 runs")]
    assert rows[0]["status"] == "failed: boom" and rows[1]["sampled change"] == ""
    # greedy changes +0.25, 0, -0.25; sampled changes +0.25, +0.125, +0.5
    assert (rows[3]["greedy change"], rows[4]["sampled change"], rows[5]["greedy change"]) == ("0.25", "0.125", "-0.25")
    assert (rows[6]["greedy change"], rows[6]["sampled change"], rows[6]["sampled after"]) == ("0", "0.25", "0.5")
    assert (rows[7]["greedy change"], rows[7]["sampled change"], rows[7]["greedy before"]) == ("-0.25", "0.125", "0.5")
    assert "| ppo | median | 3 runs |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "table.png").read_bytes()[:8] == PNG


def test_collect_robustness_gives_a_row_per_compared_algo(tmp_path):
    """pipeline.compare: one job, several step-3 algorithms from the same SFT start, one row each."""
    cfg = {**job_cfg(stage_name="pipeline"), "seed": 2, "hardware": {"name": "cpu", "threads": 1},
           "pipeline": {"algo": "ppo", "compare": ["dpo"], "steps": [1, 2, 3]}}
    by_algo = {"ppo": {"rule_rate_sft": 0.5, "rule_rate_final": 0.625, "rule_rate_sampled_sft": 0.25,
                       "rule_rate_sampled_final": 0.5, "rule_rate_trained": 0.4375,
                       "rule_rate_sampled_trained": 0.75},  # before ppo.delta_scale
               "dpo": {"rule_rate_sft": 0.5, "rule_rate_final": 0.375, "rule_rate_sampled_sft": 0.25,
                       "rule_rate_sampled_final": 0.3125}}
    fake_job(tmp_path, 0, ["seed=2", "hardware.threads=1"], cfg, {"stage": "pipeline", "by_algo": by_algo})
    collect(tmp_path, "robustness")
    rows = read_csv(tmp_path / "table.csv")
    assert [(r["algo"], r["seed"]) for r in rows] == [("dpo", "2"), ("dpo", "median"), ("dpo", "min"),
                                                      ("ppo", "2"), ("ppo", "median"), ("ppo", "min")]
    assert (rows[0]["greedy change"], rows[0]["sampled change"]) == ("-0.125", "0.0625")
    assert (rows[3]["greedy change"], rows[3]["sampled change"]) == ("0.125", "0.25")
    assert (rows[3]["greedy change, trained"], rows[3]["sampled change, trained"]) == ("-0.0625", "0.5")
    # a summary without the trained rates (delta_scale 1.0 before the key existed): the trained model is the final one
    assert (rows[0]["greedy change, trained"], rows[0]["sampled change, trained"]) == ("-0.125", "0.0625")
