"""Packing: which rows go together, the packed batch, and rows that stay apart inside a pack.

The models are the training tests' tiny Llama (transformers' own masks, eager and sdpa), the tiny
native ChatGLM-6B and a tiny native ChatGLM3 (both read the segment ids of a packed `attention_mask`
and build their block-diagonal masks and per-row positions). A packed row must give the loss and
gradients it has alone.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from instructglm.errors import BadValue
from instructglm.train.collator import IGNORE_INDEX, CausalLMCollator
from instructglm.train.packing import PackedCollator, PackedDataset, pack_indices, packed_collator_for

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


def test_packed_collator_for_each_family_and_refusal(tiny_llama_dir, tiny_chatglm_dir, glm_config, monkeypatch):
    from transformers import AutoTokenizer

    from instructglm.train import packing

    llama = packed_collator_for(AutoTokenizer.from_pretrained(str(tiny_llama_dir)), "llama", max_seq_length=64)
    assert llama.attention == "position_ids" and llama.labelled_prompt_tail == 0
    glm_tokenizer = AutoTokenizer.from_pretrained(str(tiny_chatglm_dir))
    for model_type in ("chatglm", glm_config):  # a model_type or the config itself
        chatglm = packed_collator_for(glm_tokenizer, model_type)
        assert chatglm.attention == "segment_ids" and chatglm.labelled_prompt_tail == 1
    # a native model that does not read segment ids would let packed rows see each other: refused
    monkeypatch.setattr(packing, "SEGMENT_ID_MODEL_TYPES", frozenset())
    with pytest.raises(BadValue, match="--packing is not supported for model_type 'chatglm'"):
        packed_collator_for(glm_tokenizer, "chatglm")


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


# -- rows stay apart: ChatGLM-6B's prefix-LM mask and 2-D positions, ChatGLM2/3's causal rows -------------------------


@pytest.fixture(scope="module")
def glm_config(tiny_chatglm_dir):
    from transformers import AutoConfig

    import instructglm  # noqa: F401  (registers ChatGLM)

    return AutoConfig.from_pretrained(str(tiny_chatglm_dir))


def glm_rows(config) -> list[torch.Tensor]:
    """Rows with [gMASK] <sop>, with [MASK] only, with both, and with no <sop> at all."""
    sop, gmask, mask, eos = config.bos_token_id, config.gmask_token_id, config.mask_token_id, config.eos_token_id
    return [
        torch.tensor([20, 21, 22, gmask, sop, 30, 31, eos]),
        torch.tensor([23, mask, sop, 32, eos]),
        torch.tensor([24, mask, 25, gmask, sop, 33, 34, 35, eos]),
        torch.tensor([26, 27, gmask]),
    ]


def one_pack(rows, pad_id, extra=3):
    """(input_ids [1, T], segment ids [1, T]) of `rows` back to back, then `extra` padding tokens."""
    width = sum(len(r) for r in rows) + extra
    input_ids = torch.full((1, width), pad_id)
    segment_ids = torch.zeros((1, width), dtype=torch.long)
    start = 0
    for k, row in enumerate(rows):
        input_ids[0, start : start + len(row)] = row
        segment_ids[0, start : start + len(row)] = k + 1
        start += len(row)
    return input_ids, segment_ids


def test_chatglm_packed_mask_and_positions_equal_each_row_built_alone(glm_config):
    from instructglm.models.chatglm.model import prefix_lm_inputs

    rows = glm_rows(glm_config)
    input_ids, segment_ids = one_pack(rows, glm_config.pad_token_id)
    width = input_ids.shape[1]
    allowed, position_ids = prefix_lm_inputs(input_ids, segment_ids, None, 0, width, glm_config)
    assert allowed.dtype == torch.bool and allowed.shape == (1, 1, width, width) and position_ids.shape == (1, 2, width)
    start = 0
    for k, row in enumerate(rows):
        end = start + len(row)
        row_allowed, row_positions = prefix_lm_inputs(row[None], None, None, 0, len(row), glm_config)
        assert torch.equal(position_ids[0, :, start:end], row_positions[0]), f"row {k} positions"
        assert torch.equal(allowed[0, 0, start:end, start:end], row_allowed[0, 0]), f"row {k} mask"
        # it sees nothing outside its own row, and nothing outside sees it
        assert not allowed[0, 0, start:end, :start].any() and not allowed[0, 0, start:end, end:].any(), f"row {k} looks out"
        assert not allowed[0, 0, :start, start:end].any() and not allowed[0, 0, end:, start:end].any(), f"row {k} seen"
        start = end
    assert not allowed[0, 0, start:].any() and not position_ids[0, :, start:].any(), "padding sees nothing, positions 0"


def test_chatglm3_packed_mask_and_positions_restart_per_row():
    from instructglm.models.chatglm3.model import chatglm_attention_mask, position_ids_from_mask

    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 3, 3, 3, 3, 0, 0]])
    allowed = chatglm_attention_mask(segment_ids, 0, 11, "sdpa", torch.float32, torch.device("cpu"))[0, 0]
    assert position_ids_from_mask(segment_ids, 11).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 8, 8]]
    blocks = torch.block_diag(*(torch.ones(n, n).tril().bool() for n in (3, 2, 4)))
    assert torch.equal(allowed[:9, :9], blocks) and not allowed[:9, 9:].any()
    assert allowed[9:].all(), "a padding query sees every key (THUDM's rule when nothing is cached)"
    with pytest.raises(ValueError, match="contiguous"):
        chatglm_attention_mask(torch.tensor([[1, 2, 1, 0]]), 0, 4, "sdpa", torch.float32, torch.device("cpu"))


def test_segments_must_be_contiguous_and_not_continue_a_cache(glm_config):
    from instructglm.models.chatglm.model import prefix_lm_inputs

    ids = torch.tensor([[5, 6, 7, 3]])
    with pytest.raises(ValueError, match="contiguous"):
        prefix_lm_inputs(ids, torch.tensor([[1, 2, 1, 0]]), None, 0, 4, glm_config)
    with pytest.raises(ValueError, match="integer segment ids"):
        prefix_lm_inputs(ids, torch.tensor([[1.0, 2.0, 2.0, 0.0]]), None, 0, 4, glm_config)
    with pytest.raises(ValueError, match="cannot continue a KV cache"):
        prefix_lm_inputs(ids[:, -1:], torch.tensor([[1, 2, 2, 2]]), torch.zeros(1, 2, 1, dtype=torch.long), 3, 1, glm_config)
    # a 0/1 padding mask with a hole is still the one-row case, as before packing
    prefix_lm_inputs(ids, torch.tensor([[1, 0, 1, 1]]), None, 0, 4, glm_config)


def tiny_chatglm3(attention: str):
    """A random tiny ChatGLM3 (the model tests' shape: 2 layers, width 64, 2 key/value groups), float32."""
    from instructglm.models.chatglm3.config import ChatGLM3Config
    from instructglm.models.chatglm3.model import ChatGLM3ForConditionalGeneration

    config = ChatGLM3Config(
        padded_vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16,
        ffn_hidden_size=96, multi_query_group_num=2, seq_length=256, initializer_range=0.2,
    )
    config._attn_implementation = attention
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ChatGLM3ForConditionalGeneration(config).train()


def chatglm3_rows(count=3) -> list[dict]:
    generator = torch.Generator().manual_seed(3)
    rows = []
    for prompt, answer in [(6, 5), (9, 3), (4, 8)][:count]:
        ids = [64 % 128, 65 % 128] + torch.randint(3, 100, (prompt + answer,), generator=generator).tolist() + [2]
        rows.append({"input_ids": ids, "seq_len": prompt + 2})
    return rows


@pytest.mark.parametrize("family", ["chatglm-6b", "chatglm3"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_chatglm_rows_equal_rows_alone(tiny_chatglm_dir, chatglm_dataset, family, attention):
    from transformers import AutoModelForCausalLM

    if family == "chatglm-6b":
        model = AutoModelForCausalLM.from_pretrained(str(tiny_chatglm_dir), dtype=torch.float32, attn_implementation=attention)
        rows, pad, tail = pick_rows(chatglm_dataset), model.config.pad_token_id, 1
    else:
        model, rows, pad, tail = tiny_chatglm3(attention), chatglm3_rows(), 0, 0
    model.config.use_cache = False
    batch = PackedCollator(pad_token_id=pad, labelled_prompt_tail=tail, attention="segment_ids", pad_to_multiple_of=64)(
        [{"rows": rows}]
    )
    assert batch["attention_mask"].max() == len(rows) and batch["attention_mask"].eq(0).any()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    alone = CausalLMCollator(pad_token_id=pad, labelled_prompt_tail=tail)
    for k, row_loss in enumerate(packed_row_losses(logits, batch["labels"], batch["attention_mask"])):
        reference = model(**alone([rows[k]])).loss
        torch.testing.assert_close(row_loss, reference, rtol=1e-5, atol=1e-5, msg=f"row {k} loss")
        assert_same_grads(grads(model, row_loss), grads(model, reference), f"{family} {attention} row {k}")
    # the batch loss is the mean over all labelled tokens: the same rows padded give the same loss
    torch.testing.assert_close(model(**batch).loss, model(**alone(rows)).loss, rtol=1e-5, atol=1e-6)
