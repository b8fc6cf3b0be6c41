"""Loading THUDM ChatGLM-6B directories: layouts, Auto classes without remote code, dtypes, device maps,
strictness about the checkpoint's tensors, weight tying, saving."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from torch.testing import assert_close

from tests.models.chatglm_helpers import LAYOUTS, PAD, cache_of, goldens


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    """Nothing here may reach the hub: a THUDM config.json's auto_map must not trigger a download."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import instructglm  # noqa: F401  (registers ChatGLM with the Auto classes)


def _reference_state_dict(chatglm6b_fixtures):
    return torch.load(chatglm6b_fixtures / "tiny" / "pytorch_model.bin", weights_only=True)


def _copy_fixture(chatglm6b_fixtures, tmp_path, layout="tiny_safetensors", **config_changes):
    target = tmp_path / layout
    shutil.copytree(chatglm6b_fixtures / layout, target)
    target.chmod(0o755)
    for path in target.iterdir():
        path.chmod(0o644)
    config = json.loads((target / "config.json").read_text())
    for key, value in config_changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    (target / "config.json").write_text(json.dumps(config))
    return target


@torch.no_grad()
def _forward_logits(model, chatglm6b_fixtures):
    _, g = goldens(chatglm6b_fixtures)
    return model(input_ids=g["forward.input_ids"]).logits


# -- layouts and Auto classes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_tensors_and_nothing_else(chatglm6b_fixtures, layout):
    from transformers import AutoModelForCausalLM

    from instructglm.models.chatglm import ChatGLMForConditionalGeneration

    model, info = AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / layout, output_loading_info=True)
    assert type(model) is ChatGLMForConditionalGeneration
    # THUDM's per-layer rotary_emb.inv_freq is in every checkpoint and deliberately ignored, without a report
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    reference = _reference_state_dict(chatglm6b_fixtures)
    state = model.state_dict()
    assert set(state) == {k for k in reference if not k.endswith("rotary_emb.inv_freq")}
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name
    assert model.lm_head.weight is not model.transformer.word_embeddings.weight  # tie_word_embeddings: false


