"""Rows/s of `instructglm tokenize` against the 2023 seed's loop and raw sentencepiece, in one run.

    python bench/tokenize_speed.py [--rows 20000] [--tokenizer DIR] [--out FILE]

Rows are synthetic but shaped like the BELLE 0.5M set the seed tokenized: their lengths in
characters follow the describe() table in yanqiangmiffy/InstructGLM's README (below), the text
is cut from real Chinese instructions and answers (the shared Alpaca-zh sample; a built-in
paragraph without it), and the prompt is the seed's BELLE template `指令: {input}\\n答案: `.

Measured, each from the same jsonl with the same ChatGLM-6B tokenizer:
- baseline: the seed script's loop — one `tokenizer.encode` per prompt and per target inside a
  Python generator fed to `datasets.Dataset.from_generator`, then `save_to_disk` — run here with
  THIS project's native tokenizer on transformers 5 (loaded once, not timed). It is not the 2023
  stack: the acceptance run measured this loop 0.8x as fast with our tokenizer as with THUDM's
  own (its remote code on transformers 4.33.3), so against the seed as it ran in 2023 the
  in-process speed-ups below are about 0.8x the ones printed (there: 9-11x wall, 7-8x CPU);
- ours in process: `tokenize_jsonl` (read + batched encode + truncation + save_to_disk), num_proc
  1 and 2, tokenizer loaded once, not timed;
- ours as a whole command: `python tokenize_dataset_rows.py ...` end to end in a fresh process —
  interpreter start, imports, tokenizer load, the work, and reading the dataset back to print its
  head as the seed did. This is what a user waits for; on small files the start-up dominates
  (the acceptance run: 0.37x the seed's whole script on 2k rows, 1.9x on 20k, when `import
  instructglm` took ~5 s);
- sentencepiece: `SentencePieceProcessor.encode` of all prompts and targets in one call, with no
  ChatGLM text preprocessing and no dataset: the floor any tokenizer wrapper sits on.
Rounds interleave the methods and each method's fastest round is reported (the least disturbed
by other work), as wall time and as CPU time (user + system, worker processes included). The
machine's cores are shared, so absolute numbers are noisy; ratios within one run are the result.
Exits non-zero if ours differs from the seed loop's ids with our truncation rule applied.
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
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INSTRUCTGLM_SHARED", REPO.parent / "shared"))
SEED = "baseline: the seed's loop (encode per row → Dataset.from_generator) with our tokenizer, transformers 5"
FLOOR = "sentencepiece batch encode (floor, no dataset)"
COMMAND = "ours, whole command: `python tokenize_dataset_rows.py ...`, num_proc={}, start-up included"
IN_PROCESS = "ours in process: `tokenize_jsonl`, num_proc={}"

# BELLE generated_train_0.5M_CN, lengths in characters (yanqiangmiffy/InstructGLM README):
#            count   mean    std    min  25%  50%  75%  90%   max
# input   543314  83.54   95.67     4   33   51   88  194  4410
# target  543314 121.08  165.47     1   27   67  151  296  9463
BELLE_LENGTHS = {
    "input": {"mean": 83.54, "quantiles": [(0.0, 4), (0.25, 33), (0.5, 51), (0.75, 88), (0.9, 194), (1.0, 4410)]},
    "target": {"mean": 121.08, "quantiles": [(0.0, 1), (0.25, 27), (0.5, 67), (0.75, 151), (0.9, 296), (1.0, 9463)]},
}
FALLBACK_TEXT = (
    "地球是太阳系中唯一已知存在生命的行星，拥有液态水、适宜的温度和富含氧气的大气层。"
    "学习一门新的语言需要坚持每天练习听说读写，并在真实的场景中使用它。"
    "Here is a short answer in English, because real instruction sets mix languages.\n"
    "1. 制定计划\n2. 按时执行\n3. 定期复盘    保持耐心。"
)


def _quantile_function(knots: list[tuple[float, float]]):
    """Log-linear interpolation between the table's quantiles: u in [0, 1] -> length."""
    us = np.array([u for u, _ in knots])
    logs = np.log([v for _, v in knots])
    return lambda u: np.exp(np.interp(u, us, logs))


def length_sampler(table: dict) -> Callable[[np.random.Generator, int], np.ndarray]:
    """Lengths with the table's quantiles and mean.

    The table gives nothing between its 90% point and the max, and a straight line there puts
    far too much mass in the tail; so a 99% knot is added and placed where the mean comes out
    as the table's.
    """
    base = table["quantiles"]
    grid = (np.arange(200_000) + 0.5) / 200_000
    low, high = base[-2][1], base[-1][1]
    for _ in range(60):
        q99 = (low + high) / 2
        knots = base[:-1] + [(0.99, q99)] + base[-1:]
        mean = np.round(_quantile_function(knots)(grid)).mean()
        low, high = (q99, high) if mean < table["mean"] else (low, q99)
    quantile = _quantile_function(knots)
    return lambda rng, n: np.maximum(1, np.round(quantile(rng.random(n)))).astype(int)


