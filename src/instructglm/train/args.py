"""Flags of `instructglm train` (and the seed's `finetune.py`).

`FinetuneArguments` holds what is ours: data, base model, LoRA and resume options. Everything
else is transformers' `TrainingArguments`, parsed beside it, so every HF flag (`--bf16`,
`--gradient_checkpointing`, `--deepspeed`, `--report_to`, `--resume_from_checkpoint`, ...) passes
through unchanged. `TrainingArguments` here is the HF class with checks run before its own: batch
sizes, steps, epochs and the learning rate in range (one error naming each bad flag), `--deepspeed`
without DeepSpeed installed (an error naming the fix), `--fp16` or `--bf16` on a machine without a
GPU (fp32 with a warning), torchrun on a machine without CUDA (DDP over gloo on the CPU), and
`--fsdp` there (accelerate shards only on accelerators: a warning that the run is DDP).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from dataclasses import dataclass, field

import torch
import transformers

from instructglm.errors import BadValue, MissingDependency
from instructglm.train.trainer import SpeedArguments


@dataclass
class FinetuneArguments(SpeedArguments):  # --packing, --labelled_only_logits, --logits_chunk_size
    dataset_path: str = field(
        default="data/alpaca",
        metadata={"help": "Tokenized dataset dir from `instructglm tokenize`, or a converted .jsonl tokenized on the fly."},
    )
    model_name_or_path: str = field(
        default="THUDM/chatglm-6b",
        metadata={"help": "Base model: a hub name or a local dir in the hub layout (any causal LM transformers loads)."},
    )
    eval_dataset_path: str | None = field(
        default=None,
        metadata={"help": "Optional held-out set (same formats as --dataset_path); its loss is logged and plotted."},
    )
    lora_rank: int = field(default=8, metadata={"help": "LoRA rank r (higher: more capacity and memory)."})
    lora_alpha: int | None = field(
        default=None,
        metadata={
            "help": "LoRA alpha; the update is scaled by alpha / rank. Default: 32 for a new adapter; with --is_resume, "
            "the adapter's own (a peft dir's config, or the instructglm_train.json beside a .pt, else the seed's 32)."
        },
    )
    lora_dropout: float = field(default=0.1, metadata={"help": "Dropout on the LoRA input during training."})
    lora_target: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names to wrap with LoRA, or 'all-linear'. Default: the model family's "
            "(query_key_value for ChatGLM-6B/2/3; peft's table for other architectures, else all-linear, as for GLM-4)."
        },
    )
    is_resume: bool = field(
        default=False, metadata={"help": "Start from an existing adapter (--resume_path) instead of a fresh one."}
    )
    resume_path: str | None = field(
        default=None,
        metadata={"help": "Adapter to start from with --is_resume: a peft dir or a seed chatglm-lora.pt state dict."},
    )
    max_seq_length: int = field(
        default=512, metadata={"help": "Token limit per row when a .jsonl is tokenized on the fly (longer rows are dropped)."}
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": "Template name saved with the adapter for inference (`messages`: the model family's own chat "
            "format). Default: the dataset's (instructglm_data.json or the .jsonl's .meta.json)."
        },
    )
    quantization_bit: int | None = field(
        default=None, metadata={"help": "Load the base model in 4 or 8 bits (QLoRA through bitsandbytes; CUDA only)."}
    )
    eval_generate: int = field(
        default=0,
        metadata={
            "help": "At each evaluation, also answer the first N rows of the eval set greedily and log BLEU-4, "
            "ROUGE-1/2/L and exact match beside the eval loss (needs --eval_dataset_path and the `eval` extra)."
        },
    )
    eval_max_new_tokens: int = field(default=128, metadata={"help": "Answer length limit for --eval_generate, in tokens."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start a new run in an --output_dir that holds another run: its checkpoints and adapter files are "
            "removed first (other files stay). Without it such a dir is refused; --resume_from_checkpoint continues it."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        problems = []
        if self.eval_generate < 0 or self.eval_max_new_tokens < 1:
            problems.append(
                f"--eval_generate must be >= 0 and --eval_max_new_tokens >= 1, got {self.eval_generate} and {self.eval_max_new_tokens}"
            )
        if self.eval_generate and not self.eval_dataset_path:
            problems.append("--eval_generate needs --eval_dataset_path (the rows it answers)")
        if self.is_resume and not self.resume_path:
            problems.append("--is_resume True needs --resume_path (a peft adapter dir or a chatglm-lora.pt file)")
        if self.quantization_bit not in (None, 4, 8):
            problems.append(f"--quantization_bit must be 4 or 8, got {self.quantization_bit}")
        if self.lora_alpha is not None and self.lora_alpha <= 0:
            problems.append(f"--lora_alpha must be > 0, got {self.lora_alpha}")
        if self.lora_rank < 1:
            problems.append(f"--lora_rank must be >= 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            problems.append(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.max_seq_length < 2:
            problems.append(f"--max_seq_length must be >= 2, got {self.max_seq_length}")
        if problems:
            raise BadValue("invalid train flags: " + "; ".join(problems))

    @property
    def lora_target_modules(self) -> list[str] | str | None:
        """--lora_target as peft wants it: a list of names, 'all-linear', or None (family default)."""
        if not self.lora_target:
            return None
        names = [name.strip() for name in self.lora_target.split(",") if name.strip()]
        return "all-linear" if names == ["all-linear"] else names


def activation_checkpointing(training_args) -> bool:
    """Whether the run recomputes activations: `activation_checkpointing` where transformers has it, else the old name."""
    return bool(getattr(training_args, "activation_checkpointing", None) or training_args.gradient_checkpointing)


class TrainingArguments(transformers.TrainingArguments):
    """transformers' `TrainingArguments`, with early checks that name the flag to change."""

    def __post_init__(self) -> None:
        _check_schedule_flags(self)
        if self.deepspeed and importlib.util.find_spec("deepspeed") is None:
            raise MissingDependency(
                f"--deepspeed {self.deepspeed} needs DeepSpeed, which is not installed: `pip install 'instructglm[gpu]'` "
                "on a CUDA machine, or drop --deepspeed (plain DDP through torchrun needs nothing extra)"
            )
        # fp16 autocast needs CUDA; falling back keeps the seed's command lines (which all pass --fp16) runnable
        # for a CPU smoke test, and the warning says the run is fp32.
        if self.fp16 and not torch.cuda.is_available():
            print(
                "warning: --fp16 needs a CUDA GPU and none is available: training in fp32 on the CPU instead "
                "(drop --fp16 to silence this)",
                file=sys.stderr,
                flush=True,
            )
            self.fp16 = False
        # Under torchrun on a machine without CUDA, accelerate sets up DDP (gloo) only when told it runs on
        # the CPU; otherwise every process would silently train its own copy and race on the output files.
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available():
            self.use_cpu = True
        # transformers refuses --bf16 without a bf16 accelerator unless told the run is on the CPU; like --fp16,
        # the README's command lines then run in fp32 with one warning instead of a traceback.
        if self.bf16 and not self.use_cpu and not torch.cuda.is_available() and not _mps_available():
            print(
                "warning: --bf16 needs a GPU and none is available: training in fp32 on the CPU instead "
                "(drop --bf16 to silence this)",
                file=sys.stderr,
                flush=True,
            )
            self.bf16 = False
        # The seed's and our README's --gradient_checkpointing is, from transformers 5.2x on, the deprecated alias
        # of --activation_checkpointing: take it as the new name there, so it works without a FutureWarning
        # (older 5.x have only the old name, which is then the one used).
        for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                         ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
            if hasattr(self, new) and getattr(self, new) is None and getattr(self, old) is not None:
                setattr(self, new, getattr(self, old))
        if self.fsdp and str(self.fsdp).lower() not in ("false", "[]") and not torch.cuda.is_available():
            # accelerate builds its FSDP plugin only for accelerator back ends; on the CPU the Trainer
            # silently wraps the model in DDP instead. Same results, no sharding: say so.
            print(
                f"warning: --fsdp {self.fsdp} shards only on GPUs and none is available: the processes train with "
                "plain DDP on the CPU instead (same results, every process holds the whole model)",
                file=sys.stderr,
                flush=True,
            )
        super().__post_init__()


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def _check_schedule_flags(args) -> None:
    """Refuse the batch, step and learning-rate values transformers takes and then trains wrongly or crashes on.

    Raises:
        BadValue: naming every bad flag at once (batch size or accumulation < 1, a learning rate that is not
            a finite number >= 0, --max_steps 0 or below -1, --num_train_epochs <= 0 without --max_steps).
    """
    problems = []
    for flag in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        value = getattr(args, flag)
        if value < 1:
            problems.append(f"--{flag} must be >= 1, got {value}")
    if not (math.isfinite(args.learning_rate) and args.learning_rate >= 0):  # 0: a run that keeps its adapter
        problems.append(f"--learning_rate must be a finite number >= 0, got {args.learning_rate}")
    if args.max_steps == 0 or args.max_steps < -1:
        problems.append(f"--max_steps must be >= 1 (or -1: train --num_train_epochs epochs), got {args.max_steps}")
    elif args.max_steps == -1 and not (math.isfinite(args.num_train_epochs) and args.num_train_epochs > 0):
        problems.append(f"--num_train_epochs must be > 0 when --max_steps is not set, got {args.num_train_epochs}")
    if problems:
        raise BadValue("invalid train flags: " + "; ".join(problems))
