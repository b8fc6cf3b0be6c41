"""One collator for every model family: tokenized rows -> a right-padded training batch.

A row is `{"input_ids": prompt ids + target ids + [eos], "seq_len": number of prompt ids}` (the
`instructglm tokenize` contract), optionally with its own `labels` (same length as `input_ids`,
-100 where a token is not learned: multi-turn rows label every answer, not only the last); when a
row has `labels` they are used as given and `seq_len` is not needed. The batch holds `input_ids`
padded on the right with the pad id, the standard 2-D `attention_mask` (1 = real token) and
`labels`: -100 on padding and on the prompt, except the family's `labelled_prompt_tail` last prompt
ids (ChatGLM-6B labels its `<sop>`, as the official recipe does). Models build their own attention
pattern from the 2-D mask (ChatGLM-6B its prefix-LM mask and 2-D positions, a Llama its causal
mask), so a row's loss does not depend on what it is batched with. Right padding keeps every row's
real tokens at positions 0..n-1.

Packed batches (several rows per sequence) come from `instructglm.train.packing.PackedCollator`,
which labels each row with `row_labels` below.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from instructglm.errors import BadValue

IGNORE_INDEX = -100  # the label id torch's cross entropy skips


def row_labels(row: Mapping[str, Any], labelled_prompt_tail: int = 0, where: str = "row") -> torch.LongTensor:
    """The labels of one tokenized row: its own `labels` column if it has one, else from `seq_len`.

    From `seq_len`: -100 on the prompt except its last `labelled_prompt_tail` ids, the ids on the rest.

    Args:
        row: a tokenized row (`input_ids` and `seq_len`, or `input_ids` and `labels`).
        labelled_prompt_tail: trailing prompt ids that are labelled (`ModelFamily.labelled_prompt_tail`).
        where: how an error names the row ("row 3 of the batch", "dataset row 17").

    Raises:
        BadValue: `seq_len` leaves no prompt or no target, or `labels` is not as long as `input_ids`.
    """
    ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
    length = len(ids)
    if row.get("labels") is not None:
        labels = torch.as_tensor(row["labels"], dtype=torch.long)
        if labels.shape != ids.shape:
            raise BadValue(
                f"{where} has {len(labels)} labels for {length} input ids: a `labels` column must label every "
                "input id (-100 where nothing is learned); re-run `instructglm tokenize`"
            )
        return labels
    seq_len = int(row["seq_len"])
    if not 0 < seq_len < length:
        raise BadValue(
            f"{where} has seq_len={seq_len} for {length} input ids: the prompt must be "
            "non-empty and followed by at least one target id; re-run `instructglm tokenize`"
        )
    labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
    first_label = max(seq_len - labelled_prompt_tail, 0)
    labels[first_label:] = ids[first_label:]
    return labels


@dataclass
class CausalLMCollator:
    pad_token_id: int
    # trailing prompt ids that are labelled (ModelFamily.labelled_prompt_tail)
    labelled_prompt_tail: int = 0
    # round the padded length up (e.g. 8 for tensor cores); None pads to the longest row
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        lengths = [len(feature["input_ids"]) for feature in features]
        width = max(lengths)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, (feature, length) in enumerate(zip(features, lengths)):
            labels[row, :length] = row_labels(feature, self.labelled_prompt_tail, where=f"row {row} of the batch")
            input_ids[row, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[row, :length] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pad_token_id_for(tokenizer) -> int:
    """The id padding uses: the tokenizer's pad id, else eos (padding is masked and never labelled), else 0."""
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return pad_id


def collator_for(tokenizer, model_type: str | None) -> CausalLMCollator:
    """The collator for a tokenizer and a `config.model_type` (its family gives the labelled prompt tail)."""
    from instructglm.models.registry import family_for

    return CausalLMCollator(
        pad_token_id=pad_token_id_for(tokenizer), labelled_prompt_tail=family_for(model_type).labelled_prompt_tail
    )
