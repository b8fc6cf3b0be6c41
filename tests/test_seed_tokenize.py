"""The 2023 command line `python tokenize_dataset_rows.py ...`, verbatim, end to end.

Run in a scratch directory laid out like a user's checkout: `THUDM/chatglm-6b/` is a local copy
of the real tokenizer files, which `from_pretrained("THUDM/chatglm-6b")` takes before the hub;
`HF_HUB_OFFLINE=1` proves nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SEED_COMMAND = (
    "tokenize_dataset_rows.py --jsonl_path data/alpaca_data.jsonl --save_path data/alpaca --max_seq_length 320"
)


def _run_seed_command(repo_dir: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(cwd / "hf-home"), "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, str(repo_dir / SEED_COMMAND.split()[0]), *SEED_COMMAND.split()[1:]]
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _alpaca_jsonl(shared_data: Path, path: Path) -> list[dict[str, str]]:
    """Rows as the seed's converter wrote them (its alpaca template), from the shared Alpaca samples."""
    records = json.loads((shared_data / "llamafactory__alpaca_en_demo.json").read_text(encoding="utf-8"))[:60]
    records += json.loads((shared_data / "llamafactory__alpaca_zh_demo.json").read_text(encoding="utf-8"))[:60]
    rows = [
        {
            "context": f"Instruction: {r['instruction']}\n"
            + (f"Input: {r['input']}\n" if r["input"] else "")
            + "Answer: ",
            "target": r["output"],
        }
        for r in records
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return rows


@pytest.mark.slow
def test_seed_tokenize_command(tmp_path, repo_dir, chatglm6b_tokenizer_dir, chatglm6b_tokenizer, shared_data):
    import datasets

    shutil.copytree(chatglm6b_tokenizer_dir, tmp_path / "THUDM" / "chatglm-6b")
    rows = _alpaca_jsonl(shared_data, tmp_path / "data" / "alpaca_data.jsonl")
    sidecar = {"template": "alpaca", "format": "alpaca", "source": "data/alpaca_data.json", "counts": {}}
    (tmp_path / "data" / "alpaca_data.jsonl.meta.json").write_text(json.dumps(sidecar), encoding="utf-8")

    done = _run_seed_command(repo_dir, tmp_path)
    assert done.returncode == 0, done.stderr
    # the seed printed the dataset's head; we also print the counts
    assert "input_ids" in done.stdout and "seq_len" in done.stdout
    assert "data/alpaca_data.jsonl -> data/alpaca: rows 120: kept 120" in done.stdout

    dataset = datasets.load_from_disk(str(tmp_path / "data" / "alpaca"))
    assert dataset.column_names == ["input_ids", "seq_len"] and len(dataset) == len(rows)
    tokenizer = chatglm6b_tokenizer
    gmask, sop, eop = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>", "<eop>"])
    truncated = 0
    for row, ids, seq_len in zip(rows, dataset["input_ids"], dataset["seq_len"], strict=True):
        prompt = tokenizer.encode(row["context"])
        target = tokenizer.encode(row["target"], add_special_tokens=False)
        truncated += len(prompt) + len(target) + 1 > 320
        assert ids == (prompt + target)[:319] + [eop] and seq_len == len(prompt)
        assert ids[seq_len - 2 : seq_len] == [gmask, sop] and len(ids) <= 320
    assert truncated > 0  # the limit was exercised
    meta = json.loads((tmp_path / "data" / "alpaca" / "instructglm_data.json").read_text(encoding="utf-8"))
    assert meta["template"] == "alpaca" and meta["model_name_or_path"] == "THUDM/chatglm-6b"
    assert meta["counts"]["truncated"] == truncated and meta["max_seq_length"] == 320


@pytest.mark.slow
def test_seed_tokenize_command_without_the_model_fails_cleanly(tmp_path, repo_dir, shared_data):
    _alpaca_jsonl(shared_data, tmp_path / "data" / "alpaca_data.jsonl")
    done = _run_seed_command(repo_dir, tmp_path)  # offline, and no local THUDM/chatglm-6b
    assert done.returncode == 2
    assert "THUDM/chatglm-6b" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "data" / "alpaca").exists()
