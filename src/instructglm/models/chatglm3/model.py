"""ChatGLM2-6B and ChatGLM3-6B (one architecture), native on current transformers.

Reference: THUDM's `modeling_chatglm.py` for `THUDM/chatglm3-6b` (the revision with `build_chat_input` and the
torch-2 `scaled_dot_product_attention` path) and for `THUDM/chatglm2-6b`, which gives bit-identical float32 outputs.
Parameter names are THUDM's, so their checkpoints and LoRA adapters (on `query_key_value`) load unchanged.

The architecture, top to bottom: word embeddings (no scaling, no position embedding); `num_layers` pre-norm blocks
    h = x + Attention(RMSNorm(x));  out = h + MLP(RMSNorm(h))
then a final RMSNorm and an untied `output_layer` without bias. RMSNorm is computed in float32. Attention has one
fused `query_key_value` projection (the only linear layer with a bias) whose output rows are
[all query heads | g key heads | g value heads]; query head j reads key/value group j // (heads / g) (multi-query
attention, like `repeat_interleave`). RoPE rotates only the first `kv_channels / 2` dims of each query and key head,
in interleaved pairs (x[2i], x[2i+1]) with angle pos * 10000^(-2i / (kv_channels / 2)); the other half passes through.
Scores are scaled by 1 / sqrt(kv_channels) (THUDM's query-key layer scaling cancels out). The MLP is SwiGLU:
`dense_h_to_4h` to 2 * ffn, silu(first half) * second half, `dense_4h_to_h`.

Deliberate differences from the reference:
- Tensors are [batch, seq, ...] instead of THUDM's [seq, batch, ...]; the KV cache is a transformers `Cache` holding
  the un-expanded keys (after RoPE) and values per layer, [b, g, s, kv_channels].
- The attention mask is built once per forward (`chatglm_attention_mask`) from the standard 2-D padding mask, in the
  attention backend's form; positions not given are counted over each row's real tokens (`position_ids_from_mask`),
  so left padding (generation) and right padding (training) give the same per-row logits as THUDM's left-padded
  batches with the tokenizer's positions. THUDM, given a mask but no positions, counted 0..s-1 over the padded row;
  RoPE is relative, so the logits at real positions agree up to rounding.
- Rotary cos/sin are computed from the positions directly (no `seq_length` table, so longer inputs run), in float32
  and then cast, as ChatGLM3's code does; for a ChatGLM2 checkpoint (`chatglm_version=2`) in float16 the angles are
  computed in float16 as ChatGLM2's code does. (ChatGLM2's code in bfloat16 mixed dtypes; ChatGLM3's rule is used.)
- Packed training rows: the 2-D `attention_mask` may hold segment ids (0 = padding, 1..k = the rows of a packed
  sequence, each one run; the padding mask is the one-row case): attention is then block-diagonal causal and
  positions restart at every row, so each row's loss and gradients are those it has unpacked
  (`instructglm.train.packing`). Without a KV cache only.
- `eager`, `sdpa` and `flex_attention` (transformers' compiled FlexAttention, for GPUs; its `BlockMask` follows
  the same rule, `causal_rows_allowed`) behind one signature, chosen by `config._attn_implementation`; the
  `hidden_states` output is THUDM's (the embedding output, then each block's output; the last is before the final
  RMSNorm).
- `from_pretrained` raises on missing or mis-shaped tensors instead of re-initialising them.
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

from instructglm.errors import BadValue
from instructglm.models.chatglm.model import (
    cached_mask_is_all_real,
    check_flex_attention_device,
    check_segment_ids,
    first_in_segment,
)
from instructglm.models.chatglm3.config import ChatGLM3Config

# transformers renamed the outputs' `past_key_values` to `cache` (5.2x); write whichever this version has.
_CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


# ---------------------------------------------------------------------------------------------------------------------
# Positions and the attention mask (built once per forward)
# ---------------------------------------------------------------------------------------------------------------------


def position_ids_from_mask(padding_mask: torch.Tensor, query_length: int) -> torch.LongTensor:
    """Positions of the last `query_length` tokens: 0 on left pads, then 0..n-1 over each row's real tokens.

    padding_mask: [b, T] with 1 on real tokens, T = cached + new tokens; or the segment ids of packed rows (0 =
    padding, 1..k = rows, see `check_segment_ids`), where each row counts from 0 as if it stood alone. These are
    exactly the `position_ids` THUDM's tokenizer returned for its left-padded batches; with right padding the real
    tokens get the same (and a pad token the count of real tokens before it, minus one).
    """
    segments = padding_mask.long()
    real = segments > 0
    counted = real.long().cumsum(-1)  # (B, T) real tokens up to and including each one
    row_start = first_in_segment(real, segments).clamp(max=segments.shape[1] - 1)  # (padding's is unused)
    positions = torch.where(real, counted - counted.gather(1, row_start), (counted - 1).clamp(min=0))
    return positions[:, -query_length:]


def causal_rows_allowed(
    query_segment: torch.Tensor,
    key_segment: torch.Tensor,
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    pad_query_sees_all: bool,
) -> torch.BoolTensor:
    """The attention rule, on broadcastable tensors: may the query attend to the key?

    Yes iff the key is real, at or before the query, and in the query's row (a padding query: in any row); and,
    as in THUDM's `get_masks` when nothing is cached (`pad_query_sees_all`), a padding query may attend to every
    key: its output is junk but finite, and no row is fully masked. The dense mask and FlexAttention's `mask_mod`
    are both this function.
    """
    pad_query = query_segment == 0
    allowed = (key_index <= query_index) & (key_segment > 0) & ((query_segment == key_segment) | pad_query)
    return allowed | pad_query if pad_query_sees_all else allowed


def padding_mask_is_all_real(padding_mask: torch.Tensor, past_length: int) -> bool:
    """Check a 2-D padding mask (or packed rows' segment ids, without a cache) and say whether every token is real
    (after a cache: `cached_mask_is_all_real`, one host sync and none inside a compiled step).

    Raises:
        ValueError: negative or fractional values, a packed row split in several runs, or packed rows after a cache.
    """
    if not past_length:
        check_segment_ids(padding_mask)
        return bool((padding_mask == 1).all())
    return cached_mask_is_all_real(padding_mask)


def chatglm_attention_mask(
    padding_mask: torch.Tensor | None,
    past_length: int,
    query_length: int,
    implementation: str,
    dtype: torch.dtype,
    device: torch.device,
):
    """The attention mask of one forward, [b|1, 1, q, past + q], in the form `implementation` takes, or None.

    `padding_mask` is the 2-D padding mask (1 = real) or the segment ids of packed rows (no cache): attention is
    causal within each row (`causal_rows_allowed`), so packed rows never see each other. None means plain causal
    attention (SDPA's `is_causal`) or, for a single new token, attention to everything cached.

    Returns:
        sdpa: bool, True = may attend; eager: float, 0 where allowed and the dtype's minimum elsewhere;
        flex_attention: a `BlockMask` of the same pattern (never None with more than one query: flex has no
        causal flag).
    """
    if padding_mask is not None and padding_mask_is_all_real(padding_mask, past_length):
        padding_mask = None
    if padding_mask is None and (query_length == 1 or (past_length == 0 and implementation not in ("eager", "flex_attention"))):
        return None
    total = past_length + query_length
    if padding_mask is None:
        segments = torch.ones((1, total), dtype=torch.long, device=device)
    else:
        segments = padding_mask.to(device=device, dtype=torch.long)  # (B, T)
    pad_query_sees_all = past_length == 0
    if implementation == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        rows = segments.shape[0]  # 1 without a padding mask: the same pattern for every sequence

        def mask_mod(b, h, q, k):
            b, q = b % rows, q + past_length
            return causal_rows_allowed(segments[b, q], segments[b, k], q, k, pad_query_sees_all)

        return create_block_mask(mask_mod, segments.shape[0], None, query_length, total, device=device)
    key_index = torch.arange(total, device=device)  # (T,)
    query_index = key_index[past_length:]  # (q,)
    allowed = causal_rows_allowed(
        segments[:, past_length:, None], segments[:, None, :], query_index[:, None], key_index, pad_query_sees_all
    )[:, None]  # (B|1, 1, q, T)
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


# ---------------------------------------------------------------------------------------------------------------------
# Norm and rotary embedding
# ---------------------------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """w * x / sqrt(mean(x^2) + eps), computed in float32 and returned in the input's dtype."""

    def __init__(self, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        states = hidden_states.float()
        states = states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * states).to(dtype)


def _norm(config: ChatGLM3Config) -> nn.Module:
    if config.rmsnorm:
        return RMSNorm(config.hidden_size, eps=config.layernorm_epsilon)
    return nn.LayerNorm(config.hidden_size, eps=config.layernorm_epsilon)


class RotaryEmbedding(nn.Module):
    """cos/sin of the positions for the rotated half of a head (kv_channels / 2 dims, kv_channels / 4 angles).

    THUDM stored an `inv_freq` buffer (`transformer.rotary_pos_emb.inv_freq` in checkpoints) that its forward never
    read: it recomputed theta on the module's device every call. Here theta is computed once per device into a
    non-persistent float32 buffer (`theta`, never saved; the checkpoints' key is ignored): again on every move
    (`_apply`, which also keeps it float32 when the model is cast) and by `_init_weights` after transformers'
    meta-device loading. ChatGLM2's float16 angles are still computed per call, in float16, as its code did.
    """

    theta: torch.Tensor

    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.dim = config.kv_channels // 2
        self.base = 10000 * config.rope_ratio
        # ChatGLM2's code computed theta, positions and their product in the weights' dtype
        self.angles_in_float16 = config.chatglm_version == 2
        default = torch.get_default_device()
        theta = self.compute_theta(torch.float32, "cpu" if default.type == "meta" else default)
        self.register_buffer("theta", theta.to(default), persistent=False)

    def compute_theta(self, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
        """(dim/2,) 1 / base^(2i / dim), computed in `dtype` on `device` (THUDM's recipe)."""
        return 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=dtype, device=device) / self.dim))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.theta.is_meta:
            self.theta = self.theta.float()  # no data yet: `_init_weights` or a later move fills it
        else:
            self.theta = self.compute_theta(torch.float32, self.theta.device)
        return self

    @torch.no_grad()
    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if self.angles_in_float16 and dtype == torch.float16:
            angles = (position_ids.half()[..., None] * self.compute_theta(torch.float16, position_ids.device)).float()
        else:
            angles = position_ids.float()[..., None] * self.theta.to(position_ids.device)  # (B, T, dim/2)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rotary_for_pairs(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`RotaryEmbedding`'s (B, T, rot/2) cos and sin laid out for `apply_rotary`, once per forward: (B, T, 1, rot),
    each value twice (both dims of its pair), sin negated on the even dims."""
    cos = torch.stack((cos, cos), dim=-1).flatten(-2)[:, :, None, :]
    sin = torch.stack((-sin, sin), dim=-1).flatten(-2)[:, :, None, :]
    return cos, sin


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of the first cos.shape[-1] dims of every head.

    Each pair becomes (x0 * c - x1 * s, x1 * c + x0 * s): here x_rot * cos + pair-swapped(x_rot) * sin, with the
    minus sign already in `sin` (`rotary_for_pairs`), which is the same products and sums, bit for bit.
    x: (..., hs), e.g. (B, T, nh, hs); cos, sin: `rotary_for_pairs`'s (B, T, 1, rot), or with more unit dims before
    the last to broadcast over x's.
    """
    rotated_dims = cos.shape[-1]
    x_rot, x_pass = x[..., :rotated_dims], x[..., rotated_dims:]
    swapped = x_rot.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)  # (x1, x0) per pair
    return torch.cat((x_rot * cos + swapped * sin, x_pass), dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------


def repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    """(B, g, T, hs) -> (B, g * groups, T, hs): query head j reads key/value head j // groups."""
    if groups == 1:
        return states
    batch, heads, length, size = states.shape
    return states[:, :, None].expand(batch, heads, groups, length, size).reshape(batch, heads * groups, length, size)


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
    """Softmax attention in float32. query (B, nh, q, hs), key/value (B, g, T, hs), mask additive (B|1, 1, q, T).

    Returns the output (B, q, nh, hs) and the probabilities (B, nh, q, T).
    """
    key = repeat_kv(key, module.num_key_value_groups)
    value = repeat_kv(value, module.num_key_value_groups)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling  # (B, nh, q, T)
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


class SelfAttention(nn.Module):
    """THUDM's fused-projection attention with multi-query key/value groups and half-head RoPE."""

    def __init__(self, config: ChatGLM3Config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.head_dim = config.kv_channels
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads
        self.multi_query_attention = config.multi_query_attention
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        qkv_size = self.head_dim * (self.num_heads + 2 * self.num_key_value_heads)
        self.query_key_value = nn.Linear(
            config.hidden_size, qkv_size, bias=config.add_bias_linear or config.add_qkv_bias
        )
        self.dense = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.add_bias_linear)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        implementation: str,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states)
        cos, sin = rotary
        heads, size, groups = self.num_heads, self.head_dim, self.num_key_value_heads
        # query and key heads are rotated together, in one pass
        if self.multi_query_attention:
            # rows: [all query heads | g key heads | g value heads]
            query_key = mixed[..., : (heads + groups) * size].view(batch, length, heads + groups, size)
            query, key = apply_rotary(query_key, cos, sin).split([heads, groups], dim=2)
            value = mixed[..., (heads + groups) * size :].view(batch, length, groups, size)
        else:
            # without MQA THUDM lays the rows out per head: [q | k | v] of head 0, then head 1...
            mixed = mixed.view(batch, length, heads, 3 * size)
            query_key = mixed[..., : 2 * size].unflatten(-1, (2, size))  # (B, T, nh, 2, hs)
            query, key = apply_rotary(query_key, cos[:, :, :, None], sin[:, :, :, None]).unbind(-2)
            value = mixed[..., 2 * size :]
        query, key = query.transpose(1, 2), key.transpose(1, 2)  # (B, nh, T, hs), (B, g, T, hs)
        value = value.transpose(1, 2)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, probs = attention(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=self.attention_dropout if self.training else 0.0,
        )
        return self.dense(output.reshape(batch, length, self.num_heads * self.head_dim)), probs


