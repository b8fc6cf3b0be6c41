"""LoRA through peft: build the config, wrap a model, load an adapter back with every key checked.

Adapters come in two layouts. The peft layout (`adapter_config.json` + `adapter_model.safetensors`)
is what training writes. The seed's `chatglm-lora.pt` is a plain state dict of the trainable
tensors as the peft model names them (`base_model.model.<module>.lora_A.weight`; peft >= 0.3 adds
an adapter segment: `lora_A.default.weight`); it stores neither rank, alpha nor targets, so rank
and targets are read off its shapes and names and alpha comes from the caller (the seed's 32).

LoRA on an embedding (`word_embeddings`) names its tensors `lora_embedding_A`/`lora_embedding_B`
(no `.weight`; `.default` last in the `.pt`). When the targets include an embedding-like layer
(`lm_head`, `embed_tokens`), peft also saves that layer's frozen base weight
(`<module>.base_layer.weight`, its `save_embedding_layers="auto"`): a peft dir may hold it, a `.pt`
never does, and neither is required, since it is the base model's own weight.

Unlike the seed's `load_state_dict(..., strict=False)`, a load here compares the file's LoRA
tensors with the adapter the model expects and raises a `BadValue` naming every missing,
unexpected or mis-shaped tensor: a wrong rank or target never loads nothing silently.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

from instructglm.errors import BadValue, MissingFile
from instructglm.layout import RUN_CONFIG
from instructglm.models.loading import is_unreadable_weights, unreadable_weights
from instructglm.models.registry import lora_targets_for

SEED_LORA_ALPHA = 32  # the seed hard-coded lora_alpha=32 and did not save it
_PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"  # peft's CONFIG_NAME
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")  # peft's, the first preferred
# `.lora_A.default.weight` -> `.lora_A.weight`, `.lora_embedding_A.default` -> `.lora_embedding_A`: the
# adapter segment newer peft versions insert in parameter names (and leave out of saved files).
_ADAPTER_SEGMENT = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.|$)")
# The saved form of a LoRA tensor name, split around its adapter segment's place.
_SAVED_LORA = re.compile(r"^(?P<head>.+\.lora_[A-Za-z_]+?)(?P<tail>\.weight)?$")
# A LoRA "A" matrix (linear or embedding), whose first dimension is the rank.
_LORA_A = re.compile(r"^(?P<module>.+)\.lora_(?:embedding_)?A(?:\.default)?(?:\.weight)?$")


def lora_config(
    model_type: str | None,
    rank: int = 8,
    alpha: int = 32,
    dropout: float = 0.1,
    target: Sequence[str] | str | None = None,
    inference_mode: bool = False,
) -> LoraConfig:
    """A causal-LM `LoraConfig`; `target=None` takes the family's modules (registry `lora_targets_for`)."""
    target_modules = lora_targets_for(model_type) if target is None else target
    if not isinstance(target_modules, str):
        target_modules = list(target_modules)
    return LoraConfig(
        task_type=TaskType.CAUSAL_LM,
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=target_modules,
        inference_mode=inference_mode,
    )


def attach_lora(
    model,
    rank: int = 8,
    alpha: int = 32,
    dropout: float = 0.1,
    target: Sequence[str] | str | None = None,
) -> PeftModel:
    """Wrap `model` with a fresh, trainable LoRA adapter (adapter weights in fp32 whatever the base dtype)."""
    config = lora_config(getattr(model.config, "model_type", None), rank, alpha, dropout, target)
    try:
        return _get_peft_model(model, config)
    except ValueError as error:
        raise BadValue(
            f"LoRA targets {config.target_modules!r} do not match the modules of {type(model).__name__}: {error} "
            "(set --lora_target to names from model.named_modules())"
        ) from error


