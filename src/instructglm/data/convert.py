"""convert: an instruction dataset (JSON / JSON Lines file, or a `datasets` name or dir) -> jsonl.

Writes one `{"context": prompt, "target": answer}` per line (UTF-8, non-ASCII kept) — or, with
`--template messages`, one whole conversation `{"messages": [...], "tools": [...]}` per line (system
prompt, tools, tool calls and results, every turn; see `instructglm.data.messages`), which the model
family writes in its own chat format at tokenize time — a sidecar
`<save_path>.meta.json` (template, format, source, counts), and prints the length table.

    instructglm convert --data_path data/alpaca_data.json --save_path data/alpaca_data.jsonl
    instructglm convert --dataset_name BelleGroup/generated_train_0.5M_CN --save_path data/belle_data.jsonl

The format is detected from the first record's fields (`--format` to choose; preference pairs,
records with `chosen`/`rejected`, are refused until `--format preference` says to train on
`chosen` as the answer), the template
defaults to the format's (alpaca -> alpaca, belle -> belle, records with history and dialogues
-> chatglm, OpenAI `messages` -> messages; `--template` to choose). Rows that cannot be used — malformed JSON lines, missing or
non-string fields, text that is not valid Unicode, bad history or conversations, empty prompts
or outputs — are skipped and counted by reason with their first locations; `--strict` stops at
the first instead. The output appears at `--save_path` only when the whole run succeeds, and
never replaces the input itself (the same file by any path, symlink or hard link is refused).
The sidecar records the jsonl's size and sha256, so a reader can tell when the two files are
not from one run (a kill between their two renames).
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from tqdm import tqdm

from instructglm.data import stats as stats_lib
from pathlib import Path

from instructglm.data.io import fingerprint, iter_dataset_rows, iter_json_rows, same_file, write_json, write_jsonl
from instructglm.data.readers import FORMATS, describe_formats, detect_format, is_preference, read_rows
from instructglm.data.messages import Conversation
from instructglm.data.records import BadRow, DataError, Example
from instructglm.data.templates import MESSAGES, TEMPLATES, Template, get_template
from instructglm.layout import jsonl_meta_path

SHOWN_LOCATIONS = 5  # how many bad-row locations per reason the report keeps


def render(example: Example | Conversation, template: Template) -> dict:
    """One output line. A system prompt, where the format has one, goes before the template's prompt;
    a conversation (template `messages`) is written whole."""
    if isinstance(example, Conversation):
        return example.to_dict()
    context = template.render(example.instruction, example.input, example.history)
    if example.system:
        context = f"{example.system}\n{context}"
    return {"context": context, "target": example.output}


@dataclass
class Skipped:
    """Bad rows by reason: how many, and the first few (location, detail)."""

    counts: Counter = field(default_factory=Counter)
    first: dict[str, list[tuple[str, str]]] = field(default_factory=dict)

    def add(self, location: str, bad: BadRow) -> None:
        self.counts[bad.reason] += 1
        shown = self.first.setdefault(bad.reason, [])
        if len(shown) < SHOWN_LOCATIONS:
            shown.append((location, bad.detail))

    def report(self) -> str:
        lines = []
        for reason, n in self.counts.most_common():
            where = ", ".join(loc for loc, _ in self.first[reason])
            more = ", ..." if n > len(self.first[reason]) else ""
            lines.append(f"  {reason}: {n} (at {where}{more}; first: {self.first[reason][0][1]})")
        return "\n".join(lines)


def _peek_fields(rows: Iterator[tuple[str, Any]]) -> tuple[list[str] | None, Iterator[tuple[str, Any]]]:
    """The fields of the first JSON object among `rows`, and the rows with nothing consumed."""
    buffered = []
    fields = None
    for location, row in rows:
        buffered.append((location, row))
        if isinstance(row, Mapping):
            fields = sorted(row)
            break
    return fields, itertools.chain(buffered, rows)


def _source_rows(data_path: str | None, dataset_name: str | None, split: str) -> tuple[str, Iterator]:
    if bool(data_path) == bool(dataset_name):
        raise DataError("give exactly one of --data_path (a json/jsonl file) and --dataset_name (a datasets name or dir)")
    if data_path:
        return data_path, iter_json_rows(data_path)
    return dataset_name, iter_dataset_rows(dataset_name, split)


def check_outputs(inputs: dict[str, str | None], outputs: dict[str, str | None]) -> None:
    """Refuse an output that is an input (by any path, symlink or hard link) or an existing directory.

    `inputs` and `outputs` map a flag (as the user wrote it) to its path; None entries are skipped.
    """
    for out_flag, out_path in outputs.items():
        if not out_path:
            continue
        if Path(out_path).is_dir():
            raise DataError(f"{out_flag} {out_path} is a directory; give the path of the file to write")
        for in_flag, in_path in inputs.items():
            if in_path and Path(in_path).exists() and same_file(in_path, out_path):
                raise DataError(
                    f"{out_flag} {out_path} is the input ({in_flag} {in_path}): writing it would replace the "
                    f"data being read; choose another {out_flag}"
                )


def _choose_format(format: str, fields: list[str], source: str) -> str:
    """The `--format` given, or the one the first record's fields show; refuse preference pairs for auto."""
    if format != "auto":
        return format
    if is_preference(fields):
        raise DataError(
            f"{source}: preference pairs (fields seen: {', '.join(fields)}); auto will not guess which answer to "
            "train on: --format preference takes `chosen` as the answer (rejected is ignored)"
        )
    detected = detect_format(fields)
    if detected is None:
        raise DataError(
            f"{source}: unrecognised record shape; fields seen: {', '.join(fields)}. "
            f"Known formats: {describe_formats()}. Rename the fields, or pass --format "
            f"({' / '.join(FORMATS)}) to say which reader to use"
        )
    return detected


