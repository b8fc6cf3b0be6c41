"""The run directory (`--output_dir`): what is in it, whether a checkpoint is whole, whose run it is.

A run dir holds the final adapter and `checkpoint-<step>/` dirs. This module answers, before a
run touches it:

- which checkpoint `--resume_from_checkpoint last` means: the newest *complete* one. The Trainer
  writes a checkpoint file by file and `trainer_state.json` last, and rotation deletes old ones
  file by file, so a kill leaves dirs without some files; those are skipped, and each skip is said.
- whether the run there is this one. Every checkpoint, and the final run dir, record a
  fingerprint (`fingerprint` in `instructglm_train.json`): the data's size and sha256, the base
  model, the LoRA settings and the training flags that shape the trajectory. Resuming a checkpoint
  whose fingerprint differs is refused naming each difference; a new run into a dir holding
  another run's adapter or checkpoints is refused unless `--overwrite_output_dir true`.
- which checkpoint is "last good" after a divergence: the newest complete one whose adapter
  tensors on disk are all finite.

It also publishes the final save atomically: the Trainer saves into a staging dir inside the run
dir, and each file is then renamed into place, `adapter_config.json` last, so the run dir holds
either no final adapter or a whole one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any

from instructglm.errors import BadValue, MissingFile, OutputExists
from instructglm.layout import DATA_META, LOSS_PLOT_FILE, RUN_CONFIG, SEED_ADAPTER_FILE
from instructglm.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHT_FILES

CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")  # transformers' PREFIX_CHECKPOINT_DIR + step
TRAINER_STATE = "trainer_state.json"
SCHEDULER_FILE = "scheduler.pt"
# Where the Trainer puts optimizer state: plain, accelerate/FSDP, sharded FSDP, DeepSpeed (its `latest` tag).
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin", "optimizer_0", "latest")
TRAINING_ARGS_FILE = "training_args.bin"  # the Trainer's pickle of TrainingArguments; the run dir keeps JSON only
STAGING_DIR = ".instructglm-final-save"
# Files of a finished run, as they are renamed into place: the run record first (a .pt adapter's alpha
# is read from it), the adapter's config last (it is what makes the dir a loadable adapter).
FINAL_FILES_FIRST = (RUN_CONFIG,)
FINAL_FILES_LAST = (SEED_ADAPTER_FILE, *ADAPTER_WEIGHT_FILES, ADAPTER_CONFIG)
# What marks a dir as holding a run (a new run there is refused without --overwrite_output_dir).
RUN_MARKERS = (ADAPTER_CONFIG, *ADAPTER_WEIGHT_FILES, SEED_ADAPTER_FILE, RUN_CONFIG)
# Written by a run and removed by --overwrite_output_dir (besides checkpoint dirs); anything else stays.
RUN_OUTPUTS = (*RUN_MARKERS, LOSS_PLOT_FILE, TRAINING_ARGS_FILE, STAGING_DIR)

# Flags that shape what a run computes: a checkpoint resumes only under the same values.
# (--max_steps, --save_steps, --logging_steps and the like may change between a run and its resume.)
FINETUNE_FLAGS = ("model_name_or_path", "lora_rank", "lora_alpha", "lora_dropout", "lora_target", "is_resume",
                  "resume_path", "quantization_bit")
TRAINING_FLAGS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "seed", "data_seed",
                  "lr_scheduler_type", "warmup_steps", "weight_decay", "optim", "max_grad_norm")
DATA_FLAGS = ("dataset_path", "eval_dataset_path")
# Files of a saved `datasets` dir that change from one save of the same rows to the next.
_VOLATILE_DATA_FILES = {"state.json", DATA_META}


# ---- checkpoints ----


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """The `checkpoint-<step>` dirs of a run dir, newest (highest step) first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_DIR.match(p.name)) and p.is_dir()]
    return [path for _, path in sorted(found, key=lambda item: item[0], reverse=True)]


