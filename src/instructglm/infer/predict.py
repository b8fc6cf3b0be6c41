"""Batched generation over a jsonl: each row's `context` in, the row plus `prediction` out.

    instructglm predict --model_name_or_path THUDM/chatglm-6b --adapter output/alpaca \\
        --input data/test.jsonl --output predictions.jsonl --batch_size 8

Rows are generated in left-padded batches, in input order. After every batch the finished rows
are appended to `--output` and flushed to disk, so an interrupted run (Ctrl-C, kill, crash)
loses at most the batch in flight: rerun the same command and it continues after the last
complete line, dropping a half-written one, never writing a row twice. `--overwrite true`
starts over. With greedy decoding (the default here), batched output equals one-at-a-time output.

A row whose prompt does not fit is not generated: with `--max_new_tokens` (the default here),
when its prompt tokens plus `--max_new_tokens` exceed the model's context; with `--max_length`,
when its prompt alone reaches `--max_length` or the model's context. It is written like the
others, with `"prediction": null` and a `"skipped"` reason, and counted in the closing summary,
so the output keeps one line per input row and a rerun resumes past it instead of failing on it
again. (Generating it anyway would run past the positions the model was trained on, or try to
allocate the attention of a megabyte-long prompt.)
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

from instructglm.errors import BadValue, MissingFile
from instructglm.infer.generate import GenerationArguments, context_limit, generate_batch
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
            raise BadValue(f"--batch_size must be at least 1, got {self.batch_size}")


@dataclass
class PredictGenerationArguments(GenerationArguments):
    # Batch prediction is usually scored against references: greedy, bounded answers by default.
    max_new_tokens: Optional[int] = field(default=256, metadata={"help": "Maximum answer length in tokens."})
    do_sample: bool = field(default=False, metadata={"help": "Sample (true) or decode greedily (false)."})


ARGUMENTS = (ModelArguments, PredictArguments, PredictGenerationArguments)


class PredictResult(NamedTuple):
    written: int  # rows appended to the output by this call
    skipped: int  # of those, rows not generated because their prompt does not fit


def refuse_same_file(input_path: str | Path, output: str | Path) -> None:
    """`--output` must not be `--input` (by any path: a symlink, a hard link, `./x` vs `x`)."""
    input_path, output = Path(input_path), Path(output)
    same = input_path.resolve() == output.resolve()
    if not same and input_path.exists() and output.exists():
        same = os.path.samefile(input_path, output)
    if same:
        raise BadValue(
            f"--output {output} is the --input file {input_path}: predictions would replace the data they are made "
            "from; choose another --output"
        )


def read_rows(path: str | Path) -> list[dict]:
    """Every row of the input (JSON Lines or a JSON array); all bad rows are reported at once.

    Raises:
        MissingFile: no file at `path`.
        BadValue: rows that are not JSON objects with a string `context` (the first few named).
    """
    from instructglm.data.io import iter_json_rows
    from instructglm.data.records import BadRow

    path = Path(path)
    if not path.is_file():
        raise MissingFile(f"--input {path}: no such file")
    rows, problems = [], []
    for location, row in iter_json_rows(path):
        if isinstance(row, BadRow):
            problems.append(f"{location}: not JSON ({row.detail})")
        elif not isinstance(row, dict) or not isinstance(row.get("context"), str):
            problems.append(f"{location}: no string field `context`")
        else:
            rows.append(row)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; … {len(problems) - 5} more" if len(problems) > 5 else "")
        raise BadValue(f"--input {path}: {len(problems)} bad row(s): {shown}. Rows need a `context` string (see `instructglm convert`)")
    return rows


def resume_point(output: Path, rows: list[dict]) -> int:
    """How many rows `output` already holds; a trailing partial line (interrupted write) is cut off.

    Raises:
        BadValue: the existing lines are not this input's rows in order, so a stale or foreign
            output file is never silently extended.
    """
    if not output.exists():
        return 0
    data = output.read_bytes()
    complete = data.rfind(b"\n") + 1
    if complete < len(data):
        with output.open("r+b") as f:
            f.truncate(complete)
    try:
        text = data[:complete].decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadValue(f"--output {output} is not UTF-8 (byte {err.start}); use --overwrite true or another --output") from None
    # split on "\n" only: str.splitlines would also break at U+2028/U+2029/U+0085, which
    # json.dumps(ensure_ascii=False) writes raw inside strings.
    lines = text.split("\n")[:-1]
    if len(lines) > len(rows):
        raise BadValue(f"--output {output} has {len(lines)} rows, more than the {len(rows)} of --input; use --overwrite true or another --output")
    for number, line in enumerate(lines, 1):
        try:
            done = json.loads(line)
        except json.JSONDecodeError:
            raise BadValue(f"--output {output} line {number} is not JSON; delete the file or use --overwrite true") from None
        if not isinstance(done, dict) or done.get("context") != rows[number - 1]["context"] or "prediction" not in done:
            raise BadValue(
                f"--output {output} line {number} is not input row {number} with a prediction: it was written for "
                "another input; use --overwrite true or another --output"
            )
    return len(lines)


def fitting_settings(model: Any, settings: GenerationArguments) -> GenerationArguments:
    """`settings` with `--max_length` lowered to the model's context, so no answer runs past it."""
    limit = context_limit(model)
    if settings.max_new_tokens is None and limit is not None and settings.max_length > limit:
        return dataclasses.replace(settings, max_length=limit)
    return settings


