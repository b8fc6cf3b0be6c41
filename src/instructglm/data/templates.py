"""Prompt templates: (instruction, input, history) -> the context string the model sees.

`get_template(name)` accepts a registered name or a custom Python format string, and returns a
`Template` whose `render(instruction, input="", history=())` builds the prompt. Convert saves the
name in the jsonl's sidecar and train saves it in the run dir, so inference renders prompts the
same way the model was trained.

Registered templates:

- `alpaca`   — the seed's (mymusise/ChatGLM-Tuning `cover_alpaca2jsonl.py`):
               `Instruction: {instruction}\\n` + `Input: {input}\\n` if input + `Answer: `.
- `belle`    — the seed's BELLE one (yanqiangmiffy/InstructGLM `cover_belle2jsonl.py`):
               `指令: {instruction}\\n答案: `; the seed had no input field, so a non-empty input
               adds `输入: {input}\\n` before `答案: `, as `alpaca` does.
- `instruction-response` — `###Instruction:{instruction}###Input:{input}###Response:`, the
               style the InstructGLM README shows; `###Input:…` only if input.
- `chatglm`  — THUDM ChatGLM-6B's `chat()` prompt: no history -> the query alone; with history
               `[Round 0]\\n问：{q}\\n答：{a}\\n` … `[Round {n}]\\n问：{query}\\n答：` (rounds from 0).
- `chatglm2` — THUDM ChatGLM2-6B's `build_prompt`: `[Round 1]\\n\\n问：{q}\\n\\n答：{a}\\n\\n` …
               `[Round {n}]\\n\\n问：{query}\\n\\n答：` (rounds from 1, the open round even without history).
- `plain`    — the query alone; history as `{q}\\n{a}\\n` lines before it.
- `messages` — no text at all: convert keeps each conversation whole (`{"messages", "tools"}` lines,
               see `instructglm.data.messages`) and the model family writes it in its own chat format
               (`ModelFamily.prompt_ids` / `training_ids`). Rendered as text, for a caller that can
               only show a string, it is `plain`.

The query of `chatglm` and `plain` is the instruction, then a newline and the input if there is
one (as ChatGLM-Efficient-Tuning joined Alpaca rows into a chat query).

History with the single-turn templates (`alpaca`, `belle`, `instruction-response`, custom
strings without `{history}`): each earlier round is rendered as a prompt of its own followed by
its answer and a newline, then the current prompt — so no round is silently dropped.

A custom template is any string with `{instruction}` and/or `{input}` (and optionally
`{history}`, filled with the `plain` history lines) — e.g. `"Q: {instruction}\\n{input}\\nA: "`.
Backslash escapes `\\n` and `\\t` in it become newline and tab, since a shell passes them through
literally; write `{{`/`}}` for literal braces.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from instructglm.errors import BadValue

History = Sequence[tuple[str, str]]


def query_of(instruction: str, input: str = "") -> str:
    """The chat query of an Alpaca-shaped example: instruction, then the input on its own line."""
    return f"{instruction}\n{input}" if input else instruction


def _with_history(turn: Callable[[str, str], str], instruction: str, input: str, history: History) -> str:
    """Earlier rounds as `turn(q) + a + "\\n"` each, then the current turn."""
    return "".join(turn(q, "") + a + "\n" for q, a in history) + turn(instruction, input)


def _alpaca_turn(instruction: str, input: str) -> str:
    prompt = f"Instruction: {instruction}\n"
    if input:
        prompt += f"Input: {input}\n"
    return prompt + "Answer: "


def _belle_turn(instruction: str, input: str) -> str:
    prompt = f"指令: {instruction}\n"
    if input:
        prompt += f"输入: {input}\n"
    return prompt + "答案: "


def _instruction_response_turn(instruction: str, input: str) -> str:
    prompt = f"###Instruction:{instruction}"
    if input:
        prompt += f"###Input:{input}"
    return prompt + "###Response:"


def alpaca(instruction: str, input: str = "", history: History = ()) -> str:
    return _with_history(_alpaca_turn, instruction, input, history)


def belle(instruction: str, input: str = "", history: History = ()) -> str:
    return _with_history(_belle_turn, instruction, input, history)


def instruction_response(instruction: str, input: str = "", history: History = ()) -> str:
    return _with_history(_instruction_response_turn, instruction, input, history)


def chatglm(instruction: str, input: str = "", history: History = ()) -> str:
    query = query_of(instruction, input)
    if not history:
        return query
    rounds = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(history))
    return rounds + f"[Round {len(history)}]\n问：{query}\n答："


def chatglm2(instruction: str, input: str = "", history: History = ()) -> str:
    rounds = "".join(f"[Round {i}]\n\n问：{q}\n\n答：{a}\n\n" for i, (q, a) in enumerate(history, start=1))
    return rounds + f"[Round {len(history) + 1}]\n\n问：{query_of(instruction, input)}\n\n答："


def _plain_history(history: History) -> str:
    return "".join(f"{q}\n{a}\n" for q, a in history)


def plain(instruction: str, input: str = "", history: History = ()) -> str:
    return _plain_history(history) + query_of(instruction, input)


TEMPLATES: dict[str, Callable[..., str]] = {
    "alpaca": alpaca,
    "belle": belle,
    "instruction-response": instruction_response,
    "chatglm": chatglm,
    "chatglm2": chatglm2,
    "plain": plain,
    "messages": plain,
}

# The template under which convert keeps whole conversations instead of rendering text.
MESSAGES = "messages"

CUSTOM_FIELDS = ("instruction", "input", "history")


@dataclass(frozen=True)
class Template:
    """A named prompt builder; `name` is what gets saved (a custom template's name is its string)."""

    name: str
    _render: Callable[[str, str, History], str]

    def render(self, instruction: str, input: str = "", history: History = ()) -> str:
        """The context for one example: `history` is (query, answer) rounds, oldest first."""
        return self._render(instruction, input, tuple(history))


def _custom(fmt: str) -> Callable[[str, str, History], str]:
    fmt = fmt.replace("\\n", "\n").replace("\\t", "\t")
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(fmt) if name is not None}
    except ValueError as e:
        raise BadValue(f"--template {fmt!r}: not a valid format string ({e}); write {{{{ }}}} for literal braces") from None
    unknown = fields - set(CUSTOM_FIELDS)
    if unknown or not fields & {"instruction", "input"}:
        problem = f"unknown fields {sorted(unknown)}" if unknown else "no {instruction} or {input} field"
        raise BadValue(
            f"--template {fmt!r}: {problem}. Use a name ({', '.join(TEMPLATES)}) or a format string "
            f"with {{instruction}} and/or {{input}} (and optionally {{history}}); write {{{{ }}}} for literal braces"
        )

    if "history" in fields:
        return lambda instruction, input, history: fmt.format(
            instruction=instruction, input=input, history=_plain_history(history)
        )
    return lambda instruction, input, history: _with_history(
        lambda i, x: fmt.format(instruction=i, input=x), instruction, input, history
    )


