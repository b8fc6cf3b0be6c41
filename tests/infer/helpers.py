"""Tiny models and adapters for the inference and serving tests.

The checkpoints come from the shared `tests/tiny_models.py` (native ChatGLM-6B, ChatGLM2-6B and
ChatGLM3-6B, transformers' GLM-4 and Llama, 2 layers, random weights); `tiny_adapter(model_dir, path)`
writes a peft LoRA adapter for one whose weights are random (not zero), so the adapter visibly changes
the outputs, plus the run's `instructglm_train.json` naming its template (and family), as `train` would.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

def tiny_llama(path: Path, seed: int = 0) -> Path:
    from tests.tiny_models import tiny_llama_dir

    return tiny_llama_dir(path, seed=seed)


def tiny_chatglm(path: Path, seed: int = 0, **overrides) -> Path:
    from tests.tiny_models import tiny_chatglm_dir

    return tiny_chatglm_dir(path, seed=seed, **overrides)


def chatglm3_tokenizer_dir() -> Path:
    """The shared chatglm3-6b tokenizer dir (ChatGLM2 shares its tokenizer.model); skips the test when absent."""
    from tests.conftest import SHARED, _need

    return _need(SHARED / "tokenizers" / "chatglm3-6b")


def tiny_chatglm2(path: Path, seed: int = 0) -> Path:
    from tests.tiny_models import tiny_chatglm3_dir

    return tiny_chatglm3_dir(path, chatglm3_tokenizer_dir(), version=2, seed=seed)


def tiny_chatglm3(path: Path, seed: int = 0) -> Path:
    from tests.tiny_models import tiny_chatglm3_dir

    return tiny_chatglm3_dir(path, chatglm3_tokenizer_dir(), version=3, seed=seed)


def tiny_glm4(path: Path, seed: int = 0) -> Path:
    from tests.tiny_models import tiny_glm4_dir

    # a character-level tokenizer spends one token per character of GLM-4's long tools prompt: room for it
    return tiny_glm4_dir(path, "glm", seed=seed, max_position_embeddings=1024)


def tiny_adapter(
    model_dir: Path, path: Path, template: str = "alpaca", targets=("q_proj", "v_proj"), seed: int = 1, family: str | None = None
) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(path)
    record = {"template": template, **({"family": family} if family else {})}
    (path / "instructglm_train.json").write_text(json.dumps(record), encoding="utf-8")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app):
    """Serve an ASGI `app` with uvicorn on a free loopback port, on a thread; returns (url, server, thread).
    Stop it with `server.should_exit = True; thread.join()`."""
    import threading
    import time

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, thread


def cli_env() -> dict:
    """Environment for `python -m instructglm.cli` subprocesses: one thread, repo sources first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    return env


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "instructglm.cli", *args]


def reference_completion(model, tokenizer, prompt, max_new_tokens: int, prompter=None):
    """The reference answer: transformers' `generate`, greedy, on `prompt` (a text, or token ids) alone (no
    batching engine), stopping at the `prompter`'s stop ids (default: the model's eos ids).

    Returns a `Completion` (text decoded as the prompter decodes, else without special tokens; cut at the first stop).
    """
    from instructglm.infer.generate import Completion, GenerationArguments, eos_ids, generate_ids

    settings = GenerationArguments(max_new_tokens=max_new_tokens, do_sample=False)
    eos = set(prompter.stop_ids) if prompter is not None else eos_ids(model, tokenizer)
    (ids,), (prompt_tokens,), _ = generate_ids(model, tokenizer, [prompt], settings, eos_token_id=sorted(eos))
    stop = next((i for i, t in enumerate(ids) if t in eos), None)
    kept = ids if stop is None else ids[:stop]
    reason = "stop" if stop is not None else "length"
    text = prompter.decode(kept) if prompter is not None else tokenizer.decode(kept, skip_special_tokens=True)
    return Completion(text, prompt_tokens, len(kept), reason)
