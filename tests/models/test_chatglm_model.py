"""Parity of the native ChatGLM-6B with THUDM's original code (the goldens), and its behaviour beyond them.

Every golden is checked for each checkpoint layout and both attention paths, loaded through
AutoModelForCausalLM in float32. The random-model tests cover what the goldens cannot: other sizes, longer
prompts, [MASK] prompts, padding on either side, the KV cache, the attention backends' one signature and mask
form, deprecations on the installed transformers, gradient checkpointing, LoRA, and THUDM's chat() API (which
lives in instructglm.infer.chat).
"""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from tests.models.chatglm_helpers import (
    ATTENTION,
    EOP,
    GMASK,
    LAYOUTS,
    MASK,
    PAD,
    SOP,
    cache_of,
    fixture_model,
    goldens,
    left_pad,
    random_chatglm,
    random_prompt,
)

CASES = [(layout, attn) for layout in LAYOUTS for attn in ATTENTION]
CASE_IDS = [f"{layout}-{attn}" for layout, attn in CASES]


@pytest.fixture(params=CASES, ids=CASE_IDS)
def parity(request, chatglm6b_fixtures):
    layout, attn = request.param
    meta, tensors = goldens(chatglm6b_fixtures)
    model = fixture_model(chatglm6b_fixtures, layout, attn)
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"
    assert model.config._attn_implementation == attn
    return model, meta, tensors


def _fresh(chatglm6b_fixtures, layout, attn):
    """A separately loaded model for tests that change its state (gradients, training mode, adapters)."""
    from transformers import AutoModelForCausalLM

    import instructglm  # noqa: F401  (registers ChatGLM with the Auto classes)

    return AutoModelForCausalLM.from_pretrained(
        str(chatglm6b_fixtures / layout), attn_implementation=attn, dtype=torch.float32
    )


# -- forward ----------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_logits_with_thudm_mask_and_positions(parity):
    model, _, g = parity
    logits = model(
        input_ids=g["forward.input_ids"], attention_mask=g["forward.attention_mask"], position_ids=g["forward.position_ids"]
    ).logits
    valid = g["forward.valid"]
    assert_close(logits[valid], g["forward.logits"][valid], atol=1e-4, rtol=0)


@torch.no_grad()
def test_logits_with_input_ids_only(parity):
    model, _, g = parity
    # pads are real tokens here (THUDM's default path): every position is compared
    assert_close(model(input_ids=g["forward.input_ids"]).logits, g["forward_default.logits"], atol=1e-4, rtol=0)
    for i in range(3):
        logits = model(input_ids=g[f"forward_single.{i}.input_ids"]).logits
        assert_close(logits, g[f"forward_single.{i}.logits"], atol=1e-4, rtol=0)


@torch.no_grad()
def test_logits_with_2d_padding_mask(parity):
    model, _, g = parity
    ids, valid = g["forward.input_ids"], g["forward.valid"]
    logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits
    assert_close(logits[valid], g["forward.logits"][valid], atol=1e-4, rtol=0)


def test_built_mask_and_positions_equal_thudm_tokenizer(chatglm6b_fixtures):
    from instructglm.models.chatglm.model import prefix_lm_inputs

    _, g = goldens(chatglm6b_fixtures)
    ids, valid = g["forward.input_ids"], g["forward.valid"]
    config = fixture_model(chatglm6b_fixtures, "tiny", "eager").config
    # the built mask is transformers' form (True = may attend), THUDM's is True = masked: one is the other's negation
    allowed, positions = prefix_lm_inputs(ids, valid.long(), None, 0, ids.shape[1], config)
    assert allowed.dtype == torch.bool
    assert torch.equal(positions, g["forward.position_ids"])
    assert torch.equal(~allowed.expand_as(g["forward.attention_mask"]), g["forward.attention_mask"])
    allowed, positions = prefix_lm_inputs(ids, None, None, 0, ids.shape[1], config)
    assert torch.equal(positions, g["forward_default.position_ids"])
    assert torch.equal(~allowed.expand_as(g["forward_default.attention_mask"]), g["forward_default.attention_mask"])
    # THUDM's own 4-D mask passes through in the same form
    allowed, _ = prefix_lm_inputs(ids, g["forward.attention_mask"], g["forward.position_ids"], 0, ids.shape[1], config)
    assert torch.equal(allowed, ~g["forward.attention_mask"])


