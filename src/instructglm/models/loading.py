"""The one way a base model and its tokenizer are loaded: `load_tokenizer`, `load_causal_lm`.

Both take a local directory in the hub's layout or a hub name (`THUDM/chatglm-6b`), go through
transformers' Auto classes (after `import instructglm` they find the native classes), and turn
the failures a user can fix — a path that is not there, a directory missing its tokenizer or weight
files, a truncated or foreign checkpoint, a pickle that `weights_only=True` refuses — into one
`UserError` naming the path and what to do. Anything else propagates with its traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path
from typing import Any

from instructglm.errors import BadValue, MissingFile, UserError

# Files a checkpoint directory may hold its weights in (transformers' names, single and sharded).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _is_local(name: str) -> bool:
    """A path rather than a hub name: it exists, or it can only be a path (`./x`, `/x`, `a/b/c`, `~`)."""
    return os.path.exists(name) or name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _check_local(name: str, flag: str) -> None:
    if _is_local(name) and not os.path.isdir(name):
        what = "is a file, not a model directory" if os.path.exists(name) else "does not exist"
        raise MissingFile(f"{flag} {name} {what}: give a local directory in the hub layout or a hub name (online)")


def _listing(path: str) -> str:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return "unreadable"
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "empty"


def model_type_of(name: str) -> str | None:
    """`model_type` from the config.json of a local dir or hub repo; None for a tokenizer-only dir."""
    if os.path.isdir(name):
        config = model_config_of(name)
        return config.get("model_type") if config is not None else None
    from transformers import PretrainedConfig

    try:
        return PretrainedConfig.get_config_dict(name)[0].get("model_type")
    except OSError:
        return None  # a hub repo holding only a tokenizer: the generic family


def model_config_of(name: str) -> dict | None:
    """A local dir's config.json as a dict (read as JSON: no torch import), or None (no file, or a hub name).

    The model families read it with the tokenizer to tell ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B apart.

    Raises:
        BadValue: the file is not valid JSON.
    """
    return _json_file(Path(name) / "config.json", "config.json") if os.path.isdir(name) else None


def generation_config_of(name: str) -> dict | None:
    """A local dir's generation_config.json as a dict (its `eos_token_id` are stop tokens), or None."""
    return _json_file(Path(name) / "generation_config.json", "generation_config.json") if os.path.isdir(name) else None


def _json_file(path: Path, what: str) -> dict | None:
    if not path.is_file():
        return None
    try:  # plain JSON: reading a local config must not import torch (transformers' config code does)
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadValue(f"{path}: not a valid {what} ({error}); fix or re-download it") from error
    return value if isinstance(value, dict) else None


