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

- `messages` — OpenAI's chat layout: `messages` of `{"role", "content"}` (system, user, assistant
               with `tool_calls`, `tool` results) and optional `tools`.

Whole conversations (`read_conversation`, for `convert --template messages`): every format also
reads into an `instructglm.data.messages.Conversation`, which keeps system prompts, tools, tool
calls and tool results and every turn. `sharegpt` then also reads ChatGLM3's fine-tuning layout
(`conversations` of role/content turns, where a `tool` turn holds `name`, `parameters` and
`observation`, plus a `tools` field) and LLaMA-Factory's ShareGPT tool layout (`function_call`
turns holding `{"name", "arguments"}` JSON, `observation` turns, a `tools` JSON string).

For dialogues the last assistant reply is the output, the user turn before it the instruction,
and earlier rounds the history. A leading system turn becomes `Example.system`; consecutive turns
of one side are joined with a newline; user turns after the last reply (a conversation cut off
mid-round) are dropped, since they have no answer to learn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from instructglm.data.messages import Conversation, Message, checked, from_example, parse_tools, to_example, tool_call
from instructglm.data.records import BadRow, Example, text_problem

USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bard", "bing", "model"})
SYSTEM_ROLES = frozenset({"system"})
# Tool turns of the layouts `read_conversation` reads; the text templates cannot show them.
TOOL_ROLES = frozenset({"function_call", "observation", "tool"})


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
            hint = " (a tool turn: convert with --template messages to keep it)" if role in TOOL_ROLES else ""
            raise BadRow("bad_conversation", f"turn {i}: unknown role {role!r} (known: {', '.join(known)}){hint}")
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


# ---- whole conversations (convert --template messages) --------------------------------------------------------------


def _sharegpt_messages(turn: Mapping, i: int) -> list[Message]:
    """The messages of one `conversations` turn (ShareGPT from/value, or role/content with ChatGLM3's tool turns)."""
    if not isinstance(turn, Mapping):
        raise BadRow("bad_conversation", f"turn {i} is {type(turn).__name__}, not an object")
    role_key, text_key = ("from", "value") if turn.get("from") is not None else ("role", "content")
    role = _text(turn, role_key).lower()
    where = f"turn {i}"
    if role == "tool" and ("parameters" in turn or "observation" in turn):
        # ChatGLM3's demo: one turn for the call and its result
        call = tool_call({"name": turn.get("name"), "arguments": turn.get("parameters") or {}}, where)
        result = turn.get("observation")
        result = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
        loss = turn.get("loss")
        return [
            Message("assistant", tool_calls=(call,), loss=loss if isinstance(loss, bool) else None),
            Message("observation", result, name=call.name),
        ]
    if role == "function_call":
        value = _text(turn, text_key)
        try:
            calls = json.loads(value)
        except json.JSONDecodeError as error:
            raise BadRow("bad_tool_call", f"{where}: a function_call that is not JSON ({error})") from None
        calls = calls if isinstance(calls, list) else [calls]
        return [Message("assistant", tool_calls=tuple(tool_call(c, f"{where}[{j}]") for j, c in enumerate(calls)))]
    side = (
        "user" if role in USER_ROLES
        else "assistant" if role in ASSISTANT_ROLES
        else "observation" if role in ("observation", "tool", "function")
        else role
    )
    fields = {key: turn.get(key) for key in ("metadata", "name", "loss", "tool_calls") if turn.get(key) is not None}
    return [Message.from_dict({"role": side, "content": turn.get(text_key), **fields}, where)]


def _joined_calls(messages: list[Message]) -> list[Message]:
    """An assistant turn that only calls tools joins the assistant text right before it (one message)."""
    out: list[Message] = []
    for message in messages:
        previous = out[-1] if out else None
        if (
            message.role == "assistant" and message.tool_calls and not message.content
            and previous is not None and previous.role == "assistant" and not previous.tool_calls
            and previous.loss == message.loss
        ):
            out[-1] = Message("assistant", previous.content, message.tool_calls, previous.metadata, loss=previous.loss)
        else:
            out.append(message)
    return out


