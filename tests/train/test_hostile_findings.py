"""Regressions from a hostile tester's pass over `instructglm train`: each test failed before its fix.

Bugs: resuming a finished run trained past --max_steps; an inf gradient norm was applied and
checkpointed; two runs shared one --output_dir; the base model's dir was accepted as --output_dir;
adapters were saved 0600; a killed run's temp files stayed. Then the messages: each bad value is one
`instructglm train: error:` line (exit 2), or sensible behaviour.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.train.conftest import adapter_tensors, common_flags, reverse_rows, train_in_process, write_jsonl


def user_error(capsys, *flags) -> str:
    """`instructglm train flags` must end as a user error: exit 2, exactly one `error:` line, no traceback."""
    capsys.readouterr()
    assert train_in_process(*flags) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("instructglm train: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def checkpoint_names(out) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


# ---- B2: a resume from the checkpoint at --max_steps trains nothing more ----

B2_FLAGS = dict(max_steps=6, save_steps=2, per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler_type="constant")


def test_rerunning_a_finished_run_with_last_trains_no_step_past_max_steps(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    flags = common_flags(tiny_llama_dir, llama_dataset, out, **B2_FLAGS)
    assert train_in_process(*flags) == 0
    finished = sha256(out / "adapter_model.safetensors")
    capsys.readouterr()
    assert train_in_process(*flags, "--resume_from_checkpoint", "last") == 0
    assert f"{out / 'checkpoint-6'} is at --max_steps 6: the run is finished" in capsys.readouterr().err
    assert checkpoint_names(out) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["global_step"] == 6
    assert sha256(out / "adapter_model.safetensors") == finished


def test_killed_after_the_last_checkpoint_resume_saves_the_unbroken_adapter(tiny_llama_dir, llama_dataset, tmp_path):
    out = tmp_path / "run"
    flags = common_flags(tiny_llama_dir, llama_dataset, out, **B2_FLAGS)
    assert train_in_process(*flags) == 0
    unbroken = adapter_tensors(out)
    # what a kill -9 between checkpoint-6 and the final save leaves: checkpoints, no final adapter
    for name in ("adapter_config.json", "adapter_model.safetensors", "chatglm-lora.pt", "instructglm_train.json"):
        (out / name).unlink()
    assert train_in_process(*flags, "--resume_from_checkpoint", "last") == 0
    assert checkpoint_names(out)[-1] == "checkpoint-6"
    torch.testing.assert_close(adapter_tensors(out), unbroken, rtol=0, atol=0)


def test_a_checkpoint_past_max_steps_is_one_line(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, **B2_FLAGS)) == 0
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, out, **{**B2_FLAGS, "max_steps": 4}),
                         "--resume_from_checkpoint", str(out / "checkpoint-6"))
    assert "is at step 6, past --max_steps 4" in message


# ---- B7: the first non-finite gradient norm stops the run before it is applied ----


def test_an_inf_gradient_norm_is_never_applied_nor_checkpointed(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    flags = common_flags(tiny_llama_dir, llama_dataset, out, max_steps=10, save_steps=2, logging_steps=1,
                         learning_rate=1e12, warmup_steps=1000000)
    message = user_error(capsys, *flags)
    assert "the gradients are not finite" in message or "training loss is" in message, message
    step = int(message.split(" at step ")[1].split()[0].rstrip(":,"))
    names = checkpoint_names(out)
    assert names == [f"checkpoint-{n}" for n in range(2, step, 2)]
    for name in names:
        logged = [e["grad_norm"] for e in json.loads((out / name / "trainer_state.json").read_text())["log_history"]
                  if "grad_norm" in e]
        assert logged and all(math.isfinite(x) for x in logged), (name, logged)
    if names:
        assert f"the last good checkpoint is {out / names[-1]}" in message
    assert not (out / "adapter_model.safetensors").exists()


def test_a_gradient_norm_that_overflows_with_finite_gradients_stops_the_run(
    tiny_llama_dir, llama_dataset, tmp_path, capsys, monkeypatch
):
    """Each gradient finite, their norm inf: clipping by it zeroes them, so only the norm tells (the tester's
    lr 1e12 case, where such steps were applied, logged as grad_norm inf and checkpointed)."""
    from instructglm.train.callbacks import NonFiniteGuard

    begin = NonFiniteGuard.on_train_begin

    def huge_gradients_from_step_3(self, args, state, control, model=None, **kwargs):
        for param in model.parameters():
            if param.requires_grad:  # finite (~1e20 and up), but their squares overflow float32
                param.register_hook(lambda grad: grad * 1e25 if state.global_step >= 2 else grad)
        return begin(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(NonFiniteGuard, "on_train_begin", huge_gradients_from_step_3)
    out = tmp_path / "run"
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, out, max_steps=6, save_steps=2, logging_steps=1))
    assert "the gradients are not finite (gradient norm inf/nan) at step 3" in message
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in message
    assert checkpoint_names(out) == ["checkpoint-2"]


# ---- B3: one run per --output_dir ----


def test_a_second_run_into_a_dir_in_use_is_refused_naming_the_holder(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    from instructglm.train.run_dir import LOCK_FILE

    out = tmp_path / "run"
    flags = common_flags(tiny_llama_dir, llama_dataset, out, max_steps=2, save_steps=2)
    # another live process holds the dir, as a running `instructglm train` does
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from instructglm.train.run_dir import output_dir_lock\n"
         "with output_dir_lock(sys.argv[1]):\n    print('held', flush=True); sys.stdin.read()", str(out)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        message = user_error(capsys, *flags)
        assert f"--output_dir {out} is in use by another `instructglm train` (pid {holder.pid}" in message
        assert not list(out.glob("checkpoint-*")) and not (out / "adapter_config.json").exists()
    finally:
        holder.communicate("", timeout=60)
    assert train_in_process(*flags) == 0  # free again once the holder ends
    assert not (out / LOCK_FILE).exists(), "the lock file is removed when the run ends"


def test_a_lock_file_left_by_a_killed_run_does_not_block(tiny_llama_dir, llama_dataset, tmp_path):
    from instructglm.train.run_dir import LOCK_FILE

    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("999999\n")  # no process holds its flock
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=2, save_steps=2)) == 0


# ---- B4: never write the adapter into a model's dir ----


def test_output_dir_that_is_or_holds_a_model_is_refused(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    before = sorted(p.name for p in tiny_llama_dir.iterdir())
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, tiny_llama_dir, max_steps=2))
    assert f"--output_dir {tiny_llama_dir} is the base model's dir" in message
    link = tmp_path / "link"
    link.symlink_to(tiny_llama_dir)
    assert "is the base model's dir" in user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, link, max_steps=2))
    assert sorted(p.name for p in tiny_llama_dir.iterdir()) == before
    other = tmp_path / "other-model"
    shutil.copytree(tiny_llama_dir, other)
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, other, max_steps=2))
    assert f"--output_dir {other} holds a model (config.json, model.safetensors)" in message
    assert not (other / "adapter_config.json").exists()


# ---- B5 and B6: file modes and temp files of the run dir ----


def test_adapters_get_the_umask_mode_and_stale_temp_files_go(tiny_llama_dir, llama_dataset, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".loss.png.{dead.pid}-0123abcd.tmp"  # what a run killed while drawing loss.png leaves
    stale.write_bytes(b"half a png")
    old = os.umask(0o022)
    try:
        assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=4, save_steps=2)) == 0
    finally:
        os.umask(old)
    weights = [out / "adapter_model.safetensors", *sorted(out.glob("checkpoint-*/adapter_model.safetensors"))]
    assert len(weights) == 3
    assert {str(w.relative_to(out)): oct(w.stat().st_mode & 0o777) for w in weights} == {
        str(w.relative_to(out)): "0o644" for w in weights}
    assert not stale.exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "no hidden leftovers"


def test_loss_plot_temp_name_is_one_the_next_run_recognises(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from instructglm.data.io import stale_siblings
    from instructglm.train.callbacks import plot_loss

    seen = []

    def interrupted(self, path, **kwargs):
        seen.append(path)
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt  # stands for the kill: what was written so far is on disk

    monkeypatch.setattr(Figure, "savefig", interrupted)
    with pytest.raises(KeyboardInterrupt):
        plot_loss([{"step": 1, "loss": 1.0}], str(tmp_path / "loss.png"))
    assert seen and not os.path.exists(seen[0])  # an exception cleans up after itself
    # a kill cannot: the name it leaves must be one `stale_siblings` takes for a dead writer's once released
    assert os.path.basename(seen[0]).startswith(".loss.png.") and stale_siblings(tmp_path / "loss.png") == []
    open(seen[0], "wb").close()
    assert [p for p, _ in stale_siblings(tmp_path / "loss.png")] == [type(tmp_path)(seen[0])]


# ---- weak messages ----


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("gradient_accumulation_steps", 0, "--gradient_accumulation_steps must be >= 1, got 0"),
        ("per_device_train_batch_size", 0, "--per_device_train_batch_size must be >= 1, got 0"),
        ("learning_rate", "nan", "--learning_rate must be a finite number >= 0, got nan"),
        ("learning_rate", -1, "--learning_rate must be a finite number >= 0, got -1"),
        ("max_steps", 0, "--max_steps must be >= 1 (or -1: train --num_train_epochs epochs), got 0"),
        ("max_steps", -5, "--max_steps must be >= 1 (or -1: train --num_train_epochs epochs), got -5"),
        ("num_train_epochs", 0, "--num_train_epochs must be > 0 when --max_steps is not set, got 0"),
    ],
)
def test_out_of_range_schedule_flags_are_one_line(flag, value, expected, tiny_llama_dir, llama_dataset, tmp_path, capsys):
    overrides = {flag: value, **({"max_steps": None} if flag == "num_train_epochs" else {})}
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, tmp_path / "o", **overrides))
    assert expected in message
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without a GPU")
def test_bf16_on_a_cpu_trains_in_fp32_with_one_warning(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    capsys.readouterr()
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, tmp_path / "o", max_steps=2, save_steps=2),
                            "--bf16") == 0
    err = capsys.readouterr().err
    assert err.count("warning: --bf16 needs a GPU and none is available: training in fp32") == 1
    assert all(t.dtype == torch.float32 for t in adapter_tensors(tmp_path / "o").values())


def test_a_lora_rank_above_the_layer_width_is_one_line(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, tmp_path / "o", lora_rank=100000))
    # the tiny Llama's q_proj and v_proj: 32 in; v_proj 32 out with its one KV head of 32 (or fewer)
    assert "--lora_rank 100000 is larger than the targeted layer" in message and "pass --lora_rank <=" in message
    assert "in," in message and "out) allows" in message


class _Mkdir:
    """A pickle that would create a dir when loaded without weights_only (torch refuses its global)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return os.mkdir, (self.path,)


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pth"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused_in_one_line(name, tiny_llama_dir, llama_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    flags = common_flags(tiny_llama_dir, llama_dataset, out, max_steps=4, save_steps=2)
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=2, save_steps=2)) == 0
    marker = tmp_path / "owned"
    torch.save({"state": _Mkdir(str(marker))}, out / "checkpoint-2" / name)
    message = user_error(capsys, *flags, "--resume_from_checkpoint", "last")
    assert f"{out / 'checkpoint-2' / name} was refused" in message and "weights_only=True" in message
    assert f"delete {out / 'checkpoint-2'}" in message and "will likely succeed" not in message
    assert not marker.exists()


