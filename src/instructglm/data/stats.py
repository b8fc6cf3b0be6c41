"""Length statistics of a converted jsonl: the seed's describe() table, in characters and tokens.

For `context` and `target` (and, in tokens, the whole training sequence) it gives count, mean,
std, min, 25/50/75/90% and max, as `pandas.Series.describe(percentiles=[.25, .5, .75, .9])`
does: std with one degree of freedom, percentiles by linear interpolation.

With a tokenizer, lengths are the ids of `tokenizer(texts, add_special_tokens=False)`, and the
sequence is what `tokenize` builds: the specials the tokenizer puts around a prompt (ChatGLM-6B:
`[gMASK] <sop>`) + context ids + target ids + eos. Given `--max_seq_length`, each row goes through
tokenize's own rule (`RowEncoder.encode`), so the counts of rows it would truncate (target cut at
its end) and drop (prompt too long for one target token, or an empty target) are the ones
tokenize will print.

A jsonl of whole conversations (`convert --template messages`) is measured as the model family
will train it: in characters, `context` is the text of the messages that get no loss (tools
included) and `target` that of the trained ones; in tokens, a role-token family's ids of the whole
conversation (`sequence`), split into unlabelled (`context`) and labelled (`target`) ids, and a text
family's (context, target) rows as above. Rows the family cannot express are counted as `unsupported`.

    instructglm stats --jsonl_path data/alpaca_data.jsonl --model_name_or_path THUDM/chatglm-6b --max_seq_length 320
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from instructglm.data.chat_formats import IGNORE_INDEX, UNSUPPORTED, fit
from instructglm.data.io import write_json
from instructglm.data.messages import Conversation
from instructglm.data.records import BadRow, DataError
from instructglm.models.loading import load_tokenizer, model_config_of
from instructglm.data.tokenize import (
    EMPTY_TARGET,
    PROMPT_TOO_LONG,
    TRUNCATED,
    RowEncoder,
    read_jsonl_rows,
    special_tokens_around,
)

PERCENTILES = (25, 50, 75, 90)
ROWS = ("count", "mean", "std", "min", *(f"{p}%" for p in PERCENTILES), "max")


def describe(values: Sequence[int]) -> dict[str, float | None]:
    """count, mean, std (ddof=1), min, 25/50/75/90% and max; None where undefined (no values, std of one)."""
    a = np.asarray(values, dtype=np.float64)
    if a.size == 0:
        return {key: (0 if key == "count" else None) for key in ROWS}
    quantiles = np.percentile(a, PERCENTILES)
    return {
        "count": int(a.size),
        "mean": float(a.mean()),
        "std": float(a.std(ddof=1)) if a.size > 1 else None,
        "min": float(a.min()),
        **{f"{p}%": float(q) for p, q in zip(PERCENTILES, quantiles)},
        "max": float(a.max()),
    }


def format_table(columns: dict[str, dict[str, float | None]], title: str = "") -> str:
    """Columns side by side, one row per statistic, like pandas' describe() printout."""
    names = list(columns)
    width = max(12, *(len(n) + 2 for n in names))

    def cell(value) -> str:
        if value is None:
            return "NaN"
        return f"{value:.2f}" if isinstance(value, float) else str(value)

    lines = [f"{title:<6}" + "".join(f"{n:>{width}}" for n in names)]
    lines += [f"{key:<6}" + "".join(f"{cell(columns[n][key]):>{width}}" for n in names) for key in ROWS]
    return "\n".join(lines)


def _token_lengths(tokenizer, contexts, targets, encoder, batch_size: int):
    """Per-row context and target id counts, and tokenize's outcome per row when `encoder` is given.

    Batches are encoded and dropped one at a time, so memory stays at one batch of ids.
    """
    context_lengths: list[int] = []
    target_lengths: list[int] = []
    outcomes: list[int] = []
    for start in range(0, len(contexts), batch_size):
        batch = list(contexts[start : start + batch_size]) + list(targets[start : start + batch_size])
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        half = len(batch) // 2
        context_lengths += [len(x) for x in ids[:half]]
        target_lengths += [len(x) for x in ids[half:]]
        if encoder is not None:
            outcomes += [encoder.encode(c, t)[2] for c, t in zip(ids[:half], ids[half:])]
    return context_lengths, target_lengths, outcomes


