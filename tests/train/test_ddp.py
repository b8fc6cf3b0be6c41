"""`torchrun --nproc_per_node 2 finetune.py ...` on the CPU (gloo): the adapter of one process with the doubled
batch; every process stops together on a NaN; `--fsdp` saves through the Trainer."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys

import pytest
import torch

from tests.train.conftest import (
    REPO,
    adapter_tensors,
    common_flags,
    poisoned_rows,
    subprocess_env,
    train_in_process,
    write_jsonl,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*argv, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), "finetune.py", *argv],
        cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout,
    )


def losses(state) -> list[float]:
    return [e["loss"] for e in state["log_history"] if "loss" in e]


@pytest.mark.slow
def test_two_processes_match_one_with_doubled_batch(tiny_llama_dir, llama_dataset, tmp_path):
    flags = dict(max_steps=4, save_steps=4, lora_dropout=0.0, learning_rate=3e-2, logging_steps=1)
    single = tmp_path / "single"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, single, per_device_train_batch_size=8, **flags)) == 0

    ddp = tmp_path / "ddp"
    run = torchrun(*common_flags(tiny_llama_dir, llama_dataset, ddp, per_device_train_batch_size=4, **flags))
    assert run.returncode == 0, run.stderr[-4000:]
    assert json.loads((ddp / "instructglm_train.json").read_text())["world_size"] == 2
    state = json.loads((ddp / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and state["train_batch_size"] == 4
    ref_state = json.loads((single / "checkpoint-4" / "trainer_state.json").read_text())
    assert losses(state) == pytest.approx(losses(ref_state), rel=1e-4)
    torch.testing.assert_close(adapter_tensors(ddp), adapter_tensors(single), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_a_nan_on_one_process_stops_every_process(poisoned_llama, tmp_path):
    """The NaN batch reaches one process only; both stop at the same step with the one-line error, none hangs."""
    data = write_jsonl(tmp_path / "d.jsonl", poisoned_rows(32, 29))
    out = tmp_path / "run"
    run = torchrun(*common_flags(poisoned_llama, data, out, max_steps=8, save_steps=2, lora_dropout=0.0,
                                 train_sampling_strategy="sequential"), timeout=240)
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if "instructglm train: error:" in line]
    assert len(errors) == 2, run.stderr[-4000:]
    steps = {re.search(r"at step (\d+)", line).group(1) for line in errors}
    assert len(steps) == 1, errors  # the same step on both
    assert any("training loss is nan" in line for line in errors)
    assert any("training loss is not finite" in line and "(on 1 of 2 processes)" in line for line in errors), errors
    assert not re.search(r"\[rank\d\]: Traceback", run.stderr), "a process died with a traceback"
    step = int(steps.pop())
    names = sorted(p.name for p in out.glob("checkpoint-*"))
    assert names == sorted(f"checkpoint-{n}" for n in range(2, step, 2))
    assert not (out / "adapter_model.safetensors").exists()


@pytest.mark.slow
def test_fsdp_flag_on_cpu_saves_the_single_process_adapter(tiny_llama_dir, llama_dataset, tmp_path):
    """`--fsdp "full_shard auto_wrap"` with 2 CPU processes (gloo), saved through `Trainer.save_model`.

    accelerate builds FSDP only on accelerators, so on the CPU the Trainer runs DDP (the warning
    says so); on GPUs the same code path gathers the shards. The adapter and the `.pt` made from
    the saved file equal the single-process run's.
    """
    flags = dict(max_steps=4, save_steps=4, lora_dropout=0.0, learning_rate=3e-2, logging_steps=1)
    single = tmp_path / "single"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, single, per_device_train_batch_size=8, **flags)) == 0
    sharded = tmp_path / "fsdp"
    run = torchrun(*common_flags(tiny_llama_dir, llama_dataset, sharded, per_device_train_batch_size=4,
                                 fsdp="full_shard auto_wrap", **flags))
    assert run.returncode == 0, run.stderr[-4000:]
    if not torch.cuda.is_available():
        assert "--fsdp full_shard auto_wrap shards only on GPUs" in run.stderr
    torch.testing.assert_close(adapter_tensors(sharded), adapter_tensors(single), rtol=1e-4, atol=1e-6)
    pt, single_pt = (torch.load(d / "chatglm-lora.pt", weights_only=True) for d in (sharded, single))
    torch.testing.assert_close(pt, single_pt, rtol=1e-4, atol=1e-6)
