"""`instructglm train` (= the seed's `python finetune.py`): LoRA fine-tuning through the HF Trainer.

One GPU (or the CPU, for tiny models):
    instructglm train --dataset_path data/alpaca --lora_rank 8 --per_device_train_batch_size 2 \\
        --max_steps 52000 --save_steps 1000 --save_total_limit 2 --learning_rate 2e-5 --fp16 \\
        --logging_steps 50 --output_dir output
Continue from an adapter (a peft dir or the seed's chatglm-lora.pt):
    ... --output_dir output/belle --is_resume True --resume_path output/alpaca/chatglm-lora.pt
Continue an interrupted run exactly (optimizer, scheduler, RNG, data position):
    ... --resume_from_checkpoint output/checkpoint-1000     (or `last`: the newest in --output_dir)
Many GPUs: `torchrun --nproc_per_node N finetune.py ...` (DDP; per-device batch N times over), or
add `--deepspeed configs/ds_zero2.json` (ZeRO-2) / `configs/ds_zero3.json` (ZeRO-3).

The run dir gets the adapter in peft's layout (adapter_config.json, adapter_model.safetensors,
README.md), `chatglm-lora.pt` (the seed's plain state dict of the LoRA tensors), the tokenizer
files, `instructglm_train.json` (hyperparameters, template, data counts, final metrics), `loss.png`
and `checkpoint-<step>` dirs (adapter + tokenizer + optimizer/scheduler/RNG/trainer state).
The dataset's `seq_len` column is read by the collator, so `--remove_unused_columns` is always
false here, whatever is passed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from dataclasses import asdict

import torch

from instructglm.data.io import write_json
from instructglm.layout import DATA_META, LOSS_PLOT_FILE, RUN_CONFIG, SEED_ADAPTER_FILE, jsonl_meta_path
from instructglm.train.args import FinetuneArguments, TrainingArguments
from instructglm.train.callbacks import LossPlotCallback, NonFiniteLossGuard
from instructglm.train.collator import collator_for
from instructglm.train.lora import attach_lora, load_adapter, seed_state_dict

ARGUMENTS = (FinetuneArguments, TrainingArguments)


def main(args: FinetuneArguments, training_args: TrainingArguments) -> int:
    import transformers
    from transformers import Trainer
    from transformers.trainer_utils import IntervalStrategy

    from instructglm.models.loading import load_causal_lm, load_tokenizer
    from instructglm.models.registry import family_for

    _check_paths(args)
    training_args.remove_unused_columns = False
    if training_args.label_names is None:
        training_args.label_names = ["labels"]
    if training_args.ddp_find_unused_parameters is None:
        # Only LoRA tensors train and every one of them is used at each step.
        training_args.ddp_find_unused_parameters = False
    # Seed before the adapter is created: LoRA A is randomly initialised, and the Trainer seeds only later.
    transformers.set_seed(training_args.seed)

    # Model and tokenizer.
    tokenizer, _ = load_tokenizer(args.model_name_or_path)
    model = load_causal_lm(args.model_name_or_path, **_load_kwargs(args, training_args))
    model.config.use_cache = False  # the KV cache is for generation; with gradient checkpointing it only warns
    model_type = getattr(model.config, "model_type", None)
    family = family_for(model_type)
    if args.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=training_args.gradient_checkpointing)
    elif training_args.gradient_checkpointing:
        # The frozen embeddings give no grad to the checkpointed blocks' inputs; this gives them one.
        model.enable_input_require_grads()

    # Data.
    train_dataset, eval_dataset = _load_data(args.dataset_path, tokenizer, args.max_seq_length, model_type)
    if args.eval_dataset_path:
        eval_dataset, _ = _load_data(args.eval_dataset_path, tokenizer, args.max_seq_length, model_type)

    # Adapter: fresh, or continued from an earlier run's.
    if args.is_resume:
        model = load_adapter(
            model,
            args.resume_path,
            is_trainable=True,
            lora_alpha=args.lora_alpha if not os.path.isdir(args.resume_path) else None,
            lora_rank=args.lora_rank,
            lora_target=args.lora_target_modules,
            lora_dropout=args.lora_dropout,
        )
        print(f"continuing from adapter {args.resume_path}", flush=True)
    else:
        model = attach_lora(model, args.lora_rank, args.lora_alpha, args.lora_dropout, args.lora_target_modules)
    if training_args.should_log:
        model.print_trainable_parameters()

    # Train.
    if eval_dataset is not None and training_args.eval_strategy == IntervalStrategy.NO:
        # An eval set was given, so evaluate it (every --eval_steps, default --logging_steps).
        training_args.eval_strategy = IntervalStrategy.STEPS
        training_args.eval_steps = training_args.eval_steps or training_args.logging_steps
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=collator_for(tokenizer, model_type),
        processing_class=tokenizer,
        callbacks=[NonFiniteLossGuard(), LossPlotCallback()],
    )
    resume = training_args.resume_from_checkpoint
    if resume is not None and resume.lower() in ("last", "true"):
        resume = True  # the Trainer takes the newest checkpoint-* in --output_dir
    result = trainer.train(resume_from_checkpoint=resume)

    # Save the final adapter, the seed's .pt, the tokenizer and what the run was.
    if training_args.should_save:
        output_dir = training_args.output_dir
        model.save_pretrained(output_dir)
        torch.save(seed_state_dict(model), os.path.join(output_dir, SEED_ADAPTER_FILE))
        tokenizer.save_pretrained(output_dir)
        data_meta = _data_meta(args.dataset_path)
        run = {
            "template": args.template or (data_meta or {}).get("template") or family.chat_template,
            "base_model": args.model_name_or_path,
            "model_type": model_type,
            "family": family.name,
            "lora": {
                "rank": model.peft_config["default"].r,
                "alpha": model.peft_config["default"].lora_alpha,
                "dropout": model.peft_config["default"].lora_dropout,
                "target_modules": _jsonable(model.peft_config["default"].target_modules),
            },
            "dataset": {
                "path": args.dataset_path,
                "rows": len(train_dataset),
                "eval_path": args.eval_dataset_path,
                "eval_rows": None if eval_dataset is None else len(eval_dataset),
                "meta": data_meta,
            },
            "resumed_from_adapter": args.resume_path if args.is_resume else None,
            "world_size": training_args.world_size,
            "metrics": result.metrics,
            "finetune_args": asdict(args),
            "training_args": training_args.to_dict(),
        }
        write_json(os.path.join(output_dir, RUN_CONFIG), run, default=str)
        print(f"adapter, {SEED_ADAPTER_FILE}, tokenizer, {RUN_CONFIG} and {LOSS_PLOT_FILE} saved in {output_dir}", flush=True)
    return 0


def _check_paths(args: FinetuneArguments) -> None:
    problems = []
    for flag, path in (("--dataset_path", args.dataset_path), ("--eval_dataset_path", args.eval_dataset_path)):
        if path and not os.path.exists(path):
            problems.append(f"{flag} {path} does not exist (make it with `instructglm tokenize`, or pass a .jsonl)")
    if args.is_resume and args.resume_path and not os.path.exists(args.resume_path):
        problems.append(f"--resume_path {args.resume_path} does not exist (a peft adapter dir or chatglm-lora.pt)")
    if problems:
        raise FileNotFoundError("\n".join(problems))


def _load_kwargs(args: FinetuneArguments, training_args: TrainingArguments) -> dict:
    """`from_pretrained` kwargs: the base in the precision the run computes in (LoRA stays fp32)."""
    dtype = torch.float16 if training_args.fp16 else torch.bfloat16 if training_args.bf16 else torch.float32
    kwargs: dict = {"dtype": dtype}
    if args.quantization_bit:
        if not torch.cuda.is_available():
            raise ValueError(
                f"--quantization_bit {args.quantization_bit} needs a CUDA GPU (bitsandbytes quantizes on the GPU); "
                "on the CPU drop --quantization_bit"
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ImportError(
                f"--quantization_bit {args.quantization_bit} needs bitsandbytes: `pip install bitsandbytes`, "
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


def _load_data(path: str, tokenizer, max_seq_length: int, model_type: str | None):
    """(train, eval-or-None) from a tokenized dataset dir, or a converted .jsonl tokenized now."""
    import datasets

    if os.path.isfile(path):
        from instructglm.data.tokenize import tokenize_dataset

        dataset, counts = tokenize_dataset(path, tokenizer, max_seq_length, model_type=model_type)
        print(f"{path} tokenized on the fly: {counts.summary()}", flush=True)
        return dataset, None
    loaded = datasets.load_from_disk(path)
    eval_dataset = None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise ValueError(f"{path} holds splits {list(loaded)}, none named 'train'")
        eval_dataset = next((loaded[s] for s in ("validation", "eval", "test") if s in loaded), None)
        loaded = loaded["train"]
    missing = {"input_ids", "seq_len"} - set(loaded.column_names)
    if missing:
        raise ValueError(
            f"{path} has columns {loaded.column_names}, missing {sorted(missing)}: "
            "make it with `instructglm tokenize` (or pass the converted .jsonl)"
        )
    if len(loaded) == 0:
        raise ValueError(f"{path} has no rows")
    return loaded, eval_dataset


def _data_meta(dataset_path: str) -> dict | None:
    """What `tokenize` (instructglm_data.json) or `convert` (<jsonl>.meta.json) recorded about the data."""
    candidate = os.path.join(dataset_path, DATA_META) if os.path.isdir(dataset_path) else jsonl_meta_path(dataset_path)
    if os.path.isfile(candidate):
        with open(candidate, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as error:
                print(f"warning: {candidate} is not valid JSON ({error}); ignoring it", file=sys.stderr)
    return None


def _jsonable(value):
    return sorted(value) if isinstance(value, (set, frozenset)) else value
