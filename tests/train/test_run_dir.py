"""The run dir: `last` takes the newest complete checkpoint, a run resumes only its own checkpoints, a reused
--output_dir is refused, and the final save is published so a kill leaves no half adapter."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest
import torch

from instructglm.train.run_dir import checkpoint_problem, data_fingerprint, publish_staged_run
from tests.train.conftest import adapter_tensors, common_flags, reverse_rows, train_in_process, write_jsonl


def run_ok(*flags) -> None:
    assert train_in_process(*flags) == 0


def one_line_error(capsys, *flags) -> str:
    """`instructglm train flags` must end as a user error: exit 2 and exactly one `error:` line; that line."""
    capsys.readouterr()
    assert train_in_process(*flags) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("instructglm train: error:")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def run_with_checkpoints(tiny_llama_dir, llama_dataset, tmp_path):
    """A finished 6-step run with checkpoints at 2, 4 and 6; returns (output dir, its flags without max_steps)."""
    out = tmp_path / "run"
    flags = dict(model_dir=tiny_llama_dir, dataset=llama_dataset, output_dir=out, save_steps=2)
    run_ok(*common_flags(**flags, max_steps=6))
    return out, flags


def test_last_skips_incomplete_checkpoints_and_says_so(run_with_checkpoints, capsys):
    out, flags = run_with_checkpoints
    (out / "checkpoint-6" / "trainer_state.json").unlink()  # killed before the Trainer's last file
    (out / "checkpoint-4" / "optimizer.pt").write_bytes(b"")  # killed while rotation deleted it, say
    capsys.readouterr()
    run_ok(*common_flags(**flags, max_steps=8), "--resume_from_checkpoint", "last")
    err = capsys.readouterr().err
    assert f"skipping incomplete checkpoint {out / 'checkpoint-6'} (no trainer_state.json" in err
    assert f"skipping incomplete checkpoint {out / 'checkpoint-4'} (no optimizer state" in err
    history = json.loads((out / "checkpoint-8" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [2, 4, 6, 8]  # steps 3-8 trained again from checkpoint-2
    assert checkpoint_problem(out / "checkpoint-8") is None and checkpoint_problem(out / "checkpoint-6") is None


def test_last_without_a_complete_checkpoint_and_an_incomplete_named_one(run_with_checkpoints, capsys):
    out, flags = run_with_checkpoints
    for checkpoint in out.glob("checkpoint-*"):
        (checkpoint / "adapter_model.safetensors").unlink()
    # `last` with nothing to resume asks for a new run, which a dir holding another run refuses
    capsys.readouterr()
    assert train_in_process(*common_flags(**flags, max_steps=8), "--resume_from_checkpoint", "last") == 2
    err = capsys.readouterr().err
    assert f"no complete checkpoint-<step> in {out} (3 incomplete or non-finite ones skipped); starting a new run" in err
    assert f"--output_dir {out} already holds a run" in err
    message = one_line_error(capsys, *common_flags(**flags, max_steps=8), "--resume_from_checkpoint", str(out / "checkpoint-4"))
    assert f"{out / 'checkpoint-4'}: not a complete checkpoint (no adapter weights" in message


def test_cut_off_adapter_config_is_named(run_with_checkpoints, capsys):
    out, flags = run_with_checkpoints
    (out / "checkpoint-6" / "adapter_config.json").write_text("")
    message = one_line_error(capsys, *common_flags(**flags, max_steps=8), "--resume_from_checkpoint", str(out / "checkpoint-6"))
    assert "adapter_config.json is cut off" in message
    from instructglm.models.lora import load_adapter
    from tests.models.test_lora import base

    with pytest.raises(ValueError, match=re.escape(str(out / "checkpoint-6" / "adapter_config.json")) + ": not valid JSON"):
        load_adapter(base(flags["model_dir"]), str(out / "checkpoint-6"))


def test_a_new_run_into_a_used_output_dir_is_refused(run_with_checkpoints, capsys):
    out, flags = run_with_checkpoints
    before = adapter_tensors(out)
    message = one_line_error(capsys, *common_flags(**flags, max_steps=6, learning_rate=0.02))
    assert f"--output_dir {out} already holds a run (checkpoint-6" in message and "--overwrite_output_dir true" in message
    # the same command again: the hint says how to continue it
    message = one_line_error(capsys, *common_flags(**flags, max_steps=6))
    assert "it is this run (same data and flags): add --resume_from_checkpoint last" in message
    torch.testing.assert_close(adapter_tensors(out), before, rtol=0, atol=0)  # nothing was touched


def test_overwrite_output_dir_replaces_the_old_run_only(run_with_checkpoints):
    out, flags = run_with_checkpoints
    (out / "notes.txt").write_text("mine")
    run_ok(*common_flags(**{**flags, "save_steps": 3}, max_steps=3, learning_rate=0.02), "--overwrite_output_dir", "true")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "instructglm_train.json").read_text())["fingerprint"]["flags"]["learning_rate"] == 0.02


def test_last_resumes_only_the_same_run(run_with_checkpoints, tmp_path, capsys):
    out, flags = run_with_checkpoints
    message = one_line_error(capsys, *common_flags(**flags, max_steps=8, learning_rate=0.02), "--resume_from_checkpoint", "last")
    assert f"{out / 'checkpoint-6'} is from a run with other data or flags (--learning_rate 0.01 there, 0.02 here)" in message
    assert "--overwrite_output_dir true or another --output_dir" in message

    other = tmp_path / "other.jsonl"
    write_jsonl(other, reverse_rows(64, seed=1))
    message = one_line_error(capsys, *common_flags(**{**flags, "dataset": other}, max_steps=8), "--resume_from_checkpoint", "last")
    assert f"--dataset_path: trained on {flags['dataset']} (" in message and f"given {other} (" in message
    assert not (out / "checkpoint-8").exists()


def test_resume_with_another_lora_rank_is_one_line(run_with_checkpoints, capsys):
    out, flags = run_with_checkpoints
    message = one_line_error(capsys, *common_flags(**flags, max_steps=8, lora_rank=4), "--resume_from_checkpoint", "last")
    assert "--lora_rank 8 there, 4 here" in message
    # a checkpoint that records no fingerprint (an older version wrote it): its adapter config still tells
    (out / "checkpoint-6" / "instructglm_train.json").unlink()
    message = one_line_error(capsys, *common_flags(**flags, max_steps=8, lora_rank=4, lora_target="q_proj"),
                             "--resume_from_checkpoint", str(out / "checkpoint-6"))
    assert "its adapter differs from this run's (--lora_rank 8 there, 4 here; --lora_target ['q_proj', 'v_proj'] there, ['q_proj'] here)" in message


def test_data_fingerprint_ignores_the_random_dataset_state(tiny_llama_dir, reverse_jsonl, tmp_path):
    """Tokenizing the same rows twice gives the same fingerprint (datasets' state.json holds a random id)."""
    from tests.train.conftest import tokenized

    first, second = (tokenized(tiny_llama_dir, reverse_jsonl, tmp_path / name) for name in ("a", "b"))
    assert data_fingerprint(first)["sha256"] == data_fingerprint(second)["sha256"]
    assert data_fingerprint(reverse_jsonl)["bytes"] == os.path.getsize(reverse_jsonl)


# ---- the final save ----


def staged_run(run_dir, tmp_path):
    """A copy of a finished run's final files in a staging dir, as `save_run` has them before publishing."""
    staging = tmp_path / "staging"
    staging.mkdir(parents=True)
    for path in run_dir.iterdir():
        if path.is_file():
            shutil.copy(path, staging / path.name)
    return staging


def final_adapter_state(run_dir, model_dir) -> str:
    """'none' (no adapter_config.json) or 'whole' (loads); anything else fails the test."""
    from instructglm.models.lora import load_adapter
    from tests.models.test_lora import base

    if not (run_dir / "adapter_config.json").exists():
        return "none"
    load_adapter(base(model_dir), str(run_dir))
    if (run_dir / "chatglm-lora.pt").exists():
        load_adapter(base(model_dir), str(run_dir / "chatglm-lora.pt"))
    return "whole"


@pytest.mark.parametrize("had_old_adapter", [False, True])
def test_final_save_interrupted_after_every_rename(run_with_checkpoints, tmp_path, monkeypatch, had_old_adapter):
    """Stop the publishing after each of its renames: the run dir never holds a half adapter."""
    out, flags = run_with_checkpoints
    staging = staged_run(out, tmp_path / "template")
    names = sorted(p.name for p in staging.iterdir())
    states = []
    for stop_after in range(len(names) + 1):
        target = tmp_path / f"target-{stop_after}"
        target.mkdir()
        if had_old_adapter:  # a run resumed into a dir that holds its earlier final adapter
            for name in ("adapter_config.json", "adapter_model.safetensors", "chatglm-lora.pt", "instructglm_train.json"):
                shutil.copy(out / name, target / name)
        work = tmp_path / f"staging-{stop_after}"
        shutil.copytree(staging, work)
        renames = []
        real_replace = os.replace

        def replace(src, dst, _renames=renames, _stop=stop_after):
            if len(_renames) == _stop:
                raise KeyboardInterrupt("killed")
            _renames.append(os.path.basename(dst))
            real_replace(src, dst)

        monkeypatch.setattr(os, "replace", replace)
        try:
            publish_staged_run(work, target)
        except KeyboardInterrupt:
            pass
        finally:
            monkeypatch.setattr(os, "replace", real_replace)
        states.append(final_adapter_state(target, flags["model_dir"]))
        if renames:
            assert renames[0] == "instructglm_train.json" and "adapter_config.json" not in renames[:-1]
    assert states[-1] == "whole" and set(states[:-1]) == {"none"}


def test_killed_final_save_leaves_no_adapter_and_resume_finishes(run_with_checkpoints, capsys):
    """What a kill inside the final save leaves (a staging dir, no adapter_config.json): `last` finishes the run."""
    out, flags = run_with_checkpoints
    final = adapter_tensors(out)
    for name in ("adapter_config.json", "adapter_model.safetensors", "chatglm-lora.pt", "instructglm_train.json"):
        (out / name).unlink()
    (out / ".instructglm-final-save").mkdir()
    (out / ".instructglm-final-save" / "adapter_config.json").write_text("")
    run_ok(*common_flags(**flags, max_steps=6), "--resume_from_checkpoint", "last")
    assert not (out / ".instructglm-final-save").exists()
    torch.testing.assert_close(adapter_tensors(out), final, rtol=0, atol=0)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 8
