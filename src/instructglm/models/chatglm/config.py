"""ChatGLM-6B configuration (placeholder until the native model lands)."""

from transformers import PretrainedConfig


class ChatGLMConfig(PretrainedConfig):
    model_type = "chatglm"
