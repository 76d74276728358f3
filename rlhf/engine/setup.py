"""Distributed setup, DeepSpeed engines, and full-weight export under any ZeRO stage."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import socket
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional

import numpy as np
import torch
import torch.distributed as dist

from rlhf.config import HardwareConfig, ZeroConfig
from rlhf.engine.ds_config import build_ds_config

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(hardware: HardwareConfig, timeout_s: Optional[float] = None) -> tuple[int, int]:
    """Join (or, for one inline process, create) the process group. Returns (rank, world_size).

    Rank workers started by a launcher find RANK/WORLD_SIZE set; an inline run is a group of one,
    which DeepSpeed still needs. ``timeout_s`` (``launch.timeout_s``) bounds every collective: a
    rank that stops answering ends the run after that long instead of DeepSpeed's 30 minutes.
    """
    from datetime import timedelta

    import deepspeed

    from rlhf.console import op_build_notice, swallow_stdout

    kw = {"timeout": timedelta(seconds=float(timeout_s))} if timeout_s else {}
    if kw:  # groups DeepSpeed creates later (data parallel, ZeRO) take torch's default, not the world's
        from torch.distributed import distributed_c10d as c10d

        c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = kw["timeout"]

    if not dist.is_initialized():
        op_build_notice()
        if "WORLD_SIZE" not in os.environ:
            # One inline process: an in-memory store, so no TCP port can collide with another run.
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
            os.environ["MASTER_PORT"] = str(hardware.master_port or free_port())
            dist.init_process_group(hardware.backend, store=dist.HashStore(), rank=0, world_size=1, **kw)
        with swallow_stdout():  # DeepSpeed prints a line each time it loads its shared-memory op
            deepspeed.init_distributed(dist_backend=hardware.backend, verbose=False, **kw)
    return dist.get_rank(), dist.get_world_size()


def device_for(hardware: HardwareConfig) -> torch.device:
    if hardware.accelerator == "cuda":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def dtype_for(precision: str, model_dtype: str = "auto") -> torch.dtype:
    name = precision if model_dtype == "auto" else model_dtype
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def set_threads(hardware: HardwareConfig) -> None:
    """torch's intra-op CPU threads from ``hardware.threads`` (0 = leave torch's default): the
    same profile gives the same numerics whatever machine it runs on."""
    if hardware.threads < 0:
        raise ValueError(f"hardware.threads={hardware.threads}: must be >= 0 (0 = torch's default)")
    if hardware.threads:
        torch.set_num_threads(int(hardware.threads))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(values: Dict[str, float]) -> Dict[str, float]:
    """Average a dict of floats over ranks (identity for one rank)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1) or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def all_gather_cat(t: torch.Tensor, device) -> torch.Tensor:
    """Concatenation over ranks of equally shaped tensors (moved to ``device`` for the collective,
    NCCL needs GPU tensors; returned on the CPU). Identity for one rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t.cpu()
    t = t.to(device)
    parts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.cat(parts).cpu()


@dataclass
class OptimSpec:
    """What one trained engine needs besides the model: plain values from a stage's section."""

    lr: float
    weight_decay: float
    betas: List[float]
    eps: float
    scheduler: str
    warmup_steps: int
    total_steps: int
    micro_batch_size: int
    grad_accum: int
    grad_clip: float


def make_optimizer(param_groups: List[dict], spec: OptimSpec, zero: ZeroConfig, hardware: HardwareConfig):
    """AdamW; DeepSpeedCPUAdam when the optimizer is offloaded, FusedAdam on CUDA, torch's fused
    AdamW on the CPU (one kernel over all tensors: ~4x faster steps than the per-tensor loop)."""
    betas = tuple(spec.betas)
    if zero.offload_optimizer and zero.stage > 0:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=spec.lr, betas=betas, eps=spec.eps, adamw_mode=True)
    if hardware.accelerator == "cuda":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(param_groups, lr=spec.lr, betas=betas, eps=spec.eps, adam_w_mode=True)
    return torch.optim.AdamW(param_groups, lr=spec.lr, betas=betas, eps=spec.eps, fused=True)


def make_scheduler(optimizer, spec: OptimSpec):
    from transformers import get_scheduler

    names = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
    if spec.scheduler not in names:
        raise ValueError(f"scheduler must be one of {sorted(names)}, got '{spec.scheduler}'")
    return get_scheduler(
        names[spec.scheduler],
        optimizer,
        num_warmup_steps=spec.warmup_steps,
        num_training_steps=max(spec.total_steps, 1),
    )


