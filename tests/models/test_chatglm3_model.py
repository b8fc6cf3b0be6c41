"""Parity of the native ChatGLM2/3-6B model with THUDM's original code (the goldens), and its behaviour beyond them.

Every forward golden is checked for each checkpoint layout (`.bin`, sharded `.bin` built here, safetensors) and both
attention paths, loaded through AutoModelForCausalLM in float32; `fixtures/chatglm3/tiny/goldens.json`'s `readme`
describes every tensor. Random tiny models cover what the goldens cannot: the KV cache continued by several tokens,
right padding, other configurations (no multi-query, LayerNorm, biases, rope_ratio), float16 angles for ChatGLM2,
LoRA, gradient checkpointing, strict loading.
"""

from __future__ import annotations

import json
import shutil
import warnings
from functools import lru_cache
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import instructglm  # noqa: F401  (registers the native classes with the Auto classes)
from instructglm.errors import BadValue
from instructglm.models.chatglm3.config import ChatGLM3Config
from instructglm.models.chatglm3.model import (
    ChatGLM3ForConditionalGeneration,
    RotaryEmbedding,
    chatglm_attention_mask,
    position_ids_from_mask,
)
from tests.conftest import _need
from tests.models.test_chatglm_model import uncompiled_flex  # noqa: F401  (the fixture, shared with ChatGLM-6B's tests)

ATTENTION = ("eager", "sdpa")
LAYOUTS = ("tiny", "tiny_sharded", "tiny_safetensors")
USER, ASSISTANT, OBSERVATION, GMASK, SOP = 1006, 1007, 1008, 1001, 1003
LOGITS_TOLERANCE = 1e-4  # the bound; measured: sdpa 0, eager ~6e-6


@pytest.fixture(scope="session")
def fixtures(shared_dir) -> Path:
    return _need(shared_dir / "fixtures" / "chatglm3")


