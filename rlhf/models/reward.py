"""Reward / critic model: a base transformer (no LM head) plus a scalar value head.

Step 2 trains it with the pairwise ranking loss; step 3 uses one copy as the frozen reward model
and another as the trained critic. A saved reward model is an HF base-model directory (loadable by
``AutoModel.from_pretrained``) plus ``value_head.safetensors`` holding the head's ``weight``.
"""
from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn

from rlhf.config import ModelConfig

VALUE_HEAD_FILE = "value_head.safetensors"
_HEAD_SEED = 0  # fixed seed of a fresh value head: same checkpoint -> same initial reward model


def _hidden_size(config) -> int:
    # OPT-350m projects the decoder output to word_embed_proj_dim (512) != hidden_size (1024)
    for key in ("word_embed_proj_dim", "hidden_size", "n_embd", "d_model"):
        value = getattr(config, key, None)
        if value:
            return int(value)
    raise ValueError(f"cannot tell the hidden size of a {type(config).__name__}")


class RewardModel(nn.Module):
    """``base`` transformer + ``v_head = Linear(hidden, 1, bias=False)``.

    ``forward`` gives per-token values [B, T] (float32); ``score`` the value at each row's last
    real token. Position ids are derived from ``attention_mask``, so a left-padded row scores the
    same as the unpadded sequence.
    """

    def __init__(self, base: nn.Module, pad_token_id: int):
        super().__init__()
        self.base = base
        self.pad_token_id = pad_token_id
        hidden = _hidden_size(base.config)
        param = next(base.parameters())
        self.v_head = nn.Linear(hidden, 1, bias=False, device=param.device, dtype=param.dtype)

    @property
    def config(self):
        return self.base.config

    def _accepts_position_ids(self) -> bool:
        base = self.base.get_base_model() if hasattr(self.base, "get_base_model") else self.base
        return "position_ids" in inspect.signature(base.forward).parameters

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: [B, T] -> values [B, T] float32."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self._accepts_position_ids():
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        hidden = self.base(**kwargs)[0]  # [B, T, H]
        return self.v_head(hidden).squeeze(-1).float()

    @staticmethod
    def last_index(attention_mask: torch.Tensor) -> torch.Tensor:
        """[B, T] mask -> [B] index of the last position where the mask is 1 (any padding side)."""
        T = attention_mask.shape[-1]
        return T - 1 - attention_mask.long().flip(-1).argmax(-1)

    def score(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """[B] value at the last real token of each row."""
        values = self.forward(input_ids, attention_mask)
        idx = self.last_index(attention_mask)
        return values.gather(1, idx.unsqueeze(1)).squeeze(1)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Recompute the base's layer activations in backward (non-reentrant by default)."""
        kwargs = gradient_checkpointing_kwargs or {"use_reentrant": False}
        if hasattr(self.base, "activation_checkpointing_enable"):  # transformers >= 5 name
            self.base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        self.base.config.use_cache = False

    activation_checkpointing_enable = gradient_checkpointing_enable

    def gradient_checkpointing_disable(self) -> None:
        if hasattr(self.base, "activation_checkpointing_disable"):
            self.base.activation_checkpointing_disable()
        else:
            self.base.gradient_checkpointing_disable()

    activation_checkpointing_disable = gradient_checkpointing_disable


def _fresh_head(model: RewardModel) -> None:
    w = model.v_head.weight
    gen = torch.Generator().manual_seed(_HEAD_SEED)
    init = torch.randn(w.shape, generator=gen) / (w.shape[1] + 1) ** 0.5
    with torch.no_grad():
        w.copy_(init.to(w.dtype))


def load_reward_model(
    model_cfg: ModelConfig,
    path: str,
    *,
    dtype: torch.dtype = torch.float32,
    disable_dropout: bool = False,
    init: str | None = None,
) -> RewardModel:
    """Reward model from ``path``: a saved reward model (base + value_head.safetensors) or any
    causal-LM/base checkpoint (the LM head is dropped and a value head initialised from a fixed
    seed, normal with std 1/sqrt(hidden+1)). Same loading rules as ``load_causal_lm``."""
    from transformers import AutoModel

    from rlhf.models.load import _load, effective_init

    init = init or effective_init(model_cfg, path)
    base = _load(AutoModel, model_cfg, path, dtype, disable_dropout, init)
    pad = base.config.pad_token_id
    if pad is None:
        pad = base.config.eos_token_id if isinstance(base.config.eos_token_id, int) else 0
    model = RewardModel(base, pad)
    head = Path(path) / VALUE_HEAD_FILE
    if init != "random" and head.is_file():
        from safetensors.torch import load_file

        state = load_file(str(head))
        model.v_head.load_state_dict({"weight": state["weight"].to(model.v_head.weight.dtype)})
    else:
        _fresh_head(model)
    return model


def save_reward_model(model: RewardModel, tokenizer, out_dir: str | Path) -> None:
    """Atomically write the base as an HF directory (LoRA merged, model unchanged), the
    tokenizer, and ``value_head.safetensors``."""
    from safetensors.torch import save_file

    from rlhf.models.load import atomic_dir, merged_state

    hf_model, state = merged_state(model.base)

    def write(tmp: Path) -> None:
        hf_model.save_pretrained(str(tmp), state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        save_file({"weight": model.v_head.weight.detach().cpu().contiguous()}, str(tmp / VALUE_HEAD_FILE))

    atomic_dir(out_dir, write)
