"""Load a model for inference: base checkpoint + optional LoRA adapter + the prompt template.

Every inference command (chat, predict, web, serve, merge) starts here, so they all agree on
three things: how an adapter is attached (through the training side's `load_adapter`, which
checks the adapter's tensors against the base), which template turns a query and its history
into a prompt (the one the adapter was trained with, saved as `instructglm_train.json` in the
run dir, else the model family's chat template), and that tokenizers pad on the left, as
batched decoder-only generation needs.
"""

from __future__ import annotations

import json
import pickle
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from instructglm.errors import BadValue, MissingFile
from instructglm.layout import RUN_CONFIG

DTYPES = ("auto", "float32", "float16", "bfloat16")
# What `train` records as the template when its data's template is not known (a jsonl made by
# the 2023 scripts, without convert's sidecar).
UNKNOWN_TEMPLATE = "unknown"


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
            "help": "Prompt template name (or a custom format string). Default: the `template` saved in "
            f"the adapter's {RUN_CONFIG}, else the model family's chat template."
        },
    )
    dtype: str = field(
        default="auto",
        metadata={
            "help": "Weights dtype: auto (float32 on CPU, the checkpoint's dtype on GPU), float32, float16, bfloat16."
        },
    )
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto (cuda when available)."})


def resolve_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
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


def run_config_path(path: str | None) -> Path | None:
    """Where a run's `instructglm_train.json` would sit for an adapter dir, a `.pt` file or a model dir."""
    if not path:
        return None
    p = Path(path)
    candidate = (p if p.is_dir() else p.parent) / RUN_CONFIG
    return candidate if candidate.is_file() else None


def template_name_for(model_config: Any, adapter: str | None, model_name_or_path: str | None = None) -> str:
    """The template the adapter (or a merged model) was trained with, else the family's chat template.

    When the run says its training template is unknown, or an adapter comes without a run config,
    the family's template is a guess: a one-line warning on stderr says so and names --template.

    Raises:
        BadValue: the run's instructglm_train.json is not a JSON object.
    """
    from instructglm.models.registry import family_for

    fallback = family_for(model_config).chat_template
    for source in (adapter, model_name_or_path):
        saved = run_config_path(source)
        if saved is None:
            continue
        try:
            run = json.loads(saved.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadValue(f"{saved}: not valid JSON ({err}); fix or delete it, or pass --template") from err
        if not isinstance(run, dict):
            raise BadValue(f"{saved}: not a JSON object; fix or delete it, or pass --template")
        name = run.get("template")
        # train records an unknown template as `template: null, template_source: "unknown"`
        if name == UNKNOWN_TEMPLATE or (not name and run.get("template_source") == UNKNOWN_TEMPLATE):
            _warn(
                f"{saved} says the adapter's training template is unknown (its data had no convert sidecar); "
                f"prompting with the model family's `{fallback}` template instead: pass --template NAME "
                "(e.g. alpaca, belle) if the training prompts looked different"
            )
            return fallback
        if name:
            return name
    if adapter is not None:
        _warn(
            f"--adapter {adapter} has no {RUN_CONFIG}, so the template it was trained with is unknown; prompting with "
            f"the model family's `{fallback}` template instead: pass --template NAME if the training prompts looked different"
        )
    return fallback


def _warn(message: str) -> None:
    print(f"instructglm: warning: {message}", file=sys.stderr, flush=True)


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


def load_model(
    model_name_or_path: str,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    template: str | None = None,
):
    """Load `(model, tokenizer, template)` ready for generation.

    Args:
        model_name_or_path: hub name or local directory of the base (or an already merged) model.
        adapter: a peft adapter directory or a `chatglm-lora.pt` state dict; None for the base alone.
        dtype: "auto", "float32", "float16" or "bfloat16" (see `resolve_dtype`).
        device: "auto", "cpu", "cuda", "cuda:N".
        template: a template name or format string overriding the saved/family one.

    Returns:
        The model in eval mode (a `PeftModel` when an adapter is given), its tokenizer with left
        padding, and the template object (`.render(instruction, input, history)`).

    Raises:
        MissingFile: the adapter path does not exist, or `model_name_or_path` holds no tokenizer or weights.
        BadValue: bad dtype; a truncated or refused checkpoint or adapter file (named); the adapter
            does not fit the base (the message names the tensors).
    """
    from instructglm.data.templates import get_template
    from instructglm.models.loading import load_causal_lm

    if adapter is not None:
        check_adapter_files(adapter)
    device = resolve_device(device)
    tokenizer = generation_tokenizer(model_name_or_path)
    model = load_causal_lm(model_name_or_path, dtype=resolve_dtype(dtype, device), device_map={"": device})
    if adapter is not None:
        model = attach_adapter(model, adapter)
    model.eval()
    name = template or template_name_for(model.config, adapter, model_name_or_path)
    return model, tokenizer, get_template(name)


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


def attach_adapter(model: Any, adapter: str) -> Any:
    """`train.lora.load_adapter` for inference, with unreadable adapter weights named as the user's to fix."""
    from safetensors import SafetensorError

    from instructglm.train.lora import load_adapter

    try:
        return load_adapter(model, adapter, is_trainable=False)
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


def _first_line(error: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip()
    return text.splitlines()[0][:200] if text else type(error).__name__


def load_from_args(args: ModelArguments):
    """`load_model` with a command's `ModelArguments`."""
    return load_model(args.model_name_or_path, args.adapter, args.dtype, args.device, args.template)