def test_auto_classes_ignore_thudm_auto_map(chatglm6b_fixtures, chatglm6b_tokenizer_dir, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

    real = json.loads((chatglm6b_tokenizer_dir / "config.json").read_text())
    assert "modeling_chatglm" in real["auto_map"]["AutoModel"]
    model_dir = _copy_fixture(chatglm6b_fixtures, tmp_path, auto_map=real["auto_map"], architectures=["ChatGLMModel"])
    assert type(AutoConfig.from_pretrained(model_dir)) is ChatGLMConfig
    expected = _forward_logits(AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny"), chatglm6b_fixtures)
    for auto in (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM):
        model = auto.from_pretrained(model_dir)
        assert type(model) is ChatGLMForConditionalGeneration, auto.__name__
        assert_close(_forward_logits(model, chatglm6b_fixtures), expected, atol=0, rtol=0)


def test_real_chatglm_6b_config(chatglm6b_tokenizer_dir):
    from transformers import AutoConfig

    from instructglm.models.chatglm import ChatGLMConfig

    config = AutoConfig.from_pretrained(chatglm6b_tokenizer_dir)
    assert type(config) is ChatGLMConfig
    assert (config.num_layers, config.num_hidden_layers, config.hidden_size, config.num_attention_heads) == (28, 28, 4096, 32)
    assert (config.inner_hidden_size, config.vocab_size, config.head_dim) == (16384, 130528, 128)
    assert (config.gmask_token_id, config.bos_token_id, config.eos_token_id, config.pad_token_id) == (130001, 130004, 130005, 3)
    assert config.tie_word_embeddings  # the released config.json omits the key: tied, as THUDM's loader did
    assert config.dtype == torch.float16
    # the defaults are the released model
    defaults = ChatGLMConfig()
    for key in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "inner_hidden_size", "layernorm_epsilon",
                "max_sequence_length", "bos_token_id", "eos_token_id", "mask_token_id", "gmask_token_id", "pad_token_id"):
        assert getattr(defaults, key) == getattr(config, key), key


def test_real_6b_shape_constructs_on_meta(chatglm6b_tokenizer_dir):
    from transformers import AutoConfig

    from instructglm.models.chatglm import ChatGLMForConditionalGeneration

    config = AutoConfig.from_pretrained(chatglm6b_tokenizer_dir)
    with torch.device("meta"):
        model = ChatGLMForConditionalGeneration(config)
    h, inner, vocab, layers = 4096, 16384, 130528, 28
    per_layer = (h * 3 * h + 3 * h) + (h * h + h) + (h * inner + inner) + (inner * h + h) + 4 * h
    assert model.num_parameters() == vocab * h + layers * per_layer + 2 * h  # lm_head shares the embeddings
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    assert set(model._no_split_modules) == {"GLMBlock"}
    assert model.transformer.layers[27].attention.query_key_value.weight.shape == (3 * h, h)


# -- dtype, low memory, device map ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loading(chatglm6b_fixtures, dtype):
    from transformers import AutoModelForCausalLM

    expected = _forward_logits(AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny"), chatglm6b_fixtures)
    for kwargs in ({"dtype": dtype}, {"torch_dtype": dtype, "low_cpu_mem_usage": True}):
        model = AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny_safetensors", **kwargs)
        assert {p.dtype for p in model.parameters()} == {dtype}
        logits = _forward_logits(model, chatglm6b_fixtures)
        assert logits.dtype == dtype
        # half precision only perturbs: the fp32 logits (range ~±10) stay close
        assert (logits.float() - expected).abs().max() < 0.5


def test_device_map_auto_and_low_cpu_mem_usage(chatglm6b_fixtures):
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    expected = _forward_logits(AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny"), chatglm6b_fixtures)
    for kwargs in ({"device_map": "auto"}, {"low_cpu_mem_usage": True}, {"device_map": {"": "cpu"}}):
        model = AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny_sharded", dtype=torch.float32, **kwargs)
        assert {p.device.type for p in model.parameters()} == {"cpu"}
        assert_close(_forward_logits(model, chatglm6b_fixtures), expected, atol=0, rtol=0)


# -- strictness ----------------------------------------------------------------------------------------------------------


def test_missing_tensor_fails_naming_it(chatglm6b_fixtures, tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model_dir = _copy_fixture(chatglm6b_fixtures, tmp_path)
    tensors = load_file(model_dir / "model.safetensors")
    del tensors["transformer.layers.1.mlp.dense_4h_to_h.weight"]
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors: transformer\.layers\.1\.mlp\.dense_4h_to_h\.weight"):
        AutoModelForCausalLM.from_pretrained(model_dir)


def test_mismatched_tensor_fails_naming_it(chatglm6b_fixtures, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = _copy_fixture(chatglm6b_fixtures, tmp_path, layout="tiny")
    state = torch.load(model_dir / "pytorch_model.bin", weights_only=True)
    state["transformer.layers.0.attention.dense.weight"] = torch.zeros(64, 32)
    torch.save(state, model_dir / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"transformer\.layers\.0\.attention\.dense\.weight \(checkpoint \(64, 32\), model \(64, 64\)\)"):
        AutoModelForCausalLM.from_pretrained(model_dir)


def test_config_of_another_size_fails_naming_every_tensor(chatglm6b_fixtures, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = _copy_fixture(chatglm6b_fixtures, tmp_path, layout="tiny_sharded", inner_hidden_size=128)
    with pytest.raises(ValueError) as raised:
        AutoModelForCausalLM.from_pretrained(model_dir)
    message = str(raised.value)
    assert str(model_dir) in message
    for layer in (0, 1):
        assert f"transformer.layers.{layer}.mlp.dense_h_to_4h.weight (checkpoint (256, 64), model (128, 64))" in message


def test_unsafe_loading_and_unsupported_options_are_refused(chatglm6b_fixtures, tmp_path):
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError, match="weights_only=False"):
        AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny", weights_only=False)
    model_dir = _copy_fixture(chatglm6b_fixtures, tmp_path, quantization_bit=4)
    with pytest.raises(ValueError, match="quantization_bit=4"):
        AutoModelForCausalLM.from_pretrained(model_dir)


# -- weight tying, saving ------------------------------------------------------------------------------------------------


def test_config_without_tie_key_ties_like_thudm(chatglm6b_fixtures, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = _copy_fixture(chatglm6b_fixtures, tmp_path, tie_word_embeddings=None)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    reference = _reference_state_dict(chatglm6b_fixtures)
    assert torch.equal(model.lm_head.weight, reference["transformer.word_embeddings.weight"])


def test_save_pretrained_writes_safetensors_that_reload_identically(chatglm6b_fixtures, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny")
    model.save_pretrained(tmp_path / "saved")
    files = {p.name for p in (tmp_path / "saved").iterdir()}
    assert {"config.json", "model.safetensors"} <= files and not any(f.endswith(".bin") for f in files)
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == set(model.state_dict())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert type(reloaded) is type(model)
    assert json.loads((tmp_path / "saved" / "config.json").read_text())["model_type"] == "chatglm"
    assert_close(_forward_logits(reloaded, chatglm6b_fixtures), _forward_logits(model, chatglm6b_fixtures), atol=0, rtol=0)
    _, g = goldens(chatglm6b_fixtures)
    ids = g["forward.input_ids"]
    generated = reloaded.generate(input_ids=ids, attention_mask=(ids != PAD).long(), max_new_tokens=20, do_sample=False)
    assert torch.equal(generated, g["generate.sequences"])


def test_sharded_safetensors_round_trip_and_a_lost_shard_is_named(chatglm6b_fixtures, tmp_path):
    """save_pretrained with a small max_shard_size writes model.safetensors.index.json + shards; they reload through
    AutoModelForCausalLM bit for bit, and a checkpoint missing a shard's tensor or a whole shard file says which."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny_safetensors")
    saved = tmp_path / "sharded"
    model.save_pretrained(saved, max_shard_size="300KB")  # the fixture is ~0.9 MB

    index = json.loads((saved / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2, shards
    on_disk = {p.name for p in saved.iterdir()}
    assert set(shards) <= on_disk and "model.safetensors" not in on_disk and not any(f.endswith(".bin") for f in on_disk)
    # every tensor is in the shard the index names, and in no other
    held = {name: shard for shard in shards for name in load_file(saved / shard)}
    assert held == index["weight_map"]
    assert set(held) == set(model.state_dict())

    reloaded, info = AutoModelForCausalLM.from_pretrained(saved, output_loading_info=True)
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name
    assert_close(_forward_logits(reloaded, chatglm6b_fixtures), _forward_logits(model, chatglm6b_fixtures), atol=0, rtol=0)

    # one tensor gone from a shard (the index still lists it): named
    torn = tmp_path / "torn"
    shutil.copytree(saved, torn)
    shard = shards[-1]
    tensors = load_file(torn / shard)
    dropped = sorted(tensors)[0]
    del tensors[dropped]
    save_file(tensors, torn / shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=rf"missing tensors: {re.escape(dropped)}\b"):
        AutoModelForCausalLM.from_pretrained(torn)

    # a whole shard file gone: its name is in the error
    lost = tmp_path / "lost"
    shutil.copytree(saved, lost)
    (lost / shards[0]).unlink()
    with pytest.raises(OSError, match=re.escape(shards[0])):
        AutoModelForCausalLM.from_pretrained(lost)


# -- input validation ----------------------------------------------------------------------------------------------------


def test_bad_inputs_are_explained(chatglm6b_fixtures):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny")
    _, g = goldens(chatglm6b_fixtures)
    ids = g["forward.input_ids"]
    with pytest.raises(ValueError, match="THUDM's bool mask"):
        model(input_ids=ids, attention_mask=g["forward.attention_mask"].float())
    with pytest.raises(ValueError, match="columns"):
        model(input_ids=ids, attention_mask=torch.ones(3, 5))
    cache = cache_of(model(input_ids=ids, use_cache=True))
    with pytest.raises(ValueError, match="position_ids .* required"):
        model(input_ids=ids[:, -1:], cache=cache)
    with pytest.raises(ValueError, match="not both"):
        model(input_ids=ids[:, -1:], cache=cache, past_key_values=cache)
    model.config._attn_implementation = "flash_attention_2"
    try:
        with pytest.raises(ValueError, match="not available for ChatGLM-6B"):
            model(input_ids=ids)
    finally:
        model.config._attn_implementation = "sdpa"


def test_config_validation_names_the_problem():
    from instructglm.models.chatglm import ChatGLMConfig

    assert ChatGLMConfig(hidden_size=64, num_attention_heads=4, inner_hidden_size=None).inner_hidden_size == 256
    with pytest.raises(ValueError, match="hidden_size=60 must be a multiple of num_attention_heads=7"):
        ChatGLMConfig(hidden_size=60, num_attention_heads=7)
    with pytest.raises(ValueError, match="multiple of 4"):
        ChatGLMConfig(hidden_size=48, num_attention_heads=8)
