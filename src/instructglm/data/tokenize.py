"""`instructglm tokenize`: a converted jsonl of {context, target} -> a tokenized Arrow dataset.

Each row becomes two columns (the contract `train` reads):

    input_ids = prefix + ids(context) + suffix + ids(target) + [eos]
    seq_len   = len(prefix + ids(context) + suffix)       # the prompt, special tokens included

`prefix`/`suffix` are the special tokens the tokenizer itself puts around one sequence, found
once by comparing `encode(x)` with `encode(x, add_special_tokens=False)`: ChatGLM-6B appends
`[gMASK] <sop>`, a Llama tokenizer prepends `<s>`, GPT-2 adds nothing. For ChatGLM-6B that makes
`input_ids` exactly the 2023 seed's `encode(context) + encode(target, add_special_tokens=False)
+ [eos]`. Any tokenizer `AutoTokenizer` loads works; the model family (from the model's
config.json) only checks that the tokens it labels at the end of the prompt are really there.

Model families with role tokens (ChatGLM3-6B, GLM-4, any tokenizer with a chat template; see
`instructglm.models.registry`) write every row through their chat format instead, and add a third
column (the collator takes labels from it when present):

    input_ids = the family's ids of the conversation        # ModelFamily.encode
    labels    = input_ids where trained, -100 elsewhere     # every assistant turn and its end of turn
    seq_len   = index of the first labelled token           # for readers of the two-column layout

A (context, target) row is the conversation [user: context, assistant: target] then, so training
sees the prompt the way chat shows it; a whole conversation (`convert --template messages`, a
`{"messages", "tools"}` line) is encoded as it is, every assistant turn trained in the one row. For
the text families (ChatGLM-6B, ChatGLM2-6B, a causal LM without a chat template) a conversation
becomes (context, target) through the family's round template (`chatglm`, `chatglm2`, `plain`),
its last answer the target, and joins the two-column path below; one using tools cannot, and is
dropped as `dropped_unsupported` (so is one a chat template refuses).

Truncation of a conversation row (`chat_formats.fit`): a prompt is never cut inside a turn. The
first trained turn that does not fit is cut at the end of its content, keeping its end-of-turn
token, when one content token fits; otherwise the row ends after the last turn that fits whole.
Later turns are dropped: the row counts as `truncated`, the turns lost as `turns_dropped`.

Truncation rule of a two-column row (the seed clipped prompt and target to the limit each, so rows reached twice it):
- `len(input_ids) <= max_seq_length`, always, and the special tokens and eos are never cut.
- The prompt is never cut: its tail is the template ("Answer: ") and the tokens the model keys
  on, and a prompt cut anywhere is no longer the question the answer belongs to.
- The target is cut at its end to fit; eos is still appended (counted as `truncated`).
- A row dropped as `prompt_too_long` is one whose prompt + specials + eos leave no room for a
  single target token; `empty_target` is one whose target encodes to no tokens.
- A `max_seq_length` below specials + 2 fits no row at all and is an error, not a run that
  drops everything.

Bad input stops the run: the jsonl is `convert`'s output, so a malformed line or a row without
string `context`/`target` means the wrong or a damaged file. Every such line is collected and the
error names the first few as `file:line` with the fix (re-run `instructglm convert`, which skips
and counts bad source rows), instead of training on a silently shrunken dataset.

Rows are tokenized in batches, one tokenizer call per batch for prompts and targets together,
by `--num_proc` worker processes (forked where the OS can, so the tokenizer is inherited, not
pickled), with a progress bar; the result does not depend on `--num_proc` or `--batch_size`.

Workers die with the process that started them (Linux: `PR_SET_PDEATHSIG`; elsewhere a thread
watching the parent), so a `kill -9` of tokenize leaves no worker running.

Saving: the dataset is written to a temporary directory beside `save_path`, then swapped in with
one atomic `renameat2(RENAME_EXCHANGE)` (Linux), so a kill at any instant leaves either the old
dataset or the complete new one at `save_path`, never nothing and never a mix; the old one, now at
the temporary name, is deleted after. Where the exchange is not available (another OS, a file
system without it) the old dataset is renamed aside first; a kill between that rename and the
next leaves it aside under a name that the next run puts back (`recover_interrupted_swap`), and
what killed runs left beside `save_path` is removed by the next run. An exchange keeps
`save_path` a plain directory (a symlink swap would also be atomic, but would turn it into a link
that `cp -r`, `rsync` and other tools treat differently). An existing `save_path` is replaced only
if everything in it belongs to a saved dataset (or it is empty): a directory that also holds the
input jsonl, notes or anything else is refused, not emptied.

`instructglm_data.json` in the dataset directory records the template and where it came from:
`template_source` is `convert` (from convert's sidecar `<jsonl>.meta.json`, when it describes this
very file), `detected` (`templates.detect_template` on the contexts, for a jsonl made by the 2023
scripts) or `unknown`; plus the tokenizer, `max_seq_length` and the counts.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import sys
import threading
import uuid
from array import array
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instructglm.data.io import (
    fingerprint,
    fsync_dir,
    iter_json_rows,
    release,
    remove_stale_siblings,
    stale_siblings,
    temp_sibling,
    write_json,
)
from instructglm.data.chat_formats import (
    EMPTY_TARGET,
    KEPT,
    PROMPT_TOO_LONG,
    TRUNCATED,
    UNSUPPORTED,
    Encoded,
    first_label,
    fit,
)
from instructglm.data.messages import Conversation, Message
from instructglm.data.records import BadRow, DataError, text_problem
from instructglm.data.templates import MESSAGES, detect_template
from instructglm.layout import DATA_META, jsonl_meta_path
from instructglm.models.loading import generation_config_of, load_tokenizer, model_config_of
from instructglm.models.registry import family_for

# Outcomes of one row (`RowEncoder.encode`) each name the `TokenizeCounts` field they count under:
# KEPT, TRUNCATED, PROMPT_TOO_LONG, EMPTY_TARGET, UNSUPPORTED (from chat_formats).


@dataclass
class TokenizeCounts:
    """What happened to the rows of one jsonl."""

    rows: int = 0  # rows read
    kept: int = 0  # rows written, truncated ones included
    truncated: int = 0  # kept rows whose target was cut at its end to fit
    dropped_prompt_too_long: int = 0  # prompt + specials + eos leave no room for one target token
    dropped_empty_target: int = 0  # the target encodes to no tokens
    dropped_unsupported: int = 0  # a conversation the model family cannot express (tools in a text family, ...)
    turns_dropped: int = 0  # trained turns of truncated conversations that did not fit

    def add(self, other: TokenizeCounts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def summary(self) -> str:
        turns = f", {self.turns_dropped} later turn(s) dropped" if self.turns_dropped else ""
        unsupported = f", {self.dropped_unsupported} the model family cannot express" if self.dropped_unsupported else ""
        return (
            f"rows {self.rows}: kept {self.kept} (truncated {self.truncated}{turns}), dropped "
            f"{self.dropped_prompt_too_long} prompt too long, {self.dropped_empty_target} empty target{unsupported}"
        )


def special_tokens_around(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer adds before and after one sequence with `add_special_tokens=True`.

    Found from probe texts, so no family or tokenizer class needs to be known. An eos appended by
    the tokenizer (Llama's `add_eos_token=True`) is left out of the suffix: it ends the whole row,
    which gets its own eos, not the prompt.
    """
    found = set()
    for probe in ("hello world", "你好，世界"):
        plain = tokenizer.encode(probe, add_special_tokens=False)
        full = tokenizer.encode(probe)
        starts = [i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain]
        if not plain or not starts:
            raise DataError(
                f"cannot tell which special tokens {type(tokenizer).__name__} adds: encode({probe!r}) = {full} "
                f"does not contain encode({probe!r}, add_special_tokens=False) = {plain}"
            )
        start = starts[0]
        found.add((tuple(full[:start]), tuple(full[start + len(plain) :])))
    if len(found) != 1:
        raise DataError(
            f"{type(tokenizer).__name__} adds different special tokens to different texts ({sorted(found)}); "
            "tokenize needs a fixed prefix/suffix"
        )
    prefix, suffix = (list(part) for part in found.pop())
    while suffix and suffix[-1] == tokenizer.eos_token_id:
        suffix.pop()
    return prefix, suffix


