"""The speed and memory options of `instructglm train`: `--packing` and `--labelled_only_logits`.

Both change how a step is computed, never what it computes: each row's loss and gradients stay
those of the plain padded, full-logits step (the tests hold them to 1e-5 in float32).

- `--packing` (`packing_data`): the tokenized rows are regrouped into packs of up to
  `--max_seq_length` tokens (`instructglm.train.packing`: first-fit decreasing in shuffled windows,
  no row cut, the same packs on every rank and on every resume), each row isolated by its model's
  block-diagonal mask and restarting positions; `--per_device_train_batch_size` then counts packs.
  The loss stays the mean over all labelled tokens of the step, so no row's weight changes.
  Evaluation rows go through the same collator one row per sequence, so the eval loss is the
  padded one.
- `--labelled_only_logits` (`InstructGLMTrainer`): in training, the output head and the
  cross entropy run only at labelled positions, a chunk at a time (`loss.labelled_only_loss`),
  so the [batch, seq, vocab] logits never exist; evaluation, prediction and generation keep the
  model's full logits. The loss is normalised exactly as `Trainer.compute_loss` normalises the
  model's own (by `num_items_in_batch` when the model takes loss kwargs, times the number of
  processes under `average_tokens_across_devices`), so gradient accumulation and DDP are unchanged.
  (One exception to bitwise equality: LoRA dropout on the output head itself, e.g. `--lora_target
  all-linear` on a model whose head is a target, drops other elements, as the head sees only the
  labelled positions; the loss is the same in expectation.)

`finetune.py` wires them in (`SpeedArguments` are the flags; `check_speed_flags` refuses the
combinations that cannot work, naming the flag).
"""

from __future__ import annotations

import errno
import shutil
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transformers import Trainer
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from instructglm.data.io import umask_modes
from instructglm.errors import BadValue
from instructglm.train.callbacks import NonFiniteGuard
from instructglm.train.loss import DEFAULT_CHUNK_SIZE, labelled_only_loss
from instructglm.train.packing import DEFAULT_WINDOW, PackedCollator, PackedDataset, packed_collator_for


@dataclass
class SpeedArguments:
    """Flags of `instructglm train` that make a step faster or smaller without changing its result."""

    packing: bool = field(
        default=False,
        metadata={
            "help": "Pack whole tokenized rows into sequences of up to --max_seq_length tokens (no row is cut), each "
            "row isolated by block-diagonal attention with positions restarting; --per_device_train_batch_size then "
            "counts packed sequences. Same per-row loss and gradients, far less padding."
        },
    )
    labelled_only_logits: bool = field(
        default=False,
        metadata={
            "help": "In training, compute the output head and the cross entropy only at labelled positions, in "
            "chunks of --logits_chunk_size tokens: the same loss and gradients without the [batch, seq, vocab] "
            "logits (ChatGLM's vocabulary makes them the largest tensor of a step). Evaluation keeps full logits."
        },
    )
    logits_chunk_size: int = field(
        default=DEFAULT_CHUNK_SIZE,
        metadata={"help": "Labelled tokens per output-head call with --labelled_only_logits (smaller: less memory)."},
    )

    def __post_init__(self) -> None:
        if self.logits_chunk_size < 1:
            raise BadValue(f"--logits_chunk_size must be >= 1, got {self.logits_chunk_size}")


def check_speed_flags(speed: Any, training_args) -> None:
    """Refuse flag combinations that cannot work together, all at once, naming each flag.

    `speed` is a `SpeedArguments` (or any object with its fields, e.g. `FinetuneArguments` holding them).

    Raises:
        BadValue: `--packing` with `--train_sampling_strategy group_by_length` (or `batch_rebalance`: packs
            have no row length to sort by), or
            `--labelled_only_logits` with `--label_smoothing_factor` (the chunked loss has no smoothing).
    """
    problems = []
    sampler = getattr(training_args, "train_sampling_strategy", "random")
    if speed.packing and sampler in ("group_by_length", "batch_rebalance"):
        problems.append(
            f"--packing fills every sequence already; drop --train_sampling_strategy {sampler} (it needs unpacked rows)"
        )
    if speed.labelled_only_logits and training_args.label_smoothing_factor:
        problems.append(
            f"--labelled_only_logits computes the plain cross entropy; drop --label_smoothing_factor "
            f"{training_args.label_smoothing_factor} or --labelled_only_logits"
        )
    if problems:
        raise BadValue("invalid train flags: " + "; ".join(problems))


