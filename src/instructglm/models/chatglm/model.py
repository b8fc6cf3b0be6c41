"""ChatGLM-6B (GLM v1), native on current transformers.

Reference: THUDM's `modeling_chatglm.py` for `THUDM/chatglm-6b` (final 2023 version) and the GLM paper
(Du et al. 2022, "GLM: General Language Model Pretraining with Autoregressive Blank Infilling").
Parameter names are THUDM's, so their checkpoints and LoRA adapters load unchanged.

The architecture, top to bottom: word embeddings; `num_layers` GLM blocks, each
    x = LN1(h);  h = alpha * x + Attention(x);  y = LN2(h);  out = alpha * y + MLP(y),  alpha = sqrt(2 * layers)
(note: the residual carries the *normalised* input, scaled; alpha is sqrt(56) whatever the depth, see
`RESIDUAL_SCALE_LAYERS`); a final LayerNorm; `lm_head` without bias.
Attention has one fused `query_key_value` projection whose output is per head [q | k | v]; each head is split
in two halves rotated by two position streams (the 2-D positions: position, block position); scores are
scaled like THUDM's fp16-safe recipe (q / (sqrt(d) * (layer + 1)), then * (layer + 1) in fp32). The
prefix-LM mask lets the prompt (everything before `<sop>`) attend bidirectionally and is causal from `<sop>` on.

Deliberate differences from the reference:
- Tensors are [batch, seq, ...] instead of THUDM's [seq, batch, ...]; the KV cache is a transformers `Cache`.
- The prefix mask and 2-D positions are built once, in `prefix_lm_inputs`, from `input_ids` and the standard
  2-D padding mask (left or right padding, positions counted from each row's first real token); THUDM's own
  4-D bool mask with [b, 2, s] position ids is accepted as well.
- Rotary cos/sin are computed in float32 from THUDM's fp16-rounded inverse frequencies and then cast to the
  activation dtype; THUDM computed them in fp16 (bf16 positions above 256 were not even exact there).
- An `sdpa` attention path (torch's fused kernels) beside the `eager` one that mirrors the reference math.
- `from_pretrained` raises on missing or mis-shaped tensors instead of re-initialising them.
"""

from __future__ import annotations

import math
import queue
import re
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.generation import GenerationMixin
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.utils import logging

from instructglm.data.templates import chatglm as chatglm_prompt
from instructglm.models.chatglm.config import ChatGLMConfig

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------------------
# Prefix-LM mask and 2-D positions
# ---------------------------------------------------------------------------------------------------------------------


