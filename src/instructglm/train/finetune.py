"""`instructglm train` (= the seed's `python finetune.py`): LoRA fine-tuning through the HF Trainer.

One GPU (or the CPU, for tiny models):
    instructglm train --dataset_path data/alpaca --lora_rank 8 --per_device_train_batch_size 2 \\
        --max_steps 52000 --save_steps 1000 --save_total_limit 2 --learning_rate 2e-5 --fp16 \\
        --logging_steps 50 --output_dir output
Continue from an adapter (a peft dir or the seed's chatglm-lora.pt):
    ... --output_dir output/belle --is_resume True --resume_path output/alpaca/chatglm-lora.pt
Continue an interrupted run exactly (optimizer, scheduler, RNG, data position):
    ... --resume_from_checkpoint output/checkpoint-1000     (or `last`: the newest complete one in --output_dir;
    with none there, `last` starts a new run and says so; from a checkpoint at --max_steps nothing more is trained
    and its adapter is saved as the final one)
Many GPUs: `torchrun --nproc_per_node N finetune.py ...` (DDP; per-device batch N times over), or
add `--deepspeed configs/ds_zero2.json` (ZeRO-2) / `configs/ds_zero3.json` (ZeRO-3).

The run dir gets the adapter in peft's layout (adapter_config.json, adapter_model.safetensors,
README.md), `chatglm-lora.pt` (the seed's plain state dict of the LoRA tensors), the tokenizer
files, `instructglm_train.json` (hyperparameters, template, data counts and fingerprint, final
metrics), `loss.png` and `checkpoint-<step>` dirs (adapter + tokenizer + optimizer/scheduler/RNG/
trainer state + the run's instructglm_train.json). An --output_dir holding another run is refused
unless --overwrite_output_dir true, and so is an --output_dir that is (or holds) a model; while a run
goes, a second one into its dir is refused (a lock file naming its pid); `--resume_from_checkpoint`
continues only a checkpoint of a run with the same data and flags. A NaN/inf loss or gradient stops the run naming the last checkpoint
with finite weights. The dataset's `seq_len` column is read by the collator, so
`--remove_unused_columns` is always false here, whatever is passed.

The recipe is a chain of phases, each a function that can be called alone (the tests do):
`load_base` -> `load_data` -> `attach_adapter` -> `build_trainer` -> `fit` -> `save_run`;
`finetune` runs them in order, and the CLI (`main`), the demo and the tests call `finetune`.

The model family (`instructglm.models.registry.family_for`, from the model's config and its
tokenizer) decides the LoRA targets, how rows are tokenized and labelled (a jsonl given as
--dataset_path is tokenized by it on the fly), and what `instructglm_train.json` records for
inference: `family`, `chat_format`, `template` and `stop_token_ids`. A dataset tokenized for another
family (a ChatGLM-6B dataset for a ChatGLM3-6B model, say) is refused. Rows with a `labels` column
(the role-token families') are trained on those labels.
"""

from __future__ import annotations

import errno
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from instructglm.data.io import remove_stale_siblings, same_file, umask_modes, write_json
from instructglm.errors import BadValue, MissingDependency, MissingFile, UserError
from instructglm.layout import DATA_META, LOSS_PLOT_FILE, RUN_CONFIG, SEED_ADAPTER_FILE
from instructglm.models.lora import (
    ADAPTER_WEIGHT_FILES,
    SEED_LORA_ALPHA,
    attach_lora,
    load_adapter,
    read_adapter_config,
    seed_state_dict_from_saved,
)
from instructglm.train.args import FinetuneArguments, TrainingArguments, activation_checkpointing
from instructglm.train.callbacks import LossPlotCallback, NonFiniteGuard, RunRecordCallback
from instructglm.train.collator import collator_for
from instructglm.train.trainer import InstructGLMTrainer, check_speed_flags, disk_full, packing_data, trainer_kwargs_for
from instructglm.train.run_dir import (
    RUN_OUTPUTS,
    STAGING_DIR,
    output_dir_lock,
    prepare_output_dir,
    publish_staged_run,
    run_fingerprint,
)

