"""Hybrid engine: the actor switches between ZeRO training and fast generation.

Lifecycle of one rollout (verl's verbs): ``to_generation()`` -> ``generate_sequences()`` ->
``to_training()``. Three generation paths, chosen once at start and logged with the reason:

- ``replica``: a plain (non-DeepSpeed) copy of the actor receives the current weights once per
  rollout: under ZeRO-3 all shards are gathered in one collective instead of per layer per token,
  LoRA adapters are fused into the base weights, and generation runs with a KV cache and no
  DeepSpeed hooks. Costs one extra full copy of the actor's weights.
- ``per_layer``: generate with the ZeRO-3 module itself: DeepSpeed gathers each layer's shards for
  every generated token (the memory-lean fallback, used when the replica does not fit or when
  ``ppo.hybrid_gather=per_layer``).
- ``direct``: ZeRO 0-2 without LoRA: the training module already holds full weights; generate with
  it in eval mode.

DeepSpeed's own hybrid engine (CUDA inference kernels, tensor-parallel generation) is not used on
the CPU or for families it has no inference container for; the start-up log says so.
"""
from __future__ import annotations

import logging
import time
from typing import Dict, Optional

import torch
import torch.distributed as dist

from rlhf.engine.setup import gathered, is_zero3

log = logging.getLogger(__name__)

PATHS = ("replica", "per_layer", "direct")


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens (left padding safe), as transformers' generate does."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def _bytes_of(module: torch.nn.Module) -> int:
    return sum((getattr(p, "ds_numel", None) or p.numel()) * p.element_size() for p in module.parameters())


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return psutil.virtual_memory().available


def choose_path(module, requested: str, device: torch.device, lora: bool) -> tuple[str, str]:
    """(path, reason) for this actor."""
    if requested not in ("once", "per_layer"):
        raise ValueError(f"ppo.hybrid_gather must be 'once' or 'per_layer', got '{requested}'")
    zero3 = is_zero3(module)
    if not zero3 and not lora:
        return "direct", "weights are whole on every rank (ZeRO 0-2) and there are no adapters to fuse"
    if zero3 and requested == "per_layer":
        return "per_layer", "ppo.hybrid_gather=per_layer"
    need = _bytes_of(module)
    free = _free_memory(device)
    if need * 1.2 > free:
        if zero3:
            return "per_layer", (f"a full replica needs {need / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB "
                                 "is free: falling back to per-layer gathering")
        return "direct", f"no room for a fused replica ({need / 2**30:.2f} GiB); generating with LoRA unfused"
    why = "gather ZeRO-3 shards once per rollout" if zero3 else "fuse LoRA adapters for generation"
    return "replica", f"{why} ({need / 2**30:.3f} GiB replica)"


class HybridEngine:
    """Wraps the actor's DeepSpeed engine; see the module docstring for the paths."""

    def __init__(self, engine, tokenizer, *, gather: str = "once", device: Optional[torch.device] = None,
                 lora: bool = False, accelerator: str = "cpu"):
        self.engine = engine
        self.tokenizer = tokenizer
        self.device = device or torch.device("cpu")
        self.path, reason = choose_path(engine.module, gather, self.device, lora)
        self.replica: Optional[torch.nn.Module] = None
        self.timings: Dict[str, float] = {"sync_s": 0.0, "generate_s": 0.0}
        ds_he = ("needs CUDA" if accelerator != "cuda" else
                 "not wired here; the replica path gives the same gather-once/fused-LoRA behaviour")
        log.info("hybrid engine: generation path '%s' (%s); DeepSpeed's inference-kernel hybrid engine: %s",
                 self.path, reason, ds_he)
        self.reason = reason
        self._was_training = True

    # -- lifecycle -------------------------------------------------------------------------
    def full_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """Current actor weights with LoRA merged (ZeRO-3 gathered once), as a state dict."""
        from rlhf.models.load import merged_state

        module = self.engine.module
        with gathered(module.parameters()):
            hf_model, state = merged_state(module)
            state = state if state is not None else hf_model.state_dict()
            return {k: v.detach().clone() for k, v in state.items()}

    def to_generation(self) -> torch.nn.Module:
        """Switch to generation; returns the module to generate with."""
        module = self.engine.module
        self._was_training = module.training
        module.eval()
        if self.path != "replica":
            return module
        from rlhf.models.load import merged_state

        t0 = time.perf_counter()
        if self.replica is None:
            self.replica = self.build_replica()
        with gathered(module.parameters()):  # one collective; copied straight into the replica
            hf_model, state = merged_state(module)
            self.replica.load_state_dict(state if state is not None else hf_model.state_dict(), strict=True)
        self.timings["sync_s"] += time.perf_counter() - t0
        return self.replica

    def to_training(self) -> None:
        """Back to training: the training module is untouched by generation (replica) or only
        switched to eval (direct/per_layer), so restoring the mode restores it exactly."""
        self.engine.module.train(self._was_training)

    def release(self) -> None:
        """Drop the replica (memory back before a long training phase or at the end)."""
        self.replica = None

    def build_replica(self) -> torch.nn.Module:
        from rlhf.models.load import merged_state

        module = self.engine.module
        base, _ = merged_state(module)
        config = base.config
        dtype = next(module.parameters()).dtype
        replica = type(base)._from_config(config, dtype=dtype)  # the trained class itself (custom code too)
        replica.config.use_cache = True
        return replica.to(self.device).eval().requires_grad_(False)

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate_sequences(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *,
                           max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = True,
                           temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
        """[B, P] left-padded prompts -> [B, P + N] sequences (prompt + answer, pad after EOS)."""
        module = self.to_generation()
        t0 = time.perf_counter()
        try:
            synced = self.path == "per_layer" and dist.is_initialized() and dist.get_world_size() > 1
            out = module.generate(
                input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                min_new_tokens=min_new_tokens or None, do_sample=do_sample,
                temperature=temperature if do_sample else None, top_k=(top_k or None) if do_sample else None,
                top_p=top_p if do_sample else None, pad_token_id=self.tokenizer.pad_token_id,
                eos_token_id=self.tokenizer.eos_token_id, synced_gpus=synced, use_cache=True,
            )
        finally:
            self.timings["generate_s"] += time.perf_counter() - t0
            self.to_training()
        if out.shape[1] < input_ids.shape[1] + max_new_tokens:  # every row stopped early: pad to N
            pad = out.new_full((out.shape[0], input_ids.shape[1] + max_new_tokens - out.shape[1]),
                               self.tokenizer.pad_token_id)
            out = torch.cat([out, pad], dim=1)
        return out
