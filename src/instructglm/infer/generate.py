"""Generation shared by chat, predict, web, serve, eval and THUDM's `chat`/`stream_chat` API.

Prompts come from the loaded model's `instructglm.infer.prompts.Prompter` (the family's format and
the run's template) as token ids, or are texts encoded with the tokenizer's special tokens.

- The settings every command shares (`GenerationArguments`, `BatchGenerationArguments`,
  `EngineArguments`) and what a generation returns (`Completion`); decoding many prompts at once
  is the batching engine's (`instructglm.infer.engine.generate_batch`, which also runs `serve`,
  `web`, `predict` and `eval`).
- `generate_kwargs`: the one place where decoding settings become `model.generate` arguments,
  for THUDM's chat API (`instructglm.infer.chat.chat` / `stream_chat`), which takes any further
  `generate` argument (beams, logits processors): `generate_ids` (several prompts, left padded)
  and `stream_token_ids` (one prompt, the new token ids of every step, from `generate` on a
  background thread; leaving the loop early stops the generation after the current token). The
  engine decodes with the same processing (greedy; temperature and top_p with top_k 0), so both
  give the same greedy answers.

Decoding settings come from `GenerationArguments`, which every command exposes as flags
(`BatchGenerationArguments` for predict and eval: greedy and bounded by default).
"""

from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

from instructglm.errors import BadValue

# Sampling at a temperature below this is greedy decoding in all but name (a logit gap of 0.01
# already weighs e^1000 to one), and dividing the scores by a far smaller one (1e-300) overflows
# them to inf and the sampler fails: such temperatures decode greedily.
MIN_SAMPLING_TEMPERATURE = 1e-5


