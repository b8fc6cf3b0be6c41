"""Real (non-pad) training tokens/s and peak memory: padded batches vs group_by_length vs packing vs labelled-only logits.

    python bench/train_speed.py [--steps 8] [--batch 8] [--max_seq_length 320] [--out FILE]

The model is a ChatGLM-6B-architecture model with the real vocabulary (130,528) and a small width
(default 2 layers x 128), random frozen weights, LoRA r=8 on `query_key_value` (dropout 0.1, as
the seed), AdamW, fp32: one step = forward + loss + backward + optimizer step, as the Trainer runs
it. Rows are BELLE-shaped (`bench/tokenize_speed.py`: the seed's length table, text cut from real
Chinese instructions, the seed's BELLE template), tokenized with the real ChatGLM-6B tokenizer at
`--max_seq_length` 320 the way `instructglm tokenize` does. Variants, each in its own subprocess
(so its peak RSS is its own), each over its own first `--warmup + --steps` batches:
- padded: today's batches: a seeded shuffle, `--batch` rows padded to the longest (`CausalLMCollator`);
- group_by_length: transformers' `LengthGroupedSampler` (what `--train_sampling_strategy group_by_length` uses), same collator;
- packing: `PackedDataset` packs of up to `--max_seq_length` tokens, `--batch` packs per step;
- packing + labelled-only logits: the same batches, loss from `labelled_only_loss` (chunked head + CE);
- padded + labelled-only logits: today's batches with only the loss changed (its memory effect alone).
The packed batches go to the model as they are: the native ChatGLM-6B reads the segment ids of the
packed `attention_mask` and builds each row's block-diagonal prefix-LM mask and 2-D positions itself.

Real tokens/s counts non-pad tokens. Peak memory is the worker's peak RSS (`ru_maxrss`), and
"training" is that minus the RSS just before the first step (model, optimizer, data loaded). At
this width the output head is nearly all of a step's FLOPs (130,528 x 128 per token against the
blocks' few hundred thousand), so labelled-only logits speed this model up far more than they
would the real 6B (whose head is ~9% of its FLOPs, where they save mainly memory); packing's gain
comes from padding and carries over. The machine's cores are shared: ratios are the result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine  # bench/machine.py (this directory is on sys.path when a bench runs)

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INSTRUCTGLM_SHARED", REPO.parent / "shared"))
VARIANTS = {
    "padded": "padded batches (today)",
    "group_by_length": "`--train_sampling_strategy group_by_length`",
    "packing": "packing",
    "packing_labelled": "packing + labelled-only logits",
    "padded_labelled": "padded + labelled-only logits",
}
BASELINE = "padded"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", type=Path, default=SHARED / "tokenizers" / "chatglm-6b", help="ChatGLM-6B tokenizer dir")
    parser.add_argument(
        "--corpus", type=Path, default=SHARED / "data" / "llamafactory__alpaca_zh_demo.json",
        help="Alpaca-shaped JSON the rows' text is cut from (a built-in paragraph if missing)",
    )
    parser.add_argument("--rows", type=int, default=4000, help="BELLE-shaped rows to tokenize")
    parser.add_argument("--max_seq_length", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8, help="rows (padded) or packs (packing) per step")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--chunk_size", type=int, default=None, help="labelled tokens per head call (default: the library's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--repeat", type=int, default=2, help="interleaved rounds; each variant's fastest is reported")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated, from: " + ", ".join(VARIANTS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# -- data (parent process) --------------------------------------------------------------------------------------------


def tokenized_rows(args: argparse.Namespace, save_path: Path) -> dict:
    """Tokenize BELLE-shaped rows as `instructglm tokenize` does and save them for the workers; returns stats."""
    import datasets
    import numpy as np
    from transformers import AutoTokenizer

    sys.path.insert(0, str(REPO / "bench"))
    import instructglm  # noqa: F401  (registers ChatGLM)
    from instructglm.data.tokenize import RowEncoder
    from tokenize_speed import load_corpus, synthetic_rows

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    rows = synthetic_rows(args.rows, load_corpus(args.corpus), args.seed)
    encoder = RowEncoder(tokenizer, args.max_seq_length, model_type="chatglm")
    table, counts, _ = encoder.encode_batch([r["context"] for r in rows], [r["target"] for r in rows])
    dataset = datasets.Dataset(datasets.table.InMemoryTable(table))
    dataset.save_to_disk(str(save_path))
    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    prompts = np.array(dataset["seq_len"])
    return {
        "rows": len(dataset),
        "dropped": counts.rows - counts.kept,
        "truncated": counts.truncated,
        "mean_tokens": float(lengths.mean()),
        "median_tokens": float(np.median(lengths)),
        "labelled_share": float((lengths - prompts + 1).sum() / lengths.sum()),  # ChatGLM-6B labels <sop> too
    }


# -- one variant (worker process) -------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def build_model(args: argparse.Namespace):
    import torch
    from peft import LoraConfig, get_peft_model

    from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

    real = json.loads((args.tokenizer / "config.json").read_text()) if (args.tokenizer / "config.json").is_file() else {}
    ids = {k: real.get(k, v) for k, v in dict(bos_token_id=130004, eos_token_id=130005, mask_token_id=130000,
                                               gmask_token_id=130001, pad_token_id=3).items()}
    config = ChatGLMConfig(
        vocab_size=130528, hidden_size=args.hidden_size, num_layers=args.num_layers,
        num_attention_heads=max(args.hidden_size // 32, 1), inner_hidden_size=4 * args.hidden_size, **ids,
    )
    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(args.seed)
    model = ChatGLMForConditionalGeneration(config)  # tied head, as THUDM's loader ties it
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"], task_type="CAUSAL_LM")
    return get_peft_model(model, lora).train(), config


def batches(args: argparse.Namespace, variant: str, rows, config):
    """The variant's first warmup + steps batches, each (model inputs, real tokens)."""
    import torch
    from transformers.trainer_pt_utils import LengthGroupedSampler

    from instructglm.train.collator import CausalLMCollator
    from instructglm.train.packing import PackedCollator, PackedDataset

    count = args.warmup + args.steps
    generator = torch.Generator().manual_seed(args.seed)
    if variant.startswith("packing"):
        packed = PackedDataset(rows, args.max_seq_length, seed=args.seed)
        collate = PackedCollator(pad_token_id=config.pad_token_id, labelled_prompt_tail=1, attention="segment_ids")
        order = torch.randperm(len(packed), generator=generator).tolist()
        for step in range(count):
            batch = collate([packed[i] for i in order[step * args.batch : (step + 1) * args.batch]])
            yield batch, int((batch["attention_mask"] > 0).sum())  # segment ids: 0 on padding
        return
    collate = CausalLMCollator(pad_token_id=config.pad_token_id, labelled_prompt_tail=1)
    if variant == "group_by_length":
        lengths = [len(ids) for ids in rows["input_ids"]]
        order = list(LengthGroupedSampler(args.batch, lengths=lengths, generator=generator))
    else:
        order = torch.randperm(len(rows), generator=generator).tolist()
    for step in range(count):
        batch = collate([rows[i] for i in order[step * args.batch : (step + 1) * args.batch]])
        yield batch, int(batch["attention_mask"].sum())


