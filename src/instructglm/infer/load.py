"""Load a model for inference: base checkpoint + optional LoRA adapter + how it is prompted.

Every inference command (chat, predict, web, serve, merge, eval) starts here, so they all agree on
three things: how an adapter is attached (through the training side's `load_adapter`, which
checks the adapter's tensors against the base), how a conversation becomes prompt ids and a reply
is read back (`instructglm.infer.prompts.Prompter`: the model family's format and the template the
adapter was trained with, saved as `instructglm_train.json` in the run dir, else the family's
default), and that tokenizers pad on the left, as batched decoder-only generation needs.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

from instructglm.errors import BadValue, MissingFile
from instructglm.layout import RUN_CONFIG

DTYPES = ("auto", "float32", "float16", "bfloat16")

LORA_ALPHA_HELP = (
    "LoRA alpha of a `chatglm-lora.pt` adapter, which does not store it. Default: the `lora.alpha` of the run's "
    f"{RUN_CONFIG} beside the file, else 32 (the 2023 scripts' value). A peft adapter dir records its own: a "
    "different value is refused."
)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="THUDM/chatglm-6b",
        metadata={"help": "Base model: a hub name or a local directory in the hub layout."},
    )
    adapter: Optional[str] = field(
        default=None,
        metadata={
            "help": "LoRA adapter to apply: a peft directory (a `train` run dir or checkpoint) or a "
            "`chatglm-lora.pt` state dict in the original InstructGLM naming."
        },
    )
    template: Optional[str] = field(
        default=None,
        metadata={
            "help": "Prompt template name (or a custom format string); `messages` prompts whole conversations in the "
            f"model family's format (ChatGLM3's role tokens, a chat template). Default: the `template` saved in the "
            f"adapter's {RUN_CONFIG}, else the model family's."
        },
    )
    lora_alpha: Optional[int] = field(
        default=None,
        metadata={"help": LORA_ALPHA_HELP},
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (float32 on CPU, the checkpoint's dtype on GPU), float32, float16, bfloat16."
        },
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (cuda when available)."})


def resolve_device(device: str = "auto") -> str:
    """The device to load on: `auto` is cuda when a GPU is there, else cpu.

    Raises:
        BadValue: not a device name, or a CUDA device this machine does not have.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise BadValue(f"--device {device!r} is not a device; use cpu, cuda, cuda:N or auto") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise BadValue(f"--device {device}: this machine has no CUDA GPU that torch can use; use --device cpu (or auto)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise BadValue(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0; "
                "pick one of them, or --device cuda"
            )
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """torch dtype for `from_pretrained`; "auto" keeps the checkpoint's dtype except on the CPU,
    where half precision is slow or unsupported for several ops, so float32 is used."""
    import torch

    if dtype not in DTYPES:
        raise BadValue(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return torch.float32 if device == "cpu" else "auto"
    return getattr(torch, dtype)


def generation_tokenizer(model_name_or_path: str):
    """The base model's tokenizer, set up for batched generation (left padding, a pad token)."""
    from instructglm.models.loading import load_tokenizer

    tokenizer, _ = load_tokenizer(model_name_or_path)
    # Decoder-only generation continues from the last position of every row, so padding must
    # come first; right padding would make the model continue after pad tokens.
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Llama-style tokenizers ship without a pad token; the mask hides it, any id works.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class Loaded(NamedTuple):
    """What `load_model` returns: unpack it as `model, tokenizer, prompter = load_model(...)`."""

    model: Any
    tokenizer: Any
    prompter: Any  # instructglm.infer.prompts.Prompter


def load_model(
    model_name_or_path: str,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    template: str | None = None,
    lora_alpha: int | None = None,
) -> Loaded:
    """Load `(model, tokenizer, prompter)` ready for generation.

    Args:
        model_name_or_path: hub name or local directory of the base (or an already merged) model.
        adapter: a peft adapter directory or a `chatglm-lora.pt` state dict; None for the base alone.
        dtype: "auto", "float32", "float16" or "bfloat16" (see `resolve_dtype`).
        device: "auto", "cpu", "cuda", "cuda:N".
        template: a template name or format string (or `messages`) overriding the saved/family one.
        lora_alpha: alpha of a `.pt` adapter (see `LORA_ALPHA_HELP`); for a peft dir it must match its config.

    Returns:
        The model in eval mode (a `PeftModel` when an adapter is given), its tokenizer with left
        padding, and its `Prompter` (the family's format with the run's template, stop ids, reply parsing).

    Raises:
        MissingFile: the adapter path does not exist, or `model_name_or_path` holds no tokenizer or weights.
        BadValue: bad dtype or device; a truncated or refused checkpoint or adapter file (named); the adapter
            does not fit the base (the message names the tensors); a tokenizer with more ids than the model's
            embedding; a run recorded for another model family.
    """
    from instructglm.infer.prompts import prompter_for
    from instructglm.models.loading import load_causal_lm

    if lora_alpha is not None and lora_alpha <= 0:
        raise BadValue(f"--lora_alpha must be a positive number, got {lora_alpha}")
    if adapter is not None:
        check_adapter_files(adapter)
    device = resolve_device(device)
    tokenizer = generation_tokenizer(model_name_or_path)
    model = load_causal_lm(model_name_or_path, dtype=resolve_dtype(dtype, device), device_map={"": device})
    check_vocabulary(model, tokenizer, model_name_or_path)
    if adapter is not None:
        model = attach_adapter(model, adapter, lora_alpha)
    model.eval()
    return Loaded(model, tokenizer, prompter_for(model, tokenizer, adapter, model_name_or_path, template))


def check_vocabulary(model: Any, tokenizer: Any, model_name_or_path: str) -> None:
    """Every id the tokenizer can produce must have an embedding row, or generation fails on the first such id.

    Raises:
        BadValue: the tokenizer is larger than the model's input embedding (both sizes named).
    """
    embedding = model.get_input_embeddings()
    rows = getattr(embedding, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise BadValue(
            f"{model_name_or_path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only {rows} "
            "rows, so ids past it cannot be embedded: the tokenizer files do not belong to these weights; use the "
            "model's own tokenizer (or resize the embedding and retrain)"
        )


def check_adapter_files(adapter: str) -> None:
    """Fail early, naming the file, on an adapter path that is missing or whose config is unreadable.

    Raises:
        MissingFile: nothing at `adapter`, or a directory without adapter_config.json.
        BadValue: adapter_config.json is empty or not a JSON object (an interrupted save).
    """
    path = Path(adapter)
    if not path.exists():
        raise MissingFile(f"--adapter {adapter}: no such file or directory")
    if not path.is_dir():
        return
    config = path / "adapter_config.json"
    if not config.is_file():
        raise MissingFile(
            f"--adapter {adapter} has no adapter_config.json: not a peft adapter dir (a `train` run dir or checkpoint-N), "
            "nor a chatglm-lora.pt file"
        )
    try:
        value = json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        what = "is empty" if config.stat().st_size == 0 else f"is not valid JSON ({err})"
        raise BadValue(f"{config} {what}: the adapter was not saved completely; re-save it or use another checkpoint") from None
    if not isinstance(value, dict):
        raise BadValue(f"{config} is not a JSON object: the adapter was not saved completely; re-save it or use another checkpoint")


def attach_adapter(model: Any, adapter: str, lora_alpha: int | None = None) -> Any:
    """`models.lora.load_adapter` for inference, with unreadable adapter weights named as the user's to fix."""
    from safetensors import SafetensorError

    from instructglm.models.lora import load_adapter

    if lora_alpha is None:
        warn_assumed_alpha(adapter)
    try:
        return load_adapter(model, adapter, is_trainable=False, lora_alpha=lora_alpha)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL ([\w.]+)", str(error))
        what = f" ({refused.group(1)})" if refused else ""
        raise BadValue(
            f"--adapter {adapter}: the file holds pickled objects other than tensors{what}, which are never loaded "
            "(torch.load weights_only=True refused them); use a peft adapter dir or a plain state dict of tensors"
        ) from error
    except (SafetensorError, EOFError) as error:
        raise BadValue(f"--adapter {adapter}: the adapter weights are truncated or corrupt ({_first_line(error)}); re-save them") from error
    except RuntimeError as error:
        # torch.load of a truncated or foreign zip archive ("PytorchStreamReader failed ...")
        if "PytorchStreamReader" not in str(error) and "zip archive" not in str(error):
            raise
        raise BadValue(f"--adapter {adapter}: the file is truncated or not a torch checkpoint ({_first_line(error)}); re-save it") from error


def recorded_alpha(adapter: str) -> Any:
    """The `lora.alpha` of the run config beside a `.pt` adapter, or None (no run config, or none recorded)."""
    from instructglm.infer.prompts import run_config_path

    saved = run_config_path(adapter)
    if saved is None:
        return None
    try:
        value = json.loads(saved.read_text(encoding="utf-8"))
        return value["lora"]["alpha"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def warn_assumed_alpha(adapter: str) -> None:
    """A `.pt` adapter stores no alpha: say so when none is recorded beside it either, as a wrong one halves
    (or doubles) the update silently."""
    from instructglm.infer.prompts import warn
    from instructglm.models.lora import SEED_LORA_ALPHA

    if Path(adapter).is_file() and recorded_alpha(adapter) is None:
        warn(
            f"--adapter {adapter} records no LoRA alpha (no {RUN_CONFIG} with `lora.alpha` beside it): alpha assumed "
            f"{SEED_LORA_ALPHA} (the 2023 scripts' value); pass --lora_alpha if it was trained with another"
        )


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def load_from_args(args: ModelArguments):
    """`load_model` with a command's `ModelArguments`."""
    return load_model(args.model_name_or_path, args.adapter, args.dtype, args.device, args.template, args.lora_alpha)
