"""ChatGLM3Tokenizer (ChatGLM2-6B and ChatGLM3-6B) against THUDM's goldens, its batched path and its chat inputs.

The goldens (`fixtures/chatglm3/tokenizer_golden.json`) were produced by THUDM's own ChatGLM3 tokenizer under
transformers 4.33, with ChatGLM2's value under `chatglm2_differs` wherever it differs; every case is its own test
for each version, so a failing text shows up by name. ChatGLM2's directory is built from its shared configs and
ChatGLM3's `tokenizer.model` (the same file, see the fixtures' PROVENANCE.md).
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from transformers import AutoTokenizer

import instructglm  # noqa: F401  (registers the native classes with the Auto classes)
from instructglm.errors import BadValue
from instructglm.models.chatglm3.model import position_ids_from_mask
from instructglm.models.chatglm3.tokenizer import ChatGLM3Tokenizer
from tests.conftest import SHARED, _need

GOLDEN = SHARED / "fixtures" / "chatglm3" / "tokenizer_golden.json"
VERSIONS = (3, 2)


def _ids(kind: str, key: str | None = None) -> list:
    """Collection-time ids for the golden records (the fixture still decides skip/fail if absent)."""
    if not GOLDEN.exists():
        return [pytest.param(-1, id="goldens-missing")]
    records = json.loads(GOLDEN.read_text(encoding="utf-8"))[kind]
    return [pytest.param(i, id=f"{i:02d}-{record[key][:24]!r}" if key else f"{i:02d}") for i, record in enumerate(records)]


@pytest.fixture(scope="module")
def golden(shared_dir) -> dict:
    return json.loads(_need(GOLDEN).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def v3_dir(shared_dir):
    return _need(shared_dir / "tokenizers" / "chatglm3-6b")


@pytest.fixture(scope="module")
def v2_dir(shared_dir, v3_dir, tmp_path_factory):
    """THUDM/chatglm2-6b's tokenizer directory: its own configs plus the shared tokenizer.model."""
    target = tmp_path_factory.mktemp("chatglm2-6b")
    for path in _need(shared_dir / "tokenizers" / "chatglm2-6b").iterdir():
        shutil.copyfile(path, target / path.name)
    shutil.copyfile(v3_dir / "tokenizer.model", target / "tokenizer.model")
    return target


@pytest.fixture(scope="module")
def tokenizers(v3_dir, v2_dir) -> dict[int, ChatGLM3Tokenizer]:
    return {3: AutoTokenizer.from_pretrained(str(v3_dir)), 2: AutoTokenizer.from_pretrained(str(v2_dir))}


def _expected(record: dict, version: int) -> dict:
    return {**record, **record["chatglm2_differs"]} if version == 2 else record


# ---- THUDM goldens -------------------------------------------------------------------------------------------------


def test_auto_tokenizer_finds_each_version(tokenizers, golden):
    facts = golden["facts"]
    for version, tokenizer in tokenizers.items():
        assert type(tokenizer) is ChatGLM3Tokenizer
        assert tokenizer.chatglm_version == version
        assert len(tokenizer) == tokenizer.vocab_size == facts[f"tokenizer_vocab_size_chatglm{version}"]
        for name, index in facts[f"special_ids_chatglm{version}"].items():
            assert tokenizer.convert_tokens_to_ids(name) == tokenizer.get_command(name) == index
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (facts["pad_token_id"], facts["eos_token_id"])
        assert (tokenizer.pad_token, tokenizer.eos_token, tokenizer.unk_token) == ("<unk>", "</s>", "<unk>")
        assert tokenizer.padding_side == facts["padding_side"]
        assert tokenizer.get_prefix_tokens() == facts["prefix_tokens"]
        assert tokenizer.clean_up_tokenization_spaces is facts["clean_up_tokenization_spaces"]
    with pytest.raises(KeyError, match="ChatGLM2"):
        tokenizers[2].get_command("<|user|>")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("index", _ids("cases", "text"))
