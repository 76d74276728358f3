"""What a run guarantees: loading a checkpoint never runs code, a run directory belongs to one
run, finishing is idempotent, metrics survive a torn line, bad input names its cause."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rlhf.engine import rundir
from rlhf.stages import get_stage
from tests.conftest import ROOT, compose_cfg

QUICK = ("stage=sft", "logger=none", "logger.progress=false", "data.demo_size=400", "data.heldout_prompts=8",
         "sft.max_steps=4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=10", "zero=2")


def sft(*overrides, run_dir):
    return get_stage("sft")(compose_cfg(*QUICK, *overrides, run_dir=run_dir))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished 4-step SFT run (ZeRO-2, so optimizer states are DeepSpeed pickles) with
    checkpoints at steps 2 and 4."""
    d = tmp_path_factory.mktemp("done")
    summary = sft(run_dir=d)
    assert summary["steps"] == 4
    return d


class Payload:
    """A pickle whose loading creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _readable_files(ckpt: Path):
    return sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())


def test_checkpoint_files_are_json_safetensors_or_weights_only(done_run):
    ckpt = done_run / "checkpoints" / "step-00000002"
    files = _readable_files(ckpt)
    assert "rng-rank0.json" in files and not any(f.startswith("rng-") and f.endswith(".pt") for f in files)
    assert json.loads((ckpt / "meta.json").read_text())["config"]["sft"]["max_steps"] == 4


@pytest.mark.parametrize("name", ["model/state/mp_rank_00_model_states.pt",
                                  "model/state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                                  "model/state/planted.pt", "rng-rank0.json", "meta.json"])
def test_malicious_pickle_in_a_checkpoint_never_runs(done_run, tmp_path, name):
    ckpt = tmp_path / "ckpt" / "step-00000002"
    shutil.copytree(done_run / "checkpoints" / "step-00000002", ckpt)
    marker = tmp_path / "PWNED"
    torch.save({"module": Payload(marker)}, ckpt / name)
    with pytest.raises(Exception) as err:
        sft(f"resume={ckpt}", run_dir=tmp_path / "run")
    assert not marker.exists(), "loading the checkpoint ran code"
    named = ckpt if name == "meta.json" else ckpt / name  # a meta.json that is not JSON: an incomplete checkpoint
    assert str(named) in str(err.value), err.value
    if name.endswith(".pt"):
        assert "checkpoint.trust=true" in str(err.value)


def test_a_genuine_zero2_checkpoint_resumes(done_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    (run / "summary.json").unlink()
    shutil.rmtree(run / "checkpoints" / "step-00000004")
    summary = sft("resume=auto", run_dir=run)
    assert summary["steps"] == 4
    assert summary["eval_ppl"] == json.loads((done_run / "summary.json").read_text())["eval_ppl"]


# ---------------------------------------------------------------- run directory


def test_a_new_run_refuses_a_used_run_dir_and_leaves_it_intact(done_run):
    before = {p: (done_run / p).read_bytes() for p in ("config.yaml", "metrics.jsonl", "summary.json")}
    with pytest.raises(rundir.RunDirTaken, match="already holds another run.*resume=auto.*run_dir_mode=overwrite"):
        sft("sft.lr=0.03", run_dir=done_run)
    assert {p: (done_run / p).read_bytes() for p in before} == before
    assert sorted(p.name for p in (done_run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_overwrite_moves_the_old_run_aside(tmp_path):
    d = tmp_path / "run"
    (d / "checkpoints" / "step-00000004").mkdir(parents=True)
    (d / "metrics.jsonl").write_text('{"step": 1}\n')
    cfg = compose_cfg(*QUICK, "run_dir_mode=overwrite", run_dir=d)
    assert rundir.claim(cfg, d)
    rundir.release(d)
    assert not (d / "metrics.jsonl").exists()
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_pipeline_owns_only_the_steps_it_runs(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "summary.json").write_text("{}")
    (tmp_path / "summary.json").write_text("{}")
    rundir.check_owner(compose_cfg("stage=pipeline", "pipeline.steps=[3]"), tmp_path)  # reruns step 3: allowed
    with pytest.raises(rundir.RunDirTaken, match="sft: summary.json"):
        rundir.check_owner(compose_cfg("stage=pipeline", "pipeline.steps=[1,2,3]"), tmp_path)


def test_a_second_process_on_a_locked_run_dir_fails_naming_the_holder(tmp_path):
    code = ("import sys, time; from rlhf.engine import rundir; rundir.acquire(sys.argv[1]); "
            "print('locked', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(rundir.RunDirInUse, match=f"in use by another run \\(PID {holder.pid}"):
            rundir.claim(compose_cfg(*QUICK, "resume=auto", run_dir=tmp_path), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    assert rundir.claim(compose_cfg(*QUICK, run_dir=tmp_path), tmp_path)  # free again once the holder is gone
    rundir.release(tmp_path)


@pytest.mark.parametrize("overrides, keys", [
    (("sft.lr=0.03",), ["sft.lr"]),
    (("lora=r8",), ["lora.rank"]),
    (("model=tiny-llama",), ["model.family", "model.path"]),
    (("sft.max_seq_len=33", "zero=0"), ["sft.max_seq_len", "zero.stage"]),
])
def test_resume_with_other_settings_is_refused_naming_them(done_run, overrides, keys):
    config = (done_run / "config.yaml").read_bytes()
    cfg = compose_cfg(*QUICK, "resume=auto", *overrides, run_dir=done_run)
    with pytest.raises(rundir.RunDirTaken, match="differ from the ones the checkpoint was written with") as err:
        rundir.claim(cfg, done_run)
    for k in keys:
        assert f"{k}:" in str(err.value)
    assert (done_run / "config.yaml").read_bytes() == config
    # what does not change the training math may change
    assert not rundir.settings_diff(json.loads((done_run / "checkpoints" / "step-00000004" / "meta.json")
                                               .read_text())["config"],
                                    {"sft": {"log_every": 5, "eval_every": 3}, "checkpoint": {"every_n_steps": 1}},
                                    "sft")


def test_a_resumed_pipeline_refuses_a_steps_changed_setting_before_writing_anything(done_run, tmp_path):
    """A pipeline is checked step by step when it is claimed: a changed SFT setting is refused
    before the launcher rewrites the pipeline's config.yaml, not once step 1 starts."""
    pipe = tmp_path / "pipe"
    shutil.copytree(done_run, pipe / "sft")
    (pipe / "config.yaml").write_text("the pipeline's own settings\n")
    args = ("stage=pipeline", "pipeline.steps=[1]", "resume=auto")
    with pytest.raises(rundir.RunDirTaken, match=r"sft[/\\]checkpoints.*sft.lr: 0.0"):
        rundir.claim(compose_cfg(*QUICK, *args, "sft.lr=0.03", run_dir=pipe), pipe)
    assert (pipe / "config.yaml").read_text() == "the pipeline's own settings\n"
    assert rundir.claim(compose_cfg(*QUICK, *args, run_dir=pipe), pipe)  # the step's own settings resume
    rundir.release(pipe)


