"""Stand-in for the pangu family's custom modeling code (model_type gpt_pangu); see standin_core.py."""
from .standin_core import StandinConfig, StandinForCausalLM, StandinModel


class GPTPanguConfig(StandinConfig):
    model_type = "gpt_pangu"


class GPTPanguModel(StandinModel):
    config_class = GPTPanguConfig


class GPTPanguForCausalLM(StandinForCausalLM):
    config_class = GPTPanguConfig