def checkpoint_problem(path: str | os.PathLike, need_optimizer: bool = True) -> str | None:
    """Why the checkpoint at `path` cannot be resumed (a file missing, empty or cut off), or None when it is whole."""
    path = Path(path)
    if not path.is_dir():
        return "no such directory"
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
        step = int(state["global_step"])
    except FileNotFoundError:
        return f"no {TRAINER_STATE}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"{TRAINER_STATE} is cut off or not the Trainer's"
    match = CHECKPOINT_DIR.match(path.name)
    if match and int(match.group(1)) != step:
        return f"{TRAINER_STATE} is for step {step}"
    try:
        json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"no {ADAPTER_CONFIG}"
    except (OSError, ValueError):
        return f"{ADAPTER_CONFIG} is cut off"
    if not any(_non_empty(path / name) for name in ADAPTER_WEIGHT_FILES):
        return f"no adapter weights ({' or '.join(ADAPTER_WEIGHT_FILES)})"
    if need_optimizer:
        if not any(_non_empty(path / name) for name in OPTIMIZER_FILES):
            return "no optimizer state"
        if not _non_empty(path / SCHEDULER_FILE):
            return f"no {SCHEDULER_FILE}"
    return None


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir()) or path.is_file() and path.stat().st_size > 0


def last_complete_checkpoint(
    output_dir: str | os.PathLike,
    need_optimizer: bool = True,
    say: Callable[[str], None] | None = None,
    need_finite: bool = False,
) -> tuple[Path | None, list[str]]:
    """The newest whole checkpoint of a run dir, and one line per newer one skipped (also passed to `say`).

    With `need_finite`, a whole checkpoint whose adapter holds NaN/inf is skipped too (resuming it
    would diverge again at once).
    """
    skipped = []
    for path in checkpoint_dirs(output_dir):
        problem = checkpoint_problem(path, need_optimizer)
        if problem is None and (not need_finite or adapter_is_finite(path)):
            return path, skipped
        if problem is None:
            line = f"skipping checkpoint {path}: its adapter weights are not finite (saved from a diverged run)"
        else:
            line = f"skipping incomplete checkpoint {path} ({problem}: a save there was interrupted)"
        skipped.append(line)
        if say is not None:
            say(line)
    return None, skipped


def adapter_is_finite(path: str | os.PathLike) -> bool:
    """Whether every tensor of the adapter saved at `path` (a peft dir) is finite; False if it cannot be read."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(path) / ADAPTER_WEIGHT_FILES[0]
    try:
        tensors = load_file(str(weights)) if weights.is_file() else torch.load(Path(path) / ADAPTER_WEIGHT_FILES[1], weights_only=True)
    except (OSError, SafetensorError, RuntimeError, EOFError):
        return False
    return all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def last_good_checkpoint(output_dir: str | os.PathLike) -> tuple[Path | None, list[Path]]:
    """The newest whole checkpoint whose adapter weights are all finite, and the newer whole ones that are not."""
    non_finite = []
    for path in checkpoint_dirs(output_dir):
        if checkpoint_problem(path) is not None:
            continue
        if adapter_is_finite(path):
            return path, non_finite
        non_finite.append(path)
    return None, non_finite


# ---- fingerprints ----


def data_fingerprint(path: str | os.PathLike | None) -> dict[str, Any] | None:
    """Size and sha256 of a dataset: a file's bytes, or a saved dataset dir's data files (not its volatile state)."""
    if not path:
        return None
    root = Path(path)
    digest = hashlib.sha256()
    size = 0
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.is_file() and p.name not in _VOLATILE_DATA_FILES
        and not p.name.startswith((".", "cache-"))
    )
    for file in files:
        digest.update(str(file.relative_to(root) if file != root else file.name).encode() + b"\0")
        with open(file, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
    return {"path": str(path), "bytes": size, "sha256": digest.hexdigest()}


def run_fingerprint(finetune_args, training_args) -> dict[str, Any]:
    """What a checkpoint must share with a run to be resumed by it (see the module doc)."""
    flags = {name: _plain(getattr(finetune_args, name)) for name in FINETUNE_FLAGS}
    for name in ("model_name_or_path", "resume_path"):
        if flags[name] and os.path.exists(flags[name]):
            flags[name] = os.path.abspath(flags[name])
    if flags["lora_alpha"] is None and not finetune_args.is_resume:
        from instructglm.models.lora import SEED_LORA_ALPHA

        flags["lora_alpha"] = SEED_LORA_ALPHA  # what a fresh adapter gets without --lora_alpha
    if os.path.isfile(finetune_args.dataset_path):
        flags["max_seq_length"] = finetune_args.max_seq_length  # it shapes the rows only of a jsonl tokenized now
    flags.update({name: _plain(getattr(training_args, name)) for name in TRAINING_FLAGS})
    data = {name: data_fingerprint(getattr(finetune_args, name)) for name in DATA_FLAGS}
    return {"flags": flags, "data": data}


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, Enum) else value


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """One phrase per difference between a checkpoint's fingerprint and this run's, naming the flag."""
    differences = []
    saved_flags, current_flags = saved.get("flags", {}), current.get("flags", {})
    for name in sorted(set(saved_flags) | set(current_flags)):
        if saved_flags.get(name) != current_flags.get(name):
            differences.append(f"--{name} {saved_flags.get(name)} there, {current_flags.get(name)} here")
    saved_data, current_data = saved.get("data", {}), current.get("data", {})
    for name in DATA_FLAGS:
        was, now = saved_data.get(name), current_data.get(name)
        if (was or {}).get("sha256") != (now or {}).get("sha256"):
            differences.append(f"--{name}: trained on {_describe_data(was)}, given {_describe_data(now)}")
    return differences


def _describe_data(fingerprint: dict[str, Any] | None) -> str:
    if not fingerprint:
        return "none"
    return f"{fingerprint['path']} ({fingerprint['bytes']} bytes, sha256 {fingerprint['sha256'][:12]})"


def saved_fingerprint(path: str | os.PathLike) -> dict[str, Any] | None:
    """The fingerprint recorded in a checkpoint or run dir's instructglm_train.json (None: not recorded)."""
    record = Path(path) / RUN_CONFIG
    try:
        return json.loads(record.read_text(encoding="utf-8")).get("fingerprint")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError) as error:
        raise BadValue(f"{record}: not valid JSON ({error}); delete that checkpoint or resume another") from error


