"""Stand-in for the chatglm family's custom modeling code (model_type chatglm); see standin_core.py."""
from .standin_core import StandinConfig, StandinForCausalLM, StandinModel


class ChatGLMConfig(StandinConfig):
    model_type = "chatglm"


class ChatGLMModel(StandinModel):
    config_class = ChatGLMConfig


class ChatGLMForCausalLM(StandinForCausalLM):
    config_class = ChatGLMConfig
