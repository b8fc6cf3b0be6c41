"""kill -9 of `instructglm train` at seeded random instants, inside a checkpoint save and inside the final save.

Each killed run must leave a run dir with either no final adapter or a whole, loadable one;
`--resume_from_checkpoint last` must take a complete checkpoint (or, with none, the run starts over
with --overwrite_output_dir true) and finish with the unbroken run's adapter. The save windows are
held open by `train_with_slow_saves.py` (a test-only wrapper that pauses at marked points), so
the kills land inside them deterministically.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instructglm.train.run_dir import checkpoint_problem

from tests.train.conftest import (  # noqa: F401  (fixtures)
    REPO,
    adapter_tensors,
    common_flags,
    llama_dataset,
    reverse_jsonl,
    subprocess_env,
    tiny_llama_dir,
)

WRAPPER = Path(__file__).with_name("train_with_slow_saves.py")
DELAY = 0.25  # seconds each marked point waits: the window a kill lands in
MAX_STEPS = 12
# batch 4 over 64 rows, dropout drawing from the RNG, rotation deleting old checkpoints as it goes
FLAGS = dict(max_steps=MAX_STEPS, save_steps=2, save_total_limit=2, lora_dropout=0.1, learning_rate=3e-2)


def train(markers: Path, delay: float, argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WRAPPER), str(markers), str(delay), *argv], cwd=REPO,
                            env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen, timeout: int = 300) -> tuple[int, str]:
    _, err = process.communicate(timeout=timeout)
    return process.returncode, err


def events(markers: Path) -> list[str]:
    return markers.read_text(encoding="utf-8").splitlines() if markers.exists() else []


def kill_at(argv: list[str], markers: Path, event: str, offset: float) -> list[str]:
    """Start a run, SIGKILL it `offset` seconds after `event` is marked; the events seen before the kill."""
    process = train(markers, DELAY, argv)
    deadline = time.monotonic() + 240
    try:
        while event not in events(markers):
            assert process.poll() is None, f"the run ended before {event!r}: {process.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, f"no {event!r} in time"
            time.sleep(0.005)
        time.sleep(offset)
        process.send_signal(signal.SIGKILL)
    finally:
        process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run ended before the kill"
    return events(markers)


def final_adapter_state(run_dir: Path, model_dir: Path) -> str:
    """'none' when the run dir has no final adapter, 'whole' when it loads in both layouts; anything else fails."""
    from transformers import AutoModelForCausalLM

    from instructglm.models.lora import load_adapter

    if not (run_dir / "adapter_config.json").exists():
        return "none"
    for adapter in (run_dir, run_dir / "chatglm-lora.pt"):
        load_adapter(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(adapter))
    return "whole"


@pytest.fixture(scope="module")
def unbroken(tiny_llama_dir, llama_dataset, tmp_path_factory):
    """The adapter of the same run, never killed (through the wrapper too, without pauses)."""
    out = tmp_path_factory.mktemp("unbroken") / "run"
    code, err = finish(train(out.parent / "markers", 0.0, common_flags(tiny_llama_dir, llama_dataset, out, **FLAGS)))
    assert code == 0, err[-3000:]
    return adapter_tensors(out)


# (where to kill, seed): the seed picks the checkpoint or rename, and the instant within the window
SCENARIOS = [
    ("inside the first checkpoint save", 5),  # no checkpoint is whole yet: the run starts over
    ("inside a checkpoint save", 0),
    ("inside the final save", 1),
    ("between the final renames", 2),
    ("after the final renames", 3),
    ("at a random instant", 4),
]
CHECKPOINTS = [f"checkpoint {step}" for step in range(2, MAX_STEPS + 1, 2)]
RENAMES = ["publish instructglm_train.json", "publish chatglm-lora.pt", "publish adapter_model.safetensors",
           "publish adapter_config.json"]


def pick_kill(where: str, rng: random.Random) -> tuple[str, float]:
    """(the marked event to wait for, seconds after it to kill)."""
    if where == "inside the first checkpoint save":
        return CHECKPOINTS[0], rng.uniform(0.0, DELAY)
    if where == "inside a checkpoint save":
        return rng.choice(CHECKPOINTS[1:]), rng.uniform(0.0, DELAY)
    if where == "inside the final save":
        return "final-save", rng.uniform(0.0, DELAY)
    if where == "between the final renames":
        return rng.choice(RENAMES), rng.uniform(0.0, DELAY)
    if where == "after the final renames":
        return "published", rng.uniform(0.0, DELAY / 2)
    # anywhere from the first checkpoint save to the end: the run has about 15 marked pauses after it
    return CHECKPOINTS[0], rng.uniform(0.0, 14 * DELAY)


@pytest.mark.slow
@pytest.mark.parametrize(("where", "seed"), SCENARIOS)
def test_kill_9_leaves_old_or_whole_and_resume_finishes_exactly(where, seed, tiny_llama_dir, llama_dataset, unbroken, tmp_path):
    event, offset = pick_kill(where, random.Random(seed))
    out = tmp_path / "run"
    argv = common_flags(tiny_llama_dir, llama_dataset, out, **FLAGS)
    seen = kill_at(argv, tmp_path / "markers", event, offset)

    state = final_adapter_state(out, tiny_llama_dir)
    if "publish adapter_config.json" not in seen:
        assert state == "none", "no final adapter before its config is renamed in"
    if "published" in seen:
        assert state == "whole"

    has_complete = any(checkpoint_problem(c) is None for c in out.glob("checkpoint-*"))
    if where != "at a random instant":
        assert has_complete == (where != "inside the first checkpoint save")
    if has_complete:
        code, err = finish(train(tmp_path / "resume-markers", 0.0, [*argv, "--resume_from_checkpoint", "last"]))
    else:  # killed before the first checkpoint was whole: a new run must be asked for explicitly
        code, err = finish(train(tmp_path / "again-markers", 0.0, argv))
        assert code == 2 and "--overwrite_output_dir true" in err
        code, err = finish(train(tmp_path / "again-markers", 0.0, [*argv, "--overwrite_output_dir", "true"]))
    assert code == 0, err[-3000:]
    assert final_adapter_state(out, tiny_llama_dir) == "whole"
    assert not (out / ".instructglm-final-save").exists()
    got = adapter_tensors(out)
    assert got.keys() == unbroken.keys()
    torch.testing.assert_close(got, unbroken, rtol=1e-5, atol=1e-6)
