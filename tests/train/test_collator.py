"""The collator: right padding, 2-D mask, labels; a row's loss does not depend on its batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from instructglm.train.collator import IGNORE_INDEX, CausalLMCollator, collator_for


def test_padding_mask_and_labels_generic():
    collate = CausalLMCollator(pad_token_id=0, labelled_prompt_tail=0)
    batch = collate([{"input_ids": [5, 6, 7, 8, 2], "seq_len": 3}, {"input_ids": [9, 10, 2], "seq_len": 2}])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [9, 10, 2, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, x, 8, 2], [x, x, 2, x, x]]


def test_chatglm_labels_start_at_sop():
    # ChatGLM-6B prompt: ... [gMASK]=130001 <sop>=130004; target; eos=130005; pad id 3
    collate = CausalLMCollator(pad_token_id=3, labelled_prompt_tail=1)
    batch = collate([{"input_ids": [20, 21, 130001, 130004, 30, 130005], "seq_len": 4}, {"input_ids": [22, 130001, 130004, 31, 130005], "seq_len": 3}])
    x = IGNORE_INDEX
    assert batch["input_ids"][1].tolist() == [22, 130001, 130004, 31, 130005, 3]
    assert batch["labels"].tolist() == [[x, x, x, 130004, 30, 130005], [x, x, 130004, 31, 130005, x]]


def test_pad_to_multiple_and_extra_columns_ignored():
    collate = CausalLMCollator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([{"input_ids": [5, 6, 7, 2, 9], "seq_len": 2, "source": "ignored"}])
    assert batch["input_ids"].shape == (1, 8) and set(batch) == {"input_ids", "attention_mask", "labels"}


@pytest.mark.parametrize("seq_len", [0, 5])
def test_bad_seq_len_is_an_error(seq_len):
    with pytest.raises(ValueError, match=f"seq_len={seq_len}.*instructglm tokenize"):
        CausalLMCollator(pad_token_id=0)([{"input_ids": [5, 6, 7, 8, 2], "seq_len": seq_len}])


def per_row_losses(model, batch) -> torch.Tensor:
    """Mean token loss of each row of a batch, from one forward pass of the whole batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits, labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    token = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return token.sum(1) / (labels != IGNORE_INDEX).sum(1)


def assert_batch_invariant(model, collate, rows):
    model.eval()
    with torch.no_grad():
        batched = per_row_losses(model, collate(rows))
        for i, row in enumerate(rows):
            alone = model(**collate([row])).loss  # the model's own loss on the unpadded row
            torch.testing.assert_close(batched[i], alone, rtol=1e-5, atol=1e-5, msg=f"row {i}")


def test_row_loss_in_padded_batch_equals_alone_llama(tiny_llama_dir, llama_dataset):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
    collate = collator_for(AutoTokenizer.from_pretrained(str(tiny_llama_dir)), model.config.model_type)
    rows = list(datasets.load_from_disk(str(llama_dataset)).select(range(6)))
    assert len({len(r["input_ids"]) for r in rows}) > 1, "rows of different lengths, so some get padded"
    assert_batch_invariant(model, collate, rows)


def test_row_loss_in_padded_batch_equals_alone_chatglm(tiny_chatglm_dir, chatglm_dataset):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_chatglm_dir), dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chatglm_dir))
    collate = collator_for(tokenizer, model.config.model_type)
    assert collate.labelled_prompt_tail == 1 and collate.pad_token_id == tokenizer.pad_token_id
    rows = list(datasets.load_from_disk(str(chatglm_dataset)).select(range(6)))
    assert len({len(r["input_ids"]) for r in rows}) > 1
    labels = collate(rows[:1])["labels"][0].tolist()
    sop = rows[0]["input_ids"][rows[0]["seq_len"] - 1]
    assert sop == tokenizer.convert_tokens_to_ids("<sop>") and labels[rows[0]["seq_len"] - 1] == sop
    assert_batch_invariant(model, collate, rows)
