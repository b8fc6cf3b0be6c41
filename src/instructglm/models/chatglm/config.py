"""ChatGLM-6B configuration.

Field names and meanings are THUDM's `configuration_chatglm.py` (so their `config.json` loads as is);
defaults are the released `THUDM/chatglm-6b` config.json, except `tie_word_embeddings`, which that file
omits: THUDM's loader then ties `lm_head` to the word embeddings, so the default here is `True`.

ChatGLM2-6B and ChatGLM3-6B write the same `model_type: "chatglm"`, so this class, which `AutoConfig`
resolves "chatglm" to, hands their config.json to `ChatGLM3Config` (`from_dict`), telling the versions
apart by their fields or an explicit `chatglm_version` (see `instructglm.models.chatglm3.config`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig


@strict
class ChatGLMConfig(PretrainedConfig):
    """Hyperparameters of a ChatGLM-6B (GLM v1) model.

    The standard names transformers looks for (`num_hidden_layers`, `intermediate_size`,
    `max_position_embeddings`) are aliases of THUDM's own names through `attribute_map`.
    """

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values"]
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers",
        "intermediate_size": "inner_hidden_size",
        "max_position_embeddings": "max_sequence_length",
    }

    # sizes
    vocab_size: int = 130528
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    # GLM's MLP width; None means 4 * hidden_size, as in THUDM's GLU
    inner_hidden_size: int | None = 16384
    layernorm_epsilon: float = 1e-5
    # informational: rotary positions have no table, longer inputs run (with the quality THUDM trained for)
    max_sequence_length: int = 2048
    # only the 2-D variant (position + block position, each rotating half a head) exists in the checkpoints
    position_encoding_2d: bool = True

    # special ids (the released vocabulary: [MASK] 130000, [gMASK] 130001, <sop> 130004, <eop> 130005)
    bos_token_id: int | None = 130004
    eos_token_id: int | list[int] | None = 130005
    mask_token_id: int = 130000
    gmask_token_id: int = 130001
    pad_token_id: int | None = 3

    # THUDM options this implementation refuses (see `unsupported_options`), kept so their configs load
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False

    use_cache: bool = True
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    # the GLM generation this class describes (ChatGLM3Config says 2 or 3)
    chatglm_version: ClassVar[int] = 1

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """A ChatGLM-6B config, or for a ChatGLM2/3 config.json (same `model_type`) a `ChatGLM3Config`.

        Raises:
            BadValue: the dict mixes both versions' fields, or holds a bad `chatglm_version`.
        """
        from instructglm.models.chatglm3.versions import chatglm_architecture

        if "chatglm_version" in kwargs:  # an override given to from_pretrained is checked like the file's own
            config_dict = {**config_dict, "chatglm_version": kwargs.pop("chatglm_version")}
        if cls is ChatGLMConfig and chatglm_architecture(config_dict) == 2:
            from instructglm.models.chatglm3.config import ChatGLM3Config

            return ChatGLM3Config.from_dict(config_dict, **kwargs)
        config_dict = {key: value for key, value in config_dict.items() if key != "chatglm_version"}
        return super().from_dict(config_dict, **kwargs)

    def __post_init__(self, **kwargs):
        if self.inner_hidden_size is None:
            self.inner_hidden_size = 4 * self.hidden_size
        problems = []
        if self.num_attention_heads <= 0 or self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size={self.hidden_size} must be a multiple of num_attention_heads={self.num_attention_heads}"
            )
        elif (self.hidden_size // self.num_attention_heads) % 4:
            # each head is split in two rotary halves, and rotary pairs dimensions inside each half
            problems.append(
                f"head size hidden_size/num_attention_heads={self.hidden_size // self.num_attention_heads} "
                "must be a multiple of 4 (two rotary halves of even size)"
            )
        if problems:
            raise ValueError("Invalid ChatGLMConfig: " + "; ".join(problems))
        super().__post_init__(**kwargs)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def unsupported_options(self) -> list[str]:
        """THUDM options that this native model does not implement, as readable sentences (empty if none)."""
        found = []
        if not self.position_encoding_2d:
            found.append("position_encoding_2d=false (the 1-D rotary variant was never released; set it to true)")
        if self.quantization_bit:
            found.append(
                f"quantization_bit={self.quantization_bit} (THUDM's own int4/int8 kernels; load the fp16 "
                "checkpoint instead and quantise with bitsandbytes)"
            )
        if self.pre_seq_len is not None:
            found.append(f"pre_seq_len={self.pre_seq_len} (P-tuning v2 prefixes; use a LoRA adapter instead)")
        return found


__all__ = ["ChatGLMConfig"]