ARGUMENTS = (FinetuneArguments, TrainingArguments)

# Where a run's template came from (`template_source` in instructglm_train.json).
TEMPLATE_SOURCES = ("flag", "convert", "detected", "unknown")


@dataclass
class TrainData:
    """The datasets of a run and what is known about how their prompts were written."""

    train: Any  # a `datasets.Dataset` with input_ids and seq_len
    eval: Any | None
    meta: dict | None  # what tokenize (instructglm_data.json) or convert (<jsonl>.meta.json) recorded
    template: str | None  # the template the prompts were rendered with; None when unknown
    template_source: str  # one of TEMPLATE_SOURCES
    family: Any = None  # the `ModelFamily` the rows were tokenized for


@dataclass
class FinetuneResult:
    output_dir: Path
    metrics: dict[str, Any]
    record: dict[str, Any]  # what instructglm_train.json holds


def finetune(args: FinetuneArguments, training_args: TrainingArguments) -> FinetuneResult:
    """Train a LoRA adapter as `instructglm train` does, and save the run dir; see the module doc.

    Raises:
        UserError subclasses for what the user can fix: missing paths, a refused --output_dir or
        checkpoint, data without the tokenized columns, LoRA mismatches, a diverged run.
    """
    import transformers

    _settle_training_args(training_args)
    _check_paths(args)
    check_speed_flags(args, training_args)
    if args.eval_generate:
        from instructglm.eval.metrics import require_eval_deps

        require_eval_deps()  # before the model loads: a missing extra fails in a second
    _check_output_dir(args, training_args)
    fingerprint = run_fingerprint(args, training_args)
    is_main = training_args.process_index == 0
    # One run per dir for the whole run (the main process holds the lock for all of them).
    with output_dir_lock(training_args.output_dir, take=is_main):
        if is_main:
            remove_stale_temp_files(training_args.output_dir)
        # The main process checks (and, with --overwrite_output_dir, clears) the dir first; the others then see its result.
        with training_args.main_process_first(local=False, desc="checking --output_dir"):
            resume_from = prepare_output_dir(
                training_args.output_dir,
                fingerprint,
                training_args.resume_from_checkpoint,
                overwrite=args.overwrite_output_dir,
                need_optimizer=not training_args.save_only_model,
                is_main_process=is_main,
            )
        if resume_from is not None:
            _check_steps_left(resume_from, training_args, say=is_main)
        # Seed before the adapter is created: LoRA A is randomly initialised, and the Trainer seeds only later.
        transformers.set_seed(training_args.seed)

        model, tokenizer = load_base(args, training_args)
        data = load_data(args, tokenizer, model.config, warn=is_main, generation_config=model.generation_config)
        _settle_training_args(training_args, data)  # before the record, which shows the arguments the run uses
        model = attach_adapter(model, args)
        if training_args.should_log:
            model.print_trainable_parameters()
        record = run_record(args, training_args, model, data, fingerprint, tokenizer)
        trainer = build_trainer(model, tokenizer, data, training_args, record, args)
        result = fit(trainer, resume_from)
        output_dir = save_run(trainer, record, result.metrics)
    return FinetuneResult(output_dir=output_dir, metrics=result.metrics, record={**record, "metrics": result.metrics})


def main(args: FinetuneArguments, training_args: TrainingArguments) -> int:
    result = finetune(args, training_args)
    if training_args.should_save:
        print(
            f"adapter, {SEED_ADAPTER_FILE}, tokenizer, {RUN_CONFIG} and {LOSS_PLOT_FILE} saved in {result.output_dir}",
            flush=True,
        )
    return 0


# ---- phases ----


