"""`instructglm demo` (`make demo`): the whole job on bundled data, offline, in a few CPU minutes.

    bundled sample data (demo/assets/sample_data.json, Alpaca JSON, zh+en)
      -> convert   (instructglm.data.convert: Alpaca template, jsonl + sidecar)  -> <out>/data/
      -> tokenize  (instructglm.data.tokenize, the demo's ChatGLM-6B-layout tokenizer)
      -> a tiny ChatGLM-6B-architecture model, random init, seeded            -> <out>/base/
      -> LoRA training (instructglm.train.finetune.finetune, the `train` command's recipe) -> <out>/
      -> `instructglm eval`'s library on the held-out prompts (demo/assets/sample_eval.json): the
         base (= before training) and the adapter side by side               -> <out>/eval/report.html
      -> exact match, BLEU-4, ROUGE-L and loss before/after; a few sample answers

The last line is `exact match: before=B after=A` (fractions of the held-out prompts answered
exactly, greedy decoding); the line before it links the report. The run dir is a normal `train` run dir, so afterwards
`instructglm chat --model_name_or_path outputs/demo/base --adapter outputs/demo` talks to it.

Why it learns in minutes: every held-out answer follows from rules the training split shows
(number words, 中文数字, their inverses, the next number, upper-casing letters; see
`sample_data.py`), the operand is always the record's `input` (same place in every prompt), the
tokenizer writes numbers digit by digit in both scripts, and the model is small (2 layers, hidden
64). A random-init base knows nothing for LoRA to adapt, so the adapter is the whole learner: it
sits on every linear layer of every block (query_key_value, dense, dense_h_to_4h, dense_4h_to_h)
at rank 32 (half the width) and also on the word embeddings and the output head. Without the
last two the frozen random head (init std 0.02 after a LayerNorm) caps every logit near 1.3, so
the loss cannot fall below ~5.9 nats; with them it reaches ~0 and the held-out prompts are
answered. Everything is still a plain peft LoRA adapter (`adapter_model.safetensors`,
`chatglm-lora.pt`), loaded by `chat`/`predict` like any other.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from instructglm.demo import sample_data

ASSETS_DIR = sample_data.ASSETS_DIR
DEMO_TOKENIZER_DIR = ASSETS_DIR / "tokenizer"
# The demo model: ChatGLM-6B's architecture at toy width. Heads of 16 keep the two rotary halves
# of 8; the tokenizer's ~700 pieces are rounded up to a multiple of 64 embedding rows, as the real
# model pads 130,344 pieces to 130,528.
DEMO_MODEL = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "inner_hidden_size": 256, "max_sequence_length": 256}
LORA_TARGETS = "query_key_value,dense,dense_h_to_4h,dense_4h_to_h,word_embeddings,lm_head"
# Longest answer in the sample data is 6 tokens ("seventy-seven" in pieces is 3, "A B C" is 3); slack for eos.
MAX_NEW_TOKENS = 12
MAX_SEQ_LENGTH = 96


@dataclass
class DemoArguments:
    output_dir: str = field(
        default="outputs/demo",
        metadata={"help": "Run dir: data/ (jsonl + tokenized), base/ (the tiny model), the adapter, loss.png, results."},
    )
    max_steps: int = field(default=3000, metadata={"help": "Training steps (fewer: faster, lower accuracy)."})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Rows per training step."})
    learning_rate: float = field(default=5e-3, metadata={"help": "Peak learning rate (warm-up, then linear decay)."})
    lora_rank: int = field(default=32, metadata={"help": "LoRA rank on every layer it wraps (the model width is 64)."})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha; the update is scaled by alpha / rank."})
    seed: int = field(default=0, metadata={"help": "Seed of the model init, the adapter init and the data order."})
    num_samples: int = field(default=6, metadata={"help": "Sample answers printed after training."})
    eval_batch_size: int = field(default=64, metadata={"help": "Prompts per generation batch in the evaluation."})
    num_threads: int = field(
        default=1,
        metadata={
            "help": "torch CPU threads. 1 is fastest for a width-64 model: more threads only add synchronisation, "
            "and on a busy machine waiting threads slow each step by 10x or more."
        },
    )


ARGUMENTS = (DemoArguments,)


def tiny_chatglm_config(tokenizer, **overrides):
    """A tiny `ChatGLMConfig` whose vocabulary and special ids are read from `tokenizer`."""
    from instructglm.models.chatglm import ChatGLMConfig

    fields = {
        **DEMO_MODEL,
        "vocab_size": -(-len(tokenizer) // 64) * 64,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "gmask_token_id": tokenizer.gmask_token_id,
        # Untied, as the fixtures' tiny checkpoints: the output head is its own random projection.
        "tie_word_embeddings": False,
    }
    fields.update(overrides)
    return ChatGLMConfig(**fields)


def build_tiny_chatglm(path: str | Path, seed: int = 0, tokenizer_dir: str | Path = DEMO_TOKENIZER_DIR, **overrides) -> Path:
    """Save a random-init tiny ChatGLM-6B-architecture model and its tokenizer in the hub layout.

    `AutoTokenizer/AutoModelForCausalLM.from_pretrained(path)` load it after `import instructglm`.
    `overrides` are `ChatGLMConfig` fields (e.g. `hidden_size=32`). The same seed gives the same
    weights; torch's global RNG is left as it was.
    """
    import torch
    from transformers import AutoTokenizer

    import instructglm  # noqa: F401  (registers ChatGLM with the Auto classes)
    from instructglm.data.io import umask_modes
    from instructglm.models.chatglm import ChatGLMForConditionalGeneration

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = tiny_chatglm_config(tokenizer, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ChatGLMForConditionalGeneration(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    umask_modes(path)  # safetensors writes model.safetensors 0600 whatever the umask
    return path


def evaluate_base_and_adapter(base_dir: Path, adapter: Path, eval_jsonl: Path, report_dir: Path, batch_size: int):
    """`instructglm eval`'s library on the held-out prompts: base and adapter side by side, report.html written.

    Returns the results (`instructglm.eval.results.EvalResults`): `results.models[0]` is the base
    (the model before training), `results.models[1]` the adapter.
    """
    from instructglm.eval.evaluate import EvalArguments, evaluate_models, load_eval_rows, write_outputs
    from instructglm.infer.generate import BatchGenerationArguments

    data = load_eval_rows(eval_jsonl)
    settings = BatchGenerationArguments(max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    args = EvalArguments(
        model_name_or_path=str(base_dir), data=str(eval_jsonl), output_dir=str(report_dir),
        dtype="float32", device="cpu", batch_size=batch_size, max_seq_length=MAX_SEQ_LENGTH,
    )
    results = evaluate_models(str(base_dir), [None, str(adapter)], data, settings, args)
    write_outputs(report_dir, results, args.report_rows)
    return results


def metric_lines(before: dict, after: dict) -> list[str]:
    """The summary table of base vs adapter metrics (eval's), each line naming its scale.

    Exact match is shown as the fraction of right answers, the scale of the demo's final line
    (`exact match: before=0.00 after=0.89`); eval's metrics hold it in percent like BLEU and ROUGE.
    """
    lines = [f"[demo] {'exact match':<11} before {before['exact_match'] / 100:8.2f}   after {after['exact_match'] / 100:8.2f}   (fraction of answers)"]
    for name, scale in (("bleu-4", "0-100"), ("rouge-l", "0-100"), ("loss", "nats/token")):
        lines.append(f"[demo] {name:<11} before {before[name]:8.2f}   after {after[name]:8.2f}   ({scale})")
    return lines


def _stage(name: str, started: float) -> float:
    now = time.perf_counter()
    print(f"[demo] {name} done in {now - started:.1f}s", flush=True)
    return now


def main(args: DemoArguments) -> int:
    from instructglm.data import stats as stats_lib
    from instructglm.data.convert import convert
    from instructglm.data.tokenize import tokenize_jsonl
    from instructglm.train.args import FinetuneArguments, TrainingArguments
    from instructglm.train.finetune import finetune

    import torch

    torch.set_num_threads(args.num_threads)
    out = Path(args.output_dir)
    data_dir, base_dir = out / "data", out / "base"
    clock = start = time.perf_counter()

    # 1. convert: the bundled Alpaca JSON -> {context, target} jsonl, as `instructglm convert` does.
    train_jsonl, eval_jsonl = data_dir / "sample_train.jsonl", data_dir / "sample_eval.jsonl"
    for source, target in ((ASSETS_DIR / sample_data.TRAIN_FILE, train_jsonl), (ASSETS_DIR / sample_data.EVAL_FILE, eval_jsonl)):
        meta = convert(str(target), data_path=str(source))
        print(f"[demo] convert {source.name} -> {target}: {meta['counts']['written']} rows, template {meta['template']!r}")

    # 2. the tiny model and its tokenizer; 3. tokenize with that tokenizer.
    build_tiny_chatglm(base_dir, seed=args.seed)
    tokenizer, model_type = stats_lib.check_token_args(str(base_dir), MAX_SEQ_LENGTH)
    print(stats_lib.format_stats(stats_lib.jsonl_stats(str(train_jsonl), tokenizer, MAX_SEQ_LENGTH, model_type)))
    dataset_dir = data_dir / "sample_train"
    counts = tokenize_jsonl(train_jsonl, dataset_dir, tokenizer, MAX_SEQ_LENGTH, model_type=model_type, model_name_or_path=str(base_dir))
    print(f"[demo] tokenize -> {dataset_dir}: {counts.summary()}")
    clock = _stage("data and model", clock)

    # 5. LoRA training with the `train` command's recipe.
    finetune_args = FinetuneArguments(
        dataset_path=str(dataset_dir),
        model_name_or_path=str(base_dir),
        lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=0.0,
        lora_target=LORA_TARGETS,
        # a rerun of the demo replaces its earlier run (data/ and base/ are rebuilt above anyway)
        overwrite_output_dir=True,
    )
    training_args = TrainingArguments(
        output_dir=str(out),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.per_device_train_batch_size,
        learning_rate=args.learning_rate,
        warmup_steps=max(1, args.max_steps // 20),
        lr_scheduler_type="linear",
        weight_decay=0.0,
        logging_steps=10,
        save_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=True,
        dataloader_num_workers=0,
    )
    finetune(finetune_args, training_args)
    clock = _stage("training", clock)

    # 6. evaluate: the base (= before training) and the saved adapter, loaded as chat/predict load them.
    report_dir = out / "eval"
    results = evaluate_base_and_adapter(base_dir, out, eval_jsonl, report_dir, args.eval_batch_size)
    clock = _stage("evaluation of base and adapter", clock)
    base, tuned = results.models
    # eval scores exact match in percent; the demo's line keeps its fraction
    before, after = base.metrics["exact_match"] / 100, tuned.metrics["exact_match"] / 100
    predictions = [{**row, "prediction": answer} for row, answer in zip(results.data.rows, tuned.answers)]
    (out / "demo_results.json").write_text(
        json.dumps({"before": before, "after": after, "predictions": predictions}, ensure_ascii=False, indent=1) + "\n",
        encoding="utf-8",
    )
    step = max(1, len(predictions) // max(1, args.num_samples))
    for row in predictions[::step][: args.num_samples]:
        mark = "ok" if row["prediction"] == row["target"].strip() else "WRONG"
        question = " / ".join(line for line in row["context"].strip().splitlines() if line)
        print(f"\nQ: {question}\nA: {row['prediction']}   [{mark}; expected {row['target']}]")
    print()
    for line in metric_lines(base.metrics, tuned.metrics):
        print(line)
    print(f"\n[demo] total {time.perf_counter() - start:.0f}s; loss plot {out / 'loss.png'}; predictions {out / 'demo_results.json'}")
    print(f"[demo] report (base vs adapter, open in a browser): {report_dir / 'report.html'}")
    print(f"exact match: before={before:.2f} after={after:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    from instructglm.cli import run_command

    sys.exit(run_command("demo", sys.argv[1:]))