class RowEncoder:
    """Turns (context, target) texts and whole conversations into rows under the truncation rules; picklable.

    Args:
        tokenizer: the model's tokenizer.
        max_seq_length: the longest row in tokens.
        model_type: config.json's `model_type`, or the whole config (object or dict); with the tokenizer it
            decides the model family (`family_for`).
        generation_config: the model's generation config (object or dict), whose eos ids are stop tokens a
            chat template's turn may end with.
    """

    def __init__(self, tokenizer, max_seq_length: int, model_type=None, generation_config=None):
        if tokenizer.eos_token_id is None:
            raise DataError(
                f"{type(tokenizer).__name__} has no eos token; set `eos_token` in its tokenizer_config.json"
            )
        self.tokenizer = tokenizer
        self.prefix, self.suffix = special_tokens_around(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id
        self.max_seq_length = max_seq_length
        family = self.family = family_for(model_type, tokenizer)
        self.stop_ids = family.stop_token_ids(tokenizer, generation_config) if family.role_tokens else None
        if family.labelled_prompt_tail > len(self.suffix):
            raise DataError(
                f"the {family.name} family labels the last {family.labelled_prompt_tail} prompt token(s), but "
                f"{type(tokenizer).__name__} appends {self.suffix} to the prompt: is this the model's own tokenizer?"
            )
        specials = len(self.prefix) + len(self.suffix)
        if max_seq_length < specials + 2:  # + one target token + eos
            raise DataError(
                f"--max_seq_length {max_seq_length} fits no row: the tokenizer adds {specials} special token(s) "
                f"and eos, so a row needs at least {specials + 2}; raise --max_seq_length"
            )

    def encode(self, context_ids: list[int], target_ids: list[int]) -> tuple[list[int] | None, int, str]:
        """(input_ids, seq_len, outcome) of one row from its text ids; a dropped row has `None` ids.

        `outcome` names the `TokenizeCounts` field the row counts under, besides `rows`.
        """
        if not target_ids:
            return None, 0, EMPTY_TARGET
        prompt = self.prefix + context_ids + self.suffix
        room = self.max_seq_length - len(prompt) - 1  # -1: eos
        if room < 1:
            return None, 0, PROMPT_TOO_LONG
        if len(target_ids) > room:
            return prompt + target_ids[:room] + [self.eos_token_id], len(prompt), TRUNCATED
        return prompt + target_ids + [self.eos_token_id], len(prompt), KEPT

    def encode_batch(self, contexts: list[str], targets: list[str]):
        """(`pyarrow.Table` of the kept rows' input_ids and seq_len, `TokenizeCounts`, dropped) of a batch.

        `dropped` lists (position in the batch, outcome) of every row left out, so they can be located.
        A role-token family writes each row as the conversation [user: context, assistant: target], and
        the table also has `labels`.
        """
        if self.family.role_tokens:
            conversations = [
                Conversation((Message("user", context), Message("assistant", target))) if target.strip() else None
                for context, target in zip(contexts, targets, strict=True)
            ]
            return self.encode_conversations(conversations)
        return self._encode_text_batch(contexts, targets)

    def encode_conversations(self, conversations: list[Conversation | None]):
        """`encode_batch` for whole conversations (None: an empty target); the table has labels for a role family.

        `dropped` entries of rows the family cannot express carry a third item: why.
        """
        if not self.family.role_tokens:
            return self._encode_flattened(conversations)
        counts = TokenizeCounts(rows=len(conversations))
        rows: list[Encoded] = []
        dropped: list[tuple] = []
        for position, conversation in enumerate(conversations):
            row, outcome, detail = self._fit(conversation)
            setattr(counts, outcome, getattr(counts, outcome) + 1)
            if row is not None:
                rows.append(row)
                counts.turns_dropped += detail
            else:
                dropped.append((position, outcome, detail) if outcome == UNSUPPORTED else (position, outcome))
        counts.kept += counts.truncated
        columns = {
            "input_ids": [row.input_ids for row in rows],
            "labels": [row.labels for row in rows],
            "seq_len": [first_label(row.labels) for row in rows],
        }
        return _table(columns), counts, dropped

    def _fit(self, conversation: Conversation | None) -> tuple[Encoded | None, str, Any]:
        """(row or None, outcome, trained turns dropped or why unsupported) of one conversation of a role family."""
        if conversation is None:
            return None, EMPTY_TARGET, None
        try:
            encoded = self.family.encode(self.tokenizer, conversation, self.stop_ids)
        except BadRow as bad:
            return None, UNSUPPORTED, f"{bad.reason}: {bad.detail}"
        return fit(encoded, self.max_seq_length)

    def _encode_flattened(self, conversations: list[Conversation | None]):
        """A text family's conversations: each as (context, target) through its round template, then the text path."""
        contexts, targets, positions, unsupported = [], [], [], []
        for position, conversation in enumerate(conversations):
            if conversation is None:
                contexts.append("")
                targets.append("")
                positions.append(position)
                continue
            try:
                context, target = self.family.chat_format.context_target(conversation)
            except BadRow as bad:
                unsupported.append((position, UNSUPPORTED, f"{bad.reason}: {bad.detail}"))
                continue
            contexts.append(context)
            targets.append(target)
            positions.append(position)
        table, counts, dropped = self._encode_text_batch(contexts, targets)
        counts.rows += len(unsupported)
        counts.dropped_unsupported += len(unsupported)
        dropped = sorted([(positions[i], *rest) for i, *rest in dropped] + unsupported)
        return table, counts, dropped

    def _encode_text_batch(self, contexts: list[str], targets: list[str]):
        # one tokenizer call for prompts and targets: the batched (Rust / sentencepiece) path
        ids = self.tokenizer(contexts + targets, add_special_tokens=False)["input_ids"] if contexts else []
        counts = TokenizeCounts(rows=len(contexts))
        input_ids, seq_lens, dropped = [], [], []
        for position, (context_ids, target_ids) in enumerate(zip(ids[: len(contexts)], ids[len(contexts) :], strict=True)):
            row, seq_len, outcome = self.encode(context_ids, target_ids)
            setattr(counts, outcome, getattr(counts, outcome) + 1)
            if row is None:
                dropped.append((position, outcome))
            else:
                input_ids.append(row)
                seq_lens.append(seq_len)
        counts.kept += counts.truncated
        return _table({"input_ids": input_ids, "seq_len": seq_lens}), counts, dropped

    def __getstate__(self) -> dict[str, Any]:
        # Pickled only where workers are spawned, not forked, or when a caller hands this to
        # `datasets.map(num_proc=...)`: dill's pure-Python pickler takes ~1 s over ChatGLM's
        # vocabulary, while bytes from the C pickler take ~0.05 s.
        return {**self.__dict__, "tokenizer": pickle.dumps(self.tokenizer)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, tokenizer=pickle.loads(state["tokenizer"]))


def _table(columns: dict[str, list]):
    """A `pyarrow.Table` of list-of-int columns (and int `seq_len`).

    Arrow arrays from flat buffers: building them from lists of lists would cost as much as the
    tokenizer call does.
    """
    import pyarrow as pa

    arrays = {}
    for name, rows in columns.items():
        if name == "seq_len":
            arrays[name] = pa.array(rows, type=pa.int64())
            continue
        offsets = np.zeros(len(rows) + 1, dtype=np.int32)
        np.cumsum([len(row) for row in rows], out=offsets[1:])
        values = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=int(offsets[-1]))
        arrays[name] = pa.ListArray.from_arrays(pa.array(offsets), pa.array(values))
    return pa.table(arrays)


