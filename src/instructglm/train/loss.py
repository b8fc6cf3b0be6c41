"""Causal-LM cross entropy with logits only where there are labels, a chunk at a time.

With ChatGLM's 130,528-word vocabulary the logits are the largest tensor of a training step
(batch 8 x 320 in fp32: 1.3 GB, and as much again for each of their softmax and gradient), yet
the prompt's positions, a third or more of the tokens of instruction data, carry no label, and
neither does padding. Here the output head runs only on the hidden states that predict a label
(position i where labels[i + 1] != -100), in chunks of `chunk_size` tokens; each chunk's logits
live only inside a `torch.utils.checkpoint` region, which keeps just its input hidden states and
recomputes the logits in backward, so at most one chunk's logits (and their gradient) exist at a
time. The cross entropy runs in fp32 whatever the head's dtype, like transformers' loss.

The loss is the same as the plain path's (`model(**batch).loss`, transformers' `ForCausalLMLoss`):
the sum of the token losses over the number of labelled tokens, or over `num_items_in_batch`
when the Trainer passes it (the labelled tokens of all its gradient-accumulation steps). Loss
and gradients (hidden states, head weight, LoRA) equal the full-logits path's to float rounding.

`labelled_only_loss(model, batch)` does this for any causal LM without touching model code: it
runs the model's own forward (through any DDP and peft wrappers, so every wrapper's hooks still
run) with a forward pre-hook on the output head (`get_output_embeddings()`: `lm_head`, possibly
a peft LoRA layer, tied or not) that keeps the hidden states the head would get and hands the
head a zero-length slice instead; then the chunked loss calls that same head module. It is for a
Trainer `compute_loss` override (`instructglm.train.trainer.InstructGLMTrainer`, behind
`--labelled_only_logits`); generation and evaluation keep full logits. LoRA dropout on the head
itself (a LoRA-wrapped head with `lora_dropout > 0`) drops other elements here, as the head sees
only the labelled positions: the same loss in expectation, not bit for bit.

Other kernels: `LOSS_BACKENDS` maps a name to `(hidden [N, H], head, targets [N]) -> summed fp32
loss`; "chunked" (plain PyTorch, any head module) is the only one here. Liger's fused linear
cross entropy and Apple's cut-cross-entropy would register there on a GPU; neither is installed
on this project's machines, so neither is wired in. Both take a weight matrix, not a module, so a
LoRA-wrapped head needs its delta merged or the chunked path.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from instructglm.errors import BadValue
from instructglm.train.collator import IGNORE_INDEX

# Tokens per chunk: 512 x 130,528 fp32 logits are 267 MB, big enough for an efficient head matmul.
DEFAULT_CHUNK_SIZE = 512
# Config fields of models that change the logits after the head (soft-capping, scaling): their
# loss is not cross_entropy(head(hidden)), so labelled-only logits would train a different loss.
LOGIT_TRANSFORM_FIELDS = (
    "final_logit_softcapping",
    "logit_scale",
    "logits_scaling",
    "output_multiplier",
    "lm_head_multiplier",
)


def labelled_hidden_states(
    hidden_states: torch.Tensor, labels: torch.LongTensor
) -> tuple[torch.Tensor, torch.LongTensor]:
    """The hidden states that predict a label and their targets: ([N, H], [N]).

    Position i of a row predicts labels[i + 1] (the causal shift); positions whose next label is -100
    and every row's last position predict nothing and are dropped.
    """
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden_states.shape)} do not match labels {tuple(labels.shape)}")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX  # (B, T - 1)
    return hidden_states[:, :-1][keep], targets[keep]


def _chunk_loss(head: nn.Module, hidden: torch.Tensor, targets: torch.LongTensor) -> torch.Tensor:
    logits = head(hidden).float()  # (n, vocab), alive only inside this call
    return F.cross_entropy(logits, targets, reduction="sum")


def chunked_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, targets: torch.LongTensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> torch.Tensor:
    """Summed fp32 cross entropy of `head(hidden)` against `targets`, `chunk_size` rows at a time.

    Each chunk is a non-reentrant checkpoint: its logits are freed after the forward and recomputed
    in backward (dropout included: the RNG state is replayed), so at most one chunk's logits exist.
    Gradients reach `hidden` and every parameter `head` uses. With no rows it returns a zero that is
    still connected to the head's parameters (DDP expects a gradient for each of them).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    if len(hidden) == 0:
        return _chunk_loss(head, hidden, targets)
    total = None
    for start in range(0, len(hidden), chunk_size):
        chunk = checkpoint(
            _chunk_loss, head, hidden[start : start + chunk_size], targets[start : start + chunk_size], use_reentrant=False
        )
        total = chunk if total is None else total + chunk
    return total


