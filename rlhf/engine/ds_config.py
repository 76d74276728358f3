"""The only writer of DeepSpeed JSON: derived from the zero and hardware groups plus batch sizes."""
from __future__ import annotations

from typing import Any, Dict, Optional

from rlhf.config import HardwareConfig, ZeroConfig


def build_ds_config(
    zero: ZeroConfig,
    hardware: HardwareConfig,
    *,
    micro_batch_size: int,
    grad_accum: int = 1,
    world_size: int = 1,
    grad_clip: float = 1.0,
    stage: Optional[int] = None,
    train: bool = True,
    offload: Optional[bool] = None,
) -> Dict[str, Any]:
    """DeepSpeed config dict for one engine.

    ``stage`` overrides ``zero.stage`` (step 3 sets actor and critic stages separately);
    ``train=False`` gives an inference engine (frozen reference / reward models): no optimizer
    offload, no gradient settings. ``offload`` overrides ``zero.offload_param`` for such models.
    """
    if micro_batch_size < 1 or grad_accum < 1:
        raise ValueError(
            f"micro_batch_size ({micro_batch_size}) and grad_accum ({grad_accum}) must be >= 1"
        )
    stage = zero.stage if stage is None else stage
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero.stage must be 0, 1, 2 or 3, got {stage}")
    offload_param = zero.offload_param if offload is None else offload
    if stage != 3 and any(zero_pp_keys(zero, hardware, world_size, train).values()):
        raise ValueError(f"ZeRO++ (zero.zero_quantized_weights / zero_hpz_partition_size / zero_quantized_gradients / "
                         f"zero_quantized_nontrainable_weights) needs ZeRO-3, got stage {stage}: use zero=3-pp")
    if offload_param and stage != 3:
        raise ValueError("zero.offload_param needs zero.stage=3 (parameters are only offloaded by ZeRO-3)")
    if zero.offload_optimizer and train and stage == 0:
        raise ValueError("zero.offload_optimizer needs zero.stage >= 1")
    if hardware.precision in ("fp16", "bf16") and hardware.accelerator == "cpu":
        raise ValueError(
            f"hardware.precision={hardware.precision} needs a GPU; the '{hardware.name}' profile "
            "runs on the CPU (use fp32)"
        )
    device = "cpu" if hardware.accelerator == "cpu" else "cuda"

    zero_opt: Dict[str, Any] = {"stage": stage}
    if stage > 0:
        zero_opt.update(
            overlap_comm=zero.overlap_comm,
            contiguous_gradients=zero.contiguous_gradients,
            reduce_bucket_size=zero.reduce_bucket_size,
        )
    if stage in (1, 2):
        zero_opt["allgather_bucket_size"] = zero.allgather_bucket_size
    if stage == 3:
        zero_opt.update(
            stage3_max_live_parameters=zero.stage3_max_live_parameters,
            stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=zero.stage3_param_persistence_threshold,
            stage3_gather_16bit_weights_on_model_save=True,
        )
        zero_opt.update(zero_pp_keys(zero, hardware, world_size, train))
    if train and zero.offload_optimizer and stage > 0:
        zero_opt["offload_optimizer"] = {"device": "cpu", "pin_memory": zero.pin_memory}
    if offload_param:
        zero_opt["offload_param"] = {"device": "cpu", "pin_memory": zero.pin_memory}

    cfg: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum if train else 1,
        "train_batch_size": micro_batch_size * (grad_accum if train else 1) * world_size,
        "zero_optimization": zero_opt,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train:
        cfg["gradient_clipping"] = grad_clip
    if device == "cpu":
        # Offload with a client optimizer: we hand DeepSpeedCPUAdam in, so no forced swap needed.
        cfg["zero_force_ds_cpu_optimizer"] = False
    if hardware.precision == "fp16":
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    elif hardware.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    return cfg


def zero_pp_keys(zero: ZeroConfig, hardware: HardwareConfig, world_size: int, train: bool = True) -> Dict[str, Any]:
    """ZeRO++ / MixZ++ entries of ``zero_optimization`` (DeepSpeed names), only those switched on.

    hpZ's secondary partition must divide the world size; it is capped at the ranks of one node
    (its point is to keep the all-gather inside a node). Frozen engines get no gradient switch."""
    keys: Dict[str, Any] = {}
    if zero.zero_quantized_weights:
        keys["zero_quantized_weights"] = True
    hpz = int(zero.zero_hpz_partition_size)
    if hpz > 1:
        hpz = min(hpz, int(hardware.procs_per_node), world_size)
        if world_size % hpz:
            raise ValueError(f"zero.zero_hpz_partition_size={zero.zero_hpz_partition_size} must divide the "
                             f"{world_size} ranks (use the GPUs of one node)")
        if hpz > 1:
            keys["zero_hpz_partition_size"] = hpz
    if zero.zero_quantized_gradients and train:
        keys["zero_quantized_gradients"] = True
    if zero.zero_quantized_nontrainable_weights:
        keys["zero_quantized_nontrainable_weights"] = True
    return keys
