"""One small pure function per input format: a raw row (a dict) -> `Example`, or `BadRow`.

Formats and the fields that identify them (`detect_format` looks at the first record):

- `alpaca`   — `instruction`, `output`, optional `input` (Stanford Alpaca, Guanaco, the Chinese
               Alpaca sets, BELLE's later releases); a `history` key makes it `history`.
- `history`  — Alpaca fields plus `history`: a list of `[query, answer]` pairs, oldest first.
- `belle`    — BELLE's `input`/`target` (generated_train_0.5M_CN); also accepts Alpaca fields,
               so `--format belle` gives BELLE's later releases the BELLE template.
- `sharegpt` — `conversations`: a list of `{"from", "value"}` turns (`human`/`user`,
               `gpt`/`assistant`/…, `system`); `{"role", "content"}` turns are read too.
- `firefly`  — `conversation`: a list of `{"human", "assistant"}` rounds, optional `system`.

For dialogues the last assistant reply is the output, the user turn before it the instruction,
and earlier rounds the history. A leading system turn becomes `Example.system`; consecutive turns
of one side are joined with a newline; user turns after the last reply (a conversation cut off
mid-round) are dropped, since they have no answer to learn.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from instructglm.data.records import BadRow, Example

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model"})
SYSTEM_ROLES = frozenset({"system"})


def _text(row: Mapping, key: str, *, required: bool = True) -> str:
    """`row[key]` as a string: missing/None -> "" for optional fields, BadRow otherwise."""
    value = row.get(key)
    if value is None:
        if required:
            raise BadRow("missing_field", f"no {key!r} field (fields: {sorted(row)})")
        return ""
    if not isinstance(value, str):
        raise BadRow("non_string_field", f"{key!r} is {type(value).__name__}, not a string")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            # a lone surrogate, from a JSON escape such as "\ud83d" cut off from its pair
            raise BadRow("invalid_unicode", f"{key!r} holds {value[e.start]!r} at {e.start}, not valid Unicode") from None
    return value


def _history(value: Any) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise BadRow("bad_history", f"'history' is {type(value).__name__}, not a list of [query, answer] pairs")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise BadRow("bad_history", f"history[{i}] is {pair!r:.80}, not a [query, answer] pair of strings")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _checked(example: Example) -> Example:
    """Reject examples with nothing to learn or nothing to condition on."""
    if not example.output.strip():
        raise BadRow("empty_output", "the output is empty or whitespace only")
    if not (example.instruction.strip() or example.input.strip() or example.history):
        raise BadRow("empty_prompt", "instruction and input are both empty")
    return example


def read_alpaca(row: Mapping) -> Example:
    """Alpaca: `instruction`, `input` (optional), `output`; `history` and `system` if present."""
    return _checked(
        Example(
            instruction=_text(row, "instruction"),
            input=_text(row, "input", required=False),
            output=_text(row, "output"),
            history=_history(row.get("history")),
            system=_text(row, "system", required=False),
        )
    )


def read_belle(row: Mapping) -> Example:
    """BELLE: `input` is the instruction and `target` the answer; Alpaca-shaped rows as `read_alpaca`."""
    if "target" not in row and "output" in row:
        return read_alpaca(row)
    return _checked(Example(instruction=_text(row, "input"), output=_text(row, "target")))


def _dialogue(turns: list[tuple[str, str]], system: str) -> Example:
    """(side, text) turns, side in {"user", "assistant"} -> Example (see the module docstring)."""
    merged: list[list[str]] = []
    for side, text in turns:
        if merged and merged[-1][0] == side:
            merged[-1][1] += "\n" + text
        else:
            merged.append([side, text])
    while merged and merged[-1][0] == "user":
        merged.pop()
    if not merged:
        raise BadRow("bad_conversation", "no assistant reply")
    if merged[0][0] != "user":
        raise BadRow("bad_conversation", "the conversation starts with an assistant turn")
    rounds = [(merged[i][1], merged[i + 1][1]) for i in range(0, len(merged), 2)]
    *history, (query, answer) = rounds
    return _checked(Example(instruction=query, output=answer, history=tuple(history), system=system))


def _conversation(row: Mapping, key: str) -> list:
    """`row[key]`, the list of turns or rounds of a dialogue format."""
    conversation = row.get(key)
    if conversation is None:
        raise BadRow("missing_field", f"no {key!r} field (fields: {sorted(row)})")
    if not isinstance(conversation, list):
        raise BadRow("bad_conversation", f"{key!r} is {type(conversation).__name__}, not a list")
    return conversation


def read_sharegpt(row: Mapping) -> Example:
    """ShareGPT: `conversations` of `{"from", "value"}` (or `{"role", "content"}`) turns."""
    conversation = _conversation(row, "conversations")
    system = _text(row, "system", required=False)
    turns: list[tuple[str, str]] = []
    for i, turn in enumerate(conversation):
        if not isinstance(turn, Mapping):
            raise BadRow("bad_conversation", f"turn {i} is {type(turn).__name__}, not an object")
        # `datasets` gives every turn all keys seen in the column, the absent ones as None
        role_key, text_key = ("from", "value") if turn.get("from") is not None else ("role", "content")
        role = _text(turn, role_key).lower()
        text = _text(turn, text_key)
        if role in SYSTEM_ROLES:
            if turns:
                raise BadRow("bad_conversation", f"turn {i}: a system turn after the conversation started")
            system = f"{system}\n{text}" if system else text
        elif role in USER_ROLES:
            turns.append(("user", text))
        elif role in ASSISTANT_ROLES:
            turns.append(("assistant", text))
        else:
            known = sorted(USER_ROLES | ASSISTANT_ROLES | SYSTEM_ROLES)
            raise BadRow("bad_conversation", f"turn {i}: unknown role {role!r} (known: {', '.join(known)})")
    return _dialogue(turns, system)


def read_firefly(row: Mapping) -> Example:
    """Firefly: `conversation` of `{"human", "assistant"}` rounds; optional `system`."""
    turns: list[tuple[str, str]] = []
    for i, round_ in enumerate(_conversation(row, "conversation")):
        if not isinstance(round_, Mapping):
            raise BadRow("bad_conversation", f"round {i} is {type(round_).__name__}, not an object")
        turns += [("user", _text(round_, "human")), ("assistant", _text(round_, "assistant"))]
    return _dialogue(turns, _text(row, "system", required=False))


@dataclass(frozen=True)
class Format:
    name: str
    read: Callable[[Mapping], Example]
    default_template: str  # a name in instructglm.data.templates, as the seed chose per dataset
    fields: str  # how the format looks, for messages


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("alpaca", read_alpaca, "alpaca", "instruction, output[, input]"),
        Format("history", read_alpaca, "chatglm", "instruction, output, history[, input]"),
        Format("belle", read_belle, "belle", "input, target"),
        Format("sharegpt", read_sharegpt, "chatglm", "conversations: [{from, value}, ...]"),
        Format("firefly", read_firefly, "chatglm", "conversation: [{human, assistant}, ...]"),
    )
}


def detect_format(fields: Iterable[str]) -> str | None:
    """The format name a record with these fields belongs to, or None."""
    fields = set(fields)
    if "conversations" in fields:
        return "sharegpt"
    if "conversation" in fields:
        return "firefly"
    if {"instruction", "output"} <= fields:
        return "history" if "history" in fields else "alpaca"
    if {"input", "target"} <= fields:
        return "belle"
    return None


def describe_formats() -> str:
    """One line per format for error messages: `name (fields)`."""
    return "; ".join(f"{f.name} ({f.fields})" for f in FORMATS.values())


def read_rows(rows: Iterable[tuple[str, Any]], fmt: str) -> Iterator[tuple[str, Example | BadRow]]:
    """(location, raw row) -> (location, Example or the BadRow that says why not)."""
    read = FORMATS[fmt].read
    for location, row in rows:
        if isinstance(row, BadRow):
            yield location, row
        elif not isinstance(row, Mapping):
            yield location, BadRow("not_an_object", f"a JSON {type(row).__name__}, not an object")
        else:
            try:
                yield location, read(row)
            except BadRow as bad:
                yield location, bad
