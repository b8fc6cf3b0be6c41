"""`--resume_from_checkpoint` after a kill -9 continues exactly: the same adapter as an unbroken run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.train.conftest import REPO, adapter_tensors, common_flags, run_train, subprocess_env, train_in_process


def complete(checkpoint) -> bool:
    """The Trainer writes trainer_state.json last; a parseable one means the checkpoint is whole."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] > 0
    except (OSError, ValueError):
        return False


@pytest.mark.slow
def test_kill_9_then_resume_matches_unbroken_run(tiny_llama_dir, llama_dataset, tmp_path):
    # 24 steps of batch 4 over 64 rows: the run crosses an epoch (reshuffle); dropout 0.1 draws from the RNG
    flags = dict(max_steps=24, save_steps=4, lora_dropout=0.1, learning_rate=3e-2)
    # The reference runs in a subprocess too: the same thread count gives the same summation order,
    # so the two runs can only differ by what the resume itself restores.
    reference = tmp_path / "unbroken"
    unbroken = run_train(*common_flags(tiny_llama_dir, llama_dataset, reference, **flags))
    assert unbroken.returncode == 0, unbroken.stderr[-3000:]

    out = tmp_path / "killed"
    argv = common_flags(tiny_llama_dir, llama_dataset, out, **flags)
    child = subprocess.Popen([sys.executable, "-m", "instructglm.cli", "train", *argv], cwd=REPO,
                             env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not complete(out / "checkpoint-8") and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL, "the run was still going when killed"
    assert complete(out / "checkpoint-8") and not (out / "adapter_model.safetensors").exists()

    resumed = run_train(*argv, "--resume_from_checkpoint", str(out / "checkpoint-8"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    state = json.loads((out / "checkpoint-24" / "trainer_state.json").read_text())
    assert state["global_step"] == 24
    expected, got = adapter_tensors(reference), adapter_tensors(out)
    assert expected.keys() == got.keys()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # and the logged losses after the resume point are the unbroken run's
    ref_state = json.loads((reference / "checkpoint-24" / "trainer_state.json").read_text())
    losses = lambda s: {e["step"]: e["loss"] for e in s["log_history"] if "loss" in e and e["step"] > 8}  # noqa: E731
    assert losses(state) == pytest.approx(losses(ref_state), rel=1e-4)
    assert (out / "loss.png").is_file()


def test_resume_from_checkpoint_last(tiny_llama_dir, llama_dataset, tmp_path):
    """`--resume_from_checkpoint last` picks the newest checkpoint in --output_dir."""
    out = tmp_path / "run"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=3, save_steps=3)) == 0
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=5, save_steps=5),
                            "--resume_from_checkpoint", "last") == 0
    history = json.loads((out / "checkpoint-5" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [2, 4]
