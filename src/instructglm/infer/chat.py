"""Chat: THUDM's `chat` / `stream_chat` API on the project's generation code, and the terminal chat.

    instructglm chat --model_name_or_path THUDM/chatglm3-6b --adapter output/tools

Type a message and press Enter; the answer streams as it is generated (by the batching engine,
`instructglm.infer.engine`, as in `serve` and `web`), prompted in the model family's format with the
adapter's training template (`instructglm.infer.prompts.Prompter`). `/clear` forgets the history,
`/exit` (or Ctrl-D) quits, Ctrl-C stops the current answer. A reply that is a tool call (ChatGLM3,
GLM-4) is shown as the call, and kept in the history as one.

`chat(model, tokenizer, query, history)` and `stream_chat(...)` keep the observable behaviour of
THUDM's `model.chat` / `model.stream_chat` for each family (the models' methods delegate here):

- ChatGLM-6B (and other text models): `[Round i]\n问：…\n答：` rounds, history as (query, answer) pairs,
  eos and pad ids from the model's config, eos and pad dropped from the decoded answer, THUDM's
  `process_response` (full-width punctuation next to CJK characters); top_p 0.7, temperature 0.95,
  max_length 2048.
- ChatGLM2-6B: `[Round i]\n\n问：…\n\n答：` rounds from 1 (`build_prompt`), pairs as history, the answer
  stripped; top_p 0.8, temperature 0.8, max_length 8192.
- ChatGLM3-6B (and GLM-4, chat-template models): `chat(tokenizer, query, history, role="user")` with history a
  list of message dicts (`{"role", "content"}`, `"metadata"` on an assistant tool call, `"tools"` on a
  system message); the prompt is `build_chat_input`'s; generation stops at eos, `<|user|>` or
  `<|observation|>`; the reply is read as THUDM's `process_response` reads it: each `<|assistant|>` part
  is appended to the history as `{"role": "assistant", "metadata", "content"}`, and the response is the
  text, or for a tool call `{"name": tool, "parameters": {...}}` when the history opens with a system
  message that has tools (`{"name", "content"}` otherwise). The call's arguments are read as Python
  literals, never evaluated. top_p 0.8, temperature 0.8, max_length 8192.

All of them take THUDM's non-finite-score guard (a forced token instead of a crash) and generate through
`instructglm.infer.generate` like every command, so sampling has the same defaults everywhere (top_p
alone: top_k is 0, not transformers' 50), and leaving a `stream_chat` loop early stops the generation at
once. Two differences from THUDM's code: the caller's `history` list is never modified (THUDM's ChatGLM3
appended the query to it), and the answer is cut at the stop token (THUDM's ChatGLM3 dropped the last
generated token, which cut a real one when an answer ran out of `max_length`).
"""

from __future__ import annotations

import copy
import json
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence, TextIO

from instructglm.errors import BadValue
from instructglm.infer.generate import GenerationArguments, generate_ids, stream_token_ids
from instructglm.infer.load import ModelArguments, load_from_args
from instructglm.infer.predict import LONE_SURROGATE


@dataclass
class ChatArguments:
    cuda_graphs: bool = field(
        default=True,
        metadata={
            "help": "On a GPU, decode with a static KV cache and torch.compile (CUDA graphs; compiled before the first "
            "answer); false: the dynamic cache."
        },
    )


ARGUMENTS = (ModelArguments, ChatArguments, GenerationArguments)

BANNER = "InstructGLM chat: type a message; /clear forgets the history, /exit quits."
USER, BOT = "User: ", "InstructGLM: "

# THUDM's chat() defaults, (max_length, top_p, temperature): ChatGLM-6B's (and every other text model's), and
# ChatGLM2-6B's / ChatGLM3-6B's (and the other role-token families').
CHATGLM_6B_DEFAULTS = (2048, 0.7, 0.95)
CHATGLM3_6B_DEFAULTS = (8192, 0.8, 0.8)
# The date THUDM's process_response writes for its `[[训练时间]]` placeholder, per family.
TRAINING_TIME = {"glm-4": "2024年", "glm-4-0414": "2024年"}


# --- THUDM's chat API ---------------------------------------------------------------------------


class NonFiniteScoreGuard:
    """THUDM's `InvalidScoreLogitsProcessor`: when a step's scores hold NaN or inf (fp16 overflow),
    they are replaced by a distribution that forces token 5, so generation goes on instead of the
    sampler raising."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        if not torch.isfinite(scores).all():
            scores = torch.zeros_like(scores)
            scores[..., 5] = 5e4
        return scores


def process_response(response: str) -> str:
    """THUDM's ChatGLM-6B clean-up: strip, date placeholder, full-width punctuation next to CJK characters."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full_width in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
        response = re.sub(rf"([\u4e00-\u9fff]){ascii_mark}", rf"\1{full_width}", response)
        response = re.sub(rf"{ascii_mark}([\u4e00-\u9fff])", rf"{full_width}\1", response)
    return response


