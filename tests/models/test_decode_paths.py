"""The decode-step shortcuts of both ChatGLM families give exactly what the general paths give.

- generate's 2-D positions of generated tokens (`prefix_lm_continuation`) equal numbering the whole sequence;
- `return_dict=False` is `ModelOutput.to_tuple()` of the same forward, without building one;
- the rotary frequencies, computed once into a non-persistent buffer, survive meta-device loading, `to_empty`
  and dtype casts, and are never saved;
- after a cache, an all-real 2-D mask is the same as no mask, and bad masks still raise.
"""

from __future__ import annotations

import pytest
import torch

from instructglm.models.chatglm.model import (
    ChatGLMForConditionalGeneration,
    continued_positions,
    prefix_lm_continuation,
    prefix_lm_positions,
)
from tests.models.chatglm_helpers import GMASK, MASK, PAD, SOP, cache_of, random_chatglm
from tests.models.test_chatglm3_model import random_model as random_chatglm3


def _vocab(model) -> int | None:
    """ChatGLM2/3's vocabulary size; None for ChatGLM-6B."""
    return getattr(model.config, "padded_vocab_size", None)


def _rows(generator, lengths, marks, vocab: int | None = None):
    """Random context ids, then `[mark] <sop>` (mark None: no mask token, just <sop>; "nosop": neither).

    With a ChatGLM2/3 `vocab` the rows are random ids below it alone."""
    rows = []
    for length, mark in zip(lengths, marks):
        row = torch.randint(5, vocab or 999, (length,), generator=generator).tolist()
        if vocab:
            mark = "nosop"
        rows.append(row if mark == "nosop" else row + ([mark] if mark else []) + [SOP])
    return rows


def _pad(rows, side):
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        span = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, span], mask[i, span] = torch.tensor(row), 1
    return ids, mask


# -- generate's positions -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("side", ["left", "right"])
def test_continued_positions_equal_numbering_the_whole_sequence(side):
    model = random_chatglm(31)
    generator = torch.Generator().manual_seed(31)
    ids, mask = _pad(_rows(generator, (4, 9, 6, 7), (GMASK, MASK, None, GMASK)), side)
    rows = prefix_lm_continuation(ids, mask, model.config)
    assert rows is not None and rows[:, 2].tolist() == [0, 0, 1, 0]  # the row without a mask token keeps counting
    # append generated tokens (real, after every row's <sop>) and number the whole sequence
    more = torch.randint(5, 999, (4, 5), generator=generator)
    longer, longer_mask = torch.cat([ids, more], 1), torch.cat([mask, torch.ones_like(more)], 1)
    expected, _ = prefix_lm_positions(longer, longer_mask, model.config)
    start = ids.shape[1]
    assert torch.equal(continued_positions(rows, start, start + 5), expected[..., start:])
    # the prompt's own last token (the <sop> of left-padded rows) follows the rule too
    if side == "left":
        assert torch.equal(continued_positions(rows, start - 1, start), expected[..., start - 1 : start])


def test_no_continuation_without_sop_or_with_packed_rows():
    model = random_chatglm(32)
    generator = torch.Generator().manual_seed(32)
    ids, mask = _pad(_rows(generator, (5, 6), (GMASK, "nosop")), "left")
    assert prefix_lm_continuation(ids, mask, model.config) is None
    packed = torch.tensor([[1, 1, 1, 2, 2, 2]])
    assert prefix_lm_continuation(torch.tensor([[5, GMASK, SOP, 6, GMASK, SOP]]), packed, model.config) is None


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_generate_with_continued_positions_equals_renumbering_every_step(attn, monkeypatch):
    """Greedy scores, beams and samples are bit-identical with the positions renumbered at every step (the
    general path, which rows without <sop> still take)."""
    model = random_chatglm(33, attn)
    generator = torch.Generator().manual_seed(33)
    prompts = {
        "mixed": _pad(_rows(generator, (4, 9, 6), (GMASK, MASK, None)), "left"),
        "without <sop>": _pad(_rows(generator, (5, 3), ("nosop", "nosop")), "left"),
    }
    calls = [
        dict(do_sample=False, output_scores=True, return_dict_in_generate=True),
        dict(do_sample=False, num_beams=3, num_return_sequences=2),
        dict(do_sample=True, top_k=0, num_return_sequences=2),
    ]

    def run():
        results = []
        for ids, mask in prompts.values():
            for options in calls:
                torch.manual_seed(0)
                out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, min_new_tokens=4, pad_token_id=PAD, **options)
                results.append(torch.stack(out.scores) if hasattr(out, "scores") else out)
        return results

    fast = run()
    monkeypatch.setattr(ChatGLMForConditionalGeneration, "_prepare_position_ids_for_generation", lambda self, ids, kwargs: None)
    general = run()
    assert all(torch.equal(a, b) for a, b in zip(fast, general))


