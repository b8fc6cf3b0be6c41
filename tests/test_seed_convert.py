"""The 2023 seed's two convert command lines, verbatim, run as a user would from a project dir."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ASSETS = Path(__file__).parent / "data" / "assets"


def run_seed(repo_dir: Path, cwd: Path, *argv: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",  # nothing may come from the hub: the dataset name must resolve to the local dir
        "HF_DATASETS_CACHE": str(cwd / ".hf_cache"),
        "OMP_NUM_THREADS": "1",
    }
    command = [sys.executable, str(repo_dir / "cover_alpaca2jsonl.py"), *argv]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_seed_alpaca_command_line(tmp_path, repo_dir, shared_data):
    (tmp_path / "data").mkdir()
    shutil.copy(shared_data / "llamafactory__alpaca_en_demo.json", tmp_path / "data" / "alpaca_data.json")
    result = run_seed(repo_dir, tmp_path, "--data_path", "data/alpaca_data.json", "--save_path", "data/alpaca_data.jsonl")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "data" / "alpaca_data.jsonl").read_text(encoding="utf-8").splitlines()]
    source = json.loads((tmp_path / "data" / "alpaca_data.json").read_text(encoding="utf-8"))
    assert len(rows) == len(source) == 999
    for row, example in zip(rows, source):
        context = f"Instruction: {example['instruction']}\n"
        if example["input"]:
            context += f"Input: {example['input']}\n"
        assert row == {"context": context + "Answer: ", "target": example["output"]}
    meta = json.loads((tmp_path / "data" / "alpaca_data.jsonl.meta.json").read_text(encoding="utf-8"))
    assert (meta["format"], meta["template"], meta["source"]) == ("alpaca", "alpaca", "data/alpaca_data.json")
    assert "wrote 999 of 999 rows" in result.stdout and "90%" in result.stdout


@pytest.mark.slow
def test_seed_belle_command_line(tmp_path, repo_dir):
    local = tmp_path / "BelleGroup" / "generated_train_0.5M_CN"
    local.mkdir(parents=True)
    # BELLE's release is one JSON Lines file named .json; BOM and CRLF as some mirrors have them
    lines = (ASSETS / "belle_input_target.json").read_text(encoding="utf-8").splitlines()
    (local / "Belle_open_source_0.5M.json").write_bytes(b"\xef\xbb\xbf" + "\r\n".join(lines).encode("utf-8") + b"\r\n")
    (tmp_path / "data").mkdir()
    result = run_seed(
        repo_dir, tmp_path, "--dataset_name", "BelleGroup/generated_train_0.5M_CN", "--save_path", "data/belle_data.jsonl"
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "data" / "belle_data.jsonl").read_text(encoding="utf-8").splitlines()]
    expected = [json.loads(line) for line in lines]
    assert rows == [{"context": f"指令: {r['input']}\n答案: ", "target": r["target"]} for r in expected]
    meta = json.loads((tmp_path / "data" / "belle_data.jsonl.meta.json").read_text(encoding="utf-8"))
    assert meta["format"] == "belle" and meta["template"] == "belle" and meta["split"] == "train"
    assert meta["source"] == "BelleGroup/generated_train_0.5M_CN"
