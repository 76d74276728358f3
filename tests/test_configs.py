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
    d = CONF / group
    return sorted(p.stem for p in d.glob("*.yaml")) if d.exists() else []


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(group, option):
    cfg = compose_cfg(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if group in ("model", "hardware", "data", "lora"):
        assert cfg[group].name == option
    if group == "stage":
        assert cfg.stage.name == option


def test_zero_options_map_to_stage_and_offload():
    for option, stage, offload in [("0", 0, False), ("1", 1, False), ("2", 2, False), ("3", 3, False),
                                   ("2-offload", 2, True), ("3-offload", 3, True)]:
        cfg = compose_cfg(f"zero={option}")
        assert (cfg.zero.stage, cfg.zero.offload_optimizer) == (stage, offload)


def test_default_is_the_tiny_embedded_run():
    cfg = compose_cfg()
    assert (cfg.model.name, cfg.data.name, cfg.hardware.name) == ("tiny-opt", "demo", "cpu")
    assert cfg.model.init == "tiny"
    # the tiny preset (model_hardware/tiny_demo.yaml) applies over the stage defaults
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
    bad = CONF / "debug" / "_typo_test.yaml"
    bad.write_text("# @package _global_\nsft:\n  learning_rate: 0.1\n")
    try:
        with pytest.raises(ConfigCompositionException) as err:
            compose_cfg("debug=_typo_test")
        assert "learning_rate" in str(err.value) + str(err.value.__cause__)
    finally:
        bad.unlink()


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
