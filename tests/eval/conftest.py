"""Tiny models, a quickly trained adapter and small data for the eval tests, built once per session.

- `glm_base`: a random 2-layer native ChatGLM-6B (width 32) with the demo's ice_text tokenizer.
- `llama_base`: a random 2-layer Llama (width 64) with the word-level tokenizer.
- `number_rows` / `number_jsonl`: eight rows "Input: 3 -> three" in the alpaca template.
- `trained_adapter`: a LoRA adapter on `glm_base` trained in-process on those rows (~1 s): it
  must beat the base on every metric. Saved in peft's layout with the run's template, as `train` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests import tiny_models

NUMBER_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
GLM_CONFIG = {"hidden_size": 32, "inner_hidden_size": 64}
ADAPTER_TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "word_embeddings", "lm_head"]


@pytest.fixture(scope="session")
def glm_base(tmp_path_factory) -> Path:
    return tiny_models.tiny_chatglm_dir(tmp_path_factory.mktemp("glm") / "base", seed=0, vocab_multiple=1, **GLM_CONFIG)


@pytest.fixture(scope="session")
def llama_base(tmp_path_factory) -> Path:
    return tiny_models.tiny_llama_dir(tmp_path_factory.mktemp("llama") / "base", seed=0)


def number_row(number: int, word: str) -> dict[str, str]:
    from instructglm.data.templates import get_template

    return {"context": get_template("alpaca").render("Write the number in English words.", str(number)), "target": word}


@pytest.fixture(scope="session")
def number_rows() -> list[dict[str, str]]:
    return [number_row(i, word) for i, word in enumerate(NUMBER_WORDS, 1)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def number_jsonl(number_rows, tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "numbers.jsonl", number_rows)


def train_adapter(base_dir: Path, rows: list[dict], path: Path, steps: int = 200, seed: int = 0) -> Path:
    """Fit a LoRA adapter to `rows` with training's own rows, collator and peft set-up; save it at `path`."""
    import torch

    from instructglm.data.tokenize import RowEncoder
    from instructglm.infer.load import load_model
    from instructglm.train.collator import collator_for
    from instructglm.models.lora import attach_lora

    model, tokenizer, _ = load_model(str(base_dir), device="cpu", dtype="float32")
    model_type = model.config.model_type
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = attach_lora(model, rank=8, alpha=16, dropout=0.0, target=ADAPTER_TARGETS)
        encoder = RowEncoder(tokenizer, 64, model_type)
        features = []
        for row in rows:
            ids, seq_len, _ = encoder.encode(
                tokenizer(row["context"], add_special_tokens=False)["input_ids"],
                tokenizer(row["target"], add_special_tokens=False)["input_ids"],
            )
            features.append({"input_ids": ids, "seq_len": seq_len})
        batch = collator_for(tokenizer, model_type)(features)
        optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
        peft_model.train()
        for _ in range(steps):
            peft_model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    peft_model.save_pretrained(path)
    (path / "instructglm_train.json").write_text(json.dumps({"template": "alpaca"}), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def trained_adapter(glm_base, number_rows, tmp_path_factory) -> Path:
    return train_adapter(glm_base, number_rows, tmp_path_factory.mktemp("run") / "numbers")


@pytest.fixture(scope="session")
def chatglm3_base(tmp_path_factory) -> Path:
    """A random 2-layer native ChatGLM3-6B with the real chatglm3-6b tokenizer (from the shared dir)."""
    from tests.conftest import SHARED, _need

    tokenizer_dir = _need(SHARED / "tokenizers" / "chatglm3-6b")
    return tiny_models.tiny_chatglm3_dir(tmp_path_factory.mktemp("chatglm3") / "base", tokenizer_dir, version=3, seed=0)