def run_worker(args: argparse.Namespace) -> dict:
    import datasets
    import torch

    from instructglm.train.loss import DEFAULT_CHUNK_SIZE, labelled_only_loss

    torch.set_num_threads(args.threads)
    variant = args.worker
    rows = datasets.load_from_disk(str(args.data))
    model, config = build_model(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    labelled_only = variant.endswith("_labelled")
    prepared = list(batches(args, variant, rows, config))  # collation is not timed: a DataLoader worker's job

    def step(inputs) -> float:
        if labelled_only:
            loss = labelled_only_loss(model, inputs, chunk_size=chunk_size)
        else:
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    base_rss = _rss_bytes()
    losses, real_tokens, slots, widths = [], 0, 0, []
    for inputs, _ in prepared[: args.warmup]:
        losses.append(step(inputs))
    start, cpu_start = time.perf_counter(), time.process_time()
    for inputs, real in prepared[args.warmup :]:
        losses.append(step(inputs))
        real_tokens += real
        slots += inputs["input_ids"].numel()
        widths.append(inputs["input_ids"].shape[1])
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "variant": variant,
        "real_tokens_per_second": real_tokens / elapsed,
        "real_tokens_per_cpu_second": real_tokens / cpu,
        "step_seconds": elapsed / args.steps,
        "real_share": real_tokens / slots,
        "widest": max(widths),
        "peak_bytes": peak,
        "training_bytes": peak - base_rss,
        "mean_loss": sum(losses) / len(losses),
        "threads": torch.get_num_threads(),
    }


# -- report (parent process) ------------------------------------------------------------------------------------------


def markdown(args: argparse.Namespace, data: dict, results: list[dict]) -> str:
    mib = 1024**2
    base = next((r for r in results if r["variant"] == BASELINE), results[0])
    lines = [
        f"train speed: ChatGLM-6B architecture, {args.num_layers} layers x {args.hidden_size}, vocab 130528 (tied head), "
        f"LoRA r=8 on query_key_value, fp32, sdpa, batch {args.batch} x up to {args.max_seq_length} tokens; "
        f"{machine()} (shared), {results[0]['threads']} torch thread(s) per variant; {args.steps} timed steps after {args.warmup}, "
        f"fastest of {args.repeat} interleaved rounds",
        f"data: {data['rows']} BELLE-shaped rows, real ChatGLM-6B tokenizer, max_seq_length {args.max_seq_length} "
        f"(tokens per row: mean {data['mean_tokens']:.0f}, median {data['median_tokens']:.0f}; "
        f"{data['truncated']} truncated, {data['dropped']} dropped; {data['labelled_share']:.0%} of tokens labelled)",
        "",
        "| variant | real tokens/s | vs padded | real tokens/CPU s | vs padded | real / all tokens | s/step | peak RSS MiB | vs padded | training MiB "
        "| vs padded | widest batch | mean loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {VARIANTS[r['variant']]} | {r['real_tokens_per_second']:,.0f} | "
            f"{r['real_tokens_per_second'] / base['real_tokens_per_second']:.2f}× | "
            f"{r['real_tokens_per_cpu_second']:,.0f} | "
            f"{r['real_tokens_per_cpu_second'] / base['real_tokens_per_cpu_second']:.2f}× | {r['real_share']:.0%} | "
            f"{r['step_seconds']:.2f} | {r['peak_bytes'] / mib:,.0f} | {r['peak_bytes'] / base['peak_bytes']:.2f}× | "
            f"{r['training_bytes'] / mib:,.0f} | {r['training_bytes'] / max(base['training_bytes'], 1):.2f}× | "
            f"{args.batch} × {r['widest']} | {r['mean_loss']:.3f} |"
        )
    by_name = {r["variant"]: r for r in results}

    def ratio(name, other, key):
        return by_name[name][key] / by_name[other][key]

    lines.append("")
    if {"packing", BASELINE} <= by_name.keys():
        speed = ratio("packing", BASELINE, "real_tokens_per_second")
        cpu = ratio("packing", BASELINE, "real_tokens_per_cpu_second")
        lines.append(
            f"- packing: {speed:.2f}× the padded real tokens/s, {cpu:.2f}× per CPU second "
            f"(target ≥ 1.5×: {'met' if min(speed, cpu) >= 1.5 else 'NOT met'})"
        )
    if {"packing_labelled", BASELINE} <= by_name.keys():
        memory = ratio("packing_labelled", BASELINE, "peak_bytes")
        line = (f"- packing + labelled-only logits: peak RSS {memory:.2f}× padded's "
                f"(target ≤ 0.5×: {'met' if memory <= 0.5 else 'NOT met'})")
        if "packing" in by_name:
            line += (f"; {ratio('packing_labelled', 'packing', 'peak_bytes'):.2f}× (training memory "
                     f"{ratio('packing_labelled', 'packing', 'training_bytes'):.2f}×) packing's with full logits, "
                     f"the same batches of {args.batch} × {by_name['packing']['widest']}")
        lines.append(line)
    lines += [
        "",
        "real tokens = non-pad tokens; tokens/s is wall time, tokens/CPU s is the worker's CPU time (user + system), "
        "less disturbed by other work on shared cores. peak RSS = the variant's process high-water mark; training = peak RSS minus the "
        "RSS before the first step (model, optimizer and batches already in memory).",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    if not (args.tokenizer / "ice_text.model").is_file():
        print(f"{args.tokenizer}/ice_text.model not found: pass --tokenizer DIR (a chatglm-6b tokenizer dir)", file=sys.stderr)
        return 2
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        print(f"unknown --variants {unknown}; choose from {list(VARIANTS)}", file=sys.stderr)
        return 2
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="train-speed-") as tmp:
        data_dir = Path(tmp) / "rows"
        data = tokenized_rows(args, data_dir)
        passthrough = argv if argv is not None else sys.argv[1:]
        rounds: dict[str, list[dict]] = {}
        # rounds interleave the variants so that load from other work falls on all of them alike
        for round_ in range(args.repeat):
            for variant in variants:
                command = [sys.executable, __file__, *passthrough, "--worker", variant, "--data", str(data_dir)]
                done = subprocess.run(command, capture_output=True, text=True, env=env)
                if done.returncode:
                    sys.stderr.write(done.stderr[-5000:])
                    print(f"{variant}: the worker failed (exit {done.returncode}), its stderr is above", file=sys.stderr)
                    return 1
                r = json.loads(done.stdout.strip().splitlines()[-1])
                rounds.setdefault(variant, []).append(r)
                print(f"round {round_ + 1}/{args.repeat} {variant}: {r['real_tokens_per_second']:,.0f} real tokens/s, "
                      f"peak {r['peak_bytes'] / 2**20:,.0f} MiB", file=sys.stderr)
    results = []
    for variant in variants:
        # the fastest round is the least disturbed; memory is the same batches every round, so take its worst
        best = dict(max(rounds[variant], key=lambda r: r["real_tokens_per_second"]))
        best["real_tokens_per_cpu_second"] = max(r["real_tokens_per_cpu_second"] for r in rounds[variant])
        best["peak_bytes"] = max(r["peak_bytes"] for r in rounds[variant])
        best["training_bytes"] = max(r["training_bytes"] for r in rounds[variant])
        results.append(best)
    table = markdown(args, data, results)
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
