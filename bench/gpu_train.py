"""LoRA training throughput and memory at the real ChatGLM-6B shape: the plain HF + peft path against ours (part of gpu_check.sh).

    python bench/gpu_train.py                                  # a GPU: the 6B shapes, random bf16 weights
    python bench/gpu_train.py --device cpu --tiny              # the CPU dry run (tiny shapes): proves it runs
    python bench/gpu_train.py --write-lengths                  # (CPU, once) re-measure bench/belle_rows_320.json

The model is the native ChatGLM-6B (hidden 4096, 28 layers, 32 heads, inner 16384, vocab 130528)
with random frozen weights in bf16 and LoRA r=8 on `query_key_value` (fp32 adapter weights, bf16
autocast, AdamW: what `instructglm train --bf16` runs); one step = forward + loss + backward +
optimizer step. Rows have the token lengths of BELLE-shaped rows tokenized by the real ChatGLM-6B
tokenizer at --max_seq_length 320 (`bench/belle_rows_320.json`, written by --write-lengths from
`bench/train_speed.py`'s rows), with random ids, the prompt ending in `[gMASK] <sop>`.

Paths, all in one process on one model (peak memory reset before each):
- plain: padded batches (`CausalLMCollator`, rows padded to the batch's longest), labels through the
  model's forward (full [b, T, vocab] logits, transformers' loss), sdpa;
- ours: packing (`PackedDataset` packs of up to 320 tokens, padded to 320 so shapes stay static) +
  labelled-only logits (`loss.labelled_only_loss`, chunked head + cross entropy), with sdpa (dense
  block-diagonal prefix-LM mask) or flex_attention (BlockMask, compiled FlexAttention);
- ours without packing: padded batches + labelled-only logits, sdpa (what packing adds on its own).
At batch 2 x 320 (the seed's) and 32 x 320, then a search for the best batch that fits 80 GB
(the allocator is capped at 79 GiB, what an 80 GB card gives), with and without gradient
checkpointing, each series stopping at its first out-of-memory; then one ChatGLM3-6B-shape run
(hidden 4096, 28 layers, 32 heads, 2 key/value groups, ffn 13696, vocab 65024) plain and ours.
`--budget-s` bounds the whole run: what does not fit is listed as skipped.

Reported per run: real (non-pad) tokens/s, all-slot tokens/s, peak `max_memory_allocated` (GB = 1e9
bytes), and MFU. Model FLOPs of a step = 4 * N * real tokens + 12 * L * d * attended pairs, where N =
the weights of every matmul (all `nn.Linear` base layers, the output head included: 6.17e9 for
ChatGLM-6B), 4 = 2 forward + 2 for the input gradients in backward (LoRA: the frozen weights get no
weight gradient; LoRA's own FLOPs, < 0.1%, are left out), and an attended pair is a (query, key) of
the same row the mask lets through (prefix-LM for ChatGLM-6B, causal for ChatGLM3), 4d FLOPs forward
(QK^T, AV) and 8d backward per layer. Recomputation under gradient checkpointing is not counted.
MFU = model FLOPs/s over (a) the bf16 matmul rate measured in this run (8192^3 matmuls: the card's
real ceiling) and (b) the dense bf16 spec peak of the card when known (H100/H200 SXM: 989 TFLOPs).
The issue's "MFU 0.55 at 17.2k tokens/s" matches (a) with 4N FLOPs per token.
Nothing here imports `datasets` (the GPU image has none).
"""

from __future__ import annotations

import argparse
import gc
import json
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
LENGTHS_FILE = REPO / "bench" / "belle_rows_320.json"
MAX_SEQ_LENGTH = 320
CAP_BYTES = 79 * 2**30  # an 80 GB card's usable memory
SPEC_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}

# THUDM/chatglm-6b and THUDM/chatglm3-6b config.json
CHATGLM_6B = dict(vocab_size=130528, hidden_size=4096, num_layers=28, num_attention_heads=32, inner_hidden_size=16384)
CHATGLM3_6B = dict(
    padded_vocab_size=65024, hidden_size=4096, num_layers=28, num_attention_heads=32, kv_channels=128,
    multi_query_group_num=2, ffn_hidden_size=13696, seq_length=8192, add_qkv_bias=True,
)
TINY_6B = dict(vocab_size=2048, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256)
TINY_3 = dict(padded_vocab_size=2048, hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16,
              multi_query_group_num=2, ffn_hidden_size=96, seq_length=512, add_qkv_bias=True)


