"""Generation helpers shared by chat, predict, web and serve.

- `build_prompt`: query + history -> prompt text through the run's template.
- `generate_batch`: several prompts at once, left padded, one `Completion` per prompt.
- `stream_generate`: one prompt, text pieces as they are decoded (transformers'
  `TextIteratorStreamer`, generation on a background thread), cancellable.

Decoding settings come from `GenerationArguments`, which every command exposes as flags.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence


@dataclass
class GenerationArguments:
    max_length: int = field(
        default=2048,
        metadata={"help": "Maximum prompt + answer length in tokens (ignored when --max_new_tokens is set)."},
    )
    max_new_tokens: Optional[int] = field(
        default=None, metadata={"help": "Maximum answer length in tokens; overrides --max_length."}
    )
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling: keep the smallest token set of this mass."})
    temperature: float = field(default=0.95, metadata={"help": "Sampling temperature; 0 means greedy."})
    do_sample: bool = field(default=True, metadata={"help": "Sample (true) or decode greedily (false)."})


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # "stop": the model ended its answer; "length": the token budget ran out; "cancelled".
    finish_reason: str


def build_prompt(template: Any, query: str, history: Sequence[tuple[str, str]] = ()) -> str:
    """The prompt for `query` after the (query, answer) rounds of `history`."""
    return template.render(query, "", list(history))


def prompt_length(tokenizer: Any, prompt: str) -> int:
    """Tokens the model sees for `prompt`, special tokens included (ChatGLM's `[gMASK] <sop>`)."""
    return len(tokenizer(prompt)["input_ids"])


def context_limit(model: Any) -> int | None:
    """The longest sequence the model was built for, from its config (None when it does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return {int(i) for i in ids if i is not None}


def _generate_kwargs(settings: GenerationArguments, prompt_len: int, tokenizer: Any) -> dict:
    """`model.generate` keyword arguments for `settings` and a (padded) prompt length."""
    if settings.max_new_tokens is not None:
        budget = settings.max_new_tokens
    else:
        budget = settings.max_length - prompt_len
        if budget <= 0:
            raise ValueError(
                f"the prompt has {prompt_len} tokens, at or over --max_length {settings.max_length}: "
                "raise --max_length, set --max_new_tokens, or shorten the history"
            )
    if budget < 1:
        raise ValueError(f"--max_new_tokens must be at least 1, got {budget}")
    kwargs: dict = {"max_new_tokens": budget, "pad_token_id": tokenizer.pad_token_id}
    if settings.do_sample and settings.temperature > 0:
        # top_k=0 switches off transformers' default top-k of 50: THUDM's chat samples by top_p alone.
        kwargs.update(do_sample=True, top_p=settings.top_p, temperature=settings.temperature, top_k=0)
    else:
        # Explicit do_sample=False, so a checkpoint's generation_config (THUDM's ships
        # sampling defaults) cannot turn greedy decoding into sampling.
        kwargs.update(do_sample=False, top_p=1.0, temperature=1.0)
    return kwargs


def _prepare(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationArguments) -> tuple[dict, int, dict]:
    """(left-padded model inputs on the model's device, padded prompt width, `generate` kwargs)."""
    batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
    device = next(model.parameters()).device
    # Only what every decoder-only model takes; fast tokenizers may add token_type_ids.
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    width = inputs["input_ids"].shape[1]
    return inputs, width, _generate_kwargs(settings, width, tokenizer)


def _completion(tokenizer: Any, new_ids: Any, prompt_tokens: int, eos: set[int], budget: int, cancelled: bool) -> Completion:
    ids = new_ids.tolist()
    stop = next((i for i, t in enumerate(ids) if t in eos), None)
    if stop is not None:
        ids, reason = ids[:stop], "stop"
    else:
        reason = "cancelled" if cancelled and len(ids) < budget else "length"
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=len(ids), finish_reason=reason)


def generate_batch(model: Any, tokenizer: Any, prompts: Sequence[str], settings: GenerationArguments) -> list[Completion]:
    """Generate for every prompt in one left-padded batch.

    With `--max_length` (no `--max_new_tokens`), the budget is max_length minus the longest
    prompt of the batch, the same for every row.
    """
    import torch

    inputs, width, kwargs = _prepare(model, tokenizer, prompts, settings)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    eos = _eos_ids(model, tokenizer)
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    return [
        _completion(tokenizer, out[i, width:], int(lengths[i]), eos, kwargs["max_new_tokens"], False)
        for i in range(len(prompts))
    ]


class _Cancelled:
    """Stopping criterion that ends generation once `event` is set (client gone, Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TextStream:
    """Iterate to get the answer's text pieces as they are decoded; `.completion` is set once the
    iteration has finished. Leaving the loop early (break, exception, closed generator) cancels
    the generation, so an abandoned stream never keeps the model busy."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt: str,
        settings: GenerationArguments,
        timeout: float | None = None,
        cancel_event: threading.Event | None = None,
    ):
        self.model, self.tokenizer, self.prompt, self.settings = model, tokenizer, prompt, settings
        self.timeout = timeout
        self.cancel_event = cancel_event or threading.Event()
        self.completion: Completion | None = None

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        inputs, width, kwargs = _prepare(self.model, self.tokenizer, [self.prompt], self.settings)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, timeout=self.timeout, skip_special_tokens=True)
        result: dict = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(
                        **inputs,
                        **kwargs,
                        streamer=streamer,
                        stopping_criteria=StoppingCriteriaList([_Cancelled(self.cancel_event)]),
                    )
            except BaseException as err:  # re-raised in the consuming thread below
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, name="instructglm-generate", daemon=True)
        thread.start()
        finished = False
        try:
            for piece in streamer:
                if piece:
                    yield piece
            finished = True
        finally:
            if not finished:
                self.cancel_event.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        self.completion = _completion(
            self.tokenizer,
            result["out"][0, width:],
            width,
            _eos_ids(self.model, self.tokenizer),
            kwargs["max_new_tokens"],
            self.cancel_event.is_set(),
        )


def stream_generate(
    model: Any,
    tokenizer: Any,
    prompt: str,
    settings: GenerationArguments,
    timeout: float | None = None,
    cancel_event: threading.Event | None = None,
) -> TextStream:
    """A `TextStream` for `prompt`; nothing runs until it is iterated. Setting `cancel_event`
    (from any thread) stops the generation after the current token."""
    return TextStream(model, tokenizer, prompt, settings, timeout, cancel_event)


def stream_chat(
    model: Any, tokenizer: Any, template: Any, query: str, history: Sequence[tuple[str, str]], settings: GenerationArguments
) -> TextStream:
    """`stream_generate` for a chat turn: the prompt is built from `query` and `history`."""
    return stream_generate(model, tokenizer, build_prompt(template, query, history), settings)
