"""loss.png and the non-finite loss guard, through the whole recipe."""

from __future__ import annotations

import json
import math

import torch

from instructglm.train.callbacks import plot_loss
from tests.train.conftest import adapter_tensors, common_flags, poisoned_rows, train_in_process, write_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_loss_writes_png(tmp_path):
    history = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "eval_loss": 2.7}, {"step": 2, "train_loss": 2.7}]
    plot_loss(history, str(tmp_path / "a" / "loss.png"))
    plot_loss([], str(tmp_path / "empty.png"))  # nothing logged yet still gives a picture saying so
    for path in (tmp_path / "a" / "loss.png", tmp_path / "empty.png"):
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000


def checkpoint_names(out):
    return sorted((p.name for p in out.iterdir() if p.name.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))


def stops_with_one_line(capsys, *flags) -> str:
    """Run `instructglm train flags`, which must stop as a user error (exit 2, one line on stderr); that line."""
    capsys.readouterr()
    assert train_in_process(*flags) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("instructglm train: error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(poisoned_llama, tmp_path, capsys):
    # sequential order, batch 4: rows 12-15 make step 4; the poisoned row is row 13
    data = write_jsonl(tmp_path / "d.jsonl", poisoned_rows(16, 13))
    out = tmp_path / "run"
    flags = common_flags(poisoned_llama, data, out, max_steps=8, save_steps=3, train_sampling_strategy="sequential")
    message = stops_with_one_line(capsys, *flags)
    assert "training loss is nan at step 4" in message and f"the last good checkpoint is {out / 'checkpoint-3'}" in message
    assert checkpoint_names(out) == ["checkpoint-3"]
    assert not (out / "adapter_model.safetensors").exists(), "no final adapter from a failed run"
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out / "checkpoint-3").values())
    losses = [e["loss"] for e in json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses and all(math.isfinite(x) and x > 0 for x in losses)


def test_the_optimizer_never_steps_on_a_nan_loss(poisoned_llama, tmp_path, capsys, monkeypatch):
    """At the stop the adapter is still checkpoint-3's: the NaN batch of step 4 reached no weight."""
    from instructglm.train.callbacks import NonFiniteGuard

    data = write_jsonl(tmp_path / "d.jsonl", poisoned_rows(16, 13))
    out = tmp_path / "run"
    at_stop = {}
    check = NonFiniteGuard.on_pre_optimizer_step

    def remember_weights(self, args, state, control, model=None, **kwargs):
        at_stop.clear()
        at_stop.update({n.replace(".default", ""): p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
        return check(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(NonFiniteGuard, "on_pre_optimizer_step", remember_weights)
    stops_with_one_line(capsys, *common_flags(poisoned_llama, data, out, max_steps=8, save_steps=3, lora_dropout=0.0,
                                              train_sampling_strategy="sequential"))
    torch.testing.assert_close(at_stop, adapter_tensors(out / "checkpoint-3"), rtol=0, atol=0)


def test_a_huge_learning_rate_stops_at_the_first_infinite_gradient(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    """lr 1e9: the weights blow up after one step and the next gradient norm is inf; the run stops there."""
    out = tmp_path / "run"
    message = stops_with_one_line(capsys, *common_flags(tiny_llama_dir, llama_dataset, out, max_steps=8, save_steps=1,
                                                        learning_rate=1e9, logging_steps=1))
    assert "gradients are not finite" in message or "training loss is" in message, message
    step = int(message.split(" at step ")[1].split()[0].rstrip(":,"))
    assert 1 < step <= 8
    assert checkpoint_names(out) == [f"checkpoint-{n}" for n in range(1, step)]
    for name in checkpoint_names(out):
        assert all(torch.isfinite(t).all() for t in adapter_tensors(out / name).values()), name
    assert not (out / "adapter_model.safetensors").exists()


def test_last_good_is_the_newest_checkpoint_with_finite_weights(poisoned_llama, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from instructglm.train.run_dir import last_good_checkpoint

    # 32 rows, batch 4, sequential: the poisoned row 29 is in step 8 of every epoch
    data = write_jsonl(tmp_path / "d.jsonl", poisoned_rows(32, 29))
    out = tmp_path / "run"
    flags = common_flags(poisoned_llama, data, out, max_steps=12, save_steps=3, train_sampling_strategy="sequential")
    assert f"the last good checkpoint is {out / 'checkpoint-6'}" in stops_with_one_line(capsys, *flags)

    # checkpoint-6 as an earlier version could have saved it from diverged weights
    weights = out / "checkpoint-6" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    next(iter(tensors.values()))[0] = float("nan")
    save_file(tensors, str(weights))
    assert last_good_checkpoint(out) == (out / "checkpoint-3", [out / "checkpoint-6"])
    # `last` does not resume it either: it says so and takes checkpoint-3, then stops at step 8 again
    capsys.readouterr()
    assert train_in_process(*flags, "--resume_from_checkpoint", "last") == 2
    err = capsys.readouterr().err
    assert f"skipping checkpoint {out / 'checkpoint-6'}: its adapter weights are not finite" in err
    assert "training loss is nan at step 8" in err and f"the last good checkpoint is {out / 'checkpoint-6'}" in err
    assert all(torch.isfinite(t).all() for t in adapter_tensors(out / "checkpoint-6").values()), "re-saved from good weights"