@dataclass
class Run:
    family: str  # "chatglm-6b" or "chatglm3-6b"
    path: str  # "plain", "ours", "ours-no-packing"
    batch: int
    attention: str = "sdpa"
    checkpointing: bool = False
    series: str = ""  # the batch search this run belongs to
    result: dict = field(default_factory=dict)

    @property
    def packing(self) -> bool:
        return self.path == "ours"

    @property
    def labelled_only(self) -> bool:
        return self.path != "plain"

    def label(self) -> str:
        what = {"plain": "plain HF + peft (padded, full logits)", "ours": "ours: packing + labelled-only",
                "ours-no-packing": "ours without packing: padded + labelled-only"}[self.path]
        return f"{what}, {self.attention}" + (", grad ckpt" if self.checkpointing else "")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU dry run)")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting runs after this many seconds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per run (FlexAttention compiles here)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per run")
    parser.add_argument("--attention", default="sdpa,flex_attention", help="ours: the attention backends to compare")
    parser.add_argument("--out-json", type=Path, default=None, help="also write every run's numbers here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--simulate-oom-tokens", type=int, default=None, help=argparse.SUPPRESS)  # the CPU dry run
    parser.add_argument("--write-lengths", action="store_true", help="measure the row lengths file, then exit")
    return parser.parse_args(argv)


# -- rows -------------------------------------------------------------------------------------------------------------


def write_lengths(path: Path = LENGTHS_FILE) -> None:
    """Tokenize train_speed.py's BELLE-shaped rows with the real ChatGLM-6B tokenizer; keep (prompt, total) lengths."""
    sys.path.insert(0, str(REPO / "bench"))
    import tempfile

    import datasets
    import train_speed

    args = train_speed.parse_args(["--rows", "4000", "--max_seq_length", str(MAX_SEQ_LENGTH)])
    with tempfile.TemporaryDirectory() as tmp:
        stats = train_speed.tokenized_rows(args, Path(tmp) / "rows")
        rows = datasets.load_from_disk(str(Path(tmp) / "rows"))
        pairs = [[int(s), len(ids)] for s, ids in zip(rows["seq_len"], rows["input_ids"], strict=True)]
    record = {
        "source": "bench/train_speed.py rows (BELLE length table, real ChatGLM-6B tokenizer, instructglm tokenize's "
        f"RowEncoder) at max_seq_length {MAX_SEQ_LENGTH}: [prompt tokens incl. [gMASK] <sop>, total tokens incl. eos]",
        "stats": stats,
        "rows": pairs,
    }
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n", encoding="utf-8")
    print(f"{path}: {len(pairs)} rows, mean {stats['mean_tokens']:.1f} tokens, {stats['labelled_share']:.0%} labelled")


def row_lengths(count: int, seed: int) -> list[tuple[int, int]]:
    """`count` (prompt, total) lengths drawn from the measured rows (with repeats when more are asked for)."""
    pairs = json.loads(LENGTHS_FILE.read_text(encoding="utf-8"))["rows"]
    order = np.random.default_rng(seed).permutation(max(count, len(pairs))) % len(pairs)
    return [tuple(pairs[i]) for i in order[:count]]


def token_rows(lengths: list[tuple[int, int]], family: str, config, seed: int) -> list[dict]:
    """Tokenized rows of the given lengths: random ids, ChatGLM's special tokens where its tokenizer puts them."""
    generator = np.random.default_rng(seed)
    high = min(20000, (config.vocab_size if family == "chatglm-6b" else config.padded_vocab_size) - 16)
    rows = []
    for prompt, total in lengths:
        ids = generator.integers(5, high, total)
        if family == "chatglm-6b":
            ids[prompt - 2], ids[prompt - 1], ids[-1] = config.gmask_token_id, config.bos_token_id, config.eos_token_id
        else:  # ChatGLM3: [gMASK] sop open every prompt
            ids[0], ids[1], ids[-1] = high + 1, high + 2, config.eos_token_id
        rows.append({"input_ids": ids.tolist(), "seq_len": prompt})
    return rows


def attended_pairs(row: dict, family: str) -> int:
    """(query, key) pairs of one row the mask lets through: prefix-LM (ChatGLM-6B) or causal (ChatGLM3)."""
    n = len(row["input_ids"])
    if family != "chatglm-6b":
        return n * (n + 1) // 2
    context = row["seq_len"] - 1  # everything before <sop> sees the whole context
    return context * context + (n * (n + 1) - context * (context + 1)) // 2