def build_train_engine(
    model: torch.nn.Module,
    param_groups: List[dict],
    spec: OptimSpec,
    zero: ZeroConfig,
    hardware: HardwareConfig,
    world_size: int,
    stage: Optional[int] = None,
):
    """Wrap a model in a DeepSpeed training engine (optimizer and schedule ours, JSON derived)."""
    import deepspeed

    if stage is not None and stage != zero.stage:
        zero = with_stage(zero, stage)
    ds_cfg = build_ds_config(
        zero,
        hardware,
        micro_batch_size=spec.micro_batch_size,
        grad_accum=spec.grad_accum,
        world_size=world_size,
        grad_clip=spec.grad_clip,
    )
    optimizer = make_optimizer(param_groups, spec, zero, hardware)
    scheduler = make_scheduler(optimizer, spec)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg
    )
    if world_size == 1 and zero.stage == 0:
        # One rank, no ZeRO optimizer: the gradient all-reduce (flatten, all-reduce, copy back) is the
        # identity; skipped. ZeRO 1-2 move gradients into their partitions there, so they keep it.
        engine.enable_backward_allreduce = False
    return engine


def build_eval_engine(model, zero: ZeroConfig, hardware: HardwareConfig, world_size: int, *,
                      stage: int, offload: bool = False, micro_batch_size: int = 1):
    """A frozen model under DeepSpeed (ZeRO-3 shards it; stages 0-2 keep a full copy)."""
    import deepspeed

    model.requires_grad_(False)
    if stage != 3:
        return model.to(device_for(hardware)).eval()
    ds_cfg = build_ds_config(
        with_stage(zero, 3, offload_optimizer=False), hardware,
        micro_batch_size=micro_batch_size, world_size=world_size, stage=3, train=False, offload=offload,
    )
    engine, *_ = deepspeed.initialize(model=model, config=ds_cfg)
    engine.module.eval()
    return engine


def with_stage(zero, stage: int, **changes) -> ZeroConfig:
    """A copy of the zero group (dataclass or DictConfig) with another stage; parameter offload
    only survives on stage 3."""
    from dataclasses import is_dataclass, replace

    from omegaconf import OmegaConf

    if not is_dataclass(zero):
        zero = OmegaConf.to_object(zero)
    return replace(zero, stage=stage, offload_param=zero.offload_param and stage == 3, **changes)


# ---------------------------------------------------------------- sharded loading (ZeRO-3)

_SHARDED: List[dict] = []  # DeepSpeed configs of the enclosing sharded_loading blocks (innermost last)
_DEFAULT: List[dict] = []  # the running stage's (set_sharded_loading), used outside any block


def _zero3_init_config(zero, hardware: HardwareConfig, world_size: int) -> dict:
    return build_ds_config(with_stage(zero, 3, offload_optimizer=False), hardware, micro_batch_size=1,
                           world_size=world_size, stage=3, train=False)


def _shards(zero, stages) -> bool:
    """True when every engine the models go into is ZeRO-3 and ``zero.zero_init`` is on."""
    return bool(getattr(zero, "zero_init", True)) and all(int(s) == 3 for s in stages if s is not None)


@contextlib.contextmanager
def sharded_loading(zero, hardware: HardwareConfig, world_size: int, *, stage: Optional[int] = None):
    """Inside the block, models built by ``rlhf.models.load`` are created already partitioned over the ranks
    (``deepspeed.zero.Init`` through transformers' DeepSpeed integration, ``HfDeepSpeedConfig``), so no
    rank ever materialises a whole model; ``from_pretrained`` loads each checkpoint tensor into its shards.
    A no-op unless ``stage`` (default ``zero.stage``) is 3 and ``zero.zero_init``. Yields whether it shards."""
    active = _shards(zero, [zero.stage if stage is None else stage])
    if active:
        _SHARDED.append(_zero3_init_config(zero, hardware, world_size))
    try:
        yield active
    finally:
        if active:
            _SHARDED.pop()


def set_sharded_loading(zero, hardware: HardwareConfig, world_size: int, stages=()) -> bool:
    """The running stage's default for loads outside any ``sharded_loading`` block: on when ``zero.stage`` and
    every per-model stage in ``stages`` (PPO's actor/critic ZeRO stages; None = zero.stage) are 3.
    ``clear_sharded_loading`` ends it (a stage's end)."""
    _DEFAULT.clear()
    active = _shards(zero, [zero.stage, *stages])
    if active:
        _DEFAULT.append(_zero3_init_config(zero, hardware, world_size))
    return active


def clear_sharded_loading() -> None:
    _DEFAULT.clear()


@contextlib.contextmanager
def zero3_construction():
    """What ``rlhf.models.load`` wraps around ``from_pretrained``/``from_config``: transformers' ZeRO-3
    integration is switched on for exactly that call when a sharded loading applies, else nothing."""
    configs = _SHARDED or _DEFAULT
    if not configs:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep = HfDeepSpeedConfig(configs[-1])  # transformers holds a weak reference: keep it alive here
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep


def is_zero3(module: torch.nn.Module) -> bool:
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered(params: Iterable[torch.nn.Parameter], enabled: bool = True, modifier_rank=None):
    """Full parameters inside the block under ZeRO-3; a no-op otherwise."""
    params = [p for p in params if hasattr(p, "ds_id")]
    if not (enabled and params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def full_state_dict(module: torch.nn.Module) -> Optional[Dict[str, torch.Tensor]]:
    """CPU copy of every parameter and buffer (gathered under ZeRO-3); on rank 0, else None."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    state = None
    with gathered(module.parameters()):
        if rank == 0:
            state = {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}
    return state