def _default_template(format: str, fields: list[str]) -> str:
    """The format's default template; Alpaca-shaped preference pairs (instruction + chosen) take Alpaca's, as the
    same rows without `chosen`/`rejected` would."""
    if format == "preference" and "instruction" in fields:
        return FORMATS["alpaca"].default_template
    return FORMATS[format].default_template


def convert(
    save_path: str,
    data_path: str | None = None,
    dataset_name: str | None = None,
    split: str = "train",
    format: str = "auto",
    template: str | None = None,
    strict: bool = False,
) -> dict:
    """Convert a dataset to a `{context, target}` jsonl at `save_path` and its sidecar; return the meta.

    Raises:
        DataError: no source or two; `save_path` (or its sidecar) is the input or a directory; an
            unrecognised record shape or preference pairs under auto (the message lists the fields
            seen and the formats); an unknown template; no usable row; with `strict`, the first
            bad row (with its location). Nothing is written then.
        MissingFile: `data_path` (or a local `dataset_name`) does not exist.
    """
    if format != "auto" and format not in FORMATS:
        raise DataError(f"--format {format!r}: unknown; use auto or one of {', '.join(FORMATS)}")
    if template is not None:
        get_template(template)  # raises BadValue naming the template
    check_outputs(
        {"--data_path": data_path, "--dataset_name": dataset_name},
        {"--save_path": save_path, "its sidecar": jsonl_meta_path(save_path)},
    )
    source, rows = _source_rows(data_path, dataset_name, split)
    fields, rows = _peek_fields(rows)
    if fields is None:
        raise DataError(f"{source}: no JSON object found; is it an instruction dataset (formats: {describe_formats()})?")
    format = _choose_format(format, fields, source)
    chosen = get_template(template or _default_template(format, fields))
    skipped = Skipped()
    written = 0

    def lines(examples: Iterable[tuple[str, Example | Conversation | BadRow]]) -> Iterator[dict]:
        nonlocal written
        for location, example in examples:
            if isinstance(example, BadRow):
                if strict:
                    raise DataError(
                        f"{location}: {example.reason}: {example.detail} "
                        "(--strict stops at the first bad row; without it bad rows are skipped and counted)"
                    )
                skipped.add(location, example)
                continue
            written += 1
            yield render(example, chosen)
        if not written:
            # raised inside the atomic write, so no empty file replaces an existing one
            raise DataError(
                f"{source}: no usable row as format {format!r} (first record's fields: {', '.join(fields)}); "
                f"skipped:\n{skipped.report()}"
            )

    progress = tqdm(read_rows(rows, format, conversations=chosen.name == MESSAGES), desc="formatting", unit=" rows", disable=None)
    write_jsonl(save_path, lines(progress))
    meta = {
        "template": chosen.name,
        "format": format,
        "source": source,
        **({"split": split} if dataset_name and not data_path else {}),
        "counts": {"rows": written + sum(skipped.counts.values()), "written": written, "skipped": dict(skipped.counts)},
        "skipped_at": {reason: [loc for loc, _ in shown] for reason, shown in skipped.first.items()},
        **fingerprint(save_path),
    }
    write_json(jsonl_meta_path(save_path), meta)
    meta["report"] = skipped.report()
    return meta


