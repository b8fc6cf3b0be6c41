"""Shared helpers of the ChatGLM-6B model tests: the THUDM goldens and tiny random models.

The goldens (`fixtures/chatglm6b/tiny/goldens.{json,safetensors}`) were written by THUDM's own code; their
`readme` field describes every tensor. Random models here are for properties the goldens cannot cover
(other sizes, longer prompts, [MASK] prompts, cache vs no cache).
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import torch

LAYOUTS = ("tiny", "tiny_sharded", "tiny_safetensors")
ATTENTION = ("eager", "sdpa")

# special ids of the tiny fixtures (goldens.json `readme`)
MASK, GMASK, SOP, EOP, PAD = 1000, 1001, 1002, 1003, 3


@lru_cache(maxsize=None)
def goldens(fixtures_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(goldens.json as a dict, goldens.safetensors as tensors)."""
    from safetensors.torch import load_file

    tiny = Path(fixtures_dir) / "tiny"
    return json.loads((tiny / "goldens.json").read_text()), load_file(tiny / "goldens.safetensors")


@lru_cache(maxsize=None)
def _load(model_dir: str, attn_implementation: str):
    import instructglm  # noqa: F401  (registers ChatGLM with the Auto classes)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation=attn_implementation, dtype=torch.float32)


def fixture_model(fixtures_dir: Path, layout: str, attn_implementation: str):
    """A fixture checkpoint loaded through AutoModelForCausalLM (cached per layout/attention), in eval mode."""
    return _load(str(Path(fixtures_dir) / layout), attn_implementation).eval()


def random_chatglm(seed: int = 0, attn_implementation: str = "eager", **overrides):
    """A randomly initialised native ChatGLM (float32) with the tiny fixtures' special ids."""
    from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

    sizes = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256)
    sizes.update(overrides)
    config = ChatGLMConfig(
        **sizes,
        max_sequence_length=512,
        mask_token_id=MASK,
        gmask_token_id=GMASK,
        bos_token_id=SOP,
        eos_token_id=EOP,
        pad_token_id=PAD,
        tie_word_embeddings=False,
        initializer_range=0.2,  # large weights make positional or masking mistakes visible in the logits
    )
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    return ChatGLMForConditionalGeneration(config).eval()


def cache_of(output):
    """The KV cache of a model output, under the field this transformers has (`cache` from 5.24, else
    `past_key_values`); reading the old name on 5.24 would log its deprecation."""
    from instructglm.models.chatglm.model import CACHE_FIELD

    return getattr(output, CACHE_FIELD)


def random_prompt(generator: torch.Generator, length: int, mask_token: int = GMASK) -> list[int]:
    """`length` random context ids then `[mask_token] <sop>`, like the fixtures' prompts."""
    return torch.randint(5, 999, (length,), generator=generator).tolist() + [mask_token, SOP]


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, 2-D padding mask) of `rows` left-padded with PAD, as the tokenizer returns them."""
    width = max(map(len, rows))
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask
