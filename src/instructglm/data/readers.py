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
- `preference` — pairs for DPO / reward models, trained on as instruction data with `chosen` as
               the answer (`rejected` is ignored). Never detected: `detect_format` gives None for
               records with `chosen` or `rejected`, so convert asks for `--format preference`
               instead of reading half the record as another format. Layouts (`read_preference`):
               `conversations` / `messages` (the turns before the answer: LLaMA-Factory's DPO
               demo) or `prompt` (a string or turns) with `chosen` a string, a turn or a list of
               turns (the completion, or the whole conversation repeating the prompt, as
               UltraFeedback has it); Alpaca's `instruction`/`input` with a `chosen` string; or
               `chosen` alone holding the whole conversation (turns, or Anthropic HH's
               `\n\nHuman: … \n\nAssistant: …` transcript).

For dialogues the last assistant reply is the output, the user turn before it the instruction,
and earlier rounds the history. A leading system turn becomes `Example.system`; consecutive turns
of one side are joined with a newline; user turns after the last reply (a conversation cut off
mid-round) are dropped, since they have no answer to learn.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from instructglm.data.records import BadRow, Example, text_problem

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
    if problem := text_problem(value):
        raise BadRow("invalid_unicode", f"{key!r}: {problem}")
    return value


def _history(value: Any) -> tuple[tuple[str, str], ...]:
    """Earlier (query, answer) rounds; missing, null, "" (hikariming's Chinese Alpaca sets) and [] are none."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if not isinstance(value, (list, tuple)):
        what = "a string" if isinstance(value, str) else type(value).__name__
        raise BadRow("bad_history", f"'history' is {what} ({value!r:.60}), not a list of [query, answer] pairs")
    pairs = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(t, str) for t in pair)):
            raise BadRow("bad_history", f"history[{i}] is {_short(pair)}, not a [query, answer] pair of strings")
        for text in pair:
            if problem := text_problem(text):
                raise BadRow("invalid_unicode", f"history[{i}]: {problem}")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def _short(value: Any) -> str:
    """A value for a message, cut short; never recurses into deeply nested lists."""
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{value!r:.80}"


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


def _turns(conversation: list, system: str = "") -> tuple[list[tuple[str, str]], str]:
    """ShareGPT-style turns -> ((side, text) turns, system prompt); side is "user" or "assistant"."""
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
    return turns, system


def read_sharegpt(row: Mapping) -> Example:
    """ShareGPT: `conversations` of `{"from", "value"}` (or `{"role", "content"}`) turns."""
    turns, system = _turns(_conversation(row, "conversations"), _text(row, "system", required=False))
    return _dialogue(turns, system)


def read_firefly(row: Mapping) -> Example:
    """Firefly: `conversation` of `{"human", "assistant"}` rounds; optional `system`."""
    turns: list[tuple[str, str]] = []
    for i, round_ in enumerate(_conversation(row, "conversation")):
        if not isinstance(round_, Mapping):
            raise BadRow("bad_conversation", f"round {i} is {type(round_).__name__}, not an object")
        turns += [("user", _text(round_, "human")), ("assistant", _text(round_, "assistant"))]
    return _dialogue(turns, _text(row, "system", required=False))


# Anthropic HH-RLHF's transcripts: "\n\nHuman: ...\n\nAssistant: ..." rounds in one string.
_TRANSCRIPT_TURN = re.compile(r"\n\n(Human|Assistant): ")


def _transcript_turns(text: str) -> list[tuple[str, str]]:
    parts = _TRANSCRIPT_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise BadRow(
            "bad_conversation",
            "'chosen' is a string but the record has no prompt (conversations, messages, prompt or instruction) "
            "and the string is no '\\n\\nHuman: ... \\n\\nAssistant: ...' transcript",
        )
    return [("user" if role == "Human" else "assistant", body) for role, body in zip(parts[1::2], parts[2::2])]


def _chosen_turns(chosen: Any) -> list[tuple[str, str]]:
    """The turns `chosen` holds: one for a string or a turn object, all of them for a list."""
    if isinstance(chosen, str):
        if problem := text_problem(chosen):
            raise BadRow("invalid_unicode", f"'chosen': {problem}")
        return [("assistant", chosen)]
    if isinstance(chosen, Mapping):
        chosen = [chosen]
    if not isinstance(chosen, list):
        raise BadRow("non_string_field", f"'chosen' is {type(chosen).__name__}, not a string, a turn or a list of turns")
    turns, system = _turns(chosen)
    if system:
        raise BadRow("bad_conversation", "'chosen' holds a system turn")
    return turns


def _prompt_turns(row: Mapping) -> tuple[list[tuple[str, str]], str]:
    """The turns before the answer and the system prompt, from the record's first prompt field."""
    system = _text(row, "system", required=False)
    for key in ("conversations", "messages"):
        if row.get(key) is not None:
            return _turns(_conversation(row, key), system)
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return [("user", _text(row, "prompt"))], system
    if isinstance(prompt, list):
        return _turns(prompt, system)
    raise BadRow("non_string_field", f"'prompt' is {type(prompt).__name__}, not a string or a list of turns")