def prefix_lm_positions(
    input_ids: torch.LongTensor, padding_mask: torch.Tensor | None, config: ChatGLMConfig
) -> tuple[torch.LongTensor, torch.LongTensor]:
    """ChatGLM's 2-D position ids of whole sequences, and where each row's causal part starts.

    Args:
        input_ids: [b, T] token ids (prompt, `[gMASK] <sop>`, then any generated tokens).
        padding_mask: [b, T], 1/True on real tokens (the tokenizer's `attention_mask`), or None (all real).

    Returns:
        position_ids [b, 2, T]: row 0 counts from the row's first real token, and every token from `<sop>` on
        takes the position of the mask token (`[gMASK]`, else `[MASK]`); row 1 (block position) is 0 on the
        context and 1, 2, 3... from `<sop>` on. Padding gets 0 in both, like THUDM's tokenizer.
        context_length [b]: index of `<sop>` (`bos_token_id`); a row without one is all context.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    real = torch.ones_like(input_ids, dtype=torch.bool) if padding_mask is None else padding_mask.bool()
    index = torch.arange(length, device=device).expand(batch, length)  # (B, T)
    no_hit = torch.full((batch,), length, device=device)

    def first(hits: torch.Tensor) -> torch.LongTensor:  # first True index per row, `length` if none
        return torch.where(hits.any(dim=1), hits.int().argmax(dim=1), no_hit)

    first_real = first(real)
    first_real = torch.where(first_real == length, 0, first_real)
    context_length = first(real & (input_ids == config.bos_token_id))
    in_context = index < context_length[:, None]
    gmask_at = first(real & in_context & (input_ids == config.gmask_token_id))
    mask_at = first(real & in_context & (input_ids == config.mask_token_id))
    # THUDM prefers [gMASK] when a prompt holds both
    mask_position = torch.where(gmask_at < length, gmask_at, mask_at)

    position = index - first_real[:, None]
    has_mask_token = (mask_position < length)[:, None]
    position = torch.where(~in_context & has_mask_token, (mask_position - first_real)[:, None], position)
    block_position = torch.where(in_context, 0, index - context_length[:, None] + 1)
    position_ids = torch.stack((position, block_position), dim=1) * real[:, None, :]
    return position_ids, context_length


def prefix_lm_inputs(
    input_ids: torch.LongTensor | None,
    attention_mask: torch.Tensor | None,
    position_ids: torch.LongTensor | None,
    past_length: int,
    query_length: int,
    config: ChatGLMConfig,
) -> tuple[torch.BoolTensor | None, torch.LongTensor]:
    """The attention mask (True = masked, [b, 1, q, past + q]) and 2-D positions ([b, 2, q]) of one forward.

    The single place where ChatGLM's masks and positions come from. Accepted `attention_mask` forms:
    - None: every token is real (THUDM's and transformers' convention for bare `input_ids`);
    - [b, past + q] padding mask (1 = real), left or right padding: the prefix-LM mask is built from it;
    - [b, 1, q or more, past + q] bool, True = masked: THUDM's own mask, used as given (last q rows).
    With a cache (`past_length > 0`) the new tokens come after `<sop>`, so they attend causally to every real
    token; their positions cannot be found from the new tokens alone and must be passed
    (`prepare_inputs_for_generation` computes them from the whole sequence).
    """
    if attention_mask is not None and attention_mask.dim() == 4:
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
        masked = attention_mask[:, :, -query_length:, :]
        padding_mask = None
    elif attention_mask is not None and attention_mask.dim() == 2:
        if attention_mask.shape[-1] != past_length + query_length:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} columns but there are {past_length} cached and "
                f"{query_length} new tokens; pass the padding mask of the whole sequence so far"
            )
        masked, padding_mask = None, attention_mask.bool()
    elif attention_mask is None:
        masked, padding_mask = None, None
    else:
        raise ValueError(f"attention_mask must be 2-D [b, s] or THUDM's 4-D bool mask, got shape {tuple(attention_mask.shape)}")

    if past_length == 0:
        if input_ids is None:
            if position_ids is None or (masked is None and query_length > 1):
                raise ValueError(
                    "with inputs_embeds instead of input_ids pass position_ids [b, 2, s] and THUDM's 4-D bool "
                    "attention_mask: the prefix mask is found from the <sop> token id"
                )
            context_length = None
        else:
            computed, context_length = prefix_lm_positions(input_ids, padding_mask, config)
            position_ids = computed if position_ids is None else position_ids
    elif position_ids is None:
        raise ValueError(
            "position_ids [b, 2, s] are required when continuing from past_key_values (the new tokens' positions "
            "depend on the whole sequence); generate() computes them, see prefix_lm_positions"
        )
    else:
        context_length = None

    if masked is None and (padding_mask is not None or (past_length == 0 and query_length > 1)):
        device = position_ids.device
        key_index = torch.arange(past_length + query_length, device=device)  # (T,)
        query_index = past_length + torch.arange(query_length, device=device)  # (q,)
        allowed = key_index[None, None, :] <= query_index[None, :, None]  # (1, q, T) causal
        if context_length is not None:
            allowed = allowed | (key_index[None, :] < context_length[:, None])[:, None, :]  # (b, q, T)
        if padding_mask is not None:
            # pad keys are never seen; pad queries see nothing (uniform softmax, as THUDM's tokenizer mask)
            allowed = allowed & padding_mask[:, None, :] & padding_mask[:, query_index][:, :, None]
        masked = ~allowed[:, None, :, :]  # (b|1, 1, q, T)
    return masked, position_ids


# ---------------------------------------------------------------------------------------------------------------------
# Rotary embedding
# ---------------------------------------------------------------------------------------------------------------------


class ChatGLMRotaryEmbedding(nn.Module):
    """cos/sin of the 2-D positions for one half of a head (rotary dim = head_dim / 2), shared by all layers.

    THUDM stored `inv_freq` per layer in fp16 (`rotary_emb.inv_freq` in checkpoints, ignored on load there and
    here); the same fp16-rounded values are recomputed here, so no buffer needs loading or device placement.
    """

    def __init__(self, config: ChatGLMConfig, base: float = 10000.0):
        super().__init__()
        self.dim = config.head_dim // 2
        self.base = base

    @torch.no_grad()
    def forward(self, position_ids: torch.LongTensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = position_ids.device
        exponent = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        inv_freq = (1.0 / self.base**exponent).half().float()  # (dim/2,), THUDM's fp16 values
        freqs = position_ids.float()[..., None] * inv_freq  # (B, 2, T, dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, 2, T, dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_2d_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first half of every head by the positions, the second half by the block positions.

    x: (B, T, nh, hs); cos, sin: (B, 2, T, hs/2).
    """
    halves = x.chunk(2, dim=-1)
    rotated = []
    for half, c, s in zip(halves, cos.unbind(1), sin.unbind(1)):
        c, s = c[:, :, None, :], s[:, :, None, :]  # (B, T, 1, hs/2), broadcast over heads
        rotated.append(half * c + rotate_half(half) * s)
    return torch.cat(rotated, dim=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------------------


def eager_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, masked: torch.Tensor | None, layer_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """THUDM's attention math. query (B, nh, q, hs), key/value (B, nh, T, hs), masked (B|1, 1, q, T) True = masked.

    The query is divided by (layer_id + 1) before the product and the scores multiplied back in fp32, which keeps
    fp16 scores in range; masked scores are -10000 before that multiplication, as in the reference.
    """
    coeff = float(layer_id + 1)
    query = query / (math.sqrt(query.shape[-1]) * coeff)
    scores = torch.matmul(query, key.transpose(-1, -2))  # (B, nh, q, T)
    if masked is not None:
        scores = scores.masked_fill(masked, -10000.0)
    probs = torch.softmax(scores.float() * coeff, dim=-1).to(value.dtype)
    return torch.matmul(probs, value), probs


def sdpa_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, additive_mask: torch.Tensor | None, layer_id: int
) -> tuple[torch.Tensor, None]:
    """torch's fused attention with the prefix-LM mask as an additive bias (0 or the dtype's minimum)."""
    output = F.scaled_dot_product_attention(query, key, value, attn_mask=additive_mask, scale=1.0 / math.sqrt(query.shape[-1]))
    return output, None