def read_sharegpt_conversation(row: Mapping) -> Conversation:
    """`conversations` kept whole: ShareGPT, LLaMA-Factory's tool layout, or ChatGLM3's (see the module docstring)."""
    messages = []
    system = _text(row, "system", required=False)
    if system:
        messages.append(Message("system", system))
    for i, turn in enumerate(_conversation(row, "conversations")):
        messages += _sharegpt_messages(turn, i)
    return checked(Conversation(tuple(_joined_calls(messages)), parse_tools(row.get("tools"))))


def read_messages_conversation(row: Mapping) -> Conversation:
    """OpenAI's `messages` (+ `tools`); a `tool` result gets the name of the call its `tool_call_id` answers."""
    names: dict[str, str] = {}
    messages = []
    system = _text(row, "system", required=False)
    if system:
        messages.append(Message("system", system))
    for i, item in enumerate(_conversation(row, "messages")):
        if isinstance(item, Mapping):
            for call in item.get("tool_calls") or ():
                if isinstance(call, Mapping) and isinstance(call.get("id"), str) and isinstance(call.get("function"), Mapping):
                    names[call["id"]] = call["function"].get("name") or ""
            if item.get("role") == "tool" and not item.get("name") and item.get("tool_call_id") in names:
                item = {**item, "name": names[item["tool_call_id"]]}
            if not isinstance(item.get("content"), (str, type(None))):
                item = {**item, "content": _content_text(item.get("content"), f"messages[{i}]")}
        messages.append(Message.from_dict(item, f"messages[{i}]"))
    return checked(Conversation(tuple(messages), parse_tools(row.get("tools"))))


def _content_text(content: Any, where: str) -> str:
    """OpenAI's list-of-parts content (`[{"type": "text", "text": ...}]`) as text; other parts are refused."""
    if isinstance(content, list) and all(isinstance(p, Mapping) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text") or "") for p in content)
    raise BadRow("non_string_field", f"{where} content is {type(content).__name__}, not text")


def read_messages(row: Mapping) -> Example:
    """OpenAI's `messages` flattened for a text template (refused when it uses tools)."""
    return _checked(to_example(read_messages_conversation(row)))


def _as_conversation(read: Callable[[Mapping], Example]) -> Callable[[Mapping], Conversation]:
    def read_conversation(row: Mapping) -> Conversation:
        return checked(from_example(read(row)))

    read_conversation.__doc__ = f"`{read.__name__}`'s example as a conversation (system, then the rounds)."
    return read_conversation


@dataclass(frozen=True)
class Format:
    name: str
    read: Callable[[Mapping], Example]
    default_template: str  # a name in instructglm.data.templates, as the seed chose per dataset
    fields: str  # how the format looks, for messages
    read_conversation: Callable[[Mapping], Conversation] | None = None  # for --template messages; None: from `read`

    def conversation_reader(self) -> Callable[[Mapping], Conversation]:
        return self.read_conversation or _as_conversation(self.read)


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("alpaca", read_alpaca, "alpaca", "instruction, output[, input]"),
        Format("history", read_alpaca, "chatglm", "instruction, output, history[, input]"),
        Format("belle", read_belle, "belle", "input, target"),
        Format(
            "sharegpt",
            read_sharegpt,
            "chatglm",
            "conversations: [{from, value}, ...] (or role/content; tool turns with --template messages)",
            read_sharegpt_conversation,
        ),
        Format("firefly", read_firefly, "chatglm", "conversation: [{human, assistant}, ...]"),
        Format(
            "messages",
            read_messages,
            "messages",
            "messages: [{role, content[, tool_calls]}, ...][, tools] (OpenAI)",
            read_messages_conversation,
        ),
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
    if "messages" in fields:
        return "messages"
    if {"instruction", "output"} <= fields:
        return "history" if "history" in fields else "alpaca"
    if {"input", "target"} <= fields:
        return "belle"
    return None


def describe_formats() -> str:
    """One line per format for error messages: `name (fields)`."""
    return "; ".join(f"{f.name} ({f.fields})" for f in FORMATS.values())


def read_rows(
    rows: Iterable[tuple[str, Any]], fmt: str, conversations: bool = False
) -> Iterator[tuple[str, Example | Conversation | BadRow]]:
    """(location, raw row) -> (location, Example, or Conversation with `conversations`, or the BadRow that says why not)."""
    read = FORMATS[fmt].conversation_reader() if conversations else FORMATS[fmt].read
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
