"""Merge a LoRA adapter into its base model and save a plain checkpoint to deploy.

    instructglm merge --model_name_or_path THUDM/chatglm-6b --adapter output/alpaca --output chatglm-6b-alpaca

The output directory has the official layout — `config.json`, `generation_config.json`,
safetensors shards with `model.safetensors.index.json`, and the tokenizer files — so
`AutoModelForCausalLM.from_pretrained(output)` loads it with no peft and no adapter, and gives
the outputs of base + adapter. The run's `instructglm_train.json` is copied beside it, so
`chat`/`predict`/`serve` on the merged model use the template the adapter was trained with.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from instructglm.infer.load import load_model, run_config_path
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


ARGUMENTS = (MergeArguments,)


def merge(model_name_or_path: str, adapter: str, output: str | Path, max_shard_size: str | int = "2GB", dtype: str = "auto") -> Path:
    """Load base + adapter, fold the LoRA deltas into the base weights, save to `output`.

    Raises:
        FileExistsError: `output` exists and is not empty (a merge never mixes with old files).
        FileNotFoundError / ValueError: from `load_model` (missing or mismatched adapter).
    """
    from transformers import AutoConfig, AutoTokenizer

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"--output {output} is not empty; choose a new directory or empty it first")
    # The LoRA deltas are added in float32 on the CPU (no fp16 rounding of B @ A), then the
    # weights go back to the dtype the base checkpoint was stored in, unless --dtype says otherwise.
    model, _, _ = load_model(model_name_or_path, adapter, dtype="float32" if dtype == "auto" else dtype, device="cpu")
    merged = model.merge_and_unload()
    if dtype == "auto":
        stored = _stored_dtype(AutoConfig.from_pretrained(model_name_or_path))
        if stored is not None:
            merged = merged.to(stored)
    output.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(output, max_shard_size=max_shard_size)
    # A fresh copy of the base's tokenizer: the loaded one was switched to left padding for generation.
    AutoTokenizer.from_pretrained(model_name_or_path).save_pretrained(output)
    saved = run_config_path(adapter)
    if saved is not None:
        shutil.copyfile(saved, output / RUN_CONFIG)
    return output


def _stored_dtype(config):
    import torch

    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = getattr(torch, stored, None)
    return stored if isinstance(stored, torch.dtype) else None


def main(args: MergeArguments) -> int:
    output = merge(args.model_name_or_path, args.adapter, args.output, args.max_shard_size, args.dtype)
    files = sorted(p.name for p in output.iterdir())
    print(f"merge: wrote {output} ({', '.join(files)})")
    return 0