def packing_data(
    train_dataset: Any,
    tokenizer,
    model_type: Any,
    max_seq_length: int,
    seed: int,
    window: int = DEFAULT_WINDOW,
) -> tuple[PackedDataset, PackedCollator]:
    """The packed train dataset and the collator for packed (and single) rows, for `--packing`.

    Args:
        train_dataset: the tokenized rows (`input_ids`, `seq_len` or `labels`), a `datasets.Dataset` or a list.
        tokenizer: gives the pad id.
        model_type: the model's config (preferred: its family and attention backend are read from it) or its
            `config.model_type`.
        max_seq_length: the most tokens one pack holds (`--max_seq_length`).
        seed: `--seed`: the same packs on every rank and on every resume.
        window: rows per first-fit-decreasing window.

    Returns:
        (PackedDataset, PackedCollator); the collator also takes single rows (the eval set's).

    Raises:
        BadValue: the model's family cannot keep packed rows apart, or a row is longer than `max_seq_length`.
    """
    collator = packed_collator_for(tokenizer, model_type, max_seq_length=max_seq_length)
    implementation = str(getattr(model_type, "_attn_implementation", None) or "")
    if collator.attention == "position_ids" and implementation.startswith("flash_attention"):
        # transformers' flash-attention path finds the rows of a batch of several packs only from these
        collator.flash_attention_kwargs = True
    return PackedDataset(train_dataset, max_seq_length, seed=seed, window=window), collator