def compute_stats(
    contexts: Sequence[str],
    targets: Sequence[str],
    tokenizer=None,
    max_seq_length: int | None = None,
    model_type: str | None = None,
    batch_size: int = 1000,
) -> dict:
    """The stats dict (characters always; tokens and tokenize's over-length counts given a tokenizer).

    `model_type` (config.json's) picks the model family as tokenize does. Raises `DataError`
    where tokenize would refuse the tokenizer or `max_seq_length`.
    """
    stats: dict = {
        "chars": {
            "context": describe([len(c) for c in contexts]),
            "target": describe([len(t) for t in targets]),
        }
    }
    if tokenizer is None:
        return stats
    prefix, suffix = special_tokens_around(tokenizer)
    encoder = RowEncoder(tokenizer, max_seq_length, model_type) if max_seq_length is not None else None
    context_lengths, target_lengths, outcomes = _token_lengths(tokenizer, contexts, targets, encoder, batch_size)
    specials = len(prefix) + len(suffix)
    eos = 0 if tokenizer.eos_token_id is None else 1
    sequence = np.asarray(context_lengths, dtype=np.int64) + specials + np.asarray(target_lengths, dtype=np.int64) + eos
    stats["tokens"] = {
        "context": describe(context_lengths),
        "target": describe(target_lengths),
        "sequence": describe(sequence.tolist()),
    }
    stats["sequence_rule"] = {"prompt_specials": specials, "eos": eos}
    if encoder is not None:
        by_outcome = Counter(outcomes)
        stats["max_seq_length"] = max_seq_length
        stats["over_length"] = {
            "rows": len(outcomes),
            "truncated": by_outcome[TRUNCATED],
            "dropped_prompt_too_long": by_outcome[PROMPT_TOO_LONG],
            "dropped_empty_target": by_outcome[EMPTY_TARGET],
        }
    return stats


def conversation_stats(
    conversations: Sequence[Conversation],
    tokenizer=None,
    max_seq_length: int | None = None,
    model_type=None,
    batch_size: int = 1000,
) -> dict:
    """The stats dict of whole conversations (see the module docstring); a text family's go through `compute_stats`."""
    chars = [_conversation_chars(conversation) for conversation in conversations]
    stats: dict = {
        "chars": {"context": describe([c for c, _ in chars]), "target": describe([t for _, t in chars])},
        "rows": len(conversations),
    }
    if tokenizer is None:
        return stats
    encoder = RowEncoder(tokenizer, max_seq_length or 2**31 - 1, model_type)
    family = encoder.family
    if not family.role_tokens:
        pairs, unsupported = [], 0
        for conversation in conversations:
            try:
                pairs.append(family.chat_format.context_target(conversation))
            except BadRow:
                unsupported += 1
        text = compute_stats([c for c, _ in pairs], [t for _, t in pairs], tokenizer, max_seq_length, model_type, batch_size)
        return {**text, "chars": stats["chars"], "rows": len(conversations), "unsupported": unsupported, "family": family.name}
    context_lengths, target_lengths, outcomes = [], [], []
    for conversation in conversations:
        try:
            encoded = family.encode(tokenizer, conversation, encoder.stop_ids)
        except BadRow:
            outcomes.append(UNSUPPORTED)
            continue
        labelled = sum(label != IGNORE_INDEX for label in encoded.labels)
        context_lengths.append(len(encoded.labels) - labelled)
        target_lengths.append(labelled)
        if max_seq_length is not None:
            outcomes.append(fit(encoded, max_seq_length)[1])
    sequence = [c + t for c, t in zip(context_lengths, target_lengths)]
    stats["tokens"] = {
        "context": describe(context_lengths),
        "target": describe(target_lengths),
        "sequence": describe(sequence),
    }
    stats["sequence_rule"] = {"chat_format": family.chat_format.name, "family": family.name}
    by_outcome = Counter(outcomes)
    stats["unsupported"] = by_outcome[UNSUPPORTED]
    if max_seq_length is not None:
        stats["max_seq_length"] = max_seq_length
        stats["over_length"] = {
            "rows": len(outcomes),
            "truncated": by_outcome[TRUNCATED],
            "dropped_prompt_too_long": by_outcome[PROMPT_TOO_LONG],
            "dropped_empty_target": by_outcome[EMPTY_TARGET],
        }
    return stats


