"""The DeepSpeed JSON is derived from the zero + hardware groups and the batch settings."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from rlhf.config import HardwareConfig, ZeroConfig
from rlhf.engine.ds_config import build_ds_config
from tests.conftest import compose_cfg


def groups(*overrides):
    cfg = compose_cfg(*overrides)
    return (OmegaConf.to_object(cfg.zero), OmegaConf.to_object(cfg.hardware))


@pytest.mark.parametrize("option,stage,opt_off,param_off", [
    ("0", 0, False, False), ("1", 1, False, False), ("2", 2, False, False), ("3", 3, False, False),
    ("2-offload", 2, True, False), ("3-offload", 3, True, True)])
def test_zero_group_maps_to_deepspeed_json(option, stage, opt_off, param_off):
    zero, hw = groups(f"zero={option}")
    ds = build_ds_config(zero, hw, micro_batch_size=4, grad_accum=2, world_size=2, grad_clip=0.5)
    z = ds["zero_optimization"]
    assert z["stage"] == stage
    assert ("offload_optimizer" in z) == opt_off
    assert ("offload_param" in z) == param_off
    assert ds["train_batch_size"] == 4 * 2 * 2
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert "fp16" not in ds and "bf16" not in ds  # the cpu profile trains in fp32


def test_precision_follows_hardware():
    zero, hw = groups("hardware=a6000", "zero=2")
    assert build_ds_config(zero, hw, micro_batch_size=1)["fp16"]["enabled"] is True
    zero, hw = groups("hardware=h100", "zero=3")
    assert build_ds_config(zero, hw, micro_batch_size=1)["bf16"]["enabled"] is True


def test_stage_override_and_inference_engine():
    zero, hw = groups("zero=2-offload")
    ds = build_ds_config(zero, hw, micro_batch_size=2, stage=3, train=False)
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and "offload_optimizer" not in z and "gradient_clipping" not in ds
    assert ds["gradient_accumulation_steps"] == 1


def test_bad_settings_name_the_key():
    hw = HardwareConfig(name="cpu")
    with pytest.raises(ValueError, match="offload_param"):
        build_ds_config(ZeroConfig(stage=2, offload_param=True), hw, micro_batch_size=1)
    with pytest.raises(ValueError, match="offload_optimizer"):
        build_ds_config(ZeroConfig(stage=0, offload_optimizer=True), hw, micro_batch_size=1)
    with pytest.raises(ValueError, match="precision"):
        build_ds_config(ZeroConfig(), HardwareConfig(name="cpu", precision="fp16"), micro_batch_size=1)
    with pytest.raises(ValueError, match="micro_batch_size"):
        build_ds_config(ZeroConfig(), hw, micro_batch_size=0)
