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

import re
from collections.abc import Mapping
from typing import Any, ClassVar

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

from instructglm.errors import BadValue

# Fields only one architecture's config.json has (THUDM's configuration_chatglm.py of each version).
V1_FIELDS = ("position_encoding_2d", "inner_hidden_size", "max_sequence_length", "gmask_token_id", "mask_token_id")
V2_FIELDS = (
    "multi_query_attention",
    "multi_query_group_num",
    "padded_vocab_size",
    "kv_channels",
    "ffn_hidden_size",
    "seq_length",
    "add_qkv_bias",
    "rmsnorm",
)
VERSIONS = (1, 2, 3)
# "THUDM/chatglm3-6b", "chatglm2-6b-int4", "/models/ChatGLM3-6B-32k": the digit after "chatglm".
_NAME_VERSION = re.compile(r"chat[-_]?glm[-_]?([123])(?!\d)", re.IGNORECASE)


def parse_chatglm_version(value: Any, where: str) -> int | None:
    """An explicit `chatglm_version` (1, 2, 3, or the same as a string) as an int; None when not set.

    Raises:
        BadValue: any other value, naming `where` it was read from.
    """
    if value is None:
        return None
    if isinstance(value, str) and value.strip() in {"1", "2", "3"}:
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value in VERSIONS:
        return value
    raise BadValue(f"{where}: chatglm_version={value!r}; use 1 (ChatGLM-6B), 2 (ChatGLM2-6B) or 3 (ChatGLM3-6B)")


def chatglm_version_from_name(name: str | None) -> int | None:
    """2 or 3 (or 1) from a checkpoint name or path such as `THUDM/chatglm3-6b`; None when it names none."""
    if not name:
        return None
    # the last path component that names a version: "/models/chatglm3-6b/checkpoint-100" is ChatGLM3
    for part in reversed(re.split(r"[/\\]", str(name))):
        found = {int(m) for m in _NAME_VERSION.findall(part)}
        if found:
            return found.pop() if len(found) == 1 else None
    return None


def chatglm_architecture(config: Mapping[str, Any], where: str = "config.json") -> int:
    """1 for a ChatGLM-6B config, 2 for a ChatGLM2/3-6B one (the two share `model_type: "chatglm"`).

    An explicit `chatglm_version` decides; else the fields only one architecture has; a config with neither
    kind is ChatGLM-6B's (whose class defaults describe it).

    Raises:
        BadValue: `chatglm_version` is not 1, 2 or 3, or the config holds fields of both architectures.
    """
    explicit = parse_chatglm_version(config.get("chatglm_version"), where)
    if explicit is not None:
        return 1 if explicit == 1 else 2
    v1 = [name for name in V1_FIELDS if name in config]
    v2 = [name for name in V2_FIELDS if name in config]
    if v1 and v2:
        raise BadValue(
            f"{where} mixes ChatGLM-6B fields ({', '.join(v1)}) with ChatGLM2/3 fields ({', '.join(v2)}); "
            'say which model it is with "chatglm_version": 1, 2 or 3'
        )
    return 2 if v2 else 1


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