ATTENTION_FUNCTIONS = {"eager": eager_attention, "sdpa": sdpa_attention}


class SelfAttention(nn.Module):
    def __init__(self, config: ChatGLMConfig, layer_id: int):
        super().__init__()
        self.config = config
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self,
        hidden_states: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        past_key_values: Cache | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length, _ = hidden_states.shape
        mixed = self.query_key_value(hidden_states).view(batch, length, self.num_heads, 3 * self.head_dim)
        query, key, value = mixed.chunk(3, dim=-1)  # each (B, T, nh, hs): q/k/v interleaved per head
        cos, sin = rotary
        query = apply_2d_rotary(query, cos, sin).transpose(1, 2)  # (B, nh, T, hs)
        key = apply_2d_rotary(key, cos, sin).transpose(1, 2)
        value = value.transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_id)

        implementation = self.config._attn_implementation or "eager"
        if output_attentions and implementation != "eager":
            implementation = "eager"  # only the eager path materialises the probabilities
            attention_mask = None if attention_mask is None else attention_mask < 0
        if implementation not in ATTENTION_FUNCTIONS:
            raise ValueError(
                f"attn_implementation={implementation!r} is not available for ChatGLM-6B (its prefix-LM mask needs "
                f"an explicit mask); use one of {sorted(ATTENTION_FUNCTIONS)}"
            )
        context, probs = ATTENTION_FUNCTIONS[implementation](query, key, value, attention_mask, self.layer_id)
        context = context.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.dense(context), probs


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
        past_key_values: Cache | None = None,
        use_cache: bool = False,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attention_input = self.input_layernorm(hidden_states)
        attention_output, probs = self.attention(
            attention_input, rotary, attention_mask, past_key_values if use_cache else None, output_attentions
        )
        hidden_states = attention_input * self.alpha + attention_output
        mlp_input = self.post_attention_layernorm(hidden_states)
        return mlp_input * self.alpha + self.mlp(mlp_input), probs


