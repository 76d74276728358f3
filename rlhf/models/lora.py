"""LoRA through peft, plus DeepSpeed-Chat's optimizer parameter groups.

``apply_lora`` works on a transformers model (returns a peft model) and on a ``RewardModel``
(the adapters go into its base transformer, the value head stays a plain trainable layer).
"""
from __future__ import annotations

from torch import nn

from rlhf.config import LoraConfig
from rlhf.models.families import Family
from rlhf.models.load import is_peft_model

_NO_DECAY = ("bias", "norm", "layer_norm", "ln_")  # matched case-insensitively in parameter names


def _check_targets(model: nn.Module, targets: list[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    for target in targets:
        if target == "all-linear":  # peft's shorthand
            continue
        if not any(n == target or n.endswith("." + target) for n in names):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"LoRA target module {target!r} (lora.target_modules) matches no module of "
                f"{type(model).__name__}; its linear layers are named: {', '.join(leaves[:30])}"
            )


def apply_lora(model, lora_cfg: LoraConfig, family: Family):
    """Add LoRA adapters of rank ``lora.rank`` (0: return ``model`` unchanged).

    Targets: ``lora.target_modules`` or the family's defaults. ``lora.only_optimize_lora``: only
    adapter weights (and a reward model's value head) require grad; otherwise the base weights
    stay trainable too (DeepSpeed-Chat's default).
    """
    if lora_cfg.rank <= 0:
        return model
    from rlhf.models.reward import RewardModel

    if isinstance(model, RewardModel):
        model.base = apply_lora(model.base, lora_cfg, family)
        return model

    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = list(lora_cfg.target_modules) or list(family.lora_targets)
    _check_targets(model, targets)
    is_causal_lm = model.get_output_embeddings() is not None if hasattr(model, "get_output_embeddings") else False
    peft_cfg = PeftLoraConfig(
        r=int(lora_cfg.rank),
        lora_alpha=float(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM" if is_causal_lm else None,
    )
    was_trainable = [p for p in model.parameters() if p.requires_grad]
    peft_model = get_peft_model(model, peft_cfg)  # freezes every non-adapter parameter
    if not lora_cfg.only_optimize_lora:
        for p in was_trainable:  # DeepSpeed-Chat default: base weights keep training too
            p.requires_grad_(True)
    return peft_model


def merge_lora(model):
    """Fold the adapters into the base weights (peft ``merge_and_unload``); identity otherwise."""
    from rlhf.models.reward import RewardModel

    if isinstance(model, RewardModel):
        model.base = merge_lora(model.base)
        return model
    if is_peft_model(model):
        return model.merge_and_unload()
    return model


def lora_param_groups(model: nn.Module, lora_cfg: LoraConfig, base_lr: float, weight_decay: float) -> list[dict]:
    """Optimizer parameter groups (DeepSpeed-Chat's ``get_optimizer_grouped_parameters``).

    decay: weights at ``base_lr`` with ``weight_decay``; no-decay: biases and norm weights
    (names containing bias/norm/layer_norm/ln_) with weight decay 0; lora: adapter weights
    (``lora_`` in the name) at ``lora.lr`` (DeepSpeed-Chat's separate lora_learning_rate) or, when it
    is unset, at ``base_lr``, the role's own rate (so ``ppo.actor_lr`` moves a LoRA-only actor), with
    ``weight_decay``. Frozen parameters are skipped and
    empty groups dropped.
    """
    decay, no_decay, lora = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        low = name.lower()
        if "lora_" in low:
            lora.append(p)
        elif any(k in low for k in _NO_DECAY):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lr": base_lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": base_lr},
        {"params": lora, "weight_decay": weight_decay, "lr": base_lr if lora_cfg.lr is None else lora_cfg.lr},
    ]
    return [g for g in groups if g["params"]]


param_groups = lora_param_groups
