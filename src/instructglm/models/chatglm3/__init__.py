"""Native ChatGLM2-6B and ChatGLM3-6B (one architecture): config, tokenizer and model, one file each.

The names below are imported on first access, so `from instructglm.models.chatglm3 import ChatGLM3Config`
does not load the model code. `instructglm.models.registration` puts the classes in transformers' Auto
mappings; THUDM's directories of every ChatGLM version say `model_type: "chatglm"` and
`tokenizer_class: "ChatGLMTokenizer"`, and the registered ChatGLM-6B names hand ChatGLM2/3 checkpoints to
these classes (`chatglm_architecture`, `tokenizer_architecture`).
"""

from __future__ import annotations

import importlib

_WHERE = {
    "ChatGLM3Config": "config",
    "ChatGLM3Tokenizer": "tokenizer",
    "ChatGLM3Model": "model",
    "ChatGLM3ForConditionalGeneration": "model",
    "ChatGLM3PreTrainedModel": "model",
}

__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
