"""A continuous-batching generation engine: concurrent requests share every forward pass.

    engine = BatchEngine(model, tokenizer, max_batch_size=8, stop_ids=prompter.stop_ids)
    handle = engine.submit(prompter.request(prompter.prompt_ids(messages), settings))
    engine.run_until_idle()            # offline (predict, eval); `engine.start()` runs it on a thread (serve, web)
    handle.completion.text

A request is token ids (`prompt_ids`), decoding settings, stop token ids, stop strings and an optional seed,
so it does not care how a family builds its prompt: the commands build requests through the loaded model's
`instructglm.infer.prompts.Prompter` (the family's format and stop ids, special tokens kept in the text
where the family's replies need them). Each step of the engine:

1. drops cancelled requests (a client gone) and frees their rows at once;
2. admits waiting requests while the batch has room (`max_batch_size`): each prompt is prefilled in a
   forward of its own (no padding, so the prompt is computed exactly as one-at-a-time `generate` does) and
   its first token is sampled from that forward's logits;
3. runs one decode forward for all running rows, feeding each row's last token;
4. samples every row's next token (greedy, or temperature + top_p with top_k 0 — `generate_kwargs`'s
   processing — from a per-request `torch.Generator` when a seed is given) and retires the rows that
   finished (a stop id, a stop string, `max_new_tokens`), which frees their slots for the next step.

Rows stay independent: a row's queries only see its own keys (the padding mask hides the other rows'
columns), and each row gets its own positions. These are kept per row in plain Python (`PositionRule`)
and advanced by one token per step, instead of being rebuilt over the whole sequence every step as
`prepare_inputs_for_generation` does; ChatGLM-6B's 2-D positions (position, block position) are the one
family-specific rule (`ChatGLM6BRule`), every other model takes positions counted over its real tokens.

Two layouts of the running rows' KV cache, both transformers `Cache` objects passed to the model's forward:

- dynamic (default on the CPU): one left-padded `DynamicCache` [B, heads, T, head_dim], row i's tokens in
  its last `lengths[i]` columns, as `generate` holds a padded batch. A joining row's own prefill cache is
  left-padded to the batch width (or the batch to the row's), and all joining rows are concatenated in
  one copy per layer; leaving rows are dropped with one index per layer that also cuts the columns no
  remaining row uses. Both cost about what one decode step already spends (DynamicCache concatenates the
  new column into every layer each step), and only when rows join or leave.
- static (CUDA): per-layer buffers [max_batch_size, heads, max_seq_len, head_dim] allocated once, one slot
  per running row, each row's tokens from column 0; a decode step writes each row's new key at its own
  column (an indexed write), so joining is one copy of the prompt's KV into a free slot and leaving moves
  the last slot into the hole (rows stay packed in slots 0..n-1). Shapes never change, so the decode step
  is compiled with `torch.compile(mode="reduce-overhead")` (CUDA graphs) for a few batch buckets
  (1, 2, 4, ... max_batch_size). If compiling fails the engine logs one line and continues on the dynamic
  cache; `cuda_graphs=False` (`--cuda_graphs false`) turns it off.

Memory per request is bounded by its `max_new_tokens` and `max_seq_len` (the model's context by default):
a request that would run past it is refused at `submit`. The waiting line is bounded by `max_queue`
(`QueueFull` past it: the server answers 503).
"""

from __future__ import annotations

import collections
import dataclasses
import inspect
import logging
import math
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F

from instructglm.errors import BadValue
from instructglm.infer.generate import MIN_SAMPLING_TEMPERATURE, Completion, GenerationArguments, context_limit, eos_ids

