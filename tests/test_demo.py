"""The demo: its bundled data and tokenizer, the tiny-model factories, and the whole job end to end."""

from __future__ import annotations

import json
import re

import pytest

from instructglm.demo import build_tokenizer, sample_data
from tests.tiny_models import tiny_chatglm_dir, tiny_llama_dir

FINAL_LINE = re.compile(r"^exact match: before=(\d\.\d\d) after=(\d\.\d\d)$")


def _numbers_in(records):
    return {int(token) for record in records for field in ("input", "output") for token in re.findall(r"\d+", record[field])}


def test_sample_data_matches_its_generator_and_holds_out_the_eval_numbers():
    train, evaluation = sample_data.build()
    assert json.loads((sample_data.ASSETS_DIR / sample_data.TRAIN_FILE).read_text(encoding="utf-8")) == train
    assert json.loads((sample_data.ASSETS_DIR / sample_data.EVAL_FILE).read_text(encoding="utf-8")) == evaluation
    assert 300 <= len(train) <= 1000 and 50 <= len(evaluation) <= 200
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in train + evaluation)
    # held out: no evaluation prompt is in training, and the held-out numbers appear in no training record
    prompts = {(r["instruction"], r["input"]) for r in train}
    assert not [r for r in evaluation if (r["instruction"], r["input"]) in prompts]
    held_out = {int(r["input"]) for r in evaluation if r["input"].isdigit()}
    assert held_out and not held_out & _numbers_in(train)
    # both languages
    assert any(re.search(r"[\u4e00-\u9fff]", r["instruction"]) for r in train)
    assert any(re.search(r"[A-Za-z]", r["instruction"]) for r in train)


@pytest.mark.parametrize(("n", "english", "chinese"), [(0, "zero", "零"), (7, "seven", "七"), (15, "fifteen", "十五"), (40, "forty", "四十"), (47, "forty-seven", "四十七")])
def test_number_words(n, english, chinese):
    assert sample_data.english_words(n) == english
    assert sample_data.chinese_numeral(n) == chinese


def test_demo_tokenizer_has_the_chatglm6b_layout():
    from sentencepiece import sentencepiece_model_pb2 as model_pb2

    path = build_tokenizer.TOKENIZER_DIR / build_tokenizer.MODEL_FILE
    assert path.stat().st_size < 100_000
    proto = model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    kinds = model_pb2.ModelProto.SentencePiece
    pieces = [(p.piece, p.type) for p in proto.pieces]
    assert pieces[:5] == [("<unk>", kinds.UNKNOWN), ("<s>", kinds.CONTROL), ("</s>", kinds.CONTROL), ("<pad>", kinds.CONTROL), ("<n>", kinds.USER_DEFINED)]
    first_special = [p for p, _ in pieces].index("[MASK]")
    specials = pieces[first_special : first_special + 88]
    assert specials[:8] == [(name, kinds.CONTROL) for name in build_tokenizer.CONTROL_SPECIALS]
    assert specials[8:] == [(name, kinds.USER_DEFINED) for name in ["<|tab|>"] + [f"<|blank_{n}|>" for n in range(2, 81)]]
    assert all(kind == kinds.BYTE for _, kind in pieces[first_special + 88 :]) and len(pieces) - first_special - 88 == 256
    assert all(kind == kinds.NORMAL for _, kind in pieces[5:first_special])
    assert 300 <= len(pieces) <= 1000
    assert proto.trainer_spec.split_digits and proto.trainer_spec.byte_fallback and proto.trainer_spec.pad_id == 3


def test_demo_tokenizer_build_is_deterministic(tmp_path):
    built = build_tokenizer.build(tmp_path)
    for name in (build_tokenizer.MODEL_FILE, "tokenizer_config.json"):
        assert (built / name).read_bytes() == (build_tokenizer.TOKENIZER_DIR / name).read_bytes(), name


