"""instructglm.infer.engine: continuous batching gives every request its one-at-a-time answer.

Every test named `..._each_family` runs on each entry of `tests/infer/checkpoints.FAMILIES`
(the native ChatGLM-6B, ChatGLM2-6B and ChatGLM3-6B, transformers' GLM-4 and a Llama, each with a
LoRA adapter); a new family is one entry there.
"""

from __future__ import annotations

import logging
import random
import shutil

import pytest
import torch

from instructglm.errors import BadValue
from instructglm.infer.engine import (
    BatchEngine,
    ChatGLM6BRule,
    GenerationRequest,
    QueueFull,
    encode_prompt,
    generate_requests,
)
from tests.infer.helpers import reference_completion

TOKENS = 12
# Different lengths, so rows join a batch whose cache is wider, narrower or as wide as their prompt.
PROMPTS = [
    "What is two plus three?",
    "hi",
    "The quick brown fox jumps over the lazy dog, then the dog jumps over the fox.",
    "你好，世界。一二三",
    "Reverse the word cat: ",
    "say hello",
]


@pytest.fixture(scope="module")
def each_family(family):
    from instructglm.infer.load import load_model

    name, base, adapter = family
    model, tokenizer, _ = load_model(str(base), adapter=str(adapter), device="cpu")
    references = [reference_completion(model, tokenizer, p, TOKENS) for p in PROMPTS]
    assert len({r.text for r in references}) > 1, "the references must differ for the comparison to mean anything"
    return model, tokenizer, references


def greedy(tokenizer, prompt, tokens=TOKENS, **options):
    return GenerationRequest(prompt_ids=encode_prompt(tokenizer, prompt), max_new_tokens=tokens, **options)


# The static layout with 5 rows also decodes 3 rows in the bucket of 4 (one blank row).
@pytest.mark.parametrize("decode, rows", [("dynamic", 3), ("static", 3), ("static", 5)])
def test_rows_joining_at_different_steps_get_the_one_at_a_time_answers_each_family(each_family, decode, rows):
    """Requests arrive while others decode (a full batch makes some wait); all answers equal `generate` alone."""
    model, tokenizer, references = each_family
    engine = BatchEngine(model, tokenizer, max_batch_size=rows, decode=decode)
    handles, widest = [], 0
    arrivals = {0: [0], 2: [1, 2], 3: [3], 5: [4, 5]}  # step -> prompts submitted before it
    for step in range(200):
        for i in arrivals.get(step, []):
            handles.append((i, engine.submit(greedy(tokenizer, PROMPTS[i]))))
        busy = engine.step()
        widest = max(widest, engine.running)
        if not busy and step > max(arrivals):
            break
    assert widest == rows  # rows really shared forward passes
    answers = {i: h.completion for i, h in handles}
    assert [answers[i] for i in range(len(PROMPTS))] == references
    # one forward per step for the whole batch: far fewer than one per token
    assert engine.steps < sum(r.completion_tokens for r in references)


def test_generate_requests_returns_input_order_each_family(each_family):
    model, tokenizer, references = each_family
    handles = generate_requests(BatchEngine(model, tokenizer, max_batch_size=4), [greedy(tokenizer, p) for p in PROMPTS])
    assert [h.completion for h in handles] == references
    assert all(len(h.token_ids) == r.completion_tokens for h, r in zip(handles, references))
    assert any(h.token_ids for h in handles)


def test_chatglm_positions_advance_like_the_whole_sequence_numbering():
    """Token by token, ChatGLM6BRule gives the position `prefix_lm_positions` computes from the whole
    sequence, also when <sop>, [gMASK] or [MASK] come late, twice, or never."""
    from instructglm.models.chatglm.config import ChatGLMConfig
    from instructglm.models.chatglm.model import prefix_lm_positions

    config = ChatGLMConfig(vocab_size=20, hidden_size=16, num_layers=1, num_attention_heads=2,
                           bos_token_id=5, gmask_token_id=6, mask_token_id=7, eos_token_id=8, pad_token_id=3)
    rule = ChatGLM6BRule(config)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.choice([5, 6, 7, 9, 10, 11, 12]) for _ in range(rng.randint(1, 14))]
        split = rng.randint(1, len(ids))
        expected, _ = prefix_lm_positions(torch.tensor([ids]), None, config)
        state = rule.start(ids[:split])
        for index in range(split, len(ids)):
            position, state = rule.advance(state, ids[index])
            assert list(position) == expected[0, :, index].tolist(), (ids, split, index)


def test_a_cancelled_row_is_freed_before_the_next_forward_each_family(each_family):
    model, tokenizer, references = each_family
    engine = BatchEngine(model, tokenizer, max_batch_size=2)
    first, second = engine.submit(greedy(tokenizer, PROMPTS[0], 50)), engine.submit(greedy(tokenizer, PROMPTS[1]))
    waiting = engine.submit(greedy(tokenizer, PROMPTS[2]))
    engine.step()
    assert engine.running == 2 and engine.waiting == 1
    first.cancel()
    engine.step()  # the cancelled row leaves first, so the waiting request takes its row in this step
    assert first.completion.finish_reason == "cancelled" and first.completion.completion_tokens == 2
    assert engine.running == 2 and engine.waiting == 0
    never = engine.submit(greedy(tokenizer, PROMPTS[3]))
    never.cancel()
    engine.run_until_idle()
    assert never.completion.finish_reason == "cancelled" and never.completion.completion_tokens == 0
    assert second.completion == references[1] and waiting.completion == references[2]


