"""instructglm.infer.generate: batched greedy == one at a time (and == `generate` for every family's own
prompts and stop ids), streaming == batch, cancelling."""

from __future__ import annotations

import threading

import pytest

from instructglm.data.messages import Message
from instructglm.infer.engine import BatchEngine, stream_answer
from instructglm.infer.generate import GenerationArguments
from instructglm.infer.engine import generate_batch
from instructglm.infer.load import load_model
from tests.infer.helpers import reference_completion

GREEDY = GenerationArguments(max_new_tokens=10, do_sample=False)
PROMPTS = ["What is two plus three?", "hi", "Reverse the word cat: ", "你好，世界。一二三"]


@pytest.fixture(scope="module")
def tuned(llama_dir, llama_adapter):
    return load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")


@pytest.fixture(scope="module")
def each_family(family):
    name, base, adapter = family
    return load_model(str(base), adapter=str(adapter), device="cpu")


def test_batched_greedy_equals_one_at_a_time(each_family):
    model, tokenizer, _ = each_family
    batched = generate_batch(model, tokenizer, PROMPTS, GREEDY)
    single = [reference_completion(model, tokenizer, p, GREEDY.max_new_tokens) for p in PROMPTS]  # `generate`, alone
    assert [c.text for c in batched] == [c.text for c in single]
    assert [c.completion_tokens for c in batched] == [c.completion_tokens for c in single]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in single]
    assert all(c.finish_reason in ("stop", "length") for c in batched)
    assert any(c.text for c in batched)


CONVERSATIONS = [
    [Message("user", "What is two plus three?")],
    [Message("user", "hi"), Message("assistant", "hello world"), Message("user", "say hello")],
    [Message("system", "Be brief."), Message("user", "你好，世界。一二三")],
]


def test_greedy_answers_to_the_familys_own_prompts_are_generates(each_family):
    """Each family's prompts (its format, its run's template) and stop ids: the engine's greedy ids are `generate`'s."""
    model, tokenizer, prompter = each_family
    prompts = [prompter.prompt_ids(messages) for messages in CONVERSATIONS]
    batched = generate_batch(model, tokenizer, prompts, GREEDY, prompter)
    single = [reference_completion(model, tokenizer, ids, GREEDY.max_new_tokens, prompter) for ids in prompts]
    assert [(c.text, c.completion_tokens, c.finish_reason) for c in batched] == [(c.text, c.completion_tokens, c.finish_reason) for c in single]
    assert len({c.text for c in batched}) > 1


def test_left_padding_leaves_every_step_score_unchanged(each_family):
    """Stronger than equal argmaxes: each row's per-step logits in the padded batch match its own."""
    import torch

    model, tokenizer, _ = each_family
    kwargs = dict(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=tokenizer.pad_token_id)
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    assert (batch["attention_mask"][:, 0] == 0).any()  # some rows really are padded, on the left
    together = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs)
    for i, prompt in enumerate(PROMPTS):
        alone_inputs = tokenizer([prompt], return_tensors="pt")
        alone = model.generate(input_ids=alone_inputs["input_ids"], attention_mask=alone_inputs["attention_mask"], **kwargs)
        for step, scores in enumerate(alone.scores):
            torch.testing.assert_close(together.scores[step][i], scores[0], atol=1e-4, rtol=1e-4)


HI = [Message("user", "hi")]


def test_stream_pieces_add_up_to_the_batch_answer(tuned):
    model, tokenizer, prompter = tuned
    conversation = [Message("user", "hi"), Message("assistant", "hello world"), Message("user", "say hello")]
    prompt = prompter.prompt_ids(conversation)
    assert prompter.name == "alpaca"  # the run's template: the rounds rendered by it, with the tokenizer's special tokens
    assert prompt == tokenizer("Instruction: hi\nAnswer: hello world\nInstruction: say hello\nAnswer: ")["input_ids"]
    stream = stream_answer(BatchEngine(model, tokenizer), prompter, conversation, GREEDY)
    pieces = list(stream)
    assert len(pieces) > 1
    assert "".join(pieces) == generate_batch(model, tokenizer, [prompt], GREEDY, prompter)[0].text == stream.message.content


def test_leaving_a_stream_early_frees_its_row(tuned):
    model, tokenizer, prompter = tuned
    engine = BatchEngine(model, tokenizer)
    stream = iter(stream_answer(engine, prompter, HI, GenerationArguments(max_new_tokens=200, do_sample=False)))
    for _ in stream:
        assert engine.running == 1
        break
    stream.close()
    assert engine.running == 0 and engine.waiting == 0


def test_an_interrupted_step_resets_the_engine(tuned, monkeypatch):
    """Ctrl-C inside a decode step (chat): the engine is emptied and answers the next question normally."""
    model, tokenizer, prompter = tuned
    engine = BatchEngine(model, tokenizer)
    real, steps = BatchEngine._decode, []

    def interrupted(self):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(BatchEngine, "_decode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        list(stream_answer(engine, prompter, HI, GREEDY))
    assert engine.running == 0 and engine.waiting == 0
    expected = generate_batch(model, tokenizer, [prompter.prompt_ids(HI)], GREEDY, prompter)[0].text
    assert "".join(stream_answer(engine, prompter, HI, GREEDY)) == expected


def test_sampling_settings_run(tuned):
    model, tokenizer, _ = tuned
    out = generate_batch(model, tokenizer, PROMPTS[:2], GenerationArguments(max_new_tokens=5, top_p=0.7, temperature=0.9))
    assert len(out) == 2 and all(c.completion_tokens <= 5 for c in out)


def test_prompt_over_max_length_is_a_clear_error(tuned):
    model, tokenizer, _ = tuned
    with pytest.raises(ValueError, match="--max_length 3"):
        generate_batch(model, tokenizer, ["What is two plus three?"], GenerationArguments(max_length=3))


def test_tiny_positive_temperatures_decode_greedily(tuned):
    """Scores divided by 1e-300 overflow to inf and the sampler fails; below 1e-5 it is greedy decoding."""
    model, tokenizer, _ = tuned
    greedy = [c.text for c in generate_batch(model, tokenizer, PROMPTS, GREEDY)]
    for temperature in (1e-300, 1e-30, 1e-6):
        settings = GenerationArguments(max_new_tokens=10, do_sample=True, temperature=temperature)
        assert [c.text for c in generate_batch(model, tokenizer, PROMPTS, settings)] == greedy


def test_bad_settings_are_user_errors_naming_the_flag():
    from instructglm.errors import BadValue

    for kwargs, flag in (({"max_new_tokens": 0}, "--max_new_tokens"), ({"temperature": -1.0}, "--temperature"),
                         ({"temperature": float("nan")}, "--temperature"), ({"top_p": 1.5}, "--top_p"),
                         ({"max_length": None}, "--max_length")):
        with pytest.raises(BadValue, match=flag):
            GenerationArguments(**kwargs)