def load_adapter(
    model,
    path: str,
    is_trainable: bool = False,
    lora_alpha: int | None = None,
    *,
    lora_rank: int | None = None,
    lora_target: Sequence[str] | str | None = None,
    lora_dropout: float = 0.0,
) -> PeftModel:
    """Wrap `model` with the adapter stored at `path` (a peft dir or a seed `.pt` state dict).

    Args:
        model: the base model (a transformers `PreTrainedModel`).
        path: a peft adapter dir, or a `.pt` state dict in the seed's naming.
        is_trainable: keep the adapter trainable (continued training) instead of inference mode.
        lora_alpha: alpha for a `.pt` file, which does not store it (default: the run's
            instructglm_train.json beside it, else the seed's 32); for a peft dir it must agree
            with the dir's config if given.
        lora_rank, lora_target: what the caller expects; a file that disagrees is an error.
        lora_dropout: dropout for a `.pt` adapter being trained further.

    Raises:
        MissingFile: `path` does not exist or holds no adapter.
        BadValue: an unreadable file (named); rank/target/alpha mismatch; missing, unexpected or
            mis-shaped LoRA tensors (all named).
    """
    if not os.path.exists(path):
        raise MissingFile(f"adapter {path} does not exist: pass a peft adapter dir or a chatglm-lora.pt file")
    if os.path.isdir(path):
        config = read_adapter_config(path)
        state_dict = _read_peft_weights(path)
        if lora_alpha is not None and lora_alpha != config.lora_alpha:
            raise BadValue(
                f"adapter {path} was trained with lora_alpha={config.lora_alpha}, not {lora_alpha} "
                f"(drop --lora_alpha or pass {config.lora_alpha})"
            )
    else:
        state_dict = _read_seed_pt(path)
        rank, targets = _infer_rank_and_targets(path, state_dict)
        config = lora_config(
            getattr(model.config, "model_type", None),
            rank=rank,
            alpha=lora_alpha if lora_alpha is not None else _alpha_beside(path),
            dropout=lora_dropout,
            target=targets,
        )
    _check_expected(path, config, lora_rank, lora_target)
    config.inference_mode = not is_trainable

    try:
        peft_model = _get_peft_model(model, config)
    except ValueError as error:
        raise BadValue(f"adapter {path} targets {config.target_modules!r}, which {type(model).__name__} lacks: {error}") from error
    state_dict = {_canonical_key(key): tensor for key, tensor in state_dict.items()}
    _check_keys(path, state_dict, get_peft_model_state_dict(peft_model))
    result = set_peft_model_state_dict(peft_model, state_dict)
    if result.unexpected_keys:
        raise BadValue(f"adapter {path}: tensors the model did not take: {sorted(result.unexpected_keys)}")
    if not is_trainable:
        peft_model.eval()
    return peft_model


def read_adapter_config(path: str | os.PathLike) -> LoraConfig:
    """The `LoraConfig` of a peft adapter dir; a missing or unreadable adapter_config.json is named."""
    config_path = os.path.join(path, ADAPTER_CONFIG)
    if not os.path.isfile(config_path):
        raise MissingFile(f"{path} has no {ADAPTER_CONFIG}: it is not a peft adapter dir")
    try:
        with open(config_path, encoding="utf-8") as f:
            fields = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadValue(
            f"{config_path}: not valid JSON ({error}; {os.path.getsize(config_path)} bytes), so the adapter there "
            "cannot be used: it was cut off while being written; use another checkpoint or retrain"
        ) from error
    problems = _config_problems(fields)
    if problems:
        raise BadValue(f"{config_path}: not a LoRA adapter config ({'; '.join(problems)}); use the adapter dir `train` wrote")
    try:
        return LoraConfig.from_pretrained(str(path))
    except (TypeError, ValueError) as error:
        raise BadValue(f"{config_path}: peft cannot read it ({error}); use the adapter dir `train` wrote") from error


def _config_problems(fields) -> list[str]:
    """What makes a parsed adapter_config.json unusable as a LoRA config (peft itself fails on these with a TypeError)."""
    if not isinstance(fields, dict):
        return [f"a JSON {type(fields).__name__}, not an object"]
    problems = []
    if fields.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {fields.get('peft_type')!r}, not 'LORA'")
    rank = fields.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        problems.append(f"r is {rank!r}, not a positive integer")
    alpha = fields.get("lora_alpha")
    if alpha is not None and (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)):
        problems.append(f"lora_alpha is {alpha!r}, not a number")
    targets = fields.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets))):
        problems.append(f"target_modules is {targets!r}, not a module name or a list of them")
    return problems