def test_golden_case(tokenizers, golden, version, index):
    tokenizer, case = tokenizers[version], _expected(golden["cases"][index], version)
    text = case["text"]
    assert tokenizer.encode(text) == case["ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == case["ids_no_special"]
    assert tokenizer.tokenize(text) == case["tokens"]
    assert tokenizer.convert_tokens_to_ids(case["tokens"]) == case["ids_no_special"]
    assert tokenizer.decode(case["ids_no_special"]) == case["decoded"]
    assert tokenizer.decode(case["ids"]) == case["decoded_with_special"]


@pytest.mark.parametrize("index", _ids("cases", "text"))
def test_golden_case_encode_special_tokens(v3_dir, golden, index):
    tokenizer = ChatGLM3Tokenizer.from_pretrained(str(v3_dir), encode_special_tokens=True)
    case = golden["cases"][index]
    assert tokenizer.encode(case["text"]) == case["ids_encode_special_tokens"]
    assert tokenizer.tokenize(case["text"]) == case["tokens_encode_special_tokens"]
    assert tokenizer([case["text"]])["input_ids"] == [case["ids_encode_special_tokens"]]


def test_encode_special_tokens_is_chatglm3s_option(tokenizers):
    """Off by default (role strings are text), settable on the instance, and a no-op for ChatGLM2 (no role tokens)."""
    v3, v2 = tokenizers[3], tokenizers[2]
    text = "<|user|>你好<|assistant|>"
    plain = v3.encode(text)
    try:
        v3.encode_special_tokens = True
        assert v3.encode(text) == [64790, 64792, 64795, 36474, 54591, 64796]
    finally:
        v3.encode_special_tokens = False
    assert v3.encode(text) == plain
    literal = ChatGLM3Tokenizer(vocab_file=v2.vocab_file, chatglm_version=2, encode_special_tokens=True)
    assert literal.encode(text) == v2.encode(text) == plain


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_texts_batched_equal_goldens(tokenizers, golden, version):
    tokenizer, cases = tokenizers[version], golden["cases"]
    texts = [case["text"] for case in cases]
    assert tokenizer(texts)["input_ids"] == [case["ids"] for case in cases]
    assert tokenizer(texts, add_special_tokens=False)["input_ids"] == [case["ids_no_special"] for case in cases]
    expected = [_expected(case, version)["decoded_with_special"] for case in cases]
    assert tokenizer.batch_decode([case["ids"] for case in cases]) == expected


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("index", _ids("pairs", "a"))
def test_golden_pair(tokenizers, golden, version, index):
    pair = golden["pairs"][index]
    expected = pair.get("chatglm2_ids", pair["ids"]) if version == 2 else pair["ids"]
    assert tokenizers[version].encode(pair["a"], pair["b"]) == expected


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_pairs_batched(tokenizers, golden, version):
    pairs = golden["pairs"]
    got = tokenizers[version]([p["a"] for p in pairs], [p["b"] for p in pairs])["input_ids"]
    assert got == [p.get("chatglm2_ids", p["ids"]) if version == 2 else p["ids"] for p in pairs]


@pytest.mark.parametrize("version", VERSIONS)
def test_golden_padded_batch(tokenizers, golden, version):
    """Left padding with id 0 and the standard 2-D mask; the model's positions from that mask are THUDM's."""
    batch = golden["batch"]
    assert batch["chatglm2_identical"]
    out = tokenizers[version](batch["texts"], padding=True, return_tensors="pt")
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].dtype == out["attention_mask"].dtype == torch.int64
    assert out["input_ids"].tolist() == batch["input_ids"]
    assert out["attention_mask"].tolist() == batch["attention_mask"]
    positions = position_ids_from_mask(out["attention_mask"], out["input_ids"].shape[1])
    assert positions.tolist() == batch["position_ids"]


def test_right_padding_for_training(tokenizers, golden):
    texts = golden["batch"]["texts"]
    left = tokenizers[3](texts, padding=True)
    right = tokenizers[3](texts, padding=True, padding_side="right")
    for l_ids, l_mask, r_ids, r_mask in zip(left["input_ids"], left["attention_mask"], right["input_ids"], right["attention_mask"]):
        n = sum(l_mask)
        assert l_ids[len(l_ids) - n :] == r_ids[:n] and r_ids[n:] == [0] * (len(r_ids) - n)
        assert r_mask == [1] * n + [0] * (len(r_mask) - n)


@pytest.mark.parametrize("index", _ids("chat_chatglm3", "query"))
def test_golden_chat_chatglm3(tokenizers, golden, index):
    chat = golden["chat_chatglm3"][index]
    tokenizer = tokenizers[3]
    out = tokenizer.build_chat_input(chat["query"], history=chat["history"], role=chat["role"])
    assert set(out) == {"input_ids", "attention_mask"}
    assert out["input_ids"].tolist() == [chat["input_ids"]]
    assert out["attention_mask"].tolist() == [chat["attention_mask"]]
    assert position_ids_from_mask(out["attention_mask"], len(chat["input_ids"])).tolist() == [chat["position_ids"]]
    assert tokenizer.decode(chat["input_ids"]) == chat["decoded_with_special"]


