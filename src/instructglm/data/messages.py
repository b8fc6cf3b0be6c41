"""Whole conversations: the message record every family turns into ids, and its JSON form.

A `Conversation` is what `convert --template messages` writes (one per jsonl line) and what the
families encode (`ModelFamily.training_ids` / `prompt_ids`):

    {"messages": [{"role": "system", "content": "..."},
                  {"role": "user", "content": "What is the weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
                  {"role": "observation", "name": "get_weather", "content": "{\\"temperature\\": 21}"},
                  {"role": "assistant", "content": "21 °C in Paris."}],
     "tools": [{"name": "get_weather", "description": "...", "parameters": {...}}]}

Roles are ChatGLM3's four: `system`, `user`, `assistant`, `observation` (a tool's result; OpenAI's
`tool` role). An assistant message may carry `tool_calls` (name + JSON-object arguments) and
`metadata` (ChatGLM3/GLM-4's text after the role token, which for a call is the tool's name); an
observation may carry the `name` of the tool that answered. `loss` (ChatGLM3's field) says whether
a message is trained on; unset, assistant messages are and the others are not. `tools` is the
list of tool descriptions as the data gave them (a bare function description, or OpenAI's
`{"type": "function", "function": {...}}`); each family writes them the way its model reads them.

`Message.from_dict` also takes OpenAI's chat-completion shape (role `tool`, `tool_calls` of
`{"type": "function", "function": {"name", "arguments": "<JSON string>"}}`), so the API server can
hand requests over as they come. Bad input raises `BadRow` (one row's problem) with a reason key.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from instructglm.data.records import BadRow, Example, text_problem

ROLES = ("system", "user", "assistant", "observation")
# Other names datasets use for the four roles (the OpenAI API's `tool`, its legacy `function` result).
ROLE_ALIASES = {"tool": "observation", "function": "observation"}


@dataclass(frozen=True)
class ToolCall:
    """One call the assistant makes: the tool's name and its arguments (a JSON object)."""

    name: str
    arguments: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "arguments": dict(self.arguments)}


@dataclass(frozen=True)
class Message:
    """One message of a conversation (see the module docstring for the fields)."""

    role: str
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    metadata: str = ""
    name: str = ""
    loss: bool | None = None

    @property
    def trained(self) -> bool:
        """Whether the message's tokens get labels: its `loss`, else only assistant messages do."""
        return self.role == "assistant" if self.loss is None else self.loss

    def to_dict(self) -> dict[str, Any]:
        """The jsonl form: role and content always, the other fields only when set."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [call.to_dict() for call in self.tool_calls]
        if self.metadata:
            out["metadata"] = self.metadata
        if self.name:
            out["name"] = self.name
        if self.loss is not None:
            out["loss"] = self.loss
        return out

    @classmethod
    def from_dict(cls, value: Any, where: str = "message") -> Message:
        """A message from its jsonl form or OpenAI's chat-completion shape.

        Raises:
            BadRow: not an object, an unknown role, a non-string field, bad tool calls.
        """
        if not isinstance(value, Mapping):
            raise BadRow("bad_conversation", f"{where} is {type(value).__name__}, not an object")
        role = value.get("role")
        if not isinstance(role, str):
            raise BadRow("bad_conversation", f"{where} has no string 'role' (fields: {sorted(value)})")
        role = ROLE_ALIASES.get(role.lower(), role.lower())
        if role not in ROLES:
            known = ", ".join(ROLES + tuple(ROLE_ALIASES))
            raise BadRow("bad_conversation", f"{where}: unknown role {value['role']!r} (known: {known})")
        content = _text(value.get("content"), f"{where} content")
        calls = tuple(tool_call(call, f"{where} tool_calls[{i}]") for i, call in enumerate(value.get("tool_calls") or ()))
        if calls and role != "assistant":
            raise BadRow("bad_conversation", f"{where}: only assistant messages make tool calls, not {role}")
        loss = value.get("loss")
        if loss is not None and not isinstance(loss, bool):
            raise BadRow("non_string_field", f"{where} loss is {type(loss).__name__}, not true/false")
        return cls(
            role=role,
            content=content,
            tool_calls=calls,
            metadata=_text(value.get("metadata"), f"{where} metadata"),
            name=_text(value.get("name"), f"{where} name"),
            loss=loss,
        )


@dataclass(frozen=True)
class Conversation:
    """Messages in order, and the tools the assistant may call."""

    messages: tuple[Message, ...]
    tools: tuple[Mapping[str, Any], ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """One jsonl line of `convert --template messages` (`tools` only when there are some)."""
        out: dict[str, Any] = {"messages": [m.to_dict() for m in self.messages]}
        if self.tools:
            out["tools"] = [dict(tool) for tool in self.tools]
        return out

    @property
    def uses_tools(self) -> bool:
        """Tools, tool calls or tool results: what only the role-token families can express."""
        return bool(self.tools) or any(m.tool_calls or m.role == "observation" for m in self.messages)

    @classmethod
    def from_dict(cls, row: Any, where: str = "row") -> Conversation:
        """A conversation from a jsonl line `{"messages": [...], "tools": [...]}`, checked (see `checked`)."""
        if not isinstance(row, Mapping):
            raise BadRow("not_an_object", f"{where} is {type(row).__name__}, not an object")
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise BadRow("bad_conversation", f"{where}: 'messages' is {type(messages).__name__}, not a list")
        return checked(
            cls(
                messages=tuple(Message.from_dict(m, f"messages[{i}]") for i, m in enumerate(messages)),
                tools=parse_tools(row.get("tools")),
            )
        )


def tool_call(value: Any, where: str) -> ToolCall:
    """A call from `{"name", "arguments"}` or OpenAI's `{"type": "function", "function": {...}}`;
    arguments may be a JSON string (OpenAI's) of an object."""
    if isinstance(value, Mapping) and isinstance(value.get("function"), Mapping):
        value = value["function"]
    if not isinstance(value, Mapping) or not isinstance(value.get("name"), str) or not value["name"]:
        raise BadRow("bad_tool_call", f"{where} is not a call with a tool name ({_short(value)})")
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as error:
            raise BadRow("bad_tool_call", f"{where} arguments are not JSON ({error})") from None
    if not isinstance(arguments, Mapping):
        raise BadRow("bad_tool_call", f"{where} arguments are {type(arguments).__name__}, not a JSON object")
    return ToolCall(value["name"], dict(arguments))


def parse_tools(value: Any) -> tuple[Mapping[str, Any], ...]:
    """The `tools` field: a list of objects, or that list as a JSON string (LLaMA-Factory's); none if absent."""
    if value is None or value == "" or value == []:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise BadRow("bad_tools", f"'tools' is a string but not JSON ({error})") from None
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(tool, Mapping) for tool in value):
        raise BadRow("bad_tools", f"'tools' is {_short(value)}, not a list of tool objects")
    return tuple(dict(tool) for tool in value)