def load_base(args: FinetuneArguments, training_args: TrainingArguments):
    """The base model (ready for LoRA training: no KV cache, k-bit or checkpointing set up) and its tokenizer."""
    from instructglm.models.loading import load_causal_lm, load_tokenizer, model_config_of
    from instructglm.models.registry import family_for

    tokenizer, model_type = load_tokenizer(args.model_name_or_path)
    # before the weights load: a config and tokenizer of two ChatGLM versions fail here, in a second
    family_for(model_config_of(args.model_name_or_path) or model_type, tokenizer)
    model = load_causal_lm(args.model_name_or_path, **_load_kwargs(args, training_args))
    model.config.use_cache = False  # the KV cache is for generation; with activation checkpointing it only warns
    if args.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=activation_checkpointing(training_args))
    elif activation_checkpointing(training_args):
        # The frozen embeddings give no grad to the checkpointed blocks' inputs; this gives them one.
        model.enable_input_require_grads()
    return model, tokenizer


def load_data(
    args: FinetuneArguments, tokenizer, model_type=None, warn: bool = True, generation_config=None
) -> TrainData:
    """The train (and eval) datasets of `--dataset_path` / `--eval_dataset_path`, and the template they were written in.

    `model_type` is the model's config (or its `model_type`); with the tokenizer it gives the model family,
    which a jsonl is tokenized for and a tokenized dataset must have been tokenized for (`BadValue` if not).
    The template is `--template` if given, else what convert/tokenize recorded beside the data,
    else for a jsonl the registered template every context matches (`detect_template`; a jsonl of
    conversations is `messages`); when none of these tells, it is unknown and one warning line says to pass --template.
    """
    from instructglm.models.registry import family_for

    family = family_for(model_type, tokenizer)
    train, eval_dataset, meta = _load_dataset(
        args.dataset_path, tokenizer, args.max_seq_length, model_type, family, generation_config
    )
    if args.eval_dataset_path:
        eval_dataset, _, _ = _load_dataset(
            args.eval_dataset_path, tokenizer, args.max_seq_length, model_type, family, generation_config, "--eval_dataset_path"
        )
    template, source = _training_template(args, meta)
    if template == "messages" and not family.role_tokens:
        # a text family wrote the conversations with its own round template: record that one, which every
        # text prompt builder (chat, predict, serve) renders as training did
        template = family.chat_format.template
    if source == "unknown" and warn:
        print(
            f"warning: the prompt template of {args.dataset_path} is unknown (nothing recorded beside it by convert or "
            "tokenize, and its prompts match no registered template): pass --template NAME (the one the data was "
            "converted with) so chat, predict and serve build prompts the way this adapter is trained",
            file=sys.stderr,
            flush=True,
        )
    return TrainData(train=train, eval=eval_dataset, meta=meta, template=template, template_source=source, family=family)


def attach_adapter(model, args: FinetuneArguments):
    """`model` wrapped with a fresh LoRA adapter, or with the one at --resume_path (--is_resume), trainable."""
    if not args.is_resume:
        alpha = args.lora_alpha if args.lora_alpha is not None else SEED_LORA_ALPHA
        _check_lora_rank(model, args)
        return attach_lora(model, args.lora_rank, alpha, args.lora_dropout, args.lora_target_modules)
    model = load_adapter(
        model,
        args.resume_path,
        is_trainable=True,
        lora_alpha=args.lora_alpha,
        lora_rank=args.lora_rank,
        lora_target=args.lora_target_modules,
        lora_dropout=args.lora_dropout,
    )
    print(f"continuing from adapter {args.resume_path}", flush=True)
    return model


