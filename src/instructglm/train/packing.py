"""Packing: several tokenized rows per training sequence, each row isolated from the others.

Instruction rows are short and uneven (BELLE's median row is a third of `--max_seq_length` 320), so
padded batches spend most of their compute on padding. Packing puts whole rows one after another
into sequences of up to `max_seq_length` tokens; attention stays inside each row and positions
restart at every row, so each row's loss and gradients are exactly those it has alone.

How rows are grouped (`pack_indices`, a pure function of the row lengths and a seed):
- the dataset's indices are shuffled (numpy's legacy `RandomState(seed)`, whose stream numpy keeps
  fixed across versions), then cut into windows of `window` rows;
- inside a window, rows go first-fit decreasing: longest first, each into the first open sequence
  with room, else a new one. No row is ever cut; a row longer than `max_seq_length` is an error;
- each window's sequences are shuffled (same generator) so the part-filled ones do not come last.
`PackedDataset` does this once, at construction, and is a plain indexable dataset of packs: the
Trainer's seeded sampler shuffles the packs, and on `--resume_from_checkpoint` it rebuilds the same
packs from the same seed and skips the batches already seen, so resume stays exact. Every epoch
sees the same packs in a new order, and every DDP rank builds the same packs.

The packed batch (`PackedCollator`), for a batch of b packs padded on the right to width T:
- `input_ids` [b, T]: the rows' ids back to back, then the pad id;
- `labels` [b, T]: each row's labels (its `labels` column, else -100 on the prompt except the
  family's labelled prompt tail, see `collator.row_labels`); -100 on padding and on the FIRST
  token of every row, so no token is ever trained to predict the next row's first token (the
  causal loss shifts: logits at i are scored against labels[i + 1]);
- the row layout, in one of two forms (`attention`):
  - "position_ids" (transformers' own models, e.g. Llama): `position_ids` [b, T], 0, 1, 2, ... per
    row; padding counts 0, 1, 2, ... as one more row. No `attention_mask`: with no 2-D mask and no
    KV cache (`use_cache=False`), transformers' `masking_utils` finds the rows where positions
    restart (`find_packed_sequence_indices`) and builds block-diagonal causal attention for
    eager, sdpa and flex attention. (With a cache, or a 2-D mask, that detection is off and rows
    would see each other: the recipe must run packed batches with `use_cache=False`.)
    transformers' flash-attention path infers rows from `position_ids` only for a batch of one
    row; for b > 1, `flash_attention_kwargs=True` adds its varlen boundaries over the flattened
    batch (`cu_seq_lens_q/k` int32, padding as one more sequence, and `max_length_q/k`), the
    keys `DataCollatorWithFlattening` emits (the eager/sdpa paths ignore them).
  - "segment_ids" (InstructGLM's native models): `attention_mask` [b, T] of segment ids: 1, 2,
    ..., k for the k rows of a pack in order, each row one contiguous run, 0 on padding. A plain
    padding mask (0/1) is the one-row case, so a model that implements this contract keeps its
    unpacked behaviour unchanged. No `position_ids`: the model derives them from the segments.
The loss of a packed batch is what the model's loss is anyway: the mean over all labelled tokens
of the batch (under the Trainer, of all its gradient-accumulation steps: `num_items_in_batch`),
not a mean of per-row means; so packing changes no row's weight, and a packed batch has the same
loss as the same rows padded.

The contract a native model implements for `attention="segment_ids"` (both ChatGLM models do, in their one mask
builder): from `segment_ids` [b, T] (0 = padding, 1..k = rows, each a contiguous run) and `input_ids`, without a
KV cache,
- ChatGLM-6B (prefix LM, 2-D positions): `instructglm.models.chatglm.model.prefix_lm_inputs`;
  - key j is visible to query i iff seg[i] == seg[j] != 0 and (j <= i, or j lies in the context of its row:
    before the row's first `<sop>` (bos), the whole row if it has none). A padding query sees nothing (THUDM's
    convention: its softmax is uniform and its output unused). (`prefix_lm_allowed`; on a GPU the same function
    is FlexAttention's `mask_mod` under `attn_implementation="flex_attention"`.)
  - position_ids [b, 2, T], per row as if the row stood alone at index 0: position = index in the row on the
    context, and from `<sop>` on the row's first `[gMASK]` (else `[MASK]`) index in the row, if its context has
    one; block position = 0 on the context, 1, 2, ... from `<sop>`; padding 0 in both (`prefix_lm_positions`).
- ChatGLM2/3 (causal, 1-D rotary): `instructglm.models.chatglm3.model.chatglm_attention_mask` and
  `position_ids_from_mask`: key j visible to query i iff seg[i] == seg[j] != 0 and j <= i (a padding query sees
  every key, THUDM's rule); position = index within the row (0 at the row's first token).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from instructglm.errors import BadValue
from instructglm.train.collator import IGNORE_INDEX, pad_token_id_for, row_labels

# Rows per first-fit-decreasing window: a few hundred packs, enough to fill nearly every one of
# them and small enough that packs stay a random mix of the dataset.
DEFAULT_WINDOW = 1000
ATTENTION_FORMS = ("position_ids", "segment_ids")
# Native model types whose models build their masks from segment ids (see the module docstring): ChatGLM-6B and
# ChatGLM2/3 all say `model_type: "chatglm"`, and both native models implement the contract.
SEGMENT_ID_MODEL_TYPES: frozenset[str] = frozenset({"chatglm"})


# ---------------------------------------------------------------------------------------------------------------------
# Which rows go together
# ---------------------------------------------------------------------------------------------------------------------


def row_lengths(rows: Any) -> np.ndarray:
    """Tokens per row of a tokenized dataset: a `datasets.Dataset` (read from Arrow) or any sequence of rows."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency; a plain list still works without it
        datasets = None
    if datasets is not None and isinstance(rows, datasets.Dataset):
        import pyarrow.compute as pc

        column = rows.with_format("arrow")["input_ids"]  # follows any select/shuffle of the dataset
        return np.asarray(pc.list_value_length(column).to_numpy(zero_copy_only=False), dtype=np.int64)
    return np.array([len(row["input_ids"]) for row in rows], dtype=np.int64)