# ---- the output dir before a run ----


def prepare_output_dir(
    output_dir: str,
    fingerprint: dict[str, Any],
    resume_from_checkpoint: str | None,
    overwrite: bool = False,
    need_optimizer: bool = True,
    is_main_process: bool = True,
) -> str | None:
    """Check `--output_dir` against this run and return the checkpoint to resume (None: a new run).

    `resume_from_checkpoint` is the flag's value: None, `last` (or `true`), or a checkpoint path.
    With `overwrite`, a new run first removes the files and checkpoints of the run already there
    (on the main process only; nothing else in the dir is touched).

    Raises:
        OutputExists: a new run into a dir that holds another run, without `overwrite`.
        BadValue: the checkpoint to resume belongs to a run with other data or flags (each named),
            or `last` together with `overwrite`.
        MissingFile: the named checkpoint is incomplete. (`last` with no complete checkpoint starts a new
            run, saying so, as a run without the flag would: refused if the dir holds another run.)
    """
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if is_main_process else None
    if is_main_process:
        shutil.rmtree(Path(output_dir) / STAGING_DIR, ignore_errors=True)  # left by a kill inside a final save
    flag = resume_from_checkpoint
    if flag is None or str(flag).lower() in ("", "false", "none"):
        _check_new_run(output_dir, fingerprint, overwrite, is_main_process)
        return None
    if overwrite:
        raise BadValue(
            f"--resume_from_checkpoint {flag} continues the run in {output_dir}, --overwrite_output_dir true starts it "
            "over: pass one of them"
        )
    if str(flag).lower() in ("last", "true"):
        checkpoint, skipped = last_complete_checkpoint(output_dir, need_optimizer, say, need_finite=True)
        if checkpoint is None:
            # "resume if there is something to resume" (what HF and LLaMA-Factory users expect of `last`):
            # a new run, under the same checks as one asked for without the flag
            if say is not None:
                found = f" ({len(skipped)} incomplete or non-finite ones skipped)" if skipped else ""
                say(f"--resume_from_checkpoint last: no complete checkpoint-<step> in {output_dir}{found}; starting a new run")
            _check_new_run(output_dir, fingerprint, False, is_main_process)
            return None
    else:
        checkpoint = Path(flag)
        problem = checkpoint_problem(checkpoint, need_optimizer)
        if problem is not None:
            raise MissingFile(
                f"--resume_from_checkpoint {flag}: not a complete checkpoint ({problem}); pass another checkpoint-<step> "
                "dir, or `last` for the newest complete one"
            )
    _check_same_run(checkpoint, fingerprint, f"--resume_from_checkpoint {flag}", say)
    return str(checkpoint)


