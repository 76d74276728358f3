"""Bad input fails early with a message that names the key or file to fix."""
from __future__ import annotations

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
    from rlhf.stages import ppo

    cfg = compose_cfg("stage=ppo", *QUICK, *overrides, run_dir=tmp_path)
    with pytest.raises(ValueError, match=match):
        ppo.run(cfg)


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