# -- model ------------------------------------------------------------------------------------------------------------


def build_model(family: str, tiny: bool, device: torch.device, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model

    if family == "chatglm-6b":
        from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

        shape = TINY_6B if tiny else CHATGLM_6B
        top = shape["vocab_size"] - 8  # special ids above every random id
        config = ChatGLMConfig(**shape, mask_token_id=top, gmask_token_id=top + 1, bos_token_id=top + 4,
                               eos_token_id=top + 5, pad_token_id=3)
        model_class = ChatGLMForConditionalGeneration
    else:
        from instructglm.models.chatglm3.config import ChatGLM3Config
        from instructglm.models.chatglm3.model import ChatGLM3ForConditionalGeneration

        config = ChatGLM3Config(**(TINY_3 if tiny else CHATGLM3_6B), eos_token_id=2, pad_token_id=0)
        model_class = ChatGLM3ForConditionalGeneration
    config._attn_implementation = "sdpa"
    config.use_cache = False
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # this process only: build the weights directly in the bench dtype
    try:
        with device:
            model = model_class(config)
    finally:
        torch.set_default_dtype(previous)
    lora = LoraConfig(r=8, lora_alpha=32, lora_dropout=0.1, target_modules=["query_key_value"], task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    for parameter in model.parameters():
        if parameter.requires_grad:  # LoRA weights train in fp32 (peft's default upcast)
            parameter.data = parameter.data.float()
    return model.train(), config


def matmul_weights(model) -> int:
    """N: the weights of every matmul of a token's forward (base linears and the output head; no LoRA, no embedding)."""
    from torch import nn

    total = 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and "lora_" not in name:
            total += module.weight.numel()
    return total


def set_attention(model, name: str) -> None:
    base = model.get_base_model()
    if hasattr(base, "set_attn_implementation"):
        base.set_attn_implementation(name)
    else:  # older transformers
        base.config._attn_implementation = name


def set_checkpointing(model, enabled: bool) -> None:
    base = model.get_base_model()
    options = {"use_reentrant": False}
    if enabled:
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    else:
        base.gradient_checkpointing_disable()


# -- one run ----------------------------------------------------------------------------------------------------------


def batches_for(run: Run, rows: list[dict], config, count: int, seed: int, device) -> list[tuple[dict, int, int]]:
    """`count` batches of `run`: (model inputs on the device, real tokens, attended pairs)."""
    from instructglm.train.collator import CausalLMCollator
    from instructglm.train.packing import PackedCollator, PackedDataset

    tail = 1 if run.family == "chatglm-6b" else 0
    pad = config.pad_token_id
    needed = run.batch * count
    if run.packing:
        packed = PackedDataset(rows, MAX_SEQ_LENGTH, seed=seed)
        collate = PackedCollator(pad_token_id=pad, labelled_prompt_tail=tail, attention="segment_ids",
                                 pad_to_multiple_of=MAX_SEQ_LENGTH)  # static shapes: FlexAttention compiles once
        items = [packed[i] for i in range(len(packed))]
        groups = [items[j % len(items)] for j in range(needed)]
        row_groups = [item["rows"] for item in groups]
    else:
        collate = CausalLMCollator(pad_token_id=pad, labelled_prompt_tail=tail)
        groups = [rows[j % len(rows)] for j in range(needed)]
        row_groups = [[row] for row in groups]
    out = []
    for step in range(count):
        members = groups[step * run.batch : (step + 1) * run.batch]
        batch = collate(members)
        in_rows = [row for group in row_groups[step * run.batch : (step + 1) * run.batch] for row in group]
        real = sum(len(row["input_ids"]) for row in in_rows)
        pairs = sum(attended_pairs(row, run.family) for row in in_rows)
        out.append(({k: v.to(device) for k, v in batch.items()}, real, pairs))
    return out


def measure(run: Run, model, optimizer, batches, args, device, dtype, flops_per_token: float, layers_dim: int) -> dict:
    from instructglm.train.loss import labelled_only_loss

    set_attention(model, run.attention)
    set_checkpointing(model, run.checkpointing)
    cuda = device.type == "cuda"

    def step(inputs) -> float:
        if args.simulate_oom_tokens and inputs["input_ids"].numel() > args.simulate_oom_tokens:
            raise torch.OutOfMemoryError(f"simulated: {inputs['input_ids'].numel()} tokens")
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = labelled_only_loss(model, inputs) if run.labelled_only else model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    losses = [step(inputs) for inputs, _, _ in batches[: args.warmup]]
    if cuda:
        torch.cuda.synchronize()
    warm = time.perf_counter() - started
    start = time.perf_counter()
    for inputs, _, _ in batches[args.warmup :]:
        losses.append(step(inputs))
    if cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    timed = batches[args.warmup :]
    real = sum(r for _, r, _ in timed)
    slots = sum(inputs["input_ids"].numel() for inputs, _, _ in timed)
    pairs = sum(p for _, _, p in timed)
    flops = flops_per_token * real + 12 * layers_dim * pairs
    return {
        "real_tokens_per_s": real / elapsed,
        "slot_tokens_per_s": slots / elapsed,
        "real_share": real / slots,
        "step_s": elapsed / len(timed),
        "warmup_s": warm,
        "model_tflops": flops / elapsed / 1e12,
        "peak_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
        "reserved_gb": torch.cuda.max_memory_reserved() / 1e9 if cuda else None,
        "width": int(timed[0][0]["input_ids"].shape[1]),
        "loss": float(np.mean(losses)),
    }


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- the run plan -----------------------------------------------------------------------------------------------------


def core_runs(family: str, attentions: list[str], seed_batch: int, big_batch: int) -> list[Run]:
    runs = [Run(family, "plain", seed_batch)]
    runs += [Run(family, "ours", seed_batch, attention) for attention in attentions]
    runs += [Run(family, "plain", big_batch)]
    runs += [Run(family, "ours", big_batch, attention) for attention in attentions]
    runs += [Run(family, "ours-no-packing", big_batch)]
    return runs


def search_series(family: str, attention: str, tiny: bool) -> dict[str, list[Run]]:
    """Batch sizes to try, ascending, per (path, checkpointing); each series stops at its first OOM."""
    sizes = {
        ("ours", False): [48, 64, 96, 128],
        ("ours", True): [128, 256],
        ("plain", False): [48, 64],
        ("plain", True): [64, 128],
    }
    if tiny:
        sizes = {key: [8, 16] for key in sizes}
    series = {}
    for (path, checkpointing), batches in sizes.items():
        name = f"{path}{', grad ckpt' if checkpointing else ''}"
        series[name] = [Run(family, path, b, attention if path == "ours" else "sdpa", checkpointing, name) for b in batches]
    return series


def matmul_ceiling_tflops(device, dtype) -> float | None:
    """The bf16 matmul rate this card reaches on 8192^3 matmuls (None on the CPU)."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=dtype)
    b = torch.randn(8192, 8192, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    repeats = 20
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * 8192**3 * repeats / (time.perf_counter() - start) / 1e12


def spec_tflops(device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((value for key, value in SPEC_BF16_TFLOPS.items() if key in name), None)


class Interrupted(BaseException):
    """SIGTERM (gpu_check.sh's `timeout`): stop and report what finished."""


def _interrupt(signum, frame):
    raise Interrupted


class Bench:
    """The runs of one invocation: what finished, what was skipped, and the time budget."""

    def __init__(self, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, attentions: list[str]):
        self.args, self.device, self.dtype, self.attentions = args, device, dtype, attentions
        self.began = time.perf_counter()
        self.done: list[Run] = []
        self.skipped: list[str] = []
        self.speed: dict[str, float] = {}  # the last all-slot tokens/s per family, to foresee a run's length
        self.best_attention = "sdpa"

    def elapsed(self) -> float:
        return time.perf_counter() - self.began

    def attempt(self, run: Run, model, optimizer, rows, config, n_matmul: int) -> bool:
        """Measure `run`; False on out-of-memory (recorded) or when it would not fit the time budget (skipped)."""
        args = self.args
        foreseen = (args.warmup + args.steps) * run.batch * MAX_SEQ_LENGTH / self.speed.get(run.family, float("inf"))
        if self.elapsed() + foreseen > args.budget_s:
            self.skipped.append(f"{run.family} {run.label()} at batch {run.batch}")
            return False
        batches = None
        try:
            batches = batches_for(run, rows, config, args.warmup + args.steps, args.seed, self.device)
            run.result = measure(run, model, optimizer, batches, args, self.device, self.dtype, 4 * n_matmul,
                                 config.num_layers * config.hidden_size)
        except torch.OutOfMemoryError as error:
            run.result = {"oom": str(error).splitlines()[0][:120]}
        except Exception as error:  # noqa: BLE001 - one broken run must not cost the others their device time
            traceback.print_exc()
            run.result = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"}
        finally:
            optimizer.zero_grad(set_to_none=True)
            del batches
            free(self.device)
        self.done.append(run)
        measured = "real_tokens_per_s" in run.result
        if measured:
            self.speed[run.family] = run.result["slot_tokens_per_s"]
        outcome = f"{run.result['real_tokens_per_s']:,.0f} real tokens/s" if measured else next(iter(run.result.values()))
        print(f"[{self.elapsed():5.0f}s] {run.family} {run.label()} batch {run.batch}: {outcome}", file=sys.stderr, flush=True)
        return measured

    def run_family(self, family: str) -> None:
        """ChatGLM-6B: the fixed batches, then the batch searches; ChatGLM3-6B: plain and ours at the big batch."""
        if self.elapsed() > self.args.budget_s:
            self.skipped.append(f"{family}: every run")
            return
        model, config = build_model(family, self.args.tiny, self.device, self.dtype)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        n_matmul = matmul_weights(model)
        rows = token_rows(row_lengths(6000, self.args.seed), family, config, self.args.seed)
        seed_batch, big_batch = 2, (8 if self.args.tiny else 32)
        try:
            if family == "chatglm-6b":
                for run in core_runs(family, self.attentions, seed_batch, big_batch):
                    self.attempt(run, model, optimizer, rows, config, n_matmul)
                finished = [r for r in self.done if r.path == "ours" and r.batch == big_batch and "loss" in r.result]
                if finished:
                    self.best_attention = max(finished, key=lambda r: r.result["real_tokens_per_s"]).attention
                for series in search_series(family, self.best_attention, self.args.tiny).values():
                    for run in series:
                        if not self.attempt(run, model, optimizer, rows, config, n_matmul):
                            break
            else:
                for run in (Run(family, "plain", big_batch), Run(family, "ours", big_batch, self.best_attention)):
                    self.attempt(run, model, optimizer, rows, config, n_matmul)
        finally:
            del model, optimizer
            free(self.device)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.write_lengths:
        write_lengths()
        return 0
    signal.signal(signal.SIGTERM, _interrupt)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    attentions = [a for a in args.attention.split(",") if a]
    if not cuda and "flex_attention" in attentions:
        attentions.remove("flex_attention")  # no FlexAttention backward on the CPU: the dry run skips it
        print("(CPU: flex_attention runs skipped, torch has no FlexAttention backward there)", file=sys.stderr)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        total = torch.cuda.get_device_properties(device).total_memory
        if total > CAP_BYTES:
            torch.cuda.set_per_process_memory_fraction(CAP_BYTES / total, device)
    ceiling, spec = matmul_ceiling_tflops(device, dtype), spec_tflops(device)
    bench = Bench(args, device, dtype, attentions)
    try:
        for family in ("chatglm-6b", "chatglm3-6b"):
            bench.run_family(family)
    except Interrupted:
        bench.skipped.append("the rest: stopped by SIGTERM (the step's time limit)")
    print(markdown(bench.done, bench.skipped, args, device, ceiling, spec))
    if args.out_json:
        args.out_json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"ceiling_tflops": ceiling, "spec_tflops": spec,
                   "runs": [{**vars(r), "label": r.label()} for r in bench.done], "skipped": bench.skipped}
        args.out_json.write_text(json.dumps(payload, indent=1), encoding="utf-8")
    return 1 if any("error" in r.result for r in bench.done) else 0


# -- report -----------------------------------------------------------------------------------------------------------


def markdown(done: list[Run], skipped: list[str], args, device, ceiling, spec) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run, tiny shapes)"
    lines = [
        f"LoRA r=8 on query_key_value, {'bf16 weights, bf16 autocast' if device.type == 'cuda' else 'fp32'}, AdamW; "
        f"{name}; BELLE-shaped rows at max_seq_length {MAX_SEQ_LENGTH}; {args.steps} timed steps after {args.warmup}; "
        f"bf16 matmul ceiling measured {ceiling:.0f} TFLOPs" if ceiling else f"{name}: no MFU on the CPU",
        "",
        "| model | path | batch | real tokens/s | all-slot tokens/s | real share | peak GB | MFU (measured ceiling) "
        "| MFU (spec peak) | s/step | warm-up s | mean loss |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value, pattern):
        return "n/a" if value is None else format(value, pattern)

    for run in done:
        r = run.result
        if "oom" in r or "error" in r:
            what = "OOM (> 79 GiB)" if "oom" in r else f"ERROR {r['error']}"
            lines.append(f"| {run.family} | {run.label()} | {run.batch} × {MAX_SEQ_LENGTH} | {what} | | | | | | | | |")
            continue
        mfu_ceiling = r["model_tflops"] / ceiling if ceiling else None
        mfu_spec = r["model_tflops"] / spec if spec else None
        lines.append(
            f"| {run.family} | {run.label()} | {run.batch} × {r['width']} | {r['real_tokens_per_s']:,.0f} | "
            f"{r['slot_tokens_per_s']:,.0f} | {r['real_share']:.0%} | {fmt(r['peak_gb'], '.1f')} | {fmt(mfu_ceiling, '.2f')} | "
            f"{fmt(mfu_spec, '.2f')} | {r['step_s']:.3f} | {r['warmup_s']:.1f} | {r['loss']:.3f} |"
        )
    lines += [""] + targets(done, ceiling)
    if skipped:
        lines += ["", f"skipped (time budget {args.budget_s:.0f} s): " + "; ".join(skipped)]
    lines += ["", "real tokens = non-pad tokens; MFU: model FLOPs 4·N per real token + 12·L·d per attended pair "
              "(see bench/gpu_train.py), over the measured bf16 matmul rate and over the spec peak."]
    return "\n".join(lines) + "\n"


def targets(done: list[Run], ceiling) -> list[str]:
    """The issue's targets, each met or not, from the runs that finished."""
    ok = [r for r in done if "loss" in r.result and r.family == "chatglm-6b"]

    def best(path, batch=None, checkpointing=None):
        pool = [r for r in ok if r.path == path and (batch is None or r.batch == batch)
                and (checkpointing is None or r.checkpointing == checkpointing)]
        return max(pool, key=lambda r: r.result["real_tokens_per_s"], default=None)

    lines = []
    top = best("ours")
    if top:
        mfu = top.result["model_tflops"] / ceiling if ceiling else None
        met = top.result["real_tokens_per_s"] >= 22000 and mfu is not None and mfu >= 0.70
        shown = "n/a" if mfu is None else f"{mfu:.2f}"
        lines.append(f"- best ours: {top.result['real_tokens_per_s']:,.0f} real tokens/s, MFU {shown} "
                     f"(batch {top.batch}, {top.label()}); target ≥ 22k and MFU ≥ 0.70: {'met' if met else 'NOT met'}")
    plain_seed, ours_seed = best("plain", 2), best("ours", 2)
    if plain_seed and ours_seed:
        ratio = ours_seed.result["real_tokens_per_s"] / plain_seed.result["real_tokens_per_s"]
        lines.append(f"- batch 2 × {MAX_SEQ_LENGTH}: ours {ratio:.2f}× the plain path's real tokens/s "
                     f"(target ≥ 2×: {'met' if ratio >= 2 else 'NOT met'})")
    memory = [r for r in ok if r.path == "ours" and r.batch == 32 and not r.checkpointing and r.result["peak_gb"] is not None]
    if memory:
        low = min(memory, key=lambda r: r.result["peak_gb"])
        plain_32 = best("plain", 32, False)
        vs = f", plain {plain_32.result['peak_gb']:.1f} GB" if plain_32 and plain_32.result["peak_gb"] else ""
        lines.append(f"- batch 32 × {MAX_SEQ_LENGTH} without gradient checkpointing: ours {low.result['peak_gb']:.1f} GB "
                     f"peak{vs} (target ≤ 35 GB: {'met' if low.result['peak_gb'] <= 35 else 'NOT met'})")
    plain_top = best("plain")
    if top and plain_top:
        lines.append(f"- best plain: {plain_top.result['real_tokens_per_s']:,.0f} real tokens/s (batch {plain_top.batch}, "
                     f"{plain_top.label()}); best ours {top.result['real_tokens_per_s'] / plain_top.result['real_tokens_per_s']:.2f}× that")
    return lines


if __name__ == "__main__":
    sys.exit(main())
