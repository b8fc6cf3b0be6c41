"""Forward+backward speed and peak memory of a LoRA training step of the native ChatGLM-6B: sdpa vs eager.

    python bench/model_step.py                                  # CPU: hidden 256, 4 layers, batch 4 x seq 256, fp32
    python bench/model_step.py --device cuda --real-shape       # GPU: the real 6B shape, random bf16 weights
    python bench/model_step.py ... --out table.md               # also write the markdown table there

One step = forward with labels, backward, AdamW update of the LoRA weights (r=8 on `query_key_value`, as
InstructGLM trains); the base weights are random and frozen. Each attention implementation runs in its own
subprocess so that peak memory (CUDA: `max_memory_allocated`; CPU: the process's peak RSS) is its own.
Batches look like training data: a prompt, `[gMASK] <sop>`, an answer, `<eop>`, right padding on some rows,
and the 2-D padding mask, so the prefix-LM mask is in play. The first steps (warm-up) are not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

CPU_SHAPE = dict(vocab_size=8192, hidden_size=256, num_layers=4, num_attention_heads=8, inner_hidden_size=1024)
# THUDM/chatglm-6b config.json
REAL_SHAPE = dict(vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32, inner_hidden_size=16384)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--real-shape", action="store_true", help="the 6B shape (28 x 4096, vocab 130528)")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 4 on CPU, 4 at the real shape)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default 256 on CPU, 512 at the real shape)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on CPU, 5 on a GPU)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--dtype", default=None, help="float32/bfloat16/float16 (default fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute blocks in backward")
    parser.add_argument("--implementations", default="sdpa,eager", help="comma-separated attn_implementation values")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table to this file")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.batch = args.batch or 4
    args.seq = args.seq or (512 if args.real_shape else 256)
    args.steps = args.steps or (5 if gpu else 3)
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    return args


def training_batch(batch: int, seq: int, config, device, seed: int = 0) -> dict:
    """Prompt + [gMASK] <sop> + answer + <eop>, right-padded to `seq` on every other row, with labels from <sop>."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows, labels = [], []
    for i in range(batch):
        length = seq if i % 2 == 0 else seq * 3 // 4
        prompt_length = length // 3
        ids = torch.randint(5, min(config.mask_token_id, 20000), (length,), generator=generator)
        ids[prompt_length] = config.gmask_token_id
        ids[prompt_length + 1] = config.bos_token_id
        ids[-1] = config.eos_token_id
        label = ids.clone()
        label[: prompt_length + 1] = -100
        pad = seq - length
        rows.append(torch.cat([ids, torch.full((pad,), config.pad_token_id)]))
        labels.append(torch.cat([label, torch.full((pad,), -100)]))
    input_ids = torch.stack(rows)
    mask = torch.zeros_like(input_ids)
    for i in range(len(rows)):
        mask[i, : (seq if i % 2 == 0 else seq * 3 // 4)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": torch.stack(labels).to(device)}


def run_worker(args: argparse.Namespace) -> dict:
    """Build the model with `args.worker` attention, time the steps, return the measurements."""
    import torch
    from peft import LoraConfig, get_peft_model

    sys.path.insert(0, str(REPO / "src"))
    from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shape = REAL_SHAPE if args.real_shape else CPU_SHAPE
    top = shape["vocab_size"] - 8  # special ids above every random token id
    config = ChatGLMConfig(
        **shape, mask_token_id=top, gmask_token_id=top + 1, bos_token_id=top + 4, eos_token_id=top + 5, pad_token_id=3
    )
    config._attn_implementation = args.worker
    config.use_cache = False
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # this worker process only: build the weights directly in the bench dtype
    try:
        with device:
            model = ChatGLMForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model = get_peft_model(
        model, LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"], task_type="CAUSAL_LM")
    )
    for parameter in model.parameters():
        if parameter.requires_grad:  # LoRA weights train in fp32, as InstructGLM does
            parameter.data = parameter.data.float()
    if args.gradient_checkpointing:
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = training_batch(args.batch, args.seq, config, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step() -> float:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    sync()
    if device.type == "cuda":
        base_memory = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base_memory = _rss_bytes()
    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "attention": args.worker,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)",
        "dtype": args.dtype,
        "shape": f"{config.num_layers} x {config.hidden_size}, {config.num_attention_heads} heads, vocab {config.vocab_size}",
        "tokens": args.batch * args.seq,
        "step_seconds": elapsed / args.steps,
        "tokens_per_second": args.batch * args.seq * args.steps / elapsed,
        "peak_bytes": peak,
        "over_model_bytes": peak - base_memory,
        "first_loss": first_loss,
    }


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def markdown(args: argparse.Namespace, results: list[dict]) -> str:
    mib = 1024**2
    memory = "peak CUDA allocated" if args.device.startswith("cuda") else "peak RSS"
    lines = [
        f"LoRA r=8 on query_key_value, forward+backward+AdamW, batch {args.batch} x seq {args.seq}, "
        f"{results[0]['dtype']}, {results[0]['shape']}, {results[0]['device']}"
        + (", gradient checkpointing" if args.gradient_checkpointing else ""),
        "",
        f"| attention | tokens/s | ms/step | {memory} MiB | of which training MiB | loss (step 1) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['attention']} | {r['tokens_per_second']:,.0f} | {r['step_seconds'] * 1000:,.0f} | "
            f"{r['peak_bytes'] / mib:,.0f} | {r['over_model_bytes'] / mib:,.0f} | {r['first_loss']:.4f} |"
        )
    by_name = {r["attention"]: r for r in results}
    if {"sdpa", "eager"} <= by_name.keys():
        speed = by_name["sdpa"]["tokens_per_second"] / by_name["eager"]["tokens_per_second"]
        memory_ratio = by_name["sdpa"]["over_model_bytes"] / max(by_name["eager"]["over_model_bytes"], 1)
        lines += ["", f"sdpa vs eager: {speed:.2f}x tokens/s, {memory_ratio:.2f}x training memory"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    results = []
    for implementation in args.implementations.split(","):
        command = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", implementation]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            sys.stderr.write(done.stderr)
            print(f"{implementation}: the worker failed (exit {done.returncode}), its stderr is above", file=sys.stderr)
            return 1
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = markdown(args, results)
    print(table, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