# ---------------------------------------------------------------- finishing


def test_a_run_resumed_at_its_last_step_reports_no_throughput(done_run, tmp_path):
    """Stopped after its last checkpoint, before the summary: resuming trains no step, and the
    summary says the throughput was not measured instead of ~0 samples/s."""
    d = tmp_path / "run"
    shutil.copytree(done_run, d)
    (d / "summary.json").unlink()
    summary = sft("resume=auto", run_dir=d)
    assert summary["steps"] == 4 and summary["samples_per_s"] is None and summary["tokens_per_s"] is None
    assert json.loads((d / "summary.json").read_text())["samples_per_s"] is None


def test_resume_auto_on_a_finished_run_reports_already_complete(done_run, capsys):
    files = {p: (done_run / p).read_bytes() for p in ("summary.json", "metrics.jsonl", "model/model.safetensors")}
    out = sft("resume=auto", run_dir=done_run)
    assert "already complete" in capsys.readouterr().out
    assert out == json.loads(files["summary.json"])
    assert {p: (done_run / p).read_bytes() for p in files} == files


def test_killed_during_final_eval_resumes_into_a_complete_summary(done_run, tmp_path):
    """A kill after the last checkpoint (during final eval or export), with a torn metrics line."""
    run = tmp_path / "run"
    shutil.copytree(done_run, run)
    whole = json.loads((run / "summary.json").read_text())
    (run / "summary.json").unlink()
    shutil.rmtree(run / "model")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "time_s": 9.1, "eval/lo')  # torn mid-write
    summary = sft("resume=auto", run_dir=run)
    for key in ("final_train_loss", "eval_ppl", "eval_loss", "eval_ppl_initial", "steps"):
        assert summary[key] == whole[key], key
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/ppl" in r] == [4], "the final eval row is written once"
    assert (run / "model" / "model.safetensors").read_bytes() == (done_run / "model" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- tracking


def test_wandb_goes_online_only_when_asked_or_logged_in_and_not_offline(monkeypatch, tmp_path):
    from rlhf.tracking import wandb_mode

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert wandb_mode("auto") == "online"
    for mode in ("offline", "disabled"):
        monkeypatch.setenv("WANDB_MODE", mode)
        assert wandb_mode("auto") == "offline"
    assert wandb_mode("online") == "online"


def test_a_torn_last_metrics_line_is_dropped_and_appending_continues(tmp_path):
    from rlhf.config import LoggerConfig
    from rlhf.tracking import Tracker

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo')
    tracker = Tracker(tmp_path, LoggerConfig(progress=False), {}, rank=0)
    tracker.log({"train/loss": 1.5}, step=2)
    tracker.truncate(2)
    assert tracker.last["train/loss"] == 1.5
    tracker.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/loss"]) for r in rows] == [(1, 2.0), (2, 1.5)]
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')  # damage mid-file is not hidden
    with pytest.raises(ValueError, match="metrics.jsonl: line 2 is not JSON"):
        Tracker(tmp_path, LoggerConfig(progress=False), {}, rank=0)


# ---------------------------------------------------------------- bad input names its cause


GOOD = [{"prompt": f"Human: what is {i} plus 1? Assistant:", "chosen": f"It is {i + 1}.", "rejected": "No idea."}
        for i in range(40)]


def _local(d: Path, train, eval_=None) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    for name, content in (("train.json", train), ("eval.json", GOOD[:8] if eval_ is None else eval_)):
        (d / name).write_bytes(content if isinstance(content, bytes) else
                               (content if isinstance(content, str) else json.dumps(content)).encode())
    return d


@pytest.mark.parametrize("train, eval_, file, cause", [
    ("[]", None, "train.json", "an empty JSON list"),
    ("", None, "train.json", "the file is empty \\(0 bytes\\)"),
    (GOOD, "", "eval.json", "the file is empty \\(0 bytes\\)"),
    (GOOD, "[]", "eval.json", "an empty JSON list"),
    (json.dumps(GOOD)[:-40], None, "train.json", "not valid JSON .* line 1 column \\d+.*truncated"),
    (b"\xff\xfe" + json.dumps(GOOD).encode(), None, "train.json", "not UTF-8 text \\(byte 0"),
    (json.dumps(GOOD[0]), None, "train.json", "a single JSON object; expected a list of rows"),
])
def test_broken_data_files_name_the_file_and_the_cause(tmp_path, train, eval_, file, cause):
    from rlhf.config import SourceConfig
    from rlhf.data.sources import load_source_with_stats

    d = _local(tmp_path / "data", train, eval_)
    with pytest.raises(ValueError, match=f"{d / file}: {cause}"):
        load_source_with_stats(SourceConfig(name="local/jsonfile", path=str(d)), tmp_path / "cache")


def test_local_json_without_a_path_names_the_key(tmp_path):
    from rlhf.data.blend import build_step_data

    cfg = compose_cfg("data=local-json", f"data.sources.0.path={tmp_path / 'nowhere'}")
    with pytest.raises(FileNotFoundError, match="local/jsonfile.*nowhere.*no such file or directory "
                                                "\\(data.sources.0.path"):
        build_step_data(cfg.data, 1, tmp_path, 1)


@pytest.mark.parametrize("overrides, match", [
    (("sft.max_seq_len=3",), "all \\d+ rows were dropped \\(\\d+ because the prompt alone is longer than "
                             "sft.max_seq_len=3 tokens\\); raise sft.max_seq_len"),
    (("sft.grad_accum=0",), "sft.grad_accum=0: must be >= 1"),
    (("sft.epochs=0",), "sft.epochs=0: must be >= 1"),
    (("checkpoint.every_n_steps=-1",), "checkpoint.every_n_steps=-1: must be >= 0"),
    (("launch.timeout_s=0",), "launch.timeout_s=0.0: must be > 0"),
    (("run_dir_mode=replace",), "run_dir_mode='replace': expected one of new, overwrite"),
])
def test_bad_settings_name_the_key(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        sft(*overrides, run_dir=tmp_path)
    assert rundir.previous_run(tmp_path) == []  # nothing left that would block a corrected rerun


def test_ppo_without_a_usable_prompt_refuses_to_start(tmp_path):
    cfg = compose_cfg("stage=ppo", "logger=none", "logger.progress=false", "data.demo_size=400",
                      "ppo.max_prompt_len=2", run_dir=tmp_path)
    with pytest.raises(ValueError, match="tokenizing prompts: all \\d+ rows were dropped .*ppo.max_prompt_len=2"):
        get_stage("ppo")(cfg)
    assert not (tmp_path / "model").exists() and not (tmp_path / "summary.json").exists()


def test_summary_counts_the_rows_the_loader_skipped(tmp_path):
    bad = [{"prompt": "Human: x Assistant:", "chosen": "", "rejected": "no"}, {"prompt": "Human: y Assistant:"},
           {"prompt": 3, "chosen": "a", "rejected": "b"}]
    d = _local(tmp_path / "data", GOOD + bad)
    summary = sft("data=local-json", f"data.sources.0.path={d}", "data.data_split='1,0,0'", "sft.max_steps=1",
                  "checkpoint.every_n_steps=0", run_dir=tmp_path / "run")
    assert summary["bad_rows"] == 3 and summary["dropped_rows"] == 3
    assert summary["train_rows"] == 40


# ---------------------------------------------------------------- Ctrl-C


def _interrupt_after_first(args, env, tmp_path, metric: str):
    """Start ``args`` and send SIGINT once ``metric`` is in metrics.jsonl; returns (stderr, process)."""
    import signal
    import time

    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and f'"{metric}"' in metrics.read_text():
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    return proc.communicate(timeout=300)[1], proc


@pytest.mark.slow
def test_ctrl_c_writes_a_checkpoint_and_exits_with_one_line(tmp_path):
    from rlhf.engine.checkpoint import find_latest
    from tests.conftest import shared_cache

    args = [sys.executable, "run.py", *QUICK[:-1], "sft.max_steps=30", "checkpoint.every_n_steps=100",
            f"run_dir={tmp_path}", f"cache_dir={shared_cache()}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    err, proc = _interrupt_after_first(args, env, tmp_path, "train/loss")
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = find_latest(tmp_path)
    assert last is not None
    step = json.loads((last / "meta.json").read_text())["step"]
    assert f"interrupted at optimizer step {step}: checkpoint {last} written; resume with resume=auto" in err
    assert 1 <= step < 30, step  # mid-run: written on Ctrl-C, not by the every-100-steps schedule
    assert not (tmp_path / "summary.json").exists()  # the run stopped there, unfinished
    out = subprocess.run([*args, "resume=auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 30
    assert "stage sft: 1 rank(s)" in (tmp_path / "run.log").read_text()  # Hydra's log is in run_dir


# ---------------------------------------------------------------- two ranks


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_lost_rank_is_named_and_a_stuck_one_ends_the_run(tmp_path, how):
    """Rank 1 killed (its peer sees 'connection reset') or stopped (its peer times out after
    launch.timeout_s): the run fails naming rank 1, not the rank that reported the error."""
    import signal
    import time

    import psutil

    from tests.conftest import shared_cache

    args = [sys.executable, "run.py", "stage=sft", "hardware=cpu2", "logger=none", "logger.progress=false",
            "data.demo_size=400", "data.heldout_prompts=8", "sft.max_steps=300", "launch.timeout_s=10",
            f"run_dir={tmp_path}", f"cache_dir={shared_cache()}"]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline and not (metrics.exists() and "train/loss" in metrics.read_text()):
        time.sleep(0.1)
    ranks = {q.environ().get("RANK"): q for q in psutil.Process(proc.pid).children(recursive=True)
             if "launchers.worker" in " ".join(q.cmdline())}
    rank1 = ranks["1"]
    t0 = time.time()
    rank1.send_signal(getattr(signal, how))
    try:
        err = proc.communicate(timeout=240)[1]
    finally:
        if rank1.is_running():
            rank1.kill()
    assert proc.returncode != 0
    assert "rank 1 died or stopped responding" in err, err[-3000:]
    # what the peer saw: a lost connection (gloo words it differently run to run) or the timeout
    lost = ("Connection reset", "Connection closed", "Broken pipe", "connection closed", "Connection refused")
    assert (any(w in err for w in lost) if how == "SIGKILL" else "Timed out waiting 10000ms" in err), err[-3000:]
    assert time.time() - t0 < 120


def test_the_exported_model_dir_has_the_usual_permissions(done_run):
    umask = os.umask(0)
    os.umask(umask)
    assert (done_run / "model").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_full_disk_says_so(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("needs permission to mount a small tmpfs")
    try:
        with pytest.raises(OSError, match="No space left on device while writing a checkpoint in .*disk/run/checkpoints"):
            sft("sft.max_steps=2", "zero=0", run_dir=disk / "run")
        assert not list((disk / "run" / "checkpoints").iterdir())  # the half-written one is removed
    finally:
        subprocess.run(["umount", "-l", str(disk)])  # lazily: the failed run still holds files open


def test_a_failed_checkpoint_write_with_enospc_says_so_and_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """Where mounting a small tmpfs is not allowed (the test above skips), the same path: the
    checkpoint's tensor writer fails with the error a full disk gives (ENOSPC); the run stops with
    the message naming the checkpoint directory and removes the half-written checkpoint."""
    import errno

    import torch

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device while writing a checkpoint in .*run/checkpoints"):
        sft("sft.max_steps=2", "zero=0", run_dir=tmp_path / "run")
    assert not list((tmp_path / "run" / "checkpoints").iterdir())  # the half-written one is removed


def test_hydra_writes_its_log_into_run_dir_when_set():
    from hydra.core.utils import setup_globals
    from omegaconf import OmegaConf

    setup_globals()  # Hydra's own resolvers (now)
    conf = OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "config.yaml").hydra, resolve=False)
    hydra = OmegaConf.create({"run_dir": "/runs/a", "stage": {"name": "sft"}, "model": {"name": "m"},
                              "run": conf["run"], "sub": conf["output_subdir"]})
    assert hydra.run.dir == "/runs/a" and hydra.sub is None
    hydra.run_dir = ""
    assert hydra.run.dir.startswith("outputs/sft/m/") and hydra.sub == ".hydra"


def test_ppo_with_no_iteration_to_run_refuses_to_start(tmp_path):
    """A step-3 share smaller than one generation batch would 'succeed' with 0 steps and export
    the input models as if trained: it stops at start naming the keys."""
    from rlhf.stages import ppo
    from tests.conftest import compose_cfg

    cfg = compose_cfg("stage=ppo", "logger=none", "logger.progress=false", "data.demo_size=400",
                      "ppo.generation_batch_size=4096", "ppo.train_batch_size=4096", run_dir=tmp_path)
    with pytest.raises(ValueError, match="stage=ppo would run no iteration.*ppo.generation_batch_size=4096"):
        ppo.run(cfg)
    assert not (tmp_path / "model").exists()


@pytest.mark.slow
def test_ctrl_c_in_ppo_writes_a_checkpoint_and_exits_with_one_line(tmp_path):
    from rlhf.engine.checkpoint import find_latest
    from tests.conftest import shared_cache

    args = [sys.executable, "run.py", "stage=ppo", "logger=none", "logger.progress=false", "data.demo_size=400",
            "data.heldout_prompts=4", "data.heldout_samples=0", "ppo.max_steps=30", "ppo.generation_batch_size=8",
            "ppo.train_batch_size=8", "ppo.max_answer_len=6", "checkpoint.every_n_steps=100",
            f"run_dir={tmp_path}", f"cache_dir={shared_cache()}"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    err, proc = _interrupt_after_first(args, env, tmp_path, "train/reward")
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    last = find_latest(tmp_path)
    step = json.loads((last / "meta.json").read_text())["step"]
    assert f"interrupted at optimizer step {step}: checkpoint {last} written" in err
    assert 1 <= step < 30, step  # mid-run: written on Ctrl-C, not by the every-100-steps schedule
    assert not (tmp_path / "summary.json").exists()  # the run stopped there, unfinished
