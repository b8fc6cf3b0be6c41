"""Batched generation over a jsonl: each row's `context` in, the row plus `prediction` out.

    instructglm predict --model_name_or_path THUDM/chatglm-6b --adapter output/alpaca \\
        --input data/test.jsonl --output predictions.jsonl --batch_size 8

Rows are generated in left-padded batches, in input order. After every batch the finished rows
are appended to `--output` and flushed to disk, so an interrupted run (Ctrl-C, kill, crash)
loses at most the batch in flight: rerun the same command and it continues after the last
complete line, dropping a half-written one, never writing a row twice. `--overwrite true`
starts over. With greedy decoding (the default here), batched output equals one-at-a-time output.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from instructglm.infer.generate import GenerationArguments, generate_batch
from instructglm.infer.load import ModelArguments, load_from_args


@dataclass
class PredictArguments:
    input: str = field(metadata={"help": "jsonl with a `context` field per row (the output of `convert`)."})
    output: str = field(metadata={"help": "jsonl to write: each input row plus `prediction`."})
    batch_size: int = field(default=8, metadata={"help": "Rows per generation batch."})
    overwrite: bool = field(default=False, metadata={"help": "Start over instead of continuing an existing --output."})
    seed: int = field(default=42, metadata={"help": "Random seed, for sampling with --do_sample true."})

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"--batch_size must be at least 1, got {self.batch_size}")


@dataclass
class PredictGenerationArguments(GenerationArguments):
    # Batch prediction is usually scored against references: greedy, bounded answers by default.
    max_new_tokens: Optional[int] = field(default=256, metadata={"help": "Maximum answer length in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (true) or decode greedily (false)."})


ARGUMENTS = (ModelArguments, PredictArguments, PredictGenerationArguments)


def read_rows(path: str | Path) -> list[dict]:
    """Every row of the input jsonl; all bad lines are reported at once."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--input {path}: no such file")
    rows, problems = [], []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                problems.append(f"line {number}: not JSON ({err.msg})")
                continue
            if not isinstance(row, dict) or not isinstance(row.get("context"), str):
                problems.append(f"line {number}: no string field `context`")
                continue
            rows.append(row)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{path}: {len(problems)} bad row(s): {shown}. Rows need a `context` string (see `instructglm convert`)")
    return rows


def resume_point(output: Path, rows: list[dict]) -> int:
    """How many rows `output` already holds; a trailing partial line (interrupted write) is cut off.

    Raises ValueError when the existing lines are not this input's rows in order, so a stale
    or foreign output file is never silently extended.
    """
    if not output.exists():
        return 0
    data = output.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with output.open("r+b") as f:
            f.truncate(complete)
    lines = data[:complete].decode("utf-8").splitlines()
    if len(lines) > len(rows):
        raise ValueError(f"--output {output} has {len(lines)} rows, more than the {len(rows)} of --input; use --overwrite true or another --output")
    for number, line in enumerate(lines, 1):
        try:
            done = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"--output {output} line {number} is not JSON; delete the file or use --overwrite true") from None
        if not isinstance(done, dict) or done.get("context") != rows[number - 1]["context"] or "prediction" not in done:
            raise ValueError(
                f"--output {output} line {number} is not input row {number} with a prediction: it was written for "
                "another input; use --overwrite true or another --output"
            )
    return len(lines)


def predict_rows(model, tokenizer, rows: list[dict], output: str | Path, settings: GenerationArguments, batch_size: int = 8, overwrite: bool = False) -> int:
    """Generate the rows not yet in `output` and append them batch by batch; returns rows written now."""
    from tqdm.auto import tqdm

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and output.exists():
        output.unlink()
    start = resume_point(output, rows)
    written = 0
    with output.open("a", encoding="utf-8") as f, tqdm(total=len(rows), initial=start, unit="row", desc="predict") as bar:
        for begin in range(start, len(rows), batch_size):
            batch = rows[begin : begin + batch_size]
            completions = generate_batch(model, tokenizer, [row["context"] for row in batch], settings)
            # One write per batch, then fsync: a crash leaves whole batches plus at most one
            # partial line, which resume_point cuts off.
            f.write("".join(json.dumps({**row, "prediction": c.text}, ensure_ascii=False) + "\n" for row, c in zip(batch, completions)))
            f.flush()
            os.fsync(f.fileno())
            written += len(batch)
            bar.update(len(batch))
    return written


def main(model_args: ModelArguments, args: PredictArguments, settings: PredictGenerationArguments) -> int:
    from transformers import set_seed

    rows = read_rows(args.input)
    set_seed(args.seed)
    model, tokenizer, _ = load_from_args(model_args)
    written = predict_rows(model, tokenizer, rows, args.output, settings, args.batch_size, args.overwrite)
    print(f"predict: {written} row(s) written now, {len(rows)} in {args.output}")
    return 0