# -- training ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout,attn", CASES, ids=CASE_IDS)
def test_loss_and_gradients(chatglm6b_fixtures, layout, attn):
    meta, g = goldens(chatglm6b_fixtures)
    model = _fresh(chatglm6b_fixtures, layout, attn)
    out = model(input_ids=g["train.input_ids"], labels=g["train.labels"])
    assert_close(out.loss, g["train.loss"][0], atol=1e-5, rtol=0)
    assert_close(out.logits, g["train.logits"], atol=1e-4, rtol=0)
    out.loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name, norm in meta["train_grad_norms_query_key_value"].items():
        assert_close(grads[name].norm().item(), norm, rtol=1e-4, atol=0)
        assert_close(grads[name], g[f"train.grad.{name}"], rtol=1e-4, atol=1e-6)
    for name, norm in meta["train_grad_norms_all_params"].items():
        assert_close(grads[name].norm().item(), norm, rtol=1e-4, atol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("attn", ATTENTION)
def test_loss_with_right_padded_2d_mask(chatglm6b_fixtures, attn):
    _, g = goldens(chatglm6b_fixtures)
    model = fixture_model(chatglm6b_fixtures, "tiny", attn)
    ids = g["train.input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=g["train.labels"]).loss
    assert_close(loss, g["train.loss"][0], atol=1e-5, rtol=0)


# -- generation -------------------------------------------------------------------------------------------------------


def _greedy(model, input_ids, **kwargs):
    return model.generate(input_ids=input_ids, max_new_tokens=20, do_sample=False, **kwargs)


def test_generate_batched_with_padding_mask(parity):
    model, _, g = parity
    ids = g["forward.input_ids"]
    out = _greedy(model, ids, attention_mask=(ids != PAD).long(), output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, g["generate.sequences"])
    assert_close(torch.stack(out.scores, dim=1), g["generate.scores"], atol=1e-4, rtol=0)


def test_generate_with_thudm_4d_mask(parity):
    model, _, g = parity
    out = _greedy(model, g["forward.input_ids"], attention_mask=g["forward.attention_mask"], position_ids=g["forward.position_ids"])
    assert torch.equal(out, g["generate.sequences"])


def test_generate_default_and_single(parity):
    model, _, g = parity
    out = _greedy(model, g["forward.input_ids"], output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, g["generate_default.sequences"])
    assert_close(torch.stack(out.scores, dim=1), g["generate_default.scores"], atol=1e-4, rtol=0)
    out = _greedy(model, g["generate_single.input_ids"], output_scores=True, return_dict_in_generate=True)
    assert torch.equal(out.sequences, g["generate_single.sequences"])
    assert_close(torch.stack(out.scores, dim=1), g["generate_single.scores"], atol=1e-4, rtol=0)


def test_generate_each_row_alone_equals_batch(parity):
    model, meta, g = parity
    batch = g["generate.sequences"]
    for i, prompt in enumerate(meta["prompts_unpadded"]):
        alone = _greedy(model, torch.tensor([prompt]))[0]
        start = batch.shape[1] - 20 - len(prompt)
        assert alone.tolist() == batch[i, start : start + len(alone)].tolist()
        # a row that stopped early was continued with padding in the batch
        assert set(batch[i, start + len(alone) :].tolist()) <= {PAD}


# -- beyond the goldens: random models of other sizes, longer prompts ---------------------------------------------------


SIZES = [
    dict(hidden_size=64, num_layers=2, num_attention_heads=4, inner_hidden_size=256),
    dict(hidden_size=96, num_layers=3, num_attention_heads=3, inner_hidden_size=384),
]


def _mixed_batch(seed: int):
    generator = torch.Generator().manual_seed(seed)
    rows = [random_prompt(generator, 5), random_prompt(generator, 60), random_prompt(generator, 23, mask_token=MASK)]
    return rows, *left_pad(rows)


@pytest.mark.parametrize("sizes", SIZES, ids=["h64", "h96-3layers"])
@torch.no_grad()
def test_sdpa_matches_eager_and_rows_match_alone(sizes):
    rows, ids, mask = _mixed_batch(1)
    eager = random_chatglm(7, "eager", **sizes)
    sdpa = random_chatglm(7, "sdpa", **sizes)
    batched = eager(input_ids=ids, attention_mask=mask).logits
    assert_close(sdpa(input_ids=ids, attention_mask=mask).logits[mask.bool()], batched[mask.bool()], atol=1e-4, rtol=0)
    for i, row in enumerate(rows):
        alone = eager(input_ids=torch.tensor([row])).logits[0]
        assert_close(batched[i, -len(row) :], alone, atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ATTENTION)
def test_cached_generation_equals_uncached(attn):
    rows, ids, mask = _mixed_batch(2)
    model = random_chatglm(3, attn, hidden_size=96, num_layers=3, num_attention_heads=3, inner_hidden_size=384)
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=EOP, pad_token_id=PAD)
    cached = model.generate(input_ids=ids, use_cache=True, **kwargs)
    uncached = model.generate(input_ids=ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    for i, row in enumerate(rows):
        alone = model.generate(input_ids=torch.tensor([row]), use_cache=True, **{**kwargs, "attention_mask": None})[0]
        start = ids.shape[1] - len(row)
        assert alone.tolist() == cached[i, start : start + len(alone)].tolist()


@torch.no_grad()
def test_incremental_forward_matches_full_forward():
    """Feeding generated tokens one at a time through the cache gives the full forward's logits."""
    from instructglm.models.chatglm.model import prefix_lm_positions

    model = random_chatglm(4, "eager")
    generator = torch.Generator().manual_seed(4)
    prompt = random_prompt(generator, 9)
    answer = torch.randint(5, 999, (6,), generator=generator).tolist()
    full_ids = torch.tensor([prompt + answer])
    full = model(input_ids=full_ids).logits
    positions, _ = prefix_lm_positions(full_ids, None, model.config)
    out = model(input_ids=full_ids[:, : len(prompt)], use_cache=True)
    cache = cache_of(out)
    for t in range(len(prompt), full_ids.shape[1]):
        step = model(input_ids=full_ids[:, t : t + 1], position_ids=positions[..., t : t + 1], cache=cache)
        assert_close(step.logits[0, -1], full[0, t], atol=1e-4, rtol=0)


@pytest.mark.parametrize("attn", ATTENTION)
@torch.no_grad()
def test_several_tokens_after_a_cache_attend_causally(attn):
    """A multi-token continuation of a cache, without attention_mask, is causal among the new tokens
    (it used to be bidirectional there), under both the current (`cache`) and the older argument name."""
    from instructglm.models.chatglm.model import prefix_lm_positions

    model = random_chatglm(6, attn)
    generator = torch.Generator().manual_seed(6)
    prompt = random_prompt(generator, 7)
    full_ids = torch.tensor([prompt + torch.randint(5, 999, (5,), generator=generator).tolist()])
    full = model(input_ids=full_ids).logits
    positions, _ = prefix_lm_positions(full_ids, None, model.config)
    start = len(prompt)
    for name in ("cache", "past_key_values"):
        cache = cache_of(model(input_ids=full_ids[:, :start], use_cache=True))
        rest = model(input_ids=full_ids[:, start:], position_ids=positions[..., start:], **{name: cache}).logits
        assert_close(rest[0], full[0, start:], atol=1e-4, rtol=0)
        assert cache.get_seq_length() == full_ids.shape[1]


def test_prefix_lm_positions_by_hand():
    from instructglm.models.chatglm.model import prefix_lm_positions

    config = random_chatglm().config
    ids = torch.tensor(
        [
            [PAD, PAD, 11, 12, GMASK, SOP, 21, 22],  # left padding
            [11, 12, 13, MASK, SOP, 21, PAD, PAD],  # right padding, [MASK]
            [11, 12, 13, 14, 15, 16, 17, 18],  # no <sop>: all context
        ]
    )
    mask = (ids != PAD).long()
    positions, sop_index = prefix_lm_positions(ids, mask, config)
    # each token's row <sop> index (8 = none: all context); padding is a row of its own, without <sop>
    assert sop_index.tolist() == [[8, 8, 5, 5, 5, 5, 5, 5], [4, 4, 4, 4, 4, 4, 8, 8], [8] * 8]
    assert positions[0].tolist() == [[0, 0, 0, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 1, 2, 3]]
    assert positions[1].tolist() == [[0, 1, 2, 3, 3, 3, 0, 0], [0, 0, 0, 0, 1, 2, 0, 0]]
    assert positions[2].tolist() == [list(range(8)), [0] * 8]


@pytest.mark.parametrize("attn", ATTENTION)
def test_padded_training_rows_have_their_alone_loss(attn):
    model = random_chatglm(5, attn)
    generator = torch.Generator().manual_seed(5)
    rows = [random_prompt(generator, n) + torch.randint(5, 999, (m,), generator=generator).tolist() + [EOP] for n, m in ((4, 9), (17, 3))]
    width = max(map(len, rows))
    ids = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    labels = torch.tensor([[-100] * r.index(SOP) + r[r.index(SOP) :] + [-100] * (width - len(r)) for r in rows])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits
        for i, row in enumerate(rows):
            alone = model(input_ids=torch.tensor([row])).logits[0]
            assert_close(logits[i, : len(row)], alone, atol=1e-4, rtol=0)
    # fully masked padding query rows (THUDM: uniform under eager; sdpa: zeros) keep loss and gradients finite
    loss = model(input_ids=ids, attention_mask=(ids != PAD).long(), labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# -- gradient checkpointing, LoRA ---------------------------------------------------------------------------------------


def _enable_checkpointing(model, use_reentrant: bool) -> None:
    # transformers 5.23 renamed it (the old name warns); the GPU image's 5.17 only has the old one
    options = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)


def test_gradient_checkpointing_gives_same_loss_and_gradients(chatglm6b_fixtures):
    _, g = goldens(chatglm6b_fixtures)
    results = []
    for checkpointing in (False, True):
        model = _fresh(chatglm6b_fixtures, "tiny", "sdpa")
        if checkpointing:
            _enable_checkpointing(model, use_reentrant=False)
            assert all(block.gradient_checkpointing for block in model.transformer.layers)
        model.train()
        loss = model(input_ids=g["train.input_ids"], labels=g["train.labels"]).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    assert_close(results[1][0], results[0][0], atol=1e-6, rtol=0)
    for with_ckpt, without in zip(results[1][1], results[0][1]):
        assert_close(with_ckpt, without, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ATTENTION)
# peft 0.21 reads `model.is_gradient_checkpointing`, which transformers >= 5.2x deprecates: peft's call, not ours
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_on_query_key_value_trains(chatglm6b_fixtures, attn):
    from peft import LoraConfig, get_peft_model

    _, g = goldens(chatglm6b_fixtures)
    model = get_peft_model(
        _fresh(chatglm6b_fixtures, "tiny", attn),
        LoraConfig(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["query_key_value"], task_type="CAUSAL_LM"),
    )
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and "query_key_value" in name for name in trainable)
    _enable_checkpointing(model, use_reentrant=True)
    model.enable_input_require_grads()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = dict(input_ids=g["train.input_ids"], attention_mask=(g["train.input_ids"] != PAD).long(), labels=g["train.labels"])
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses



# -- attention backends: one signature, one mask form, chosen once ------------------------------------------------------


@torch.no_grad()
def test_every_backend_takes_one_signature_and_mask_form():
    """eager and transformers' sdpa are called alike, `(module, q, k, v, mask, scaling=, dropout=)` with the bool mask
    (True = may attend) built once at model level, and agree; a fully masked (padding) query row stays finite."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from instructglm.models.chatglm.model import eager_attention_forward, prefix_lm_inputs

    model = random_chatglm(8, "eager")
    attention = model.transformer.layers[1].attention
    _, ids, padding = _mixed_batch(8)
    mask, _ = prefix_lm_inputs(ids, padding, None, 0, ids.shape[1], model.config)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, ids.shape[1], ids.shape[1])
    generator = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(3, 4, ids.shape[1], 16, generator=generator) for _ in range(3))
    call = dict(scaling=attention.scaling, dropout=0.0)
    eager, weights = eager_attention_forward(attention, q, k, v, mask, **call)
    sdpa, no_weights = ALL_ATTENTION_FUNCTIONS["sdpa"](attention, q, k, v, mask, **call)
    assert eager.shape == sdpa.shape == (3, ids.shape[1], 4, 16) and no_weights is None
    real = padding.bool()
    assert_close(sdpa[real], eager[real], atol=1e-5, rtol=0)
    assert torch.isfinite(sdpa).all() and torch.isfinite(eager).all()
    # THUDM's -10000 fill: a padding query row is uniform over every key under eager
    pad_row = weights[0, :, 0]  # row 0 is left-padded
    assert not real[0, 0] and torch.allclose(pad_row, torch.full_like(pad_row, 1 / ids.shape[1]))


def test_eager_attention_is_thudm_math():
    """Layer 2's eager attention by hand, THUDM's way: q / (sqrt(hs) * 3), masked scores = -10000, then * 3 in fp32."""
    from instructglm.models.chatglm.model import eager_attention_forward

    attention = random_chatglm(9, "eager", num_layers=3).transformer.layers[2].attention
    generator = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 4, 6, 16, generator=generator) for _ in range(3))
    masked = torch.rand(2, 1, 6, 6, generator=generator) < 0.4  # THUDM's polarity
    scores = torch.matmul(q / (4.0 * 3), k.transpose(-1, -2)).masked_fill(masked, -10000.0)
    expected = torch.matmul(torch.softmax(scores * 3, dim=-1), v).transpose(1, 2)
    output, _ = eager_attention_forward(attention, q, k, v, ~masked, scaling=attention.scaling)
    assert torch.equal(output, expected)


@torch.no_grad()
def test_attention_weights_come_from_eager_only():
    model = random_chatglm(10, "eager")
    _, ids, mask = _mixed_batch(10)
    out = model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert len(out.attentions) == 2 and out.attentions[0].shape == (3, 4, ids.shape[1], ids.shape[1])
    assert_close(out.attentions[1].sum(-1), torch.ones(3, 4, ids.shape[1]), atol=1e-5, rtol=0)
    assert len(out.hidden_states) == 3  # embeddings, after block 0, final (normed) output
    assert torch.equal(out.hidden_states[0], model.transformer.word_embeddings(ids))
    sdpa = random_chatglm(10, "sdpa")
    out = sdpa(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    assert out.attentions in (None, ()) and len(out.hidden_states) == 3  # transformers' sdpa has no weights


@pytest.mark.parametrize("attn", ATTENTION)
def test_generate_feeds_one_new_token_per_step_through_the_cache(attn):
    """generate() hands the model its cache: after the prompt, every forward sees one new token (on transformers
    5.24 the cache used to be dropped, so every step re-ran the whole sequence)."""
    model = random_chatglm(11, attn)
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"].shape[1]), with_kwargs=True)
    prompt = torch.tensor([random_prompt(torch.Generator().manual_seed(11), 9)])
    model.generate(input_ids=prompt, max_new_tokens=5, min_new_tokens=5, do_sample=False, pad_token_id=PAD)
    assert seen == [prompt.shape[1], 1, 1, 1, 1]


# -- the installed transformers: nothing our code calls is deprecated -----------------------------------------------------


def test_no_deprecation_from_model_code(chatglm6b_fixtures):
    """Loading, forward (with either cache argument name), training and every generation mode, with deprecation
    warnings as errors and transformers' own deprecation log lines (`logger.warning_once`, which -W cannot turn
    into errors, e.g. "`past_key_values`/`cache_params` are deprecated") collected: none may come."""
    import logging
    import warnings

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from instructglm.models.chatglm.model import prefix_lm_positions

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    library_logger = logging.getLogger("transformers")
    library_logger.addHandler(handler)
    transformers_logging.warning_once.cache_clear()  # messages already logged once in this process log again
    _, g = goldens(chatglm6b_fixtures)
    ids = g["forward.input_ids"]
    mask = (ids != PAD).long()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            for attn in ATTENTION:
                model = AutoModelForCausalLM.from_pretrained(chatglm6b_fixtures / "tiny", attn_implementation=attn, dtype=torch.float32)
                with torch.no_grad():
                    out = model(input_ids=ids, attention_mask=mask, use_cache=True, output_hidden_states=True)
                    positions, _ = prefix_lm_positions(torch.cat([ids, ids[:, -1:]], 1), None, model.config)
                    for name in ("cache", "past_key_values"):
                        step_cache = cache_of(model(input_ids=ids, use_cache=True))
                        model(input_ids=ids[:, -1:], position_ids=positions[..., -1:], **{name: step_cache})
                    for options in (dict(do_sample=False), dict(do_sample=True, top_p=0.7), dict(num_beams=2, do_sample=False)):
                        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, **options)
                    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                   return_dict_in_generate=True, output_scores=True)
                model.train()
                model(input_ids=g["train.input_ids"], attention_mask=(g["train.input_ids"] != PAD).long(),
                      labels=g["train.labels"]).loss.backward()
                assert cache_of(out).get_seq_length() == ids.shape[1]
    finally:
        library_logger.removeHandler(handler)
    assert not [r for r in records if "deprecat" in r.lower()], records


# -- THUDM's chat API: thin delegations to instructglm.infer.chat ------------------------------------------------------------


def test_model_file_holds_no_chat_or_data_code():
    """The model does not import the data package (a model -> data arrow) nor carry prompt, sampling or threads."""
    import subprocess
    import sys

    from instructglm.models.chatglm import model as model_module

    probe = "import sys, instructglm.models.chatglm.model; print(sorted(m for m in sys.modules if m.startswith('instructglm.data')))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", loaded
    for gone in ("build_prompt", "process_response", "InvalidScoreLogitsProcessor", "_TokenQueue", "_chat_generation"):
        assert not hasattr(model_module, gone) and not hasattr(model_module.ChatGLMForConditionalGeneration, gone), gone


def test_chat_and_stream_chat_delegate_to_infer(monkeypatch):
    import instructglm.infer.chat as infer_chat

    calls = []
    monkeypatch.setattr(infer_chat, "chat", lambda *args, **kwargs: calls.append(("chat", args, kwargs)) or "reply", raising=False)
    monkeypatch.setattr(infer_chat, "stream_chat", lambda *args, **kwargs: calls.append(("stream", args, kwargs)) or iter(()), raising=False)
    model, tokenizer = random_chatglm(), object()
    assert model.chat(tokenizer, "q", [("a", "b")], top_p=0.5) == "reply"
    assert list(model.stream_chat(tokenizer, "q")) == []
    assert calls == [("chat", (model, tokenizer, "q", [("a", "b")]), {"top_p": 0.5}), ("stream", (model, tokenizer, "q", None), {})]


def _infer_chat():
    """instructglm.infer.chat once it holds THUDM's chat API (written on the infer branch); else these tests skip."""
    import instructglm.infer.chat as infer_chat

    missing = [name for name in ("chat", "stream_chat", "process_response") if not hasattr(infer_chat, name)]
    if missing:
        pytest.skip(f"instructglm.infer.chat has no {', '.join(missing)} yet (THUDM's chat API moves there on the infer branch)")
    return infer_chat


