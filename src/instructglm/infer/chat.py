"""Chat: THUDM's `chat` / `stream_chat` API on the project's generation code, and the terminal chat.

    instructglm chat --model_name_or_path THUDM/chatglm-6b --adapter output/alpaca

Type a message and press Enter; the answer streams as it is generated (by the batching engine,
`instructglm.infer.engine`, as in `serve` and `web`). `/clear` forgets the history, `/exit` (or
Ctrl-D) quits, Ctrl-C stops the current answer.

`chat(model, tokenizer, query, history)` and `stream_chat(...)` keep the observable behaviour of
THUDM's `model.chat` / `model.stream_chat` for ChatGLM-6B (the model's methods delegate here):
the round prompt of the model family's chat template, THUDM's guard that turns non-finite scores
into a forced token instead of a crash, eos and pad ids from the model's config, eos and pad
dropped from the decoded answer, and THUDM's `process_response` clean-up. They generate through
`instructglm.infer.generate` like every command, so sampling has the same defaults everywhere
(top_p alone: top_k is 0, not transformers' 50), and leaving a `stream_chat` loop early stops the
generation at once.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TextIO

from instructglm.errors import BadValue
from instructglm.infer.generate import GenerationArguments, build_prompt, eos_ids, generate_ids, stream_token_ids
from instructglm.infer.load import ModelArguments, load_from_args


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

History = list[tuple[str, str]]


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
    """THUDM's clean-up: strip, date placeholder, full-width punctuation next to CJK characters."""
    response = response.strip().replace("[[训练时间]]", "2023年")
    for ascii_mark, full_width in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
        response = re.sub(rf"([\u4e00-\u9fff]){ascii_mark}", rf"\1{full_width}", response)
        response = re.sub(rf"{ascii_mark}([\u4e00-\u9fff])", rf"{full_width}\1", response)
    return response


def chat_prompt(model: Any, query: str, history: History) -> str:
    """The prompt of THUDM's chat: `query` after `history` through the model family's chat template
    (ChatGLM-6B: the query alone, or `[Round i]\\n问：…\\n答：…` rounds)."""
    from instructglm.data.templates import get_template
    from instructglm.models.registry import family_for

    return build_prompt(get_template(family_for(model.config).chat_template), query, history)


def _chat_generation(
    model: Any, max_length: int | None, do_sample: bool, top_p: float, temperature: float, logits_processor: Any, kwargs: dict
) -> tuple[GenerationArguments, dict]:
    """(settings, further `generate` arguments) of a chat call; `kwargs` pass on to `generate`."""
    from transformers import LogitsProcessorList

    kwargs = dict(kwargs)
    settings = GenerationArguments(
        max_length=max_length,
        max_new_tokens=kwargs.pop("max_new_tokens", None),
        top_p=top_p,
        temperature=temperature,
        do_sample=do_sample,
    )
    extra: dict = {}
    # THUDM's chat took eos and pad from the model's config; explicit kwargs still win.
    for name in ("eos_token_id", "pad_token_id"):
        value = getattr(model.config, name, None)
        if value is not None:
            extra[name] = value
    extra["logits_processor"] = LogitsProcessorList([*(logits_processor or []), NonFiniteScoreGuard()])
    extra.update(kwargs)
    return settings, extra


def _stop_ids(model: Any, tokenizer: Any, extra: dict) -> set[int]:
    """Ids dropped from a decoded chat answer: eos and pad, as THUDM's decode did."""
    eos = extra.get("eos_token_id")
    stop = set(eos if isinstance(eos, (list, tuple)) else [eos]) if eos is not None else eos_ids(model, tokenizer)
    pad = extra.get("pad_token_id", tokenizer.pad_token_id)
    return {int(i) for i in stop | {pad} if i is not None}


def _response(tokenizer: Any, ids: list[int], stop: set[int]) -> str:
    return process_response(tokenizer.decode([t for t in ids if t not in stop]))


