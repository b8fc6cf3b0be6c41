"""Tiny models, tokenizers and datasets for the training tests, all built in tmp dirs.

The models come from the shared factories in `tests/tiny_models.py`, narrowed for training: a tiny
Llama (2 layers, width 32) with the character-level tokenizer stands for "any causal LM transformers
loads"; a tiny native ChatGLM-6B (2 layers, width 32) uses the demo's small ice_text tokenizer. Both
embeddings have exactly the tokenizer's size (no padding rows), and ChatGLM keeps its tied output head.
The task is string reversal ("reverse: abc" -> "cba"), small enough for a few steps to move the loss.
"""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest

from tests import tiny_models

REPO = Path(__file__).resolve().parents[2]
TRAIN_LLAMA = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "max_position_embeddings": 128,
    # a wider init than 0.02 gives the frozen random weights a signal a LoRA can steer in a few steps
    "initializer_range": 0.3,
}
TRAIN_CHATGLM = {"hidden_size": 32, "inner_hidden_size": 64, "tie_word_embeddings": True}


def reverse_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 7)))
        rows.append({"context": f"reverse: {word}", "target": word[::-1]})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A random 2-layer Llama (width 32) with the character-level tokenizer."""
    return tiny_models.tiny_llama_dir(
        tmp_path_factory.mktemp("tiny-llama"), seed=0, tokenizer="char", vocab_multiple=1, **TRAIN_LLAMA
    )


@pytest.fixture(scope="session")
def reverse_jsonl(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "reverse.jsonl"
    write_jsonl(path, reverse_rows(64))
    # the sidecar `instructglm convert` writes; train records its template
    Path(f"{path}.meta.json").write_text(json.dumps({"template": "plain", "format": "test", "counts": {}}))
    return path


def tokenized(model_dir: Path, jsonl: Path, path: Path) -> Path:
    """`instructglm tokenize` output of `jsonl` at `path`, with `model_dir`'s tokenizer (64 tokens a row)."""
    from instructglm.data.tokenize import load_tokenizer, tokenize_jsonl

    tokenizer, model_type = load_tokenizer(str(model_dir))
    tokenize_jsonl(jsonl, path, tokenizer, 64, model_type=model_type)
    return path


@pytest.fixture(scope="session")
def llama_dataset(tiny_llama_dir, reverse_jsonl, tmp_path_factory) -> Path:
    """`instructglm tokenize` output for the tiny Llama."""
    return tokenized(tiny_llama_dir, reverse_jsonl, tmp_path_factory.mktemp("llama-data") / "reverse")


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    env.pop("WANDB_MODE", None)
    return env


def run_train(*argv: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """`instructglm train argv` in a fresh interpreter (as a user runs it)."""
    return subprocess.run(
        [sys.executable, "-m", "instructglm.cli", "train", *argv],
        cwd=REPO,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def train_in_process(*argv: str) -> int:
    from instructglm.cli import run_command

    return run_command("train", list(argv))


def common_flags(model_dir: Path, dataset: Path, output_dir: Path, **overrides) -> list[str]:
    """Flags for a short CPU run; keyword overrides replace or add `--key value`."""
    flags = {
        "model_name_or_path": model_dir,
        "dataset_path": dataset,
        "output_dir": output_dir,
        "per_device_train_batch_size": 4,
        "max_steps": 6,
        "learning_rate": 1e-2,
        "logging_steps": 2,
        "save_steps": 3,
        "report_to": "none",
        "seed": 7,
        "dataloader_num_workers": 0,
        "disable_tqdm": "true",
    }
    flags.update(overrides)
    argv = []
    for key, value in flags.items():
        if value is not None:
            argv += [f"--{key}", str(value)]
    return argv


def adapter_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


@pytest.fixture(scope="session")
def tiny_chatglm_dir(tmp_path_factory) -> Path:
    """A random 2-layer ChatGLM-6B (width 32) with the demo's small ice_text tokenizer."""
    return tiny_models.tiny_chatglm_dir(
        tmp_path_factory.mktemp("tiny-chatglm"), seed=0, vocab_multiple=1, **TRAIN_CHATGLM
    )


@pytest.fixture(scope="session")
def chatglm_dataset(tiny_chatglm_dir, reverse_jsonl, tmp_path_factory) -> Path:
    """`instructglm tokenize` output for the tiny ChatGLM-6B."""
    return tokenized(tiny_chatglm_dir, reverse_jsonl, tmp_path_factory.mktemp("chatglm-data") / "reverse")


def poisoned_rows(n: int, poisoned_row: int) -> list[dict]:
    """`n` reversal rows; row `poisoned_row` holds a '!' (a NaN loss in the poisoned model)."""
    rows = [{"context": f"reverse: {w}", "target": w[::-1]} for w in ["abc", "de", "fgh", "ij"] * (n // 4)]
    rows[poisoned_row] = {"context": "reverse: no!", "target": "!on"}
    return rows


@pytest.fixture
def poisoned_llama(tiny_llama_dir, tmp_path):
    """The tiny Llama with a NaN embedding for '!': any batch holding a '!' has a NaN loss."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    path = tmp_path / "poisoned"
    shutil.copytree(tiny_llama_dir, path)
    weights = load_file(str(path / "model.safetensors"))
    bang = AutoTokenizer.from_pretrained(str(path)).convert_tokens_to_ids("!")
    weights["model.embed_tokens.weight"][bang] = float("nan")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path
