"""Models: family table, tiny offline models, HF loading/saving, LoRA (peft), reward/critic model."""
from rlhf.models.families import FAMILIES, Family, family_for_model_type, get_family
from rlhf.models.load import count_params, load_causal_lm, load_tokenizer, resolve_path, save_hf
from rlhf.models.lora import apply_lora, lora_param_groups, merge_lora
from rlhf.models.reward import RewardModel, load_reward_model, save_reward_model
from rlhf.models.tiny import TINY_SPECS, build_tiny, build_tokenizer

__all__ = [
    "FAMILIES",
    "Family",
    "family_for_model_type",
    "get_family",
    "count_params",
    "load_causal_lm",
    "load_tokenizer",
    "resolve_path",
    "save_hf",
    "apply_lora",
    "lora_param_groups",
    "merge_lora",
    "RewardModel",
    "load_reward_model",
    "save_reward_model",
    "TINY_SPECS",
    "build_tiny",
    "build_tokenizer",
]
