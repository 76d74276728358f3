"""``load_trainable``: the one way every stage builds a model to train or score.

A causal LM (actor, policy, reference, chat) or a reward model (reward, critic), from ``path``
with the loading rules of ``rlhf.models.load`` (family from the checkpoint, safetensors, remote
code only with the opt-in), then dropout as asked, gradient checkpointing, and LoRA adapters on
the family's targets.
"""
from __future__ import annotations

import torch

from rlhf.config import LoraConfig, ModelConfig


def load_trainable(model_cfg: ModelConfig, path: str, *, kind: str = "causal", dtype: torch.dtype = torch.float32,
                   disable_dropout: bool = False, gradient_checkpointing: bool = False,
                   lora: LoraConfig | None = None):
    """``kind``: ``causal`` (AutoModelForCausalLM) or ``reward`` (base + value head). ``lora``: add
    adapters of ``lora.rank`` (None or rank 0: none)."""
    from rlhf.models.load import load_causal_lm, resolve_family
    from rlhf.models.lora import apply_lora
    from rlhf.models.reward import load_reward_model

    if kind not in ("causal", "reward"):
        raise ValueError(f"kind must be 'causal' or 'reward', got {kind!r}")
    loader = load_causal_lm if kind == "causal" else load_reward_model
    model = loader(model_cfg, path, dtype=dtype, disable_dropout=disable_dropout)
    if gradient_checkpointing:
        if kind == "causal":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        else:
            model.gradient_checkpointing_enable()
    if lora is not None and lora.rank > 0:
        model = apply_lora(model, lora, resolve_family(model_cfg, path))
        if gradient_checkpointing and kind == "causal":
            model.enable_input_require_grads()
    return model