logger = logging.getLogger(__name__)


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationRequest:
    """One prompt to answer, as token ids, and how to decode it.

    `stop_ids` None means the engine's (the model's eos ids); `stream` asks for the text of every step
    (`Event.text`), decoded incrementally; a request with stop strings is decoded incrementally too, so
    it ends as soon as one appears. The text is decoded without special tokens unless `skip_special_tokens`
    is False.
    """

    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop_ids: Optional[frozenset[int]] = None
    stop_strings: tuple[str, ...] = ()
    seed: Optional[int] = None
    stream: bool = False
    # False keeps special tokens in the text (ChatGLM3's `<|assistant|>` between the parts of one reply)
    skip_special_tokens: bool = True

    def __post_init__(self):
        object.__setattr__(self, "prompt_ids", tuple(int(i) for i in self.prompt_ids))
        object.__setattr__(self, "stop_strings", tuple(s for s in self.stop_strings if s))
        if self.stop_ids is not None:
            object.__setattr__(self, "stop_ids", frozenset(int(i) for i in self.stop_ids))
        problems = []
        if not self.prompt_ids:
            problems.append("the prompt has no tokens")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 <= self.top_p <= 1):
            problems.append(f"top_p must be between 0 and 1, got {self.top_p}")
        if problems:
            raise BadValue("; ".join(problems))

    @property
    def samples(self) -> bool:
        """Whether this request samples (else: greedy decoding); tiny temperatures decode greedily."""
        return self.do_sample and self.temperature >= MIN_SAMPLING_TEMPERATURE


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The token ids of a text prompt, special tokens included (ChatGLM-6B's `[gMASK] <sop>`)."""
    return list(tokenizer(prompt)["input_ids"])


def request_for(prompt_ids: Sequence[int], settings: GenerationArguments, **options: Any) -> GenerationRequest:
    """A request for `prompt_ids` decoded by a command's `settings`; `options` are further request fields.

    With `--max_length` (no `--max_new_tokens`) the answer budget is max_length minus this prompt's length,
    as one-at-a-time generation has it.

    Raises:
        BadValue: the prompt leaves no room for an answer under `--max_length`.
    """
    if settings.max_new_tokens is not None:
        budget = settings.max_new_tokens
    else:
        budget = settings.max_length - len(prompt_ids)
        if budget <= 0:
            raise BadValue(
                f"the prompt has {len(prompt_ids)} tokens, at or over --max_length {settings.max_length}: "
                "raise --max_length, set --max_new_tokens, or shorten the history"
            )
    sampling = {"do_sample": True, "temperature": settings.temperature, "top_p": settings.top_p} if settings.samples else {}
    return GenerationRequest(prompt_ids=tuple(prompt_ids), max_new_tokens=budget, **sampling, **options)


@dataclass
class Event:
    """What a request's sink receives, on the engine's thread.

    kind "tokens": a new token (`token_ids`) and, for streaming requests, the text it settled (`text`,
    possibly empty while a character or a possible stop string is incomplete); "done": the request
    finished (`completion`); "error": it failed (`error`), the others in its batch go on.
    """

    kind: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    completion: Optional[Completion] = None
    error: Optional[BaseException] = None


class QueueFull(Exception):
    """`submit` found `max_queue` requests already waiting."""


class RequestHandle:
    """A submitted request: `cancel()` it from any thread; `finished` is set once `completion` or `error` is."""

    def __init__(self, request: GenerationRequest, sink: Optional[Callable[[Event], None]]):
        self.request = request
        self.sink = sink
        self.cancelled = False
        self.completion: Optional[Completion] = None
        self.token_ids: list[int] = []
        self.error: Optional[BaseException] = None
        self.finished = threading.Event()

    def cancel(self) -> None:
        """Stop generating for this request; its row is freed before the engine's next forward."""
        self.cancelled = True


# --- text ---------------------------------------------------------------------------------------


class StopScanner:
    """Cuts streamed text at the first stop string. Text that could be the start of a stop string
    is held back until the next piece shows whether it is."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        found = [h for h in (self.pending.find(s) for s in self.stops) if h >= 0]
        if found:
            self.stopped = True
            out, self.pending = self.pending[: min(found)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


class IncrementalText:
    """The text of a growing answer, one settled piece per new token, in about one decode per token.

    Each step decodes a window of the answer: the tokens since an anchor a few tokens back, so a
    tokenizer's context-dependent spacing (sentencepiece drops the space of a window's first piece)
    comes out as in a decode of the whole answer, and the piece is what the window's text gained. The
    window's text of the previous step is kept, and the anchor moves up every `WINDOW` tokens (one extra
    decode then). A piece ending in an incomplete character (U+FFFD) waits for the next token. `finish`
    reconciles with a decode of the whole answer, so the pieces add up to it; a stop string cuts them
    (`StopScanner`).
    """

    WINDOW = 6  # tokens a window may grow to before its anchor moves up
    CONTEXT = 2  # tokens before the newest that a moved window keeps

    def __init__(self, tokenizer: Any, stops: Sequence[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.scanner = StopScanner(stops)
        self.anchor = 0  # first token of the window
        self.settled = ""  # the window's text up to the last emitted piece
        self.raw_pieces: list[str] = []
        self.emitted: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def feed(self, ids: Sequence[int]) -> str:
        """The text the latest token of `ids` (the answer so far) settles, cut at any stop string."""
        now = self._decode(ids[self.anchor :])
        if len(now) <= len(self.settled) or now.endswith("\ufffd"):
            return ""
        piece = now[len(self.settled) :]
        self.settled = now
        if len(ids) - self.anchor > self.WINDOW:
            self.anchor = len(ids) - self.CONTEXT
            self.settled = self._decode(ids[self.anchor :])
        self.raw_pieces.append(piece)
        return self._emit(self.scanner.feed(piece))

    def finish(self, ids: Sequence[int]) -> str:
        """The rest of the text once the answer is complete."""
        full = self._decode(ids)
        raw = "".join(self.raw_pieces)
        tail = full[len(raw) :] if full.startswith(raw) else ""
        return self._emit(self.scanner.feed(tail) + self.scanner.flush())

    def _emit(self, text: str) -> str:
        if text:
            self.emitted.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self.emitted)


# --- per-family decode inputs -------------------------------------------------------------------


class PositionRule:
    """How a family numbers tokens and takes its decode-step attention mask (the generic rule).

    Positions count the row's real tokens (what `generate` derives from the padding mask); the mask is
    the standard 2-D padding mask over cached + new columns (1 = real), or None when no row is padded.
    `start` gives the state after the prompt; `advance` the position of a new token and the next state.
    """

    position_dims = 1

    def start(self, prompt_ids: Sequence[int]) -> Any:
        return len(prompt_ids)

    def advance(self, state: Any, token: int) -> tuple[Any, Any]:
        return state, state + 1

    def position_tensor(self, positions: list, device: torch.device) -> torch.Tensor:
        return torch.tensor(positions, dtype=torch.long, device=device).view(len(positions), 1)  # (B, 1)

    def blank_position(self) -> Any:
        return 0

    def decode_mask(self, valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """The `attention_mask` argument from `valid` [B, T] (True = a real column), or None (all real)."""
        return None if valid is None else valid.long()


class ChatGLM6BRule(PositionRule):
    """ChatGLM-6B's 2-D positions, advanced token by token exactly as `prefix_lm_positions` numbers a
    whole sequence: in the context (before the first `<sop>`) position = index, block 0; from `<sop>` on,
    position = the index of the context's `[gMASK]` (else `[MASK]`, else the token's own index) and
    block = 1, 2, 3, ... The mask is THUDM's bool form [B, 1, 1, T] (True = masked), which the model
    uses as given instead of rebuilding it from a padding mask."""

    position_dims = 2

    def __init__(self, config: Any):
        self.bos, self.gmask, self.mask = config.bos_token_id, config.gmask_token_id, config.mask_token_id

    def start(self, prompt_ids: Sequence[int]) -> tuple:
        state = (0, None, None, None)  # (next index, <sop> index, [gMASK] index, [MASK] index)
        for token in prompt_ids:
            _, state = self.advance(state, token)
        return state

    def advance(self, state: tuple, token: int) -> tuple[tuple[int, int], tuple]:
        index, sop_at, gmask_at, mask_at = state
        if sop_at is None:
            if token == self.bos:
                sop_at = index
            elif token == self.gmask and gmask_at is None:
                gmask_at = index
            elif token == self.mask and mask_at is None:
                mask_at = index
        if sop_at is None:
            position = (index, 0)
        else:
            anchor = gmask_at if gmask_at is not None else mask_at
            position = (index if anchor is None else anchor, index - sop_at + 1)
        return position, (index + 1, sop_at, gmask_at, mask_at)

    def position_tensor(self, positions: list, device: torch.device) -> torch.Tensor:
        return torch.tensor(positions, dtype=torch.long, device=device).view(len(positions), 2, 1)  # (B, 2, 1)

    def blank_position(self) -> Any:
        return (0, 0)

    def decode_mask(self, valid: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if valid is None else ~valid[:, None, None, :]


def position_rule_for(model: Any) -> PositionRule:
    """The family rule of a model (a `PeftModel` is looked through)."""
    from instructglm.models.chatglm.config import ChatGLMConfig

    config = unwrap(model).config
    if isinstance(config, ChatGLMConfig):
        return ChatGLM6BRule(config)
    return PositionRule()


def unwrap(model: Any) -> Any:
    """The model to call forward on: inside a `PeftModel` with LoRA-style adapters, the transformers model
    (the adapter layers are injected there, and `PeftModel.forward` only adds Python overhead per step);
    a prompt-learning adapter (virtual tokens) needs `PeftModel.forward`, so the model itself."""
    if not hasattr(model, "get_base_model"):
        return model
    if any(getattr(config, "is_prompt_learning", False) for config in getattr(model, "peft_config", {}).values()):
        return model
    return model.get_base_model()


# --- KV cache layouts ---------------------------------------------------------------------------


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """[b, h, L, d] -> [b, h, width, d], zeros first."""
    missing = width - states.shape[-2]
    return states if missing == 0 else F.pad(states, (0, 0, missing, 0))


def plain_layers(cache: Any) -> bool:
    """Whether every layer of `cache` is a full-attention `DynamicLayer`, whose tensors can be padded and joined."""
    from transformers.cache_utils import DynamicLayer

    return all(type(layer) is DynamicLayer for layer in cache.layers)


class DynamicBatchCache:
    """The running rows' KV in one left-padded `DynamicCache`; row i's tokens are its last `lengths[i]` columns."""

    def __init__(self):
        self.cache: Any = None
        self.lengths: list[int] = []

    @property
    def width(self) -> int:
        return max(self.lengths, default=0)

    def add(self, caches: list[Any], lengths: list[int]) -> None:
        """Append rows (each a batch-1 `DynamicCache` of its prompt), padding every row to one width."""
        if self.cache is None and len(caches) == 1:
            self.cache, self.lengths = caches[0], list(lengths)
            return
        width = max([self.width, *lengths])
        sources = ([self.cache] if self.cache is not None else []) + caches
        target = sources[0]
        for index, layer in enumerate(target.layers):
            layers = [source.layers[index] for source in sources]
            layer.keys = torch.cat([_left_pad(part.keys, width) for part in layers], dim=0)
            layer.values = torch.cat([_left_pad(part.values, width) for part in layers], dim=0)
        self.cache = target
        self.lengths += list(lengths)

    def keep(self, rows: list[int]) -> None:
        """Keep only `rows` (indices), and only the columns they use."""
        if len(rows) == len(self.lengths):
            return
        old_width = self.width
        self.lengths = [self.lengths[i] for i in rows]
        if not rows:
            self.cache = None
            return
        start = old_width - self.width
        index = torch.tensor(rows, device=self.cache.layers[0].keys.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def valid_columns(self, device: torch.device) -> Optional[torch.Tensor]:
        """[B, T + 1] True on each row's real columns, the new token's included; None when no row is padded."""
        width = self.width
        pads = [width - n for n in self.lengths]
        if not any(pads):
            return None
        columns = torch.arange(width + 1, device=device)
        return columns[None, :] >= torch.tensor(pads, device=device)[:, None]

    def advance(self) -> None:
        self.lengths = [n + 1 for n in self.lengths]


def _cache_layer_base():
    from transformers.cache_utils import CacheLayerMixin

    return CacheLayerMixin


class SlotLayer(_cache_layer_base()):
    """One layer of `StaticSlots`: every row writes its new key and value at its own column."""

    is_compileable = True
    is_sliding = False

    def __init__(self, slots: "StaticSlots", keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.slots = slots
        self.keys, self.values = keys, values
        self.device = keys.device
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # allocated by StaticSlots

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        rows = key_states.shape[0]
        index, column = self.slots.row_index[:rows], self.slots.write_at[:rows]
        self.keys[index, :, column] = key_states[:, :, -1]  # (n, h, d) into row i, column write_at[i]
        self.values[index, :, column] = value_states[:, :, -1]
        return self.keys[:rows], self.values[:rows]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.slots.max_len, 0

    def get_seq_length(self) -> int:
        # Every column may hold a cached token: the mask (max_len wide) says which do, per row; a causal
        # mask built from this length allows them all.
        return self.slots.max_len - 1

    def get_max_length(self) -> int:
        return self.slots.max_len


class StaticSlots:
    """Per-layer KV buffers [slots, heads, max_len, head_dim] allocated once; running row i lives in slot i."""

    def __init__(self, slots: int, max_len: int, device: torch.device):
        self.slots, self.max_len, self.device = slots, max_len, device
        self.row_index = torch.arange(slots, device=device)
        self.write_at = torch.zeros(slots, dtype=torch.long, device=device)
        self.columns = torch.arange(max_len, device=device)
        self.cache: Any = None
        self.lengths: list[int] = []
        for tensor in (self.row_index, self.write_at, self.columns):
            torch._dynamo.mark_static_address(tensor)

    def allocate(self, like: Any) -> None:
        """Allocate the buffers after the shapes and dtype of `like`, a prefilled `DynamicCache`."""
        from transformers.cache_utils import Cache

        layers = []
        for layer in like.layers:
            batch, heads, _, head_dim = layer.keys.shape
            shape = (self.slots, heads, self.max_len, head_dim)
            keys = torch.zeros(shape, dtype=layer.keys.dtype, device=self.device)
            values = torch.zeros(shape[:3] + (layer.values.shape[-1],), dtype=layer.values.dtype, device=self.device)
            torch._dynamo.mark_static_address(keys)
            torch._dynamo.mark_static_address(values)
            layers.append(SlotLayer(self, keys, values))
        self.cache = Cache(layers=layers)

    def add(self, caches: list[Any], lengths: list[int]) -> None:
        if self.cache is None:
            self.allocate(caches[0])
        for source, length in zip(caches, lengths):
            slot = len(self.lengths)
            for layer, part in zip(self.cache.layers, source.layers):
                layer.keys[slot, :, :length] = part.keys[0]
                layer.values[slot, :, :length] = part.values[0]
            self.lengths.append(length)

    def keep(self, rows: list[int]) -> None:
        """Keep `rows`, packed into slots 0..len(rows)-1 in that order (a slot moves only when it must)."""
        for slot, row in enumerate(rows):
            if slot != row:
                length = self.lengths[row]
                for layer in self.cache.layers:
                    layer.keys[slot, :, :length] = layer.keys[row, :, :length]
                    layer.values[slot, :, :length] = layer.values[row, :, :length]
        self.lengths = [self.lengths[i] for i in rows]

    def to_dynamic(self) -> DynamicBatchCache:
        """The running rows as a left-padded `DynamicBatchCache` (the fallback when compiling fails)."""
        from transformers.cache_utils import DynamicCache

        batch = DynamicBatchCache()
        if not self.lengths:
            return batch
        width = max(self.lengths)
        data = []
        for layer in self.cache.layers:
            keys = torch.stack([_left_pad(layer.keys[i : i + 1, :, :n], width)[0] for i, n in enumerate(self.lengths)])
            values = torch.stack([_left_pad(layer.values[i : i + 1, :, :n], width)[0] for i, n in enumerate(self.lengths)])
            data.append((keys, values))
        batch.cache, batch.lengths = DynamicCache(data), list(self.lengths)
        return batch


def batch_buckets(max_batch_size: int) -> list[int]:
    """Decode batch sizes a compiled step is built for: powers of two below max_batch_size, and it."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sizes + [max_batch_size]


