"""Teacher-forced loss and perplexity against a direct, one-row-at-a-time computation."""

from __future__ import annotations

import math

import pytest
import torch

from instructglm.eval.perplexity import teacher_forced_loss
from instructglm.infer.load import load_model

CONTEXTS = ["Instruction: say hello\nAnswer: ", "你好", "what is one plus one? a longer question, so the batch is padded"]
TARGETS = ["hello world", "世界你好", "two"]


def direct_nll(model, tokenizer, context: str, target: str, labelled_prompt_tail: int) -> tuple[float, int]:
    """Sum of -log p over the target ids and eos (plus ChatGLM's <sop>), one unpadded row, float64."""
    prompt = tokenizer(context)["input_ids"]  # with the tokenizer's own special tokens
    ids = prompt + tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
    first = len(prompt) - labelled_prompt_tail
    return -sum(logprobs[t - 1, ids[t]].item() for t in range(first, len(ids))), len(ids) - first


@pytest.mark.parametrize("kind, tail", [("glm", 1), ("llama", 0)])
def test_loss_is_the_token_weighted_mean_nll(kind, tail, request):
    model, tokenizer, _ = load_model(str(request.getfixturevalue(f"{kind}_base")), device="cpu", dtype="float32")
    result = teacher_forced_loss(model, tokenizer, CONTEXTS, TARGETS, batch_size=2)
    by_row = [direct_nll(model, tokenizer, c, t, tail) for c, t in zip(CONTEXTS, TARGETS)]
    total, tokens = sum(n for n, _ in by_row), sum(k for _, k in by_row)
    assert result.tokens == tokens and result.rows == 3
    assert result.loss == pytest.approx(total / tokens, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(total / tokens), rel=1e-5)
    assert result.row_losses == pytest.approx([n / k for n, k in by_row], rel=1e-5)
    # a row's loss does not depend on what it is batched with
    alone = teacher_forced_loss(model, tokenizer, CONTEXTS, TARGETS, batch_size=1)
    assert alone.row_losses == pytest.approx(result.row_losses, rel=1e-5)


def test_truncated_and_dropped_rows_are_counted(glm_base):
    model, tokenizer, _ = load_model(str(glm_base), device="cpu")
    long_prompt = "数字 " * 40
    result = teacher_forced_loss(
        model, tokenizer, ["hi", "hi", long_prompt, "hi"], ["a long answer " * 5, "ok", "x", ""], max_seq_length=12
    )
    assert (result.rows, result.truncated, result.dropped_prompt_too_long, result.dropped_empty_target) == (2, 1, 1, 1)
    assert result.row_losses[2] is None and result.row_losses[3] is None
    assert all(value is not None for value in result.row_losses[:2])


def test_no_scorable_row_gives_nan_not_an_error(glm_base):
    model, tokenizer, _ = load_model(str(glm_base), device="cpu")
    result = teacher_forced_loss(model, tokenizer, ["hi"], [""])
    assert math.isnan(result.loss) and result.rows == 0 and result.row_losses == [None]


def test_a_role_token_family_is_scored_on_its_own_conversation_rows(chatglm3_base):
    """ChatGLM3: each (context, target) is the conversation [user: context, assistant: target] in role tokens,
    labelled as its fine-tuning demo labels it (the "\\n", the answer and the closing eos) — not v1's text rule."""
    model, tokenizer, prompter = load_model(str(chatglm3_base), device="cpu", dtype="float32")
    result = teacher_forced_loss(model, tokenizer, CONTEXTS, TARGETS, batch_size=2)
    by_row = []
    for context, target in zip(CONTEXTS, TARGETS):
        ids, labels = prompter.family.training_ids(tokenizer, [{"role": "user", "content": context}, {"role": "assistant", "content": target}])
        assert ids[: len(prompter.context_ids(context))] == prompter.context_ids(context)  # the prompt is the chat prompt
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
        scored = [t for t in range(1, len(ids)) if labels[t] != -100]
        by_row.append((-sum(logprobs[t - 1, ids[t]].item() for t in scored), len(scored)))
    assert result.tokens == sum(k for _, k in by_row) and result.rows == 3
    assert result.row_losses == pytest.approx([n / k for n, k in by_row], rel=1e-5)
    # a whole conversation scores every assistant turn, as training does
    from instructglm.data.messages import Conversation

    conversation = Conversation.from_dict({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                                                        {"role": "user", "content": "again"}, {"role": "assistant", "content": "hello again"}]})
    whole = teacher_forced_loss(model, tokenizer, [], [], conversations=[conversation])
    _, labels = prompter.family.training_ids(tokenizer, conversation.messages)
    assert whole.rows == 1 and whole.tokens == sum(label != -100 for label in labels)