# How a context rendered by each single-turn template ends (its answer cue) and begins (its first
# field, or the first round of history, which these templates render the same way).
_TEMPLATE_SHAPES = {
    "alpaca": ("Instruction: ", "Answer: "),
    "belle": ("指令: ", "答案: "),
    "instruction-response": ("###Instruction:", "###Response:"),
    "chatglm2": ("[Round 1]\n\n问：", "\n\n答："),
}


def detect_template(contexts: Iterable[str]) -> str | None:
    """The registered template every one of `contexts` was rendered with, or None when they do not all agree.

    For data without convert's sidecar (a jsonl made by the 2023 scripts): `alpaca`, `belle` and
    `instruction-response` are recognised by their opening field and answer cue. `chatglm` and
    `plain` render a query without history as the bare query, so nothing tells them apart from
    free text; such data gives None (the caller records the template as unknown).
    """
    found: str | None = None
    seen = False
    for context in contexts:
        seen = True
        match = next(
            (name for name, (start, cue) in _TEMPLATE_SHAPES.items() if context.startswith(start) and context.endswith(cue)),
            None,
        )
        if match is None or (found is not None and match != found):
            return None
        found = match
    return found if seen else None


def get_template(name_or_format: str) -> Template:
    """A registered template by name, or a custom one from a format string (see the module doc)."""
    if name_or_format in TEMPLATES:
        return Template(name_or_format, TEMPLATES[name_or_format])
    if "{" not in name_or_format:
        raise BadValue(
            f"--template {name_or_format!r}: unknown template; use one of {', '.join(TEMPLATES)}, "
            "or a format string with {instruction} and/or {input}"
        )
    return Template(name_or_format, _custom(name_or_format))