# --- sampling -----------------------------------------------------------------------------------


def top_p_filter(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """transformers' `TopPLogitsWarper` with one top_p per row (`top_p` [B, 1]): keep the smallest set of
    tokens whose probability reaches top_p (at least one), -inf elsewhere."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))


# --- the engine ---------------------------------------------------------------------------------


class _Row:
    """A running request: what the engine knows of it between steps."""

    __slots__ = ("handle", "request", "ids", "state", "position", "pending", "generator", "text", "stop_ids")

    def __init__(self, handle: RequestHandle, state: Any, generator: Optional[torch.Generator], text: Optional[IncrementalText], stop_ids: frozenset[int]):
        self.handle, self.request = handle, handle.request
        self.ids: list[int] = []
        self.state, self.position, self.pending = state, None, None
        self.generator, self.text, self.stop_ids = generator, text, stop_ids


DECODE_MODES = ("auto", "dynamic", "static", "compiled")


class BatchEngine:
    """Continuous batching over one loaded model (see the module docstring).

    Args:
        model, tokenizer: a loaded causal LM (a `PeftModel` too) in eval mode; the tokenizer decodes text
            (streaming, stop strings, `Completion.text`).
        max_batch_size: rows decoded together.
        max_queue: requests allowed to wait for a row (None: no bound); more raise `QueueFull`.
        max_seq_len: longest prompt + answer a request may need; "auto": the model's context (None when its
            config does not say); None: no bound (dynamic cache only).
        decode: "auto" (compiled static cache on CUDA, else dynamic), "dynamic", "static" (static slots, not
            compiled: the layout alone, e.g. for tests on the CPU) or "compiled".
        stop_ids: ids that end an answer when a request names none; default the model's eos ids.
        compile_options: `torch.compile` arguments for the "compiled" decode step; default
            `{"mode": "reduce-overhead"}` (inductor + CUDA graphs); `{"backend": "cudagraphs"}` records CUDA
            graphs of the eager kernels, compiling much faster.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        max_batch_size: int = 8,
        max_queue: Optional[int] = 256,
        max_seq_len: Any = "auto",
        decode: str = "auto",
        stop_ids: Optional[Iterable[int]] = None,
        compile_options: Optional[dict] = None,
    ):
        if max_batch_size < 1:
            raise BadValue(f"--max_batch_size must be at least 1, got {max_batch_size}")
        if max_queue is not None and max_queue < 0:
            raise BadValue(f"--max_queue must be at least 0, got {max_queue}")
        if decode not in DECODE_MODES:
            raise BadValue(f"decode={decode!r} is not one of {', '.join(DECODE_MODES)}")
        self.model, self.tokenizer = model, tokenizer
        self.network = unwrap(model)
        self.rule = position_rule_for(model)
        self.device = next(model.parameters()).device
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.max_seq_len = context_limit(self.network) if max_seq_len == "auto" else max_seq_len
        if stop_ids is None:
            stop_ids = eos_ids(model, tokenizer) if tokenizer is not None else _config_eos(self.network)
        self.stop_ids = frozenset(stop_ids)
        parameters = inspect.signature(self.network.forward).parameters
        # transformers 5.24 renames `past_key_values` to `cache` (5.17 knows only the old name): the forward says.
        self._cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self._prefill_options = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self.mode = self._choose_mode(decode)
        self._batch: Any = self._new_layout()
        self._compiled: Any = None
        self.compile_options = dict(compile_options or {"mode": "reduce-overhead"})
        self._rows: list[_Row] = []
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._lock = threading.Condition()
        self._thread: Optional[threading.Thread] = None
        self._stopping = False
        self._batching_checked = False
        self.steps = 0  # decode forwards run
        # Called on the engine's thread after every step, once its events are all sent (e.g. to wake an
        # event loop once for all of them rather than once per token).
        self.step_listeners: list[Callable[[], None]] = []

    # -- set-up ---------------------------------------------------------------------------------

    def _choose_mode(self, decode: str) -> str:
        if decode == "auto":
            decode = "compiled" if self.device.type == "cuda" else "dynamic"
        if decode != "dynamic" and self.max_seq_len is None:
            logger.warning("the model's config gives no context length, so the static KV cache has no size: decoding on the dynamic cache")
            return "dynamic"
        return decode

    def _new_layout(self) -> Any:
        if self.mode == "dynamic":
            return DynamicBatchCache()
        return StaticSlots(self.max_batch_size, self.max_seq_len, self.device)

    def _grad_context(self):
        # Static buffers are updated in place between compiled calls, which inference tensors forbid.
        return torch.inference_mode() if self.mode == "dynamic" else torch.no_grad()

    # -- submitting -----------------------------------------------------------------------------

    def submit(self, request: GenerationRequest, sink: Optional[Callable[[Event], None]] = None) -> RequestHandle:
        """Queue `request`; `sink` gets its events on the engine's thread (it must not block).

        Raises:
            BadValue: the prompt plus `max_new_tokens` exceed `max_seq_len`.
            QueueFull: `max_queue` requests are already waiting.
        """
        total = len(request.prompt_ids) + request.max_new_tokens
        if self.max_seq_len is not None and total > self.max_seq_len:
            raise BadValue(
                f"the prompt has {len(request.prompt_ids)} tokens and max_new_tokens is {request.max_new_tokens}: "
                f"{total} exceed the {self.max_seq_len} tokens a request may hold (the model's context unless set otherwise); "
                "shorten the prompt or ask for fewer tokens"
            )
        handle = RequestHandle(request, sink)
        with self._lock:
            # Requests that will get a free row at the next step do not count as waiting.
            free_rows = max(0, self.max_batch_size - len(self._rows))
            if self.max_queue is not None and len(self._waiting) >= self.max_queue + free_rows:
                raise QueueFull(f"{len(self._waiting) - free_rows} requests are already waiting (--max_queue {self.max_queue})")
            self._waiting.append(handle)
            self._lock.notify()
        return handle

    @property
    def serving(self) -> bool:
        """Whether the engine's own thread (`start`) runs the steps."""
        return self._thread is not None

    @property
    def running(self) -> int:
        """Rows in the batch now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests waiting for a row."""
        return len(self._waiting)

    # -- driving --------------------------------------------------------------------------------

    def step(self) -> bool:
        """Admit what fits, run one decode forward, retire finished rows; True while work remains."""
        try:
            with self._grad_context():
                self._retire([i for i, row in enumerate(self._rows) if row.handle.cancelled], "cancelled")
                self._admit()
                if self._rows:
                    self._decode()
        finally:
            self._notify()
        return bool(self._rows or self._waiting)

    def _notify(self) -> None:
        for listener in list(self.step_listeners):
            listener()

    def run_until_idle(self) -> None:
        """Step until every submitted request has finished (offline use; not with `start`)."""
        while self.step():
            pass

    def start(self) -> None:
        """Serve submitted requests on a background thread until `stop`. A compiled engine first compiles
        its decode step there (`warmup`): CUDA graphs belong to the thread that records them, so every
        compiled call happens on this one thread; requests submitted meanwhile wait."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._serve, name="instructglm-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread; requests still running or waiting finish as cancelled."""
        if self._thread is None:
            return
        with self._lock:
            self._stopping = True
            self._lock.notify()
        self._thread.join()
        self._thread = None
        with self._grad_context():
            self._retire(list(range(len(self._rows))), "cancelled")
        while self._waiting:
            self._finish_unstarted(self._waiting.popleft(), "cancelled")
        self._notify()

    def reset(self) -> None:
        """Finish every running and waiting request as cancelled and empty the batch (after a step was
        interrupted half-way, e.g. by Ctrl-C, when its state cannot be trusted). Not with `start`."""
        for row in self._rows:
            self._finish_unstarted(row.handle, "cancelled")
        while self._waiting:
            self._finish_unstarted(self._waiting.popleft(), "cancelled")
        self._rows = []
        self._batch.keep([])
        self._notify()

    def _serve(self) -> None:
        try:
            self.warmup()
        except Exception:  # compiling is an optimisation: serve on without it
            logger.exception("warming up the compiled decode step failed")
        while True:
            with self._lock:
                while not self._stopping and not self._rows and not self._waiting:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception as error:  # a bug in a batched step: fail the batch, keep serving
                logger.exception("generation step failed; failing the %d request(s) in the batch", len(self._rows))
                self._fail_batch(error)
                self._notify()

    def warmup(self) -> None:
        """Compile the decode step for every batch bucket now rather than on the first requests (on the
        thread that will decode: `start` calls it on its own)."""
        if self.mode != "compiled":
            return
        with self._grad_context():
            self._prefill_cache([self._any_token()])  # gives the layout its shapes
            for bucket in batch_buckets(self.max_batch_size):
                for _ in range(3):  # warm-up, record, replay
                    ids = torch.full((bucket, 1), self._any_token(), dtype=torch.long, device=self.device)
                    positions = self.rule.position_tensor([self.rule.blank_position()] * bucket, self.device)
                    if self._static_logits(ids, positions) is None:
                        return

    def _any_token(self) -> int:
        return min(self.stop_ids) if self.stop_ids else 0

    # -- admission and prefill ------------------------------------------------------------------

    def _admit(self) -> None:
        joining, caches, lengths = [], [], []
        while len(self._rows) + len(joining) < self.max_batch_size:
            with self._lock:
                if not self._waiting:
                    break
                handle = self._waiting.popleft()
            if handle.cancelled:
                self._finish_unstarted(handle, "cancelled")
                continue
            try:
                row, cache = self._prefill(handle)
            except Exception as error:  # this prompt's forward failed; the batch does not see it
                logger.exception("prefill failed for a request of %d tokens", len(handle.request.prompt_ids))
                self._fail(handle, error)
                continue
            if row is not None:
                joining.append(row)
                caches.append(cache)
                lengths.append(len(handle.request.prompt_ids))
        if joining:
            self._batch.add(caches, lengths)
            self._rows += joining

    def _prefill_cache(self, prompt_ids: Sequence[int]) -> tuple[Any, torch.Tensor]:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=self.network.config)
        ids = torch.tensor([list(prompt_ids)], dtype=torch.long, device=self.device)
        out = self.network(input_ids=ids, use_cache=True, **{self._cache_argument: cache}, **self._prefill_options, **TUPLE_OUTPUT)
        if not self._batching_checked:
            self._check_batching(cache)
        if self.mode != "dynamic" and self._batch.cache is None:
            self._batch.allocate(cache)
        return cache, _logits(out)

    def _check_batching(self, cache: Any) -> None:
        """Rows can share a batch only through full-attention `DynamicLayer`s; otherwise decode one at a time."""
        self._batching_checked = True
        if not plain_layers(cache):
            kinds = sorted({type(layer).__name__ for layer in cache.layers})
            logger.warning("this model's KV cache has %s layers, which rows cannot share: decoding one request at a time", ", ".join(kinds))
            self.max_batch_size = 1
            if self.mode != "dynamic":
                self.mode, self._batch = "dynamic", DynamicBatchCache()

    def _prefill(self, handle: RequestHandle) -> tuple[Optional[_Row], Any]:
        request = handle.request
        cache, logits = self._prefill_cache(request.prompt_ids)
        generator = None
        if request.seed is not None and request.samples:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        text = None
        if request.stream or request.stop_strings:
            text = IncrementalText(self.tokenizer, request.stop_strings, request.skip_special_tokens)
        row = _Row(handle, self.rule.start(request.prompt_ids), generator, text, request.stop_ids if request.stop_ids is not None else self.stop_ids)
        (token,) = self._choose([row], logits)
        if self._accept(row, token):
            return row, cache
        return None, None

    # -- decoding -------------------------------------------------------------------------------

    def _decode(self) -> None:
        rows = self._rows
        ids = torch.tensor([row.pending for row in rows], dtype=torch.long, device=self.device).view(len(rows), 1)
        positions = [row.position for row in rows]
        logits = self._static_decode(ids, positions) if self.mode != "dynamic" else None
        if logits is None:  # the dynamic layout, or the static one just fell back to it
            logits = self._dynamic_decode(ids, positions)
        self.steps += 1
        finished = [i for i, (row, token) in enumerate(zip(rows, self._choose(rows, logits))) if not self._accept(row, token)]
        self._retire(finished, None)

    def _dynamic_decode(self, ids: torch.Tensor, positions: list) -> torch.Tensor:
        valid = self._batch.valid_columns(self.device)
        out = self.network(
            input_ids=ids,
            position_ids=self.rule.position_tensor(positions, self.device),
            attention_mask=self.rule.decode_mask(valid),
            use_cache=True,
            **{self._cache_argument: self._batch.cache},
            **TUPLE_OUTPUT,
        )
        self._batch.advance()
        return _logits(out)

    def _static_decode(self, ids: torch.Tensor, positions: list) -> Optional[torch.Tensor]:
        """One decode step on the static slots (a padded bucket when compiled); None after falling back."""
        rows = len(positions)
        # Compiled graphs exist for a few batch sizes; rows past the running ones are blanks (ignored).
        bucket = next(b for b in batch_buckets(self.max_batch_size) if b >= rows)
        extra = bucket - rows
        write_at = list(self._batch.lengths) + [0] * extra
        self._batch.write_at[:bucket].copy_(torch.tensor(write_at, dtype=torch.long), non_blocking=True)
        if extra:
            ids = torch.cat([ids, ids.new_zeros(extra, 1)])
            positions = positions + [self.rule.blank_position()] * extra
        logits = self._static_logits(ids, self.rule.position_tensor(positions, self.device))
        if logits is None:
            return None
        self._batch.lengths = [n + 1 for n in self._batch.lengths]
        return logits[:rows]

    def _static_forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rows = ids.shape[0]
        slots = self._batch
        valid = slots.columns[None, :] <= slots.write_at[:rows, None]  # (n, max_len): cached columns and the new one
        out = self.network(
            input_ids=ids,
            position_ids=positions,
            attention_mask=self.rule.decode_mask(valid),
            use_cache=True,
            **{self._cache_argument: slots.cache},
            **TUPLE_OUTPUT,
        )
        return _logits(out)

    def _static_logits(self, ids: torch.Tensor, positions: torch.Tensor) -> Optional[torch.Tensor]:
        if self.mode == "static":
            return self._static_forward(ids, positions)
        try:
            if self._compiled is None:
                _allow_recompiles(4 * len(batch_buckets(self.max_batch_size)))
                self._compiled = torch.compile(self._static_forward, dynamic=False, **self.compile_options)
            torch.compiler.cudagraph_mark_step_begin()
            return self._compiled(ids, positions).clone()
        except Exception as error:
            first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
            logger.warning("compiling the static-cache decode step failed (%s: %s); decoding on the dynamic cache", type(error).__name__, first)
            self.mode, self._compiled = "dynamic", None
            self._batch = self._batch.to_dynamic()
            return None

    # -- choosing and accepting tokens ----------------------------------------------------------

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> list[Any]:
        """The next token of each row (an exception for a row whose sampling failed)."""
        logits = logits.float()
        picks: list[Any] = logits.argmax(dim=-1).tolist()
        sampled = [i for i, row in enumerate(rows) if row.request.samples]
        if not sampled:
            return picks
        index = torch.tensor(sampled, device=logits.device)
        scores = logits.index_select(0, index)
        scores = scores / torch.tensor([[rows[i].request.temperature] for i in sampled], device=logits.device)
        top_p = [rows[i].request.top_p for i in sampled]
        if any(p < 1.0 for p in top_p):
            scores = top_p_filter(scores, torch.tensor(top_p, device=logits.device)[:, None])
        probs = scores.softmax(dim=-1)
        for j, i in enumerate(sampled):
            try:
                picks[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))
            except RuntimeError as error:  # e.g. NaN probabilities in this row only
                picks[i] = error
        return picks

    def _accept(self, row: _Row, token: Any) -> bool:
        """Record a row's new token and tell its sink; False when the row has finished."""
        handle = row.handle
        if isinstance(token, BaseException):
            self._fail(handle, token)
            return False
        if token in row.stop_ids:
            self._complete(row, "stop")
            return False
        row.ids.append(token)
        row.position, row.state = self.rule.advance(row.state, token)
        row.pending = token
        try:
            text = row.text.feed(row.ids) if row.text is not None else ""
            if row.request.stream:
                self._send(handle, Event("tokens", token_ids=[token], text=text))
        except Exception as error:  # the tokenizer or the sink failed for this request alone
            logger.exception("streaming a token failed")
            self._fail(handle, error)
            return False
        if row.text is not None and row.text.scanner.stopped:
            self._complete(row, "stop")
            return False
        if len(row.ids) >= row.request.max_new_tokens:
            self._complete(row, "length")
            return False
        if handle.cancelled:
            self._complete(row, "cancelled")
            return False
        return True

    def _complete(self, row: _Row, reason: str) -> None:
        handle = row.handle
        try:
            if row.text is None:
                skip = row.request.skip_special_tokens
                text = self.tokenizer.decode(row.ids, skip_special_tokens=skip) if self.tokenizer is not None else ""
            else:
                tail = row.text.finish(row.ids)
                if tail and row.request.stream:
                    self._send(handle, Event("tokens", text=tail))
                text = row.text.text
        except Exception as error:
            logger.exception("decoding an answer failed")
            self._fail(handle, error)
            return
        handle.token_ids = list(row.ids)
        handle.completion = Completion(text=text, prompt_tokens=len(row.request.prompt_ids), completion_tokens=len(row.ids), finish_reason=reason)
        handle.finished.set()
        self._send(handle, Event("done", completion=handle.completion))

    def _send(self, handle: RequestHandle, event: Event) -> None:
        if handle.sink is not None:
            handle.sink(event)

    def _fail(self, handle: RequestHandle, error: BaseException) -> None:
        handle.error = error
        handle.finished.set()
        try:
            self._send(handle, Event("error", error=error))
        except Exception:
            logger.exception("reporting an error to its request failed")

    def _finish_unstarted(self, handle: RequestHandle, reason: str) -> None:
        handle.completion = Completion(text="", prompt_tokens=len(handle.request.prompt_ids), completion_tokens=0, finish_reason=reason)
        handle.finished.set()
        try:
            self._send(handle, Event("done", completion=handle.completion))
        except Exception:
            logger.exception("reporting a cancelled request failed")

    def _retire(self, finished: list[int], reason: Optional[str]) -> None:
        """Drop rows `finished` (indices) from the batch; with a `reason`, complete them with it first."""
        if not finished:
            return
        if reason is not None:
            for i in finished:
                self._complete(self._rows[i], reason)
        gone = set(finished)
        keep = [i for i in range(len(self._rows)) if i not in gone]
        self._batch.keep(keep)
        self._rows = [self._rows[i] for i in keep]

    def _fail_batch(self, error: BaseException) -> None:
        for row in self._rows:
            self._fail(row.handle, error)
        self._rows = []
        self._batch = self._new_layout()
        self._compiled = None


