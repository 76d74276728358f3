"""Bad input fails early with a message that names the key or file to fix."""
from __future__ import annotations

import re

import pytest

from rlhf.stages import get_stage, pipeline, sft
from tests.conftest import compose_cfg

QUICK = ("logger=none", "logger.progress=false", "data.demo_size=400")


def test_unknown_stage_lists_the_known_ones():
    with pytest.raises(ValueError, match="stage.name='sfft'.*known stages: .*sft"):
        get_stage("sfft")


def test_missing_model_path_names_the_key(tmp_path):
    cfg = compose_cfg("stage=sft", *QUICK, "model=opt-125m", f"model.path={tmp_path / 'no-such-model'}",
                      run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="model.path=.*no-such-model"):
        sft.run(cfg)


def test_model_dir_without_weights_names_it(tmp_path):
    d = tmp_path / "empty-model"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "opt"}')
    cfg = compose_cfg("stage=sft", *QUICK, "model=opt-125m", f"model.path={d}", run_dir=tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no weights"):
        sft.run(cfg)


def test_step3_without_the_earlier_steps_output(tmp_path):
    cfg = compose_cfg("stage=pipeline", *QUICK, "pipeline.steps=[3]", run_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="needs the sft step's model.*pipeline.steps.*actor.path"):
        pipeline.plan(cfg, tmp_path)


def test_step3_without_a_reward_model_needs_no_step2_model(tmp_path):
    """GRPO scored by reward.fn alone loads neither a critic nor a reward model: the pipeline does not
    ask for the step-2 model (with the reward model on, it does)."""
    sft_dir = tmp_path / "sft-model"
    sft_dir.mkdir()
    free = ("stage=pipeline", *QUICK, "pipeline.steps=[3]", "pipeline.algo=grpo", f"actor.path={sft_dir}")
    (_, sub), = pipeline.plan(compose_cfg(*free, "ppo.reward_model=false", run_dir=tmp_path), tmp_path)
    assert sub.actor.path == str(sft_dir) and sub.critic.path is None
    with pytest.raises(FileNotFoundError, match="needs the rm step's model.*critic.path"):
        pipeline.plan(compose_cfg(*free, run_dir=tmp_path), tmp_path)


def test_a_pipeline_trains_no_reward_model_that_step3_would_not_load(tmp_path):
    """The default steps [1, 2, 3] with GRPO scored by reward.fn alone: no step 2; with the reward
    model on, or PPO's critic, or a compared PPO step, step 2 runs; without step 3 in the run, too."""
    def names(*o):
        return [name for name, _ in pipeline.plan(compose_cfg("stage=pipeline", *QUICK, *o, run_dir=tmp_path), tmp_path)]

    free = ("pipeline.algo=grpo", "reward.fn=rlhf.data.demo:reward")
    assert names(*free, "ppo.reward_model=false") == ["sft", "grpo"]
    assert names(*free) == ["sft", "rm", "grpo"]
    assert names(*free, "ppo.reward_model=false", "pipeline.compare=[ppo]") == ["sft", "rm", "grpo", "ppo"]  # ppo's critic
    assert names(*free, "ppo.reward_model=false", "pipeline.steps=[1,2]") == ["sft", "rm"]


@pytest.mark.parametrize("overrides, match", [
    (("lora=r8", "lora.target_modules=[query_key_value]"), "query_key_value"),  # a LoRA target that does not exist
    (("sft.grad_accum=100000",), "sft.grad_accum=100000"),  # accumulation larger than an epoch
    (("model=opt-125m", "model.family=chatglm", "model.path=THUDM/chatglm-6b"), "trust_remote_code"),  # needs the opt-in
    (("hardware.precision=fp16",), "hardware.precision=fp16"),  # half precision on the CPU profile
])
def test_bad_sft_settings_name_the_key(tmp_path, overrides, match):
    cfg = compose_cfg("stage=sft", *QUICK, *overrides, run_dir=tmp_path)
    with pytest.raises(ValueError, match=match):
        sft.run(cfg)


@pytest.mark.parametrize("overrides, match", [
    (("ppo.reward_baseline=group",), "ppo.reward_baseline=group needs ppo.samples_per_prompt >= 2"),
    (("ppo.reward_baseline=mean", "ppo.samples_per_prompt=2"), "ppo.reward_baseline='mean'"),
    (("ppo.samples_per_prompt=3", "ppo.generation_batch_size=4", "ppo.train_batch_size=8"),
     "ppo.generation_batch_size=4 x ppo.samples_per_prompt=3 = 12 answers.*ppo.train_batch_size=8"),
])
def test_ppo_sampling_settings_name_the_key(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):  # at compose time, before any model loads
        compose_cfg("stage=ppo", *QUICK, *overrides, run_dir=tmp_path)


def test_a_stage_trains_the_role_it_reads_and_refuses_one_it_would_ignore():
    # stage=rm trains the reward model: reward= picks it (model= too)
    cfg = compose_cfg("stage=rm", "reward=tiny-llama")
    assert (cfg.model.name, cfg.model.key) == ("tiny-llama", "reward")
    # step 1 reads no reward model: choosing one stops at compose time, naming what works
    with pytest.raises(ValueError, match="stage=sft does not use `reward`.*model= / model.path="):
        compose_cfg("stage=sft", "reward=tiny-llama")
    with pytest.raises(ValueError, match="stage=rm does not use `actor`"):
        compose_cfg("stage=rm", "actor.path=/tmp/x")
    with pytest.raises(ValueError, match="critic.path is read by stage=ppo"):
        compose_cfg("stage=sft", "critic.path=/tmp/x")


@pytest.mark.parametrize("override,message", [
    ("sft.grad_accum=0", "sft.grad_accum=0: must be >= 1"),
    ("sft.epochs=0", "sft.epochs=0: must be >= 1"),
    ("checkpoint.every_n_steps=-1", "checkpoint.every_n_steps=-1: must be >= 0"),
    ("sft.max_seq_len=0", "sft.max_seq_len=0: must be >= 1"),
    ("model.init=randm", "model.init='randm': expected one of pretrained, random, tiny"),
    ("stage=dpo dpo.loss=hinge2", "dpo.loss='hinge2': not a DPO loss"),
    ("ppo.reward_baseline=group", "ppo.reward_baseline=group needs ppo.samples_per_prompt >= 2"),
    ("zero.offload_param=true", "zero.offload_param=true needs zero.stage=3"),
    ("ppo.delta_scale=0", "ppo.delta_scale=0.0: must be > 0"),
    ("stage=dpo dpo.delta_scale=-0.5", "dpo.delta_scale=-0.5: must be > 0"),
    ("stage=ppo actor.init=random ppo.delta_scale=0.5", "ppo.delta_scale=0.5 needs the start's weights, but "
                                                        "actor.init=random starts from none"),
    ("stage=sft dpo.lr=1e-5", "dpo.lr=1e-5: stage=sft does not read `dpo.*` (this run reads sft.*); set sft.lr"),
    ("pipeline.algo=dpo ppo.kl_ctl=0.2", "ppo.kl_ctl=0.2: stage=pipeline does not read `ppo.*` (this run reads dpo.*, "
                                         "sft.*)"),
])
def test_bad_values_fail_at_compose_naming_the_key(override, message):
    import time

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(message)):
        compose_cfg(*override.split())
    assert time.perf_counter() - t0 < 5  # no model, data or rank touched


def test_optimized_metric_names_what_a_stage_reports(tmp_path):
    cfg = compose_cfg("stage=sft", *QUICK, "sft.max_steps=1", "data.heldout_prompts=2", "data.heldout_samples=0",
                      "optimized_metric=eval_ppl", run_dir=tmp_path / "ok")
    out = sft.run(cfg)
    assert out["objective"] == out["eval_ppl"]
    cfg = compose_cfg("stage=sft", *QUICK, "sft.max_steps=1", "data.heldout_prompts=2", "data.heldout_samples=0",
                      "optimized_metric=eval_pll", run_dir=tmp_path / "bad")
    with pytest.raises(KeyError, match="optimized_metric=eval_pll: stage sft reports no such metric.*eval_ppl"):
        sft.run(cfg)
