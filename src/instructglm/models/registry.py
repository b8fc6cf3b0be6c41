"""One table of what differs between model families in fine-tuning.

Everything else (tokenize, collate, train, generate) is written once against a `ModelFamily`.
A family is found from `config.model_type`; any causal LM transformers loads natively falls back
to `CAUSAL_LM`, with LoRA targets from peft's own per-architecture table.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelFamily:
    name: str
    model_types: tuple[str, ...]
    # LoRA target module names; empty means "ask peft's table for this model_type, else all-linear".
    lora_targets: tuple[str, ...]
    # Chat template (a name in instructglm.data.templates) used to build prompts at inference.
    chat_template: str
    # How many trailing special tokens of the encoded prompt are already part of the answer and
    # so get labels. ChatGLM-6B's prompt ends in `[gMASK] <sop>`, and the official recipe labels
    # `<sop>`; a plain causal LM labels nothing of the prompt.
    labelled_prompt_tail: int = 0


CHATGLM_6B = ModelFamily(
    name="chatglm-6b",
    model_types=("chatglm",),
    lora_targets=("query_key_value",),
    chat_template="chatglm",
    labelled_prompt_tail=1,
)

CAUSAL_LM = ModelFamily(name="causal-lm", model_types=(), lora_targets=(), chat_template="plain")

_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> None:
    for model_type in family.model_types:
        _FAMILIES[model_type] = family


def family_for(model_type: str | None) -> ModelFamily:
    """The family of a `config.model_type` (a config object is accepted too)."""
    model_type = getattr(model_type, "model_type", model_type)
    return _FAMILIES.get(model_type or "", CAUSAL_LM)


def lora_targets_for(model_type: str | None) -> list[str] | str:
    """LoRA target modules: the family's, else peft's table for the architecture, else all-linear."""
    family = family_for(model_type)
    if family.lora_targets:
        return list(family.lora_targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    return list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "", [])) or "all-linear"


register_family(CHATGLM_6B)