def _allow_recompiles(graphs: int) -> None:
    """Let dynamo keep `graphs` compiled versions of one function (one per batch bucket, more for adapters
    swapped in); the setting is `recompile_limit` in recent torch, `cache_size_limit` before."""
    from torch import _dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(_dynamo.config, name):
            setattr(_dynamo.config, name, max(getattr(_dynamo.config, name), graphs))
            return


# A tuple instead of a `ModelOutput` dataclass, whose construction costs a noticeable share of a tiny model's step.
TUPLE_OUTPUT = {"return_dict": False}


def _logits(out: Any) -> torch.Tensor:
    """The last position's logits [B, vocab] of a forward's output (a tuple, logits first, or a `ModelOutput`)."""
    logits = out[0] if isinstance(out, tuple) else out.logits
    return logits[:, -1, :]


def _config_eos(model: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None) or getattr(model.config, "eos_token_id", None)
    ids = eos if isinstance(eos, (list, tuple)) else [eos]
    return [int(i) for i in ids if i is not None]


# --- offline use --------------------------------------------------------------------------------


def generate_requests(
    engine: BatchEngine, requests: Sequence[GenerationRequest], on_done: Optional[Callable[[int, RequestHandle], None]] = None
) -> list[RequestHandle]:
    """Run `requests` through `engine` (on this thread), shortest prompt first so rows of similar length
    decode together; returns their handles in input order. `on_done(index, handle)` is called as each finishes.
    A request that fails has `handle.error` set; the others are unaffected."""
    order = sorted(range(len(requests)), key=lambda i: len(requests[i].prompt_ids))
    handles: list[Optional[RequestHandle]] = [None] * len(requests)

    def sink_for(index: int) -> Optional[Callable[[Event], None]]:
        if on_done is None:
            return None
        return lambda event: on_done(index, handles[index]) if event.kind in ("done", "error") else None

    for i in order:
        handles[i] = engine.submit(requests[i], sink_for(i))
    engine.run_until_idle()
    return handles  # type: ignore[return-value]


