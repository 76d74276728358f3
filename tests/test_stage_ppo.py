"""Step 3 and the one-command pipeline on the tiny default (what `make run` runs)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT, shared_cache

ENV = dict(os.environ)  # the thread count is the hardware profile's (hardware.threads), not pinned here


def cli(*args, timeout=1200, **kw):
    out = subprocess.run([sys.executable, "run.py", "logger=none", "logger.progress=false",
                          f"cache_dir={shared_cache()}", *args], cwd=ROOT, env=ENV, capture_output=True,
                         text=True, timeout=timeout, **kw)
    assert out.returncode == 0, out.stderr[-4000:]
    return out


@pytest.fixture(scope="module")
def pipeline_run(default_pipeline):
    """The default pipeline (tests/conftest.py), run once per session."""
    return default_pipeline


@pytest.mark.slow
def test_pipeline_runs_every_step_and_prints_the_table(pipeline_run):
    run_dir, stdout = pipeline_run
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["steps"]) == {"sft", "rm", "ppo", "dpo"}  # dpo: pipeline.compare
    for step in ("sft", "rm", "ppo"):
        assert (run_dir / step / "summary.json").exists()
        assert (run_dir / step / "model" / "config.json").exists()
    assert "| sft | eval_ppl |" in stdout and "| ppo | reward_mean |" in stdout
    rm = summary["steps"]["rm"]
    assert rm["acc"] >= 0.8, rm  # 0.856-0.931 over the robustness grid, 0.8875 here (160 eval pairs)
    AutoModelForCausalLM.from_pretrained(run_dir / "ppo" / "model")  # transformers alone


@pytest.mark.slow
def test_ppo_raises_the_heldout_rule_rate_with_bounded_kl(pipeline_run):
    """200 PPO iterations with the RM + 5 x the demo rule (the tiny preset) from the default
    pipeline's SFT model (seed 1234, the profile's one thread), exported at the preset's
    ppo.delta_scale=0.5. Over the robustness grid (seeds 1-3 x one and two threads, the README) the
    exported actor changed the greedy rate by -0.016 to +0.047 and the sampled rate by +0.203 to
    +0.250 on the 64 held-out prompts (the trained one: -0.031 to +0.047, +0.277 to +0.383). The
    bounds are the issue's bar: +0.15 sampled, at most one greedy prompt lost. The greedy bound has
    one prompt of margin on the grid; it catches what broke greedy answers before: the reward model's
    score at the clip hiding the rule (parity 1.0 -> 0.68), a faster actor (lr 3e-4: sums 0.80 -> 0.63),
    the trained actor exported as is (two sums lost in one grid run of six)."""
    run_dir, _ = pipeline_run
    ppo = json.loads((run_dir / "ppo" / "summary.json").read_text())
    sft = json.loads((run_dir / "sft" / "summary.json").read_text())
    # the PPO stage scores the SFT actor itself before training: the same numbers as step 1's
    assert ppo["rule_rate_start"] == pytest.approx(sft["rule_rate"])
    assert ppo["rule_rate_sampled_start"] == pytest.approx(sft["rule_rate_sampled"])
    # the answers PPO samples pass the rule more often than the SFT actor's (256 answers: 39 more pass)
    assert ppo["rule_rate_sampled"] >= ppo["rule_rate_sampled_start"] + 0.15, ppo
    # ... without trading the greedy answers away for reward: the bar, at most one of the 64 prompts lost
    assert ppo["rule_rate"] >= ppo["rule_rate_start"] - 0.02, ppo
    # the exported actor is the preset's midpoint (ppo.delta_scale=0.5); the trained one is scored too
    assert ppo["delta_scale"] == 0.5 and 0.0 <= ppo["rule_rate_trained"] <= 1.0, ppo
    assert ppo["rule_rate_sampled_trained"] >= ppo["rule_rate_sampled_start"] + 0.15, ppo
    rows = [json.loads(x) for x in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rewards = [r["train/reward"] for r in rows if "train/reward" in r]
    first, last = sum(rewards[:10]) / 10, sum(rewards[-10:]) / 10
    assert last > first + 2.0, f"reward did not rise: {first:.3f} -> {last:.3f}"
    assert 0.0 <= ppo["kl"] < 1.0
    for key in ("generation_time_s", "train_time_s", "gen_tokens_per_s", "samples_per_s"):
        assert ppo[key] > 0


@pytest.mark.slow
def test_ppo_and_dpo_compared_from_the_same_sft_start(pipeline_run):
    """pipeline.compare=[dpo]: DPO starts from the pipeline's SFT model, and the pipeline summary
    holds each algorithm's held-out rates before and after (what sweep=robustness tabulates).
    Over the robustness grid (six runs) DPO exported at the preset's dpo.delta_scale=0.5 gained
    +0.242 to +0.348 sampled and changed greedy by -0.016 to +0.062 (trained: +0.328 to +0.438,
    -0.031 to +0.031); the bounds are the issue's bar, as for PPO."""
    run_dir, _ = pipeline_run
    summary = json.loads((run_dir / "summary.json").read_text())
    sft = summary["steps"]["sft"]
    assert set(summary["by_algo"]) == {"ppo", "dpo"}
    for algo in ("ppo", "dpo"):
        r = summary["by_algo"][algo]
        assert (r["rule_rate_sft"], r["rule_rate_sampled_sft"]) == (sft["rule_rate"], sft["rule_rate_sampled"])
        assert r["rule_rate_final"] == summary["steps"][algo]["rule_rate"]
        assert r["rule_rate_trained"] == summary["steps"][algo]["rule_rate_trained"]
    dpo = summary["by_algo"]["dpo"]
    assert summary["steps"]["dpo"]["delta_scale"] == 0.5
    assert dpo["rule_rate_sampled_final"] >= dpo["rule_rate_sampled_sft"] + 0.15, dpo
    assert dpo["rule_rate_final"] >= dpo["rule_rate_sft"] - 0.02, dpo


