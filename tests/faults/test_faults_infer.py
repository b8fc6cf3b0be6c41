"""Fault tests of the inference commands: kill -9 at seeded instants, then check what is left.

- `predict` killed mid-run, several times, then rerun: the output holds exactly one line per input
  row, in input order, none twice, each the prediction a clean run writes.
- `merge` killed mid-save: `--output` is absent, or a complete model that loads; a rerun completes.

The instants are seeded (one `random.Random` per test), and chosen relative to progress the test
can see (lines written, the merge's temp dir appearing), so they land inside the work on a busy
machine too.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.infer.checkpoints import checkpoints, llama_adapter, llama_dir  # noqa: F401  (fixtures)
from tests.infer.helpers import cli, cli_env

pytestmark = pytest.mark.slow

CONTEXTS = ["What is two plus three?", "hi", "Reverse the word cat: ", "你好，世界。", "The quick brown fox", "say hello", "一二三四五"]


def _kill_when(proc: subprocess.Popen, ready, delay: float, timeout: float = 180) -> bool:
    """SIGKILL `proc` `delay` seconds after `ready()` first holds; False if it ended before that."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None and not ready():
        assert time.monotonic() < deadline, "the command made no progress"
        time.sleep(0.002)
    time.sleep(delay)
    alive = proc.poll() is None
    if alive:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    return alive


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_predict_killed_at_seeded_instants_then_rerun(llama_dir, llama_adapter, tmp_path):
    from instructglm.infer.generate import GenerationArguments
    from instructglm.infer.load import load_model
    from instructglm.infer.predict import predict_rows

    rng = random.Random(8)
    n = 20
    rows = [{"context": f"{CONTEXTS[i % len(CONTEXTS)]} {i}", "id": i} for i in range(n)]
    rows[11]["context"] = "hello " * 400  # over the tiny model's context: written as skipped, resumed past
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = cli("predict", "--model_name_or_path", str(llama_dir), "--adapter", str(llama_adapter), "--device", "cpu",
               "--input", str(inp), "--output", str(out), "--batch_size", "2", "--max_new_tokens", "32")

    kills_mid_run = 0
    for target in sorted(rng.sample(range(1, n - 2), 3)):
        proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = _lines(out)
        killed = _kill_when(proc, lambda: _lines(out) >= max(target, before + 1), delay=rng.uniform(0, 0.03))
        kills_mid_run += killed and _lines(out) < n
    result = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert kills_mid_run >= 2, "the runs finished before they could be killed; the test did not test"

    written = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")[:-1]]
    assert [r["id"] for r in written] == list(range(n))  # one line per row, in order, none twice
    model, tokenizer, _ = load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")
    clean = tmp_path / "clean.jsonl"
    predict_rows(model, tokenizer, rows, clean, GenerationArguments(max_new_tokens=32, do_sample=False), batch_size=2)
    assert written == [json.loads(line) for line in clean.read_text(encoding="utf-8").split("\n")[:-1]]
    assert written[11]["prediction"] is None and "prompt too long" in written[11]["skipped"]


def _partial_dirs(out: Path) -> list[Path]:
    return list(out.parent.glob(f".{out.name}.partial-*"))


def _complete_or_absent(out: Path, expected_logits) -> bool:
    """True when `out` is a complete model whose logits are the merge's; asserts it is that or absent/empty."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not out.exists() or not any(out.iterdir()):
        return False
    merged = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        logits = merged(**tokenizer(["What is two plus three?"], return_tensors="pt")).logits
    torch.testing.assert_close(logits, expected_logits, atol=1e-5, rtol=1e-4)
    return True


def test_merge_killed_mid_save_leaves_nothing_or_a_complete_model(llama_dir, llama_adapter, tmp_path):
    import torch

    from instructglm.infer.load import load_model

    tuned, tokenizer, _ = load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")
    with torch.no_grad():
        expected = tuned(**tokenizer(["What is two plus three?"], return_tensors="pt")).logits

    rng = random.Random(13)
    out = tmp_path / "merged"
    args = cli("merge", "--model_name_or_path", str(llama_dir), "--adapter", str(llama_adapter), "--output", str(out),
               "--max_shard_size", "20KB")
    kills_mid_save = 0
    for _ in range(2):
        proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        killed = _kill_when(proc, lambda: bool(_partial_dirs(out)) or out.exists(), delay=rng.uniform(0, 0.02))
        mid_save = killed and bool(_partial_dirs(out))
        kills_mid_save += mid_save
        complete = _complete_or_absent(out, expected)
        if mid_save:
            assert not complete  # the rename is the last step: nothing was published yet
        if complete:
            break
    assert kills_mid_save >= 1, "merge finished before it could be killed; the test did not test"
    if not _complete_or_absent(out, expected):
        result = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert _complete_or_absent(out, expected)
    assert _partial_dirs(out) == []  # the killed merges' temp dirs were cleared by the one that completed