def test_round_prompt_and_response_post_processing():
    from instructglm.data.templates import chatglm as round_prompt

    # model.chat prompts with the `chatglm` template that fine-tuning data is rendered with
    assert round_prompt("你好", "", ()) == "你好"
    assert round_prompt("q3", "", [("q1", "a1"), ("q2", "a2")]) == (
        "[Round 0]\n问：q1\n答：a1\n[Round 1]\n问：q2\n答：a2\n[Round 2]\n问：q3\n答："
    )
    process_response = _infer_chat().process_response
    assert process_response("  我在[[训练时间]]训练,好吗?  ok, fine ") == "我在2023年训练，好吗？  ok, fine"


@pytest.fixture(scope="module")
def chat_model():
    """A tiny random model over the real ChatGLM-6B vocabulary, for chat() with the real tokenizer."""
    from instructglm.models.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

    torch.manual_seed(0)
    config = ChatGLMConfig(hidden_size=32, num_layers=1, num_attention_heads=2, inner_hidden_size=64, initializer_range=0.5)
    return ChatGLMForConditionalGeneration(config).eval()


def test_chat_and_stream_chat(chat_model, chatglm6b_tokenizer):
    infer_chat = _infer_chat()
    greedy = dict(do_sample=False, max_length=None, max_new_tokens=8)
    history = [("你好", "你好！")]
    response, new_history = chat_model.chat(chatglm6b_tokenizer, "讲个笑话", history=history, **greedy)
    assert new_history == history + [("讲个笑话", response)]
    # the same generation by hand: round prompt, greedy, decode, THUDM's post-processing
    prompt = "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：讲个笑话\n答："
    inputs = chatglm6b_tokenizer([prompt], return_tensors="pt")
    out = chat_model.generate(**inputs, do_sample=False, max_new_tokens=8)
    tokens = [t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t not in (130005, 3)]
    assert response == infer_chat.process_response(chatglm6b_tokenizer.decode(tokens))

    streamed = list(chat_model.stream_chat(chatglm6b_tokenizer, "讲个笑话", history=history, **greedy))
    assert 1 <= len(streamed) <= 8
    assert streamed[-1] == (response, new_history)
    assert all(h[:-1] == history and h[-1][0] == "讲个笑话" for _, h in streamed)