# ---------------------------------------------------------------------------------------------------------------------
# Pretrained base and models
# ---------------------------------------------------------------------------------------------------------------------


class ChatGLMPreTrainedModel(PreTrainedModel):
    config_class = ChatGLMConfig
    base_model_prefix = "transformer"
    supports_gradient_checkpointing = True
    _no_split_modules = ["GLMBlock"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    # THUDM saved a per-layer inv_freq buffer that its own loader ignored; it is recomputed here
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config: ChatGLMConfig, *args, **kwargs):
        if problems := config.unsupported_options():
            raise ValueError("This ChatGLM-6B config uses options InstructGLM does not support: " + "; ".join(problems))
        super().__init__(config, *args, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader (every layout, dtype, device_map), made strict about the checkpoint's tensors.

        transformers only warns about missing tensors and re-initialises them randomly; a ChatGLM checkpoint with
        missing or mis-shaped tensors is a wrong or broken download, so this raises naming them.
        `ignore_mismatched_sizes=True` restores transformers' lenient behaviour for both.
        """
        if kwargs.get("weights_only") is False:
            raise ValueError("weights_only=False is refused: checkpoints are read with torch.load(weights_only=True)")
        lenient = kwargs.get("ignore_mismatched_sizes", False)
        want_info = kwargs.pop("output_loading_info", False)
        kwargs["ignore_mismatched_sizes"] = True  # so the mismatches come back to us instead of a bare RuntimeError
        model, info = super().from_pretrained(pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs)
        problems = []
        if info["missing_keys"]:
            problems.append("missing tensors: " + ", ".join(sorted(info["missing_keys"])))
        if info["mismatched_keys"]:
            shapes = [f"{name} (checkpoint {tuple(old)}, model {tuple(new)})" for name, old, new in info["mismatched_keys"]]
            problems.append("tensors with the wrong shape: " + ", ".join(sorted(shapes)))
        if problems and not lenient:
            raise ValueError(
                f"{pretrained_model_name_or_path} does not hold a complete {cls.__name__} checkpoint for its "
                f"config.json: " + "; ".join(problems) + ". Re-download the checkpoint or fix config.json "
                "(pass ignore_mismatched_sizes=True to load anyway with those tensors randomly initialised)."
            )
        if hasattr(model, "_tie_like_thudm"):
            model._tie_like_thudm()
        return (model, info) if want_info else model


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
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast | tuple:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training and use_cache:
            use_cache = False  # recomputation would write the cache twice
        output_attentions = bool(output_attentions)
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        return_dict = self.config.return_dict if return_dict is None else return_dict

        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, length, _ = inputs_embeds.shape
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=self.config)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0

        masked, position_ids = prefix_lm_inputs(input_ids, attention_mask, position_ids, past_length, length, self.config)
        if position_ids.shape[-2:] != (2, length):
            raise ValueError(f"position_ids must have shape [b, 2, {length}] (position, block position), got {tuple(position_ids.shape)}")
        rotary = self.rotary_emb(position_ids.to(inputs_embeds.device), inputs_embeds.dtype)
        if masked is not None:
            masked = masked.to(inputs_embeds.device)
            if (self.config._attn_implementation or "eager") != "eager":
                # additive bias for SDPA; fully masked (pad) rows stay finite and become uniform, as in eager
                masked = torch.zeros(masked.shape, dtype=inputs_embeds.dtype, device=masked.device).masked_fill(
                    masked, torch.finfo(inputs_embeds.dtype).min
                )

        hidden_states = inputs_embeds
        all_hidden_states = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        for layer in self.layers:
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
            hidden_states, probs = layer(
                hidden_states,
                rotary,
                attention_mask=masked,
                past_key_values=past_key_values,
                use_cache=use_cache,
                output_attentions=output_attentions,
            )
            if output_attentions:
                all_attentions += (probs,)
        hidden_states = self.final_layernorm(hidden_states)
        if output_hidden_states:
            all_hidden_states += (hidden_states,)

        cache = past_key_values if use_cache else None
        if not return_dict:
            return tuple(v for v in (hidden_states, cache, all_hidden_states, all_attentions) if v is not None)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            past_key_values=cache,
            hidden_states=all_hidden_states,
            attentions=all_attentions,
        )


class InvalidScoreLogitsProcessor(LogitsProcessor):
    """THUDM's guard for fp16 overflow in chat(): non-finite scores become a forced token 5 instead of a crash."""

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not torch.isfinite(scores).all():
            scores = torch.zeros_like(scores)
            scores[..., 5] = 5e4
        return scores


class _TokenQueue(BaseStreamer):
    """Hands the tokens `generate` produces (in a worker thread) to `stream_chat`."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.skip_prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self.skip_prompt:  # the first call carries the prompt
            self.skip_prompt = False
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class ChatGLMForConditionalGeneration(ChatGLMPreTrainedModel, GenerationMixin):
    """ChatGLM-6B with its language-model head: forward with loss, `generate`, `chat` and `stream_chat`."""

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
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast | tuple:
        """Logits and, given `labels`, the mean next-token cross-entropy (labels shifted inside, -100 ignored).

        `attention_mask`: the tokenizer's 2-D padding mask, THUDM's 4-D bool mask (then also pass its
        [b, 2, s] `position_ids`), or None (every token real). `logits_to_keep=n` computes only the last n logits.
        """
        return_dict = self.config.return_dict if return_dict is None else return_dict
        outputs = self.transformer(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_attentions=output_attentions,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:, :]
        logits = self.lm_head(hidden_states)  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        if not return_dict:
            rest = tuple(v for v in (outputs.past_key_values, outputs.hidden_states, outputs.attentions) if v is not None)
            return ((loss,) if loss is not None else ()) + (logits,) + rest
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
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

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool = True,
        **kwargs,
    ) -> dict:
        """The not-yet-cached tokens with their 2-D positions, computed from the whole sequence so far.

        New tokens after `<sop>` keep the mask token's position and count up the block position, which only the
        whole sequence tells; the position ids transformers tracks in `kwargs` (1-D counters) are ignored.
        """
        if inputs_embeds is not None:
            raise ValueError("ChatGLM-6B generates from input_ids (its masks and positions come from the token ids)")
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids, _ = prefix_lm_positions(input_ids, attention_mask, self.config)
        model_inputs = {
            "input_ids": input_ids[:, past_length:],
            "position_ids": position_ids[..., past_length:],
            "attention_mask": attention_mask,
            "past_key_values": past_key_values,
            "use_cache": use_cache,
        }
        for key in ("output_attentions", "output_hidden_states", "logits_to_keep"):
            if key in kwargs:
                model_inputs[key] = kwargs[key]
        return model_inputs

    # -- THUDM's chat API ---------------------------------------------------------------------------------------------

    @staticmethod
    def build_prompt(query: str, history: list[tuple[str, str]] | None = None) -> str:
        """ChatGLM-6B's round prompt: the query alone, or "[Round i]\\n问：q\\n答：a\\n"... then the open round.

        The same text as the `chatglm` template that fine-tuning data is rendered with, so it is built there.
        """
        return chatglm_prompt(query, "", history or ())

    @staticmethod
    def process_response(response: str) -> str:
        """THUDM's clean-up: strip, date placeholder, full-width punctuation next to CJK characters."""
        response = response.strip().replace("[[训练时间]]", "2023年")
        for ascii_mark, full_width in ((",", "，"), ("!", "！"), (":", "："), (";", "；"), (r"\?", "？")):
            response = re.sub(rf"([\u4e00-\u9fff]){ascii_mark}", rf"\1{full_width}", response)
            response = re.sub(rf"{ascii_mark}([\u4e00-\u9fff])", rf"{full_width}\1", response)
        return response

    def _chat_generation(self, tokenizer, query, history, logits_processor, **gen_kwargs):
        history = list(history or [])
        processors = LogitsProcessorList(logits_processor or [])
        processors.append(InvalidScoreLogitsProcessor())
        inputs = tokenizer([self.build_prompt(query, history)], return_tensors="pt").to(self.device)
        gen_kwargs.setdefault("eos_token_id", self.config.eos_token_id)
        gen_kwargs.setdefault("pad_token_id", self.config.pad_token_id)
        return history, inputs, dict(logits_processor=processors, **inputs, **gen_kwargs)

    def _decode_response(self, tokenizer, token_ids: list[int]) -> str:
        stop = {self.config.eos_token_id, self.config.pad_token_id}
        kept = [t for t in token_ids if t not in stop]
        return self.process_response(tokenizer.decode(kept))

    @torch.no_grad()
    def chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        num_beams: int = 1,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> tuple[str, list[tuple[str, str]]]:
        """One chat turn as THUDM's API: returns (response, history + [(query, response)])."""
        history, inputs, gen_kwargs = self._chat_generation(
            tokenizer, query, history, logits_processor,
            max_length=max_length, num_beams=num_beams, do_sample=do_sample, top_p=top_p, temperature=temperature, **kwargs,
        )
        outputs = self.generate(**gen_kwargs)
        response = self._decode_response(tokenizer, outputs[0, inputs["input_ids"].shape[1]:].tolist())
        return response, history + [(query, response)]

    @torch.no_grad()
    def stream_chat(
        self,
        tokenizer,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        do_sample: bool = True,
        top_p: float = 0.7,
        temperature: float = 0.95,
        logits_processor: LogitsProcessorList | None = None,
        **kwargs,
    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """Like `chat`, yielding (response so far, history with it) after every generated token."""
        history, inputs, gen_kwargs = self._chat_generation(
            tokenizer, query, history, logits_processor,
            max_length=max_length, do_sample=do_sample, top_p=top_p, temperature=temperature, **kwargs,
        )
        streamer = _TokenQueue()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                with torch.no_grad():
                    self.generate(**gen_kwargs, streamer=streamer)
            except BaseException as error:  # re-raised in the caller's thread below
                failure.append(error)
                streamer.end()

        worker = threading.Thread(target=run, daemon=True)
        worker.start()
        generated: list[int] = []
        while (tokens := streamer.queue.get()) is not None:
            generated.extend(tokens)
            response = self._decode_response(tokenizer, generated)
            yield response, history + [(query, response)]
        worker.join()
        if failure:
            raise failure[0]


__all__ = [
    "ChatGLMForConditionalGeneration",
    "ChatGLMModel",
    "ChatGLMPreTrainedModel",
    "GLMBlock",
    "prefix_lm_inputs",
    "prefix_lm_positions",
]