@dataclass
class JsonlRows:
    """The rows of a converted jsonl, and where each one is (without a string per row).

    A jsonl holds (context, target) rows or whole conversations (`convert --template messages`), not both.
    """

    path: str
    contexts: list[str]
    targets: list[str]
    positions: array  # each row's line number (JSON Lines) or index (a JSON array)
    in_array: bool = False
    conversations: list[Conversation] | None = None  # the rows of a messages jsonl (contexts/targets then empty)

    def __len__(self) -> int:
        return len(self.conversations) if self.conversations is not None else len(self.contexts)

    def batches(self, batch_size: int):
        """(start, batch) pairs: (contexts, targets) tuples, or lists of conversations."""
        for start in range(0, len(self), batch_size):
            if self.conversations is not None:
                yield start, self.conversations[start : start + batch_size]
            else:
                yield start, (self.contexts[start : start + batch_size], self.targets[start : start + batch_size])

    def location(self, row: int) -> str:
        """`path:LINE` or `path[INDEX]` of row `row`, as `iter_json_rows` names it."""
        position = self.positions[row]
        return f"{self.path}[{position}]" if self.in_array else f"{self.path}:{position}"


def read_jsonl(jsonl_path: str | os.PathLike) -> tuple[list[str], list[str]]:
    """The contexts and targets of a converted jsonl; every bad line is collected and raised at once.

    A jsonl of whole conversations gives ([], []); `read_jsonl_rows` reads those.
    """
    rows = read_jsonl_rows(jsonl_path)
    return rows.contexts, rows.targets


