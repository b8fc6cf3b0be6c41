"""ChatGLM-6B model (placeholder until the native model lands)."""

from transformers import PreTrainedModel

from instructglm.models.chatglm.config import ChatGLMConfig


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig


class ChatGLMModel(ChatGLMPreTrainedModel):
    pass


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel):
    pass
