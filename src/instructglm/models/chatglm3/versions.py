"""How a `model_type: "chatglm"` checkpoint tells its version (ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B).

Plain functions over config dicts and names, apart from the config classes, so the tokenizers can use
them without importing transformers' config code (and torch).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

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

    The fields only one architecture has decide; an explicit `chatglm_version` settles a config holding
    both kinds (or neither); a config with neither kind is ChatGLM-6B's (whose class defaults describe it).

    Raises:
        BadValue: `chatglm_version` is not 1, 2 or 3 or contradicts the fields, or the config holds fields of
            both architectures and no `chatglm_version`.
    """
    explicit = parse_chatglm_version(config.get("chatglm_version"), where)
    v1 = [name for name in V1_FIELDS if name in config]
    v2 = [name for name in V2_FIELDS if name in config]
    if explicit is not None:
        architecture = 1 if explicit == 1 else 2
        fields = v2 if architecture == 1 else v1
        if fields and not (v1 and v2):
            raise BadValue(
                f"{where}: chatglm_version={explicit}, but its fields ({', '.join(fields)}) are "
                f"{'ChatGLM2/3' if architecture == 1 else 'ChatGLM-6B'}'s; drop the chatglm_version override"
            )
        return architecture
    if v1 and v2:
        raise BadValue(
            f"{where} mixes ChatGLM-6B fields ({', '.join(v1)}) with ChatGLM2/3 fields ({', '.join(v2)}); "
            'say which model it is with "chatglm_version": 1, 2 or 3'
        )
    return 2 if v2 else 1
