"""One prompt path for inference: how a loaded model is prompted, where its answers stop, how they read back.

Every inference command (chat, predict, web, serve, eval, THUDM's chat API) asks a `Prompter` for
prompt ids and for the meaning of a reply, so a model is always prompted in its family's format
(`instructglm.models.registry`) with the template its adapter was trained with:

- a run whose template is `messages` on a role-token family (ChatGLM3-6B, GLM-4, a chat-template
  model): a conversation becomes `family.prompt_ids(tokenizer, messages, tools)` — role tokens or the
  tokenizer's chat template, tools included;
- a text template (ChatGLM-6B's `chatglm` rounds, ChatGLM2-6B's `chatglm2`, alpaca, belle, a custom
  format string, ...): the conversation's rounds go through the template,
  `family.context_prompt_ids(tokenizer, template.render(query, "", history))`, a system prompt on the
  line before (as `convert` writes it); tools cannot be shown this way (`BadValue`).

A converted row's `context` is prompted as tokenize prompted it (`context_ids`). Answers stop at
`family.stop_token_ids(tokenizer, generation_config)` and are read back by `family.parse_reply`
(ChatGLM3's metadata line and ```python tool_call(...)``` calls, GLM-4's `name\\n{json}` calls);
ChatGLM3's replies are decoded with their special tokens, since `<|assistant|>` separates the parts
of one reply. `ReplyStream` shows a reply's content while it streams, holding back what may turn out
to be a tool call.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructglm.errors import BadValue
from instructglm.layout import RUN_CONFIG

# The template name under which a role-token family is prompted with whole conversations.
MESSAGES = "messages"
# What starts the next part of a ChatGLM3 or GLM-4 reply (a tool call after text).
PART = "<|assistant|>"
# What `train` records as the template when its data's template is not known (a jsonl made by
# the 2023 scripts, without convert's sidecar).
UNKNOWN_TEMPLATE = "unknown"


@dataclass(frozen=True)
class Prompter:
    """How one loaded model is prompted and read (see the module docstring).

    Attributes:
        family: the model's `ModelFamily`.
        tokenizer: its tokenizer.
        template: the text template prompts are rendered with; None for the family's own conversation
            format (template `messages` on a role-token family).
        stop_ids: the ids an answer ends at.
    """

    family: Any
    tokenizer: Any
    template: Any = None
    stop_ids: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        """The template's name, as `instructglm_train.json` records it (`messages` for conversations)."""
        return MESSAGES if self.template is None else self.template.name

    @property
    def uses_tools(self) -> bool:
        """Whether prompts can show tools, tool calls and tool results (the family's conversation format)."""
        return self.template is None

    @property
    def skip_special_tokens(self) -> bool:
        """Whether replies are decoded without special tokens: all but ChatGLM3's and GLM-4's, whose
        `<|assistant|>` separates a reply's text from the tool calls after it."""
        return not self.metadata_line

    @property
    def metadata_line(self) -> bool:
        """Whether a reply opens with a metadata line (ChatGLM3, GLM-4's templates): empty for text, a tool's name for a call."""
        from instructglm.data.chat_formats import ChatGLM3Format, ChatTemplateFormat

        chat_format = self.family.chat_format
        if isinstance(chat_format, ChatGLM3Format):
            return True
        return isinstance(chat_format, ChatTemplateFormat) and chat_format.glm_style(self.tokenizer)

    # -- prompts --------------------------------------------------------------------------------

    def prompt_ids(self, messages: Sequence[Any], tools: Sequence[Mapping[str, Any]] | None = None) -> list[int]:
        """Ids to generate the next assistant message from.

        Args:
            messages: `Message` records or dicts (jsonl or OpenAI shape), ending with a user or tool message.
            tools: tool descriptions the assistant may call.

        Raises:
            BadValue: messages or tools the run's format cannot show (tools in a text prompt, a conversation that
                does not end with a user turn, a message the chat template refuses); the message says which.
        """
        from instructglm.data.messages import conversation_of
        from instructglm.data.records import BadRow

        from instructglm.data.chat_formats import ChatTemplateFormat

        try:
            conversation = conversation_of(messages, tools)
            if self.template is None:
                chat_format = self.family.chat_format
                # a chat template that never reads tools would drop them without a word
                if isinstance(chat_format, ChatTemplateFormat) and (problem := chat_format.supports(self.tokenizer, conversation)):
                    raise BadValue(f"{problem}: this {self.family.name} model's tokenizer cannot show the tools of this conversation")
                return self.family.prompt_ids(self.tokenizer, conversation.messages, conversation.tools)
        except BadRow as bad:
            raise BadValue(bad.detail) from None
        if conversation.uses_tools:
            raise BadValue(self.no_tools_reason())
        system, history, query = text_turns(conversation.messages)
        context = self.template.render(query, "", history)
        return self.context_ids(f"{system}\n{context}" if system else context)

    def chat_ids(self, query: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """`prompt_ids` of `query` after the (query, answer) rounds of `history`."""
        return self.prompt_ids(rounds_to_messages(query, history))

    def context_ids(self, context: str) -> list[int]:
        """The prompt of a converted row's `context`, as tokenize built it (a user message for a role-token family)."""
        from instructglm.data.records import BadRow

        try:
            return list(self.family.context_prompt_ids(self.tokenizer, context))
        except BadRow as bad:
            raise BadValue(bad.detail) from None

    def no_tools_reason(self) -> str:
        """Why this run's prompts cannot show tools (for messages and the API's 400)."""
        if self.family.role_tokens:
            return (
                f"this {self.family.name} model is prompted with the text template {self.name!r}, which cannot show tools, "
                "tool calls or tool results; use an adapter trained with --template messages (or pass --template messages)"
            )
        return (
            f"the {self.family.name} model family cannot use tools: its prompt is text ({self.name} template), with no "
            "place for tools, tool calls or tool results; use ChatGLM3-6B, GLM-4 or a model with a chat template"
        )

    # -- replies --------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        """The text of generated ids (the stop token cut off), as `reply` reads it."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=self.skip_special_tokens)

    def reply(self, text: str):
        """The assistant `Message` a decoded reply is: its content, and its tool calls where the family writes them.

        A GLM-4 reply may hold several parts, each after `<|assistant|>` (text, then a call): each is read by the
        family, their contents joined by newlines (as ChatGLM3's parts are).
        """
        from instructglm.data.chat_formats import ChatTemplateFormat
        from instructglm.data.messages import Message

        if not (isinstance(self.family.chat_format, ChatTemplateFormat) and self.metadata_line and PART in text):
            return self.family.parse_reply(text, self.tokenizer)
        parts = [self.family.parse_reply(part, self.tokenizer) for part in text.split(PART)]
        content = "\n".join(part.content for part in parts if part.content)
        calls = tuple(call for part in parts for call in part.tool_calls)
        metadata = next((part.metadata for part in parts if part.metadata), "")
        return Message("assistant", content, calls, metadata)

    def stream(self) -> ReplyStream:
        """A `ReplyStream` for one reply of this model."""
        return ReplyStream(self)

    def request(self, prompt_ids: Sequence[int], settings: Any, **options: Any):
        """An engine `GenerationRequest` for `prompt_ids` under `settings`, stopping at the family's stop ids and
        decoded as `reply` reads it."""
        from instructglm.infer.engine import request_for

        options.setdefault("stop_ids", self.stop_ids)
        options.setdefault("skip_special_tokens", self.skip_special_tokens)
        return request_for(prompt_ids, settings, **options)


def text_turns(messages: Sequence[Any]) -> tuple[str, list[tuple[str, str]], str]:
    """(system prompt, (query, answer) rounds, the open query) of a tool-free conversation, for a text template.

    System messages are joined by newlines; consecutive messages of one side are joined by a newline (as the
    dialogue readers do).

    Raises:
        BadValue: the conversation does not start (after system messages) and end with a user message.
    """
    system = "\n".join(m.content for m in messages if m.role == "system" and m.content)
    sides: list[list[str]] = []
    for message in messages:
        if message.role == "system":
            continue
        if sides and sides[-1][0] == message.role:
            sides[-1][1] += "\n" + message.content
        else:
            sides.append([message.role, message.content])
    if not sides or sides[-1][0] != "user":
        raise BadValue("the last non-system message must come from the user (it is the question answered)")
    if sides[0][0] != "user":
        raise BadValue("the conversation must start with a user message (after any system messages)")
    rounds = [(sides[i][1], sides[i + 1][1]) for i in range(0, len(sides) - 1, 2)]
    return system, rounds, sides[-1][1]


def rounds_to_messages(query: str, history: Sequence[tuple[str, str]] = ()) -> list[Any]:
    """(query, answer) rounds and a query as user/assistant messages."""
    from instructglm.data.messages import Message

    messages = []
    for asked, answered in history:
        messages += [Message("user", asked), Message("assistant", answered)]
    return messages + [Message("user", query)]


def reply_text(message: Any) -> str:
    """A reply as one text to score or show: its content, then each tool call as a JSON object on its own line."""
    parts = [message.content] if message.content else []
    parts += [json.dumps(call.to_dict(), ensure_ascii=False) for call in message.tool_calls]
    return "\n".join(parts)


class ReplyStream:
    """The content of a reply, piece by piece as its text grows, and the parsed reply at the end.

    For a family whose replies open with a metadata line (ChatGLM3, GLM-4), nothing is shown until that
    line is complete: an empty one opens text, which then streams (trailing whitespace and a possible
    `<|assistant|>` held back, so the pieces add up to the parsed content); a tool's name opens a call,
    which is held back whole and comes out of `finish` as the parsed message. Other families' text
    streams as it comes.
    """

    def __init__(self, prompter: Prompter):
        self.prompter = prompter
        self.raw = ""  # the reply's text so far
        self.shown = ""  # the content given out so far
        self.state = "head" if prompter.metadata_line else "text"

    def feed(self, piece: str) -> str:
        """The content `piece` (the next text of the reply) settles; possibly empty."""
        self.raw += piece
        if self.state == "text":
            return self._show(self.raw)
        if self.state == "head":
            head, newline, _ = self.raw.partition("\n")
            if not newline:
                return ""
            self.state = "body" if not head.strip() and PART not in head else "held"
        if self.state != "body":
            return ""
        body = self.raw.partition("\n")[2].lstrip()
        cut = body.find(PART)
        if cut >= 0:
            self.state = "held"
            body = body[:cut]
        else:
            body = body[: len(body) - _partial_suffix(body, PART)]
        return self._show(body.rstrip())

    def finish(self):
        """(the content not given out yet, the parsed assistant `Message`) once the reply is complete."""
        message = self.prompter.reply(self.raw)
        content = message.content
        rest = content[len(self.shown) :] if content.startswith(self.shown) else ""
        self.shown += rest
        return rest, message

    def _show(self, content: str) -> str:
        if len(content) <= len(self.shown) or not content.startswith(self.shown):
            return ""
        piece = content[len(self.shown) :]
        self.shown = content
        return piece


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    return max((k for k in range(1, len(marker)) if text.endswith(marker[:k])), default=0)


# --- which family and template a loaded model gets -----------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """A train run's `instructglm_train.json` (beside an adapter, or in a merged model's dir)."""

    path: Path
    values: dict = field(default_factory=dict)


def run_config_path(path: str | None) -> Path | None:
    """Where a run's `instructglm_train.json` would sit for an adapter dir, a `.pt` file or a model dir."""
    if not path:
        return None
    p = Path(path)
    candidate = (p if p.is_dir() else p.parent) / RUN_CONFIG
    return candidate if candidate.is_file() else None


def read_run_record(*sources: str | None) -> RunRecord | None:
    """The first run record found beside `sources` (the adapter, then the model dir), or None.

    Raises:
        BadValue: the record is not a JSON object.
    """
    for source in sources:
        saved = run_config_path(source)
        if saved is None:
            continue
        try:
            values = json.loads(saved.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise BadValue(f"{saved}: not valid JSON ({err}); fix or delete it, or pass --template") from err
        if not isinstance(values, dict):
            raise BadValue(f"{saved}: not a JSON object; fix or delete it, or pass --template")
        return RunRecord(saved, values)
    return None


def template_name_for(family: Any, record: RunRecord | None, adapter: str | None = None) -> str:
    """The template the adapter (or a merged model) was trained with, else the family's default.

    When the run says its training template is unknown, or an adapter comes without a run config,
    the family's template is a guess: a one-line warning on stderr says so and names --template.
    """
    fallback = family.chat_template
    if record is not None:
        name = record.values.get("template")
        # train records an unknown template as `template: null, template_source: "unknown"`
        if name == UNKNOWN_TEMPLATE or (not name and record.values.get("template_source") == UNKNOWN_TEMPLATE):
            warn(
                f"{record.path} says the adapter's training template is unknown (its data had no convert sidecar); "
                f"prompting with the model family's `{fallback}` template instead: pass --template NAME "
                "(e.g. alpaca, belle) if the training prompts looked different"
            )
            return fallback
        if isinstance(name, str) and name:
            return name
    if adapter is not None and record is None:
        warn(
            f"--adapter {adapter} has no {RUN_CONFIG}, so the template it was trained with is unknown; prompting with "
            f"the model family's `{fallback}` template instead: pass --template NAME if the training prompts looked different"
        )
    return fallback


def check_recorded_family(family: Any, record: RunRecord | None, model_name_or_path: str | None) -> None:
    """A run trained for one family is never prompted as another (a ChatGLM-6B adapter on ChatGLM3-6B, or the reverse).

    Raises:
        BadValue: the record names another family than the loaded model's.
    """
    recorded = record.values.get("family") if record is not None else None
    if isinstance(recorded, str) and recorded and recorded != family.name:
        raise BadValue(
            f"{record.path} says the run was trained for the {recorded} model family, but {model_name_or_path or 'the model'} "
            f"is a {family.name} model: its prompts, labels and stop tokens differ; use the base model the run was trained on"
        )


def prompter_for(
    model: Any,
    tokenizer: Any,
    adapter: str | None = None,
    model_name_or_path: str | None = None,
    template: str | None = None,
) -> Prompter:
    """The `Prompter` of a loaded model: its family (from its config and tokenizer), the run's template
    (`template`, else the adapter's or merged model's `instructglm_train.json`, else the family's default)
    and the family's stop ids.

    Raises:
        BadValue: an unknown template; a run record that is not a JSON object, or names another family.
    """
    from instructglm.data.templates import get_template
    from instructglm.infer.engine import unwrap
    from instructglm.models.registry import family_for

    network = unwrap(model)
    family = family_for(network.config, tokenizer)
    record = read_run_record(adapter, model_name_or_path)
    check_recorded_family(family, record, model_name_or_path)
    name = template or template_name_for(family, record, adapter)
    stop_ids = tuple(family.stop_token_ids(tokenizer, getattr(network, "generation_config", None)))
    if name == MESSAGES:
        if family.role_tokens:
            return Prompter(family, tokenizer, None, stop_ids)
        # a text family writes conversations with its own round template (what train records for them)
        name = family.chat_format.template
    return Prompter(family, tokenizer, get_template(name), stop_ids)


def warn(message: str) -> None:
    print(f"instructglm: warning: {message}", file=sys.stderr, flush=True)