def skip_reason(prompt_tokens: int, limit: int | None, settings: GenerationArguments) -> str | None:
    """Why a prompt of `prompt_tokens` is not generated under `settings` and a model context of
    `limit` tokens (None: unknown); None when it fits."""
    if settings.max_new_tokens is not None:
        if limit is not None and prompt_tokens + settings.max_new_tokens > limit:
            return (
                f"prompt too long: {prompt_tokens} prompt tokens + --max_new_tokens {settings.max_new_tokens} exceed "
                f"the model's context of {limit} tokens"
            )
        return None
    if prompt_tokens >= settings.max_length:
        return f"prompt too long: {prompt_tokens} prompt tokens leave no room for an answer under --max_length {settings.max_length}"
    if limit is not None and prompt_tokens >= limit:
        return f"prompt too long: {prompt_tokens} prompt tokens leave no room for an answer in the model's context of {limit} tokens"
    return None


def predict_rows(
    model, tokenizer, rows: list[dict], output: str | Path, settings: GenerationArguments, batch_size: int = 8, overwrite: bool = False
) -> PredictResult:
    """Generate the rows not yet in `output` and append them batch by batch (see the module docstring)."""
    from tqdm.auto import tqdm

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if overwrite and output.exists():
        output.unlink()
    start = resume_point(output, rows)
    limit = context_limit(model)
    fitted = fitting_settings(model, settings)
    written = skipped = 0
    with output.open("a", encoding="utf-8") as f, tqdm(total=len(rows), initial=start, unit="row", desc="predict") as bar:
        for begin in range(start, len(rows), batch_size):
            batch = rows[begin : begin + batch_size]
            lengths = [len(ids) for ids in tokenizer([row["context"] for row in batch])["input_ids"]]
            reasons = [skip_reason(n, limit, settings) for n in lengths]
            fitting = [row["context"] for row, reason in zip(batch, reasons) if reason is None]
            completions = iter(generate_batch(model, tokenizer, fitting, fitted) if fitting else [])
            done = [
                {**row, "prediction": next(completions).text} if reason is None else {**row, "prediction": None, "skipped": reason}
                for row, reason in zip(batch, reasons)
            ]
            # One write per batch, then fsync: a crash leaves whole batches plus at most one
            # partial line, which resume_point cuts off.
            f.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in done))
            f.flush()
            os.fsync(f.fileno())
            written += len(batch)
            skipped += len(batch) - len(fitting)
            bar.update(len(batch))
    return PredictResult(written, skipped)


def main(model_args: ModelArguments, args: PredictArguments, settings: PredictGenerationArguments) -> int:
    from transformers import set_seed

    refuse_same_file(args.input, args.output)  # before --overwrite deletes anything
    rows = read_rows(args.input)
    set_seed(args.seed)
    model, tokenizer, _ = load_from_args(model_args)
    result = predict_rows(model, tokenizer, rows, args.output, settings, args.batch_size, args.overwrite)
    skipped = f" ({result.skipped} skipped, prompt too long: `prediction` null, reason in `skipped`)" if result.skipped else ""
    print(f"predict: {result.written} row(s) written now{skipped}, {len(rows)} in {args.output}")
    return 0