def _check_lora_rank(model, args: FinetuneArguments) -> None:
    """--lora_rank must not exceed the smallest in/out size of a targeted layer: a larger rank adds no capacity
    (the update's rank is at most that size) and its A and B matrices can exhaust memory on a 6B model.

    Raises:
        BadValue: naming the rank, the narrowest targeted layer and its sizes.
    """
    from peft.tuners.tuners_utils import check_target_module_exists

    from instructglm.models.lora import lora_config

    config = lora_config(getattr(model.config, "model_type", None), args.lora_rank, target=args.lora_target_modules)
    narrowest = None
    for name, module in model.named_modules():
        dims = _linear_dims(module)
        if dims is None or not name:
            continue
        if config.target_modules != "all-linear" and not check_target_module_exists(config, name):
            continue
        if narrowest is None or min(dims) < min(narrowest[1]):
            narrowest = (name, dims)
    if narrowest is not None and args.lora_rank > min(narrowest[1]):
        name, (inputs, outputs) = narrowest
        raise BadValue(
            f"--lora_rank {args.lora_rank} is larger than the targeted layer {name} ({inputs} in, {outputs} out) allows: "
            f"pass --lora_rank <= {min(inputs, outputs)}"
        )


def _linear_dims(module) -> tuple[int, int] | None:
    """(in, out) features of a linear layer (torch's, bitsandbytes', or GPT-2's transposed Conv1D); None otherwise."""
    inputs, outputs = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(inputs, int) and isinstance(outputs, int):
        return inputs, outputs
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:
        return tuple(weight.shape)  # Conv1D stores (in, out)
    return None


def build_trainer(
    model, tokenizer, data: TrainData, training_args: TrainingArguments, record: dict | None = None, args: FinetuneArguments | None = None
):
    """The `InstructGLMTrainer` over `data`: loss plot, non-finite guard, (given `record`) the run record,
    and the speed and evaluation options of `args` (--packing, --labelled_only_logits, --eval_generate)."""
    _settle_training_args(training_args, data)
    args = args if args is not None else FinetuneArguments()
    callbacks = [NonFiniteGuard(check_grads=not training_args.fp16), LossPlotCallback()]
    if record is not None:
        callbacks.append(RunRecordCallback(record))
    # the config object, not its model_type: "chatglm" alone would be ChatGLM-6B's family for every version
    train_dataset, collator = data.train, collator_for(tokenizer, model.config)  # rows with `labels` keep their own
    if args.packing:  # one collator for both: eval rows go through it one row per sequence
        train_dataset, collator = packing_data(data.train, tokenizer, model.config, args.max_seq_length, training_args.seed)
        if training_args.should_log:
            print(f"--packing: {train_dataset.summary()}", flush=True)
    generation_rows = []
    if args.eval_generate and data.eval is not None:
        generation_rows = [data.eval[i] for i in range(min(args.eval_generate, len(data.eval)))]
    return InstructGLMTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=data.eval,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=callbacks,
        generation_rows=generation_rows,
        generation_max_new_tokens=args.eval_max_new_tokens,
        **trainer_kwargs_for(args),
    )


def fit(trainer, resume_from: str | None = None):
    """`trainer.train()`, from the checkpoint `resume_from` if given (its LoRA must be the model's).

    Raises:
        BadValue: a file of `resume_from` holds pickled objects other than tensors (refused, never run).
    """
    if resume_from is None:
        return trainer.train()
    _check_checkpoint_lora(resume_from, trainer.model)
    from instructglm.models.loading import is_unreadable_weights

    try:
        return trainer.train(resume_from_checkpoint=resume_from)
    except Exception as error:
        if not is_unreadable_weights(error):
            raise
        raise BadValue(_unreadable_checkpoint_message(resume_from, error)) from None