@pytest.fixture(scope="session")
def layouts(fixtures, tmp_path_factory) -> dict[str, Path]:
    """The shared layouts plus a sharded `.bin` (two shards and an index, as save_pretrained writes them)."""
    sharded = tmp_path_factory.mktemp("tiny_sharded")
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(fixtures / "tiny" / name, sharded / name)
    state = torch.load(fixtures / "tiny" / "pytorch_model.bin", weights_only=True)
    names = list(state)
    shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2], "pytorch_model-00002-of-00002.bin": names[len(names) // 2 :]}
    weight_map = {}
    for file, keys in shards.items():
        torch.save({key: state[key] for key in keys}, sharded / file)
        weight_map.update(dict.fromkeys(keys, file))
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (sharded / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return {"tiny": fixtures / "tiny", "tiny_safetensors": fixtures / "tiny_safetensors", "tiny_sharded": sharded}


@lru_cache(maxsize=None)
def _goldens(fixtures: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return json.loads((fixtures / "tiny" / "goldens.json").read_text()), load_file(fixtures / "tiny" / "goldens.safetensors")


@pytest.fixture(scope="session")
def goldens(fixtures):
    return _goldens(fixtures)


@lru_cache(maxsize=None)
def _load(model_dir: str, attn: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn, dtype=torch.float32).eval()


def _fresh(model_dir, attn: str = "eager", **kwargs):
    """A separately loaded model for tests that change its state (gradients, training mode, adapters)."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    return AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation=attn, **kwargs)


@pytest.fixture(params=[(layout, attn) for layout in LAYOUTS for attn in ATTENTION], ids=lambda p: f"{p[0]}-{p[1]}")
def parity(request, layouts, goldens):
    layout, attn = request.param
    model = _load(str(layouts[layout]), attn)
    assert type(model) is ChatGLM3ForConditionalGeneration and model.config._attn_implementation == attn
    return model, goldens[1]


def random_model(seed: int = 0, attn: str = "eager", **overrides) -> ChatGLM3ForConditionalGeneration:
    """A random tiny ChatGLM3 (float32, 2 layers, width 64) with large weights that make mistakes visible."""
    fields = dict(
        padded_vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16,
        ffn_hidden_size=96, multi_query_group_num=2, seq_length=256, initializer_range=0.2,
    )
    fields.update(overrides)
    config = ChatGLM3Config(**fields)
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ChatGLM3ForConditionalGeneration(config).eval()


def _cache_of(output):
    """The KV cache of an output, under this transformers' field name (`cache` from 5.24, else `past_key_values`)."""
    from instructglm.models.chatglm3.model import _CACHE_FIELD

    return getattr(output, _CACHE_FIELD)


def _padded(rows: list[list[int]], side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = [([0] * (width - len(r)) + r) if side == "left" else (r + [0] * (width - len(r))) for r in rows]
    mask = [([0] * (width - len(r)) + [1] * len(r)) if side == "left" else ([1] * len(r) + [0] * (width - len(r))) for r in rows]
    return torch.tensor(ids), torch.tensor(mask)


def _prompts(seed: int, lengths=(5, 11, 8)) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [[GMASK % 128, SOP % 128] + torch.randint(3, 100, (n,), generator=generator).tolist() for n in lengths]


# -- loading ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_the_same_tensors_and_nothing_else(layouts, fixtures, layout):
    model, info = _fresh(layouts[layout], output_loading_info=True)
    # THUDM's rotary_pos_emb.inv_freq is in every checkpoint and deliberately ignored, without a report
    assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(), "error_msgs": []}
    reference = torch.load(fixtures / "tiny" / "pytorch_model.bin", weights_only=True)
    state = model.state_dict()
    assert set(state) == {k for k in reference if not k.endswith("rotary_pos_emb.inv_freq")}
    for name, tensor in state.items():
        assert torch.equal(tensor, reference[name]), name
    assert model.transformer.output_layer.weight is not model.transformer.embedding.word_embeddings.weight


def test_missing_or_misshaped_tensors_are_named(fixtures, tmp_path):
    from safetensors.torch import load_file, save_file

    state = load_file(fixtures / "tiny_safetensors" / "model.safetensors")
    for case, change in {
        "missing": lambda s: s.pop("transformer.encoder.layers.1.mlp.dense_4h_to_h.weight"),
        "shape": lambda s: s.update({"transformer.output_layer.weight": torch.zeros(1000, 64)}),
    }.items():
        target = tmp_path / case
        target.mkdir()
        shutil.copyfile(fixtures / "tiny_safetensors" / "config.json", target / "config.json")
        broken = dict(state)
        change(broken)
        save_file(broken, target / "model.safetensors", metadata={"format": "pt"})
        wanted = "dense_4h_to_h.weight" if case == "missing" else r"output_layer.weight \(checkpoint \(1000, 64\)"
        with pytest.raises(BadValue, match=wanted):
            _fresh(target)


def test_save_pretrained_round_trip(fixtures, goldens, tmp_path):
    model = _fresh(fixtures / "tiny")
    model.config.chatglm_version = 3
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["chatglm_version"] == 3 and saved["padded_vocab_size"] == 1024 and "auto_map" not in saved
    reloaded = _fresh(tmp_path)
    assert reloaded.config.chatglm_version == 3
    g = goldens[1]
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=g["forward.input_ids"]).logits, model(input_ids=g["forward.input_ids"]).logits)


# -- forward ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_logits_with_the_tokenizers_mask_and_positions(parity):
    model, g = parity
    out = model(
        input_ids=g["forward.input_ids"], attention_mask=g["forward.attention_mask"], position_ids=g["forward.position_ids"],
        use_cache=False, output_hidden_states=True,
    )
    real = g["forward.attention_mask"].bool()
    assert_close(out.logits[real], g["forward.logits"][real], atol=LOGITS_TOLERANCE, rtol=0)
    # pads follow THUDM's rule (a pad query attends to everything), so they reproduce too
    assert_close(out.logits, g["forward.logits"], atol=LOGITS_TOLERANCE, rtol=0)
    assert len(out.hidden_states) == 3
    for k, hidden in enumerate(out.hidden_states):
        assert_close(hidden[real], g[f"forward.hidden_states.{k}"][real], atol=1e-4, rtol=0)


@torch.no_grad()
def test_logits_with_mask_only(parity):
    """Positions counted over the real tokens; THUDM counted over the padded row: equal up to rounding (RoPE)."""
    model, g = parity
    real = g["forward.attention_mask"].bool()
    logits = model(input_ids=g["forward.input_ids"], attention_mask=g["forward.attention_mask"]).logits
    assert_close(logits[real], g["forward_mask_only.logits"][real], atol=LOGITS_TOLERANCE, rtol=0)
    assert_close(logits[real], g["forward.logits"][real], atol=LOGITS_TOLERANCE, rtol=0)


@torch.no_grad()
def test_logits_with_ids_only(parity):
    model, g = parity
    assert_close(model(input_ids=g["forward.input_ids"]).logits, g["forward_default.logits"], atol=LOGITS_TOLERANCE, rtol=0)
    for i in range(3):
        single = model(input_ids=g[f"forward_single.{i}.input_ids"]).logits
        assert_close(single, g[f"forward_single.{i}.logits"], atol=LOGITS_TOLERANCE, rtol=0)


def test_mask_is_thudms(goldens):
    g = goldens[1]
    mask, length = g["forward.attention_mask"], g["forward.input_ids"].shape[1]
    allowed = chatglm_attention_mask(mask, 0, length, "sdpa", torch.float32, torch.device("cpu"))
    assert torch.equal(allowed, ~g["forward.full_attention_mask"])
    additive = chatglm_attention_mask(mask, 0, length, "eager", torch.float32, torch.device("cpu"))
    assert torch.equal(additive < 0, g["forward.full_attention_mask"])
    assert torch.equal(position_ids_from_mask(mask, length), g["forward.position_ids"])
    # no padding: SDPA's causal flag, or nothing at all for one new token
    assert chatglm_attention_mask(torch.ones(2, 5), 0, 5, "sdpa", torch.float32, torch.device("cpu")) is None
    assert chatglm_attention_mask(None, 4, 1, "eager", torch.float32, torch.device("cpu")) is None


# -- training ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("attn", ATTENTION)
def test_loss_and_qkv_gradients(fixtures, goldens, attn):
    g = goldens[1]
    model = _fresh(fixtures / "tiny", attn).train()
    out = model(
        input_ids=g["train.input_ids"], attention_mask=g["train.attention_mask"], position_ids=g["train.position_ids"],
        labels=g["train.labels"],
    )
    assert_close(out.loss.reshape(1), g["train.loss"], atol=1e-5, rtol=0)
    real = g["train.attention_mask"].bool()
    assert_close(out.logits[real], g["train.logits"][real], atol=LOGITS_TOLERANCE, rtol=0)
    out.loss.backward()
    parameters = dict(model.named_parameters())
    grads = [name for name in g if name.startswith("train.grad.")]
    assert len(grads) == 4
    for name in grads:
        assert_close(parameters[name.removeprefix("train.grad.")].grad, g[name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("attn", ATTENTION)
def test_right_padded_batch_equals_thudms_left_padded_one(fixtures, goldens, attn):
    """The collator pads on the right; every row's logits at real tokens and the loss are THUDM's left-padded ones."""
    meta, g = goldens
    rows = meta["train_features_unpadded"]
    ids, mask = _padded([r["input_ids"] for r in rows], "right")
    labels = torch.tensor([r["labels"] + [-100] * (ids.shape[1] - len(r["labels"])) for r in rows])
    model = _load(str(fixtures / "tiny"), attn)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert_close(out.loss.reshape(1), g["train.loss"], atol=1e-5, rtol=0)
    left_real = g["train.attention_mask"].bool()
    assert_close(out.logits[mask.bool()], g["train.logits"][left_real], atol=LOGITS_TOLERANCE, rtol=0)


def test_gradient_checkpointing_gives_the_same_gradients(fixtures, goldens):
    g = goldens[1]
    batch = dict(input_ids=g["train.input_ids"], attention_mask=g["train.attention_mask"], labels=g["train.labels"])
    grads = []
    for checkpointing in (False, True):
        model = _fresh(fixtures / "tiny").train()
        if checkpointing:
            # transformers 5.2x renamed it (the old name warns); either checkpoints every GLMBlock
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable({"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable({"use_reentrant": False})
            assert model.transformer.encoder.layers[0].gradient_checkpointing
        model(**batch).loss.backward()
        grads.append(model.transformer.encoder.layers[0].self_attention.query_key_value.weight.grad)
    assert_close(grads[0], grads[1], atol=1e-6, rtol=0)


def test_lora_on_query_key_value_loads_unchanged(fixtures, goldens, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    assert TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING["chatglm"] == ["query_key_value"]
    g = goldens[1]
    batch = dict(input_ids=g["train.input_ids"], attention_mask=g["train.attention_mask"], labels=g["train.labels"])
    peft_model = get_peft_model(_fresh(fixtures / "tiny"), LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value"]))
    optimizer = torch.optim.SGD([p for p in peft_model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        optimizer.zero_grad()
        peft_model(**batch).loss.backward()
        optimizer.step()
    peft_model.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as adapter:
        keys = sorted(adapter.keys())
    assert "base_model.model.transformer.encoder.layers.0.self_attention.query_key_value.lora_A.weight" in keys
    assert len(keys) == 4
    peft_model.eval()
    reloaded = PeftModel.from_pretrained(_fresh(fixtures / "tiny"), tmp_path).eval()
    with torch.no_grad():
        expected = peft_model(**batch).logits
        assert not torch.allclose(expected, _load(str(fixtures / "tiny"), "eager")(**batch).logits)
        assert_close(reloaded(**batch).logits, expected, atol=1e-6, rtol=0)


# -- generation -------------------------------------------------------------------------------------------------------


@pytest.fixture
def no_deprecations():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        yield


@pytest.mark.parametrize("attn", ATTENTION)
@torch.no_grad()
def test_greedy_generation_batched_and_single(fixtures, goldens, attn, no_deprecations):
    g = goldens[1]
    model = _load(str(fixtures / "tiny"), attn)
    out = model.generate(
        input_ids=g["generate.input_ids"], attention_mask=g["generate.attention_mask"], max_new_tokens=20,
        do_sample=False, output_scores=True, return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, g["generate.sequences"])
    assert_close(torch.stack(out.scores, dim=1), g["generate.scores"], atol=LOGITS_TOLERANCE, rtol=0)
    for i in range(3):
        single = model.generate(input_ids=g[f"generate_single.{i}.input_ids"], max_new_tokens=20, do_sample=False)
        assert torch.equal(single, g[f"generate_single.{i}.sequences"])
    without_cache = model.generate(
        input_ids=g["generate.input_ids"], attention_mask=g["generate.attention_mask"], max_new_tokens=20,
        do_sample=False, use_cache=False,
    )
    assert torch.equal(without_cache, g["generate.sequences"])


@pytest.mark.parametrize("attn", ATTENTION)
@torch.no_grad()
def test_chat_stop_ids(fixtures, goldens, attn, no_deprecations):
    meta, g = goldens
    assert meta["check_chat_eos_changes_batch"]
    out = _load(str(fixtures / "tiny"), attn).generate(
        input_ids=g["generate.input_ids"], attention_mask=g["generate.attention_mask"], max_new_tokens=20,
        do_sample=False, eos_token_id=[2, USER, OBSERVATION],
    )
    assert torch.equal(out, g["generate_chat_eos.sequences"])


@pytest.mark.parametrize("attn", ATTENTION)
@torch.no_grad()
def test_cache_continued_by_several_tokens(attn):
    """A conversation continued from a cache (ChatGLM2's stream continuation): the new tokens see the cached ones."""
    from transformers.cache_utils import DynamicCache

    model = random_model(attn=attn)
    ids, mask = _padded(_prompts(1, (6, 13, 9)))
    full = model(input_ids=ids, attention_mask=mask).logits
    cache = DynamicCache(config=model.config)
    split = 10
    first = model(input_ids=ids[:, :split], attention_mask=mask[:, :split], cache=cache, use_cache=True)
    second = model(input_ids=ids[:, split:], attention_mask=mask, cache=_cache_of(first), use_cache=True)
    real = mask.bool()
    assert_close(torch.cat((first.logits, second.logits), dim=1)[real], full[real], atol=1e-5, rtol=0)
    assert _cache_of(second).get_seq_length() == ids.shape[1]


@torch.no_grad()
def test_eager_and_sdpa_agree_and_attentions_come_from_eager():
    ids, mask = _padded(_prompts(2))
    eager, sdpa = random_model(attn="eager"), random_model(attn="sdpa")
    expected = eager(input_ids=ids, attention_mask=mask).logits
    out = sdpa(input_ids=ids, attention_mask=mask, output_attentions=True)
    assert_close(out.logits, expected, atol=1e-5, rtol=0)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, ids.shape[1], ids.shape[1])
    assert_close(out.attentions[0].sum(-1), torch.ones(3, 4, ids.shape[1]))


# -- configurations beyond the checkpoint ------------------------------------------------------------------------------


VARIANTS = {
    "multi-head": dict(multi_query_attention=False),
    "layernorm-biases": dict(rmsnorm=False, add_bias_linear=True, apply_residual_connection_post_layernorm=True),
    "rope-ratio": dict(rope_ratio=50, post_layer_norm=False),
}


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_variants_agree_across_padding_attention_and_cache(variant):
    rows = _prompts(3)
    reference = random_model(attn="eager", **VARIANTS[variant])
    ids, mask = _padded(rows, "left")
    expected = reference(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    right_ids, right_mask = _padded(rows, "right")
    sdpa = random_model(attn="sdpa", **VARIANTS[variant])
    right = sdpa(input_ids=right_ids, attention_mask=right_mask).logits[right_mask.bool()]
    assert_close(right, expected, atol=1e-4, rtol=1e-5)
    batched = reference.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    for row, prompt in zip(batched, rows):
        single = reference.generate(input_ids=torch.tensor([prompt]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
        assert row[-6:].tolist() == single[0, -6:].tolist()


@torch.no_grad()
def test_multi_head_layout_is_per_head_q_k_v():
    """Without multi-query attention THUDM's rows are [q | k | v] per head; with one group per head they are
    [all q | all k | all v]. Permuting the rows turns one model into the other."""
    per_head = random_model(multi_query_attention=False)
    grouped = random_model(multi_query_attention=True, multi_query_group_num=4)
    grouped.load_state_dict(per_head.state_dict())
    heads, size = 4, 16
    order = torch.arange(3 * heads * size).view(heads, 3, size).transpose(0, 1).reshape(-1)
    for layer in grouped.transformer.encoder.layers:
        qkv = layer.self_attention.query_key_value
        qkv.weight.copy_(qkv.weight[order])
        qkv.bias.copy_(qkv.bias[order])
    ids, mask = _padded(_prompts(4))
    assert_close(grouped(input_ids=ids, attention_mask=mask).logits, per_head(input_ids=ids, attention_mask=mask).logits)


def test_rotary_angles_in_float16_for_chatglm2_only():
    positions = torch.tensor([[0, 1, 700, 2049, 5000]])
    v2 = RotaryEmbedding(ChatGLM3Config(kv_channels=128, chatglm_version=2))
    v3 = RotaryEmbedding(ChatGLM3Config(kv_channels=128, chatglm_version=3))
    theta16 = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float16) / 64))
    angles16 = (positions.half()[..., None] * theta16).float()
    assert torch.equal(v2(positions, torch.float16)[0], angles16.cos().half())
    theta32 = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    angles32 = positions.float()[..., None] * theta32
    assert torch.equal(v3(positions, torch.float16)[1], angles32.sin().half())
    for dtype in (torch.float32, torch.bfloat16):  # ChatGLM3's rule wherever ChatGLM2's code had no other
        assert torch.equal(v2(positions, dtype)[0], v3(positions, dtype)[0])
    assert not torch.equal(v2(positions, torch.float16)[0], v3(positions, torch.float16)[0])


@torch.no_grad()
def test_chatglm2_checkpoint_gives_the_same_float32_logits(fixtures, goldens):
    """THUDM's ChatGLM2 code is bit-identical to ChatGLM3's on these float32 weights (goldens.json)."""
    meta, g = goldens
    assert meta["check_chatglm2_code_same_weights"]["logits_maxabs_diff"] == 0.0
    model = _fresh(fixtures / "tiny_safetensors", "sdpa", chatglm_version=2).eval()
    assert model.config.chatglm_version == 2
    real = g["forward.attention_mask"].bool()
    logits = model(input_ids=g["forward.input_ids"], attention_mask=g["forward.attention_mask"]).logits
    assert_close(logits[real], g["forward.logits"][real], atol=LOGITS_TOLERANCE, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.no_grad()
def test_half_precision_runs_close_to_float32(fixtures, goldens, dtype):
    g = goldens[1]
    model = _fresh(fixtures / "tiny", "sdpa", dtype=dtype).eval()
    assert model.transformer.encoder.layers[0].input_layernorm.weight.dtype == dtype
    out = model(input_ids=g["forward.input_ids"], attention_mask=g["forward.attention_mask"], output_hidden_states=True)
    assert out.logits.dtype == dtype
    real = g["forward.attention_mask"].bool()
    assert_close(out.logits.float()[real], g["forward.logits"][real], atol=0.35, rtol=0.05)


def test_unsupported_options_are_refused():
    for field, value in (("quantization_bit", 4), ("pre_seq_len", 16), ("tie_word_embeddings", True)):
        with pytest.raises(BadValue, match=field):
            random_model(**{field: value})


# -- packed rows and FlexAttention (the GPU path, checked here with torch's unfused FlexAttention) ------------------------


def _packed(rows: list[list[int]], groups: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, segment ids) with rows packed as `groups` (lists of row indices), right-padded with 0."""
    from instructglm.train.packing import PackedCollator

    packs = [{"rows": [{"input_ids": rows[i], "seq_len": 1} for i in group]} for group in groups]
    batch = PackedCollator(pad_token_id=0, attention="segment_ids")(packs)
    return batch["input_ids"], batch["attention_mask"]


@pytest.mark.parametrize("attn", ATTENTION)
@torch.no_grad()
def test_packed_rows_give_their_alone_logits(attn):
    model = random_model(attn=attn)
    rows = _prompts(5, (6, 13, 9))
    ids, segments = _packed(rows, [[0, 2], [1]])
    logits = model(input_ids=ids, attention_mask=segments).logits
    for b, group in enumerate([[0, 2], [1]]):
        start = 0
        for i in group:
            alone = model(input_ids=torch.tensor([rows[i]])).logits[0]
            assert_close(logits[b, start : start + len(rows[i])], alone, atol=1e-5, rtol=0)
            start += len(rows[i])
    with pytest.raises(ValueError, match="cannot continue a KV cache"):
        model(input_ids=ids[:, -1:], attention_mask=segments, cache=_cache_of(model(input_ids=ids[:, :-1], use_cache=True)))


@pytest.mark.parametrize("batching", ["left", "right", "packed", "none"])
@torch.no_grad()
def test_flex_attention_block_mask_and_logits_match_sdpa(uncompiled_flex, batching):
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    rows = _prompts(6, (6, 13, 9))
    ids, mask = {
        "left": lambda: _padded(rows, "left"),
        "right": lambda: _padded(rows, "right"),
        "packed": lambda: _packed(rows, [[0, 2], [1]]),
        "none": lambda: (torch.tensor(rows[1:2]), None),
    }[batching]()
    length = ids.shape[1]
    block_mask = chatglm_attention_mask(mask, 0, length, "flex_attention", torch.float32, torch.device("cpu"))
    dense = chatglm_attention_mask(mask, 0, length, "eager", torch.float32, torch.device("cpu")) == 0
    assert isinstance(block_mask, BlockMask), "flex has no causal flag: even without padding there is a BlockMask"
    assert torch.equal(create_mask(block_mask.mask_mod, ids.shape[0], 1, length, length), dense.expand(ids.shape[0], -1, -1, -1))
    expected = random_model(attn="sdpa")(input_ids=ids, attention_mask=mask).logits
    got = random_model(attn="flex_attention")(input_ids=ids, attention_mask=mask).logits
    assert_close(got, expected, atol=1e-5, rtol=0)  # every position: pad queries follow THUDM's rule in both


@torch.no_grad()
def test_flex_attention_loads_reproduces_goldens_and_generates(fixtures, goldens, uncompiled_flex):
    g = goldens[1]
    model = _fresh(fixtures / "tiny", "flex_attention").eval()
    assert model.config._attn_implementation == "flex_attention"
    out = model(input_ids=g["forward.input_ids"], attention_mask=g["forward.attention_mask"], position_ids=g["forward.position_ids"])
    assert_close(out.logits, g["forward.logits"], atol=LOGITS_TOLERANCE, rtol=0)
    assert_close(model(input_ids=g["forward.input_ids"]).logits, g["forward_default.logits"], atol=LOGITS_TOLERANCE, rtol=0)
    generated = model.generate(
        input_ids=g["generate.input_ids"], attention_mask=g["generate.attention_mask"], max_new_tokens=20, do_sample=False
    )
    assert torch.equal(generated, g["generate.sequences"])
    with torch.enable_grad(), pytest.raises(BadValue, match="cannot train on the CPU"):
        model.train()(input_ids=g["forward.input_ids"])
