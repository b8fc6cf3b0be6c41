"""Serving under load: the batching engine against one request at a time, and its per-token cost.

    python bench/serve_load.py                          # CPU: `instructglm serve` under 1/4/8/16 openai clients
    python bench/serve_load.py --profile                # CPU: one decode step, engine vs `generate`, profiled
    python bench/serve_load.py --device cuda --real-shape   # GPU: decode tok/s at the 6B shape (random weights)
    ... --out table.md                                  # also write the markdown table there

Load (default): a tiny random ChatGLM-6B-architecture model (the demo's: 2 layers, hidden 64, the demo
tokenizer) is served twice on 127.0.0.1 by the real command, `instructglm serve --max_batch_size N`
(batching) and `--max_batch_size 1` (one at a time); for 1, 4, 8 and 16 concurrent clients, each client
sends `--requests` streaming chat completions (greedy, `--max_tokens` each, prompts of different
lengths) through the official `openai` client, the two servers taking turns at each level. Reported
per server and level: aggregate completion tokens/s (all clients' tokens / wall time), p50/p95 time to
first token and latency, failed requests; and whether every answer equals the one-at-a-time server's.
Each level runs `--rounds` times, the two servers alternating; the fastest round of each is reported,
with the median of the per-round ratios (each round's pair ran back to back, so a burst of load from
other work on a shared machine hits both) and tokens per second of server CPU time (what other work on
the machine cannot inflate). Bounded: `--requests` per client, `--time_limit` seconds per level and
round (requests not started by then are not sent and are counted as skipped), loopback only.

Profile (`--profile`): tokens/s at batch 1 through the engine and through `model.generate`, and the
functions where a decode step's time goes (cProfile, by own time) in each.

GPU (`--device cuda --real-shape`; `--decode` for a dry run on the CPU at a small shape): random fp16
weights at ChatGLM-6B's shape (28 x 4096): decode tokens/s
at batch 1 through `generate` and through the engine (static KV cache + torch.compile with CUDA graphs)
with a LoRA adapter unmerged and merged; then aggregate tokens/s with 1, 8 and 32 requests submitted at
once to the engine (merged). Each measurement that fails prints FAILED with its reason in the table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from machine import machine  # bench/machine.py (this directory is on sys.path when a bench runs)

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "hi",
    "What is two plus three?",
    "Write the numbers one to ten in English words, separated by commas.",
    "你好，请介绍一下你自己。",
    "Translate to Chinese: the quick brown fox jumps over the lazy dog.",
    "Reverse the letters of the word keyboard, then say it backwards again and explain the result in detail.",
    "一二三四五六七八九十",
    "say hello",
]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


# --- load: servers and clients ------------------------------------------------------------------


def start_server(model_dir: Path, port: int, max_batch_size: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), env.get("PYTHONPATH", "")])
    command = [sys.executable, "-m", "instructglm.cli", "serve", "--model_name_or_path", str(model_dir), "--device", "cpu",
               "--host", "127.0.0.1", "--port", str(port), "--max_batch_size", str(max_batch_size), "--max_queue", "256",
               "--max_tokens_limit", "1024", "--template", "plain"]
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    process.log_path = log
    return process


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server at {url} exited with {process.returncode}:\n{process.log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"the server at {url} did not start in {timeout:.0f} s")


def one_request(client, prompt: str, max_tokens: int) -> dict:
    """A streaming chat completion: its text, tokens, time to first token and latency (or its error)."""
    start = time.perf_counter()
    first = None
    parts: list[str] = []
    tokens = 0
    try:
        stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                                temperature=0, stream=True, stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                if first is None:
                    first = time.perf_counter() - start
                parts.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as error:  # counted, reported: a failed request is a result here
        return {"prompt": prompt, "error": f"{type(error).__name__}: {error}"}
    return {"prompt": prompt, "text": "".join(parts), "tokens": tokens, "ttft": first if first is not None else float("nan"),
            "latency": time.perf_counter() - start}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), 0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(url: str, clients: int, requests: int, max_tokens: int, time_limit: float, server_pid: int = 0) -> dict:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=max(60.0, time_limit))
    deadline = time.monotonic() + time_limit
    results: list[dict] = []
    skipped = 0
    lock = threading.Lock()

    def worker(index: int) -> None:
        nonlocal skipped
        for j in range(requests):
            if time.monotonic() > deadline:
                with lock:
                    skipped += requests - j
                return
            result = one_request(client, PROMPTS[(index * requests + j) % len(PROMPTS)], max_tokens)
            with lock:
                results.append(result)

    start, cpu_start = time.perf_counter(), cpu_seconds(server_pid)
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    wall = time.perf_counter() - start
    server_cpu = cpu_seconds(server_pid) - cpu_start
    done = [r for r in results if "error" not in r]
    return {
        "wall": wall,
        "tokens_per_cpu_s": sum(r["tokens"] for r in done) / server_cpu if server_cpu > 0 else float("nan"),
        "tokens": sum(r["tokens"] for r in done),
        "tokens_per_s": sum(r["tokens"] for r in done) / wall,
        "ttft": [r["ttft"] for r in done],
        "latency": [r["latency"] for r in done],
        "errors": [r["error"] for r in results if "error" in r],
        "skipped": skipped,
        "answers": {r["prompt"]: r["text"] for r in done},
        "requests": len(results),
    }


def build_model(root: Path, family: str) -> Path:
    """The tiny model every load run serves: the demo's ChatGLM-6B architecture, or a tiny Llama."""
    if family == "chatglm":
        from instructglm.demo.pipeline import build_tiny_chatglm

        return build_tiny_chatglm(root / "chatglm", seed=0)
    sys.path.insert(0, str(REPO))
    from tests.tiny_models import tiny_llama_dir

    return tiny_llama_dir(root / "llama", seed=0)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_load(args) -> str:
    servers = {"batching": args.max_batch_size, "one at a time": 1}
    levels = [int(n) for n in args.clients.split(",")]
    with tempfile.TemporaryDirectory(prefix="serve_load-") as tmp:
        model_dir = build_model(Path(tmp), args.family)
        processes, urls = {}, {}
        try:
            for name, size in servers.items():
                port = free_port()
                urls[name] = f"http://127.0.0.1:{port}"
                processes[name] = start_server(model_dir, port, size, Path(tmp) / f"{size}.log")
            for name in servers:
                wait_ready(urls[name], processes[name])
                run_level(urls[name], 1, 1, 4, 60)  # warm-up: first forward, first tokenizer calls
            results = {name: {} for name in servers}
            ratios: dict[int, list[float]] = {clients: [] for clients in levels}
            for clients in levels:
                for round_ in range(args.rounds):
                    speeds = {}
                    for name in servers:  # turns at each level, so machine-load drift hits both alike
                        r = run_level(urls[name], clients, args.requests, args.max_tokens, args.time_limit, processes[name].pid)
                        speeds[name] = r["tokens_per_s"]
                        print(f"  {name:14s} {clients:3d} clients, round {round_ + 1}: {r['tokens_per_s']:8.1f} tok/s, "
                              f"{len(r['errors'])} errors", file=sys.stderr)
                        best = results[name].get(clients)
                        # the fastest round is reported; failures and answers of every round count
                        if best is not None:
                            r["errors"] += best["errors"]
                            r["skipped"] += best["skipped"]
                            r["mismatch"] = best["mismatch"] + [(p, t) for p, t in r["answers"].items() if best["answers"].get(p, t) != t]
                            r["answers"] = {**best["answers"], **r["answers"]}
                            if best["tokens_per_s"] > r["tokens_per_s"]:
                                r = {**best, "errors": r["errors"], "skipped": r["skipped"], "mismatch": r["mismatch"], "answers": r["answers"]}
                        else:
                            r["mismatch"] = []
                        results[name][clients] = r
                    ratios[clients].append(speeds["batching"] / speeds["one at a time"])
        finally:
            for process in processes.values():
                process.terminate()
            for process in processes.values():
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
    reference = {}
    for r in results["one at a time"].values():
        reference.update(r["answers"])
    lines = [
        f"`instructglm serve` under load — {machine()} (a shared machine: ratios are the result); tiny {args.family} "
        f"(2 layers, hidden 64), CPU, 1 torch thread per server; streaming, greedy, max_tokens {args.max_tokens}, "
        f"{args.requests} requests per client, fastest of {args.rounds} interleaved rounds (failures and answers: all rounds); "
        f"batching server --max_batch_size {args.max_batch_size}",
        "",
        "| clients | server | tokens/s | vs one at a time (best / median of paired rounds) | tokens per server CPU s "
        "| TTFT p50 / p95 (ms) | latency p50 / p95 (ms) | failed | skipped | answers = one at a time |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for clients in levels:
        single = results["one at a time"][clients]["tokens_per_s"]
        for name in servers:
            r = results[name][clients]
            same = not r["mismatch"] and all(reference.get(p) == text for p, text in r["answers"].items())
            versus = f"{r['tokens_per_s'] / single:.2f}x / {statistics.median(ratios[clients]):.2f}x" if name == "batching" else "1.00x"
            lines.append(
                f"| {clients} | {name} | {r['tokens_per_s']:.0f} | {versus} | {r['tokens_per_cpu_s']:.0f} | "
                f"{1000 * percentile(r['ttft'], 0.5):.0f} / {1000 * percentile(r['ttft'], 0.95):.0f} | "
                f"{1000 * percentile(r['latency'], 0.5):.0f} / {1000 * percentile(r['latency'], 0.95):.0f} | "
                f"{len(r['errors'])} | {r['skipped']} | {'yes' if same else 'NO'} ({len(r['answers'])} distinct prompts) |"
            )
    errors = [e for name in servers for r in results[name].values() for e in r["errors"]]
    if errors:
        lines += ["", "First errors: " + "; ".join(sorted(set(errors))[:3])]
    return "\n".join(lines)


# --- profile: one decode step -------------------------------------------------------------------


# (label, [(file suffix, function)]) whose cumulative times make up one part of a decode step
PROFILE_PARTS = [
    ("whole step (`_sample` loop body / `BatchEngine.step`)", [("generation/utils.py", "_sample"), ("infer/engine.py", "step")]),
    ("model forward (embeddings, 2 blocks, head)", [("chatglm/model.py", "forward")]),
    ("  of which: mask from the 2-D padding mask, as bias", [("chatglm/model.py", "prefix_lm_inputs")]),
    ("  of which: rotary cos/sin and 2-D rotation", [("chatglm/model.py", "apply_2d_rotary")]),
    ("  of which: KV cache update (`Cache.update`)", [("transformers/cache_utils.py", "update")]),
    ("  of which: `ModelOutput` dataclasses", [("utils/generic.py", "__init__")]),
    ("2-D positions over the whole sequence (`prefix_lm_positions`)", [("chatglm/model.py", "prefix_lm_positions")]),
    ("`prepare_inputs_for_generation` (positions included)", [("chatglm/model.py", "prepare_inputs_for_generation")]),
    ("logits processors + stopping criteria", [("generation/logits_process.py", "__call__"), ("generation/stopping_criteria.py", "__call__")]),
    ("`generate` kwargs update / unfinished check", [("generation/utils.py", "_update_model_kwargs_for_generation"), ("generation/utils.py", "_has_unfinished_sequences")]),
    ("engine: positions, mask, input tensors", [("infer/engine.py", "position_tensor"), ("infer/engine.py", "decode_mask"), ("infer/engine.py", "valid_columns")]),
    ("engine: choosing tokens (argmax / sampling)", [("infer/engine.py", "_choose")]),
    ("engine: accepting tokens, retiring rows", [("infer/engine.py", "_accept"), ("infer/engine.py", "_retire")]),
]


def run_profile(args) -> str:
    import cProfile
    import io
    import pstats

    import torch

    from instructglm.infer.engine import BatchEngine, GenerationRequest, encode_prompt, generate_requests
    from instructglm.infer.load import load_model

    torch.set_num_threads(1)
    tokens = args.max_tokens
    with tempfile.TemporaryDirectory(prefix="serve_profile-") as tmp:
        model_dir = build_model(Path(tmp), args.family)
        model, tokenizer, _ = load_model(str(model_dir), device="cpu")
    prompt = PROMPTS[2]
    inputs = tokenizer([prompt], return_tensors="pt")
    kwargs = dict(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    engine = BatchEngine(model, tokenizer, max_batch_size=1, stop_ids=[])  # no stop ids: exactly `tokens` tokens
    request = GenerationRequest(encode_prompt(tokenizer, prompt), tokens)

    def with_generate() -> None:
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)
        assert out.shape[1] == inputs["input_ids"].shape[1] + tokens

    def with_engine() -> None:
        (handle,) = generate_requests(engine, [request])
        assert len(handle.token_ids) == tokens

    variants = {"model.generate": with_generate, "engine": with_engine}
    best = {name: float("inf") for name in variants}
    for fn in variants.values():
        fn()
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    lines = [
        f"batch-1 decode, tiny {args.family} (2 layers, hidden 64), CPU, 1 thread — {machine()}; {tokens} new tokens "
        f"(prefill included), best of {args.repeats}",
        "",
        "| path | tokens/s | ms per token |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {tokens / t:.0f} | {1000 * t / tokens:.3f} |" for name, t in best.items()]
    profiles = {}
    for name, fn in variants.items():
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(5):
            fn()
        profiler.disable()
        profiles[name] = pstats.Stats(profiler, stream=io.StringIO())
    steps = 5 * tokens
    lines += ["", "Where a step's time goes, by part (cProfile cumulative time per step, µs; the profiler inflates all of it):", "",
              "| part | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for label, functions in PROFILE_PARTS:
        cells = []
        for name in variants:
            times = [entry[3] for (filename, _, function), entry in profiles[name].stats.items()
                     if any(filename.endswith(suffix) and function == wanted for suffix, wanted in functions)]
            # nested functions of one name (the model's forwards) count once: the outermost, the largest
            total = max(times, default=0) if label.startswith("model forward") else sum(times)
            cells.append(f"{1e6 * total / steps:.0f}" if total else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    for name, fn in variants.items():
        stats = profiles[name]
        total = sum(entry[2] for entry in stats.stats.values())  # own time of every function
        rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[: args.top]
        lines += ["", f"{name}: top functions by own time ({steps} steps, {1e6 * total / steps:.0f} µs per step under the profiler)", "",
                  "| function | calls per step | µs per step | share |", "|---|---:|---:|---:|"]
        for (filename, line, function), (calls, _, own, _, _) in rows:
            where = f"{Path(filename).name}:{line}({function})" if line else function
            lines.append(f"| `{where}` | {calls / (5 * tokens):.1f} | {1e6 * own / (5 * tokens):.1f} | {100 * own / total:.0f}% |")
    return "\n".join(lines)


# --- GPU: the real shape ------------------------------------------------------------------------

REAL_6B = {"hidden_size": 4096, "num_layers": 28, "num_attention_heads": 32, "inner_hidden_size": 16384, "vocab_size": 130528}
# the same table on a small model (a dry run of this section on the CPU: --decode --device cpu)
SMALL = {"hidden_size": 256, "num_layers": 4, "num_attention_heads": 8, "inner_hidden_size": 1024, "vocab_size": 4096}


def build_shape(shape: dict, device: str, dtype):
    import torch

    import instructglm  # noqa: F401  (registers ChatGLM)
    from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

    v = shape["vocab_size"]
    config = ChatGLMConfig(**shape, max_sequence_length=2048, bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=3,
                           mask_token_id=v - 4, gmask_token_id=v - 3)
    torch.manual_seed(0)
    with torch.device(device):
        model = ChatGLMForConditionalGeneration(config).to(dtype)
    return model.eval()


def random_prompt(config, length: int, seed: int) -> list[int]:
    """Random ids ending in ChatGLM's `[gMASK] <sop>`, as the tokenizer would produce."""
    import torch

    ids = torch.randint(10, config.vocab_size - 10, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids[:-2] + [config.gmask_token_id, config.bos_token_id]


def timed(fn, device: str) -> float:
    import torch

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def engine_tokens_per_s(model, config, batch: int, args, device: str, decode: str) -> tuple[float, float]:
    """(decode tokens/s with `batch` requests submitted at once, seconds the first run took: compile + warm-up)."""
    from instructglm.infer.engine import BatchEngine, GenerationRequest, generate_requests

    options = {"backend": "cudagraphs"} if args.compile_backend == "cudagraphs" else {"mode": "reduce-overhead"}
    engine = BatchEngine(model, None, max_batch_size=batch, max_queue=None, max_seq_len=args.prompt_len + args.new_tokens,
                         decode=decode, stop_ids=[], compile_options=options)
    requests = [GenerationRequest(random_prompt(config, args.prompt_len, i), args.new_tokens) for i in range(batch)]
    first = timed(lambda: generate_requests(engine, requests), device)
    if engine.mode != decode:
        raise RuntimeError(f"the engine fell back to {engine.mode} decoding (see the log above)")
    best = min(timed(lambda: generate_requests(engine, requests), device) for _ in range(args.repeats))
    return batch * args.new_tokens / best, first


def generate_tokens_per_s(model, config, args, device: str) -> float:
    import torch

    ids = torch.tensor([random_prompt(config, args.prompt_len, 0)], device=device)
    kwargs = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=3)

    def run():
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

    run()
    return args.new_tokens / min(timed(run, device) for _ in range(args.repeats))


def run_decode(args) -> str:
    import copy

    import torch
    from peft import LoraConfig, get_peft_model

    device = args.device
    cuda = device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("float16" if cuda else "float32"))
    shape = REAL_6B if args.real_shape else SMALL
    base = build_shape(shape, device, dtype)
    config = base.config
    lora = LoraConfig(r=8, lora_alpha=32, target_modules=["query_key_value"], init_lora_weights=False)
    merged = get_peft_model(copy.deepcopy(base), lora).merge_and_unload().eval()
    unmerged = get_peft_model(base, lora).eval()  # the base itself, wrapped: no third copy of 12 GB
    where = torch.cuda.get_device_name(device) if cuda else machine()
    title = (f"ChatGLM-6B architecture {config.num_layers} x {config.hidden_size} (vocab {config.vocab_size}), random {dtype} "
             f"weights, {where}; prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, best of {args.repeats}; "
             f"compiled with {args.compile_backend}; torch {torch.__version__}")
    lines = [title, "", "| decode | requests at once | tokens/s | first run (compile + warm-up) s |", "|---|---:|---:|---:|"]
    # Rows go to stdout as they are measured, so a run cut short by a time limit still shows them.
    print("\n".join(lines), flush=True)
    compiled = "static cache + torch.compile (CUDA graphs)" if cuda else "static cache + torch.compile (no CUDA graphs on a CPU)"

    def row(label: str, batch: int, measure) -> None:
        try:
            value = measure()
            speed, first = value if isinstance(value, tuple) else (value, None)
            lines.append(f"| {label} | {batch} | {speed:.1f} | {'' if first is None else f'{first:.0f}'} |")
        except Exception as error:  # one failed measurement must not hide the others
            lines.append(f"| {label} | {batch} | FAILED: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''} | |")
        print(lines[-1], flush=True)

    # The most wanted first: batch-1 decode through the compiled engine, then what it is compared with.
    for name, model in (("LoRA merged", merged), ("LoRA unmerged", unmerged)):
        row(f"engine, {compiled}, {name}", 1, lambda: engine_tokens_per_s(model, config, 1, args, device, "compiled"))
    for batch in (int(b) for b in args.concurrency.split(",") if int(b) != 1):
        row(f"engine, {compiled}, LoRA merged", batch, lambda: engine_tokens_per_s(merged, config, batch, args, device, "compiled"))
    for name, model in (("LoRA merged", merged), ("LoRA unmerged", unmerged)):
        row(f"`generate`, {name}", 1, lambda: generate_tokens_per_s(model, config, args, device))
        row(f"engine, dynamic cache, {name}", 1, lambda: engine_tokens_per_s(model, config, 1, args, device, "dynamic"))
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (load test or --profile) or cuda (the GPU section)")
    parser.add_argument("--real-shape", action="store_true", help="GPU: the 6B shape (28 x 4096)")
    parser.add_argument("--profile", action="store_true", help="CPU: profile one decode step, engine vs generate")
    parser.add_argument("--decode", action="store_true", help="the decode table (the default on cuda); on the CPU a dry run at a small shape")
    parser.add_argument("--family", default="chatglm", choices=["chatglm", "llama"], help="the tiny model (CPU)")
    parser.add_argument("--clients", default="1,4,8,16", help="concurrent clients per level")
    parser.add_argument("--requests", type=int, default=6, help="requests per client per level and round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per level (the fastest is reported)")
    parser.add_argument("--max_tokens", type=int, default=64, help="max_tokens per request (CPU)")
    parser.add_argument("--max_batch_size", type=int, default=16, help="the batching server's --max_batch_size")
    parser.add_argument("--time_limit", type=float, default=300, help="seconds per level and server before no new request starts")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats (profile, decode table)")
    parser.add_argument("--top", type=int, default=15, help="functions listed per profile")
    parser.add_argument("--dtype", default=None, help="GPU dtype (default float16)")
    parser.add_argument("--prompt_len", type=int, default=32, help="GPU: prompt tokens")
    parser.add_argument("--new_tokens", type=int, default=64, help="GPU: new tokens per request")
    parser.add_argument("--concurrency", default="1,8,32", help="GPU: requests submitted at once")
    parser.add_argument("--compile_backend", default="inductor", choices=["inductor", "cudagraphs"],
                        help="GPU: torch.compile(mode='reduce-overhead') (inductor + CUDA graphs), or backend='cudagraphs' (faster to compile)")
    parser.add_argument("--out", default=None, help="also write the table to this file")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO / "src"))
    if args.device.startswith("cuda") or args.decode:
        table = run_decode(args)  # printed row by row
    else:
        table = run_profile(args) if args.profile else run_load(args)
        print(table)
    if args.out:
        Path(args.out).write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