# ---------------------------------------------------------------------------------------------------------------------
# MLP, block, stack
# ---------------------------------------------------------------------------------------------------------------------


class MLP(nn.Module):
    """SwiGLU: dense_h_to_4h to 2 * ffn, silu(first half) * second half, dense_4h_to_h."""

    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, 2 * config.ffn_hidden_size, bias=config.add_bias_linear)
        self.dense_4h_to_h = nn.Linear(config.ffn_hidden_size, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate, up = self.dense_h_to_4h(hidden_states).chunk(2, dim=-1)
        return self.dense_4h_to_h(F.silu(gate) * up)


class GLMBlock(GradientCheckpointingLayer):
    def __init__(self, config: ChatGLM3Config, layer_idx: int):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attention = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        self.mlp = MLP(config)
        self.hidden_dropout = config.hidden_dropout
        # residuals from the normalised input instead of the input (False in every released checkpoint)
        self.residual_from_norm = config.apply_residual_connection_post_layernorm

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        implementation: str,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        normed = self.input_layernorm(hidden_states)
        attention_output, probs = self.self_attention(normed, rotary, attention_mask, implementation, cache)
        residual = normed if self.residual_from_norm else hidden_states
        hidden_states = residual + self._dropout(attention_output)
        normed = self.post_attention_layernorm(hidden_states)
        residual = normed if self.residual_from_norm else hidden_states
        return residual + self._dropout(self.mlp(normed)), probs

    def _dropout(self, states: torch.Tensor) -> torch.Tensor:
        # F.dropout returns its input outside training; skipping the call saves its overhead per decode step
        return F.dropout(states, p=self.hidden_dropout, training=True) if self.training else states


class GLMTransformer(nn.Module):
    """THUDM's `encoder`: the blocks and the final norm (absent when `post_layer_norm` is false)."""

    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.layers = nn.ModuleList([GLMBlock(config, i) for i in range(config.num_layers)])
        if config.post_layer_norm:
            self.final_layernorm = _norm(config)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        implementation: str,
        cache: Cache | None,
        output_attentions: bool,
        output_hidden_states: bool,
    ) -> tuple[torch.Tensor, tuple | None, tuple | None]:
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, probs = layer(hidden_states, rotary, attention_mask, implementation, cache=cache)
            if output_attentions:
                all_attentions += (probs,)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)  # THUDM's last one: before the final norm
        if hasattr(self, "final_layernorm"):
            hidden_states = self.final_layernorm(hidden_states)
        return hidden_states, all_hidden_states, all_attentions


