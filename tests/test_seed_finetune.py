"""The 2023 seed's command lines, run through the repo-root `finetune.py` shim as users typed them.

Only the values that point at the machine change (dataset, output dir, a tiny model) and the step
counts shrink; every flag of the seed's README line stays, `--fp16` included: on a machine without
CUDA it falls back to fp32 with a warning saying so.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.train.conftest import (  # noqa: F401  (fixtures)
    REPO,
    chatglm_dataset,
    reverse_jsonl,
    subprocess_env,
    tiny_chatglm_dir,
)

SEED_LINE = (
    "--dataset_path data/alpaca --lora_rank 8 --per_device_train_batch_size 2 --gradient_accumulation_steps 1 "
    "--max_steps 52000 --save_steps 1000 --save_total_limit 2 --learning_rate 2e-5 --fp16 "
    "--remove_unused_columns false --logging_steps 50 --output_dir output"
)


def seed_argv(line: str, **values: str) -> list[str]:
    """The seed's argv with some flag values replaced."""
    argv = line.split()
    for flag, value in values.items():
        argv[argv.index(f"--{flag}") + 1] = str(value)
    return argv


def run_seed_finetune(argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "finetune.py", *argv], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_seed_finetune_then_continue(tiny_chatglm_dir, chatglm_dataset, tmp_path):
    alpaca = tmp_path / "output" / "alpaca"
    argv = seed_argv(SEED_LINE, dataset_path=chatglm_dataset, max_steps=4, save_steps=2, output_dir=alpaca)
    argv += ["--model_name_or_path", str(tiny_chatglm_dir)]
    first = run_seed_finetune(argv)
    assert first.returncode == 0, first.stderr[-3000:]
    if not torch.cuda.is_available():
        assert "--fp16 needs a CUDA GPU and none is available: training in fp32" in first.stderr
    assert (alpaca / "chatglm-lora.pt").is_file() and (alpaca / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in alpaca.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    # the same line again would train over that run: refused in one line, naming the ways on
    again = run_seed_finetune(argv)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"--output_dir {alpaca} already holds a run" in again.stderr and "--resume_from_checkpoint last" in again.stderr

    belle = tmp_path / "output" / "belle"
    argv = seed_argv(SEED_LINE, dataset_path=chatglm_dataset, max_steps=2, save_steps=2, output_dir=belle)
    argv += ["--model_name_or_path", str(tiny_chatglm_dir), "--is_resume", "True",
             "--resume_path", str(alpaca / "chatglm-lora.pt")]
    second = run_seed_finetune(argv)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"continuing from adapter {alpaca / 'chatglm-lora.pt'}" in second.stdout
    before = torch.load(alpaca / "chatglm-lora.pt", weights_only=True)
    after = torch.load(belle / "chatglm-lora.pt", weights_only=True)
    assert before.keys() == after.keys()
    assert any("lora_B" in k and not torch.equal(before[k], after[k]) for k in before), "the continued run trained"