def test_chatglm_tokenizer_loads_the_demo_tokenizer():
    from transformers import AutoTokenizer

    import instructglm  # noqa: F401

    tokenizer = AutoTokenizer.from_pretrained(str(build_tokenizer.TOKENIZER_DIR))
    assert type(tokenizer).__name__ == "ChatGLMTokenizer"
    assert tokenizer.pad_token_id == 3
    assert tokenizer.convert_ids_to_tokens([tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.gmask_token_id, tokenizer.mask_token_id]) == ["<sop>", "<eop>", "[gMASK]", "[MASK]"]
    ids = tokenizer.encode("Instruction: 这个数加一等于几？\nInput: 47\nAnswer: ")
    assert ids[-2:] == [tokenizer.gmask_token_id, tokenizer.bos_token_id]
    # numbers are written digit by digit in both scripts; nfkc maps the full-width question mark
    assert tokenizer.tokenize("47 四十七 forty-seven？") == ["▁", "4", "7", "▁四", "十", "七", "▁forty", "-", "seven", "?"]
    # every answer the demo checks survives a round trip, so exact match is reachable
    _, evaluation = sample_data.build()
    for record in evaluation:
        assert tokenizer.decode(tokenizer.encode(record["output"], add_special_tokens=False)) == record["output"]


def test_tiny_chatglm_dir_loads_through_the_auto_classes(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_chatglm_dir(tmp_path / "glm", seed=1, hidden_size=32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert type(model).__name__ == "ChatGLMForConditionalGeneration" and model.config.hidden_size == 32
    assert model.config.num_layers == 2 and model.config.vocab_size >= len(tokenizer)
    assert (model.config.gmask_token_id, model.config.bos_token_id, model.config.pad_token_id) == (tokenizer.gmask_token_id, tokenizer.bos_token_id, 3)
    batch = tokenizer(["Input: 47", "四十七"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape[:2] == batch["input_ids"].shape
    again = AutoModelForCausalLM.from_pretrained(tiny_chatglm_dir(tmp_path / "glm2", seed=1, hidden_size=32))
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_tiny_llama_dir_loads_through_the_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_llama_dir(tmp_path / "llama")
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 2
    assert None not in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ids = tokenizer("What number comes after 47?")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert model(input_ids=__import__("torch").tensor([ids])).logits.shape[-1] == model.config.vocab_size


@pytest.mark.slow
def test_demo_learns_the_held_out_prompts(tmp_path, capsys):
    """The full `instructglm demo` (about 2 minutes on 2 CPU cores)."""
    from instructglm.cli import main

    assert main(["demo", "--output_dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = FINAL_LINE.match(lines[-1])
    assert match, lines[-1]
    before, after = map(float, match.groups())
    assert before <= 0.10 and after >= 0.80, lines[-1]
    assert (tmp_path / "loss.png").stat().st_size > 0
    assert (tmp_path / "adapter_model.safetensors").is_file() and (tmp_path / "chatglm-lora.pt").is_file()
    results = json.loads((tmp_path / "demo_results.json").read_text(encoding="utf-8"))
    hits = sum(p["prediction"] == p["target"] for p in results["predictions"])
    assert f"{hits / len(results['predictions']):.2f}" == f"{after:.2f}"


def test_the_summary_shows_exact_match_on_the_final_lines_scale():
    """The summary once printed `exact_match ... after 22.62` beside `exact match: before=0.00 after=0.23`."""
    from instructglm.demo.pipeline import metric_lines

    before = {"exact_match": 0.0, "bleu-4": 1.5, "rouge-l": 2.5, "loss": 4.0}
    after = {"exact_match": 22.62, "bleu-4": 40.0, "rouge-l": 50.0, "loss": 0.5}
    lines = metric_lines(before, after)
    assert lines[0].split() == ["[demo]", "exact", "match", "before", "0.00", "after", "0.23", "(fraction", "of", "answers)"]
    assert not any("22.62" in line for line in lines)
    assert [line.split()[-1] for line in lines[1:]] == ["(0-100)", "(0-100)", "(nats/token)"]


def test_the_demo_base_model_files_get_the_umask_mode(tmp_path):
    import os

    from instructglm.demo.pipeline import build_tiny_chatglm

    old = os.umask(0o022)
    try:
        path = build_tiny_chatglm(tmp_path / "base", hidden_size=32)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in path.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes
