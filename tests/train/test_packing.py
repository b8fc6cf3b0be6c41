"""Packing: which rows go together, the packed batch, and rows that stay apart inside a pack.

The models are the training tests' tiny Llama (transformers' own masks, eager and sdpa) and tiny
native ChatGLM-6B (through the 4-D prefix-LM mask and 2-D positions `chatglm_packed_inputs`
builds from segment ids). A packed row must give the loss and gradients it has alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instructglm.errors import BadValue
from instructglm.train.collator import IGNORE_INDEX, CausalLMCollator
from instructglm.train.packing import (
    PackedCollator,
    PackedDataset,
    chatglm_packed_inputs,
    pack_indices,
    packed_collator_for,
)

X = IGNORE_INDEX


# -- which rows go together -------------------------------------------------------------------------------------------


def test_first_fit_decreasing_in_one_window():
    lengths = [2, 6, 3, 5, 4, 2]
    packs = pack_indices(lengths, max_seq_length=10, seed=3, window=len(lengths))
    # longest first: 6 opens a pack, 5 a second, 4 joins 6, 3 joins 5, one 2 fills 5+3, the other opens a third
    assert sorted(sorted(lengths[i] for i in pack) for pack in packs) == [[2], [2, 3, 5], [4, 6]]
    assert all(lengths[pack[0]] == max(lengths[i] for i in pack) for pack in packs)


def test_packs_are_a_partition_deterministic_and_nearly_full():
    lengths = np.random.default_rng(0).integers(10, 320, 3000)
    packs = pack_indices(lengths, 320, seed=1, window=500)
    assert sorted(i for pack in packs for i in pack) == list(range(len(lengths)))  # every row once, none cut
    assert max(lengths[pack].sum() for pack in packs) <= 320
    assert lengths.sum() / (len(packs) * 320) > 0.95
    assert pack_indices(lengths, 320, seed=1, window=500) == packs
    assert pack_indices(lengths, 320, seed=2, window=500) != packs


def test_rows_are_packed_within_their_shuffled_window():
    lengths = np.random.default_rng(1).integers(1, 64, 200)
    window = 50
    order = np.random.RandomState(7).permutation(len(lengths))  # the documented shuffle
    window_of = np.empty(len(lengths), dtype=int)
    window_of[order] = np.arange(len(lengths)) // window
    packs = pack_indices(lengths, 64, seed=7, window=window)
    assert all(len(set(window_of[pack])) == 1 for pack in packs)
    # each window's packs come together, windows in shuffled order
    assert [window_of[pack[0]] for pack in packs] == sorted(window_of[pack[0]] for pack in packs)


def test_a_row_longer_than_max_seq_length_is_an_error_naming_it():
    with pytest.raises(BadValue, match=r"1 row\(s\).*--max_seq_length 8.*row 2 \(9 tokens\).*never cuts"):
        pack_indices([3, 8, 9, 1], max_seq_length=8)


def test_packed_dataset_over_a_datasets_dataset(llama_dataset):
    import datasets

    rows = datasets.load_from_disk(str(llama_dataset))
    packed = PackedDataset(rows, max_seq_length=64, seed=5, window=16)
    assert len(packed) < len(rows)
    items = [packed[i]["rows"] for i in range(len(packed))]
    assert sorted(row["input_ids"] for pack in items for row in pack) == sorted(rows["input_ids"])
    assert all(sum(len(row["input_ids"]) for row in pack) <= 64 for pack in items)
    assert PackedDataset(rows, max_seq_length=64, seed=5, window=16).packs == packed.packs
    assert f"{len(rows)} rows packed into {len(packed)} sequences" in packed.summary()
    assert packed.fill == pytest.approx(sum(map(len, rows["input_ids"])) / (64 * len(packed)))


# -- the packed batch -------------------------------------------------------------------------------------------------


def test_packed_batch_layout_positions_and_labels():
    rows = [{"input_ids": [5, 6, 7, 2], "seq_len": 2}, {"input_ids": [8, 9, 2], "seq_len": 1}]
    other = {"input_ids": [10, 11, 12, 13, 2], "seq_len": 3}
    batch = PackedCollator(pad_token_id=0)([{"rows": rows}, other])
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 2, 8, 9, 2], [10, 11, 12, 13, 2, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 2, 3, 4, 0, 1]]
    # the prompt and padding are -100, and so is each row's first token (it would be predicted from the row before)
    assert batch["labels"].tolist() == [[X, X, 7, 2, X, 9, 2], [X, X, X, 13, 2, X, X]]

    segments = PackedCollator(pad_token_id=0, attention="segment_ids", pad_to_multiple_of=4)([{"rows": rows}, other])
    assert set(segments) == {"input_ids", "labels", "attention_mask"}
    assert segments["attention_mask"].tolist() == [[1, 1, 1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 0, 0, 0]]


def test_flash_attention_varlen_boundaries_over_the_flattened_batch():
    rows = [{"input_ids": [5, 6, 7, 2], "seq_len": 2}, {"input_ids": [8, 9, 2], "seq_len": 1}]
    other = {"input_ids": [10, 11, 12, 13, 2], "seq_len": 3}
    batch = PackedCollator(pad_token_id=0, flash_attention_kwargs=True)([{"rows": rows}, other])
    # rows of 4 and 3, then the second pack's row of 5 and its 2 padding tokens
    assert batch["cu_seq_lens_q"].tolist() == batch["cu_seq_lens_k"].tolist() == [0, 4, 7, 12, 14]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == batch["max_length_k"] == 5


def test_labelled_prompt_tail_and_labels_column():
    # ChatGLM-6B labels its <sop> (the last prompt id) -- except where <sop> opens a row of the pack
    rows = [{"input_ids": [20, 1, 4, 30, 5], "seq_len": 3}, {"input_ids": [4, 31, 5], "seq_len": 1}]
    batch = PackedCollator(pad_token_id=3, labelled_prompt_tail=1)([{"rows": rows}])
    assert batch["labels"].tolist() == [[X, X, 4, 30, 5, X, 31, 5]]
    # a row's own labels (multi-turn) take precedence over seq_len
    turns = {"input_ids": [40, 41, 42, 43, 44], "seq_len": 1, "labels": [X, 41, X, 43, 44]}
    batch = PackedCollator(pad_token_id=3)([{"rows": [rows[1], turns]}])
    assert batch["labels"].tolist() == [[X, 31, 5, X, 41, X, 43, 44]]
    with pytest.raises(BadValue, match="row 0 of pack 0 has 2 labels for 5 input ids"):
        PackedCollator(pad_token_id=3)([{"rows": [dict(turns, labels=[1, 2])]}])


def test_unpacked_collator_takes_a_labels_column_too():
    rows = [{"input_ids": [40, 41, 42, 2], "seq_len": 1, "labels": [X, 41, X, 2]}, {"input_ids": [5, 6, 2], "seq_len": 2}]
    assert CausalLMCollator(pad_token_id=0)(rows)["labels"].tolist() == [[X, 41, X, 2], [X, X, 2, X]]


def test_packed_collator_for_refuses_models_that_would_mix_rows(tiny_llama_dir, tiny_chatglm_dir):
    from transformers import AutoTokenizer

    llama = packed_collator_for(AutoTokenizer.from_pretrained(str(tiny_llama_dir)), "llama", max_seq_length=64)
    assert llama.attention == "position_ids" and llama.labelled_prompt_tail == 0
    # the v1 model reads a 2-D attention_mask as padding only: packed rows would see each other
    with pytest.raises(BadValue, match="--packing is not supported for model_type 'chatglm'"):
        packed_collator_for(AutoTokenizer.from_pretrained(str(tiny_chatglm_dir)), "chatglm")


# -- rows stay apart: the tiny Llama ----------------------------------------------------------------------------------


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[b, T] per-token loss: position i scored against labels[i + 1], 0 where there is no label."""
    shifted = F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.float().transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none")


def packed_row_losses(logits, labels, segment_ids) -> list[torch.Tensor]:
    """Each row's mean token loss, from the packed logits (one pack, batch row 0)."""
    losses, counted = token_losses(logits, labels), F.pad(labels, (0, 1), value=IGNORE_INDEX)[:, 1:] != IGNORE_INDEX
    rows = []
    for k in range(1, int(segment_ids.max()) + 1):
        in_row = (segment_ids == k) & counted
        rows.append(losses[in_row].sum() / in_row.sum())
    return rows


def grads(model, loss) -> dict[str, torch.Tensor]:
    parameters = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return dict(zip(parameters, torch.autograd.grad(loss, list(parameters.values()), retain_graph=True, allow_unused=True)))


def assert_same_grads(got, expected, context):
    for name in expected:
        if expected[name] is None:
            assert got[name] is None or not got[name].abs().any(), f"{context}: {name}"
        else:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5, msg=f"{context}: {name}")


def pick_rows(dataset_dir, count=3) -> list[dict]:
    import datasets

    rows = datasets.load_from_disk(str(dataset_dir))
    picked = [rows[i] for i in range(count)]
    assert len({len(r["input_ids"]) for r in picked}) > 1
    return picked


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_llama_rows_equal_rows_alone(tiny_llama_dir, llama_dataset, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32, attn_implementation=attention)
    model.config.use_cache = False
    rows = pick_rows(llama_dataset)
    pad = model.config.pad_token_id
    # with the flash-attention varlen keys too: the eager/sdpa paths must ignore them
    batch = PackedCollator(pad_token_id=pad, pad_to_multiple_of=64, flash_attention_kwargs=True)([{"rows": rows}])
    segments = PackedCollator(pad_token_id=pad, attention="segment_ids", pad_to_multiple_of=64)([{"rows": rows}])
    assert segments["attention_mask"].eq(0).any(), "the pack is padded, so padding is in play"
    logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    alone = CausalLMCollator(pad_token_id=pad)
    for k, row_loss in enumerate(packed_row_losses(logits, batch["labels"], segments["attention_mask"])):
        reference = model(**alone([rows[k]])).loss
        torch.testing.assert_close(row_loss, reference, rtol=1e-5, atol=1e-5, msg=f"row {k} loss")
        assert_same_grads(grads(model, row_loss), grads(model, reference), f"{attention} row {k}")

    # the batch loss is the mean over all labelled tokens: the same rows padded give the same loss
    packed_loss = model(**batch).loss
    padded_loss = model(**alone(rows)).loss
    torch.testing.assert_close(packed_loss, padded_loss, rtol=1e-5, atol=1e-6)
    labelled = sum((alone([r])["labels"][0, 1:] != X).sum() for r in rows)
    by_rows = sum(model(**alone([r])).loss * (alone([r])["labels"][0, 1:] != X).sum() for r in rows) / labelled
    torch.testing.assert_close(packed_loss, by_rows, rtol=1e-5, atol=1e-6)


def test_packed_dataset_trains_and_resumes_exactly_with_the_trainer(tiny_llama_dir, llama_dataset, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

    rows = datasets.load_from_disk(str(llama_dataset))
    collate = PackedCollator(pad_token_id=0, max_seq_length=64)

    def train(output_dir, resume=None):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32)
        model.config.use_cache = False
        args = TrainingArguments(
            output_dir=str(output_dir), per_device_train_batch_size=2, max_steps=6, save_steps=3, learning_rate=1e-2,
            report_to="none", seed=11, remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
            logging_steps=1, use_cpu=True,
        )
        packed = PackedDataset(rows, max_seq_length=64, seed=args.seed, window=32)
        trainer = Trainer(model=model, args=args, train_dataset=packed, data_collator=collate)
        trainer.train(resume_from_checkpoint=resume)
        return model.state_dict(), trainer.state.log_history

    unbroken, history = train(tmp_path / "unbroken")
    assert len(PackedDataset(rows, 64, seed=11, window=32)) > 6, "the 6 steps do not wrap around the epoch"
    resumed, resumed_history = train(tmp_path / "resumed", resume=str(tmp_path / "unbroken" / "checkpoint-3"))
    torch.testing.assert_close(resumed, unbroken, rtol=0, atol=0)
    losses = lambda h: [e["loss"] for e in h if "loss" in e and e["step"] > 3]  # noqa: E731
    assert losses(resumed_history) == losses(history)


# -- rows stay apart: ChatGLM-6B's prefix-LM mask and 2-D positions ---------------------------------------------------


@pytest.fixture(scope="module")
def glm_config(tiny_chatglm_dir):
    from transformers import AutoConfig

    import instructglm  # noqa: F401  (registers ChatGLM)

    return AutoConfig.from_pretrained(str(tiny_chatglm_dir))


def glm_ids(config):
    return dict(bos_token_id=config.bos_token_id, gmask_token_id=config.gmask_token_id, mask_token_id=config.mask_token_id)


def glm_rows(config) -> list[torch.Tensor]:
    """Rows with [gMASK] <sop>, with [MASK] only, with both, and with no <sop> at all."""
    sop, gmask, mask, eos = config.bos_token_id, config.gmask_token_id, config.mask_token_id, config.eos_token_id
    return [
        torch.tensor([20, 21, 22, gmask, sop, 30, 31, eos]),
        torch.tensor([23, mask, sop, 32, eos]),
        torch.tensor([24, mask, 25, gmask, sop, 33, 34, 35, eos]),
        torch.tensor([26, 27, gmask]),
    ]


def test_chatglm_packed_inputs_equal_each_row_built_alone(glm_config):
    from instructglm.models.chatglm.model import prefix_lm_inputs

    rows = glm_rows(glm_config)
    width = sum(len(r) for r in rows) + 3
    input_ids = torch.full((1, width), glm_config.pad_token_id)
    segment_ids = torch.zeros((1, width), dtype=torch.long)
    start = 0
    for k, row in enumerate(rows):
        input_ids[0, start : start + len(row)] = row
        segment_ids[0, start : start + len(row)] = k + 1
        start += len(row)
    masked, position_ids = chatglm_packed_inputs(segment_ids, input_ids, **glm_ids(glm_config))
    assert masked.shape == (1, 1, width, width) and position_ids.shape == (1, 2, width)

    start = 0
    for k, row in enumerate(rows):
        end = start + len(row)
        row_masked, row_positions = prefix_lm_inputs(row[None], None, None, 0, len(row), glm_config)
        assert torch.equal(position_ids[0, :, start:end], row_positions[0]), f"row {k} positions"
        assert torch.equal(masked[0, 0, start:end, start:end], row_masked[0, 0]), f"row {k} mask"
        # nothing outside its own row is visible to it, and it is visible to nothing outside
        assert masked[0, 0, start:end, :start].all() and masked[0, 0, start:end, end:].all(), f"row {k} looks out"
        assert masked[0, 0, :start, start:end].all() and masked[0, 0, end:, start:end].all(), f"row {k} seen"
        start = end
    assert masked[0, 0, start:].all() and not position_ids[0, :, start:].any(), "padding sees nothing, positions 0"


@pytest.mark.parametrize("side", ["right", "left"])
def test_chatglm_one_row_per_sequence_is_the_models_padding_mask(glm_config, side):
    from instructglm.models.chatglm.model import prefix_lm_inputs

    rows = glm_rows(glm_config)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), glm_config.pad_token_id)
    padding = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[b, span], padding[b, span] = row, 1
    masked, position_ids = chatglm_packed_inputs(padding, input_ids, **glm_ids(glm_config))
    expected_masked, expected_positions = prefix_lm_inputs(input_ids, padding, None, 0, width, glm_config)
    assert torch.equal(masked, expected_masked) and torch.equal(position_ids, expected_positions)


def test_chatglm_segments_must_be_contiguous(glm_config):
    with pytest.raises(ValueError, match="contiguous"):
        chatglm_packed_inputs(torch.tensor([[1, 2, 1, 0]]), torch.tensor([[5, 6, 7, 3]]), **glm_ids(glm_config))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_chatglm_rows_equal_rows_alone(tiny_chatglm_dir, chatglm_dataset, glm_config, attention):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_chatglm_dir), dtype=torch.float32, attn_implementation=attention)
    rows = pick_rows(chatglm_dataset)
    pad = glm_config.pad_token_id
    batch = PackedCollator(pad_token_id=pad, labelled_prompt_tail=1, attention="segment_ids", pad_to_multiple_of=64)(
        [{"rows": rows}]
    )
    masked, position_ids = chatglm_packed_inputs(batch["attention_mask"], batch["input_ids"], **glm_ids(glm_config))
    logits = model(input_ids=batch["input_ids"], attention_mask=masked, position_ids=position_ids, use_cache=False).logits
    alone = CausalLMCollator(pad_token_id=pad, labelled_prompt_tail=1)
    for k, row_loss in enumerate(packed_row_losses(logits, batch["labels"], batch["attention_mask"])):
        reference = model(**alone([rows[k]])).loss
        torch.testing.assert_close(row_loss, reference, rtol=1e-5, atol=1e-5, msg=f"row {k} loss")
        assert_same_grads(grads(model, row_loss), grads(model, reference), f"{attention} row {k}")