def read_jsonl_rows(jsonl_path: str | os.PathLike) -> JsonlRows:
    """`read_jsonl` with each row's location, or the conversations of a messages jsonl (see `JsonlRows`).

    The first good line decides which kind the file holds; a line of the other kind is a bad line.
    """
    contexts: list[str] = []
    targets: list[str] = []
    conversations: list[Conversation] = []
    kind: str | None = None
    bad: list[str] = []
    positions = array("q")
    prefix = len(str(Path(jsonl_path)))
    in_array = False
    for location, row in iter_json_rows(jsonl_path):
        if isinstance(row, BadRow):
            bad.append(f"{location}: {row}")
            continue
        row_kind = MESSAGES if isinstance(row, dict) and "messages" in row else "text"
        if kind is not None and row_kind != kind:
            bad.append(
                f"{location}: a {'conversation' if row_kind == MESSAGES else 'context/target'} line in a file of "
                f"{'conversations' if kind == MESSAGES else 'context/target rows'}; convert all of it with one --template"
            )
            continue
        if row_kind == MESSAGES:
            try:
                conversations.append(Conversation.from_dict(row))
            except BadRow as problem:
                bad.append(f"{location}: {problem}")
                continue
        elif not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("context", "target")):
            bad.append(f"{location}: {_not_a_text_row(row)}")
            continue
        elif problem := text_problem(row["context"]) or text_problem(row["target"]):
            bad.append(f"{location}: invalid_unicode: {problem}")
            continue
        else:
            contexts.append(row["context"])
            targets.append(row["target"])
        kind = row_kind
        in_array = location[prefix] == "["
        positions.append(int(location[prefix + 1 :].rstrip("]")))
    if bad:
        shown = "\n  ".join(bad[:5]) + (f"\n  ... and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise DataError(
            f"{jsonl_path}: {len(bad)} bad line(s); tokenize reads the jsonl written by `instructglm convert` "
            f'(one {{"context": ..., "target": ...}} or {{"messages": [...]}} per line), re-run convert to get one:\n  {shown}'
        )
    if kind is None:
        raise DataError(f"{jsonl_path}: no rows to tokenize")
    return JsonlRows(
        str(Path(jsonl_path)), contexts, targets, positions, in_array, conversations if kind == MESSAGES else None
    )


