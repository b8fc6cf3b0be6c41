"""Native ChatGLM-6B: config, tokenizer and model, one file each.

The names below are imported on first access, so `from instructglm.models.chatglm import
ChatGLMConfig` does not load the model code. `instructglm.models.registration` puts the classes in
transformers' Auto mappings.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ChatGLMConfig": "config",
    "ChatGLMTokenizer": "tokenizer",
    "ChatGLMModel": "model",
    "ChatGLMForConditionalGeneration": "model",
    "ChatGLMPreTrainedModel": "model",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
