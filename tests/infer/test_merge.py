"""instructglm merge: sharded safetensors in the official layout, equal to base + adapter."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from instructglm.errors import OutputExists
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
    sentencepiece = {"tokenizer.model", "tokenizer_config.json"}
    tokenizer_files = {"chatglm": {"ice_text.model", "tokenizer_config.json"}, "llama": {"tokenizer.json", "tokenizer_config.json"},
                       "chatglm2": sentencepiece, "chatglm3": sentencepiece, "glm4": {"tokenizer.json", "tokenizer_config.json"}}
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
    # The merged dir carries the run's record (family, template), so chat/serve on it prompt as on base + adapter.
    _, _, prompter = load_model(str(base_dir), adapter=str(adapter), device="cpu")
    _, _, merged_prompter = load_model(str(out), device="cpu")
    assert merged_prompter.name == json.loads((adapter / "instructglm_train.json").read_text())["template"] == prompter.name
    assert merged_prompter.family == prompter.family and merged_prompter.stop_ids == prompter.stop_ids
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": "say hello"}]
    assert merged_prompter.prompt_ids(conversation) == prompter.prompt_ids(conversation)


def test_merge_refuses_a_non_empty_output(llama_dir, llama_adapter, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(OutputExists, match="not empty"):
        merge(str(llama_dir), str(llama_adapter), tmp_path)


def test_a_failed_merge_leaves_no_output_and_no_partial_dir(llama_dir, llama_adapter, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    real = PreTrainedModel.save_pretrained

    def dies_mid_save(self, directory, **kwargs):
        real(self, directory, **kwargs)
        raise OSError(28, "No space left on device")  # as a full disk after the shards

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dies_mid_save)
    with pytest.raises(OSError, match="No space"):
        merge(str(llama_dir), str(llama_adapter), tmp_path / "merged")
    assert list(tmp_path.iterdir()) == []  # neither the output nor a temp dir beside it


def test_merge_fills_an_empty_dir_and_clears_a_killed_merges_leftovers(llama_dir, llama_adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    leftover = tmp_path / ".merged.partial-999999999"  # a pid that is not running
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    merge(str(llama_dir), str(llama_adapter), out)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]
    assert (out.stat().st_mode & 0o777) == (0o777 & ~_umask())  # the umask's mode, not mkdtemp's 0700


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_merged_files_get_the_umask_mode_not_safetensors_0600(llama_dir, llama_adapter, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = merge(str(llama_dir), str(llama_adapter), tmp_path / "merged")
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o644, modes
    assert set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("size", ["0", "banana", "0MB", "5 pebibytes"])
def test_a_bad_max_shard_size_is_refused_before_the_model_loads(size, llama_adapter, tmp_path, capsys):
    from instructglm.cli import main

    argv = ["merge", "--model_name_or_path", str(tmp_path / "never-loaded"), "--adapter", str(llama_adapter),
            "--output", str(tmp_path / "out"), "--max_shard_size", size]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"instructglm merge: error: --max_shard_size {size!r} is not a positive size; give e.g. 2GB, 500MB or a byte count\n"


def test_shard_sizes_read_as_transformers_reads_them():
    from instructglm.infer.merge import shard_bytes

    assert shard_bytes("2GB") == 2 * 10**9 and shard_bytes("500MB") == 500 * 10**6 and shard_bytes("1GiB") == 2**30
    assert shard_bytes(1000) == 1000 and shard_bytes("1000") == 1000


def test_a_full_disk_during_the_merge_is_one_line_naming_the_output(llama_dir, llama_adapter, tmp_path, monkeypatch, capsys):
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    from instructglm.cli import main

    def full_disk(self, *args, **kwargs):
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    out = tmp_path / "merged"
    argv = ["merge", "--model_name_or_path", str(llama_dir), "--adapter", str(llama_adapter), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    last = err.rstrip("\n").split("\n")[-1]  # after the weight-loading progress bar
    assert last.startswith("instructglm merge: error: ") and "No space left on device" in last and str(out) in last
    assert "Traceback" not in err
    assert not out.exists() and not list(tmp_path.glob(".merged.partial-*"))
