"""`torchrun --nproc_per_node 2 finetune.py ...` on the CPU (gloo): the adapter of one process with the doubled batch."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest
import torch

from tests.train.conftest import REPO, adapter_tensors, common_flags, subprocess_env, train_in_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_with_doubled_batch(tiny_llama_dir, llama_dataset, tmp_path):
    flags = dict(max_steps=4, save_steps=4, lora_dropout=0.0, learning_rate=3e-2, logging_steps=1)
    single = tmp_path / "single"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, single, per_device_train_batch_size=8, **flags)) == 0

    ddp = tmp_path / "ddp"
    argv = common_flags(tiny_llama_dir, llama_dataset, ddp, per_device_train_batch_size=4, **flags)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "finetune.py", *argv],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads((ddp / "instructglm_train.json").read_text())["world_size"] == 2
    state = json.loads((ddp / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 4
    ref_state = json.loads((single / "checkpoint-4" / "trainer_state.json").read_text())
    losses = lambda s: [e["loss"] for e in s["log_history"] if "loss" in e]  # noqa: E731
    assert losses(state) == pytest.approx(losses(ref_state), rel=1e-4)
    torch.testing.assert_close(adapter_tensors(ddp), adapter_tensors(single), rtol=1e-4, atol=1e-6)