@pytest.mark.parametrize("index", _ids("chat_chatglm2", "query"))
def test_golden_chat_chatglm2(tokenizers, golden, index):
    chat = golden["chat_chatglm2"][index]
    tokenizer = tokenizers[2]
    history = [tuple(turn) for turn in chat["history"]]
    prompt = tokenizer.build_prompt(chat["query"], history)
    assert prompt == chat["prompt"]
    out = tokenizer([prompt], return_tensors="pt")
    assert out["input_ids"].tolist() == [chat["input_ids"]]
    assert out["attention_mask"].tolist() == [chat["attention_mask"]]
    assert position_ids_from_mask(out["attention_mask"], len(chat["input_ids"])).tolist() == [chat["position_ids"]]
    stream = tokenizer.build_stream_inputs(chat["query"], history)
    if history:
        assert tokenizer.decode(stream["input_ids"][0]) == chat["stream_continuation_prompt"]
        assert stream["input_ids"].tolist() == [chat["stream_continuation_input_ids"]]
    else:  # the first round is the whole prompt, prefix included
        assert stream["input_ids"].tolist() == [chat["input_ids"]]


def test_chat_inputs_need_the_right_version(tokenizers):
    with pytest.raises(BadValue, match="ChatGLM2 tokenizer"):
        tokenizers[2].build_chat_input("你好")
    with pytest.raises(BadValue, match="role 'tool'"):
        tokenizers[3].build_chat_input("你好", history=[{"role": "tool", "content": "x"}])
    with pytest.raises(BadValue, match=r"history\[0\]"):
        tokenizers[3].build_chat_input("你好", history=[("问", "答")])
    assert tokenizers[3].chat_stop_token_ids == [2, 64795, 64797]
    assert tokenizers[2].chat_stop_token_ids == [2]


# ---- beyond the goldens --------------------------------------------------------------------------------------------


def test_batched_equals_one_by_one_in_one_sentencepiece_call(tokenizers, golden, monkeypatch):
    tokenizer = ChatGLM3Tokenizer(vocab_file=tokenizers[3].vocab_file, chatglm_version=3, encode_special_tokens=True)
    rng = random.Random(0)
    pieces = [case["text"] for case in golden["cases"]] + ["<|user|>", "<|observation|>", "sop", "[gMASK]"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 4))) for _ in range(120)]
    one_by_one = [tokenizer.encode(text) for text in texts]
    calls = []
    encode = tokenizer.sp_model.encode
    monkeypatch.setattr(tokenizer.sp_model, "encode", lambda *a, **k: calls.append(1) or encode(*a, **k))
    assert tokenizer(texts)["input_ids"] == one_by_one
    assert len(calls) == 1


@pytest.mark.parametrize("version", VERSIONS)
def test_decode_generated_ids(tokenizers, version):
    """Ids past the vocabulary (the model's padded rows), eos and pad decode to nothing; skip_special_tokens drops
    the GLM specials that ChatGLM3 writes by name."""
    tokenizer = tokenizers[version]
    ids = tokenizer.encode("你好") + [64796, 2, 0, 65000, 64800]
    named = "[gMASK]sop 你好<|assistant|>" if version == 3 else "你好"
    assert tokenizer.decode(ids) == named
    assert tokenizer.decode(ids, skip_special_tokens=True) == "你好"


def test_truncation_keeps_the_prefix(tokenizers):
    tokenizer = tokenizers[3]
    out = tokenizer(["今天下午三点在图书馆见面，别迟到。", "你好"], max_length=6, truncation=True, padding=True)
    first, second = out["input_ids"]
    assert first == [64790, 64792, 53456, 32390, 43169, 54534]
    assert second == [0, 0, 64790, 64792, 36474, 54591]
    assert out["attention_mask"] == [[1] * 6, [0, 0, 1, 1, 1, 1]]


def test_vocabulary_is_fixed(tokenizers):
    tokenizer = ChatGLM3Tokenizer(vocab_file=tokenizers[3].vocab_file, chatglm_version=3)
    with pytest.raises(BadValue, match="cannot add '<new>'"):
        tokenizer.add_tokens(["<new>"])
    assert tokenizer.add_special_tokens({"additional_special_tokens": ["<|user|>"]}) == 0
    assert tokenizer.encode("<|user|>") == tokenizers[3].encode("<|user|>")  # still text, as THUDM's


@pytest.mark.parametrize("version", VERSIONS)
def test_save_and_reload_identical(tokenizers, golden, tmp_path, version):
    tokenizer = tokenizers[version]
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["chatglm_version"] == version and "auto_map" not in saved
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert type(reloaded) is ChatGLM3Tokenizer and reloaded.chatglm_version == version
    texts = [case["text"] for case in golden["cases"]]
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert reloaded.batch_decode(reloaded(texts)["input_ids"]) == tokenizer.batch_decode(tokenizer(texts)["input_ids"])