def test_a_full_disk_in_a_checkpoint_save_is_one_line_and_leaves_no_partial_checkpoint(
    tiny_llama_dir, llama_dataset, tmp_path, capsys, monkeypatch
):
    from transformers import Trainer

    def full(self, output_dir):
        (open(os.path.join(output_dir, "optimizer.pt"), "wb")).write(b"\0" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", full)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    out = tmp_path / "run"
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, out, max_steps=4, save_steps=2))
    assert "No space left on device while saving checkpoint-2" in message and str(out) in message
    assert not (out / "checkpoint-2").exists()


def test_an_enospc_in_a_checkpoint_save_removes_the_partial_checkpoint(tiny_llama_dir, llama_dataset, tmp_path, capsys, monkeypatch):
    from transformers import Trainer

    def full(self, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Trainer, "_save_rng_state", full)
    out = tmp_path / "run"
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, out, max_steps=4, save_steps=2))
    assert "No space left on device" in message and str(out) in message
    assert not (out / "checkpoint-2").exists()


def test_a_stream_error_on_a_disk_with_room_keeps_its_traceback(tiny_llama_dir, llama_dataset, tmp_path, monkeypatch):
    from transformers import Trainer

    def broken(self, output_dir):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(Trainer, "_save_optimizer_and_scheduler", broken)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 1 << 30, 9 << 30))
    with pytest.raises(RuntimeError, match="iostream error"):
        train_in_process(*common_flags(tiny_llama_dir, llama_dataset, tmp_path / "run", max_steps=4, save_steps=2))