@dataclass
class GenerationArguments:
    max_length: Optional[int] = field(
        default=2048,
        metadata={"help": "Maximum prompt + answer length in tokens (ignored when --max_new_tokens is set)."},
    )
    max_new_tokens: Optional[int] = field(
        default=None, metadata={"help": "Maximum answer length in tokens; overrides --max_length."}
    )
    top_p: float = field(default=0.7, metadata={"help": "Nucleus sampling: keep the smallest token set of this mass."})
    temperature: float = field(
        default=0.95,
        metadata={"help": f"Sampling temperature; below {MIN_SAMPLING_TEMPERATURE:g} (0 included) decodes greedily."},
    )
    do_sample: bool = field(default=True, metadata={"help": "Sample (true) or decode greedily (false)."})

    def __post_init__(self):
        problems = []
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            problems.append(f"--max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.max_new_tokens is None and (self.max_length is None or self.max_length < 1):
            problems.append(f"--max_length must be at least 1 (or set --max_new_tokens), got {self.max_length}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 <= self.top_p <= 1):
            problems.append(f"--top_p must be between 0 and 1, got {self.top_p}")
        if problems:
            raise BadValue("; ".join(problems))

    @property
    def samples(self) -> bool:
        """Whether these settings sample (else: greedy decoding)."""
        return self.do_sample and self.temperature >= MIN_SAMPLING_TEMPERATURE


DEFAULT_NEW_TOKENS = 256


@dataclass
class BatchGenerationArguments(GenerationArguments):
    """Decoding for answers scored against references (`predict`, `eval`): greedy, and bounded by default —
    `--max_new_tokens` 256 unless `--max_length` is given, which then bounds prompt + answer."""

    max_length: Optional[int] = field(
        default=None,
        metadata={"help": "Maximum prompt + answer length in tokens (instead of --max_new_tokens)."},
    )
    max_new_tokens: Optional[int] = field(
        default=None,
        metadata={"help": f"Maximum answer length in tokens (default {DEFAULT_NEW_TOKENS}, unless --max_length is set)."},
    )
    do_sample: bool = field(default=False, metadata={"help": "Sample (true) or decode greedily (false)."})

    def __post_init__(self):
        if self.max_new_tokens is None and self.max_length is None:
            self.max_new_tokens = DEFAULT_NEW_TOKENS
        super().__post_init__()


@dataclass
class EngineArguments:
    """How the batching engine (`instructglm.infer.engine`) runs, for the commands that serve many prompts."""

    max_batch_size: int = field(default=8, metadata={"help": "Requests decoded together in one batch (the rest wait)."})
    cuda_graphs: bool = field(
        default=True,
        metadata={
            "help": "On a GPU, decode with a static KV cache and torch.compile(mode='reduce-overhead') (CUDA graphs), "
            "falling back to the dynamic cache if compiling fails; false: always the dynamic cache."
        },
    )

    def __post_init__(self):
        if self.max_batch_size < 1:
            raise BadValue(f"--max_batch_size must be at least 1, got {self.max_batch_size}")

    @property
    def decode(self) -> str:
        """The engine's `decode` mode for these flags."""
        return "auto" if self.cuda_graphs else "dynamic"


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    # "stop": the model ended its answer; "length": the token budget ran out; "cancelled".
    finish_reason: str


def context_limit(model: Any) -> int | None:
    """The longest sequence the model was built for, from its config (None when it does not say)."""
    config = model.config
    for name in ("max_position_embeddings", "max_sequence_length", "seq_length", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The ids that end an answer: the generation config's eos, else the tokenizer's."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return {int(i) for i in ids if i is not None}


def generate_kwargs(settings: GenerationArguments, prompt_len: int, tokenizer: Any, **extra: Any) -> dict:
    """`model.generate` keyword arguments for `settings` and a (padded) prompt length.

    Args:
        settings: the decoding settings.
        prompt_len: tokens of the (padded) prompt; `--max_length` counts them.
        tokenizer: gives the pad id.
        extra: further `generate` arguments (logits_processor, num_beams, eos_token_id, ...);
            they override the ones built here.

    Raises:
        BadValue: the prompt leaves no room for an answer under `--max_length`.
    """
    if settings.max_new_tokens is not None:
        budget = settings.max_new_tokens
    else:
        budget = settings.max_length - prompt_len
        if budget <= 0:
            raise BadValue(
                f"the prompt has {prompt_len} tokens, at or over --max_length {settings.max_length}: "
                "raise --max_length, set --max_new_tokens, or shorten the history"
            )
    kwargs: dict = {"max_new_tokens": budget, "pad_token_id": tokenizer.pad_token_id}
    if settings.samples:
        # top_k=0 switches off transformers' default top-k of 50: sampling is by top_p alone,
        # in every command and in THUDM's chat API alike.
        kwargs.update(do_sample=True, top_p=settings.top_p, temperature=settings.temperature, top_k=0)
    else:
        # Explicit do_sample=False, so a checkpoint's generation_config (THUDM's ships
        # sampling defaults) cannot turn greedy decoding into sampling.
        kwargs.update(do_sample=False, top_p=1.0, temperature=1.0)
    kwargs.update(extra)
    return kwargs


def _left_padded(tokenizer: Any, prompts: Sequence[Any]) -> dict:
    """`input_ids` and `attention_mask` of texts (encoded with special tokens) or token id lists, padded on the left."""
    import torch

    if all(isinstance(p, str) for p in prompts):
        batch = tokenizer(list(prompts), padding=True, return_tensors="pt")
        # Only what every decoder-only model takes; fast tokenizers may add token_type_ids.
        return {k: batch[k] for k in ("input_ids", "attention_mask")}
    rows = [tokenizer(p)["input_ids"] if isinstance(p, str) else [int(i) for i in p] for p in prompts]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows], dtype=torch.long)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}


def _prepare(model: Any, tokenizer: Any, prompts: Sequence[Any], settings: GenerationArguments, extra: dict) -> tuple[dict, int, dict]:
    """(left-padded model inputs on the model's device, padded prompt width, `generate` kwargs)."""
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in _left_padded(tokenizer, prompts).items()}
    width = inputs["input_ids"].shape[1]
    return inputs, width, generate_kwargs(settings, width, tokenizer, **extra)