@pytest.mark.slow
def test_ppo_summary_splits_the_loop_time_and_the_table_shows_it(pipeline_run):
    run_dir, stdout = pipeline_run
    ppo = json.loads((run_dir / "ppo" / "summary.json").read_text())
    split = ppo["time_split"]
    parts = ("generation", "experience", "actor_train", "critic_train", "other")
    assert all(split[f"{p}_s"] > 0 for p in parts[:4]), split  # gae: a critic trains too
    assert sum(split[f"{p}_s"] for p in parts) == pytest.approx(split["wall_s"], rel=1e-6)
    assert sum(split[f"{p}_share"] for p in parts) == pytest.approx(1.0)
    assert split["other_share"] < 0.5, split  # the four timed parts are most of the loop
    assert split["wall_s"] < ppo["wall_time_s"]  # the loop is part of the stage
    assert ppo["generation_time_s"] == split["generation_s"]
    assert "ppo: step-3 time" in stdout and "actor training" in stdout
    last = [json.loads(x) for x in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()
            if '"train/time_wall_s"' in x][-1]  # per step in metrics.jsonl (and W&B): seconds so far and shares
    assert sum(last[f"train/time_{p}_share"] for p in parts) == pytest.approx(1.0)
    assert last["train/time_wall_s"] <= split["wall_s"]


def test_pipeline_table_prints_the_step3_time_split():
    from rlhf.stages.pipeline import table

    split = {"wall_s": 100.0, "generation_s": 40.0, "generation_share": 0.4, "experience_share": 0.2,
             "actor_train_share": 0.25, "critic_train_share": 0.1, "other_share": 0.05}
    out = table({"ppo": {"reward_mean": 1.5, "wall_time_s": 120.0, "time_split": split}})
    assert out.splitlines()[-1] == ("ppo: step-3 time 100 s: generation 40%, experience 20%, actor training 25%, "
                                    "critic training 10%, other 5%")
    assert "step-3 time" not in table({"sft": {"eval_ppl": 3.0}})