def chat(
    model,
    tokenizer,
    query: str,
    history: list[tuple[str, str]] | None = None,
    *,
    max_length: int = 2048,
    num_beams: int = 1,
    do_sample: bool = True,
    top_p: float = 0.7,
    temperature: float = 0.95,
    logits_processor=None,
    **kwargs,
) -> tuple[str, list[tuple[str, str]]]:
    """One chat turn, as THUDM's `model.chat`: returns (response, history + [(query, response)]).

    Args:
        model, tokenizer: a loaded causal LM (ChatGLM-6B, or any other) and its tokenizer.
        query, history: the question and the earlier (question, answer) rounds.
        max_length: prompt + answer tokens (a `max_new_tokens` in kwargs overrides it).
        num_beams, do_sample, top_p, temperature: decoding; sampling uses top_p alone (top_k 0),
            and a temperature below `MIN_SAMPLING_TEMPERATURE` decodes greedily.
        logits_processor: processors run before THUDM's non-finite-score guard.
        kwargs: further `generate` arguments (e.g. `max_new_tokens`, `repetition_penalty`).

    Raises:
        BadValue: bad settings, or the prompt leaves no room for an answer under `max_length`.
    """
    history = list(history or [])
    settings, extra = _chat_generation(model, max_length, do_sample, top_p, temperature, logits_processor, kwargs)
    rows, _, _ = generate_ids(model, tokenizer, [chat_prompt(model, query, history)], settings, num_beams=num_beams, **extra)
    response = _response(tokenizer, rows[0], _stop_ids(model, tokenizer, extra))
    return response, history + [(query, response)]


def stream_chat(
    model,
    tokenizer,
    query: str,
    history=None,
    *,
    max_length=2048,
    do_sample=True,
    top_p=0.7,
    temperature=0.95,
    logits_processor=None,
    **kwargs,
) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """Like `chat`, yielding (response so far, history + [(query, response so far)]) after every
    generated token, as THUDM's `model.stream_chat`. Leaving the loop early (break, an exception,
    closing the generator) stops the generation after the current token."""
    history = list(history or [])
    settings, extra = _chat_generation(model, max_length, do_sample, top_p, temperature, logits_processor, kwargs)
    stop = _stop_ids(model, tokenizer, extra)
    steps = iter(stream_token_ids(model, tokenizer, chat_prompt(model, query, history), settings, **extra))
    generated: list[int] = []
    try:
        for ids in steps:
            generated.extend(ids)
            response = _response(tokenizer, generated, stop)
            yield response, history + [(query, response)]
    finally:
        steps.close()  # cancels and joins the generation thread when the reader left early


# --- the terminal chat --------------------------------------------------------------------------


def chat_loop(
    model,
    tokenizer,
    template,
    settings: GenerationArguments,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    engine: Any = None,
) -> History:
    """Run the conversation until /exit or end of input; returns the final history.

    Answers come from the batching engine (`engine`, else one of a single row made here), driven on
    this thread, so Ctrl-C stops an answer at once.
    """
    from instructglm.infer.engine import BatchEngine, stream_answer

    engine = engine or BatchEngine(model, tokenizer, max_batch_size=1, max_queue=None)
    history: History = []
    print(BANNER, file=out, flush=True)
    while True:
        try:
            query = read(USER).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return history
        if not query:
            continue
        if query == "/exit":
            return history
        if query == "/clear":
            history = []
            print("(history cleared)", file=out, flush=True)
            continue
        print(BOT, end="", file=out, flush=True)
        answer = ""
        try:
            for piece in stream_answer(engine, template, query, history, settings):
                answer += piece
                print(piece, end="", file=out, flush=True)
        except KeyboardInterrupt:
            # Leaving the stream cancels the answer; the cut answer is not kept in the history.
            print("\n(stopped)", file=out, flush=True)
            continue
        except BadValue as err:
            # The history outgrew --max_length or the context: say so and let the user /clear.
            print(f"\n(error: {err})", file=out, flush=True)
            continue
        print(file=out, flush=True)
        history.append((query, answer))


def main(model_args: ModelArguments, chat_args: ChatArguments, settings: GenerationArguments) -> int:
    from instructglm.infer.engine import BatchEngine

    model, tokenizer, template = load_from_args(model_args)
    engine = BatchEngine(model, tokenizer, max_batch_size=1, max_queue=None, decode="auto" if chat_args.cuda_graphs else "dynamic")
    engine.warmup()
    chat_loop(model, tokenizer, template, settings, engine=engine)
    return 0