@pytest.mark.parametrize("missing", [True, False])
def test_last_without_a_checkpoint_starts_a_new_run(missing, tiny_llama_dir, llama_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    if not missing:
        out.mkdir()
    capsys.readouterr()
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=2, save_steps=2),
                            "--resume_from_checkpoint", "last") == 0
    assert f"--resume_from_checkpoint last: no complete checkpoint-<step> in {out}; starting a new run" in capsys.readouterr().err
    assert (out / "adapter_model.safetensors").is_file()


def test_a_jsonl_tokenized_on_the_fly_locates_its_drops_and_records_its_meta(tiny_llama_dir, tmp_path, capsys):
    rows = reverse_rows(8)
    rows[2] = {"context": "reverse: " + "x" * 80, "target": "x"}  # line 3: the prompt alone overflows 48 tokens
    data = write_jsonl(tmp_path / "d.jsonl", rows)  # no convert sidecar
    out = tmp_path / "run"
    capsys.readouterr()
    assert train_in_process(*common_flags(tiny_llama_dir, data, out, max_steps=1, save_steps=1, max_seq_length=48)) == 0
    printed = capsys.readouterr().out
    assert "1 prompt too long" in printed and f"(at {data}:3)" in printed
    meta = json.loads((out / "instructglm_train.json").read_text())["dataset"]["meta"]
    assert meta["counts"]["kept"] == 7 and meta["counts"]["dropped_prompt_too_long"] == 1
    assert meta["dropped_at"] == {"dropped_prompt_too_long": [f"{data}:3"]}
    assert meta["family"] == "causal-lm" and meta["template_source"] == "unknown"
    assert meta["max_seq_length"] == 48 and meta["jsonl_path"] == str(data)