def _check_same_run(checkpoint: Path, fingerprint: dict[str, Any], flag: str, say) -> None:
    saved = saved_fingerprint(checkpoint)
    if saved is None:
        if say is not None:
            say(f"warning: {checkpoint} records no fingerprint (an older InstructGLM wrote it): cannot check that it is "
                "this run's data and flags")
        return
    differences = fingerprint_differences(saved, fingerprint)
    if differences:
        raise BadValue(
            f"{flag}: {checkpoint} is from a run with other data or flags ({'; '.join(differences)}); pass that run's "
            "flags to continue it, or start a new run with --overwrite_output_dir true or another --output_dir"
        )


def _check_new_run(output_dir: str, fingerprint: dict[str, Any], overwrite: bool, is_main_process: bool) -> None:
    root = Path(output_dir)
    held = [path.name for path in checkpoint_dirs(root)][:3] + [name for name in RUN_MARKERS if (root / name).exists()]
    if not held:
        return
    if overwrite:
        if is_main_process:
            clear_run(root)
        return
    newest, _ = last_complete_checkpoint(root)
    same = newest is not None and saved_fingerprint(newest) is not None and not fingerprint_differences(
        saved_fingerprint(newest), fingerprint
    )
    hint = "it is this run (same data and flags): add --resume_from_checkpoint last to continue it, " if same else ""
    raise OutputExists(
        f"--output_dir {output_dir} already holds a run ({', '.join(held)}): {hint}pass --overwrite_output_dir true to "
        "replace it, or choose another --output_dir"
    )


def clear_run(root: Path) -> None:
    """Remove a run's own outputs (its checkpoints, adapter, records) from `root`; other files stay."""
    for path in checkpoint_dirs(root):
        shutil.rmtree(path)
    for name in RUN_OUTPUTS:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


# ---- one run at a time ----

LOCK_FILE = ".instructglm-train.lock"


@contextmanager
def output_dir_lock(output_dir: str | os.PathLike, take: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `output_dir` (created if missing) for the block: a second run into it is refused.

    Two runs into one dir would interleave their checkpoints and leave one run's record beside the other's
    adapter. The lock is an `fcntl.flock` on a file in the dir holding the holder's pid; the kernel drops it
    when the holder dies, so a killed run never leaves the dir locked. The file is removed on release
    (a waiter that opened it before then finds it renamed away and retries). `take=False` (the other
    processes of a distributed run, which the main one speaks for) only runs the block. Where `fcntl` does
    not exist (Windows) nothing is locked.

    Raises:
        OutputExists: another live run holds the lock (its pid is named).
    """
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if not take or fcntl is None:
        yield
        return
    root = Path(output_dir)
    created = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK_FILE
    fd = _lock(path, fcntl)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)  # before the unlock: no later run ever locks a file that is going away
        os.close(fd)
        if created:  # a run refused before writing anything leaves no empty dir behind
            try:
                root.rmdir()
            except OSError:
                pass


def _lock(path: Path, fcntl) -> int:
    """An fd of `path` holding its flock (retried while the file is replaced under us)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputExists(
                f"--output_dir {path.parent} is in use by another `instructglm train` (pid {holder}, holding {path}): "
                "wait for it to finish, or pass another --output_dir"
            ) from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder removed this file as it finished: lock the new one


# ---- the final save ----


def publish_staged_run(staging: Path, output_dir: Path) -> list[str]:
    """Move the files of a finished save from `staging` into `output_dir`, each atomically; return their names.

    Every file is fsynced before its rename. An older final adapter is first made unloadable (its
    adapter_config.json removed), so the dir never mixes an old config with new weights; the new
    adapter_config.json arrives last, when everything it refers to is in place.
    """
    (staging / TRAINING_ARGS_FILE).unlink(missing_ok=True)
    names = sorted(p.name for p in staging.iterdir())
    for name in names:
        _fsync(staging / name)
    _unlink_durably(output_dir / ADAPTER_CONFIG)
    ordered = [n for n in FINAL_FILES_FIRST if n in names]
    ordered += [n for n in names if n not in FINAL_FILES_FIRST and n not in FINAL_FILES_LAST]
    ordered += [n for n in FINAL_FILES_LAST if n in names]
    for name in ordered:
        target = output_dir / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(staging / name, target)
    _fsync(output_dir)
    staging.rmdir()
    return ordered


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name != "posix":
        return  # directories cannot be opened for fsync there
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_durably(path: Path) -> None:
    if path.exists():
        path.unlink()
        _fsync(path.parent)