class GenerationFailed(Exception):
    """The engine reported an error for this request (logged there with its traceback)."""


def stream_text(engine: BatchEngine, request: GenerationRequest) -> Iterator[str]:
    """The text of `request`'s answer, piece by piece as `engine` decodes it (`request.stream` is implied).

    With the engine's thread running (`start`) this waits for its pieces; otherwise it steps the engine
    itself. Leaving the loop early (break, an exception, closing the generator) cancels the request and
    frees its row; an interruption in the middle of a step (Ctrl-C) resets the engine.

    Raises:
        QueueFull: the engine's queue is full.
        GenerationFailed: the engine failed this request.
    """
    if not request.stream:
        request = dataclasses.replace(request, stream=True)
    events: queue.Queue = queue.Queue()
    handle = engine.submit(request, events.put)
    driving = not engine.serving
    try:
        while True:
            while driving and events.empty():
                engine.step()
            event = events.get()
            if event.kind == "tokens":
                if event.text:
                    yield event.text
            elif event.kind == "error":
                raise GenerationFailed("generating the answer failed; the log has the details") from event.error
            else:
                return
    except (GeneratorExit, GenerationFailed):
        raise
    except BaseException:
        if driving:  # raised inside a step: the batch may be half updated
            engine.reset()
        raise
    finally:
        if not handle.finished.is_set():
            handle.cancel()
            if driving:
                engine.step()  # frees the row now