LOSS_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {"chunked": chunked_cross_entropy}


def labelled_cross_entropy(
    hidden_states: torch.Tensor,
    labels: torch.LongTensor,
    head: nn.Module,
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "chunked",
) -> torch.Tensor:
    """The causal-LM loss of `head(hidden_states)` against `labels`, with logits only at labelled positions.

    Args:
        hidden_states: [b, T, H], what the model feeds its output head.
        labels: [b, T], -100 where nothing is learned (not shifted: the shift happens here).
        head: the output head module (an `nn.Linear`, a peft LoRA layer, ...).
        num_items_in_batch: divide by this instead of this batch's labelled-token count (the Trainer's
            count over its gradient-accumulation steps).
        chunk_size: labelled tokens per head call.
        backend: a `LOSS_BACKENDS` name.

    Returns:
        The summed fp32 token loss over the labelled-token count (0 labelled tokens: 0, as a tensor
        connected to the head).
    """
    if backend not in LOSS_BACKENDS:
        raise BadValue(f"loss backend {backend!r} is not available here; choose one of {sorted(LOSS_BACKENDS)}")
    hidden, targets = labelled_hidden_states(hidden_states, labels)
    total = LOSS_BACKENDS[backend](hidden, head, targets, chunk_size=chunk_size)
    if num_items_in_batch is None:
        num_items_in_batch = max(len(targets), 1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/DataParallel and peft wrappers."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    if hasattr(model, "get_base_model"):  # peft.PeftModel
        model = model.get_base_model()
    return model


def _config_fields(config: Any) -> dict[str, Any]:
    fields = {name: getattr(config, name, None) for name in LOGIT_TRANSFORM_FIELDS}
    text_config = getattr(config, "text_config", None)
    if text_config is not None and text_config is not config:
        fields.update({f"text_config.{k}": v for k, v in _config_fields(text_config).items()})
    return fields


def check_head_is_last(model: nn.Module) -> None:
    """Refuse models that transform their logits after the output head (see `LOGIT_TRANSFORM_FIELDS`).

    Raises:
        BadValue: naming the config field; labelled-only logits would train a different loss there.
    """
    config = getattr(unwrap_model(model), "config", None)
    found = {name: value for name, value in _config_fields(config).items() if value not in (None, 1, 1.0)}
    if found:
        raise BadValue(
            f"{type(unwrap_model(model)).__name__} changes its logits after the output head ({found}): labelled-only "
            "logits compute cross_entropy(head(hidden)) and would train a different loss; train with full logits"
        )


def labelled_only_loss(
    model: nn.Module,
    batch: Mapping[str, Any],
    num_items_in_batch: int | torch.Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    backend: str = "chunked",
) -> torch.Tensor:
    """`model(**batch).loss` with the output head run only at labelled positions, in chunks.

    `model` is the module the Trainer calls (a transformers causal LM, possibly inside peft and
    DDP wrappers); `batch` holds `labels` and the model's other inputs. The forward runs with
    `use_cache=False` (a cache would also switch off transformers' packed-row detection).

    Raises:
        BadValue: the model changes its logits after the head (`check_head_is_last`).
        ValueError: the batch has no labels, or the model has no output head, or calls it other than
            once on [b, T, H] hidden states.
    """
    if batch.get("labels") is None:
        raise ValueError("labelled_only_loss needs `labels` in the batch")
    check_head_is_last(model)
    head = unwrap_model(model).get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(unwrap_model(model)).__name__} has no output head (get_output_embeddings() is None)")
    captured: list[torch.Tensor] = []

    def keep_hidden_states(module, args, kwargs):
        if captured or not args:
            raise ValueError(f"{type(module).__name__}: expected one call with the hidden states as first argument")
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:]), kwargs  # the model's own logits: zero positions, no cost

    inputs = {name: value for name, value in batch.items() if name != "labels"}
    inputs["use_cache"] = False
    handle = head.register_forward_pre_hook(keep_hidden_states, with_kwargs=True)
    try:
        model(**inputs)
    finally:
        handle.remove()
    if not captured:
        raise ValueError(f"{type(unwrap_model(model)).__name__} never called its output head")
    return labelled_cross_entropy(captured[0], batch["labels"], head, num_items_in_batch, chunk_size, backend)