class Embedding(nn.Module):
    """THUDM's `embedding`: word embeddings only."""

    def __init__(self, config: ChatGLM3Config):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.padded_vocab_size, config.hidden_size)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        return self.word_embeddings(input_ids)


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained base and models
# ---------------------------------------------------------------------------------------------------------------------


class ChatGLM3PreTrainedModel(PreTrainedModel):
    config_class = ChatGLM3Config
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    # THUDM saved a rotary inv_freq buffer that its forward never read; the model's theta is not saved (see
    # `RotaryEmbedding`), so the checkpoints' key is ignored
    _keys_to_ignore_on_load_unexpected = [r"rotary_pos_emb\.inv_freq"]

    def __init__(self, config: ChatGLM3Config, *args, **kwargs):
        if not isinstance(config, ChatGLM3Config):
            raise BadValue(
                f"{type(self).__name__} needs a ChatGLM2/3 config (ChatGLM3Config), got {type(config).__name__}; "
                "a ChatGLM-6B (v1) checkpoint loads with ChatGLMForConditionalGeneration"
            )
        if problems := config.unsupported_options():
            raise BadValue("This ChatGLM2/3 config uses options InstructGLM does not support: " + "; ".join(problems))
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        # transformers loads on the meta device and re-creates non-persistent buffers empty: refill theta
        super()._init_weights(module)
        if isinstance(module, RotaryEmbedding):
            init.copy_(module.theta, module.compute_theta(torch.float32, module.theta.device))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader (every layout, dtype, device_map), strict about the checkpoint's tensors: see
        `instructglm.models.loading.load_strictly` (missing or mis-shaped tensors raise BadValue naming them)."""
        from instructglm.models.loading import load_strictly

        want_info = kwargs.pop("output_loading_info", False)
        model, info = load_strictly(super().from_pretrained, cls.__name__, pretrained_model_name_or_path, *model_args, **kwargs)
        return (model, info) if want_info else model


class ChatGLM3Model(ChatGLM3PreTrainedModel):
    """The transformer: embedding, blocks, final norm; it also holds THUDM's `output_layer` (applied by the LM)."""

    def __init__(self, config: ChatGLM3Config):
        super().__init__(config)
        self.embedding = Embedding(config)
        self.rotary_pos_emb = RotaryEmbedding(config)
        self.encoder = GLMTransformer(config)
        self.output_layer = nn.Linear(config.hidden_size, config.padded_vocab_size, bias=False)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embedding.word_embeddings = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        """Final hidden states [b, s, hidden] and the cache.

        Args:
            attention_mask: the tokenizer's 2-D padding mask over cached + new tokens (1 = real; left or right
                padding), or the segment ids of packed rows (0 = padding, 1..k = rows; no cache), or None (every
                token real).
            position_ids: [b, s] positions of the new tokens; None counts them over the real tokens of the mask
                (or from the cache length without one).
            cache: a transformers `Cache` (a `DynamicCache` is made when `use_cache` and none is given);
                `past_key_values=` is accepted for older callers.
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if cache is not None and not isinstance(cache, Cache):
            raise ValueError(
                f"cache must be a transformers Cache (e.g. DynamicCache), got {type(cache).__name__}; THUDM's tuples of "
                "[s, b, g, hs] tensors are not accepted"
            )
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False  # recomputation would write the cache twice
        output_attentions = bool(self.config.output_attentions if output_attentions is None else output_attentions)
        output_hidden_states = bool(self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)
        return_dict = self.config.return_dict if return_dict is None else return_dict

        if inputs_embeds is None:
            inputs_embeds = self.embedding(input_ids)
        batch, length, _ = inputs_embeds.shape
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = cache.get_seq_length() if cache is not None else 0

        if attention_mask is not None and (attention_mask.dim() != 2 or attention_mask.shape[-1] != past_length + length):
            raise ValueError(
                f"attention_mask must be the 2-D padding mask [b, {past_length + length}] ({past_length} cached + "
                f"{length} new tokens, 1 = real token; or packed rows' segment ids), got shape "
                f"{tuple(attention_mask.shape)}"
            )
        implementation = self.config._attn_implementation or "eager"
        if output_attentions:
            implementation = "eager"  # only the eager path materialises the probabilities
        check_flex_attention_device(implementation, inputs_embeds.device, self.training)
        # built (and the mask's values checked) before positions are counted from the mask
        mask = chatglm_attention_mask(
            attention_mask, past_length, length, implementation, inputs_embeds.dtype, inputs_embeds.device
        )
        if position_ids is None:
            if attention_mask is not None:
                position_ids = position_ids_from_mask(attention_mask, length)
            else:
                position_ids = torch.arange(past_length, past_length + length, device=inputs_embeds.device)[None]
        if position_ids.shape[-1] != length or position_ids.dim() != 2:
            raise ValueError(f"position_ids must have shape [b, {length}] (one position per new token), got {tuple(position_ids.shape)}")
        position_ids = position_ids.to(inputs_embeds.device).expand(batch, length)
        rotary = rotary_for_pairs(*self.rotary_pos_emb(position_ids, inputs_embeds.dtype))  # 2 x (B, T, 1, rot)


        hidden_states, all_hidden_states, all_attentions = self.encoder(
            inputs_embeds, rotary, mask, implementation, cache, output_attentions, output_hidden_states
        )
        cache = cache if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states, hidden_states=all_hidden_states, attentions=all_attentions, **{_CACHE_FIELD: cache}
        )


class ChatGLM3ForConditionalGeneration(ChatGLM3PreTrainedModel, GenerationMixin):
    """ChatGLM2/3-6B with its output layer: forward with loss, `generate`, `chat` and `stream_chat`."""

    def __init__(self, config: ChatGLM3Config):
        super().__init__(config)
        self.transformer = ChatGLM3Model(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.embedding.word_embeddings

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.embedding.word_embeddings = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.transformer.output_layer

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.transformer.output_layer = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits and, given `labels`, the mean next-token cross-entropy (labels shifted inside, -100 ignored).

        The inputs are `ChatGLM3Model.forward`'s; `logits_to_keep=n` computes only the last n logits (a tensor:
        those positions).
        """
        if cache is None:
            cache = kwargs.pop("past_key_values", None)
        return_dict = self.config.return_dict if return_dict is None else return_dict
        output_attentions = bool(self.config.output_attentions if output_attentions is None else output_attentions)
        output_hidden_states = bool(self.config.output_hidden_states if output_hidden_states is None else output_hidden_states)
        outputs = self.transformer(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=False,
        )
        # (hidden states, cache, all hidden states, attentions), the ones not asked for (None) left out
        hidden_states, rest = outputs[0], list(outputs[1:])
        all_attentions = rest.pop() if output_attentions else None
        all_hidden_states = rest.pop() if output_hidden_states else None
        cache = rest.pop() if rest else None
        if isinstance(logits_to_keep, int):
            if logits_to_keep:
                hidden_states = hidden_states[:, -logits_to_keep:, :]
        else:
            hidden_states = hidden_states[:, logits_to_keep, :]
        logits = self.transformer.output_layer(hidden_states)  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.padded_vocab_size, **kwargs)
        if not return_dict:
            return tuple(v for v in (loss, logits, cache, all_hidden_states, all_attentions) if v is not None)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=all_hidden_states, attentions=all_attentions, **{_CACHE_FIELD: cache}
        )

    def _prepare_attention_mask_for_generation(self, inputs_tensor: torch.Tensor, *args, **kwargs) -> torch.LongTensor:
        # Bare input_ids mean "every token is real" (what the forward does); transformers would otherwise guess a
        # padding mask from the pad id 0, which is also <unk>. Pass the tokenizer's attention_mask for padding.
        return torch.ones(inputs_tensor.shape[:2], dtype=torch.long, device=inputs_tensor.device)

    # -- THUDM's chat API, written once for every model in instructglm.infer.chat -------------------------------------

    def chat(self, tokenizer, query, history=None, role="user", **kwargs):
        """One chat turn, as THUDM's `model.chat` (role is its fourth argument); see `instructglm.infer.chat.chat`."""
        from instructglm.infer.chat import chat

        return chat(self, tokenizer, query, history, role, **kwargs)

    def stream_chat(self, tokenizer, query, history=None, role="user", **kwargs):
        """Like `chat`, yielding the answer as it grows; see `instructglm.infer.chat.stream_chat`."""
        from instructglm.infer.chat import stream_chat

        return stream_chat(self, tokenizer, query, history, role, **kwargs)


__all__ = [
    "ChatGLM3ForConditionalGeneration",
    "ChatGLM3Model",
    "ChatGLM3PreTrainedModel",
    "GLMBlock",
    "causal_rows_allowed",
    "chatglm_attention_mask",
    "position_ids_from_mask",
]