def _conversation_chars(conversation: Conversation) -> tuple[int, int]:
    """(characters without loss, characters trained) of a conversation; tools and tool calls as JSON."""
    import json

    context = len(json.dumps(list(conversation.tools), ensure_ascii=False)) if conversation.tools else 0
    target = 0
    for message in conversation.messages:
        size = len(message.content) + sum(
            len(call.name) + len(json.dumps(dict(call.arguments), ensure_ascii=False)) for call in message.tool_calls
        )
        if message.trained:
            target += size
        else:
            context += size
    return context, target


def format_stats(stats: dict) -> str:
    """The printed report: the character table, then the token table and over-length counts."""
    parts = [format_table(stats["chars"], "chars")]
    if "tokens" in stats:
        rule = stats["sequence_rule"]
        parts.append(format_table(stats["tokens"], "tokens"))
        if "chat_format" in rule:
            parts.append(
                f"sequence = the {rule['family']} family's {rule['chat_format']} ids of the whole conversation; "
                "target = its labelled ids, context = the rest"
            )
        else:
            parts.append(
                f"sequence = context ids + {rule['prompt_specials']} prompt special(s) + target ids + {rule['eos']} eos"
            )
    if stats.get("unsupported"):
        parts.append(f"{stats['unsupported']} conversation(s) the model family cannot express (tokenize drops them)")
    if "over_length" in stats:
        over = stats["over_length"]
        parts.append(
            f"max_seq_length {stats['max_seq_length']}: of {over['rows']} rows, tokenize would truncate "
            f"{over['truncated']} (target cut at its end) and drop {over['dropped_prompt_too_long']} "
            f"(prompt too long for any target token) and {over['dropped_empty_target']} (empty target)"
        )
    return "\n\n".join(parts)


def jsonl_stats(jsonl_path: str, tokenizer=None, max_seq_length: int | None = None, model_type: str | None = None) -> dict:
    """Stats of a converted jsonl file; tokens too when a tokenizer is given (see `compute_stats`)."""
    rows = read_jsonl_rows(jsonl_path)
    if rows.conversations is not None:
        stats = conversation_stats(rows.conversations, tokenizer, max_seq_length, model_type)
    else:
        stats = compute_stats(rows.contexts, rows.targets, tokenizer, max_seq_length, model_type)
    stats["source"] = str(jsonl_path)
    if tokenizer is not None:
        stats["tokenizer"] = getattr(tokenizer, "name_or_path", None)
    return stats


def check_token_args(model_name_or_path: str | None, max_seq_length: int | None):
    """(tokenizer, model_type) for the token stats, or (None, None); bad flags raise before any work."""
    if not model_name_or_path:
        if max_seq_length is not None:
            raise DataError("--max_seq_length counts tokens; also pass --model_name_or_path")
        return None, None
    tokenizer, model_type = load_tokenizer(model_name_or_path)
    model_type = model_config_of(model_name_or_path) or model_type  # the whole config tells ChatGLM versions apart
    if max_seq_length is not None:
        RowEncoder(tokenizer, max_seq_length, model_type)  # raises where tokenize would refuse
    return tokenizer, model_type


@dataclass
class StatsArguments:
    jsonl_path: str = field(metadata={"help": "A converted jsonl of {context, target} lines."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Tokenizer (model dir or hub name) for lengths in tokens; characters only if unset."}
    )
    max_seq_length: int | None = field(
        default=None, metadata={"help": "Count the rows tokenize would truncate or drop at this length in tokens (needs --model_name_or_path)."}
    )
    stats_path: str | None = field(default=None, metadata={"help": "Also save the stats as JSON here."})


ARGUMENTS = (StatsArguments,)


def main(args: StatsArguments) -> int:
    tokenizer, model_type = check_token_args(args.model_name_or_path, args.max_seq_length)
    stats = jsonl_stats(args.jsonl_path, tokenizer, args.max_seq_length, model_type)
    print(format_stats(stats))
    if args.stats_path:
        write_json(args.stats_path, stats)
        print(f"\nsaved {args.stats_path}")
    return 0