@pytest.mark.slow
def test_lora_actor_and_critic_train_with_ptx_and_ema_is_saved(pipeline_run, tmp_path):
    run_dir, _ = pipeline_run
    cli("stage=ppo", f"actor.path={run_dir / 'sft' / 'model'}", f"critic.path={run_dir / 'rm' / 'model'}",
        "lora=r8", "lora.only_optimize_lora=true", "ppo.critic_lora=true", "ppo.ema=true", "ppo.ptx=true",
        "ppo.max_steps=4", f"run_dir={tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ptx = [r["train/ptx_loss"] for r in rows if "train/ptx_loss" in r]
    assert len(ptx) == 4 and all(0 < v < 20 for v in ptx)  # the pre-training loss is mixed in each step
    assert summary["hybrid_path"] == "replica"  # LoRA fused into a generation replica
    assert summary["trainable_params"] < 0.2 * summary["params"]
    before = load_file(str(run_dir / "sft" / "model" / "model.safetensors"))
    after = load_file(str(tmp_path / "model" / "model.safetensors"))
    assert any(not torch.equal(before[k], after[k]) for k in before), "the LoRA actor did not change"
    critic_before = load_file(str(run_dir / "rm" / "model" / "model.safetensors"))
    critic_after = load_file(str(tmp_path / "critic" / "model.safetensors"))
    assert any(not torch.equal(critic_before[k], critic_after[k]) for k in critic_before)
    ema = AutoModelForCausalLM.from_pretrained(tmp_path / "ema")
    ema_w = dict(ema.named_parameters())
    k = next(k for k in before if "q_proj.weight" in k)
    # EMA with beta 0.992 over 4 steps stays between the start and the trained weights, near the start
    d_ema = (ema_w[k].detach() - before[k]).norm()
    d_actor = (after[k] - before[k]).norm()
    assert 0 < d_ema < d_actor


@pytest.mark.slow
def test_chat_answers_scripted_input(pipeline_run):
    run_dir, _ = pipeline_run
    out = cli("stage=chat", f"model.path={run_dir / 'ppo' / 'model'}", "chat.max_new_tokens=16",
              input="What is 2 plus 3?\nclear\nIs 14 even or odd?\nquit\nnever read\n")
    answers = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(answers) == 2, out.stdout  # two questions answered, 'clear' silent, 'quit' stops
    # the trained actor answers in the demo's formats (the values may be wrong: it is a tiny model)
    assert answers[0].startswith("2 plus 3 is") and answers[1].startswith("14 is"), answers


@pytest.mark.slow
def test_several_answers_per_prompt_with_group_baseline_and_periodic_eval(pipeline_run, tmp_path):
    run_dir, _ = pipeline_run
    cli("stage=ppo", f"actor.path={run_dir / 'sft' / 'model'}", f"critic.path={run_dir / 'rm' / 'model'}",
        "ppo.samples_per_prompt=4", "ppo.reward_baseline=group", "ppo.generation_batch_size=8",
        "ppo.train_batch_size=16", "ppo.max_steps=4", "ppo.eval_every=2", f"run_dir={tmp_path}")
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/answers" in r]
    assert [r["train/answers"] for r in train] == [32.0] * 4  # 8 prompts x 4 answers per rollout
    assert all(abs(r["train/actor_loss"]) < 100 and r["train/critic_loss"] >= 0 for r in train)
    # held-out evals at the start, every 2 iterations, and the end (not twice at the last step)
    assert [r["step"] for r in rows if "eval/rule_rate" in r] == [0, 2, 4]
    assert all(0 <= r["eval/rule_rate_sampled"] <= 1 for r in rows if "eval/rule_rate" in r)


@pytest.mark.slow
def test_grpo_pipeline_step_builds_no_critic(pipeline_run, tmp_path):
    """pipeline.algo=grpo: step 3 is the PPO stage with ppo.advantage=grpo, 4 answers to each of a
    quarter of the prompts (same answers per rollout), the KL as a loss term, and no critic."""
    run_dir, _ = pipeline_run
    out = cli("pipeline.algo=grpo", "pipeline.steps=[3]", f"actor.path={run_dir / 'sft' / 'model'}",
              f"critic.path={run_dir / 'rm' / 'model'}", "ppo.max_steps=3", f"run_dir={tmp_path}")
    assert "| grpo | reward_mean |" in out.stdout
    summary = json.loads((tmp_path / "grpo" / "summary.json").read_text())
    assert summary["advantage"] == "grpo" and summary["critic_dir"] is None and summary["critic_loss"] is None
    assert not (tmp_path / "grpo" / "critic").exists() and (tmp_path / "grpo" / "model" / "config.json").exists()
    rows = [json.loads(x) for x in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/answers" in r]
    assert [r["train/answers"] for r in train] == [32.0] * 3  # 8 prompts x 4 answers
    assert all(r["train/kl_loss"] >= 0 and "train/critic_loss" not in r for r in train)


@pytest.mark.slow
def test_reward_function_alone_trains_without_reward_model(pipeline_run, tmp_path):
    """reward.fn=rlhf.data.demo:reward (the task rule) and no reward model: RLOO over 4 answers per
    prompt, no critic. Over the preset's 200 iterations from the seed-1 grid run's SFT model: greedy
    +0.047, sampled +0.340, held-out sums 26 -> 28 of 30 (the README). Here 30 iterations at the
    earlier preset's actor lr 2e-4: greedy +0.016, sampled +0.109 (at the preset's 1e-4, +0.051), for
    the trained actor (``*_trained``; the exported one is the preset's midpoint to the start)."""
    run_dir, _ = pipeline_run
    cli("stage=ppo", f"actor.path={run_dir / 'sft' / 'model'}", "ppo.reward_model=false",
        "reward.fn=rlhf.data.demo:reward", "ppo.advantage=rloo", "ppo.samples_per_prompt=4",
        "ppo.generation_batch_size=8", "ppo.max_steps=30", "ppo.actor_lr=2e-4", f"run_dir={tmp_path}")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["critic_dir"] is None and summary["reward_fn"] == "rlhf.data.demo:reward"
    assert not (tmp_path / "critic").exists()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    fn = [r["train/reward_fn"] for r in rows if "train/reward_fn" in r]
    assert "train/reward_rm" not in rows[-1]
    assert len(fn) == 30 and all(0.0 <= v <= 1.0 for v in fn)  # the rule's pass share of the sampled answers
    assert summary["rule_rate_sampled_trained"] >= summary["rule_rate_sampled_start"] + 0.05, summary
    assert summary["rule_rate_trained"] >= summary["rule_rate_start"] - 0.02, summary


@pytest.mark.slow
def test_failing_reward_function_stops_the_run_naming_it_and_the_prompt(tmp_path):
    out = subprocess.run([sys.executable, "run.py", "stage=ppo", "logger=none", "ppo.reward_model=false",
                          "reward.fn=tests.test_rewards:always_fails", "ppo.advantage=grpo", "ppo.samples_per_prompt=2",
                          "ppo.generation_batch_size=4", "ppo.train_batch_size=8", "ppo.max_answer_len=4",
                          "data.heldout_prompts=2", "data.demo_size=200", f"run_dir={tmp_path}",
                          f"cache_dir={shared_cache()}"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0
    assert "reward.fn=tests.test_rewards:always_fails failed on prompt 'Human: " in out.stderr
    assert "RuntimeError: checker is down" in out.stderr