def pack_indices(
    lengths: Sequence[int] | np.ndarray, max_seq_length: int, seed: int = 0, window: int = DEFAULT_WINDOW
) -> list[list[int]]:
    """Group row indices into packs of at most `max_seq_length` tokens (see the module docstring).

    Args:
        lengths: tokens of each row; row i is index i.
        max_seq_length: the most tokens one pack holds.
        seed: shuffles the rows before windowing and each window's packs; same seed, same packs.
        window: rows per first-fit-decreasing window.

    Returns:
        The packs in training order, each a list of row indices (longest row first).

    Raises:
        BadValue: a row is empty or longer than `max_seq_length` (naming the first few), or a bad
            `max_seq_length`/`window`.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if max_seq_length < 1 or window < 1:
        raise BadValue(f"packing needs max_seq_length >= 1 and window >= 1, got {max_seq_length} and {window}")
    bad = np.flatnonzero((lengths > max_seq_length) | (lengths < 1))
    if len(bad):
        shown = ", ".join(f"row {i} ({lengths[i]} tokens)" for i in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise BadValue(
            f"{len(bad)} row(s) do not fit one packed sequence of --max_seq_length {max_seq_length} tokens: {shown}; "
            f"packing never cuts a row: re-run `instructglm tokenize --max_seq_length {max_seq_length}` "
            "(it cuts targets to fit) or raise --max_seq_length"
        )
    generator = np.random.RandomState(seed)  # legacy generator: its stream is frozen across numpy versions
    order = generator.permutation(len(lengths))
    packs: list[list[int]] = []
    for start in range(0, len(order), window):
        members = order[start : start + window]
        members = members[np.argsort(-lengths[members], kind="stable")]  # longest first; ties keep the shuffle
        room = np.full(len(members), max_seq_length, dtype=np.int64)  # one pack per row at most
        window_packs: list[list[int]] = []
        for index in members.tolist():
            size = lengths[index]
            first = int(np.argmax(room[: len(window_packs) + 1] >= size))  # the fresh pack at the end always fits
            if first == len(window_packs):
                window_packs.append([])
            window_packs[first].append(index)
            room[first] -= size
        packs.extend(window_packs[i] for i in generator.permutation(len(window_packs)).tolist())
    return packs


class PackedDataset(torch.utils.data.Dataset):
    """A tokenized dataset regrouped into packs: item i is `{"rows": [the rows of pack i]}`.

    Built once from a seed (`pack_indices`), so it is the same on every rank and on every resume.
    `PackedCollator` turns a list of its items into a batch.
    """

    def __init__(self, rows: Any, max_seq_length: int, seed: int = 0, window: int = DEFAULT_WINDOW):
        self.rows = rows
        self.max_seq_length = max_seq_length
        lengths = row_lengths(rows)
        self.packs = pack_indices(lengths, max_seq_length, seed, window)
        self.num_tokens = int(lengths.sum())

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, index: int) -> dict[str, list]:
        return {"rows": [self.rows[i] for i in self.packs[index]]}

    @property
    def fill(self) -> float:
        """Real tokens over the packs' capacity (len * max_seq_length): 1.0 is no padding at all."""
        return self.num_tokens / max(len(self.packs) * self.max_seq_length, 1)

    def summary(self) -> str:
        return (
            f"{len(self.rows)} rows packed into {len(self.packs)} sequences of up to {self.max_seq_length} tokens "
            f"({self.fill:.1%} filled)"
        )