class InstructGLMTrainer(Trainer):
    """transformers' `Trainer` with the two options `instructglm train` adds to a step and an evaluation.

    - `labelled_only_logits` (`--labelled_only_logits`): the training loss computes logits only at
      labelled positions. Evaluation and prediction (`return_outputs=True`, or the model in eval mode)
      go through `Trainer.compute_loss` and the model's full logits; so do label smoothing and a
      `compute_loss_func`, which `check_speed_flags` refuses together with this flag.
    - `generation_rows` (`--eval_generate N`): at each evaluation, also answer these tokenized eval
      rows greedily and log BLEU-4 / ROUGE-1/2/L and exact match beside the eval loss (`eval_bleu-4`, ...).
    """

    def __init__(
        self,
        *args,
        labelled_only_logits: bool = False,
        logits_chunk_size: int = DEFAULT_CHUNK_SIZE,
        generation_rows: Sequence[dict] = (),
        generation_max_new_tokens: int = 128,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        if labelled_only_logits and self.args.n_gpu > 1:
            raise BadValue(
                "--labelled_only_logits does not run under torch.nn.DataParallel (several GPUs in one process): "
                "launch one process per GPU with `torchrun --nproc_per_node N` (DDP), or drop --labelled_only_logits"
            )
        self.labelled_only_logits = labelled_only_logits
        self.logits_chunk_size = logits_chunk_size
        self.generation_rows = list(generation_rows)
        self.generation_max_new_tokens = generation_max_new_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        plain = (
            not self.labelled_only_logits
            or return_outputs
            or not model.training
            or inputs.get("labels") is None
            or self.label_smoother is not None
            or self.compute_loss_func is not None
        )
        if plain:
            return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        # Trainer.compute_loss hands num_items_in_batch to the model only when it takes loss kwargs; the same here,
        # so that training_step's gradient-accumulation scaling stays right
        counted = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss = labelled_only_loss(model, inputs, num_items_in_batch=counted, chunk_size=self.logits_chunk_size)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = loss * self._loss_scale_across_devices()
        return loss

    def _run_epoch(self, *args, **kwargs):
        # A run resumed from the checkpoint at its --max_steps (killed before the final save, or rerun when
        # finished) has nothing left to train; transformers would still run one more step before checking.
        if 0 < self.state.max_steps <= self.state.global_step:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _get_grad_norm(self, model, grad_norm=None):
        # The pre-clip norm, handed to the non-finite guard: clipping by an inf norm zeroes every finite
        # gradient, so after it the gradients look finite while Adam's moments still move the weights.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, NonFiniteGuard):
                callback.record_grad_norm(grad_norm)
        return grad_norm

    def _save_checkpoint(self, model, trial) -> None:
        checkpoint = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        try:
            super()._save_checkpoint(model, trial)
        except (OSError, RuntimeError) as error:
            if not self.args.should_save or not disk_full(error, checkpoint):
                raise
            # a partial checkpoint would hold the space the next save needs, and `last` skips it anyway
            shutil.rmtree(checkpoint, ignore_errors=True)
            raise OSError(
                errno.ENOSPC,
                f"No space left on device while saving checkpoint-{self.state.global_step} (the partial checkpoint "
                "was removed; free space or pass another --output_dir, then resume with --resume_from_checkpoint last)",
                str(checkpoint.parent),
            ) from error
        if self.args.should_save and checkpoint.is_dir():
            umask_modes(checkpoint)  # safetensors writes the adapter 0600 whatever the umask

    def _loss_scale_across_devices(self) -> int:
        """What `Trainer.compute_loss` multiplies a loss normalised over every device's tokens by."""
        processes = self.accelerator.num_processes
        if hasattr(self, "get_tp_size"):  # transformers >= 5.2x
            processes //= self.get_tp_size()
        elif (config := getattr(self.accelerator, "parallelism_config", None)) is not None:
            processes //= config.tp_size
        return processes if self.args.n_gpu <= 1 else self.args.n_gpu

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        metrics = super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
        if self.generation_rows and eval_dataset is None:
            scores = generation_scores(self.model, self.processing_class, self.generation_rows, self.generation_max_new_tokens)
            generated = {f"{metric_key_prefix}_{name}": value for name, value in scores.items()}
            self.log(generated)
            metrics.update(generated)
        return metrics


def disk_full(error: BaseException, directory: Path) -> bool:
    """Whether a failed save failed for want of space: ENOSPC/EDQUOT, or torch's stream error (it names no
    errno: `basic_ios::clear: iostream error`, `PytorchStreamWriter failed writing`) on a nearly full disk."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(error)
    if "No space left" in text:
        return True
    if "iostream error" not in text and "failed writing" not in text:
        return False
    try:
        usage = shutil.disk_usage(directory.parent if not directory.exists() else directory)
    except OSError:
        return False
    return usage.free < max(NEARLY_FULL_BYTES, usage.total // 100)


NEARLY_FULL_BYTES = 64 << 20  # a stream error with less free than this (or 1% of the disk) is a full disk


GENERATION_METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match")


def generation_scores(model: Any, tokenizer: Any, rows: Sequence[dict], max_new_tokens: int = 128) -> dict[str, float]:
    """Greedy answers to tokenized rows, scored against their labelled answer as `instructglm eval` scores.

    A row's prompt is its ids before the first labelled token; its reference is the first run of
    labelled tokens (the answer; for a multi-turn row its first assistant turn), stop tokens left
    out. Generation goes through the inference engine from those ids, so every family's prompt
    layout is the one it was trained with. The model is put in eval mode for it and back after.
    """
    import torch

    from instructglm.eval.metrics import score_predictions
    from instructglm.infer.engine import BatchEngine, GenerationRequest, generate_requests
    from instructglm.models.registry import family_for
    from instructglm.train.collator import IGNORE_INDEX

    base = model.module if hasattr(model, "module") else model  # DDP wraps the model it trains
    stops = set(family_for(base.config, tokenizer).stop_token_ids(tokenizer, getattr(base, "generation_config", None)))
    prompts, references = [], []
    for row in rows:
        ids = list(row["input_ids"])
        if row.get("labels") is not None:
            labels = list(row["labels"])
        else:
            labels = [IGNORE_INDEX] * int(row["seq_len"]) + ids[int(row["seq_len"]) :]
        start = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), len(ids))
        end = next((i for i in range(start, len(labels)) if labels[i] == IGNORE_INDEX), len(labels))
        prompts.append(ids[: max(start, 1)])
        references.append(tokenizer.decode([t for t in ids[start:end] if t not in stops], skip_special_tokens=True).strip())
    was_training = base.training
    base.eval()
    try:
        with torch.inference_mode():
            engine = BatchEngine(base, tokenizer, max_batch_size=8, max_queue=None, decode="dynamic", stop_ids=stops or None)
            handles = generate_requests(engine, [GenerationRequest(tuple(p), max_new_tokens) for p in prompts])
    finally:
        base.train(was_training)
    answers = [(h.completion.text if h.completion is not None else "").strip() for h in handles]
    corpus, _ = score_predictions(answers, references)
    return {name: corpus[name] for name in GENERATION_METRICS}


def trainer_kwargs_for(speed: Any) -> dict[str, Any]:
    """`InstructGLMTrainer`'s step options from the run's flags (`SpeedArguments` fields)."""
    return {"labelled_only_logits": speed.labelled_only_logits, "logits_chunk_size": speed.logits_chunk_size}


__all__ = [
    "InstructGLMTrainer",
    "SpeedArguments",
    "check_speed_flags",
    "disk_full",
    "generation_scores",
    "packing_data",
    "trainer_kwargs_for",
]
