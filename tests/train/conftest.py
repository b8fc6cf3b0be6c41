"""Tiny models, tokenizers and datasets for the training tests, all built in tmp dirs.

A tiny Llama (2 layers, width 32) with a character-level tokenizer made with `tokenizers` stands
for "any causal LM transformers loads"; a tiny native ChatGLM-6B uses the real ice_text tokenizer.
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

REPO = Path(__file__).resolve().parents[2]
ALPHABET = string.ascii_lowercase + string.digits + " :.,?!-"


def make_char_tokenizer(path: Path):
    """A character-level fast tokenizer that prepends <s>, like Llama's."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + list(ALPHABET))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))
    return fast


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
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = make_char_tokenizer(path)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        # a wider init than 0.02 gives the frozen random weights a signal a LoRA can steer in a few steps
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(path))
    return path


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
    import shutil

    import torch
    from transformers import AutoTokenizer

    from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

    assets = REPO / "src" / "instructglm" / "demo" / "assets" / "tokenizer"
    path = tmp_path_factory.mktemp("tiny-chatglm")
    for file in assets.iterdir():
        shutil.copy(file, path / file.name)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("bos", "<sop>"), ("eos", "<eop>"), ("mask", "[MASK]"), ("gmask", "[gMASK]"))}
    config = ChatGLMConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_layers=2,
        num_attention_heads=4,
        inner_hidden_size=64,
        max_sequence_length=256,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
        mask_token_id=ids["mask"],
        gmask_token_id=ids["gmask"],
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    ChatGLMForConditionalGeneration(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def chatglm_dataset(tiny_chatglm_dir, reverse_jsonl, tmp_path_factory) -> Path:
    """`instructglm tokenize` output for the tiny ChatGLM-6B."""
    return tokenized(tiny_chatglm_dir, reverse_jsonl, tmp_path_factory.mktemp("chatglm-data") / "reverse")
