"""Stand-in for the glm family's custom modeling code (model_type glm); see standin_core.py."""
from .standin_core import StandinConfig, StandinForCausalLM, StandinModel


class GLMConfig(StandinConfig):
    model_type = "glm"


class GLMModel(StandinModel):
    config_class = GLMConfig


class GLMForCausalLM(StandinForCausalLM):
    config_class = GLMConfig
