"""loss.png and the non-finite loss guard, through the whole recipe."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from instructglm.train.callbacks import plot_loss
from tests.train.conftest import adapter_tensors, common_flags, train_in_process, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_loss_writes_png(tmp_path):
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}, {"step": 2, "train_loss": 2.7}]
    plot_loss(history, str(tmp_path / "a" / "loss.png"))
    plot_loss([], str(tmp_path / "empty.png"))  # nothing logged yet still gives a picture saying so
    for path in (tmp_path / "a" / "loss.png", tmp_path / "empty.png"):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


@pytest.fixture
def poisoned_llama(tiny_llama_dir, tmp_path):
    """The tiny Llama with a NaN embedding for '!': any batch holding a '!' has a NaN loss."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    path = tmp_path / "poisoned"
    shutil.copytree(tiny_llama_dir, path)
    weights = load_file(str(path / "model.safetensors"))
    bang = AutoTokenizer.from_pretrained(str(path)).convert_tokens_to_ids("!")
    weights["model.embed_tokens.weight"][bang] = float("nan")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(poisoned_llama, tmp_path):
    # sequential order, batch 4: rows 12-15 make step 4; the poisoned row is row 13
    rows = [{"context": f"reverse: {w}", "target": w[::-1]} for w in ["abc", "de", "fgh", "ij"] * 4]
    rows[13] = {"context": "reverse: no!", "target": "!on"}
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    flags = common_flags(poisoned_llama, data, out, max_steps=8, save_steps=3, train_sampling_strategy="sequential")
    with pytest.raises(FloatingPointError) as error:
        train_in_process(*flags)
    message = str(error.value)
    assert "training loss is nan at step 4" in message and f"{out / 'checkpoint-3'}" in message
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-3"]
    assert not (out / "adapter_model.safetensors").exists(), "no final adapter from a failed run"
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out / "checkpoint-3").values())
    losses = [e["loss"] for e in json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)