def test_generate_on_a_tokenizer_batch_equals_each_row_alone(chat_model, chatglm6b_tokenizer):
    texts = ["你好", "Tell me a joke about a cat, please", "1+1="]
    batch = chatglm6b_tokenizer(texts, padding=True, return_tensors="pt")
    assert batch["attention_mask"].dim() == 2 and (batch["attention_mask"] == 0).any()  # left padding
    out = chat_model.generate(**batch, do_sample=False, max_new_tokens=6)
    width = batch["input_ids"].shape[1]
    for i, text in enumerate(texts):
        alone = chatglm6b_tokenizer([text], return_tensors="pt")
        single = chat_model.generate(**alone, do_sample=False, max_new_tokens=6)[0, alone["input_ids"].shape[1] :]
        assert out[i, width : width + len(single)].tolist() == single.tolist()


def test_stream_chat_reraises_generation_errors(chat_model, chatglm6b_tokenizer):
    _infer_chat()
    with pytest.raises(ValueError):
        list(chat_model.stream_chat(chatglm6b_tokenizer, "你好", do_sample=False, max_new_tokens=-3))


# -- FlexAttention (the GPU path), checked here with torch's unfused FlexAttention ----------------------------------------


@pytest.fixture
def uncompiled_flex(monkeypatch):
    """transformers' `flex_attention_forward` as on a GPU, but calling torch's unfused FlexAttention.

    transformers always `torch.compile`s FlexAttention (about 20 s per shape on this CPU); the unfused kernel
    computes the same attention from the same `BlockMask`, so the mask, the call and the rule are the GPU path's.
    """
    import warnings

    import transformers.integrations.flex_attention as integration
    from torch.nn.attention.flex_attention import flex_attention

    def unfused(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(integration, "compile_friendly_flex_attention", unfused)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")
        yield


def _right_padded_and_packed(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) of the same rows left-padded, right-padded and packed two to a sequence."""
    from instructglm.train.packing import PackedCollator

    rows, left_ids, left_mask = _mixed_batch(seed)
    right = [r + [PAD] * (left_ids.shape[1] - len(r)) for r in rows]
    packed = PackedCollator(pad_token_id=PAD, attention="segment_ids")(
        [{"rows": [{"input_ids": rows[0], "seq_len": 1}, {"input_ids": rows[2], "seq_len": 1}]}, {"input_ids": rows[1], "seq_len": 1}]
    )
    return {
        "left": (left_ids, left_mask),
        "right": (torch.tensor(right), (torch.tensor(right) != PAD).long()),
        "packed": (packed["input_ids"], packed["attention_mask"]),
    }


@pytest.mark.parametrize("batching", ["left", "right", "packed"])
@torch.no_grad()
def test_flex_attention_block_mask_and_logits_match_sdpa(uncompiled_flex, batching):
    from torch.nn.attention.flex_attention import BlockMask, create_mask

    from instructglm.models.chatglm.model import prefix_lm_inputs

    ids, mask = _right_padded_and_packed(12)[batching]
    sdpa, flex = random_chatglm(12, "sdpa"), random_chatglm(12, "flex_attention")
    dense, positions = prefix_lm_inputs(ids, mask, None, 0, ids.shape[1], sdpa.config)
    block_mask, flex_positions = prefix_lm_inputs(ids, mask, None, 0, ids.shape[1], sdpa.config, "flex_attention")
    assert isinstance(block_mask, BlockMask) and torch.equal(flex_positions, positions)
    assert torch.equal(create_mask(block_mask.mask_mod, ids.shape[0], 1, ids.shape[1], ids.shape[1]), dense)
    real = mask.bool()
    expected = sdpa(input_ids=ids, attention_mask=mask).logits
    got = flex(input_ids=ids, attention_mask=mask).logits
    assert_close(got[real], expected[real], atol=1e-5, rtol=0)
    assert torch.isfinite(got).all()


@torch.no_grad()
def test_flex_attention_loads_reproduces_goldens_and_generates(chatglm6b_fixtures, uncompiled_flex):
    from transformers import AutoModelForCausalLM

    _, g = goldens(chatglm6b_fixtures)
    model = AutoModelForCausalLM.from_pretrained(
        str(chatglm6b_fixtures / "tiny"), attn_implementation="flex_attention", dtype=torch.float32
    ).eval()
    assert model.config._attn_implementation == "flex_attention"
    ids, valid = g["forward.input_ids"], g["forward.valid"]
    logits = model(input_ids=ids, attention_mask=(ids != PAD).long()).logits
    assert_close(logits[valid], g["forward.logits"][valid], atol=1e-4, rtol=0)
    # THUDM's own 4-D mask becomes a BlockMask too
    logits = model(input_ids=ids, attention_mask=g["forward.attention_mask"], position_ids=g["forward.position_ids"]).logits
    assert_close(logits[valid], g["forward.logits"][valid], atol=1e-4, rtol=0)
    # through the KV cache: a BlockMask over the cached keys at every step
    generated = model.generate(input_ids=ids, attention_mask=(ids != PAD).long(), max_new_tokens=20, do_sample=False)
    assert torch.equal(generated, g["generate.sequences"])


def test_flex_attention_refuses_to_train_on_the_cpu():
    from instructglm.errors import BadValue

    model = random_chatglm(13, "flex_attention").train()
    with pytest.raises(BadValue, match="cannot train on the CPU.*'sdpa'"):
        model(input_ids=torch.tensor([random_prompt(torch.Generator().manual_seed(13), 5)]))
