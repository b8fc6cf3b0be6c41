"""Teacher-forced loss and perplexity of the targets, by training's own rows and labels.

Each (context, target) pair, or whole conversation, becomes the row `instructglm tokenize` writes for
the model's family (`RowEncoder`): for a text family (ChatGLM-6B, ChatGLM2-6B, a plain causal LM) the
prompt with the tokenizer's special tokens, target ids, eos (the target cut to fit, the prompt never);
for a role-token family (ChatGLM3-6B, GLM-4, a chat template) the conversation `[user: context,
assistant: target]` (or the whole conversation) in its format, every assistant turn labelled as
training labels it. Rows are batched by training's collator (right padding, labels -100 where
nothing is learned; the family's labelled prompt tail, so ChatGLM-6B's `<sop>` counts, as in
training). The loss is the token-weighted mean negative log-likelihood over every labelled token of
every row, in nats, and the perplexity is its exp: the number `train` logs as eval loss, for models
compared without sampling noise. Rows the encoder drops (a prompt with no room for one target token,
an empty target, a conversation the family cannot express) are counted and score nothing.

`continuation_logprobs` is the same forward pass for the benchmark scorer: the summed
log-probability of the ids after each row's prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from instructglm.data.tokenize import PROMPT_TOO_LONG, UNSUPPORTED, RowEncoder
from instructglm.train.collator import IGNORE_INDEX, CausalLMCollator, pad_token_id_for


@dataclass
class LossResult:
    """Teacher-forced scores of a set of rows."""

    loss: float  # token-weighted mean NLL of the labelled tokens, nats
    perplexity: float  # exp(loss)
    tokens: int  # labelled tokens scored
    rows: int  # rows scored
    truncated: int = 0  # scored rows whose target was cut at its end to fit max_seq_length
    dropped_prompt_too_long: int = 0
    dropped_empty_target: int = 0
    dropped_unsupported: int = 0  # conversations the model's family cannot express (tools for a text model)
    # per input row: mean NLL of its labelled tokens, None for a dropped row
    row_losses: list[float | None] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The `metrics.json` fields (everything but the per-row losses)."""
        return {
            "loss": self.loss,
            "perplexity": self.perplexity,
            "loss_tokens": self.tokens,
            "loss_rows": self.rows,
            "loss_truncated": self.truncated,
            "loss_dropped": self.dropped_prompt_too_long + self.dropped_empty_target + self.dropped_unsupported,
        }


def model_type_of(model: Any) -> str | None:
    """`config.model_type` of a model (a `PeftModel` answers with its base model's config)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def sequence_limit(model: Any, default: int = 2048) -> int:
    """The longest row the model takes, from its config (`default` when the config does not say)."""
    from instructglm.infer.generate import context_limit

    return context_limit(model) or default


def _device(model: Any):
    return next(model.parameters()).device


def _forward(model: Any, batch: dict):
    """(logits at positions 0..T-2, the labels they predict, the mask of labelled positions) of a collated batch."""
    device = _device(model)
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device), use_cache=False
    ).logits[:, :-1]
    labels = batch["labels"][:, 1:].to(device)
    return logits, labels, labels != IGNORE_INDEX


def _labelled_logprobs(model: Any, batch: dict) -> list[tuple[float, int]]:
    """Per row of a collated batch: (summed log-probability of its labelled tokens, their count).

    Logits at position t predict the label at t + 1. Only a row's labelled positions are turned
    into fp32 log-probabilities, one row at a time, so a 130k vocabulary costs memory per scored
    token of one row, not per position of the batch.
    """
    import torch

    scores = []
    with torch.inference_mode():
        logits, labels, scored = _forward(model, batch)
        for row in range(labels.shape[0]):
            logprobs = torch.log_softmax(logits[row, scored[row]].float(), dim=-1)
            picked = logprobs.gather(1, labels[row, scored[row]].unsqueeze(1))
            scores.append((picked.double().sum().item(), int(scored[row].sum())))
    return scores


def _next_token_logprobs(model: Any, batch: dict, candidates: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per row with one labelled token: the log-probabilities of `candidates[row]` at that position."""
    import torch

    with torch.inference_mode():
        logits, _, scored = _forward(model, batch)
        positions = scored.int().argmax(dim=1)  # the one labelled position of each row
        rows = torch.arange(logits.shape[0], device=logits.device)
        logprobs = torch.log_softmax(logits[rows, positions].float(), dim=-1)
        return [logprobs[row, list(ids)].double().tolist() for row, ids in enumerate(candidates)]


def _in_length_order(rows: Sequence[dict], batch_size: int):
    """Index chunks of `rows` in batches of similar length (a row's score does not depend on its batch)."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def _score_rows(model: Any, collator: Any, rows: Sequence[dict], batch_size: int) -> list[tuple[float, int]]:
    """`_labelled_logprobs` of every row, in input order."""
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for chunk in _in_length_order(rows, batch_size):
        for i, score in zip(chunk, _labelled_logprobs(model, collator([rows[i] for i in chunk]))):
            scores[i] = score
    return scores


def row_encoder(model: Any, tokenizer: Any, max_seq_length: int | None = None) -> RowEncoder:
    """Training's row encoder for `model` (its family from its config and the tokenizer, its stop ids)."""
    from instructglm.infer.engine import unwrap

    network = unwrap(model)
    return RowEncoder(tokenizer, max_seq_length or sequence_limit(model), network.config, getattr(network, "generation_config", None))


def teacher_forced_loss(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[str],
    targets: Sequence[str],
    max_seq_length: int | None = None,
    batch_size: int = 8,
    conversations: Sequence[Any] | None = None,
) -> LossResult:
    """Loss and perplexity of `targets` given `contexts`, under training's row and label rules.

    Args:
        model: a causal LM (or a `PeftModel`), in eval mode.
        tokenizer: its tokenizer.
        contexts, targets: the prompts and their reference answers, paired.
        max_seq_length: longest row in tokens (targets are cut at their end to fit); default the
            model's context length from its config.
        batch_size: rows per forward pass.
        conversations: whole conversations (`instructglm.data.messages.Conversation`) to score instead of
            (context, target) pairs, every assistant turn labelled; `contexts` and `targets` are then ignored.

    Returns:
        A `LossResult`; `loss` and `perplexity` are NaN when no row could be scored.
    """
    encoder = row_encoder(model, tokenizer, max_seq_length)
    collator = CausalLMCollator(pad_token_id_for(tokenizer), encoder.family.labelled_prompt_tail)
    if conversations is not None:
        table, counts, dropped = encoder.encode_conversations(list(conversations))
        count = len(conversations)
    else:
        table, counts, dropped = encoder.encode_batch(list(contexts), list(targets))
        count = len(contexts)
    result = LossResult(loss=math.nan, perplexity=math.nan, tokens=0, rows=0, truncated=counts.truncated)
    gone = set()
    for position, outcome, *_ in dropped:
        gone.add(position)
        if outcome == PROMPT_TOO_LONG:
            result.dropped_prompt_too_long += 1
        elif outcome == UNSUPPORTED:
            result.dropped_unsupported += 1
        else:
            result.dropped_empty_target += 1
    result.row_losses = [None] * count
    kept = [i for i in range(count) if i not in gone]
    rows = table.to_pylist()
    if not rows:
        return result
    scores = _score_rows(model, collator, rows, batch_size)
    for index, (total, tokens) in zip(kept, scores, strict=True):
        result.row_losses[index] = -total / tokens
    result.tokens, result.rows = sum(tokens for _, tokens in scores), len(rows)
    result.loss = -math.fsum(total for total, _ in scores) / result.tokens
    result.perplexity = math.exp(result.loss) if result.loss < 700 else math.inf
    return result


def _answer_collator(tokenizer: Any, model: Any):
    """Training's collator labelling only the ids after the prompt (not ChatGLM's `<sop>`, the same for every answer)."""
    return CausalLMCollator(pad_token_id_for(tokenizer), labelled_prompt_tail=0)


def continuation_logprobs(model: Any, tokenizer: Any, rows: Sequence[dict], batch_size: int = 8) -> list[float]:
    """Summed log-probability of the ids after each row's prompt (`input_ids[seq_len:]`).

    Rows are `{"input_ids", "seq_len"}` as the encoder builds them, here without eos.
    """
    return [total for total, _ in _score_rows(model, _answer_collator(tokenizer, model), rows, batch_size)]


def next_token_logprobs(
    model: Any, tokenizer: Any, rows: Sequence[dict], candidates: Sequence[Sequence[int]], batch_size: int = 8
) -> list[list[float]]:
    """For rows of a prompt plus one id: the log-probabilities of each of `candidates[i]` right after
    row i's prompt. One forward pass scores every single-token answer of a question."""
    collator = _answer_collator(tokenizer, model)
    result: list[list[float]] = [[] for _ in rows]
    for chunk in _in_length_order(rows, batch_size):
        batch = collator([rows[i] for i in chunk])
        for i, values in zip(chunk, _next_token_logprobs(model, batch, [candidates[i] for i in chunk])):
            result[i] = values
    return result
