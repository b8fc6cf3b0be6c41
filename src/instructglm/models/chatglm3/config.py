"""ChatGLM2-6B / ChatGLM3-6B configuration, and how a `model_type: "chatglm"` config tells its version.

Field names and meanings are THUDM's `configuration_chatglm.py` of `THUDM/chatglm3-6b` (ChatGLM2's is the
same without `rope_ratio`), so their `config.json` loads as is; defaults are the released `chatglm3-6b`
config.json, plus `rope_ratio` (1; the 32k/128k variants raise it) and `initializer_range`, which THUDM's
code never read.

ChatGLM-6B (v1), ChatGLM2-6B and ChatGLM3-6B all write `model_type: "chatglm"`. The architecture (v1 against
v2/v3) shows in the fields: v1 has `position_encoding_2d`, `inner_hidden_size`, `max_sequence_length`,
`gmask_token_id`; v2/v3 have `multi_query_attention`, `padded_vocab_size`, `kv_channels`, `ffn_hidden_size`...
(`chatglm_architecture`). v2 and v3 share the architecture; they differ in the tokenizer (role tokens, how
special ids decode) and, in float16 only, in how ChatGLM2's code computes the rotary angles. The config tells
them apart only by an explicit `chatglm_version` (2 or 3, the override; `save_pretrained` writes it) or by the
checkpoint's name in `_name_or_path` (`THUDM/chatglm2-6b`); the tokenizer has more evidence (see
`instructglm.models.chatglm3.tokenizer`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from instructglm.errors import BadValue
from instructglm.models.chatglm3.versions import (  # noqa: F401  (re-exported: the version rules live there)
    V1_FIELDS,
    V2_FIELDS,
    chatglm_architecture,
    chatglm_version_from_name,
    parse_chatglm_version,
)

@strict
class ChatGLM3Config(PretrainedConfig):
    """Hyperparameters of a ChatGLM2-6B / ChatGLM3-6B model (one architecture).

    The standard names transformers looks for (`vocab_size`, `num_hidden_layers`, `intermediate_size`,
    `max_position_embeddings`) are aliases of THUDM's own names through `attribute_map`.
    `chatglm_version` is 2, 3 or None (not told; the model then computes as ChatGLM3's code does).
    """

    model_type = "chatglm"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]
    attribute_map: ClassVar[dict[str, str]] = {
        "vocab_size": "padded_vocab_size",
        "num_hidden_layers": "num_layers",
        "intermediate_size": "ffn_hidden_size",
        "max_position_embeddings": "seq_length",
    }

    # sizes
    padded_vocab_size: int = 65024
    hidden_size: int = 4096
    num_layers: int = 28
    num_attention_heads: int = 32
    # width of one attention head (query, key and value alike)
    kv_channels: int = 128
    # SwiGLU width: dense_h_to_4h maps to 2 * ffn_hidden_size (gate and value halves)
    ffn_hidden_size: int = 13696
    # informational: the rotary angles are computed, not looked up, so longer inputs run
    seq_length: int = 8192

    # attention: multi-query with `multi_query_group_num` key/value heads, else one per query head
    multi_query_attention: bool = True
    multi_query_group_num: int = 2
    # rotary base = 10000 * rope_ratio (chatglm3-6b-32k: 50)
    rope_ratio: float | int = 1
    # only THUDM's original (interleaved-pair) rotary exists; kept so their configs load
    original_rope: bool = True
    # both cancel out or are always on in the math here; kept so their configs load
    apply_query_key_layer_scaling: bool = True
    attention_softmax_in_fp32: bool = True

    # blocks
    layernorm_epsilon: float = 1e-5
    rmsnorm: bool = True
    apply_residual_connection_post_layernorm: bool = False
    post_layer_norm: bool = True
    add_bias_linear: bool = False
    add_qkv_bias: bool = True
    hidden_dropout: float | int = 0.0
    attention_dropout: float | int = 0.0
    classifier_dropout: float | int | None = None
    # fusion flag of THUDM's Megatron training code; no effect on the math
    bias_dropout_fusion: bool = True

    # THUDM options this implementation refuses (see `unsupported_options`), kept so their configs load
    fp32_residual_connection: bool = False
    quantization_bit: int = 0
    pre_seq_len: int | None = None
    prefix_projection: bool = False

    # special ids (the model reads none of [gMASK], sop or the role ids)
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = 0
    bos_token_id: int | None = None

    # 2 = ChatGLM2-6B, 3 = ChatGLM3-6B, None = not told (see the module docstring)
    chatglm_version: int | None = None

    use_cache: bool = True
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.chatglm_version = parse_chatglm_version(self.chatglm_version, "ChatGLM3Config")
        problems = []
        if self.chatglm_version == 1:
            problems.append("chatglm_version=1 is ChatGLM-6B, whose config is ChatGLMConfig")
        if self.num_attention_heads <= 0 or self.kv_channels <= 0:
            problems.append(f"num_attention_heads={self.num_attention_heads} and kv_channels={self.kv_channels} must be > 0")
        elif self.kv_channels % 4:
            # the rotary half of a head is split into (even, odd) pairs
            problems.append(f"kv_channels={self.kv_channels} must be a multiple of 4 (rotary pairs in half a head)")
        if self.multi_query_attention and (
            self.multi_query_group_num <= 0 or self.num_attention_heads % self.multi_query_group_num
        ):
            problems.append(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"multi_query_group_num={self.multi_query_group_num}"
            )
        if problems:
            raise BadValue("Invalid ChatGLM3Config: " + "; ".join(problems))
        super().__post_init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs):
        """THUDM's dict (a config.json) as this class; refuses a ChatGLM-6B one.

        The checkpoint name in `_name_or_path` (overwritten by the loading path once built) tells v2 from v3
        when `chatglm_version` is absent.

        Raises:
            BadValue: the dict describes a ChatGLM-6B (v1) model, or holds a bad `chatglm_version`.
        """
        if "chatglm_version" in kwargs:  # an override given to from_pretrained is checked like the file's own
            config_dict = {**config_dict, "chatglm_version": kwargs.pop("chatglm_version")}
        if chatglm_architecture(config_dict) == 1:
            raise BadValue(
                "this config.json describes a ChatGLM-6B (v1) model (fields "
                + ", ".join(name for name in V1_FIELDS if name in config_dict)
                + "), not ChatGLM2/3; load it with AutoConfig or ChatGLMConfig"
            )
        vocab, padded = config_dict.get("vocab_size"), config_dict.get("padded_vocab_size")
        if vocab is not None and padded is not None and vocab != padded:
            raise BadValue(
                f"config.json: vocab_size={vocab} but padded_vocab_size={padded}; THUDM's ChatGLM2/3 sizes the "
                "embedding and output layer by padded_vocab_size; make both the same"
            )
        if vocab is not None and padded is None:
            config_dict = {**config_dict, "padded_vocab_size": vocab}
        # THUDM's `auto_map` points at modeling files a saved directory does not hold (and is never used here).
        config_dict = {key: value for key, value in config_dict.items() if key not in ("vocab_size", "auto_map")}
        if config_dict.get("chatglm_version") is None:
            name = config_dict.get("_name_or_path") or config_dict.get("name_or_path")
            found = chatglm_version_from_name(name)
            if found in (2, 3):
                config_dict = {**config_dict, "chatglm_version": found}
        return super().from_dict(config_dict, **kwargs)

    @property
    def head_dim(self) -> int:
        return self.kv_channels

    @property
    def num_key_value_heads(self) -> int:
        return self.multi_query_group_num if self.multi_query_attention else self.num_attention_heads

    def unsupported_options(self) -> list[str]:
        """THUDM options that this native model does not implement, as readable sentences (empty if none)."""
        found = []
        if not self.original_rope:
            found.append("original_rope=false (THUDM's code has no other rotary implementation; set it to true)")
        if self.fp32_residual_connection:
            found.append("fp32_residual_connection=true (never used by a released checkpoint; set it to false)")
        if self.quantization_bit:
            found.append(
                f"quantization_bit={self.quantization_bit} (THUDM's own int4/int8 kernels; load the fp16 "
                "checkpoint instead and quantise with bitsandbytes)"
            )
        if self.pre_seq_len is not None:
            found.append(f"pre_seq_len={self.pre_seq_len} (P-tuning v2 prefixes; use a LoRA adapter instead)")
        if self.tie_word_embeddings:
            found.append("tie_word_embeddings=true (ChatGLM2/3 have a separate output_layer; set it to false)")
        return found


__all__ = [
    "ChatGLM3Config",
    "V1_FIELDS",
    "V2_FIELDS",
    "chatglm_architecture",
    "chatglm_version_from_name",
    "parse_chatglm_version",
]