# The encoder of a worker process, set once by the pool initializer. With the fork start method
# it is inherited rather than pickled: unpickling a sentencepiece model takes ~0.5 s per worker.
_worker_encoder: RowEncoder | None = None

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _die_with_parent(parent_pid: int) -> None:
    """End this worker when the process that started it ends, however it ends (kill -9 included).

    Linux delivers SIGKILL on the parent's death (`PR_SET_PDEATHSIG`); elsewhere a daemon thread
    polls the parent pid. Checked once after arming, in case the parent died before.
    """
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            armed = False
    if os.getppid() != parent_pid:
        os._exit(1)
    if not armed:
        def watch() -> None:
            while os.getppid() == parent_pid:
                threading.Event().wait(1.0)
            os._exit(1)

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _start_worker(encoder: RowEncoder, parent_pid: int) -> None:
    global _worker_encoder
    _die_with_parent(parent_pid)
    _worker_encoder = encoder


def _encode_in_worker(batch):
    return _encode(_worker_encoder, batch)


def _encode(encoder: RowEncoder, batch):
    """A (contexts, targets) batch or a list of conversations through `encoder`."""
    return encoder.encode_conversations(batch) if isinstance(batch, list) else encoder.encode_batch(*batch)


@contextmanager
def _batch_encoder(encoder: RowEncoder, num_proc: int):
    """A `map`-like callable over (contexts, targets) batches, in order, run by `num_proc` processes."""
    if num_proc == 1:
        yield lambda batches: (_encode(encoder, batch) for batch in batches)
        return
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    # an executor, not a Pool: a worker killed (say, out of memory) fails the run instead of hanging it
    context = multiprocessing.get_context(method)
    with ProcessPoolExecutor(num_proc, context, _start_worker, (encoder, os.getpid())) as pool:
        yield lambda batches: pool.map(_encode_in_worker, batches)


def tokenize_dataset(
    jsonl_path: str | os.PathLike,
    tokenizer,
    max_seq_length: int,
    num_proc: int = 1,
    batch_size: int = 1000,
    model_type=None,
    progress: bool = True,
    generation_config=None,
):
    """Tokenize a converted jsonl in memory; returns (`datasets.Dataset`, `TokenizeCounts`).

    `model_type` (config.json's, or the whole config) and the tokenizer pick the model family
    (`family_for`), which decides the row layout; `generation_config` adds its eos ids to a chat
    template's stop tokens. `num_proc` worker processes tokenize batches of `batch_size` rows; the
    result does not depend on either. Raises `DataError` for bad lines, a tokenizer without eos, a
    `max_seq_length` that fits no row, and when every row is dropped.
    """
    dataset, counts, _ = tokenize_with_meta(
        jsonl_path, tokenizer, max_seq_length, num_proc, batch_size, model_type, progress, generation_config
    )
    return dataset, counts


def tokenize_with_meta(
    jsonl_path: str | os.PathLike,
    tokenizer,
    max_seq_length: int,
    num_proc: int = 1,
    batch_size: int = 1000,
    model_type=None,
    progress: bool = True,
    generation_config=None,
    model_name_or_path: str | None = None,
):
    """`tokenize_dataset`, plus the meta `tokenize_jsonl` records as `instructglm_data.json` (template, family,
    counts, `dropped_at`: the first locations of the rows each outcome dropped); returns (dataset, counts, meta)."""
    encoder = _encoder(tokenizer, max_seq_length, model_type, num_proc, batch_size, generation_config)
    rows = read_jsonl_rows(jsonl_path)
    dataset, counts, dropped_at = _tokenize_rows(encoder, rows, num_proc, batch_size, progress)
    meta = _dataset_meta(jsonl_path, rows, tokenizer, encoder, max_seq_length, counts, model_name_or_path)
    meta["dropped_at"] = dropped_at
    return dataset, counts, meta


def _encoder(tokenizer, max_seq_length: int, model_type, num_proc: int, batch_size: int, generation_config=None) -> RowEncoder:
    if num_proc < 1 or batch_size < 1:
        raise DataError(f"--num_proc {num_proc} and --batch_size {batch_size} must both be at least 1")
    return RowEncoder(tokenizer, max_seq_length, model_type, generation_config)