def save_run(trainer, record: dict[str, Any], metrics: dict[str, Any] | None = None) -> Path:
    """Save the final adapter, the seed's .pt, the tokenizer and the run record in --output_dir, atomically.

    The adapter is saved by `trainer.save_model`, which gathers the parameters under ZeRO-3 and
    FSDP (every process must call this); the `.pt` is made from the saved file, not from this
    process's (possibly sharded) parameters. Everything is written into a staging dir inside the
    run dir and renamed into place (`run_dir.publish_staged_run`).
    """
    output_dir = Path(trainer.args.output_dir)
    staging = output_dir / STAGING_DIR
    if trainer.args.should_save:
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    try:
        trainer.save_model(str(staging))
        if trainer.args.should_save:
            umask_modes(staging)  # safetensors writes the adapter 0600 whatever the umask
            torch.save(seed_state_dict_from_saved(_saved_adapter_tensors(staging)), staging / SEED_ADAPTER_FILE)
            write_json(staging / RUN_CONFIG, {**record, "metrics": metrics, "eval_metrics": last_eval_metrics(trainer)}, default=str)
            publish_staged_run(staging, output_dir)
    except (OSError, RuntimeError) as error:
        if not trainer.args.should_save or not disk_full(error, output_dir):
            raise
        shutil.rmtree(staging, ignore_errors=True)
        raise OSError(
            errno.ENOSPC,
            "No space left on device while saving the final adapter (the partial save was removed, the checkpoints "
            "are kept: free space, then rerun with --resume_from_checkpoint last to save it)",
            str(output_dir),
        ) from error
    trainer.accelerator.wait_for_everyone()
    return output_dir


def last_eval_metrics(trainer) -> dict[str, Any] | None:
    """The run's last evaluation as logged (eval loss, and --eval_generate's scores): merged from the log entries
    of its final step; None when the run never evaluated."""
    entries = [e for e in trainer.state.log_history if any(k.startswith("eval_") for k in e)]
    if not entries:
        return None
    last_step = entries[-1].get("step")
    merged: dict[str, Any] = {}
    for entry in entries:
        if entry.get("step") == last_step:
            merged.update(entry)
    return merged


def run_record(
    args: FinetuneArguments, training_args: TrainingArguments, model, data: TrainData, fingerprint: dict, tokenizer=None
) -> dict:
    """What `instructglm_train.json` says about a run (its `metrics` are added at the end).

    `family`, `chat_format`, `template` and `stop_token_ids` tell inference how to prompt the adapter:
    a `template` of `messages` means the family's own chat format (`ModelFamily.prompt_ids`), any other
    names the text template a context was written with (`ModelFamily.context_prompt_ids` of its rendering).
    """
    from instructglm.models.registry import family_for

    model_type = getattr(model.config, "model_type", None)
    config = model.peft_config["default"]
    family = data.family or family_for(model.config, tokenizer)
    stop_ids = family.stop_token_ids(tokenizer, getattr(model, "generation_config", None)) if tokenizer is not None else None
    return {
        "template": data.template,
        "template_source": data.template_source,
        "base_model": args.model_name_or_path,
        "model_type": model_type,
        "family": family.name,
        "chat_format": family.chat_format.name,
        "stop_token_ids": stop_ids,
        "lora": {
            "rank": config.r,
            "alpha": config.lora_alpha,
            "dropout": config.lora_dropout,
            "target_modules": _jsonable(config.target_modules),
        },
        "dataset": {
            "path": args.dataset_path,
            "rows": len(data.train),
            "eval_path": args.eval_dataset_path,
            "eval_rows": None if data.eval is None else len(data.eval),
            "meta": data.meta,
        },
        "fingerprint": fingerprint,
        "resumed_from_adapter": args.resume_path if args.is_resume else None,
        "world_size": training_args.world_size,
        "finetune_args": asdict(args),
        "training_args": training_args.to_dict(),
    }


# ---- helpers ----


def _settle_training_args(training_args: TrainingArguments, data: TrainData | None = None) -> None:
    """The TrainingArguments values this recipe needs whatever was passed (and, given `data`, its eval schedule)."""
    from transformers.trainer_utils import IntervalStrategy

    if data is not None and data.eval is not None and training_args.eval_strategy == IntervalStrategy.NO:
        # An eval set was given, so evaluate it (every --eval_steps, default --logging_steps).
        training_args.eval_strategy = IntervalStrategy.STEPS
        training_args.eval_steps = training_args.eval_steps or training_args.logging_steps
    training_args.remove_unused_columns = False  # the collator reads seq_len
    if training_args.label_names is None:
        training_args.label_names = ["labels"]
    if training_args.ddp_find_unused_parameters is None:
        # Only LoRA tensors train and every one of them is used at each step.
        training_args.ddp_find_unused_parameters = False


