"""ChatGLM-6B (GLM v1), native on current transformers.

Reference: THUDM's `modeling_chatglm.py` for `THUDM/chatglm-6b` (final 2023 version) and the GLM paper
(Du et al. 2022, "GLM: General Language Model Pretraining with Autoregressive Blank Infilling").
Parameter names are THUDM's, so their checkpoints and LoRA adapters load unchanged. The file reads top to
bottom: positions and mask, rotary, attention, MLP, block, pretrained base, model, causal LM.

The architecture: word embeddings; `num_layers` GLM blocks, each
    x = LN1(h);  h = alpha * x + Attention(x);  y = LN2(h);  out = alpha * y + MLP(y),  alpha = sqrt(2 * layers)
(note: the residual carries the *normalised* input, scaled; alpha is sqrt(56) whatever the depth, see
`RESIDUAL_SCALE_LAYERS`); a final LayerNorm; `lm_head` without bias.
Attention has one fused `query_key_value` projection whose output is per head [q | k | v]; each head is split
in two halves rotated by two position streams (the 2-D positions: position, block position); scores are
scaled like THUDM's fp16-safe recipe (q / (sqrt(d) * (layer + 1)), then * (layer + 1) in fp32). The
prefix-LM mask lets the prompt (everything before `<sop>`) attend bidirectionally and is causal from `<sop>` on.

Deliberate differences from the reference:
- Tensors are [batch, seq, ...] instead of THUDM's [seq, batch, ...]; the KV cache is a transformers `Cache`,
  passed as `cache` (transformers >= 5.24's name; `past_key_values`, the older one, is accepted too).
- The prefix mask and 2-D positions are built once per forward, in `prefix_lm_inputs`, from `input_ids` and the
  standard 2-D padding mask (left or right padding, positions counted from each row's first real token); THUDM's
  own 4-D bool mask (True = masked) with [b, 2, s] position ids is accepted as well.
- Packed training rows: the 2-D `attention_mask` may hold segment ids (0 = padding, 1..k = the rows of a packed
  sequence, each one run; the padding mask is the one-row case). Each row then gets the block-diagonal prefix-LM
  mask and the 2-D positions it has alone, so its loss and gradients are those it has unpacked
  (`instructglm.train.packing`). Without a KV cache only.
- Attention backends follow transformers: one signature `(module, query, key, value, attention_mask, scaling,
  dropout, **kwargs)`, looked up by `config._attn_implementation` — `eager` is THUDM's math
  (`eager_attention_forward`), `sdpa` is transformers' own `sdpa_attention_forward`, `flex_attention` is
  transformers' `flex_attention_forward` (compiled FlexAttention, for GPUs: it skips the masked blocks of the
  prefix-LM and packed patterns). eager and sdpa take the same mask, transformers' sdpa form: bool, True = may
  attend; flex_attention takes a `BlockMask` of the same rule (`prefix_lm_allowed`), built once per forward. The
  eager path fills masked scores with -10000 as THUDM did, so a fully masked (padding) query row is uniform there;
  sdpa and flex give such a row zeros. All are finite and no real token ever reads a padding row. Attention
  weights come only from `eager`, as in transformers. torch's FlexAttention has no backward on the CPU.
- Rotary cos/sin are computed in float32 from THUDM's fp16-rounded inverse frequencies and then cast to the
  activation dtype; THUDM computed them in fp16 (bf16 positions above 256 were not even exact there).
- `from_pretrained` raises on missing or mis-shaped tensors instead of re-initialising them.
- THUDM's `chat` / `stream_chat` are thin delegations to `instructglm.infer.chat`, the project's one
  generation path; the model file holds no prompt, sampling or threading code.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.output_capturing import capture_outputs

from instructglm.errors import BadValue
from instructglm.models.chatglm.config import ChatGLMConfig

logger = logging.get_logger(__name__)

# transformers 5.24 renamed the cache argument and output field `past_key_values` -> `cache` (the old name warns
# there); 5.17, the oldest release supported, knows only `past_key_values`. Outputs fill whichever field exists.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)} else "past_key_values"

# generate's model_kwargs that carry the 2-D positions of generated tokens (see `prefix_lm_continuation`)
CONTINUATION_KEYS = ("prefix_lm_rows", "prefix_lm_prompt_length")

# Backends whose mask form can express ChatGLM's prefix-LM mask (flash attention takes only a padding mask):
# eager and sdpa take the dense bool mask, flex_attention a `BlockMask` (transformers' `flex_attention_forward`).
SUPPORTED_ATTENTION = ("eager", "sdpa", "flex_attention")


def check_flex_attention_device(implementation: str, device: torch.device, training: bool) -> None:
    """FlexAttention trains on GPUs only: torch has no FlexAttention backward on the CPU (its forward runs there).

    Raises:
        BadValue: training with attn_implementation="flex_attention" on the CPU, naming the backend to use there.
    """
    if implementation == "flex_attention" and training and torch.is_grad_enabled() and device.type == "cpu":
        raise BadValue(
            f"attn_implementation='flex_attention' cannot train on the CPU (torch {torch.__version__} has no "
            "FlexAttention backward there): use attn_implementation='sdpa' on the CPU, flex_attention on a GPU"
        )


def _one_cache(cache: Cache | None, past_key_values: Cache | None) -> Cache | None:
    """The cache passed under either name (`cache`, or the older `past_key_values`), silently."""
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the KV cache once, as `cache` (or the older name `past_key_values`), not both")
    return past_key_values if cache is None else cache


# ---------------------------------------------------------------------------------------------------------------------
# Prefix-LM positions and mask
# ---------------------------------------------------------------------------------------------------------------------


def check_segment_ids(segment_ids: torch.Tensor) -> None:
    """A 2-D `attention_mask` holds segment ids: 0 on padding, 1..k on the k rows of a packed sequence.

    A plain padding mask (0/1, of any dtype) is the one-row case and is taken as it is, holes and all; with two or
    more rows, the ids are integers and each row is one contiguous run of tokens (how
    `instructglm.train.packing.PackedCollator` lays them out).

    Raises:
        ValueError: negative or fractional values, or a packed row split in several runs.
    """
    packed = segment_ids > 1
    if bool((segment_ids < 0).any()) or (segment_ids.dtype.is_floating_point and bool(packed.any())):
        raise ValueError(
            f"a 2-D attention_mask must hold 0 (padding) and 1 (real), or integer segment ids 1..k of packed rows, "
            f"got dtype {segment_ids.dtype} with values {segment_ids.unique()[:8].tolist()}"
        )
    if not bool(packed.any()):
        return
    # a row is one run when it opens once: as many run starts as distinct non-zero ids, per sequence
    real = segment_ids > 0
    opens = real.clone()
    opens[:, 1:] &= segment_ids[:, 1:] != segment_ids[:, :-1]
    present = torch.zeros(segment_ids.shape[0], segment_ids.shape[1] + 1, dtype=torch.bool, device=segment_ids.device)
    present.scatter_(1, segment_ids.long().clamp(max=segment_ids.shape[1]), True)
    if not torch.equal(opens.sum(1), present[:, 1:].sum(1)):
        raise ValueError(
            "each segment id of a packed attention_mask must mark one contiguous run of tokens (a row of the pack)"
        )


def first_in_segment(hits: torch.Tensor, segment_ids: torch.Tensor) -> torch.LongTensor:
    """[b, T]: for each token, the first index of its segment where `hits` is True (T where there is none).

    Padding (segment 0) is a segment of its own here; callers mask it out.
    """
    batch, length = segment_ids.shape
    segments = segment_ids.long().clamp(max=length)  # at most T rows in T tokens; keeps the table (B, T + 1)
    index = torch.arange(length, device=segment_ids.device).expand(batch, length)
    candidates = torch.where(hits, index, length)
    first = torch.full((batch, length + 1), length, dtype=torch.long, device=segment_ids.device)
    first = first.scatter_reduce(1, segments, candidates, reduce="amin", include_self=True)  # (B, segments)
    return first.gather(1, segments)


def prefix_lm_positions(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, config: ChatGLMConfig
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """ChatGLM's 2-D position ids of whole sequences, and where each token's row turns causal.

    Args:
        input_ids: [b, T] token ids (prompt, `[gMASK] <sop>`, then any generated tokens).
        attention_mask: [b, T] padding mask (1 = real token), or segment ids of packed rows (0 = padding,
            1..k = the rows, see `check_segment_ids`), or None (all real, one row).

    Returns:
        position_ids [b, 2, T]: every row counts as if it stood alone, from its first real token: row 0 is the index
        in the row, and every token from `<sop>` on takes the position of the row's mask token (`[gMASK]`, else
        `[MASK]`); row 1 (block position) is 0 on the context and 1, 2, 3... from `<sop>` on. Padding gets 0 in
        both, like THUDM's tokenizer.
        sop_index [b, T]: for each token, the index of its row's `<sop>` (`bos_token_id`), T if the row has none
        (it is all context).
    """
    batch, length = input_ids.shape
    segments = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
    real = segments > 0
    index = torch.arange(length, device=input_ids.device).expand(batch, length)  # (B, T)

    row_start = first_in_segment(real, segments)
    sop_index = first_in_segment(real & (input_ids == config.bos_token_id), segments)
    in_context = index < sop_index
    gmask_at = first_in_segment(real & in_context & (input_ids == config.gmask_token_id), segments)
    mask_at = first_in_segment(real & in_context & (input_ids == config.mask_token_id), segments)
    mask_position = torch.where(gmask_at < length, gmask_at, mask_at)  # THUDM prefers [gMASK] when a prompt has both

    position = torch.where(~in_context & (mask_position < length), mask_position - row_start, index - row_start)
    block_position = torch.where(in_context, 0, index - sop_index + 1)
    position_ids = torch.stack((position, block_position), dim=1) * real[:, None, :]  # (B, 2, T)
    return position_ids, sop_index


def prefix_lm_continuation(
    input_ids: torch.LongTensor, attention_mask: torch.Tensor | None, config: ChatGLMConfig
) -> torch.LongTensor | None:
    """How the 2-D positions go on for tokens appended to each row after its `<sop>`, or None.

    From `<sop>` on a row's position is the mask token's (or, without one, keeps counting with the index) and the
    block position counts up, so the positions of generated tokens follow from three numbers per row: [b, 3] =
    (`<sop>` index, position at `<sop>`, position step: 0 when anchored at a mask token, else 1). None when some row
    has no `<sop>` (its next tokens' positions depend on their ids) or the mask holds packed rows; callers then
    number the whole sequence with `prefix_lm_positions`. See `continued_positions`.
    """
    length = input_ids.shape[1]
    if attention_mask is not None and bool((attention_mask > 1).any()):
        return None
    position_ids, sop_index = prefix_lm_positions(input_ids, attention_mask, config)
    real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask > 0
    sop = torch.where(real, sop_index, length).amin(dim=1)  # (B,), one row per sequence
    if bool((sop >= length).any()):
        return None
    row_start = real.long().argmax(dim=1)  # first real token
    at_sop = position_ids[:, 0].gather(1, sop[:, None])[:, 0]
    step = (at_sop == sop - row_start).long()  # an anchor (a mask token) lies before <sop>: the position stays
    return torch.stack((sop, at_sop, step), dim=1)


def continued_positions(rows: torch.LongTensor, start: int, end: int) -> torch.LongTensor:
    """[b, 2, end - start] positions of the tokens at indices start..end-1, all at or after their row's `<sop>`.

    rows: `prefix_lm_continuation`'s [b, 3]. Equal to `prefix_lm_positions` of the whole sequence on those tokens.
    """
    index = torch.arange(start, end, device=rows.device)  # (q,)
    sop, at_sop, step = rows[:, 0, None], rows[:, 1, None], rows[:, 2, None]  # (B, 1) each
    return torch.stack((at_sop + step * (index - sop), index - sop + 1), dim=1)


def prefix_lm_allowed(
    query_segment: torch.Tensor,
    key_segment: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    query_sop: torch.Tensor,
) -> torch.BoolTensor:
    """The prefix-LM rule, on broadcastable tensors: may the query attend to the key?

    Yes iff both are in the same row (not padding), and the key is at or before the query or in the row's
    context (before its `<sop>`, `query_sop`). A padding query sees nothing (THUDM: its softmax is uniform and its
    output unused). The dense mask and FlexAttention's `mask_mod` are both this function.
    """
    return (query_segment == key_segment) & (query_segment > 0) & ((key_index <= query_index) | (key_index < query_sop))


def prefix_lm_mask(
    segments: torch.Tensor,
    sop_index: torch.Tensor,
    past_length: int,
    query_length: int,
    implementation: str,
):
    """The attention mask of one forward from per-token rows and `<sop>` indices (`prefix_lm_allowed`).

    Args:
        segments: [b, past + q] segment ids (0 = padding); sop_index: [b, past + q] (see `prefix_lm_positions`;
            zeros after a cache: every key is then at or before the query, so causal is the rule).

    Returns:
        For "flex_attention" a `BlockMask` over (q, past + q); else bool [b, 1, q, past + q], True = may attend.
    """
    total = past_length + query_length
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        rows = segments.shape[0]  # 1 after a cache without a padding mask: the same pattern for every sequence

        def mask_mod(b, h, q, k):
            b, q = b % rows, q + past_length
            return prefix_lm_allowed(segments[b, q], segments[b, k], q, k, sop_index[b, q])

        return create_block_mask(mask_mod, segments.shape[0], None, query_length, total, device=segments.device)
    key_index = torch.arange(total, device=segments.device)  # (T,)
    query_index = key_index[past_length:]  # (q,)
    query_segment, query_sop = segments[:, past_length:, None], sop_index[:, past_length:, None]  # (B, q, 1)
    allowed = prefix_lm_allowed(query_segment, segments[:, None, :], query_index[:, None], key_index, query_sop)
    return allowed[:, None, :, :]  # (B, 1, q, T)


def _check_attention_mask(attention_mask: torch.Tensor, past_length: int, query_length: int) -> bool:
    """Check the mask's form against the tokens; return whether it is a 2-D mask after a cache with every token real.

    That answer lets one new token after a cache attend without a mask (as with no mask at all). After a cache the
    values are read with one host sync (min and max together); inside a compiled step none is read (no check, and
    the mask is used as given), so the step has no graph break.
    """
    if attention_mask.dim() == 4:
        if attention_mask.dtype != torch.bool:
            raise ValueError(
                f"a 4-D attention_mask must be THUDM's bool mask (True = masked), got dtype {attention_mask.dtype}; "
                "pass the 2-D padding mask (1 = real token) instead"
            )
        if attention_mask.shape[-1] != past_length + query_length or attention_mask.shape[-2] < query_length:
            raise ValueError(
                f"4-D attention_mask of shape {tuple(attention_mask.shape)} does not fit {query_length} new tokens "
                f"after {past_length} cached ones (expected [b, 1, >= {query_length}, {past_length + query_length}])"
            )
        return False
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be 2-D [b, s] or THUDM's 4-D bool mask, got shape {tuple(attention_mask.shape)}")
    if attention_mask.shape[-1] != past_length + query_length:
        raise ValueError(
            f"attention_mask has {attention_mask.shape[-1]} columns but there are {past_length} cached and "
            f"{query_length} new tokens; pass the padding mask of the whole sequence so far"
        )
    if not past_length:
        check_segment_ids(attention_mask)
        return False
    return cached_mask_is_all_real(attention_mask)


def cached_mask_is_all_real(padding_mask: torch.Tensor) -> bool:
    """Whether a 2-D padding mask after a KV cache marks every token real, checking it is 0/1.

    The values are read with one host sync (min and max together), and inside a compiled step (`torch.compile` of
    a static-cache decode step) not at all: no check, and the mask is used as given, so the step has no graph break.

    Raises:
        ValueError: negative or fractional values, or packed rows' segment ids (which cannot continue a cache).
    """
    if torch.compiler.is_compiling():
        return False
    low, high = torch.stack((padding_mask.min(), padding_mask.max())).tolist()
    if low < 0 or high > 1:
        check_segment_ids(padding_mask)  # names negative or fractional values
        raise ValueError("packed rows (segment ids above 1 in attention_mask) cannot continue a KV cache")
    return low == 1


def _dense_as_block_mask(allowed: torch.BoolTensor):
    """A given dense bool mask (THUDM's, negated) as a FlexAttention `BlockMask`."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, _, queries, keys = allowed.shape
    return create_block_mask(lambda b, h, q, k: allowed[b % batch, 0, q, k], batch, None, queries, keys, device=allowed.device)


def prefix_lm_inputs(
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    past_length: int,
    query_length: int,
    config: ChatGLMConfig,
    implementation: str = "sdpa",
):
    """The attention mask and 2-D positions ([b, 2, q]) of one forward: the one place both are made.

    The mask is in the form the backend takes: for eager and sdpa transformers' sdpa form, bool
    [b|1, 1, q, past + q], True = the query may attend to that key; for "flex_attention" a `BlockMask` of the same
    pattern; None when every key is visible (one new token, no padding). Accepted `attention_mask` forms:
    - None: every token is real, one row (THUDM's and transformers' convention for bare `input_ids`);
    - [b, past + q] padding mask (1 = real), left or right padding: the prefix-LM mask is built from it; padding
      keys are never seen and padding queries see nothing, like THUDM's tokenizer mask;
    - [b, T] segment ids of packed rows (0 = padding, 1..k = rows, each one run; no cache): each row gets the
      prefix-LM mask and positions it has alone, and sees nothing of the others (`prefix_lm_allowed`);
    - [b, 1, q or more, past + q] bool, True = masked: THUDM's own mask, used as given (last q rows).
    With a cache (`past_length > 0`) the new tokens come after `<sop>`, so they attend causally to every real
    token; their positions cannot be found from the new tokens alone and must be passed
    (`prepare_inputs_for_generation` computes them from the whole sequence).
    """
    thudm_mask = attention_mask is not None and attention_mask.dim() == 4
    all_real = attention_mask is None or _check_attention_mask(attention_mask, past_length, query_length)
    sop_index = None
    if past_length == 0:
        if input_ids is None:
            if position_ids is None or (not thudm_mask and query_length > 1):
                raise ValueError(
                    "with inputs_embeds instead of input_ids pass position_ids [b, 2, s] and THUDM's 4-D bool "
                    "attention_mask: the prefix mask is found from the <sop> token id"
                )
        else:
            computed, sop_index = prefix_lm_positions(input_ids, None if thudm_mask else attention_mask, config)
            position_ids = computed if position_ids is None else position_ids
    elif position_ids is None:
        raise ValueError(
            "position_ids [b, 2, s] are required when continuing from a cache (the new tokens' positions depend on "
            "the whole sequence); generate() computes them, see prefix_lm_positions"
        )

    if thudm_mask:
        allowed = ~attention_mask[:, :, -query_length:, :]
        return (_dense_as_block_mask(allowed) if implementation == "flex_attention" else allowed), position_ids
    if all_real and query_length == 1:
        return None, position_ids  # one new token, no padding: every key is visible
    device = position_ids.device
    if sop_index is None:  # after a cache (or from embeddings): every key is at or before the query, causal is the rule
        sop_index = torch.zeros((1, past_length + query_length), dtype=torch.long, device=device)
    if attention_mask is None:
        segments = torch.ones((1, past_length + query_length), dtype=torch.long, device=device)
    else:
        segments = attention_mask.to(device).long()
    batch = max(segments.shape[0], sop_index.shape[0])
    segments, sop_index = segments.expand(batch, -1), sop_index.to(device).expand(batch, -1)
    return prefix_lm_mask(segments, sop_index, past_length, query_length, implementation), position_ids


# ---------------------------------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------------------------------


class ChatGLMRotaryEmbedding(nn.Module):
    """cos/sin of the 2-D positions for both halves of a head (rotary dim = head_dim / 2 each), shared by all layers.

    THUDM stored `inv_freq` per layer in fp16 (`rotary_emb.inv_freq` in checkpoints, ignored on load there and
    here). The same fp16-rounded values live here in one non-persistent float32 buffer, computed on the CPU once:
    `_init_weights` refills it after transformers' meta-device loading, and `_apply` keeps it float32 (a model cast
    to bfloat16 would otherwise round THUDM's values) and refills it when the module leaves the meta device.
    """

    inv_freq: torch.Tensor

    def __init__(self, config: ChatGLMConfig, base: float = 10000.0):
        super().__init__()
        self.dim = config.head_dim // 2
        self.base = base
        # on the device modules are being built on (meta under transformers' loader or `torch.device("meta")`)
        self.register_buffer("inv_freq", self.compute_inv_freq().to(torch.get_default_device()), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        """(hs/4,) float32 on the CPU: 1 / base^(2i / dim), rounded to fp16 as THUDM stored it."""
        exponent = torch.arange(0, self.dim, 2, device="cpu", dtype=torch.float32) / self.dim
        return (1.0 / self.base**exponent).half().float()

    def _apply(self, fn, recurse=True):
        was_meta = self.inv_freq.is_meta
        super()._apply(fn, recurse)
        if self.inv_freq.is_meta:
            self.inv_freq = self.inv_freq.float()  # no data yet: `_init_weights` or a later move fills it
        elif was_meta or self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.compute_inv_freq().to(self.inv_freq.device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [B, T, 1, hs]: the position stream's angles on the first half of a head, the block
        position's on the second, each half as [freqs, freqs]; sin is negated on the first quarter of each half,
        so `apply_2d_rotary` rotates with one multiply-add (x * cos + swapped-quarters(x) * sin)."""
        freqs = position_ids.float()[..., None] * self.inv_freq.to(position_ids.device)  # (B, 2, T, hs/4)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, 2, T, hs/2)
        cos, sin = emb.cos(), emb.sin()
        quarter = emb.shape[-1] // 2
        sin = torch.cat((-sin[..., :quarter], sin[..., quarter:]), dim=-1)  # rotate_half's sign, folded in
        batch, _, length, half = emb.shape
        cos = cos.transpose(1, 2).reshape(batch, length, 1, 2 * half)  # (B, T, 1, hs): both streams side by side
        sin = sin.transpose(1, 2).reshape(batch, length, 1, 2 * half)
        return cos.to(dtype), sin.to(dtype)


def apply_2d_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first half of every head by the positions, the second half by the block positions.

    Each half is rotated like `x * cos + rotate_half(x) * sin` (rotate_half(h) = [-h2, h1] on its quarters), in
    one pass over the whole head: swapping the quarters of both halves is one `flip`, and rotate_half's minus sign
    is already in `sin` (`ChatGLMRotaryEmbedding`); the products and sums are the per-half ones, bit for bit.

    x: (..., hs), e.g. (B, T, nh, hs); cos, sin: `ChatGLMRotaryEmbedding`'s (B, T, 1, hs), or with more unit dims
    before the last to broadcast over x's.
    """
    swapped = x.unflatten(-1, (2, 2, -1)).flip(-2).flatten(-3)  # per half: [h2, h1]
    return x * cos + swapped * sin


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's attention math, in transformers' attention-function signature.

    Args:
        module: the `SelfAttention` calling it; its `layer_id` sets the fp16-safe score scaling.
        query: (B, nh, q, hs); key, value: (B, nh, T, hs), T = cached + q.
        attention_mask: (B|1, 1, q, T) bool, True = may attend, or None (all keys).
        scaling: the softmax scale, 1 / sqrt(hs).

    Returns:
        attn_output (B, q, nh, hs) and attn_weights (B, nh, q, T).
    """
    # THUDM divides the query by sqrt(hs) * (layer + 1) and multiplies the scores back by (layer + 1) in fp32,
    # which keeps fp16 scores in range; masked scores are -10000 before that multiplication
    layer_scale = float(module.layer_id + 1)
    query = query / (layer_scale / scaling)
    scores = torch.matmul(query, key.transpose(-1, -2))  # (B, nh, q, T)
    if attention_mask is not None:
        scores = torch.where(attention_mask, scores, -10000.0)
    weights = torch.softmax(scores.float() * layer_scale, dim=-1).to(value.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value)  # (B, nh, q, hs)
    return output.transpose(1, 2).contiguous(), weights


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scaling = self.head_dim**-0.5
        # the prefix-LM mask is always passed explicitly: transformers' sdpa must not assume a causal one
        self.is_causal = False
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        # per head [q | k | v]; q and k are rotated together, (B, T, nh, 2, hs)
        query_key = mixed[..., : 2 * self.head_dim].unflatten(-1, (2, self.head_dim))
        cos, sin = (part[:, :, :, None] for part in rotary)  # (B, T, 1, 1, hs)
        query, key = apply_2d_rotary(query_key, cos, sin).unbind(-2)
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, nh, T, hs)
        value = mixed[..., 2 * self.head_dim :].transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_id)  # (B, nh, past + T, hs)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
        context, weights = attention(self, query, key, value, attention_mask, scaling=self.scaling, dropout=0.0, **kwargs)
        context = context.reshape(batch, length, self.num_heads * self.head_dim)  # (B, T, C)
        return self.dense(context), weights


# ---------------------------------------------------------------------------------------------------------------------
# MLP and block
# ---------------------------------------------------------------------------------------------------------------------


class GLU(nn.Module):
    """THUDM's name for a plain two-layer GELU MLP (no gating, despite the name)."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.inner_hidden_size)
        self.dense_4h_to_h = nn.Linear(config.inner_hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # the reference uses OpenAI's tanh approximation of GELU
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(hidden_states), approximate="tanh"))


# DeepNorm-style residual scale alpha = sqrt(2 * layers). THUDM's model never passes its layer count to GLMBlock,
# whose default is 28, so every ChatGLM-6B-architecture checkpoint (of any depth) was trained with sqrt(56).
RESIDUAL_SCALE_LAYERS = 28


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.attention = SelfAttention(config, layer_id)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.mlp = GLU(config)
        self.alpha = (2 * RESIDUAL_SCALE_LAYERS) ** 0.5

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> torch.Tensor:
        attention_input = self.input_layernorm(hidden_states)  # (B, T, C)
        attention_output, _ = self.attention(attention_input, rotary, attention_mask, cache=cache, **kwargs)
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input)


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained base
# ---------------------------------------------------------------------------------------------------------------------


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    # `output_hidden_states` / `output_attentions` are recorded by hooks on these modules (transformers'
    # `capture_outputs`); attention weights exist only under the eager backend
    _can_record_outputs = {"hidden_states": GLMBlock, "attentions": SelfAttention}
    # THUDM saved a per-layer inv_freq buffer that its own loader ignored; the model's one is not saved (see
    # `ChatGLMRotaryEmbedding`), so the checkpoints' keys are ignored
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config: ChatGLMConfig, *args, **kwargs):
        if not isinstance(config, ChatGLMConfig):
            raise BadValue(
                f"{type(self).__name__} is ChatGLM-6B (v1); this checkpoint's config is {type(config).__name__}: load it "
                "with AutoModelForCausalLM (after `import instructglm`), which picks the native class for its version"
            )
        if problems := config.unsupported_options():
            raise BadValue("This ChatGLM-6B config uses options InstructGLM does not support: " + "; ".join(problems))
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers loads on the meta device and re-creates non-persistent buffers empty: refill inv_freq
        super()._init_weights(module)
        if isinstance(module, ChatGLMRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader (every layout, dtype, device_map), strict about the checkpoint's tensors: see
        `instructglm.models.loading.load_strictly` (missing or mis-shaped tensors raise BadValue naming them)."""
        from instructglm.models.loading import load_strictly

        want_info = kwargs.pop("output_loading_info", False)
        model, info = load_strictly(super().from_pretrained, cls.__name__, pretrained_model_name_or_path, *model_args, **kwargs)
        if hasattr(model, "_tie_like_thudm"):  # the LM ties its head like THUDM; the bare model has none
            model._tie_like_thudm()
        return (model, info) if want_info else model


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


class ChatGLMModel(ChatGLMPreTrainedModel):
    """The bare transformer: embeddings, GLM blocks, final LayerNorm."""

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = ChatGLMRotaryEmbedding(config)
        self.layers = nn.ModuleList([GLMBlock(config, layer_id) for layer_id in range(config.num_layers)])
        self.final_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        *,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPast | tuple:
        """Final hidden states (B, T, C); `cache` is created when `use_cache` and none is given, and updated.

        Returns a `BaseModelOutputWithPast`, or with `return_dict=False` the tuple `(hidden states, cache)` (the
        cache only when there is one). Hidden states and attention weights are recorded by transformers'
        `capture_outputs` hooks when asked for; otherwise no `ModelOutput` is built for a tuple.
        """
        inputs = dict(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                      cache=_one_cache(cache, past_key_values), inputs_embeds=inputs_embeds, use_cache=use_cache)
        if records_outputs(self.config, kwargs):
            return self._forward_recorded(**inputs, return_dict=return_dict, **kwargs)
        hidden_states, cache = self._run(**inputs, **kwargs)
        if not (self.config.return_dict if return_dict is None else return_dict):
            return (hidden_states,) if cache is None else (hidden_states, cache)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})

    @capture_outputs
    def _forward_recorded(self, **inputs) -> BaseModelOutputWithPast:
        hidden_states, cache = self._run(**inputs)
        return BaseModelOutputWithPast(last_hidden_state=hidden_states, **{CACHE_FIELD: cache})

    def _run(
        self,
        input_ids: torch.LongTensor | None,
        position_ids: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        cache: Cache | None,
        inputs_embeds: torch.Tensor | None,
        use_cache: bool | None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> tuple[torch.Tensor, Cache | None]:
        """The forward itself: (final hidden states, the cache or None)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        implementation = self.config._attn_implementation
        if implementation not in SUPPORTED_ATTENTION:
            raise ValueError(
                f"attn_implementation={implementation!r} is not available for ChatGLM-6B (its "
                f"prefix-LM mask needs an explicit mask); use one of {list(SUPPORTED_ATTENTION)}"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputation in backward would write the cache twice

        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)  # (B, T, C)
        check_flex_attention_device(implementation, inputs_embeds.device, self.training)
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0
        mask, position_ids = prefix_lm_inputs(
            input_ids, attention_mask, position_ids, past_length, inputs_embeds.shape[1], self.config, implementation
        )
        if position_ids.shape[-2:] != (2, inputs_embeds.shape[1]):
            raise ValueError(
                f"position_ids must have shape [b, 2, {inputs_embeds.shape[1]}] (position, block position), "
                f"got {tuple(position_ids.shape)}"
            )
        rotary = self.rotary_emb(position_ids.to(inputs_embeds.device), inputs_embeds.dtype)  # 2 x (B, T, 1, hs)
        if isinstance(mask, torch.Tensor):
            mask = mask.to(inputs_embeds.device)

        hidden_states = inputs_embeds
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary, attention_mask=mask, cache=cache, **kwargs)
        return self.final_layernorm(hidden_states), cache


def records_outputs(config, kwargs: dict) -> bool:
    """Whether a forward is asked (in `kwargs`, else by the config) for hidden states or attention weights.

    `output_hidden_states` may also be an index or a list of them (transformers' selection), so any value other than
    None / False asks.
    """
    for name in ("output_hidden_states", "output_attentions"):
        value = kwargs.get(name, getattr(config, name, False))
        if value is not None and value is not False:
            return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# Causal LM
# ---------------------------------------------------------------------------------------------------------------------


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its language-model head: forward with loss, and `generate`."""

    _tied_weights_keys = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: ChatGLMConfig):
        super().__init__(config)
        self.transformer = ChatGLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _tie_like_thudm(self) -> None:
        # THUDM's loader tied lm_head whenever config.json does not say `tie_word_embeddings: false`, even when a
        # checkpoint also stores a different lm_head; transformers keeps both then, so tie explicitly.
        embeddings = self.transformer.word_embeddings.weight
        if not self.config.tie_word_embeddings or self.lm_head.weight is embeddings:
            return
        if embeddings.device.type == "meta" or self.lm_head.weight.device != embeddings.device:
            return  # offloaded or split by a device map: leave transformers' decision
        logger.warning(
            "config.json does not set tie_word_embeddings: false, so lm_head.weight is tied to "
            "transformer.word_embeddings.weight as THUDM's loader did; the checkpoint's own lm_head.weight is unused"
        )
        self.lm_head.weight = embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        *,
        past_key_values: Cache | None = None,
        return_dict: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> CausalLMOutputWithPast | tuple:
        """Logits and, given `labels`, the mean next-token cross-entropy (labels shifted inside, -100 ignored).

        `attention_mask`: the tokenizer's 2-D padding mask, THUDM's 4-D bool mask (then also pass its
        [b, 2, s] `position_ids`), or None (every token real). `logits_to_keep=n` computes only the last n logits.
        `output_attentions=True` gives attention weights under `attn_implementation="eager"` only (as in
        transformers, sdpa has none). `return_dict=False` returns `(loss, logits, cache, hidden states, attentions)`
        without the ones that are None, like `ModelOutput.to_tuple`, and builds no `ModelOutput` on the way.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        recorded = records_outputs(self.config, kwargs)
        outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=_one_cache(cache, past_key_values),
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            return_dict=recorded,
            **kwargs,
        )
        if recorded:
            hidden_states, cache = outputs.last_hidden_state, getattr(outputs, CACHE_FIELD)
            all_hidden_states, attentions = outputs.hidden_states, outputs.attentions
        else:
            hidden_states, cache = outputs[0], outputs[1] if len(outputs) > 1 else None
            all_hidden_states = attentions = None
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        logits = self.lm_head(hidden_states)  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            return tuple(v for v in (loss, logits, cache, all_hidden_states, attentions) if v is not None)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=all_hidden_states, attentions=attentions, **{CACHE_FIELD: cache}
        )

    # -- generation ---------------------------------------------------------------------------------------------------

    def _prepare_attention_mask_for_generation(self, inputs_tensor: torch.Tensor, *args, **kwargs) -> torch.LongTensor:
        # Bare input_ids mean "every token is real" (THUDM's behaviour, and what the forward does); transformers
        # would otherwise guess a padding mask from the pad id. Pass the tokenizer's attention_mask for padding.
        return torch.ones(inputs_tensor.shape[:2], dtype=torch.long, device=inputs_tensor.device)

    def generate(self, inputs: torch.Tensor | None = None, *args, **kwargs):
        """`GenerationMixin.generate`, also accepting THUDM's 4-D bool mask (as old scripts pass it).

        That mask is reduced to the padding mask it encodes (a row that may attend to something is a real
        token); positions are always derived from the ids and that mask, so a given `position_ids` is dropped.
        """
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 4:
            if mask.dtype != torch.bool:
                raise ValueError("a 4-D attention_mask must be THUDM's bool mask (True = masked)")
            kwargs["attention_mask"] = (~mask[:, 0]).any(dim=-1).long()
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and position_ids.dim() == 3:
            kwargs.pop("position_ids")
        return super().generate(inputs, *args, **kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor: torch.Tensor, model_kwargs: dict) -> None:
        """Called once by `generate` before the first step: notes how each row's positions continue after `<sop>`.

        transformers would track 1-D position counters here; ChatGLM's 2-D positions of generated tokens follow
        from three numbers per row (`prefix_lm_continuation`), kept in `model_kwargs` (expanded with the batch for
        beams and `num_return_sequences`), so no step re-numbers the whole sequence.
        """
        if inputs_tensor.dim() == 2 and not inputs_tensor.is_floating_point():
            rows = prefix_lm_continuation(inputs_tensor, model_kwargs.get("attention_mask"), self.config)
            if rows is not None:
                model_kwargs[CONTINUATION_KEYS[0]] = rows
                model_kwargs[CONTINUATION_KEYS[1]] = inputs_tensor.shape[1]
        return None

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        *,
        past_key_values: Cache | None = None,
        prefix_lm_rows: torch.LongTensor | None = None,
        prefix_lm_prompt_length: int | None = None,
        **kwargs,
    ) -> dict:
        """The not-yet-cached tokens with their 2-D positions.

        New tokens after `<sop>` keep the mask token's position and count up the block position: generated tokens
        get them from `prefix_lm_rows` (noted before the first step, see `_prepare_position_ids_for_generation`),
        anything else from numbering the whole sequence so far. The cache comes as `cache` (transformers >= 5.24)
        or `past_key_values` (older).
        """
        if inputs_embeds is not None:
            raise ValueError("ChatGLM-6B generates from input_ids (its masks and positions come from the token ids)")
        cache = _one_cache(cache, past_key_values)
        past_length = cache.get_seq_length() if cache is not None else 0
        if prefix_lm_rows is not None and past_length >= prefix_lm_prompt_length:
            position_ids = continued_positions(prefix_lm_rows, past_length, input_ids.shape[1])
        else:
            position_ids = prefix_lm_positions(input_ids, attention_mask, self.config)[0][..., past_length:]
        model_inputs = {
            "input_ids": input_ids[:, past_length:],
            "position_ids": position_ids,
            "attention_mask": attention_mask,
            "cache": cache,
            "use_cache": use_cache,
        }
        for key in ("output_attentions", "output_hidden_states", "logits_to_keep"):
            if key in kwargs:
                model_inputs[key] = kwargs[key]
        return model_inputs

    # -- THUDM's chat API -----------------------------------------------------------------------------------------------

    def chat(self, tokenizer, query, history=None, **kwargs):
        """THUDM's `model.chat(tokenizer, query, history)` API, implemented in `instructglm.infer.chat`."""
        from instructglm.infer.chat import chat

        return chat(self, tokenizer, query, history, **kwargs)

    def stream_chat(self, tokenizer, query, history=None, **kwargs):
        """THUDM's `model.stream_chat(tokenizer, query, history)` API, implemented in `instructglm.infer.chat`."""
        from instructglm.infer.chat import stream_chat

        return stream_chat(self, tokenizer, query, history, **kwargs)


__all__ = [
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "ChatGLMPreTrainedModel",
    "GLMBlock",
    "check_segment_ids",
    "eager_attention_forward",
    "first_in_segment",
    "prefix_lm_allowed",
    "prefix_lm_inputs",
    "prefix_lm_positions",
]