SHOWN_LOCATIONS = 5  # dropped rows located per outcome in instructglm_data.json and the summary


def _tokenize_rows(encoder: RowEncoder, rows: JsonlRows, num_proc: int, batch_size: int, progress: bool):
    """(dataset, counts, {outcome: first locations of the rows it dropped}) of all `rows`."""
    import datasets
    import pyarrow as pa
    from tqdm.auto import tqdm

    counts = TokenizeCounts()
    tables = []
    dropped_at: dict[str, list[str]] = {}
    starts = range(0, len(rows), batch_size)
    batches = (batch for _, batch in rows.batches(batch_size))
    with _batch_encoder(encoder, min(num_proc, len(starts))) as encode_batches:
        # workers start before the bar: forking after tqdm starts its monitor thread could copy a held lock
        results = encode_batches(batches)
        with tqdm(total=len(rows), unit=" rows", desc="Tokenizing", disable=not progress) as bar:
            for start, (table, batch_counts, dropped) in zip(starts, results, strict=True):
                tables.append(table)
                counts.add(batch_counts)
                for position, outcome, *why in dropped:
                    shown = dropped_at.setdefault(outcome, [])
                    if len(shown) < SHOWN_LOCATIONS:
                        where = rows.location(start + position)
                        shown.append(f"{where} ({why[0]})" if why else where)
                bar.update(batch_counts.rows)
    jsonl_path = rows.path
    if counts.kept == 0:
        raise DataError(f"{jsonl_path}: every row was dropped ({counts.summary()}); {_advice(counts)}")
    table = datasets.table.InMemoryTable(pa.concat_tables(tables).combine_chunks())
    # an in-memory dataset is never cached; a given fingerprint spares hashing every token
    return datasets.Dataset(table, fingerprint=uuid.uuid4().hex), counts, dropped_at


# Files `datasets.save_to_disk` writes for a Dataset (a DatasetDict: dataset_dict.json and one
# such dir per split), the `cache-*.arrow` files `datasets` adds beside them, and ours.
_DATASET_FILES = ("dataset_info.json", "state.json", DATA_META)
_DATASET_FILE_PATTERNS = ("data-*-of-*.arrow", "dataset.arrow", "cache-*.arrow")


def _is_dataset_file(path: Path) -> bool:
    import fnmatch

    return path.is_file() and not path.is_symlink() and (
        path.name in _DATASET_FILES or any(fnmatch.fnmatch(path.name, pattern) for pattern in _DATASET_FILE_PATTERNS)
    )


def _foreign_entries(directory: Path) -> list[str]:
    """Entries of `directory` that are no part of a saved Dataset or DatasetDict (so not ours to delete)."""
    entries = sorted(directory.iterdir())
    if not any(p.name == "dataset_dict.json" for p in entries):
        return [p.name for p in entries if not _is_dataset_file(p)]
    foreign = []  # a DatasetDict: every other entry is one split's dataset dir
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            foreign += [f"{p.name}/{sub}" for sub in _foreign_entries(p)]
        elif p.name not in ("dataset_dict.json", DATA_META):
            foreign.append(p.name)
    return foreign


def _check_save_path(save_path: Path) -> None:
    """Refuse to replace anything but an earlier saved dataset (or an empty directory)."""
    if not save_path.exists():
        return
    if not save_path.is_dir():
        raise DataError(f"--save_path {save_path} is a file; give a directory for the dataset")
    foreign = _foreign_entries(save_path)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise DataError(
            f"--save_path {save_path} holds {shown}, not part of a saved dataset; tokenize replaces the whole "
            "directory, so choose a new or dataset-only directory (or move those files out)"
        )


