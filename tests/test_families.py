"""Every model family through the same commands: convert -> tokenize -> train, then the adapter loads back.

One tiny random model per family (tests/tiny_models.py): ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B (native),
GLM-4 (`glm`, `glm4`: transformers' own classes) and a Llama with a chat template. The data are ChatGLM3's
fine-tuning layout with tools, tool calls and results, and multi-turn rows, kept whole by
`convert --template messages`; the text families drop the tool rows (counted) and train the rest.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import _need

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).parent / "data" / "assets"
FAMILIES = {  # family -> whether it can express the tool rows
    "chatglm-6b": False,
    "chatglm2-6b": False,
    "chatglm3-6b": True,
    "glm-4": True,
    "glm-4-0414": True,
    "chat-template": True,
}


@pytest.fixture(scope="module")
def chatglm3_tokenizer_dir(shared_dir) -> Path:
    return _need(shared_dir / "tokenizers" / "chatglm3-6b")


def _model_dir(family: str, path: Path, chatglm3_tokenizer_dir: Path) -> Path:
    from tests import tiny_models

    if family == "chatglm-6b":
        return tiny_models.tiny_chatglm_dir(path)
    if family in ("chatglm2-6b", "chatglm3-6b"):
        return tiny_models.tiny_chatglm3_dir(path, chatglm3_tokenizer_dir, version=int(family[7]))
    if family in ("glm-4", "glm-4-0414"):
        return tiny_models.tiny_glm4_dir(path, "glm" if family == "glm-4" else "glm4")
    return tiny_models.tiny_chat_llama_dir(path)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    """24 rows: 8 copies of the demo's three (a tool-using multi-turn one, a single turn, one with loss: false)."""
    rows = json.loads((ASSETS / "chatglm3_tools.json").read_text(encoding="utf-8")) * 8
    path = tmp_path_factory.mktemp("data") / "chatglm3_tools.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def _run(command: str, *argv) -> int:
    from instructglm.cli import run_command

    return run_command(command, [str(a) for a in argv])


def _mean_loss(model, tokenizer, dataset) -> float:
    """The training loss of the first rows, batched as train batches them."""
    import torch

    from instructglm.models.registry import family_for
    from instructglm.train.collator import CausalLMCollator, pad_token_id_for

    collate = CausalLMCollator(pad_token_id_for(tokenizer), family_for(model.config, tokenizer).labelled_prompt_tail)
    with torch.no_grad():
        return float(model(**collate([dataset[i] for i in range(6)])).loss)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_commands_for_every_family(family, conversations, chatglm3_tokenizer_dir, tmp_path):
    import datasets
    import torch

    from instructglm.models.loading import load_causal_lm, load_tokenizer
    from instructglm.train.lora import load_adapter

    model_dir = _model_dir(family, tmp_path / "model", chatglm3_tokenizer_dir)
    jsonl, data, run = tmp_path / "chat.jsonl", tmp_path / "data", tmp_path / "run"
    assert _run("convert", "--data_path", conversations, "--save_path", jsonl, "--template", "messages") == 0
    assert _run("tokenize", "--jsonl_path", jsonl, "--save_path", data, "--max_seq_length", 512,
                "--model_name_or_path", model_dir) == 0
    meta = json.loads((data / "instructglm_data.json").read_text(encoding="utf-8"))
    assert meta["family"] == family and meta["template"] == "messages"
    tools = FAMILIES[family]
    assert meta["counts"]["dropped_unsupported"] == (0 if tools else 8) and meta["counts"]["kept"] == (24 if tools else 16)
    dataset = datasets.load_from_disk(str(data))
    assert ("labels" in dataset.column_names) == (family not in ("chatglm-6b", "chatglm2-6b"))

    assert _run(
        "train", "--model_name_or_path", model_dir, "--dataset_path", data, "--output_dir", run,
        "--per_device_train_batch_size", 4, "--max_steps", 12, "--learning_rate", 3e-2, "--lora_rank", 8,
        "--logging_steps", 4, "--save_steps", 12, "--report_to", "none", "--seed", 7, "--disable_tqdm", "true",
    ) == 0
    record = json.loads((run / "instructglm_train.json").read_text(encoding="utf-8"))
    # a text family records the round template it wrote the conversations with
    template = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2"}.get(family, "messages")
    assert record["family"] == family and record["template"] == template and record["stop_token_ids"]
    assert record["chat_format"] == {"chatglm-6b": "text", "chatglm2-6b": "text", "chatglm3-6b": "chatglm3"}.get(
        family, "chat-template"
    )
    expected_targets = ["query_key_value"] if family.startswith("chatglm") else None
    if expected_targets:
        assert record["lora"]["target_modules"] == expected_targets

    tokenizer, _ = load_tokenizer(str(model_dir))
    base = load_causal_lm(str(model_dir), dtype=torch.float32)
    before = _mean_loss(base, tokenizer, dataset)
    tuned = load_adapter(base, str(run))
    after = _mean_loss(tuned, tokenizer, dataset)
    assert after < before, (before, after)  # the adapter loads back, and it learned the rows


@pytest.mark.parametrize("data_family, model_family", [("chatglm-6b", "chatglm3-6b"), ("chatglm3-6b", "chatglm-6b")])
def test_a_dataset_of_one_chatglm_version_never_trains_another(data_family, model_family, conversations, chatglm3_tokenizer_dir, tmp_path):
    from instructglm.errors import BadValue

    data_model = _model_dir(data_family, tmp_path / "a", chatglm3_tokenizer_dir)
    model = _model_dir(model_family, tmp_path / "b", chatglm3_tokenizer_dir)
    jsonl, data = tmp_path / "chat.jsonl", tmp_path / "data"
    assert _run("convert", "--data_path", conversations, "--save_path", jsonl, "--template", "messages") == 0
    assert _run("tokenize", "--jsonl_path", jsonl, "--save_path", data, "--model_name_or_path", data_model) == 0
    from instructglm.train.args import FinetuneArguments, TrainingArguments
    from instructglm.train.finetune import finetune

    with pytest.raises(BadValue, match=f"tokenized for the {data_family} family, but the model is {model_family}"):
        finetune(
            FinetuneArguments(dataset_path=str(data), model_name_or_path=str(model)),
            TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to="none"),
        )
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()