def _training_time(family: Any) -> str:
    return TRAINING_TIME.get(family.name, "2023年")


def process_messages_response(prompter: Any, output: str, history: list[dict]) -> tuple[Any, list[dict]]:
    """THUDM's ChatGLM3 `process_response`: (response, history + one assistant entry per `<|assistant|>` part).

    A part is a metadata line and its content. No metadata: the content is text (stripped; the date
    placeholder filled in the response, not in the history). A tool name: with tools in the history's opening
    system message the response is `{"name", "parameters"}` — the call read by the family (ChatGLM3's
    ```python tool_call(k=v)``` as literals, GLM-4's JSON) — else `{"name", "content"}`. The last part decides
    the response. A call that cannot be read (a stream still writing it) is `{"name", "content"}` too.
    """
    history = copy.deepcopy(history)
    tools_offered = bool(history) and history[0].get("role") == "system" and "tools" in history[0]
    response: Any = ""
    for part in output.split("<|assistant|>"):
        metadata, newline, content = part.partition("\n")
        if not newline:
            metadata, content = "", part
        if not metadata.strip():
            content = content.strip()
            history.append({"role": "assistant", "metadata": metadata, "content": content})
            response = content.replace("[[训练时间]]", _training_time(prompter.family))
            continue
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        calls = prompter.reply(part).tool_calls if tools_offered else ()
        if calls:
            response = {"name": metadata.strip(), "parameters": dict(calls[0].arguments)}
        else:
            response = {"name": metadata.strip(), "content": content}
    return response, history


def _chat_prompter(model: Any, tokenizer: Any):
    """The family's default prompting of a model (THUDM's chat knows no adapter's template)."""
    from instructglm.infer.prompts import prompter_for

    return prompter_for(model, tokenizer)


def _uses_messages(prompter: Any) -> bool:
    return prompter.template is None


def _chat_generation(
    prompter: Any,
    model: Any,
    max_length: int | None,
    do_sample: bool,
    top_p: float | None,
    temperature: float | None,
    logits_processor: Any,
    kwargs: dict,
) -> tuple[GenerationArguments, dict]:
    """(settings, further `generate` arguments) of a chat call; `kwargs` pass on to `generate`."""
    from transformers import LogitsProcessorList

    later = _uses_messages(prompter) or prompter.family.name == "chatglm2-6b"
    default_length, default_top_p, default_temperature = CHATGLM3_6B_DEFAULTS if later else CHATGLM_6B_DEFAULTS
    kwargs = dict(kwargs)
    settings = GenerationArguments(
        max_length=default_length if max_length is None else max_length,
        max_new_tokens=kwargs.pop("max_new_tokens", None),
        top_p=default_top_p if top_p is None else top_p,
        temperature=default_temperature if temperature is None else temperature,
        do_sample=do_sample,
    )
    extra: dict = {}
    if _uses_messages(prompter):
        # THUDM's ChatGLM3 chat stops at eos, <|user|> and <|observation|>
        extra["eos_token_id"] = list(prompter.stop_ids)
    else:
        # THUDM's ChatGLM-6B chat took eos and pad from the model's config
        for name in ("eos_token_id", "pad_token_id"):
            value = getattr(model.config, name, None)
            if value is not None:
                extra[name] = value
    extra["logits_processor"] = LogitsProcessorList([*(logits_processor or []), NonFiniteScoreGuard()])
    extra.update(kwargs)
    return settings, extra


def _stop_ids(model: Any, tokenizer: Any, extra: dict) -> set[int]:
    """Ids dropped from a decoded chat answer: eos (the chat's stop ids) and pad, as THUDM's decode did."""
    from instructglm.infer.generate import eos_ids

    eos = extra.get("eos_token_id")
    stop = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else eos_ids(model, tokenizer)
    pad = extra.get("pad_token_id", tokenizer.pad_token_id)
    return {int(i) for i in stop | {pad} if i is not None}


def _answer_ids(ids: Sequence[int], stop: set[int], messages: bool) -> list[int]:
    """The answer's ids: up to the first stop token for a role-token chat; without eos and pad for a text one."""
    if messages:
        end = next((i for i, t in enumerate(ids) if t in stop), len(ids))
        return list(ids[:end])
    return [t for t in ids if t not in stop]