# ---------------------------------------------------------------------------------------------------------------------
# The packed batch
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PackedCollator:
    """Packs (`PackedDataset` items, or single rows) -> a packed batch (contract in the module docstring)."""

    pad_token_id: int
    # trailing prompt ids that are labelled (ModelFamily.labelled_prompt_tail)
    labelled_prompt_tail: int = 0
    # how the rows are marked: "position_ids" (transformers' models) or "segment_ids" (native models)
    attention: str = "position_ids"
    # round the width up (e.g. 8 for tensor cores); None pads to the longest pack
    pad_to_multiple_of: int | None = None
    # if set, a pack longer than this is an error
    max_seq_length: int | None = None
    # also emit flash-attention varlen boundaries (cu_seq_lens_q/k, max_length_q/k), "position_ids" form only
    flash_attention_kwargs: bool = False

    def __post_init__(self):
        if self.attention not in ATTENTION_FORMS:
            raise ValueError(f"PackedCollator(attention={self.attention!r}): choose one of {ATTENTION_FORMS}")
        if self.flash_attention_kwargs and self.attention != "position_ids":
            raise ValueError("PackedCollator(flash_attention_kwargs=True) is for the 'position_ids' form")

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        packs = [feature["rows"] if "rows" in feature else [feature] for feature in features]
        totals = [sum(len(row["input_ids"]) for row in pack) for pack in packs]
        if self.max_seq_length is not None and max(totals) > self.max_seq_length:
            raise ValueError(f"a pack of {max(totals)} tokens is longer than max_seq_length={self.max_seq_length}")
        width = max(totals)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(packs), width)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        segment_ids = torch.zeros(shape, dtype=torch.long)
        sequence_lengths: list[int] = []  # every row, and each pack's padding, over the flattened batch
        for b, pack in enumerate(packs):
            start = 0
            for k, row in enumerate(pack):
                row_ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
                end = start + len(row_ids)
                input_ids[b, start:end] = row_ids
                labels[b, start:end] = row_labels(row, self.labelled_prompt_tail, where=f"row {k} of pack {b}")
                labels[b, start] = IGNORE_INDEX  # no label predicted from the previous row's last token
                position_ids[b, start:end] = torch.arange(len(row_ids))
                segment_ids[b, start:end] = k + 1
                sequence_lengths.append(len(row_ids))
                start = end
            position_ids[b, start:] = torch.arange(width - start)  # padding: one more "row" of its own
            if start < width:
                sequence_lengths.append(width - start)
        batch: dict[str, Any] = {"input_ids": input_ids, "labels": labels}
        if self.attention == "position_ids":
            batch["position_ids"] = position_ids
        else:
            batch["attention_mask"] = segment_ids
        if self.flash_attention_kwargs:
            boundaries = torch.zeros(len(sequence_lengths) + 1, dtype=torch.int32)
            boundaries[1:] = torch.cumsum(torch.tensor(sequence_lengths), 0)
            batch.update(cu_seq_lens_q=boundaries, cu_seq_lens_k=boundaries.clone())
            batch.update(max_length_q=max(sequence_lengths), max_length_k=max(sequence_lengths))
        return batch


def packed_collator_for(tokenizer, model_type: Any, max_seq_length: int | None = None) -> PackedCollator:
    """The packed collator for a tokenizer and a `config.model_type` (or the model's config itself).

    transformers' own models get "position_ids" batches; a native family gets "segment_ids" batches
    once its model implements that contract (`SEGMENT_ID_MODEL_TYPES`), and until then packing is
    refused rather than silently letting rows attend to each other. The family (and so the labelled
    prompt tail) comes from `registry.family_for`, which is given the config when one is passed.

    Raises:
        BadValue: the model type's native model does not isolate packed rows yet.
    """
    from instructglm.models.registry import CAUSAL_LM, family_for

    family = family_for(model_type)
    model_type = getattr(model_type, "model_type", model_type)
    if family is CAUSAL_LM:
        attention = "position_ids"
    elif model_type in SEGMENT_ID_MODEL_TYPES:
        attention = "segment_ids"
    else:
        raise BadValue(
            f"--packing is not supported for model_type {model_type!r} ({family.name}) yet: its model does not "
            "keep packed rows apart; train without --packing"
        )
    return PackedCollator(
        pad_token_id=pad_token_id_for(tokenizer),
        labelled_prompt_tail=family.labelled_prompt_tail,
        attention=attention,
        max_seq_length=max_seq_length,
    )