class AnswerStream:
    """One chat answer from the engine: iterate for the pieces of its content as they are decoded; once the
    iteration has ended, `message` is the parsed reply (`Prompter.reply`: its content and any tool calls).

    Leaving the loop early cancels the request (see `stream_text`); `message` stays None then.
    """

    def __init__(self, engine: BatchEngine, prompter: Any, request: GenerationRequest):
        self.engine, self.prompter, self.request = engine, prompter, request
        self.message: Any = None

    def __iter__(self) -> Iterator[str]:
        reply = self.prompter.stream()
        pieces = stream_text(self.engine, self.request)
        try:
            for piece in pieces:
                shown = reply.feed(piece)
                if shown:
                    yield shown
        finally:
            pieces.close()
        rest, self.message = reply.finish()
        if rest:
            yield rest


def stream_answer(
    engine: BatchEngine, prompter: Any, messages: Sequence[Any], settings: GenerationArguments, tools: Optional[Sequence[Any]] = None
) -> AnswerStream:
    """The `AnswerStream` of the assistant's next message after `messages` (prompted by `prompter`, the loaded
    model's `instructglm.infer.prompts.Prompter`), decoded by `settings`, the answer budget cut to what the
    model's context leaves (a `--max_length` may be larger).

    Raises:
        BadValue: the prompt leaves no room for an answer (under `--max_length`, or in the context), or the
            run's format cannot show the messages (tools in a text prompt, ...).
    """
    prompt_ids = prompter.prompt_ids(messages, tools)
    request = prompter.request(prompt_ids, settings, stream=True)
    if engine.max_seq_len is not None:
        room = engine.max_seq_len - len(prompt_ids)
        if room < 1:
            raise BadValue(
                f"the conversation has {len(prompt_ids)} tokens and the model's context is {engine.max_seq_len}: "
                "clear the history or ask a shorter question"
            )
        if request.max_new_tokens > room:
            request = dataclasses.replace(request, max_new_tokens=room)
    return AnswerStream(engine, prompter, request)