class _Turn:
    """One call of THUDM's chat API: the family's prompt for `query` after `history`, and its response."""

    def __init__(self, model: Any, tokenizer: Any, query: str, history: Any, role: str):
        self.prompter = _chat_prompter(model, tokenizer)
        self.query, self.role = query, role
        self.history = list(history or [])
        if _uses_messages(self.prompter):
            self.asked = [*copy.deepcopy(self.history), {"role": role, "content": query}]
            self.prompt: Any = self.prompter.prompt_ids(*_messages_and_tools(self.prompter, self.asked))
        else:
            if role != "user":
                raise BadValue(f"role={role!r}: the {self.prompter.family.name} family's chat prompt has no roles; ask as the user")
            self.prompt = self.prompter.template.render(query, "", _pairs(self.history, self.prompter))

    def response(self, tokenizer: Any, ids: Sequence[int], stop: set[int]) -> tuple[Any, Any]:
        messages = _uses_messages(self.prompter)
        answer = _answer_ids(ids, stop, messages)
        if messages:
            return process_messages_response(self.prompter, self.prompter.decode(answer), self.asked)
        text = tokenizer.decode(answer)
        if self.prompter.family.name == "chatglm2-6b":  # THUDM's ChatGLM2 process_response
            text = text.strip().replace("[[训练时间]]", "2023年")
        else:
            text = process_response(text)
        return text, self.history + [(self.query, text)]


def _pairs(history: Sequence[Any], prompter: Any) -> list[tuple[str, str]]:
    for index, item in enumerate(history):
        if not (isinstance(item, (list, tuple)) and len(item) == 2):
            raise BadValue(
                f"history[{index}] = {item!r}: the {prompter.family.name} family's chat history is (query, answer) pairs"
            )
    return [(str(q), str(a)) for q, a in history]


def _messages_and_tools(prompter: Any, messages: Sequence[Any]) -> tuple[list[dict], list | None]:
    """THUDM's message dicts as the family's prompt takes them: a system message's `tools` are appended to its
    content as indented JSON for ChatGLM3 (`build_chat_input`'s bytes), and become the prompt's tools for a
    chat template (GLM-4's chat passes them to its template)."""
    from instructglm.data.chat_formats import ChatGLM3Format

    chatglm3 = isinstance(prompter.family.chat_format, ChatGLM3Format)
    out, tools = [], None
    for index, item in enumerate(messages):
        if not isinstance(item, dict) or "role" not in item or "content" not in item:
            raise BadValue(
                f"history[{index}] = {item!r}: the {prompter.family.name} family's chat history is a list of dicts "
                "with 'role' and 'content'"
            )
        entry = {key: item[key] for key in ("role", "content", "metadata") if key in item}
        if item["role"] == "system" and "tools" in item:
            if chatglm3:
                entry["content"] = f"{item['content']}\n{json.dumps(item['tools'], indent=4, ensure_ascii=False)}"
            else:
                tools = list(item["tools"])
        out.append(entry)
    return out, tools


def chat(
    model,
    tokenizer,
    query: str,
    history: list | None = None,
    role: str = "user",
    *,
    max_length: int | None = None,
    num_beams: int = 1,
    do_sample: bool = True,
    top_p: float | None = None,
    temperature: float | None = None,
    logits_processor=None,
    **kwargs,
) -> tuple[Any, list]:
    """One chat turn, as THUDM's `model.chat` for the model's family (see the module docstring).

    Args:
        model, tokenizer: a loaded causal LM (any family) and its tokenizer.
        query, history: the question and the conversation so far: (question, answer) pairs for a text family,
            message dicts for ChatGLM3 and the other role-token families.
        role: who says `query` (role-token families; `observation` for a tool's result).
        max_length: prompt + answer tokens (default: THUDM's for the family; a `max_new_tokens` in kwargs
            overrides it).
        num_beams, do_sample, top_p, temperature: decoding (top_p and temperature default to THUDM's for the
            family); sampling uses top_p alone (top_k 0), and a temperature below `MIN_SAMPLING_TEMPERATURE`
            decodes greedily.
        logits_processor: processors run before THUDM's non-finite-score guard.
        kwargs: further `generate` arguments (e.g. `max_new_tokens`, `repetition_penalty`).

    Returns:
        (response, the new history): the response is the answer's text, or for a ChatGLM3/GLM-4 tool call
        `{"name", "parameters"}`; the history has the query and the answer appended.

    Raises:
        BadValue: bad settings or history, or the prompt leaves no room for an answer under `max_length`.
    """
    turn = _Turn(model, tokenizer, query, history, role)
    settings, extra = _chat_generation(turn.prompter, model, max_length, do_sample, top_p, temperature, logits_processor, kwargs)
    rows, _, _ = generate_ids(model, tokenizer, [turn.prompt], settings, num_beams=num_beams, **extra)
    return turn.response(tokenizer, rows[0], _stop_ids(model, tokenizer, extra))