def synthetic_rows(count: int, corpus: str, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    inputs = length_sampler(BELLE_LENGTHS["input"])(rng, count)
    targets = length_sampler(BELLE_LENGTHS["target"])(rng, count)
    # windows of the corpus, from any start: repeated so the longest window fits after every start
    text = corpus * (2 + int(max(inputs.max(), targets.max())) // len(corpus))

    def cut(length: int) -> str:
        start = int(rng.integers(0, len(corpus)))
        return text[start : start + length]

    return [{"context": f"指令: {cut(i)}\n答案: ", "target": cut(t)} for i, t in zip(inputs, targets, strict=True)]


def load_corpus(path: Path | None) -> str:
    if path is None or not path.is_file():
        return FALLBACK_TEXT
    records = json.loads(path.read_text(encoding="utf-8"))
    return "".join(r["instruction"] + r.get("input", "") + r["output"] for r in records)


def seed_way(jsonl: Path, save_path: Path, tokenizer, max_seq_length: int, cache_dir: Path):
    """What `tokenize_dataset_rows.py` (2023) did, with the tokenizer passed in instead of loaded inside."""
    import datasets

    def rows():
        with open(jsonl, encoding="utf-8") as f:
            for line in f.readlines():
                example = json.loads(line)
                prompt_ids = tokenizer.encode(example["context"], max_length=max_seq_length, truncation=True)
                target_ids = tokenizer.encode(
                    example["target"], max_length=max_seq_length, truncation=True, add_special_tokens=False
                )
                yield {"input_ids": prompt_ids + target_ids + [tokenizer.eos_token_id], "seq_len": len(prompt_ids)}

    dataset = datasets.Dataset.from_generator(rows, cache_dir=str(cache_dir))
    dataset.save_to_disk(str(save_path))
    return dataset


def whole_command(jsonl: Path, save_path: Path, tokenizer_dir: Path, max_seq_length: int, num_proc: int):
    """`python tokenize_dataset_rows.py ...` in a fresh interpreter, as a user runs it; fails loudly."""
    argv = [sys.executable, str(REPO / "tokenize_dataset_rows.py"), "--jsonl_path", str(jsonl), "--save_path", str(save_path)]
    argv += ["--model_name_or_path", str(tokenizer_dir), "--max_seq_length", str(max_seq_length), "--num_proc", str(num_proc)]
    env = {**os.environ, "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TQDM_DISABLE": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the whole command failed ({done.returncode}):\n{done.stderr[-2000:]}")


def cpu_seconds() -> float:
    """CPU time of this process, its threads and its finished child processes."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(fn):
    """(wall seconds, CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), cpu_seconds()
    result = fn()
    return time.perf_counter() - wall, cpu_seconds() - cpu, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000, help="synthetic rows to tokenize")
    parser.add_argument(
        "--tokenizer", type=Path, default=SHARED / "tokenizers" / "chatglm-6b", help="ChatGLM-6B tokenizer dir"
    )
    parser.add_argument(
        "--corpus",
        type=Path,
        default=SHARED / "data" / "llamafactory__alpaca_zh_demo.json",
        help="Alpaca-shaped JSON whose text the rows are cut from (a built-in paragraph if missing)",
    )
    parser.add_argument("--max_seq_length", type=int, default=320, help="as in the seed's BELLE command")
    parser.add_argument("--num_proc", default="1,2", help="comma-separated worker counts to time for ours")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each method's fastest round is reported")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    if not (args.tokenizer / "ice_text.model").is_file():
        parser.error(f"{args.tokenizer}/ice_text.model not found: pass --tokenizer DIR (a chatglm-6b tokenizer dir)")

    import datasets
    import sentencepiece
    from transformers import AutoTokenizer

    import instructglm  # noqa: F401  (registers ChatGLM)
    from instructglm.data.tokenize import tokenize_jsonl

    datasets.disable_progress_bars()  # their redraws cost time in every method alike; keep the output a table
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    rows = synthetic_rows(args.rows, load_corpus(args.corpus), args.seed)
    processor = sentencepiece.SentencePieceProcessor(model_file=str(args.tokenizer / "ice_text.model"))
    texts = [r["context"] for r in rows] + [r["target"] for r in rows]
    num_procs = [int(n) for n in args.num_proc.split(",")]
    limit = args.max_seq_length
    # name -> [(wall, cpu)] over the rounds; rounds interleave the methods so that load from
    # other work on the machine falls on all of them alike
    runs: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="tokenize-bench-") as tmp:
        tmp = Path(tmp)
        jsonl = tmp / "belle_like.jsonl"
        jsonl.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        for round_ in range(args.repeat):
            # a fresh cache dir per round, or from_generator would reuse the last round's result
            cache = tmp / f"cache-{round_}"
            wall, cpu, seed_dataset = timed(partial(seed_way, jsonl, tmp / "seed", tokenizer, limit, cache))
            runs.setdefault(SEED, []).append((wall, cpu))
            for num_proc in num_procs:
                ours = partial(
                    tokenize_jsonl,
                    jsonl,
                    tmp / f"ours-{num_proc}",
                    tokenizer,
                    limit,
                    num_proc=num_proc,
                    model_type="chatglm",
                    progress=False,
                )
                wall, cpu, counts = timed(ours)
                runs.setdefault(IN_PROCESS.format(num_proc), []).append((wall, cpu))
                command = partial(whole_command, jsonl, tmp / f"command-{num_proc}", args.tokenizer, limit, num_proc)
                wall, cpu, _ = timed(command)
                runs.setdefault(COMMAND.format(num_proc), []).append((wall, cpu))
            wall, cpu, _ = timed(partial(processor.encode, texts))
            runs.setdefault(FLOOR, []).append((wall, cpu))
            walls = ", ".join(f"{rounds[-1][0]:.2f}" for rounds in runs.values())
            print(f"round {round_ + 1}/{args.repeat}: wall seconds {walls}", file=sys.stderr)

        # ours must be the seed's ids with our truncation rule applied to them
        eos = tokenizer.eos_token_id
        expected = []
        for ids, seq_len in zip(seed_dataset["input_ids"], seed_dataset["seq_len"], strict=True):
            if len(ids) == seq_len + 1 or seq_len + 2 > limit:
                continue  # empty target, or no room for one target token: dropped
            expected.append(ids if len(ids) <= limit else ids[: limit - 1] + [eos])
        same = all(datasets.load_from_disk(str(tmp / f"ours-{n}"))["input_ids"] == expected for n in num_procs)
        over = sum(len(ids) > limit for ids in seed_dataset["input_ids"])

    # the fastest round is the least disturbed by other work
    best = {name: (min(w for w, _ in rounds), min(c for _, c in rounds)) for name, rounds in runs.items()}
    seed_wall, seed_cpu = best[SEED]
    context_chars = np.array([len(r["context"]) for r in rows])
    target_chars = np.array([len(r["target"]) for r in rows])
    lines = [
        f"tokenize speed: {args.rows} BELLE-shaped rows (chars: context mean {context_chars.mean():.0f} / median "
        f"{np.median(context_chars):.0f} / max {context_chars.max()}, target mean {target_chars.mean():.0f} / median "
        f"{np.median(target_chars):.0f} / max {target_chars.max()}), max_seq_length {args.max_seq_length}, "
        f"{os.cpu_count()} CPUs, fastest of {args.repeat} interleaved rounds",
        "",
        "| method | wall s | rows/s | vs baseline (wall) | CPU s | vs baseline (CPU) | whole command vs in process (wall) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, (wall, cpu) in best.items():
        speedups = f"{seed_wall / wall:.1f}× | {cpu:.2f} | {seed_cpu / cpu:.1f}×"
        versus = ""
        for num_proc in num_procs:
            if name == COMMAND.format(num_proc):
                versus = f"{best[IN_PROCESS.format(num_proc)][0] / wall:.2f}×"
        lines.append(f"| {name} | {wall:.2f} | {args.rows / wall:,.0f} | {speedups} | {versus} |")
    lines += [
        "",
        "CPU s = user + system time of this process, its threads and its worker processes (the whole command's too).",
        "The baseline runs the seed's loop with this project's tokenizer on transformers 5, not the 2023 stack: the",
        "acceptance run measured that loop 0.8× as fast as with THUDM's own tokenizer on transformers 4.33.3, so",
        "against the 2023 seed the in-process speed-ups are about 0.8× those printed (measured there: 9-11× wall,",
        "7-8× CPU). The whole-command rows include interpreter start-up, imports and the tokenizer load, which the",
        "in-process rows do not; 'whole command vs in process' is the in-process wall time over the command's.",
        f"ours kept {counts.kept} rows ({counts.truncated} truncated, {counts.dropped_prompt_too_long} dropped: "
        f"prompt too long, {counts.dropped_empty_target}: empty target); the seed kept all {len(seed_dataset)}, "
        f"{over} of them longer than max_seq_length. Ours equals the seed's ids with our truncation rule applied: "
        f"{'yes' if same else 'NO'}.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n", encoding="utf-8")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