@dataclass
class ConvertArguments:
    save_path: str = field(
        metadata={"help": "Output jsonl of {context, target} lines, or {messages, tools} with --template messages (its sidecar: <save_path>.meta.json)."}
    )
    data_path: str | None = field(
        default=None, metadata={"help": "Input JSON array or JSON Lines file (.json or .jsonl; BOM and CRLF are fine)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Input for datasets.load_dataset: a hub name or a local dir/file."}
    )
    split: str = field(default="train", metadata={"help": "Split of --dataset_name to convert."})
    format: Literal["auto", "alpaca", "history", "belle", "sharegpt", "firefly", "messages", "preference"] = field(
        default="auto",
        metadata={
            "help": "Input format; auto detects it from the first record's fields (never preference: pairs with "
            "chosen/rejected need --format preference, which trains on chosen as the answer)."
        },
    )
    template: str | None = field(
        default=None,
        metadata={
            "help": f"Prompt template: {', '.join(TEMPLATES)}, or a format string with {{instruction}} {{input}} "
            "[{history}]. `messages` keeps whole conversations (system, tools, tool turns, every turn trained) for "
            "the model family to write in its own chat format. Default: the format's (alpaca, belle, chatglm for "
            "history/dialogues, messages for OpenAI messages)."
        },
    )
    strict: bool = field(default=False, metadata={"help": "Stop at the first bad row (with its location) instead of skipping it."})
    stats_path: str | None = field(default=None, metadata={"help": "Also save the length stats as JSON here."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (model dir or hub name) for the stats in tokens; characters only if unset."}
    )
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Count the rows tokenize would truncate or drop at this length in tokens (needs --model_name_or_path)."}
    )


ARGUMENTS = (ConvertArguments,)


def main(args: ConvertArguments) -> int:
    # outputs, the tokenizer and --max_seq_length are checked first, so a typo fails before the work
    check_outputs(
        {"--data_path": args.data_path, "--dataset_name": args.dataset_name},
        {"--stats_path": args.stats_path},
    )
    if args.stats_path and same_file(args.stats_path, args.save_path):
        raise DataError(f"--stats_path {args.stats_path} is --save_path; give the stats their own file")
    tokenizer, model_type = stats_lib.check_token_args(args.model_name_or_path, args.max_seq_length)
    meta = convert(
        args.save_path,
        data_path=args.data_path,
        dataset_name=args.dataset_name,
        split=args.split,
        format=args.format,
        template=args.template,
        strict=args.strict,
    )
    counts = meta["counts"]
    print(
        f"wrote {counts['written']} of {counts['rows']} rows to {args.save_path} "
        f"(format {meta['format']}, template {meta['template']!r}; meta: {jsonl_meta_path(args.save_path)})"
    )
    if meta["report"]:
        print(f"skipped {counts['rows'] - counts['written']} rows:\n{meta['report']}", file=sys.stderr)
    stats = stats_lib.jsonl_stats(args.save_path, tokenizer, args.max_seq_length, model_type)
    print()
    print(stats_lib.format_stats(stats))
    if args.stats_path:
        write_json(args.stats_path, stats)
        print(f"\nsaved {args.stats_path}")
    return 0