def stream_chat(
    model,
    tokenizer,
    query: str,
    history: list | None = None,
    role: str = "user",
    *,
    max_length: int | None = None,
    do_sample: bool = True,
    top_p: float | None = None,
    temperature: float | None = None,
    logits_processor=None,
    **kwargs,
) -> Iterator[tuple[Any, list]]:
    """Like `chat`, yielding (response so far, the history with it) after every generated token, as THUDM's
    `model.stream_chat` (a step whose text ends inside a character is not yielded). Leaving the loop early
    (break, an exception, closing the generator) stops the generation after the current token."""
    turn = _Turn(model, tokenizer, query, history, role)
    settings, extra = _chat_generation(turn.prompter, model, max_length, do_sample, top_p, temperature, logits_processor, kwargs)
    stop = _stop_ids(model, tokenizer, extra)
    steps = iter(stream_token_ids(model, tokenizer, turn.prompt, settings, **extra))
    generated: list[int] = []
    try:
        for ids in steps:
            generated.extend(ids)
            if _uses_messages(turn.prompter):
                text = turn.prompter.decode(_answer_ids(generated, stop, True))
                if not text or text.endswith("\ufffd"):
                    continue
            yield turn.response(tokenizer, generated, stop)
    finally:
        steps.close()  # cancels and joins the generation thread when the reader left early


# --- the terminal chat --------------------------------------------------------------------------


def chat_loop(
    model,
    tokenizer,
    prompter,
    settings: GenerationArguments,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    engine: Any = None,
) -> list:
    """Run the conversation until /exit or end of input; returns the final conversation (`Message`s).

    Prompts come from `prompter` (the loaded model's `instructglm.infer.prompts.Prompter`); answers from
    the batching engine (`engine`, else one of a single row made here), driven on this thread, so Ctrl-C
    stops an answer at once. A tool call in a reply is shown after its text, one JSON object per call.
    """
    from instructglm.data.messages import Message
    from instructglm.infer.engine import BatchEngine, stream_answer

    engine = engine or BatchEngine(model, tokenizer, max_batch_size=1, max_queue=None, stop_ids=prompter.stop_ids)
    out = out or sys.stdout  # looked up now, so a redirected stdout is the one written to
    messages: list = []
    print(BANNER, file=out, flush=True)
    while True:
        try:
            query = read(USER).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return messages
        except UnicodeDecodeError:
            query = "\udcff"  # a stdin that decodes strictly: the same answer as below
        if not query:
            continue
        if LONE_SURROGATE.search(query):
            # bytes that are not UTF-8 (stdin decodes them as lone surrogates): no tokenizer can encode them
            print(NOT_TEXT, file=out, flush=True)
            continue
        if query == "/exit":
            return messages
        if query == "/clear":
            messages = []
            print("(history cleared)", file=out, flush=True)
            continue
        print(BOT, end="", file=out, flush=True)
        asked = [*messages, Message("user", query)]
        try:
            answer = stream_answer(engine, prompter, asked, settings)
            for piece in answer:
                print(piece, end="", file=out, flush=True)
        except KeyboardInterrupt:
            # Leaving the stream cancels the answer; the cut answer is not kept in the history.
            print("\n(stopped)", file=out, flush=True)
            continue
        except BadValue as err:
            # The history outgrew --max_length or the context: say so and let the user /clear.
            print(f"\n(error: {err})", file=out, flush=True)
            continue
        for call in answer.message.tool_calls:
            print(("\n" if answer.message.content else "") + "(tool call) " + json.dumps(call.to_dict(), ensure_ascii=False), end="", file=out)
        print(file=out, flush=True)
        messages = [*asked, answer.message]


NOT_TEXT = "(that line was not valid UTF-8 text and was not sent; type it again)"


def main(model_args: ModelArguments, chat_args: ChatArguments, settings: GenerationArguments) -> int:
    from instructglm.infer.engine import BatchEngine

    if hasattr(sys.stdin, "reconfigure"):
        # a line of invalid UTF-8 then reads as lone surrogates, which chat_loop refuses, instead of ending the session
        sys.stdin.reconfigure(errors="surrogateescape")

    model, tokenizer, prompter = load_from_args(model_args)
    decode = "auto" if chat_args.cuda_graphs else "dynamic"
    engine = BatchEngine(model, tokenizer, max_batch_size=1, max_queue=None, decode=decode, stop_ids=prompter.stop_ids)
    engine.warmup()
    chat_loop(model, tokenizer, prompter, settings, engine=engine)
    return 0