def _check_output_dir(args: FinetuneArguments, training_args: TrainingArguments) -> None:
    """--output_dir must not be the base model's dir, nor any dir holding a model: the adapter files written
    there would make a plain `from_pretrained` of that model load base + LoRA without a word."""
    output_dir = training_args.output_dir
    if os.path.isdir(args.model_name_or_path) and same_file(output_dir, args.model_name_or_path):
        raise BadValue(
            f"--output_dir {output_dir} is the base model's dir (--model_name_or_path {args.model_name_or_path}): "
            "the adapter would be written into the model; pass another --output_dir"
        )
    held = [name for name in MODEL_WEIGHT_FILES if os.path.exists(os.path.join(output_dir, name))]
    if held and os.path.isfile(os.path.join(output_dir, "config.json")):
        raise BadValue(
            f"--output_dir {output_dir} holds a model (config.json, {held[0]}): the adapter files written there would "
            "turn it into base + LoRA for every loader; pass another --output_dir"
        )


# What marks a dir as a saved model (besides its config.json): transformers' weight files and shard indexes.
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


def remove_stale_temp_files(output_dir: str) -> None:
    """Delete the temp files a killed run left beside the run dir's files (loss.png's, the record's)."""
    if os.path.isdir(output_dir):
        for name in RUN_OUTPUTS:
            remove_stale_siblings(os.path.join(output_dir, name))


def _check_steps_left(checkpoint: str, training_args: TrainingArguments, say: bool = True) -> None:
    """A checkpoint past --max_steps is refused; one at it has nothing left to train (said in one line), and
    the run only re-saves its adapter as the final one."""
    from instructglm.train.run_dir import TRAINER_STATE

    step = json.loads(Path(checkpoint, TRAINER_STATE).read_text(encoding="utf-8"))["global_step"]
    max_steps = training_args.max_steps
    if max_steps > 0 and step > max_steps:
        raise BadValue(
            f"--resume_from_checkpoint {checkpoint} is at step {step}, past --max_steps {max_steps}: pass --max_steps "
            f">= {step} to continue it, or resume an earlier checkpoint-<step>"
        )
    if max_steps > 0 and step == max_steps and say:
        print(
            f"{checkpoint} is at --max_steps {max_steps}: the run is finished, nothing left to train; saving its adapter "
            f"as the final one in {training_args.output_dir}",
            file=sys.stderr,
            flush=True,
        )


def _unreadable_checkpoint_message(checkpoint: str, error: BaseException) -> str:
    """One line naming the checkpoint file that could not be read (refused pickle, truncated file) and the fix."""
    from instructglm.models.loading import unreadable_weights

    culprit = _unreadable_checkpoint_file(Path(checkpoint))
    where = f"{culprit}" if culprit is not None else f"a file of {checkpoint}"
    return (
        f"--resume_from_checkpoint {checkpoint}: {where} was refused, nothing was run: {unreadable_weights(error)}; "
        f"delete {checkpoint} and resume another checkpoint-<step> (or drop the flag to start over)"
    )


def _unreadable_checkpoint_file(checkpoint: Path) -> Path | None:
    """The first weight file of a checkpoint that does not load as the Trainer loads it (a pickle
    `torch.load(weights_only=True)` refuses, a truncated file)."""
    from transformers.trainer import safe_globals

    from instructglm.models.loading import is_unreadable_weights

    from safetensors.torch import load_file

    for path in sorted(checkpoint.iterdir()):
        if path.suffix not in (".pt", ".pth", ".bin", ".safetensors") or not path.is_file():
            continue
        try:
            if path.suffix == ".safetensors":
                load_file(str(path))
                continue
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001  only to name the file; the caller reports the error
            if is_unreadable_weights(error):
                return path
    return None


