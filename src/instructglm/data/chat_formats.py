"""How each chat format turns a conversation into token ids, and which of them get labels.

Three formats cover every family (`instructglm.models.registry` picks one per family):

- `TextFormat` (ChatGLM-6B, ChatGLM2-6B, a causal LM without a chat template): the conversation is
  written as text by a prompt template (`chatglm`: `[Round i]\\n问：…\\n答：`, rounds from 0;
  `chatglm2`: `[Round i]\\n\\n问：…\\n\\n答：`, rounds from 1; `plain`), encoded with the tokenizer's
  own special tokens, and only the last answer is the target: the seed's prompt + target + eos rule
  (`instructglm.data.tokenize.RowEncoder`). Tools and tool turns cannot be written this way.
- `ChatGLM3Format`: THUDM's role tokens through the tokenizer's `build_single_message`, labelled as
  ChatGLM3's fine-tuning demo labels them (see `ChatGLM3Format.encode`).
- `ChatTemplateFormat` (GLM-4, GLM-4-0414, Qwen, Llama, any tokenizer with a chat template): the
  tokenizer's `apply_chat_template`; each trained message's tokens are found by rendering the
  conversation incrementally and checked to be a prefix of the whole (see `ChatTemplateFormat.encode`).

The role-token formats return an `Encoded` row: ids, labels (-100 where no loss) and the labelled
spans, which the truncation rule (`fit`) cuts at.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from instructglm.data.messages import Conversation, Message, ToolCall
from instructglm.data.records import BadRow, Example
from instructglm.errors import BadValue

IGNORE_INDEX = -100  # the label torch's cross entropy skips

# ChatGLM3's fine-tuning demo (finetune_demo/preprocess_utils.py) writes a conversation's tools as this
# first system message; its chat() and OpenAI demo write the same bytes through build_chat_input.
CHATGLM3_TOOLS_PROMPT = "Answer the following questions as best as you can. You have access to the following tools:"


@dataclass
class Encoded:
    """A tokenized training row: ids, labels, and the labelled spans `(start, end, tail)`.

    `tail` is how many of a span's last tokens are its end marker (the eos, the next role token, a
    template's end-of-turn token), which a cut span keeps.
    """

    input_ids: list[int]
    labels: list[int]
    spans: list[tuple[int, int, int]] = field(default_factory=list)


# Outcomes of fitting a row into `max_seq_length` (the `TokenizeCounts` fields they count under).
KEPT, TRUNCATED = "kept", "truncated"
PROMPT_TOO_LONG, EMPTY_TARGET, UNSUPPORTED = "dropped_prompt_too_long", "dropped_empty_target", "dropped_unsupported"


def fit(row: Encoded, max_seq_length: int) -> tuple[Encoded | None, str, int]:
    """(row cut to `max_seq_length`, outcome, trained turns dropped) under the multi-turn truncation rule.

    A prompt is never cut inside a turn. The first labelled span that does not fit is cut at the
    end of its content, keeping its end marker, when at least one content token fits; otherwise
    the row ends after the last span that fits whole. Either way every later turn is dropped
    (counted). A row whose first span has no room for one content token is dropped.
    """
    if not row.spans:
        return None, EMPTY_TARGET, 0
    if len(row.input_ids) <= max_seq_length:
        return row, KEPT, 0
    for index, (start, end, tail) in enumerate(row.spans):
        if end <= max_seq_length:
            continue
        dropped = len(row.spans) - index - 1
        if start + tail + 1 <= max_seq_length:  # room for one content token and the end marker
            keep = max_seq_length - tail
            ids = row.input_ids[:keep] + row.input_ids[end - tail : end]
            labels = row.labels[:keep] + row.labels[end - tail : end]
            return Encoded(ids, labels, row.spans[:index] + [(start, max_seq_length, tail)]), TRUNCATED, dropped
        if index == 0:
            return None, PROMPT_TOO_LONG, 0
        last_end = row.spans[index - 1][1]
        cut = Encoded(row.input_ids[:last_end], row.labels[:last_end], row.spans[:index])
        return cut, TRUNCATED, dropped + 1
    raise AssertionError("a row longer than max_seq_length has a span past it")  # pragma: no cover


def first_label(labels: Sequence[int]) -> int:
    """Index of the first labelled token (the `seq_len` old readers take as the prompt's length)."""
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


def spans_of(labels: Sequence[int], tails: Mapping[int, int]) -> list[tuple[int, int, int]]:
    """Maximal runs of labelled positions, with the end-marker length recorded for the run's end."""
    spans, start = [], None
    for i, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = i
        elif label == IGNORE_INDEX and start is not None:
            spans.append((start, i, tails.get(i, 0)))
            start = None
    return spans


def _token_id(tokenizer, token: str) -> int | None:
    """The id of a token the vocabulary has as a whole, else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(token_id)


def eos_ids_of(generation_config: Any) -> list[int]:
    """`eos_token_id` of a generation config (object or dict; an id or a list of ids), as a list."""
    value = generation_config.get("eos_token_id") if isinstance(generation_config, Mapping) else getattr(
        generation_config, "eos_token_id", None
    )
    return _ids_of(value)


def _ids_of(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def unique(ids: Sequence[int | None]) -> list[int]:
    """`ids` without None and repeats, in order."""
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(i)
    return out


# ---- text prompts (ChatGLM-6B, ChatGLM2-6B, plain causal LMs) -------------------------------------------------------


@dataclass(frozen=True)
class TextFormat:
    """A prompt template over (query, history) text; the last answer is the target."""

    template: str  # a name in instructglm.data.templates
    name: str = "text"

    def context(self, example: Example) -> str:
        """The prompt text of an example, as convert writes it (a system prompt first, on its own line)."""
        from instructglm.data.templates import get_template

        context = get_template(self.template).render(example.instruction, example.input, example.history)
        return f"{example.system}\n{context}" if example.system else context

    def context_target(self, conversation: Conversation) -> tuple[str, str]:
        """(context, target) of a conversation: its rounds through the template, the last answer the target."""
        from instructglm.data.messages import to_example

        example = to_example(conversation)
        return self.context(example), example.output

    def prompt_ids(self, tokenizer, messages: Sequence[Message], tools=None) -> list[int]:
        if tools:
            raise BadValue(f"the {self.template} prompt cannot show tools; drop them or use a family with role tokens")
        *history, last = _text_rounds(messages)
        context = self.context(Example(instruction=last, output="", history=tuple(history), system=_system(messages)))
        return list(tokenizer.encode(context))

    def context_prompt_ids(self, tokenizer, context: str) -> list[int]:
        """The prompt of a (context, target) row: the context with the tokenizer's special tokens."""
        return list(tokenizer.encode(context))

    def stop_token_ids(self, tokenizer, generation_config=None) -> list[int]:
        return unique([tokenizer.eos_token_id, *eos_ids_of(generation_config)])

    def parse_reply(self, text: str) -> Message:
        return Message("assistant", text)


def _system(messages: Sequence[Message]) -> str:
    return "\n".join(m.content for m in messages if m.role == "system")


def _text_rounds(messages: Sequence[Message]) -> list:
    """(query, answer) rounds, then the open query, of a prompt that ends with a user turn."""
    if any(m.tool_calls or m.role == "observation" for m in messages):
        raise BadValue("a text prompt cannot show tool calls or tool results; use a family with role tokens")
    sides: list[list[str]] = []
    for message in messages:
        if message.role == "system":
            continue
        if sides and sides[-1][0] == message.role:
            sides[-1][1] += "\n" + message.content
        else:
            sides.append([message.role, message.content])
    if not sides or sides[-1][0] != "user" or sides[0][0] != "user":
        raise BadValue("a prompt must start and end with a user message")
    rounds: list = [(sides[i][1], sides[i + 1][1]) for i in range(0, len(sides) - 1, 2)]
    return [*rounds, sides[-1][1]]


# ---- ChatGLM3 role tokens --------------------------------------------------------------------------------------------


def chatglm3_tool_call(call) -> str:
    """A tool call as the content ChatGLM3 is fine-tuned to write: ```python\\ntool_call(city='Paris')\\n```.

    The demo printed the call with astunparse; Python's own `ast.unparse` writes the same text for
    keyword arguments of literal values (repr of each value).
    """
    keywords = [ast.keyword(arg=str(key), value=ast.Constant(value)) for key, value in call.arguments.items()]
    code = ast.unparse(ast.Call(func=ast.Name(id="tool_call"), args=[], keywords=keywords))
    return f"```python\n{code}\n```"


def _chatglm3_tool(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    # ChatGLM3's OpenAI demo unwraps {"type": "function", "function": {...}} to the function itself
    return tool["function"] if tool.get("type") == "function" and isinstance(tool.get("function"), Mapping) else tool


@dataclass(frozen=True)
class ChatGLM3Format:
    """ChatGLM3-6B's role tokens (`[gMASK] sop` then `<|role|>` + metadata + "\\n" + content per message)."""

    name: str = "chatglm3"

    def messages(self, conversation: Conversation) -> list[tuple[str, str, str, bool]]:
        """(role, metadata, content, trained) of every message as ChatGLM3 writes it.

        Tools become the first system message; an assistant message's tool calls follow its text as one
        assistant message each, with the tool name as metadata (the demo's `tool` turn); a tool result is
        an observation message (JSON if not a string, as the demo wrote it).
        """
        out = []
        if conversation.tools:
            tools = [_chatglm3_tool(tool) for tool in conversation.tools]
            out.append(("system", "", CHATGLM3_TOOLS_PROMPT + "\n" + json.dumps(tools, indent=4, ensure_ascii=False), False))
        for message in conversation.messages:
            if message.role == "assistant" and message.tool_calls:
                if message.content:
                    out.append(("assistant", message.metadata, message.content, message.trained))
                out += [("assistant", call.name, chatglm3_tool_call(call), message.trained) for call in message.tool_calls]
            else:
                out.append((message.role, message.metadata, message.content, message.trained))
        return out

    def encode(self, tokenizer, conversation: Conversation) -> Encoded:
        """Ids and labels of a conversation, exactly as ChatGLM3's finetune_demo labels them.

        finetune_hf.py `process_batch`: ids = [gMASK, sop] + `build_single_message` of every message + [eos];
        each message's tokens are masked True when it is trained (assistant messages; the demo's
        preprocess_utils.py also honours a message's `loss` and never trains tool results), and
        `loss_masks = [False, *loss_masks]` shifts the mask by one, so the labelled tokens are those
        FOLLOWING a trained message's token: the "\\n" and content after an assistant role token, and the
        next role token (or the final eos), which teaches the model to end its turn. An assistant role token
        after a user or observation message is never labelled: it is the prompt's cue.
        """
        _require_roles(tokenizer)
        ids = list(tokenizer.get_prefix_tokens())
        mask = [False] * len(ids)
        for role, metadata, content, trained in self.messages(conversation):
            tokens = tokenizer.build_single_message(role, metadata, content)
            ids += tokens
            mask += [trained] * len(tokens)
        ids.append(tokenizer.eos_token_id)
        shifted = [False, *mask]
        labels = [token if labelled else IGNORE_INDEX for token, labelled in zip(ids, shifted)]
        # every span ends one token after a trained message: that token (next role, or eos) is its end marker
        tails = {i: 1 for i in range(1, len(labels) + 1)}
        return Encoded(ids, labels, spans_of(labels, tails))

    def prompt_ids(self, tokenizer, messages: Sequence[Message], tools=None) -> list[int]:
        """`build_chat_input`'s ids: [gMASK, sop], every message, then `<|assistant|>` to generate from."""
        _require_roles(tokenizer)
        if messages and messages[-1].role == "assistant":
            raise BadValue("a ChatGLM3 prompt ends with a user or observation message, not an assistant one")
        ids = list(tokenizer.get_prefix_tokens())
        conversation = Conversation(tuple(messages), tuple(tools or ()))
        for role, metadata, content, _ in self.messages(conversation):
            ids += tokenizer.build_single_message(role, metadata, content)
        return ids + [tokenizer.get_command("<|assistant|>")]

    def context_prompt_ids(self, tokenizer, context: str) -> list[int]:
        return self.prompt_ids(tokenizer, [Message("user", context)])

    def stop_token_ids(self, tokenizer, generation_config=None) -> list[int]:
        """eos, `<|user|>` and `<|observation|>` (THUDM's chat() stop ids), and the generation config's eos."""
        return unique([*tokenizer.chat_stop_token_ids, *eos_ids_of(generation_config)])

    def parse_reply(self, text: str) -> Message:
        """The assistant message a generation decodes to (special tokens kept, the stop token cut off).

        As ChatGLM3's `process_response` reads it: each `<|assistant|>` part is a metadata line and a body;
        no metadata is text, a tool name with a ```python tool_call(...)``` body is a call (its arguments
        read as literals, never evaluated), any other metadata (ChatGLM3's code interpreter) is kept as is.
        """
        contents, calls, metadata = [], [], ""
        for part in text.split("<|assistant|>"):
            head, newline, body = part.partition("\n")
            if not newline or not head.strip():
                contents.append((body if newline else head).strip())
                continue
            arguments = _python_call_arguments(body)
            if arguments is None:
                metadata = head.strip()
                contents.append(body.strip())
            else:
                calls.append(ToolCall(head.strip(), arguments))
        return Message("assistant", "\n".join(c for c in contents if c), tuple(calls), metadata)


def _python_call_arguments(body: str) -> dict[str, Any] | None:
    """The keyword arguments of a ```python\ntool_call(k=v, ...)\n``` body as literals, or None if it is not one."""
    lines = body.strip().split("\n")
    if lines and lines[0].strip().startswith("```"):
        lines = lines[1:-1] if len(lines) > 1 and lines[-1].strip().startswith("```") else lines[1:]
    try:
        call = ast.parse("\n".join(lines).strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and not call.args):
            return None
        return {keyword.arg: ast.literal_eval(keyword.value) for keyword in call.keywords if keyword.arg}
    except (SyntaxError, ValueError):
        return None


def _require_roles(tokenizer) -> None:
    if getattr(tokenizer, "chatglm_version", None) != 3 or not hasattr(tokenizer, "build_single_message"):
        raise BadValue(
            f"{type(tokenizer).__name__} (chatglm_version={getattr(tokenizer, 'chatglm_version', None)}) has no "
            "ChatGLM3 role tokens; is this a ChatGLM3-6B tokenizer?"
        )


# ---- the tokenizer's chat template -----------------------------------------------------------------------------------


def _openai_tool(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    # templates written for the OpenAI shape read tool["function"]; wrap a bare function description
    return tool if "function" in tool or tool.get("type") else {"type": "function", "function": dict(tool)}


@dataclass(frozen=True)
class ChatTemplateFormat:
    """The tokenizer's `chat_template`.

    `end_of_turn` names the token a model of this family writes to end its turn when the template
    does not (GLM-4 renders an assistant turn as `<|assistant|>\\ncontent` and stops at the next
    role token; its own fine-tuning demo appends `<|user|>`); None means the tokenizer's eos.
    `stop_tokens` are the extra stop tokens of the family (GLM-4: `<|endoftext|>`, `<|user|>`,
    `<|observation|>`, its generation_config's eos ids).
    """

    end_of_turn: str | None = None
    stop_tokens: tuple[str, ...] = ()
    name: str = "chat-template"

    # -- messages as the template reads them

    def dicts(self, tokenizer, messages: Sequence[Message]) -> list[dict[str, Any]]:
        """The messages as the template reads them: GLM-4's shape (a call is an assistant turn whose
        metadata is the tool's name and content the JSON arguments, a result an `observation` turn)
        when the template speaks of observations, else OpenAI's (`tool_calls`, role `tool`)."""
        glm_style = self.glm_style(tokenizer)
        out: list[dict[str, Any]] = []
        for message in messages:
            if message.role == "assistant" and message.tool_calls and glm_style:
                if message.content:
                    out.append(_assistant(message.content, message.metadata))
                out += [_assistant(json.dumps(dict(c.arguments), ensure_ascii=False), c.name) for c in message.tool_calls]
            elif message.role == "assistant" and message.tool_calls:
                calls = [{"type": "function", "function": {"name": c.name, "arguments": dict(c.arguments)}} for c in message.tool_calls]
                out.append({"role": "assistant", "content": message.content, "tool_calls": calls})
            elif message.role == "observation" and not glm_style:
                out.append({"role": "tool", "content": message.content, **({"name": message.name} if message.name else {})})
            else:
                entry: dict[str, Any] = {"role": message.role, "content": message.content}
                if message.metadata or (glm_style and message.role == "assistant"):
                    entry["metadata"] = message.metadata
                out.append(entry)
        return out

    def glm_style(self, tokenizer) -> bool:
        return "observation" in _template_text(tokenizer)

    def _tools(self, tokenizer, tools) -> list[dict[str, Any]] | None:
        if not tools:
            return None
        if self.glm_style(tokenizer):
            return [dict(tool) for tool in tools]
        return [dict(_openai_tool(tool)) for tool in tools]

    def render(self, tokenizer, dicts, tools, add_generation_prompt: bool) -> str:
        """The template's text for `dicts` (a row's problem with it, a `BadRow`)."""
        from jinja2 import TemplateError

        try:
            return tokenizer.apply_chat_template(
                list(dicts), tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
            )
        except TemplateError as error:
            raise BadRow("template_error", f"the chat template refuses this conversation: {error}") from None

    # -- the API

    def supports(self, tokenizer, conversation: Conversation) -> str | None:
        """Why the template cannot express `conversation`, or None when it can."""
        text = _template_text(tokenizer)
        if conversation.tools and "tools" not in text:
            return "the chat template shows no tools (it never reads `tools`)"
        if any(m.tool_calls or m.role == "observation" for m in conversation.messages) and not (
            "tool" in text or "observation" in text
        ):
            return "the chat template has no tool calls or tool results"
        return None

    def encode(self, tokenizer, conversation: Conversation, stop_ids: Sequence[int] | None = None) -> Encoded:
        """Ids and labels: every trained message's tokens as the template renders them, plus its end of turn.

        For trained message k the span starts after `render(messages[:k], add_generation_prompt=True)`
        (the prompt a model generates it from; without the generation prompt for a non-assistant message)
        and ends where `render(messages[:k+1])` ends; both must be token prefixes of the whole
        conversation's ids (a `BadRow` otherwise: such a template renders a turn differently in context).
        A span whose last tokens hold no stop token is extended by the next token when that is one (GLM-4's
        next `<|user|>` / `<|observation|>`), or, at the end of the conversation, by the family's
        end-of-turn token, so the model learns to end its turn. `stop_ids` default to `stop_token_ids(tokenizer)`.
        """
        if problem := self.supports(tokenizer, conversation):
            raise BadRow("unsupported", problem)
        tools = self._tools(tokenizer, conversation.tools)
        messages = conversation.messages
        trained = [k for k, m in enumerate(messages) if m.trained]
        texts = [self.render(tokenizer, self.dicts(tokenizer, messages), tools, False)]
        for k in trained:
            before = self.dicts(tokenizer, messages[:k])
            texts.append(self.render(tokenizer, before, tools, messages[k].role == "assistant") if before else "")
            texts.append(self.render(tokenizer, self.dicts(tokenizer, messages[: k + 1]), tools, False))
        full, *parts = tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids, labels = list(full), [IGNORE_INDEX] * len(full)
        stops = set(stop_ids if stop_ids is not None else self.stop_token_ids(tokenizer))
        tails: dict[int, int] = {}
        for index, k in enumerate(trained):
            start_ids, end_ids = parts[2 * index], parts[2 * index + 1]
            if ids[: len(end_ids)] != list(end_ids) or list(end_ids[: len(start_ids)]) != list(start_ids):
                raise BadRow(
                    "template_not_incremental",
                    f"the chat template renders messages[:{k + 1}] differently inside the whole conversation, so "
                    "its turns cannot be labelled one by one; train such rows one assistant turn per row",
                )
            start, end = len(start_ids), len(end_ids)
            tail = _stop_tail(tokenizer, ids[start:end], stops)
            if tail == 0 and end < len(ids) and ids[end] in stops:
                end, tail = end + 1, 1
            elif tail == 0 and end == len(ids):
                ids.append(self.end_of_turn_id(tokenizer))
                labels.append(IGNORE_INDEX)
                end, tail = end + 1, 1
            labels[start:end] = ids[start:end]
            tails[end] = tail
        return Encoded(ids, labels, spans_of(labels, tails))

    def prompt_ids(self, tokenizer, messages: Sequence[Message], tools=None) -> list[int]:
        """The template's generation prompt for `messages` (ending with its assistant cue)."""
        if messages and messages[-1].role == "assistant":
            raise BadValue("a prompt ends with a user or observation message, not an assistant one")
        text = self.render(tokenizer, self.dicts(tokenizer, messages), self._tools(tokenizer, tools), True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def context_prompt_ids(self, tokenizer, context: str) -> list[int]:
        return self.prompt_ids(tokenizer, [Message("user", context)])

    def parse_reply(self, text: str, tokenizer=None) -> Message:
        """The assistant message a generation decodes to. GLM-4's templates: a first line naming a tool, then
        JSON arguments, is a call; other templates' tool-call syntax is the model's own, left in the text."""
        if tokenizer is not None and not self.glm_style(tokenizer):
            return Message("assistant", text)
        head, newline, body = text.partition("\n")
        if newline and head.strip():
            try:
                arguments = json.loads(body)
            except json.JSONDecodeError:
                return Message("assistant", body.strip(), metadata=head.strip())
            if isinstance(arguments, dict):
                return Message("assistant", "", (ToolCall(head.strip(), arguments),))
        return Message("assistant", (body if newline and not head.strip() else text).strip())

    def end_of_turn_id(self, tokenizer) -> int:
        token_id = _token_id(tokenizer, self.end_of_turn) if self.end_of_turn else None
        token_id = token_id if token_id is not None else tokenizer.eos_token_id
        if token_id is None:
            raise BadValue(f"{type(tokenizer).__name__} has no eos token to end an assistant turn with; set eos_token")
        return token_id

    def stop_token_ids(self, tokenizer, generation_config=None) -> list[int]:
        """The generation config's eos ids, the tokenizer's eos, and the family's stop tokens the vocabulary has."""
        return unique(
            [
                *eos_ids_of(generation_config),
                tokenizer.eos_token_id,
                *(_token_id(tokenizer, token) for token in (self.end_of_turn, *self.stop_tokens) if token),
            ]
        )


def _assistant(content: str, metadata: str) -> dict[str, Any]:
    return {"role": "assistant", "metadata": metadata, "content": content}


def _template_text(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):  # named templates: the default one, else all of them
        template = template.get("default") or " ".join(map(str, template.values()))
    if not template:
        raise BadValue(f"{type(tokenizer).__name__} has no chat_template; add one to its tokenizer_config.json")
    return str(template)


def _stop_tail(tokenizer, span: Sequence[int], stops: set[int]) -> int:
    """How many of `span`'s last tokens are a stop token and what follows it (whitespace: Qwen's "<|im_end|>\\n")."""
    for back in range(1, min(len(span), 4) + 1):
        if span[-back] in stops:
            return back
        if tokenizer.decode([span[-back]]).strip():
            return 0
    return 0