def _answer_of(turns: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if not turns or turns[-1][0] != "assistant":
        raise BadRow("bad_conversation", "'chosen' holds no assistant reply at its end")
    return turns


def read_preference_alpaca(row: Mapping) -> Example:
    """LLaMA-Factory's Alpaca-style pairs: `instruction`, `input`, `chosen` (the answer), optional `history`/`system`."""
    answer = _answer_of(_chosen_turns(row["chosen"]))
    if len(answer) != 1:
        raise BadRow("bad_conversation", "with 'instruction', 'chosen' must be the answer alone (a string or one assistant turn)")
    return read_alpaca({**row, "output": answer[0][1]})


def read_preference_with_prompt(row: Mapping) -> Example:
    """`conversations` / `messages` / `prompt` before the answer, and `chosen`: the completion, or the
    whole conversation repeating the prompt (UltraFeedback's layout)."""
    turns, system = _prompt_turns(row)
    answer = _answer_of(_chosen_turns(row["chosen"]))
    if any(side == "user" for side, _ in answer):
        return _dialogue(answer, system)
    if turns and turns[-1][0] != "user":
        raise BadRow("bad_conversation", "the prompt ends with an assistant turn, so 'chosen' answers nothing")
    return _dialogue(turns + answer, system)


def read_preference_conversation(row: Mapping) -> Example:
    """No prompt field: `chosen` is the whole conversation (turns, or an HH `\\n\\nHuman: ...` transcript)."""
    chosen = row["chosen"]
    turns = _transcript_turns(chosen) if isinstance(chosen, str) else _chosen_turns(chosen)
    return _dialogue(_answer_of(turns), _text(row, "system", required=False))


PROMPT_FIELDS = ("conversations", "messages", "prompt")


def read_preference(row: Mapping) -> Example:
    """A preference pair as one example whose answer is `chosen`, by the layout its fields show."""
    if row.get("chosen") is None:
        raise BadRow("missing_field", f"no 'chosen' field (fields: {sorted(row)})")
    if any(row.get(key) is not None for key in PROMPT_FIELDS):
        return read_preference_with_prompt(row)
    if row.get("instruction") is not None:
        return read_preference_alpaca(row)
    return read_preference_conversation(row)


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
        Format(
            "preference",
            read_preference,
            "chatglm",
            "chosen[, rejected] with conversations, messages, prompt or instruction; only --format preference",
        ),
    )
}

PREFERENCE_FIELDS = frozenset({"chosen", "rejected"})


def is_preference(fields: Iterable[str]) -> bool:
    """Whether a record with these fields is a preference pair (read only with `--format preference`)."""
    return bool(PREFERENCE_FIELDS & set(fields))


def detect_format(fields: Iterable[str]) -> str | None:
    """The format name a record with these fields belongs to, or None (always None for preference pairs)."""
    fields = set(fields)
    if is_preference(fields):
        return None
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
