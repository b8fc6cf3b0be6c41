"""One collator for every model family: tokenized rows -> a right-padded training batch.

A row is `{"input_ids": prompt ids + target ids + [eos], "seq_len": number of prompt ids}` (the
`instructglm tokenize` contract). The batch holds `input_ids` padded on the right with the pad id,
the standard 2-D `attention_mask` (1 = real token) and `labels`: -100 on padding and on the prompt,
except the family's `labelled_prompt_tail` last prompt ids (ChatGLM-6B labels its `<sop>`, as the
official recipe does). Models build their own attention pattern from the 2-D mask (ChatGLM-6B its
prefix-LM mask and 2-D positions, a Llama its causal mask), so a row's loss does not depend on
what it is batched with. Right padding keeps every row's real tokens at positions 0..n-1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from instructglm.errors import BadValue

IGNORE_INDEX = -100  # the label id torch's cross entropy skips


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
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            seq_len = int(feature["seq_len"])
            if not 0 < seq_len < length:
                raise BadValue(
                    f"row {row} of the batch has seq_len={seq_len} for {length} input ids: the prompt must be "
                    "non-empty and followed by at least one target id; re-run `instructglm tokenize`"
                )
            first_label = max(seq_len - self.labelled_prompt_tail, 0)
            input_ids[row, :length] = ids
            attention_mask[row, :length] = 1
            labels[row, first_label:length] = ids[first_label:]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collator_for(tokenizer, model_type: str | None) -> CausalLMCollator:
    """The collator for a tokenizer and a `config.model_type` (its family gives the labelled prompt tail)."""
    from instructglm.models.registry import family_for

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        # Padding is masked out and never labelled, so any real id works; eos is the usual stand-in.
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return CausalLMCollator(pad_token_id=pad_id, labelled_prompt_tail=family_for(model_type).labelled_prompt_tail)