def _completion(tokenizer: Any, ids: list[int], prompt_tokens: int, eos: set[int], budget: int, cancelled: bool) -> Completion:
    stop = next((i for i, t in enumerate(ids) if t in eos), None)
    if stop is not None:
        ids, reason = ids[:stop], "stop"
    else:
        reason = "cancelled" if cancelled and len(ids) < budget else "length"
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=len(ids), finish_reason=reason)


def generate_ids(model: Any, tokenizer: Any, prompts: Sequence[Any], settings: GenerationArguments, **extra: Any) -> tuple[list[list[int]], list[int], int]:
    """Generate for every prompt (a text, or token ids) in one left-padded batch.

    Returns:
        (the new token ids of each row, as `generate` returned them: eos and any padding after it
        included; each row's prompt length in tokens; the answer budget `max_new_tokens`).
    """
    import torch

    inputs, width, kwargs = _prepare(model, tokenizer, prompts, settings, extra)
    with torch.inference_mode():
        out = model.generate(**inputs, **kwargs)
    lengths = [int(n) for n in inputs["attention_mask"].sum(dim=1).tolist()]
    return out[:, width:].tolist(), lengths, kwargs["max_new_tokens"]


class _Cancelled:
    """Stopping criterion that ends generation once `event` is set (client gone, Ctrl-C)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs) -> Any:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _TokenIdQueue:
    """A `generate` streamer that hands each step's new token ids (a list, one per row) to a reader
    in another thread; the prompt, which `generate` puts first, is skipped."""

    def __init__(self, timeout: float | None = None):
        self.queue: queue.Queue = queue.Queue()
        self.timeout = timeout
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)

    def __iter__(self) -> Iterator[list[int]]:
        while (ids := self.queue.get(timeout=self.timeout)) is not None:
            yield ids


class TokenIdStream:
    """Runs `generate` for one prompt on a background thread; iterate to get the new token ids of
    every generation step (a list of one id per step).

    `.completion` is set once the iteration has finished. Leaving the loop early (break,
    exception, closed generator) cancels the generation and waits for the thread, so an
    abandoned stream never keeps the model busy.
    """

    def __init__(self, model: Any, tokenizer: Any, prompt: Any, settings: GenerationArguments, extra: dict | None = None):
        self.model, self.tokenizer, self.prompt, self.settings = model, tokenizer, prompt, settings
        self.cancel_event = threading.Event()
        self.extra = dict(extra or {})
        self.completion: Completion | None = None

    def cancel(self) -> None:
        self.cancel_event.set()

    def __iter__(self) -> Iterator[list[int]]:
        import torch
        from transformers import StoppingCriteriaList

        inputs, width, kwargs = _prepare(self.model, self.tokenizer, [self.prompt], self.settings, self.extra)
        criteria = StoppingCriteriaList(kwargs.pop("stopping_criteria", None) or [])
        criteria.append(_Cancelled(self.cancel_event))
        streamer = _TokenIdQueue()
        result: dict = {}

        def run() -> None:
            try:
                with torch.inference_mode():
                    result["out"] = self.model.generate(**inputs, **kwargs, streamer=streamer, stopping_criteria=criteria)
            except BaseException as err:  # re-raised in the consuming thread below
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=run, name="instructglm-generate", daemon=True)
        thread.start()
        finished = False
        try:
            yield from streamer
            finished = True
        finally:
            if not finished:
                self.cancel_event.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        self.completion = _completion(
            self.tokenizer,
            result["out"][0, width:].tolist(),
            width,
            eos_ids(self.model, self.tokenizer),
            kwargs["max_new_tokens"],
            self.cancel_event.is_set(),
        )


def stream_token_ids(model: Any, tokenizer: Any, prompt: Any, settings: GenerationArguments, **extra: Any) -> TokenIdStream:
    """A `TokenIdStream` for `prompt` (a text, or token ids) with further `generate` arguments `extra` (see `generate_kwargs`)."""
    return TokenIdStream(model, tokenizer, prompt, settings, extra=extra)