def test_a_failing_request_does_not_disturb_its_batch_each_family(each_family):
    model, tokenizer, references = each_family
    engine = BatchEngine(model, tokenizer, max_batch_size=4, max_seq_len=None)
    vocab = model.get_input_embeddings().weight.shape[0]
    good = [engine.submit(greedy(tokenizer, p)) for p in PROMPTS[:2]]
    engine.step()
    bad_prompt = engine.submit(GenerationRequest(prompt_ids=[vocab + 5], max_new_tokens=4))  # no such token: its forward fails

    def broken_sink(event):
        if event.kind == "tokens" and len(event.token_ids):
            raise RuntimeError("this client's connection broke")

    bad_sink = engine.submit(greedy(tokenizer, PROMPTS[2], stream=True), broken_sink)
    good += [engine.submit(greedy(tokenizer, p)) for p in PROMPTS[3:5]]
    engine.run_until_idle()
    assert isinstance(bad_prompt.error, IndexError) and bad_prompt.completion is None
    assert isinstance(bad_sink.error, RuntimeError) and bad_sink.completion is None
    assert [h.completion for h in good] == references[:2] + references[3:5]


def test_seeded_sampling_is_reproducible_whatever_runs_beside_it_each_family(each_family):
    model, tokenizer, _ = each_family

    def sampled(seed):
        return greedy(tokenizer, PROMPTS[0], 16, do_sample=True, temperature=1.0, top_p=0.9, seed=seed)

    alone = generate_requests(BatchEngine(model, tokenizer), [sampled(7)])[0].token_ids
    crowd = [greedy(tokenizer, p) for p in PROMPTS[1:4]] + [sampled(7), sampled(8), sampled(7)]
    together = generate_requests(BatchEngine(model, tokenizer, max_batch_size=4), crowd)
    assert together[3].token_ids == alone and together[5].token_ids == alone
    assert together[4].token_ids != alone  # another seed, another answer


def test_queue_and_context_bounds(each_family):
    model, tokenizer, _ = each_family
    engine = BatchEngine(model, tokenizer, max_batch_size=2, max_queue=1, max_seq_len=40)
    for _ in range(3):  # two for the free rows, one waiting
        engine.submit(greedy(tokenizer, "hi"))
    with pytest.raises(QueueFull, match="1 requests are already waiting .--max_queue 1"):
        engine.submit(greedy(tokenizer, "hi"))
    engine.step()  # two rows running, one waiting: still full
    assert engine.running == 2 and engine.waiting == 1
    with pytest.raises(QueueFull):
        engine.submit(greedy(tokenizer, "hi"))
    with pytest.raises(BadValue, match="context"):
        engine.submit(greedy(tokenizer, "hi", tokens=40))
    engine.run_until_idle()
    assert engine.waiting == 0 and engine.running == 0


def test_streamed_text_adds_up_and_stops_at_a_stop_string(each_family):
    model, tokenizer, references = each_family
    full = references[2].text
    engine = BatchEngine(model, tokenizer, max_batch_size=4)
    pieces: list[str] = []
    streamed = engine.submit(greedy(tokenizer, PROMPTS[2], stream=True), lambda e: pieces.append(e.text) if e.kind == "tokens" else None)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    stopped = engine.submit(greedy(tokenizer, PROMPTS[2], stop_strings=(stop,)))
    engine.run_until_idle()
    assert "".join(pieces) == full == streamed.completion.text
    assert stopped.completion.text == full[: full.find(stop)] and stopped.completion.finish_reason == "stop"
    assert stopped.completion.completion_tokens < references[2].completion_tokens


def test_a_failed_compile_falls_back_to_the_dynamic_cache_with_one_log_line(each_family, monkeypatch, caplog):
    """Where torch.compile cannot build the static decode step, the engine says so once and answers the same."""
    model, tokenizer, references = each_family

    def no_compiler(*args, **kwargs):
        def compiled(*args, **kwargs):
            raise RuntimeError("no compiler here\nmore detail")

        return compiled

    monkeypatch.setattr(torch, "compile", no_compiler)
    engine = BatchEngine(model, tokenizer, max_batch_size=4, decode="compiled")
    with caplog.at_level(logging.WARNING, logger="instructglm.infer.engine"):
        handles = generate_requests(engine, [greedy(tokenizer, p) for p in PROMPTS])
    assert engine.mode == "dynamic"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "no compiler here" in warnings[0] and "more detail" not in warnings[0]
    assert [h.completion for h in handles] == references


def test_a_server_thread_serves_submissions_from_other_threads(each_family):
    import threading

    model, tokenizer, references = each_family
    engine = BatchEngine(model, tokenizer, max_batch_size=4)
    engine.start()
    try:
        results = {}

        def ask(i):
            handle = engine.submit(greedy(tokenizer, PROMPTS[i]))
            assert handle.finished.wait(60)
            results[i] = handle.completion

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        engine.stop()
    assert [results[i] for i in range(len(PROMPTS))] == references


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None, reason="torch.compile on the CPU needs a C++ compiler")
def test_the_compiled_static_decode_step_gives_the_one_at_a_time_answers_each_family(each_family):
    """The decode step `torch.compile`d over the static slots (CUDA graphs on a GPU; inductor alone here)
    traces through the model and gives the same greedy answers, in batch buckets with blank rows."""
    model, tokenizer, references = each_family
    engine = BatchEngine(model, tokenizer, max_batch_size=3, max_seq_len=96, decode="compiled")
    handles = generate_requests(engine, [greedy(tokenizer, p) for p in PROMPTS])
    assert engine.mode == "compiled", "compiling failed and the engine fell back (see the log)"
    assert [h.completion for h in handles] == references