RENAME_EXCHANGE = 2  # from <linux/fs.h>
AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> None:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); OSError where unsupported."""
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, "renameat2 is Linux only")
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        raise OSError(errno.ENOSYS, "this C library has no renameat2") from None
    if renameat2(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(a), None, str(b))


# renameat2 errors that mean "no exchange here" rather than a failure of this swap
_NO_EXCHANGE = frozenset({errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV})


def _swap_in(tmp: Path, target: Path) -> None:
    """Put the complete dataset dir `tmp` at `target`; at every instant `target` holds the old one or the new one."""
    if not target.exists():
        os.rename(tmp, target)
        fsync_dir(target.parent)
        return
    try:
        _exchange(tmp, target)  # the old dataset is now at `tmp`
        old = tmp
    except OSError as error:
        if error.errno not in _NO_EXCHANGE:
            raise
        # rename-aside: a kill between these two renames leaves the old one aside, restored next run
        old = temp_sibling(target, "old")
        os.rename(target, old)
        os.rename(tmp, target)
    fsync_dir(target.parent)
    try:
        shutil.rmtree(old)
    finally:
        release(old)


def recover_interrupted_swap(save_path: str | os.PathLike) -> bool:
    """Put back an old dataset that a killed fallback swap left aside, if `save_path` is empty; True if it did.

    Then remove what killed runs left beside `save_path` (half-written datasets, old ones).
    """
    save_path = Path(save_path)
    restored = False
    if not save_path.exists():
        aside = [entry for entry, kind in stale_siblings(save_path) if kind == "old" and entry.is_dir()]
        if aside:
            os.rename(aside[-1], save_path)  # the newest: the one the last run put aside
            restored = True
    remove_stale_siblings(save_path)
    return restored


def read_convert_meta(jsonl_path: str | os.PathLike) -> dict[str, Any] | None:
    """Convert's sidecar of `jsonl_path`, or None when there is none or it describes another version of the file.

    A sidecar records the jsonl's size and sha256 (older ones do not and are taken as they are);
    one that does not match — a kill between convert's two renames, or a jsonl edited since — is
    ignored with a warning, so its template is not applied to data it does not describe.
    """
    sidecar = Path(jsonl_meta_path(jsonl_path))
    if not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        print(f"warning: {sidecar} is not valid JSON ({error}); ignoring it", file=sys.stderr)
        return None
    if not isinstance(meta, dict):
        return None
    recorded = {key: meta.get(key) for key in ("jsonl_bytes", "jsonl_sha256")}
    if recorded["jsonl_sha256"] is not None and recorded != fingerprint(jsonl_path):
        print(
            f"warning: {sidecar} does not describe {jsonl_path} as it is now (size or sha256 differ); "
            "ignoring it: re-run `instructglm convert` to get a matching pair",
            file=sys.stderr,
        )
        return None
    return meta


# templates that are one model family's chat rounds, and whose they are
ROUND_TEMPLATES = {"chatglm": "ChatGLM-6B", "chatglm2": "ChatGLM2-6B"}


def _template_of(convert_meta: dict[str, Any] | None, rows: JsonlRows) -> tuple[str, str]:
    """(template, template_source): convert's, else the one every context shows (a jsonl of conversations
    shows `messages`), else unknown."""
    if convert_meta and convert_meta.get("template"):
        return convert_meta["template"], "convert"
    detected = MESSAGES if rows.conversations is not None else detect_template(rows.contexts)
    return (detected, "detected") if detected else ("unknown", "unknown")


def _dataset_meta(jsonl_path, rows: JsonlRows, tokenizer, encoder: RowEncoder, max_seq_length, counts, model_name_or_path) -> dict:
    convert_meta = read_convert_meta(jsonl_path)
    template, template_source = _template_of(convert_meta, rows)
    family = encoder.family
    if template in ROUND_TEMPLATES and template != family.chat_template:
        print(
            f"warning: {jsonl_path} holds {template!r} round prompts ({ROUND_TEMPLATES[template]}'s chat format), "
            f"but {family.name} chats in its own format, so each whole prompt becomes one "
            f"{'user turn' if family.role_tokens else 'query'}; reconvert with `instructglm convert --template "
            f"{'messages' if family.role_tokens else family.chat_template}` to train in the format it chats in",
            file=sys.stderr,
        )
    meta: dict[str, Any] = {
        "template": template,
        "template_source": template_source,
        "format": (convert_meta or {}).get("format"),
        "source": (convert_meta or {}).get("source"),
        "jsonl_path": str(jsonl_path),
        "model_name_or_path": model_name_or_path or getattr(tokenizer, "name_or_path", None),
        "family": family.name,
        "chat_format": family.chat_format.name,
        "labels": family.role_tokens,  # the dataset has a labels column
        "max_seq_length": max_seq_length,
        "counts": asdict(counts),
    }
    if convert_meta is not None:
        meta["convert_counts"] = convert_meta.get("counts")
    return meta


def tokenize_jsonl(
    jsonl_path: str | os.PathLike,
    save_path: str | os.PathLike,
    tokenizer,
    max_seq_length: int,
    num_proc: int = 1,
    batch_size: int = 1000,
    model_type=None,
    model_name_or_path: str | None = None,
    progress: bool = True,
    generation_config=None,
) -> TokenizeCounts:
    """Tokenize a converted jsonl and `save_to_disk` it at `save_path` (atomically); return the counts.

    See the module docstring for the row layout, the truncation rule and the swap; `tokenize_dataset`
    does the work in memory (and says what `model_type` and `generation_config` are).
    `model_name_or_path` is only recorded in `instructglm_data.json`.

    Raises:
        DataError: `save_path` is a file or holds anything but a saved dataset; bad lines (see
            `read_jsonl`); a tokenizer or `max_seq_length` that fits no row; every row dropped.
    """
    save_path = Path(save_path)
    if save_path.is_symlink():  # replace the dataset the link points at, and keep the link
        save_path = save_path.resolve()
    recover_interrupted_swap(save_path)
    _check_save_path(save_path)
    dataset, counts, meta = tokenize_with_meta(
        jsonl_path, tokenizer, max_seq_length, num_proc, batch_size, model_type, progress, generation_config,
        model_name_or_path,
    )
    save_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(save_path, "tmp")
    try:
        dataset.save_to_disk(str(tmp))
        write_json(tmp / DATA_META, meta)
        _swap_in(tmp, save_path)
    except BaseException as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) and str(save_path) not in str(error):
            # datasets / pyarrow name no file; the user needs to know which disk filled up
            raise OSError(error.errno, f"{error.strerror} (saving the dataset; nothing was changed)", str(save_path)) from error
        raise
    finally:
        release(tmp)
    return counts


@dataclass
class TokenizeArguments:
    """Defaults are the 2023 seed's (`tokenize_dataset_rows.py`)."""

    jsonl_path: str = field(
        default="data/alpaca_data.jsonl", metadata={"help": "jsonl of {context, target} rows, written by `convert`"}
    )
    save_path: str = field(
        default="data/alpaca", metadata={"help": "directory for the dataset (datasets.save_to_disk)"}
    )
    max_seq_length: int = field(
        default=384,
        metadata={"help": "longest row in tokens; targets are cut at their end to fit, prompts never (see above)"},
    )
    model_name_or_path: str = field(
        default="THUDM/chatglm-6b", metadata={"help": "local dir or hub name of the model whose tokenizer to use"}
    )
    num_proc: int = field(default=1, metadata={"help": "worker processes for tokenizing (up to the CPU count helps)"})
    batch_size: int = field(default=1000, metadata={"help": "rows per tokenizer call"})


