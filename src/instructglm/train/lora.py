"""LoRA through peft: build the config, wrap a model, load an adapter back with every key checked.

Adapters come in two layouts. The peft layout (`adapter_config.json` + `adapter_model.safetensors`)
is what training writes. The seed's `chatglm-lora.pt` is a plain state dict of the trainable
tensors as the peft model names them (`base_model.model.<module>.lora_A.weight`; peft >= 0.3 adds
an adapter segment: `lora_A.default.weight`); it stores neither rank, alpha nor targets, so rank
and targets are read off its shapes and names and alpha comes from the caller (the seed's 32).

Unlike the seed's `load_state_dict(..., strict=False)`, a load here compares the file's tensors
with the adapter the model expects and raises a `ValueError` naming every missing, unexpected or
mis-shaped tensor: a wrong rank or target never loads nothing silently.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence

import torch
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from peft.utils import get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict

from instructglm.layout import RUN_CONFIG
from instructglm.models.registry import lora_targets_for

SEED_LORA_ALPHA = 32  # the seed hard-coded lora_alpha=32 and did not save it
_PEFT_PREFIX = "base_model.model."
# `.lora_A.default.weight` -> `.lora_A.weight`: the adapter segment newer peft versions insert.
_ADAPTER_SEGMENT = re.compile(r"\.(lora_[A-Za-z_]+)\.default(?=\.)")
_LORA_A = re.compile(r"^(?P<module>.+)\.lora_A(?:\.default)?\.weight$")


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
        return get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(
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
        FileNotFoundError: `path` does not exist or holds no adapter.
        ValueError: rank/target/alpha mismatch, or missing/unexpected/mis-shaped LoRA tensors (all named).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"adapter {path} does not exist: pass a peft adapter dir or a chatglm-lora.pt file")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise FileNotFoundError(f"{path} has no adapter_config.json: it is not a peft adapter dir")
        config = LoraConfig.from_pretrained(path)
        state_dict = load_peft_weights(path, device="cpu")
        if lora_alpha is not None and lora_alpha != config.lora_alpha:
            raise ValueError(f"adapter {path} was trained with lora_alpha={config.lora_alpha}, not {lora_alpha}")
    else:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise ValueError(f"{path} is not a state dict of tensors (expected the seed's chatglm-lora.pt)")
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
        peft_model = get_peft_model(model, config)
    except ValueError as error:
        raise ValueError(f"adapter {path} targets {config.target_modules!r}, which {type(model).__name__} lacks: {error}") from error
    state_dict = {_canonical_key(key): tensor for key, tensor in state_dict.items()}
    _check_keys(path, state_dict, get_peft_model_state_dict(peft_model))
    result = set_peft_model_state_dict(peft_model, state_dict)
    if result.unexpected_keys:
        raise ValueError(f"adapter {path}: tensors the model did not take: {sorted(result.unexpected_keys)}")
    if not is_trainable:
        peft_model.eval()
    return peft_model


def seed_state_dict(peft_model: PeftModel) -> dict[str, torch.Tensor]:
    """The seed's `chatglm-lora.pt`: every LoRA tensor as the peft model names it, fp32 on the CPU."""
    return {
        name: param.detach().to("cpu", torch.float32).contiguous()
        for name, param in peft_model.named_parameters()
        if ".lora_" in name
    }


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
        raise ValueError(f"{path} holds no LoRA tensors (no '*.lora_A.weight' keys); keys: {sorted(state_dict)[:5]}")
    if len(set(ranks.values())) > 1:
        raise ValueError(f"{path} mixes LoRA ranks {sorted(set(ranks.values()))}; one rank per adapter is supported")
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
        raise ValueError(f"adapter {path} does not match the requested LoRA: " + "; ".join(problems))


def _check_keys(path: str, loaded: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mis_shaped = [
        f"{key}: file {tuple(loaded[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(loaded) & set(expected))
        if loaded[key].shape != expected[key].shape
    ]
    if missing or unexpected or mis_shaped:
        lines = [f"adapter {path} does not fit the model:"]
        lines += [f"  missing: {key}" for key in missing]
        lines += [f"  unexpected: {key}" for key in unexpected]
        lines += [f"  shape: {entry}" for entry in mis_shaped]
        lines.append("  (is it for another base model, rank or --lora_target?)")
        raise ValueError("\n".join(lines))
