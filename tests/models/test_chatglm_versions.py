"""ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B share `model_type: "chatglm"` and `tokenizer_class: "ChatGLMTokenizer"`:
the Auto classes must find the right native class for each, and never take one version for another.

Checked on THUDM's real directories (`shared/tokenizers/*`: configs and vocabularies, ChatGLM2's built from its
configs plus the shared tokenizer.model) and on the tiny checkpoints of both architectures
(`fixtures/chatglm6b/tiny`, `fixtures/chatglm3/tiny`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
from transformers.testing_utils import CaptureLogger

import instructglm  # noqa: F401  (registers the native classes with the Auto classes)
from instructglm.errors import BadValue, MissingFile
from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration, ChatGLMTokenizer
from instructglm.models.chatglm3 import ChatGLM3Config, ChatGLM3ForConditionalGeneration, ChatGLM3Tokenizer
from instructglm.models.chatglm3 import tokenizer as chatglm3_tokenizer
from instructglm.models.chatglm3.config import chatglm_architecture
from tests.conftest import _need

CONFIG_CLASS = {1: ChatGLMConfig, 2: ChatGLM3Config, 3: ChatGLM3Config}
TOKENIZER_CLASS = {1: ChatGLMTokenizer, 2: ChatGLM3Tokenizer, 3: ChatGLM3Tokenizer}
MODEL_CLASS = {1: ChatGLMForConditionalGeneration, 3: ChatGLM3ForConditionalGeneration}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here may reach the hub: THUDM's auto_map must not trigger a download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _copy(source, target):
    target.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        shutil.copyfile(path, target / path.name)
    return target


@pytest.fixture(scope="module")
def real_dirs(shared_dir, tmp_path_factory):
    """THUDM's directories of the three versions (configs and vocabulary, no weights)."""
    tokenizers = shared_dir / "tokenizers"
    v2 = _copy(_need(tokenizers / "chatglm2-6b"), tmp_path_factory.mktemp("hub") / "chatglm2-6b")
    shutil.copyfile(_need(tokenizers / "chatglm3-6b") / "tokenizer.model", v2 / "tokenizer.model")
    return {1: _need(tokenizers / "chatglm-6b"), 2: v2, 3: tokenizers / "chatglm3-6b"}


@pytest.fixture(scope="module")
def tiny_dirs(shared_dir):
    return {1: _need(shared_dir / "fixtures" / "chatglm6b" / "tiny"), 3: _need(shared_dir / "fixtures" / "chatglm3" / "tiny")}


def _write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


# -- the Auto classes --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2, 3])
def test_auto_config_and_tokenizer_of_thudms_directories(real_dirs, version):
    directory = real_dirs[version]
    config_json = json.loads((directory / "config.json").read_text())
    assert config_json["model_type"] == "chatglm" and "modeling_chatglm" in config_json["auto_map"]["AutoModel"]
    assert json.loads((directory / "tokenizer_config.json").read_text())["tokenizer_class"] == "ChatGLMTokenizer"
    config = AutoConfig.from_pretrained(directory)
    assert type(config) is CONFIG_CLASS[version]
    assert config.chatglm_version == version
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(tokenizer) is TOKENIZER_CLASS[version]
    assert tokenizer.chatglm_version == version
    # the model mappings go by the config class (the real weights are not here)
    from transformers.models.auto.auto_factory import _get_model_class

    wanted = "ChatGLMForConditionalGeneration" if version == 1 else "ChatGLM3ForConditionalGeneration"
    for auto in (AutoModel, AutoModelForCausalLM):
        assert _get_model_class(config, auto._model_mapping).__name__ == wanted


@pytest.mark.parametrize("version", [1, 3])
def test_auto_models_of_tiny_checkpoints(tiny_dirs, version):
    for auto in (AutoModel, AutoModelForCausalLM):
        model = auto.from_pretrained(tiny_dirs[version])
        assert type(model) is MODEL_CLASS[version]
        assert type(model.config) is CONFIG_CLASS[version]


