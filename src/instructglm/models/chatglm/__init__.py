"""Native ChatGLM-6B: config, tokenizer and model, one file each, registered with the Auto classes."""

from instructglm.models.chatglm.config import ChatGLMConfig
from instructglm.models.chatglm.model import ChatGLMForConditionalGeneration, ChatGLMModel, ChatGLMPreTrainedModel
from instructglm.models.chatglm.tokenizer import ChatGLMTokenizer

__all__ = [
    "ChatGLMConfig",
    "ChatGLMModel",
    "ChatGLMForConditionalGeneration",
    "ChatGLMPreTrainedModel",
    "ChatGLMTokenizer",
    "register",
]


def register() -> None:
    """Make `Auto*.from_pretrained(dir)` resolve `model_type: chatglm` to these classes."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    AutoConfig.register("chatglm", ChatGLMConfig, exist_ok=True)
    AutoTokenizer.register(ChatGLMConfig, slow_tokenizer_class=ChatGLMTokenizer, exist_ok=True)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):
        auto.register(ChatGLMConfig, ChatGLMForConditionalGeneration, exist_ok=True)