def _read_peft_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a peft dir; a missing, empty or truncated weight file is named."""
    from safetensors import SafetensorError

    present = [name for name in ADAPTER_WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        raise MissingFile(f"adapter {path} has {ADAPTER_CONFIG} but no weights ({' or '.join(ADAPTER_WEIGHT_FILES)})")
    try:
        return load_peft_weights(path, device="cpu")
    except (SafetensorError, EOFError) as error:
        raise BadValue(
            f"{os.path.join(path, present[0])}: truncated or corrupt ({error}); use another checkpoint or retrain"
        ) from error


def _read_seed_pt(path: str) -> dict[str, torch.Tensor]:
    import pickle

    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as error:
        if not is_unreadable_weights(error):
            raise
        raise BadValue(f"adapter {path}: {unreadable_weights(error)}; pass a chatglm-lora.pt of tensors or a peft adapter dir") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise BadValue(f"{path} is not a state dict of tensors (expected the seed's chatglm-lora.pt)")
    return state_dict


def _get_peft_model(model, config: LoraConfig) -> PeftModel:
    """`peft.get_peft_model`, without the FutureWarning it raises by reading transformers' deprecated
    `is_gradient_checkpointing` alias (peft's code, nothing a caller can change; an error under
    `-W error::FutureWarning`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        return get_peft_model(model, config)


def seed_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The seed's `chatglm-lora.pt`: every LoRA tensor as the peft model names it, fp32 on the CPU."""
    return {
        name: param.detach().to("cpu", torch.float32).contiguous()
        for name, param in peft_model.named_parameters()
        if ".lora_" in name
    }


def seed_state_dict_from_saved(saved: dict[str, torch.Tensor], adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """`seed_state_dict` rebuilt from a saved adapter (`adapter_model.safetensors`'s tensors).

    Under ZeRO-3 or FSDP each process holds only a shard of the parameters; the saved file is the
    gathered whole, so the `.pt` is made from it. Names get the adapter segment back
    (`.lora_A.weight` -> `.lora_A.default.weight`); base-layer weights peft saves beside the LoRA
    tensors of embedding-like targets are left out, as `seed_state_dict` leaves them out.
    """
    state = {}
    for key, tensor in saved.items():
        if ".lora_" not in key:
            continue
        match = _SAVED_LORA.match(key)
        name = f"{match['head']}.{adapter_name}{match['tail'] or ''}"
        state[name] = tensor.detach().to("cpu", torch.float32).contiguous()
    return state


def _canonical_key(key: str) -> str:
    """A seed/peft tensor name in the saved-adapter form `base_model.model.<module>.lora_A.weight`."""
    key = _ADAPTER_SEGMENT.sub(r".\1", key)
    return key if key.startswith(_PEFT_PREFIX) else _PEFT_PREFIX + key


def _alpha_beside(path: str) -> int:
    """Alpha of a `.pt` adapter: from the `instructglm_train.json` of its run dir, else the seed's 32."""
    run_config = os.path.join(os.path.dirname(os.path.abspath(path)), RUN_CONFIG)
    if os.path.isfile(run_config):
        with open(run_config, encoding="utf-8") as f:
            try:
                return int(json.load(f)["lora"]["alpha"])
            except (ValueError, KeyError, TypeError):
                pass  # not one of ours: fall back to the seed's default
    return SEED_LORA_ALPHA


def _infer_rank_and_targets(path: str, state_dict: dict[str, torch.Tensor]) -> tuple[int, list[str]]:
    ranks: dict[str, int] = {}
    for key, tensor in state_dict.items():
        match = _LORA_A.match(key)
        if match:
            ranks[match["module"]] = tensor.shape[0]
    if not ranks:
        raise BadValue(f"{path} holds no LoRA tensors (no '*.lora_A.weight' keys); keys: {sorted(state_dict)[:5]}")
    if len(set(ranks.values())) > 1:
        raise BadValue(f"{path} mixes LoRA ranks {sorted(set(ranks.values()))}; one rank per adapter is supported")
    targets = sorted({module.rsplit(".", 1)[-1] for module in ranks})
    return next(iter(ranks.values())), targets


def _check_expected(path: str, config: LoraConfig, rank: int | None, target: Sequence[str] | str | None) -> None:
    problems = []
    if rank is not None and rank != config.r:
        problems.append(f"it has rank {config.r}, the run asks for --lora_rank {rank} (pass --lora_rank {config.r})")
    if target is not None:
        have = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules)
        want = target if isinstance(target, str) else sorted(target)
        if have != want:
            problems.append(f"it targets {have}, the run asks for --lora_target {want}")
    if problems:
        raise BadValue(f"adapter {path} does not match the requested LoRA: " + "; ".join(problems))


def _check_keys(path: str, loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Every LoRA tensor the model expects is in the file, and nothing else is, at the model's shapes.

    The model's non-LoRA entries (base-layer weights of embedding-like targets, which peft saves
    alongside) may be in the file or not.
    """
    required = {key for key in expected if ".lora_" in key}
    missing = sorted(required - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mis_shaped = [
        f"{key}: file {tuple(loaded[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(loaded) & set(expected))
        if loaded[key].shape != expected[key].shape
    ]
    problems = [f"{kind}: {_some(keys)}" for kind, keys in (("missing", missing), ("unexpected", unexpected), ("shape", mis_shaped)) if keys]
    if problems:
        raise BadValue(
            f"adapter {path} does not fit the model: " + "; ".join(problems) + " (is it for another base model, rank or --lora_target?)"
        )


def _some(names: list[str], limit: int = 8) -> str:
    """The first `limit` names, comma-separated, and how many more there are."""
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