def test_a_truncated_checkpoint_file_is_named_in_one_line(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=2, save_steps=2)) == 0
    optimizer = out / "checkpoint-2" / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:100])
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, out, max_steps=4, save_steps=2),
                         "--resume_from_checkpoint", str(out / "checkpoint-2"))
    assert f"{optimizer} was refused" in message and "truncated or corrupt" in message


def test_a_full_disk_in_the_final_save_is_one_line_and_resume_saves_it(tiny_llama_dir, llama_dataset, tmp_path, capsys, monkeypatch):
    import instructglm.train.finetune as finetune

    real = finetune.publish_staged_run

    def full(staging, output_dir):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(finetune, "publish_staged_run", full)
    out = tmp_path / "run"
    flags = common_flags(tiny_llama_dir, llama_dataset, out, max_steps=2, save_steps=2)
    message = user_error(capsys, *flags)
    assert "No space left on device while saving the final adapter" in message and str(out) in message
    assert not (out / ".instructglm-final-save").exists() and not (out / "adapter_config.json").exists()
    monkeypatch.setattr(finetune, "publish_staged_run", real)
    assert train_in_process(*flags, "--resume_from_checkpoint", "last") == 0
    torch.testing.assert_close(adapter_tensors(out), adapter_tensors(out / "checkpoint-2"), rtol=0, atol=0)


def test_a_run_refused_before_writing_leaves_no_empty_output_dir(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    out = tmp_path / "new"
    message = user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, out), "--resume_from_checkpoint",
                         str(tmp_path / "nope"))
    assert "not a complete checkpoint (no such directory)" in message
    assert not out.exists()