def checked(conversation: Conversation) -> Conversation:
    """The conversation with what cannot be learned removed, or `BadRow`.

    System messages must come first; messages after the last trained assistant message are dropped
    (nothing answers them); a conversation with no trained assistant message, or with one whose
    content and tool calls are both empty, is refused.
    """
    messages = list(conversation.messages)
    seen_other = False
    for i, message in enumerate(messages):
        if message.role != "system":
            seen_other = True
        elif seen_other:
            raise BadRow("bad_conversation", f"messages[{i}]: a system message after the conversation started")
    while messages and not (messages[-1].role == "assistant" and messages[-1].trained):
        messages.pop()
    if not messages:
        raise BadRow("empty_output", "no assistant message to learn")
    if not any(m.role != "system" and m.role != "assistant" for m in messages):
        raise BadRow("empty_prompt", "no user message before the assistant's")
    for i, message in enumerate(messages):
        if message.role == "assistant" and message.trained and not (message.content.strip() or message.tool_calls):
            raise BadRow("empty_output", f"messages[{i}]: an assistant message with no content and no tool call")
    return Conversation(tuple(messages), conversation.tools)


def from_example(example: Example) -> Conversation:
    """An `Example` (Alpaca, BELLE, history rounds) as a conversation: system, then user/assistant rounds."""
    from instructglm.data.templates import query_of

    messages = [Message("system", example.system)] if example.system else []
    for query, answer in example.history:
        messages += [Message("user", query), Message("assistant", answer)]
    messages += [Message("user", query_of(example.instruction, example.input)), Message("assistant", example.output)]
    return Conversation(tuple(messages))


def to_example(conversation: Conversation) -> Example:
    """A tool-free conversation as the `Example` the text templates render: its last assistant
    message is the output, the user turn before it the instruction, earlier rounds the history
    (consecutive messages of one side joined by a newline, as the dialogue readers do).

    Raises:
        BadRow: the conversation uses tools (`needs_messages_template`), or does not alternate.
    """
    if conversation.uses_tools:
        raise BadRow(
            "needs_messages_template",
            "tools, tool calls or tool results cannot be written as a text prompt: such rows need --template messages "
            "at convert and a model family with role tokens (ChatGLM3, GLM-4, a chat template)",
        )
    system = "\n".join(m.content for m in conversation.messages if m.role == "system")
    sides: list[list[str]] = []
    for message in conversation.messages:
        if message.role == "system":
            continue
        if sides and sides[-1][0] == message.role:
            sides[-1][1] += "\n" + message.content
        else:
            sides.append([message.role, message.content])
    if sides[0][0] != "user":
        raise BadRow("bad_conversation", "the conversation starts with an assistant turn")
    rounds = [(sides[i][1], sides[i + 1][1]) for i in range(0, len(sides) - 1, 2)]
    *history, (query, answer) = rounds
    return Example(instruction=query, output=answer, history=tuple(history), system=system)


def conversation_of(messages: Sequence[Message | Mapping[str, Any]], tools: Iterable[Mapping[str, Any]] | None = None) -> Conversation:
    """Records or dicts (jsonl or OpenAI shape) as a `Conversation`, unchecked (a prompt may end with a user turn)."""
    return Conversation(
        tuple(m if isinstance(m, Message) else Message.from_dict(m, f"messages[{i}]") for i, m in enumerate(messages)),
        parse_tools(list(tools) if tools is not None else None),
    )


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRow("non_string_field", f"{where} is {type(value).__name__}, not a string")
    if problem := text_problem(value):
        raise BadRow("invalid_unicode", f"{where}: {problem}")
    return value


def _short(value: Any) -> str:
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)}"
    return f"{value!r:.60}"
