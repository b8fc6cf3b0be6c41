"""Merge a LoRA adapter into its base model and save a plain checkpoint to deploy.

    instructglm merge --model_name_or_path THUDM/chatglm-6b --adapter output/alpaca --output chatglm-6b-alpaca

The output directory has the official layout — `config.json`, `generation_config.json`,
safetensors shards with `model.safetensors.index.json`, and the tokenizer files — so
`AutoModelForCausalLM.from_pretrained(output)` loads it with no peft and no adapter, and gives
the outputs of base + adapter. The run's `instructglm_train.json` is copied beside it, so
`chat`/`predict`/`serve`/`eval` on the merged model prompt as on base + adapter: the same model family
(checked against the merged model when it loads) and the template the adapter was trained with
(`messages`: the family's role tokens or chat template).

Everything is written into a temp dir beside `--output` (`.<name>.partial-<pid>`), synced, and
renamed into place as the last step: a merge that is killed or fails leaves `--output` as it was
(absent or empty), never a half-written model. A partial dir left by a killed merge is removed
by the next merge into the same `--output`.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from instructglm.errors import BadValue, OutputExists
from instructglm.infer.load import LORA_ALPHA_HELP, load_model
from instructglm.data.io import umask_modes
from instructglm.infer.prompts import run_config_path
from instructglm.layout import RUN_CONFIG


@dataclass
class MergeArguments:
    adapter: str = field(metadata={"help": "LoRA adapter: a peft directory or a `chatglm-lora.pt`."})
    output: str = field(metadata={"help": "Directory to write the merged model to (must be empty or absent)."})
    model_name_or_path: str = field(default="THUDM/chatglm-6b", metadata={"help": "Base model the adapter was trained on."})
    max_shard_size: str = field(
        default="2GB", metadata={"help": "Largest safetensors shard, e.g. 2GB or 500MB (the 6B model in fp16 is ~12GB)."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "dtype to merge and save in: auto (the base checkpoint's), float32, float16, bfloat16."},
    )
    lora_alpha: Optional[int] = field(default=None, metadata={"help": LORA_ALPHA_HELP})

    def __post_init__(self):
        shard_bytes(self.max_shard_size)  # refused here, before the model loads


ARGUMENTS = (MergeArguments,)

PARTIAL = ".partial-"

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def shard_bytes(size: str | int) -> int:
    """The bytes of a `--max_shard_size` (an int, or e.g. `2GB`, `500MB`, `1GiB`, as transformers reads it).

    Raises:
        BadValue: not a positive size.
    """
    import re

    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(size), re.IGNORECASE)
    value = float(match.group(1)) * SIZE_UNITS[(match.group(2) or "").upper()] if match else 0
    if value < 1:
        raise BadValue(f"--max_shard_size {size!r} is not a positive size; give e.g. 2GB, 500MB or a byte count")
    return int(value)


def merge(
    model_name_or_path: str,
    adapter: str,
    output: str | Path,
    max_shard_size: str | int = "2GB",
    dtype: str = "auto",
    lora_alpha: int | None = None,
) -> Path:
    """Load base + adapter, fold the LoRA deltas into the base weights, save to `output` atomically.

    Raises:
        OutputExists: `output` exists and is not an empty directory (a merge never mixes with old files).
        MissingFile / BadValue: from `load_model` (missing, unreadable or mismatched base or adapter); a bad
            `max_shard_size`.
        OSError: the disk filled up (ENOSPC/EDQUOT), naming the output; nothing is left behind.
    """
    from transformers import AutoConfig

    from instructglm.models.loading import load_tokenizer

    output = Path(output)
    shard_bytes(max_shard_size)
    _refuse_existing(output)
    # The LoRA deltas are added in float32 on the CPU (no fp16 rounding of B @ A), then the
    # weights go back to the dtype the base checkpoint was stored in, unless --dtype says otherwise.
    model, _, _ = load_model(model_name_or_path, adapter, dtype="float32" if dtype == "auto" else dtype, device="cpu", lora_alpha=lora_alpha)
    merged = model.merge_and_unload()
    if dtype == "auto":
        stored = _stored_dtype(AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=False))
        if stored is not None:
            merged = merged.to(stored)
    _remove_stale_partials(output)
    partial = output.parent / f".{output.name}{PARTIAL}{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial.mkdir()  # the umask's mode, unlike mkdtemp's 0700
    try:
        _save(merged, partial, output, shard_bytes(max_shard_size))
        # A fresh copy of the base's tokenizer: the loaded one was switched to left padding for generation.
        load_tokenizer(model_name_or_path)[0].save_pretrained(partial)
        saved = run_config_path(adapter)
        if saved is not None:
            shutil.copyfile(saved, partial / RUN_CONFIG)
        umask_modes(partial)  # safetensors creates its files 0600 whatever the umask
        _fsync_tree(partial)
        _refuse_existing(output)  # something may have appeared there while the merge ran
        # rename(2) replaces an empty directory atomically, and creates an absent one.
        os.replace(partial, output)
        _fsync_dir(output.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return output


def _save(model, partial: Path, output: Path, max_shard_size: str | int) -> None:
    """`save_pretrained` into the partial dir; a full disk (safetensors raises its own error type) is named as such."""
    from safetensors import SafetensorError

    try:
        model.save_pretrained(partial, max_shard_size=max_shard_size)
    except (SafetensorError, OSError) as error:
        text = str(error)
        full = isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)
        if not full and "No space left on device" not in text and "Disk quota exceeded" not in text:
            raise
        raise OSError(
            errno.ENOSPC, f"No space left on device while writing the merged model for --output {output}; "
            "free space there (the merge needs about the base model's size) and rerun", str(output)
        ) from error


def _refuse_existing(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        what = "is not empty" if output.is_dir() else "is a file"
        raise OutputExists(f"--output {output} {what}; choose a new directory or empty it first")


def _remove_stale_partials(output: Path) -> None:
    """Delete the partial dirs of earlier merges into `output` whose process is gone (killed)."""
    if not output.parent.is_dir():
        return
    for path in output.parent.glob(f".{output.name}{PARTIAL}*"):
        pid = path.name.rpartition(PARTIAL)[2]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root`, then the directories, so the rename publishes complete files."""
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(folder))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _stored_dtype(config):
    import torch

    stored = getattr(config, "dtype", None)  # not `torch_dtype`: deprecated in transformers 5
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


def main(args: MergeArguments) -> int:
    output = merge(args.model_name_or_path, args.adapter, args.output, args.max_shard_size, args.dtype, args.lora_alpha)
    files = sorted(p.name for p in output.iterdir())
    print(f"merge: wrote {output} ({', '.join(files)})")
    return 0