def _check_paths(args: FinetuneArguments) -> None:
    problems = []
    for flag, path in (("--dataset_path", args.dataset_path), ("--eval_dataset_path", args.eval_dataset_path)):
        if path and not os.path.exists(path):
            problems.append(f"{flag} {path} does not exist (make it with `instructglm tokenize`, or pass a .jsonl)")
    if args.is_resume and args.resume_path and not os.path.exists(args.resume_path):
        problems.append(f"--resume_path {args.resume_path} does not exist (a peft adapter dir or chatglm-lora.pt)")
    if problems:
        raise MissingFile("; ".join(problems))


def _load_kwargs(args: FinetuneArguments, training_args: TrainingArguments) -> dict:
    """`from_pretrained` kwargs: the base in the precision the run computes in (LoRA stays fp32)."""
    dtype = torch.float16 if training_args.fp16 else torch.bfloat16 if training_args.bf16 else torch.float32
    kwargs: dict = {"dtype": dtype}
    if args.quantization_bit:
        if not torch.cuda.is_available():
            raise BadValue(
                f"--quantization_bit {args.quantization_bit} needs a CUDA GPU (bitsandbytes quantizes on the GPU); "
                "on the CPU drop --quantization_bit"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise MissingDependency(
                f"--quantization_bit {args.quantization_bit} needs bitsandbytes: `pip install 'instructglm[gpu]'`, "
                "or drop --quantization_bit"
            )
        from transformers import BitsAndBytesConfig

        if args.quantization_bit == 4:
            compute = dtype if dtype != torch.float32 else torch.bfloat16
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=compute,
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": training_args.device}
    return kwargs


def _load_dataset(
    path: str, tokenizer, max_seq_length: int, model_type, family, generation_config=None, flag: str = "--dataset_path"
):
    """(train, eval-or-None, meta) from a tokenized dataset dir (tokenized for `family`; meta: its
    instructglm_data.json), or a converted .jsonl tokenized now (meta: what tokenize would record of it)."""
    import datasets

    if os.path.isfile(path):
        return _tokenize_on_the_fly(path, tokenizer, max_seq_length, model_type, family, generation_config)
    _check_dataset_family(path, family, flag)
    try:
        loaded = datasets.load_from_disk(path)
    except FileNotFoundError as error:
        raise MissingFile(
            f"--dataset_path {path} holds no saved dataset ({error}); make it with `instructglm tokenize`, or pass the "
            "converted .jsonl"
        ) from error
    eval_dataset = None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise BadValue(f"{path} holds splits {list(loaded)}, none named 'train'")
        eval_dataset = next((loaded[s] for s in ("validation", "eval", "test") if s in loaded), None)
        loaded = loaded["train"]
    missing = {"input_ids", "seq_len"} - set(loaded.column_names)
    if missing:
        raise BadValue(
            f"{path} has columns {loaded.column_names}, missing {sorted(missing)}: "
            "make it with `instructglm tokenize` (or pass the converted .jsonl)"
        )
    if len(loaded) == 0:
        raise BadValue(f"{path} has no rows; re-run `instructglm tokenize` on a non-empty jsonl")
    if family.role_tokens and "labels" not in loaded.column_names:
        raise BadValue(
            f"{flag} {path} has no labels column, which the {family.name} family's rows have: it was tokenized for a "
            "text-prompt model; re-run `instructglm tokenize` with this model's --model_name_or_path"
        )
    return loaded, eval_dataset, _data_meta(path)


def _tokenize_on_the_fly(path: str, tokenizer, max_seq_length: int, model_type, family, generation_config=None):
    """(dataset, None, meta) of a converted jsonl, tokenized as `instructglm tokenize` does: the same meta it
    records (template, counts, `dropped_at`), and the same summary with the file:line of the first dropped rows."""
    from instructglm.data.tokenize import tokenize_with_meta

    dataset, counts, meta = tokenize_with_meta(
        path, tokenizer, max_seq_length, model_type=model_type, generation_config=generation_config
    )
    dropped_at = meta["dropped_at"]
    print(f"{path} tokenized on the fly for the {family.name} family: {counts.summary()}", flush=True)
    for outcome, locations in dropped_at.items():
        more = ", ..." if getattr(counts, outcome) > len(locations) else ""
        print(f"  {outcome}: {getattr(counts, outcome)} (at {', '.join(locations)}{more})", flush=True)
    return dataset, None, meta


def _check_dataset_family(path: str, family, flag: str) -> None:
    """A tokenized dataset must have been tokenized for the run's model family (tokenize records it)."""
    recorded = (_data_meta(path) or {}).get("family")
    if recorded and recorded != family.name:
        raise BadValue(
            f"{flag} {path} was tokenized for the {recorded} family, but the model is {family.name}: its rows are in "
            f"another chat format; re-run `instructglm tokenize` with this model's --model_name_or_path"
        )


def _data_meta(dataset_path: str) -> dict | None:
    """What `tokenize` (instructglm_data.json) or `convert` (<jsonl>.meta.json, if it still matches) recorded about the data."""
    if not os.path.isdir(dataset_path):
        from instructglm.data.tokenize import read_convert_meta

        return read_convert_meta(dataset_path)  # ignores, with a warning, a sidecar of another version of the file
    candidate = os.path.join(dataset_path, DATA_META)
    if os.path.isfile(candidate):
        with open(candidate, encoding="utf-8") as f:
            try:
                meta = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                print(f"warning: {candidate} is not valid JSON ({error}); ignoring it", file=sys.stderr)
                return None
        return meta if isinstance(meta, dict) else None
    return None


def _training_template(args: FinetuneArguments, meta: dict | None) -> tuple[str | None, str]:
    """(template, where it came from): --template, the data's record, detection on a jsonl's contexts, or unknown."""
    from instructglm.data.templates import detect_template, get_template

    if args.template:
        try:
            get_template(args.template)  # a bad name fails now, not at the first chat
        except UserError:
            raise
        except ValueError as error:
            raise BadValue(str(error)) from error
        return args.template, "flag"
    name = (meta or {}).get("template")
    if name and name != "unknown":
        # tokenize records where its template came from; convert's sidecar is itself the convert record
        return name, meta.get("template_source") or "convert"
    if os.path.isfile(args.dataset_path):
        from instructglm.data.templates import MESSAGES
        from instructglm.data.tokenize import read_jsonl_rows

        rows = read_jsonl_rows(args.dataset_path)
        detected = MESSAGES if rows.conversations is not None else detect_template(rows.contexts)
        if detected is not None:
            return detected, "detected"
    return None, "unknown"


def _check_checkpoint_lora(checkpoint: str, model) -> None:
    """The checkpoint's adapter must be the one the run built (rank, alpha, targets), else a one-line error."""
    saved = read_adapter_config(checkpoint)
    config = model.peft_config["default"]
    pairs = (
        ("--lora_rank", saved.r, config.r),
        ("--lora_alpha", saved.lora_alpha, config.lora_alpha),
        ("--lora_target", _jsonable(saved.target_modules), _jsonable(config.target_modules)),
    )
    differences = [f"{flag} {was} there, {now} here" for flag, was, now in pairs if was != now]
    if differences:
        raise BadValue(
            f"--resume_from_checkpoint {checkpoint}: its adapter differs from this run's ({'; '.join(differences)}); "
            "pass the checkpoint's values, or start a new run with --overwrite_output_dir true or another --output_dir"
        )


def _saved_adapter_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    safetensors_file, bin_file = (path / name for name in ADAPTER_WEIGHT_FILES)
    if safetensors_file.is_file():
        return load_file(str(safetensors_file))
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise MissingFile(f"the Trainer saved no adapter weights in {path} (no {' or '.join(ADAPTER_WEIGHT_FILES)})")


def _jsonable(value):
    return sorted(value) if isinstance(value, (set, frozenset, list, tuple)) else value