def test_thudms_config_json_with_auto_map_loads_natively(real_dirs, tiny_dirs, tmp_path):
    """The tiny ChatGLM3 weights under THUDM's real config.json fields (auto_map, architectures) + sizes."""
    target = _copy(tiny_dirs[3], tmp_path / "chatglm3")
    real = json.loads((real_dirs[3] / "config.json").read_text())
    tiny = json.loads((target / "config.json").read_text())
    _write_json(target / "config.json", {**real, **{k: tiny[k] for k in (
        "padded_vocab_size", "hidden_size", "num_layers", "num_attention_heads", "kv_channels", "ffn_hidden_size",
        "seq_length", "torch_dtype")}})
    model = AutoModelForCausalLM.from_pretrained(target)
    assert type(model) is ChatGLM3ForConditionalGeneration and model.config.chatglm_version == 3
    assert getattr(model.config, "auto_map", None) is None  # never pointing at files a saved copy lacks
    with torch.no_grad():
        reference = AutoModelForCausalLM.from_pretrained(tiny_dirs[3])
        ids = torch.tensor([[1001, 1003, 1006, 270, 938, 1007]])
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_importing_instructglm_registers_without_torch_or_model_code(real_dirs):
    """In a fresh interpreter: `import instructglm` is light; configs and tokenizers never import model code."""
    code = (
        "import sys, instructglm; assert 'torch' not in sys.modules\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        f"c = AutoConfig.from_pretrained({str(real_dirs[3])!r}); t = AutoTokenizer.from_pretrained({str(real_dirs[3])!r})\n"
        "assert type(c).__name__ == 'ChatGLM3Config' and type(t).__name__ == 'ChatGLM3Tokenizer'\n"
        "assert 'instructglm.models.chatglm3.model' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- never one version for another -------------------------------------------------------------------------------------


def test_a_v1_checkpoint_is_never_taken_for_v3(real_dirs, tiny_dirs):
    with pytest.raises(BadValue, match="ChatGLM-6B"):
        ChatGLM3Config.from_pretrained(tiny_dirs[1])
    with pytest.raises(BadValue, match="ChatGLM-6B"):
        ChatGLM3ForConditionalGeneration.from_pretrained(tiny_dirs[1])
    with pytest.raises(MissingFile, match="ice_text.model"):
        ChatGLM3Tokenizer.from_pretrained(real_dirs[1])
    assert type(ChatGLMTokenizer.from_pretrained(real_dirs[1])) is ChatGLMTokenizer


def test_a_v3_checkpoint_is_never_taken_for_v1(real_dirs, tiny_dirs):
    assert type(ChatGLMConfig.from_pretrained(tiny_dirs[3])) is ChatGLM3Config
    assert type(ChatGLMTokenizer.from_pretrained(real_dirs[3])) is ChatGLM3Tokenizer
    # the v1 class's own loader, handed a ChatGLM3 checkpoint, fails rather than building a ChatGLM-6B from it
    with pytest.raises(BadValue, match="ChatGLM-6B .v1.; this checkpoint's config is ChatGLM3Config"):
        ChatGLMForConditionalGeneration.from_pretrained(tiny_dirs[3])
    with pytest.raises(BadValue, match="ChatGLM2/3 config"):
        ChatGLM3ForConditionalGeneration(ChatGLMConfig(hidden_size=64, num_layers=1, num_attention_heads=4))


def test_config_fields_decide_and_conflicts_are_refused():
    assert chatglm_architecture({"position_encoding_2d": True, "inner_hidden_size": 16384}) == 1
    assert chatglm_architecture({"multi_query_attention": True, "padded_vocab_size": 65024}) == 2
    assert chatglm_architecture({"model_type": "chatglm"}) == 1  # ChatGLMConfig's own defaults
    with pytest.raises(BadValue, match="mixes ChatGLM-6B fields .*position_encoding_2d.* ChatGLM2/3 fields .*kv_channels"):
        ChatGLMConfig.from_dict({"model_type": "chatglm", "position_encoding_2d": True, "kv_channels": 128})
    with pytest.raises(BadValue, match="chatglm_version=4"):
        ChatGLMConfig.from_dict({"model_type": "chatglm", "chatglm_version": 4})


def test_chatglm_version_tells_v2_from_v3_but_never_contradicts_the_fields(real_dirs, tmp_path, shared_dir):
    config = json.loads((real_dirs[3] / "config.json").read_text())
    with pytest.raises(BadValue, match="chatglm_version=1, but its fields .*kv_channels.* are ChatGLM2/3's"):
        ChatGLMConfig.from_dict({**config, "chatglm_version": 1})
    # also as a from_pretrained keyword (checked like the file's own, never set afterwards unchecked)
    with pytest.raises(BadValue, match="chatglm_version=3, but its fields .* are ChatGLM-6B's"):
        AutoConfig.from_pretrained(shared_dir / "fixtures" / "chatglm6b" / "tiny", chatglm_version=3)
    for bad in ("x", 7, True):
        with pytest.raises(BadValue, match="use 1 .ChatGLM-6B., 2 .ChatGLM2-6B. or 3"):
            AutoConfig.from_pretrained(shared_dir / "fixtures" / "chatglm3" / "tiny", chatglm_version=bad)
    assert ChatGLMConfig.from_dict({**config, "chatglm_version": "2"}).chatglm_version == 2
    directory = _copy(real_dirs[3], tmp_path / "chatglm3-6b")
    _write_json(directory / "config.json", {**config, "chatglm_version": 2})
    assert AutoConfig.from_pretrained(directory).chatglm_version == 2


def test_both_vocabulary_files_need_an_explicit_version(real_dirs, tmp_path):
    directory = _copy(real_dirs[3], tmp_path / "both")
    shutil.copyfile(real_dirs[1] / "ice_text.model", directory / "ice_text.model")
    with pytest.raises(BadValue, match="both ice_text.model .* and tokenizer.model"):
        AutoTokenizer.from_pretrained(directory)
    assert AutoTokenizer.from_pretrained(directory, chatglm_version=3).chatglm_version == 3
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    _write_json(directory / "tokenizer_config.json", {**tokenizer_config, "chatglm_version": 1})
    assert type(AutoTokenizer.from_pretrained(directory)) is ChatGLMTokenizer


# -- ChatGLM2 or ChatGLM3: the tokenizer's evidence ---------------------------------------------------------------------


def _tokenizer_dir(real_dirs, target, tokenizer_config: dict, config: dict | None = None):
    target.mkdir(parents=True)
    shutil.copyfile(real_dirs[3] / "tokenizer.model", target / "tokenizer.model")
    _write_json(target / "tokenizer_config.json", {"tokenizer_class": "ChatGLMTokenizer", **tokenizer_config})
    if config is not None:
        _write_json(target / "config.json", config)
    return target


CHATGLM3_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize(
    "name, tokenizer_config, config, version",
    [
        ("plain", {"name_or_path": "THUDM/chatglm2-6b"}, None, 2),
        ("plain", {"name_or_path": "THUDM/chatglm3-6b"}, None, 3),
        ("plain", {"name_or_path": "THUDM/chatglm2-6b", "chat_template": CHATGLM3_TEMPLATE}, None, 3),
        ("plain", {"added_tokens_decoder": {"64795": {"content": "<|user|>", "special": True}}}, None, 3),
        ("plain", {}, {"model_type": "chatglm", "_name_or_path": "THUDM/chatglm2-6b-32k"}, 2),
        ("plain", {}, {"model_type": "chatglm", "chatglm_version": 2}, 2),
        ("my-chatglm2-6b-finetune", {}, None, 2),
        ("plain", {"name_or_path": "THUDM/chatglm3-6b", "chatglm_version": 2}, None, 2),
    ],
    ids=["name-v2", "name-v3", "template-beats-name", "role-tokens", "config-name", "config-version", "path", "override"],
)
def test_chatglm2_or_chatglm3_from_the_checkpoint(real_dirs, tmp_path, name, tokenizer_config, config, version):
    directory = _tokenizer_dir(real_dirs, tmp_path / name, tokenizer_config, config)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert type(tokenizer) is ChatGLM3Tokenizer and tokenizer.chatglm_version == version
    assert len(tokenizer) == (64798 if version == 3 else 64794)
    assert tokenizer.decode(tokenizer.encode("你好")) == ("[gMASK]sop 你好" if version == 3 else "你好")


def test_nothing_to_tell_means_chatglm3_with_a_warning(real_dirs, tmp_path):
    directory = _tokenizer_dir(real_dirs, tmp_path / "plain", {})
    with CaptureLogger(chatglm3_tokenizer.logger) as captured:
        tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer.chatglm_version == 3
    assert '"chatglm_version": 2' in captured.out
    assert AutoTokenizer.from_pretrained(directory, chatglm_version=2).chatglm_version == 2
    with pytest.raises(BadValue, match="chatglm_version=1 is ChatGLM-6B"):
        ChatGLM3Tokenizer(vocab_file=str(directory / "tokenizer.model"), chatglm_version=1)
