"""Every group option composes over the schema; typos and bad values fail naming the key."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
import yaml
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from rlhf import config as schema
from tests.conftest import CONF, ROOT, compose_cfg

GROUPS = ["model", "stage", "hardware", "zero", "lora", "data", "logger", "debug", "experiment", "sweep",
          "hparams_search", "model_hardware"]


def options(group: str) -> list[str]:
    """Every option of a group, including those in subfolders (experiment=dschat/opt-13b-dgx8)."""
    d = CONF / group
    return sorted(p.relative_to(d).with_suffix("").as_posix() for p in d.rglob("*.yaml")) if d.exists() else []


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_cfg(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group in ("model", "hardware", "data", "lora"):
        assert cfg[group].name == option
    if group == "stage":
        assert cfg.stage.name == option


def test_experiment_presets_override_groups_and_globals():
    cfg = compose_cfg("experiment=dschat/opt-1.3b-a6000")
    assert (cfg.actor.name, cfg.reward.name, cfg.hardware.name, cfg.lora.rank) == ("opt-1.3b", "opt-350m", "a6000", 128)
    assert cfg.lora.only_optimize_lora and cfg.sft.grad_accum == 8 and cfg.stage.name == "pipeline"
    cfg = compose_cfg("experiment=dschat/opt-13b-dgx8")
    assert (cfg.actor.name, cfg.reward.name, cfg.zero.stage, cfg.data.name) == ("opt-13b", "opt-350m", 3, "blend-dschat")
    assert len(cfg.data.sources) == 6
    mixz = compose_cfg("experiment=dschat/llama2-70b-mixz").zero
    assert mixz.zero_quantized_nontrainable_weights and mixz.zero_hpz_partition_size == 8
    # _self_ comes first in config.yaml: a preset's global (here a group file's) beats the file's own default
    assert compose_cfg("seed=7").seed == 7
    # the command line still wins over a preset
    assert compose_cfg("experiment=dschat/opt-13b-dgx8", "reward=opt-1.3b").reward.name == "opt-1.3b"


def test_zero_options_map_to_stage_and_offload():
    for option, stage, offload in [("0", 0, False), ("1", 1, False), ("2", 2, False), ("3", 3, False),
                                   ("2-offload", 2, True), ("3-offload", 3, True)]:
        cfg = compose_cfg(f"zero={option}")
        assert (cfg.zero.stage, cfg.zero.offload_optimizer) == (stage, offload)


def test_default_is_the_tiny_embedded_run():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.data.name, cfg.hardware.name) == ("tiny-opt", "demo", "cpu")
    assert cfg.model.init == "tiny"
    # the tiny preset (model_hardware/tiny_hparams.yaml) applies over the stage defaults
    assert cfg.sft.max_seq_len == 64


def test_tiny_preset_follows_model_and_hardware():
    assert compose_cfg("model=tiny-llama", "hardware=cpu2").sft.max_seq_len == 64
    assert compose_cfg("model=opt-1.3b", "hardware=a6000").sft.max_seq_len == 512


def test_misspelled_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException, match="sft.lrr"):
        compose_cfg("sft.lrr=0.1")


def test_wrong_type_fails_naming_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg("sft.lr=fast")
    assert "sft.lr" in str(err.value.__cause__)


def test_unknown_group_option_fails_naming_it():
    with pytest.raises(Exception, match="zero/7"):
        compose_cfg("zero=7")
    with pytest.raises(Exception, match="model/opt-7b"):
        compose_cfg("model=opt-7b")


def test_yaml_typo_in_a_group_file_is_caught(tmp_path):
    """A key that is not in the schema, written in a group file, fails at compose time."""
    # the file lives in a directory of the test's own, added to Hydra's search path: nothing is
    # written into conf/
    (tmp_path / "debug").mkdir()
    (tmp_path / "debug" / "_typo_test.yaml").write_text("# @package _global_\nsft:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigCompositionException) as err:
        compose_cfg(f"hydra.searchpath=[file://{tmp_path}]", "debug=_typo_test")
    assert "learning_rate" in str(err.value) + str(err.value.__cause__)
    assert not (CONF / "debug" / "_typo_test.yaml").exists()


def _keys_with_values(text: str) -> list[str]:
    return [ln for ln in text.splitlines()
            if re.match(r"^\s*[A-Za-z_][\w-]*:\s*\S", ln) and not ln.lstrip().startswith("#")]


@pytest.mark.parametrize("path", sorted(p for p in CONF.rglob("*.yaml") if p.name != "config.yaml"),
                         ids=lambda p: str(p.relative_to(CONF)))
def test_every_key_in_group_files_is_commented(path):
    missing = [ln for ln in _keys_with_values(path.read_text())
               if "#" not in ln and not ln.lstrip().startswith("- ")]
    assert not missing, f"{path.relative_to(ROOT)}: keys without a comment: {missing}"


def test_stage_files_document_every_key_of_their_section():
    sections = {"sft": schema.SFTConfig, "rm": schema.RMConfig, "dpo": schema.DPOConfig, "ppo": schema.PPOConfig,
                "pretrain": schema.PretrainConfig, "eval": schema.EvalConfig}
    checked = 0
    for name, cls in sections.items():
        path = CONF / "stage" / f"{name}.yaml"
        if not path.exists():
            continue
        listed = set(yaml.safe_load(path.read_text())[name])
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields - listed == set(), f"conf/stage/{name}.yaml does not document {sorted(fields - listed)}"
        checked += 1
    assert checked >= 1


def test_cfg_job_prints_the_composed_config():
    out = subprocess.run([sys.executable, "run.py", "--cfg", "job", "zero=3", "lora=r8"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    cfg = yaml.safe_load(out.stdout)
    assert cfg["zero"]["stage"] == 3 and cfg["lora"]["rank"] == 8
    assert cfg["model"]["path"] == "tiny-opt"


def test_cli_typo_fails_naming_key():
    out = subprocess.run([sys.executable, "run.py", "sft.epochs_=2"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0
    assert "sft.epochs_" in out.stderr


def test_stage_yaml_and_schema_defaults_agree():
    """One source of each default: what a stage file documents is what the schema holds, so a
    component built from the schema alone (tests, sweeps) and a composed run agree."""
    import yaml
    from omegaconf import OmegaConf

    from rlhf.config import Config

    schema = OmegaConf.structured(Config)
    checked = 0
    for f in sorted((CONF / "stage").glob("*.yaml")):
        for section, values in (yaml.safe_load(f.read_text()) or {}).items():
            if section in ("defaults", "stage") or not isinstance(values, dict):
                continue
            for key, value in values.items():
                assert OmegaConf.select(schema, f"{section}.{key}") == value, (f.name, f"{section}.{key}")
                checked += 1
    assert checked > 50


@pytest.mark.parametrize("group", ["debug", "experiment"])
def test_every_preset_changes_the_default(group):
    """A preset that composes to exactly the default config does nothing (debug=anomaly once did)."""
    from tests.conftest import compose_cfg

    default = OmegaConf.to_container(compose_cfg(), resolve=True)
    options = sorted(str(p.relative_to(CONF / group).with_suffix("")) for p in (CONF / group).rglob("*.yaml"))
    assert options
    for option in options:
        cfg = OmegaConf.to_container(compose_cfg(f"{group}={option}"), resolve=True)
        assert cfg != default, f"{group}={option} changes nothing"


def test_pipeline_steps_with_compared_algorithms():
    steps = lambda *o: schema.pipeline_steps(compose_cfg("stage=pipeline", *o).pipeline)  # noqa: E731
    assert steps() == [(1, "sft"), (2, "rm"), (3, "ppo")]
    assert steps("pipeline.algo=dpo") == [(1, "sft"), (3, "dpo")]  # DPO needs no reward model
    assert steps("pipeline.algo=dpo", "pipeline.compare=[grpo,dpo]") == [(1, "sft"), (2, "rm"), (3, "dpo"), (3, "grpo")]
    assert steps("pipeline.compare=[dpo,grpo]", "pipeline.steps=[3]") == [(3, "ppo"), (3, "dpo"), (3, "grpo")]
    # a compared PPO-family step makes the reward role one the pipeline reads
    assert compose_cfg("stage=pipeline", "pipeline.algo=dpo", "pipeline.compare=[ppo]", "reward=tiny-llama")
    with pytest.raises(ValueError, match="does not use `reward`"):
        compose_cfg("stage=pipeline", "pipeline.algo=dpo", "reward=tiny-llama")


def test_pipeline_compare_and_critic_free_rules_fail_at_compose():
    with pytest.raises(ValueError, match=r"pipeline.compare=\['sac'\]: sac not a step-3 algorithm"):
        compose_cfg("stage=pipeline", "pipeline.compare=[sac]")
    # the pipeline's step 3 with a critic-free estimator and one answer per prompt: caught before any step runs
    with pytest.raises(ValueError, match="ppo.advantage=rloo has no critic.*ppo.samples_per_prompt >= 2"):
        compose_cfg("stage=pipeline", "ppo.advantage=rloo")
    with pytest.raises(ValueError, match=r"ppo.advantage=rloo: stage=pipeline does not read `ppo.\*`"):
        compose_cfg("stage=pipeline", "pipeline.algo=dpo", "ppo.advantage=rloo")  # no PPO step: not read