def load_tokenizer(model_name_or_path: str, flag: str = "--model_name_or_path"):
    """(tokenizer, model_type) of a model dir or hub name; model_type is None for a tokenizer-only dir.

    A local dir whose tokenizer_config.json names one of the native tokenizers is loaded with that
    class directly (no torch import: tokenize starts faster); anything else goes through AutoTokenizer.
    """
    _check_local(model_name_or_path, flag)
    native = _native_tokenizer_class(model_name_or_path, flag)
    try:
        if native is not None:
            tokenizer = native.from_pretrained(model_name_or_path)
        else:
            from transformers import AutoTokenizer

            # never the checkpoint's own code: transformers would otherwise ask on stdin, and a "y" would run it
            tokenizer = AutoTokenizer.from_pretrained(model_name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as error:
        if isinstance(error, UserError):
            raise
        _refuse_remote_code(model_name_or_path, flag, error)
        where = f" (it holds: {_listing(model_name_or_path)})" if os.path.isdir(model_name_or_path) else ""
        raise MissingFile(
            f"{flag} {model_name_or_path}: no usable tokenizer there{where}: {error}. Copy the tokenizer files "
            "(tokenizer_config.json and the vocabulary, e.g. ice_text.model or tokenizer.model) from the model's "
            "hub repo into it"
        ) from error
    return tokenizer, model_type_of(model_name_or_path)


def _native_tokenizer_class(path: str, flag: str):
    """The native tokenizer class a local dir's tokenizer_config.json names (its vocabulary checked), else None."""
    config_path = Path(path) / "tokenizer_config.json"
    if not config_path.is_file():
        return None
    try:
        class_name = json.loads(config_path.read_text(encoding="utf-8")).get("tokenizer_class")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise BadValue(f"{config_path}: not a valid tokenizer_config.json ({error}); fix or re-download it") from error
    from instructglm.models.registration import REGISTRATIONS, load_class

    for entry in REGISTRATIONS:
        if entry.tokenizer and entry.tokenizer.rpartition(":")[2] == class_name:
            tokenizer_class = load_class(entry.tokenizer)
            # one class may read several layouts (ChatGLM's name covers v1's ice_text.model and v2/v3's tokenizer.model)
            layouts = getattr(tokenizer_class, "vocab_file_layouts", (tokenizer_class.vocab_files_names,))
            missing = [[name for name in layout.values() if not (Path(path) / name).is_file()] for layout in layouts]
            if all(missing):
                wanted = " or ".join(", ".join(files) for files in missing)
                raise MissingFile(
                    f"{flag} {path}: tokenizer_config.json names {class_name}, but {wanted} is missing "
                    f"(the dir holds: {_listing(path)}); copy it from the model's hub repo"
                )
            return tokenizer_class
    return None


def load_causal_lm(model_name_or_path: str, flag: str = "--model_name_or_path", **kwargs: Any):
    """`AutoModelForCausalLM.from_pretrained(model_name_or_path, **kwargs)` with user-fixable failures named."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    _check_local(model_name_or_path, flag)
    if os.path.isdir(model_name_or_path) and not (Path(model_name_or_path) / "config.json").is_file():
        raise MissingFile(
            f"{flag} {model_name_or_path} has no config.json (it holds: {_listing(model_name_or_path)}): "
            "is it a model directory? An adapter goes to --adapter, the base model to --model_name_or_path"
        )
    if kwargs.get("weights_only") is False:
        raise BadValue("weights_only=False is refused: checkpoints are read with torch.load(weights_only=True)")
    if kwargs.pop("trust_remote_code", False):
        raise BadValue("trust_remote_code=True is refused: InstructGLM never runs a checkpoint's own code")
    try:
        return AutoModelForCausalLM.from_pretrained(model_name_or_path, trust_remote_code=False, **kwargs)
    except ValueError as error:
        if isinstance(error, UserError):
            raise
        _refuse_remote_code(model_name_or_path, flag, error)
        raise
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError) as error:
        if not is_unreadable_weights(error):
            raise
        raise BadValue(_broken_checkpoint(model_name_or_path, flag, error)) from error
    except OSError as error:
        if os.path.isdir(model_name_or_path) and not any((Path(model_name_or_path) / f).exists() for f in WEIGHT_FILES):
            raise MissingFile(
                f"{flag} {model_name_or_path} holds no weights (none of {', '.join(WEIGHT_FILES)}; it holds: "
                f"{_listing(model_name_or_path)}); download the checkpoint into it"
            ) from error
        raise


def _refuse_remote_code(name: str, flag: str, error: BaseException) -> None:
    """Raise BadValue when `error` is transformers refusing a checkpoint that only its own code (`auto_map`) loads."""
    if "trust_remote_code" in str(error):
        raise BadValue(
            f"{flag} {name}: this checkpoint needs its own Python code (auto_map), which InstructGLM never runs; "
            "use a model transformers or InstructGLM implements (see the README's model families)"
        ) from error


def load_strictly(load, class_name: str, name_or_path, *args: Any, **kwargs: Any) -> tuple[Any, dict]:
    """(model, loading info) from `load`, a native class's inherited `from_pretrained`, made strict.

    transformers only warns about missing tensors and re-initialises them randomly; a GLM checkpoint with missing
    or mis-shaped tensors is a wrong or broken download, so this raises naming them.
    `ignore_mismatched_sizes=True` restores transformers' lenient behaviour for both.

    Raises:
        BadValue: missing or mis-shaped tensors, or `weights_only=False`.
    """
    if kwargs.get("weights_only") is False:
        raise BadValue("weights_only=False is refused: checkpoints are read with torch.load(weights_only=True)")
    lenient = kwargs.get("ignore_mismatched_sizes", False)
    kwargs.pop("output_loading_info", None)
    kwargs["ignore_mismatched_sizes"] = True  # so the mismatches come back to us instead of a bare RuntimeError
    model, info = load(name_or_path, *args, output_loading_info=True, **kwargs)
    problems = []
    if info["missing_keys"]:
        problems.append("missing tensors: " + ", ".join(sorted(info["missing_keys"])))
    if info["mismatched_keys"]:
        shapes = [f"{name} (checkpoint {tuple(old)}, model {tuple(new)})" for name, old, new in info["mismatched_keys"]]
        problems.append("tensors with the wrong shape: " + ", ".join(sorted(shapes)))
    if problems and not lenient:
        raise BadValue(
            f"{name_or_path} does not hold a complete {class_name} checkpoint for its config.json: "
            + "; ".join(problems)
            + ". Re-download the checkpoint or fix config.json (pass ignore_mismatched_sizes=True to load anyway "
            "with those tensors randomly initialised)."
        )
    return model, info


def _broken_checkpoint(path: str, flag: str, error: BaseException) -> str:
    return f"{flag} {path}: {unreadable_weights(error)}; use a safetensors checkpoint or re-download / re-save it"


def unreadable_weights(error: BaseException) -> str:
    """Why a weight file could not be read, in a few words (torch's and safetensors' messages are long)."""
    if isinstance(error, pickle.UnpicklingError):
        # torch opens with advice to pass weights_only=False; the global it refused is the fact worth naming
        found = re.search(r"GLOBAL ([\w.]+)", str(error))
        refused = f"the global {found.group(1)}" if found else "a non-tensor object"
        return (
            f"a weight file holds pickled objects other than tensors ({refused}), which are never loaded "
            "(torch.load(weights_only=True) refuses them)"
        )
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in str(error).splitlines()]
    first = next((line for line in lines if line), type(error).__name__)
    return f"a weight file is truncated or corrupt ({first[:200]})"


def is_unreadable_weights(error: BaseException) -> bool:
    """Whether `error` from torch.load / safetensors means a broken or refused file, rather than a bug."""
    from safetensors import SafetensorError

    if isinstance(error, (SafetensorError, pickle.UnpicklingError, EOFError)):
        return True
    return isinstance(error, RuntimeError) and ("PytorchStreamReader" in str(error) or "zip archive" in str(error))