# -- return_dict=False ----------------------------------------------------------------------------------------------


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or type(a) is type(b)  # caches: one object each run


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
@pytest.mark.parametrize("extras", [{}, {"output_hidden_states": True}, {"output_attentions": True, "output_hidden_states": True}])
def test_tuple_output_is_the_model_outputs_to_tuple(family, extras):
    model = random_chatglm(34, "eager") if family == "chatglm" else random_chatglm3(34, "eager")
    generator = torch.Generator().manual_seed(34)
    ids, mask = _pad(_rows(generator, (4, 7), (GMASK, GMASK), _vocab(model)), "left")
    labels = ids.masked_fill(mask == 0, -100)
    for options in ({}, {"labels": labels}, {"use_cache": False}):
        with torch.no_grad():
            as_dict = model(input_ids=ids, attention_mask=mask, **options, **extras)
            as_tuple = model(input_ids=ids, attention_mask=mask, return_dict=False, **options, **extras)
        assert isinstance(as_tuple, tuple) and _same(as_tuple, as_dict.to_tuple())
    inner = model.transformer(input_ids=ids, attention_mask=mask, return_dict=False)
    assert isinstance(inner, tuple) and torch.equal(inner[0], model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state)


# -- the rotary buffer ------------------------------------------------------------------------------------------------


def _rotary(model):
    if isinstance(model, ChatGLMForConditionalGeneration):
        module = model.transformer.rotary_emb
        return module.inv_freq, module.compute_inv_freq()
    module = model.transformer.rotary_pos_emb
    return module.theta, module.compute_theta(torch.float32, "cpu")


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_rotary_buffer_is_filled_after_meta_loading_casts_and_to_empty(family, tmp_path):
    from transformers import AutoModelForCausalLM

    import instructglm  # noqa: F401  (registers ChatGLM with the Auto classes)

    model = random_chatglm(35) if family == "chatglm" else random_chatglm3(35)
    model.save_pretrained(tmp_path)
    assert not [key for key in model.state_dict() if "inv_freq" in key or "theta" in key]
    for dtype in (torch.float32, torch.bfloat16):
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)  # built on the meta device
        buffer, expected = _rotary(loaded)
        assert buffer.dtype == torch.float32 and torch.equal(buffer, expected)
    loaded.to(torch.float16)
    buffer, expected = _rotary(loaded)
    assert buffer.dtype == torch.float32 and torch.equal(buffer, expected)
    with torch.device("meta"):
        empty = type(model)(model.config)
    assert _rotary(empty)[0].is_meta
    empty.to_empty(device="cpu")
    buffer, expected = _rotary(empty)
    assert torch.equal(buffer, expected)


# -- masks after a cache ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_all_real_cached_mask_is_no_mask_and_bad_masks_raise(family):
    model = random_chatglm(36, "eager") if family == "chatglm" else random_chatglm3(36, "eager")
    generator = torch.Generator().manual_seed(36)
    ids = torch.tensor(_rows(generator, (6,), (GMASK,), _vocab(model)))

    def next_logits(**options):
        cache = cache_of(model(input_ids=ids[:, :-1], use_cache=True))
        if family == "chatglm":
            options["position_ids"] = prefix_lm_positions(ids, None, model.config)[0][..., -1:]
        return model(input_ids=ids[:, -1:], cache=cache, **options).logits

    with torch.no_grad():
        assert torch.equal(next_logits(attention_mask=torch.ones_like(ids)), next_logits())
        assert torch.equal(next_logits(attention_mask=torch.ones_like(ids, dtype=torch.bool)), next_logits())
        packed = torch.tensor([[1, 1, 2, 2, 2, 2, 2, 2]])[:, : ids.shape[1]]
        with pytest.raises(ValueError, match="cannot continue a KV cache"):
            next_logits(attention_mask=packed)
        with pytest.raises(ValueError, match="segment ids"):
            next_logits(attention_mask=-torch.ones_like(ids))