ARGUMENTS = (TokenizeArguments,)


def main(args: TokenizeArguments) -> int:
    tokenizer, model_type = load_tokenizer(args.model_name_or_path)
    counts = tokenize_jsonl(
        args.jsonl_path,
        args.save_path,
        tokenizer,
        args.max_seq_length,
        num_proc=args.num_proc,
        batch_size=args.batch_size,
        # the whole config.json, where there is one: it tells the ChatGLM versions apart with the tokenizer
        model_type=model_config_of(args.model_name_or_path) or model_type,
        model_name_or_path=args.model_name_or_path,
        generation_config=generation_config_of(args.model_name_or_path),
    )
    import datasets

    # read back what was written: proves it loads, and shows the head as the seed did
    dataset = datasets.load_from_disk(args.save_path)
    print(dataset)
    print(dataset.select(range(min(5, len(dataset)))).to_pandas())
    print(f"{args.jsonl_path} -> {args.save_path}: {counts.summary()}")
    meta = json.loads((Path(args.save_path) / DATA_META).read_text(encoding="utf-8"))
    for outcome, locations in meta["dropped_at"].items():
        more = ", ..." if getattr(counts, outcome) > len(locations) else ""
        print(f"  {outcome}: {getattr(counts, outcome)} (at {', '.join(locations)}{more})")
    print(template_line(meta, args.jsonl_path))
    print(f"model family: {meta['family']} ({meta['chat_format']} format)")
    return 0


def template_line(meta: dict[str, Any], jsonl_path: str) -> str:
    """One line saying which template the dataset records and where it came from."""
    sidecar = jsonl_meta_path(jsonl_path)
    if meta["template_source"] == "convert":
        return f"template: {meta['template']!r} (from convert's {sidecar})"
    if meta["template_source"] == "detected":
        return f"template: {meta['template']!r} (detected from the contexts; no usable {sidecar})"
    return (
        f"template: unknown (no usable {sidecar}, and the contexts match no registered template); recorded as "
        "'unknown' in the dataset's meta: run `instructglm convert` to record the template"
    )


def _not_a_text_row(row: Any) -> str:
    """Why a line is not a context/target row: the fields missing or not strings, by name."""
    if not isinstance(row, dict):
        return f"expected a JSON object with string fields context and target (or messages), found a {type(row).__name__}"
    missing = [k for k in ("context", "target") if k not in row]
    wrong = [f"{k} is {type(row[k]).__name__}" for k in ("context", "target") if k in row and not isinstance(row[k], str)]
    problems = ([f"missing {', '.join(missing)}"] if missing else []) + wrong
    return f"expected string fields context and target (or messages): {'; '.join(problems)} (fields: {sorted(row)})"


def _advice(counts: "TokenizeCounts") -> str:
    """What to change when nothing is left, for the reasons that dropped the rows."""
    advice = []
    if counts.dropped_prompt_too_long:
        advice.append("raise --max_seq_length")
    if counts.dropped_unsupported:
        advice.append("use a model family that can show these conversations (tools need ChatGLM3, GLM-4 or a chat-template model)")
    if counts.dropped_empty_target:
        advice.append("check the targets, which encode to no tokens")
    return "; ".join(advice) or "check the data"