def generate_batch(
    model: Any, tokenizer: Any, prompts: Sequence[Any], settings: GenerationArguments, prompter: Any = None
) -> list[Completion]:
    """One `Completion` per prompt (a text, or token ids), all prompts decoded together by the batching
    engine (`instructglm.infer.engine`): greedy answers are the one-at-a-time answers. With a `prompter`
    (the loaded model's `instructglm.infer.prompts.Prompter`) answers stop at its stop ids and are decoded
    as it reads them; otherwise at the model's eos ids, without special tokens.

    With `--max_length` (no `--max_new_tokens`), each answer's budget is max_length minus its own
    prompt's length, as one at a time.

    Raises:
        BadValue: a prompt leaves no room for an answer under `--max_length`.
    """
    options = {} if prompter is None else {"stop_ids": prompter.stop_ids, "skip_special_tokens": prompter.skip_special_tokens}
    return generate_all(model, tokenizer, prompts, settings, max_batch_size=max(1, len(prompts)), **options)


def generate_all(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    settings: GenerationArguments,
    max_batch_size: int = 8,
    decode: str = "dynamic",
    stop_ids: Optional[Iterable[int]] = None,
    skip_special_tokens: bool = True,
) -> list[Completion]:
    """One `Completion` per prompt (a text, encoded with the tokenizer's special tokens, or token ids), in
    input order, through a `BatchEngine` of `max_batch_size` rows that stops at `stop_ids` (default: the
    model's eos ids).

    Raises:
        BadValue: a prompt leaves no room for an answer under `--max_length`.
    """
    requests = [
        request_for(encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else prompt, settings, skip_special_tokens=skip_special_tokens)
        for prompt in prompts
    ]
    if not requests:
        return []
    # Sized for the longest request (a static cache needs a size; nothing past the context is refused here).
    longest = max(len(r.prompt_ids) + r.max_new_tokens for r in requests)
    engine = BatchEngine(
        model, tokenizer, max_batch_size=max_batch_size, max_queue=None, max_seq_len=longest, decode=decode, stop_ids=stop_ids
    )
    handles = generate_requests(engine, requests)
    for handle in handles:
        if handle.error is not None:
            raise handle.error
    return [handle.completion for handle in handles]
