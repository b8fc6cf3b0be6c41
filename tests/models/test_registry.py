"""The family registry: which family a checkpoint is (never ChatGLM-6B's rules for ChatGLM3 or the reverse),
and what each family decides (LoRA targets, stop ids, default template)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from instructglm.errors import BadValue
from instructglm.models.loading import load_tokenizer, model_config_of
from instructglm.models.registry import (
    CAUSAL_LM,
    CHAT_TEMPLATE,
    CHATGLM2_6B,
    CHATGLM3_6B,
    CHATGLM_6B,
    FAMILIES,
    GLM_4,
    GLM_4_0414,
    family_for,
    lora_targets_for,
)
from tests.conftest import _need


@pytest.fixture(scope="module")
def tokenizers(shared_dir) -> Path:
    return _need(shared_dir / "tokenizers")


def _family_of_dir(path) -> str:
    tokenizer, model_type = load_tokenizer(str(path))
    return family_for(model_config_of(str(path)) or model_type, tokenizer).name


def _copy(tokenizers: Path, tmp_path: Path, config_from: str, vocabulary_from: str, name: str = "mixed") -> Path:
    """A checkpoint dir with one version's config.json and tokenizer_config.json and another's vocabulary."""
    out = tmp_path / name
    out.mkdir()
    for file in ("config.json", "tokenizer_config.json"):
        shutil.copy(tokenizers / config_from / file, out / file)
    for vocabulary in ("ice_text.model", "tokenizer.model"):
        if (tokenizers / vocabulary_from / vocabulary).exists():
            shutil.copy(tokenizers / vocabulary_from / vocabulary, out / vocabulary)
    return out


def test_the_real_thudm_dirs(tokenizers, tmp_path):
    assert _family_of_dir(tokenizers / "chatglm-6b") == "chatglm-6b"
    assert _family_of_dir(tokenizers / "chatglm3-6b") == "chatglm3-6b"
    # ChatGLM2-6B's own configs with the tokenizer.model it shares with ChatGLM3
    assert _family_of_dir(_copy(tokenizers, tmp_path, "chatglm2-6b", "chatglm3-6b", "chatglm2")) == "chatglm2-6b"


@pytest.mark.parametrize(
    "config_from, vocabulary_from, says",
    [("chatglm-6b", "chatglm3-6b", "ChatGLM-6B \\(v1\\) model but its tokenizer is tokenizer.model"),
     ("chatglm3-6b", "chatglm-6b", "ChatGLM2/3-6B model but its tokenizer is ice_text.model")],
)
def test_a_checkpoint_mixing_versions_is_refused(tokenizers, tmp_path, config_from, vocabulary_from, says):
    mixed = _copy(tokenizers, tmp_path, config_from, vocabulary_from)
    if config_from == "chatglm-6b":  # v1's tokenizer_config names no version; the vocabulary then picks the class
        (mixed / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "ChatGLMTokenizer"}))
    with pytest.raises(BadValue, match=says):
        _family_of_dir(mixed)


def test_config_and_tokenizer_versions_must_agree(tokenizers, tmp_path):
    mixed = _copy(tokenizers, tmp_path, "chatglm3-6b", "chatglm3-6b")
    config = json.loads((mixed / "config.json").read_text())
    (mixed / "config.json").write_text(json.dumps({**config, "chatglm_version": 2}))
    tokenizer_config = json.loads((mixed / "tokenizer_config.json").read_text())
    (mixed / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "chatglm_version": 3}))
    with pytest.raises(BadValue, match="chatglm_version=2 but the tokenizer is ChatGLM3's"):
        _family_of_dir(mixed)


def test_config_objects_and_dicts(tokenizers, chatglm6b_tokenizer):
    from instructglm.models.chatglm.config import ChatGLMConfig
    from instructglm.models.chatglm3 import ChatGLM3Config, ChatGLM3Tokenizer

    v3_tokenizer = ChatGLM3Tokenizer.from_pretrained(str(tokenizers / "chatglm3-6b"))
    assert family_for(ChatGLMConfig()) is CHATGLM_6B
    assert family_for(ChatGLM3Config(chatglm_version=2)) is CHATGLM2_6B
    assert family_for(ChatGLM3Config(chatglm_version=3)) is CHATGLM3_6B
    assert family_for(ChatGLM3Config()) is CHATGLM3_6B  # not told: ChatGLM3, as the model and tokenizer default
    assert family_for(ChatGLM3Config(), v3_tokenizer) is CHATGLM3_6B
    for config, tokenizer in ((ChatGLMConfig(), v3_tokenizer), (ChatGLM3Config(chatglm_version=3), chatglm6b_tokenizer)):
        with pytest.raises(BadValue, match="mixes two ChatGLM versions"):
            family_for(config, tokenizer)
    # THUDM's config.json files as dicts: the checkpoint name tells v2 from v3 when nothing else does
    for name, family in (("chatglm-6b", CHATGLM_6B), ("chatglm2-6b", CHATGLM2_6B), ("chatglm3-6b", CHATGLM3_6B)):
        assert family_for(json.loads((tokenizers / name / "config.json").read_text())) is family
    # the tokenizer alone tells the version too
    assert family_for(None, v3_tokenizer) is CHATGLM3_6B and family_for(None, chatglm6b_tokenizer) is CHATGLM_6B


def test_model_types_and_chat_templates():
    from tests.tiny_models import char_tokenizer, glm4_tokenizer

    glm, plain = glm4_tokenizer(), char_tokenizer()
    assert family_for("chatglm") is CHATGLM_6B  # a bare model_type: what runs before ChatGLM2/3 support recorded
    assert family_for("glm") is GLM_4 and family_for("glm4") is GLM_4_0414
    assert family_for("glm", glm) is GLM_4 and family_for({"model_type": "glm4"}, glm) is GLM_4_0414
    assert family_for("glm4", plain) is CAUSAL_LM  # GLM-4-32B-Base-0414 has no chat template
    assert family_for("llama") is CAUSAL_LM and family_for("llama", plain) is CAUSAL_LM
    assert family_for("qwen2", glm) is CHAT_TEMPLATE
    assert family_for(name="chatglm3-6b") is CHATGLM3_6B and set(FAMILIES) == {
        "chatglm-6b", "chatglm2-6b", "chatglm3-6b", "glm-4", "glm-4-0414", "chat-template", "causal-lm",
    }
    with pytest.raises(BadValue, match="unknown model family 'chatglm4'"):
        family_for(name="chatglm4")


def test_what_each_family_decides():
    for family in (CHATGLM_6B, CHATGLM2_6B, CHATGLM3_6B):
        assert family.lora_target_modules("chatglm") == ["query_key_value"]
    assert lora_targets_for("chatglm") == ["query_key_value"]
    assert GLM_4.lora_target_modules("glm") == "all-linear" == GLM_4_0414.lora_target_modules("glm4")  # peft has none
    assert CHAT_TEMPLATE.lora_target_modules("llama") == ["q_proj", "v_proj"] == lora_targets_for("llama")
    assert CHAT_TEMPLATE.lora_target_modules("nothing-peft-knows") == "all-linear"
    assert [f.chat_template for f in (CHATGLM_6B, CHATGLM2_6B, CHATGLM3_6B, GLM_4, CHAT_TEMPLATE, CAUSAL_LM)] == [
        "chatglm", "chatglm2", "messages", "messages", "messages", "plain",
    ]
    assert [f.labelled_prompt_tail for f in FAMILIES.values()] == [1, 0, 0, 0, 0, 0, 0]
    assert not CHATGLM_6B.role_tokens and not CHATGLM2_6B.role_tokens and CHATGLM3_6B.role_tokens and GLM_4.role_tokens


def test_stop_ids(chatglm6b_tokenizer, tokenizers):
    from instructglm.models.chatglm3 import ChatGLM3Tokenizer

    assert CHATGLM_6B.stop_token_ids(chatglm6b_tokenizer) == [chatglm6b_tokenizer.convert_tokens_to_ids("<eop>")]
    v2 = ChatGLM3Tokenizer.from_pretrained(str(tokenizers / "chatglm3-6b"), chatglm_version=2)
    assert CHATGLM2_6B.stop_token_ids(v2) == [2]
    assert CHATGLM2_6B.stop_token_ids(v2, {"eos_token_id": [2, 7]}) == [2, 7]
