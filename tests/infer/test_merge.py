"""instructglm merge: sharded safetensors in the official layout, equal to base + adapter."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from instructglm.infer.load import load_model
from instructglm.infer.merge import merge
from tests.infer.helpers import cli, cli_env


def test_merged_checkpoint_equals_base_plus_adapter(family, tmp_path):
    name, base_dir, adapter = family
    out = tmp_path / "merged"
    result = subprocess.run(
        cli("merge", "--model_name_or_path", str(base_dir), "--adapter", str(adapter), "--output", str(out),
            "--max_shard_size", "100KB"),
        capture_output=True, text=True, env=cli_env(), timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    files = {p.name for p in out.iterdir()}
    shards = sorted(f for f in files if f.startswith("model-") and f.endswith(".safetensors"))
    assert len(shards) > 1 and shards[-1].endswith(f"-of-{len(shards):05d}.safetensors")
    tokenizer_files = {"chatglm": {"ice_text.model", "tokenizer_config.json"}, "llama": {"tokenizer.json", "tokenizer_config.json"}}
    assert {"config.json", "model.safetensors.index.json", "instructglm_train.json"} | tokenizer_files[name] <= files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        with safe_open(out / shard, "pt") as f:
            assert not [k for k in f.keys() if "lora" in k]

    tuned, tokenizer, _ = load_model(str(base_dir), adapter=str(adapter), device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(out)
    batch = tokenizer(["What is two plus three?", "hi"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = tuned(**batch).logits
        got = merged(**batch).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    # The merged dir carries the run's template, so chat/serve on it prompt as training did.
    assert load_model(str(out), device="cpu")[2].name == json.loads((adapter / "instructglm_train.json").read_text())["template"]


def test_merge_refuses_a_non_empty_output(llama_dir, llama_adapter, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        merge(str(llama_dir), str(llama_adapter), tmp_path)
