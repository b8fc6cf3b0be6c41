"""`instructglm.data.tokenize`: row layout, truncation rule, counts, workers, atomic save, CLI.

The generic path runs on a word-level tokenizer built here with the `tokenizers` library (one
id per word, so expected lengths are countable by eye) in a directory whose config.json is a
tiny Llama; the ChatGLM-6B tests use the real tokenizer from the shared folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from instructglm.data.records import DataError
from instructglm.data.tokenize import (
    RowEncoder,
    load_tokenizer,
    special_tokens_around,
    tokenize_dataset,
    tokenize_jsonl,
)
from instructglm.layout import DATA_META

WORDS = "hello world the quick brown fox jumps over lazy dog instruction answer add two numbers 你好 世界 a b c d e f"


def _word_tokenizer(directory: Path, post: str | None) -> Path:
    """A word-level tokenizer saved as the model dir of a tiny Llama; `post` is its single-sequence template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(set(WORDS.split()) | {"，"}))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if post:
        backend.post_processor = processors.TemplateProcessing(
            single=post, special_tokens=[(t, vocab[t]) for t in ("<s>", "</s>") if t in post]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
    )
    config.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return _word_tokenizer(tmp_path_factory.mktemp("tiny-llama"), post="<s> $A")


@pytest.fixture(scope="module")
def llama_tokenizer(llama_dir):
    tokenizer, model_type = load_tokenizer(str(llama_dir))
    assert model_type == "llama"
    return tokenizer


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def _rows(dataset) -> list[tuple[list[int], int]]:
    return list(zip(dataset["input_ids"], dataset["seq_len"], strict=True))


def test_llama_style_tokenizer_prefixes_bos(llama_tokenizer):
    assert special_tokens_around(llama_tokenizer) == ([llama_tokenizer.bos_token_id], [])


def test_eos_the_tokenizer_appends_ends_the_row_not_the_prompt(tmp_path):
    tokenizer, _ = load_tokenizer(str(_word_tokenizer(tmp_path, post="<s> $A </s>")))
    assert tokenizer.encode("hello")[-1] == tokenizer.eos_token_id
    assert special_tokens_around(tokenizer) == ([tokenizer.bos_token_id], [])


def test_tokenizer_without_specials(tmp_path):
    tokenizer, _ = load_tokenizer(str(_word_tokenizer(tmp_path, post=None)))
    assert special_tokens_around(tokenizer) == ([], [])
    encoder = RowEncoder(tokenizer, max_seq_length=8)
    ids, seq_len, _ = encoder.encode([10, 11], [12])
    assert (ids, seq_len) == ([10, 11, 12, tokenizer.eos_token_id], 2)


def test_layout_and_truncation_edge_cases(tmp_path, llama_tokenizer):
    bos, eos = llama_tokenizer.bos_token_id, llama_tokenizer.eos_token_id
    ids = dict(zip(WORDS.split(), llama_tokenizer.convert_tokens_to_ids(WORDS.split()), strict=True))
    # max 6: bos + prompt + target + eos
    rows = [
        {"context": "a b", "target": "c d"},  # 1+2+2+1 = 6: fits exactly, untouched
        {"context": "a b", "target": "c d e f"},  # target cut to "c d"
        {"context": "a b c d", "target": "e"},  # 1+4+1+1 = 7: no room for one target token
        {"context": "a b c", "target": "d"},  # 1+3+1+1 = 6: the smallest target fits
        {"context": "a", "target": ""},  # empty target
        {"context": "a", "target": "   "},  # whitespace target encodes to nothing
        {"context": "", "target": "hello world"},  # empty prompt is still a row: bos + target + eos
    ]
    dataset, counts = tokenize_dataset(_jsonl(tmp_path / "rows.jsonl", rows), llama_tokenizer, 6, model_type="llama")
    w = [ids[x] for x in "a b c d".split()]
    assert _rows(dataset) == [
        ([bos, *w, eos], 3),
        ([bos, *w, eos], 3),
        ([bos, w[0], w[1], w[2], w[3], eos], 4),
        ([bos, ids["hello"], ids["world"], eos], 1),
    ]
    assert (counts.rows, counts.kept, counts.truncated) == (7, 4, 1)
    assert (counts.dropped_prompt_too_long, counts.dropped_empty_target) == (1, 2)
    assert all(len(row) <= 6 for row in dataset["input_ids"])


def test_max_seq_length_below_specials_is_an_error(tmp_path, llama_tokenizer):
    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "a", "target": "b"}])
    with pytest.raises(DataError, match="--max_seq_length 2 fits no row.*at least 3"):
        tokenize_dataset(path, llama_tokenizer, 2)
    # the smallest limit: bos + one target token + eos, which only a row with an empty prompt fits
    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "", "target": "b c"}, {"context": "a", "target": "b"}])
    dataset, counts = tokenize_dataset(path, llama_tokenizer, 3)
    bos, b, eos = llama_tokenizer.convert_tokens_to_ids(["<s>", "b", "</s>"])
    assert dataset["input_ids"] == [[bos, b, eos]] and dataset["seq_len"] == [1]
    assert (counts.truncated, counts.dropped_prompt_too_long) == (1, 1)


def test_every_row_dropped_is_an_error(tmp_path, llama_tokenizer):
    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "a b c d e f", "target": "b"}] * 3)
    with pytest.raises(DataError, match="every row was dropped.*3 prompt too long"):
        tokenize_dataset(path, llama_tokenizer, 5)


def test_workers_give_the_same_dataset(tmp_path, llama_tokenizer):
    words = WORDS.split()
    rows = [
        {"context": " ".join(words[i % 7 : i % 7 + i % 5]), "target": " ".join(words[: i % 11])} for i in range(240)
    ]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    one, counts_one = tokenize_dataset(path, llama_tokenizer, 9, num_proc=1, batch_size=17)
    two, counts_two = tokenize_dataset(path, llama_tokenizer, 9, num_proc=2, batch_size=17)
    assert counts_one == counts_two
    assert counts_one.truncated > 0 and counts_one.dropped_empty_target > 0 and counts_one.dropped_prompt_too_long == 0
    assert _rows(one) == _rows(two)


def test_encoder_pickles_for_spawned_workers(llama_tokenizer):
    """Where processes cannot fork (macOS, Windows) the encoder and its tokenizer travel pickled."""
    import pickle

    encoder = RowEncoder(llama_tokenizer, 6)
    copy = pickle.loads(pickle.dumps(encoder))
    batch = (["a b", "a b c d e", ""], ["c d e", "f", "hello world"])
    assert copy.encode_batch(*batch) == encoder.encode_batch(*batch)


def test_bad_lines_are_named_and_nothing_is_written(tmp_path, llama_tokenizer):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"context": "a", "target": "b"}\n{"context": "a", \n{"instruction": "a", "output": "b"}\n[1]\n'
        '{"context": "a", "target": 3}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError) as error:
        tokenize_jsonl(path, tmp_path / "out", llama_tokenizer, 16)
    message = str(error.value)
    assert "4 bad line(s)" in message and "instructglm convert" in message
    for line in (2, 3, 4, 5):
        assert f"{path}:{line}:" in message
    assert "['instruction', 'output']" in message
    assert f"{path}:5: expected string fields context and target (or messages): target is int" in message
    assert f"{path}:3: expected string fields context and target (or messages): missing context, target" in message
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]


def test_empty_and_missing_files(tmp_path, llama_tokenizer):
    with pytest.raises(DataError, match="no rows"):
        tokenize_dataset(_jsonl(tmp_path / "empty.jsonl", []), llama_tokenizer, 16)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        tokenize_dataset(tmp_path / "missing.jsonl", llama_tokenizer, 16)


def test_save_is_atomic_and_replaces_an_old_dataset(tmp_path, llama_tokenizer, monkeypatch):
    import datasets

    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "a b", "target": "c"}] * 3)
    out = tmp_path / "data" / "ds"
    tokenize_jsonl(path, out, llama_tokenizer, 16)
    first = _rows(datasets.load_from_disk(str(out)))

    def save_half_then_die(self, dataset_path, *args, **kwargs):
        Path(dataset_path).mkdir(parents=True)
        (Path(dataset_path) / "data-00000-of-00001.arrow").write_bytes(b"half")
        raise KeyboardInterrupt

    _jsonl(path, [{"context": "d", "target": "e f"}] * 5)
    monkeypatch.setattr(datasets.Dataset, "save_to_disk", save_half_then_die)
    with pytest.raises(KeyboardInterrupt):
        tokenize_jsonl(path, out, llama_tokenizer, 16)
    monkeypatch.undo()
    assert _rows(datasets.load_from_disk(str(out))) == first
    assert [p.name for p in out.parent.iterdir()] == ["ds"]

    tokenize_jsonl(path, out, llama_tokenizer, 16)
    assert len(datasets.load_from_disk(str(out))) == 5
    assert [p.name for p in out.parent.iterdir()] == ["ds"]


def test_save_path_that_is_not_a_dataset_is_never_replaced(tmp_path, llama_tokenizer):
    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "a", "target": "b"}])
    with pytest.raises(DataError, match="rows.jsonl, not part of a saved dataset"):
        tokenize_jsonl(path, tmp_path, llama_tokenizer, 16)  # the folder holding the jsonl itself
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="is a file"):
        tokenize_jsonl(path, tmp_path / "file", llama_tokenizer, 16)
    (tmp_path / "empty").mkdir()
    tokenize_jsonl(path, tmp_path / "empty", llama_tokenizer, 16)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "file", "rows.jsonl"]


def test_convert_sidecar_becomes_dataset_meta(tmp_path, llama_tokenizer, llama_dir):
    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "a b", "target": "c d e"}, {"context": "a", "target": ""}])
    convert_meta = {"template": "alpaca", "format": "alpaca", "source": "x.json", "counts": {"written": 2}}
    Path(f"{path}.meta.json").write_text(json.dumps(convert_meta), encoding="utf-8")
    counts = tokenize_jsonl(path, tmp_path / "ds", llama_tokenizer, 5, model_type="llama", model_name_or_path="m")
    meta = json.loads((tmp_path / "ds" / DATA_META).read_text(encoding="utf-8"))
    assert meta["template"] == "alpaca" and meta["model_name_or_path"] == "m" and meta["max_seq_length"] == 5
    assert meta["family"] == "causal-lm" and meta["convert_counts"] == {"written": 2}
    assert (
        meta["counts"]
        == {
            "rows": 2,
            "kept": 1,
            "truncated": 1,
            "dropped_prompt_too_long": 0,
            "dropped_empty_target": 1,
            "dropped_unsupported": 0,
            "turns_dropped": 0,
        }
        == counts.__dict__
    )
    assert (meta["template_source"], meta["jsonl_path"]) == ("convert", str(path))
    assert meta["dropped_at"] == {"dropped_empty_target": [f"{path}:2"]}  # every row left out is located


def test_cli_writes_a_loadable_dataset_and_prints_head_and_counts(tmp_path, llama_dir, capsys):
    import datasets

    from instructglm.cli import main

    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "instruction add two numbers answer", "target": "a b c"}] * 6)
    argv = ["tokenize", "--jsonl_path", str(path), "--save_path", str(tmp_path / "ds"), "--max_seq_length", "8"]
    argv += ["--model_name_or_path", str(llama_dir), "--num_proc", "2", "--batch_size", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "input_ids" in printed and "seq_len" in printed
    assert "rows 6: kept 6 (truncated 6), dropped 0 prompt too long, 0 empty target" in printed
    path.write_text(path.read_text(encoding="utf-8") + '{"context": "a a a a a a a a", "target": "b"}\n' * 7, encoding="utf-8")
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"dropped_prompt_too_long: 7 (at {path}:7, {path}:8, {path}:9, {path}:10, {path}:11, ...)" in printed
    dataset = datasets.load_from_disk(str(tmp_path / "ds"))
    assert dataset.column_names == ["input_ids", "seq_len"] and len(dataset) == 6
    assert all(len(ids) == 8 and seq_len == 6 for ids, seq_len in _rows(dataset))


def test_cli_reports_errors_without_a_traceback(tmp_path, llama_dir, capsys):
    from instructglm.cli import main

    argv = ["tokenize", "--jsonl_path", str(tmp_path / "nope.jsonl"), "--save_path", str(tmp_path / "ds")]
    assert main(argv + ["--model_name_or_path", str(llama_dir)]) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_family_checks_the_labelled_prompt_tail(llama_tokenizer):
    with pytest.raises(DataError, match="chatglm-6b family labels the last 1 prompt token"):
        RowEncoder(llama_tokenizer, 64, model_type="chatglm")


# ChatGLM-6B: the real tokenizer


def _alpaca_rows(shared_data: Path, name: str, count: int) -> list[dict[str, str]]:
    records = json.loads((shared_data / name).read_text(encoding="utf-8"))[:count]
    # the seed's alpaca template, written out so this test does not depend on templates.py
    return [
        {
            "context": f"Instruction: {r['instruction']}\n"
            + (f"Input: {r['input']}\n" if r["input"] else "")
            + "Answer: ",
            "target": r["output"],
        }
        for r in records
    ]


def test_chatglm_rows_equal_the_seed_encoding(tmp_path, chatglm6b_tokenizer, shared_data):
    tokenizer = chatglm6b_tokenizer
    gmask, sop, eop = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>", "<eop>"])
    assert special_tokens_around(tokenizer) == ([], [gmask, sop]) and tokenizer.eos_token_id == eop
    rows = _alpaca_rows(shared_data, "llamafactory__alpaca_zh_demo.json", 60)
    rows += _alpaca_rows(shared_data, "llamafactory__alpaca_en_demo.json", 60)
    path = _jsonl(tmp_path / "alpaca.jsonl", rows)
    dataset, counts = tokenize_dataset(path, tokenizer, 4096, num_proc=2, batch_size=25, model_type="chatglm")
    assert counts.kept == counts.rows == len(rows) and counts.truncated == 0
    for row, (ids, seq_len) in zip(rows, _rows(dataset), strict=True):
        prompt = tokenizer.encode(row["context"])
        assert ids == prompt + tokenizer.encode(row["target"], add_special_tokens=False) + [eop]
        assert seq_len == len(prompt) and ids[seq_len - 2 : seq_len] == [gmask, sop]


def test_chatglm_encoder_pickles(chatglm6b_tokenizer):
    import pickle

    encoder = RowEncoder(chatglm6b_tokenizer, 64, model_type="chatglm")
    batch = (["你好\n  世界", "Instruction: x\nAnswer: "], ["<n> 答案\t[gMASK]", "ok"])
    assert pickle.loads(pickle.dumps(encoder)).encode_batch(*batch) == encoder.encode_batch(*batch)


def test_chatglm_truncation_keeps_specials(tmp_path, chatglm6b_tokenizer, shared_data):
    tokenizer = chatglm6b_tokenizer
    gmask, sop, eop = tokenizer.convert_tokens_to_ids(["[gMASK]", "<sop>", "<eop>"])
    rows = _alpaca_rows(shared_data, "llamafactory__alpaca_zh_demo.json", 80)
    path = _jsonl(tmp_path / "alpaca.jsonl", rows)
    dataset, counts = tokenize_dataset(path, tokenizer, 32, model_type="chatglm")
    assert counts.truncated > 0 and counts.dropped_prompt_too_long > 0
    assert counts.kept + counts.dropped_prompt_too_long + counts.dropped_empty_target == counts.rows == 80
    kept = [r for r in rows if len(tokenizer.encode(r["context"])) + 2 <= 32]
    assert len(kept) == counts.kept
    for row, (ids, seq_len) in zip(kept, _rows(dataset), strict=True):
        prompt = tokenizer.encode(row["context"])
        target = tokenizer.encode(row["target"], add_special_tokens=False)
        assert len(ids) == min(32, len(prompt) + len(target) + 1)
        assert ids == prompt + target[: len(ids) - len(prompt) - 1] + [eop]
        assert ids[seq_len - 2 : seq_len] == [gmask, sop]


def test_chatglm_through_the_cli_from_a_model_dir(tmp_path, chatglm6b_tokenizer_dir):
    import datasets

    from instructglm.cli import main

    path = _jsonl(
        tmp_path / "rows.jsonl", [{"context": "你好", "target": "你好，我是 ChatGLM。\n有什么可以帮你？"}] * 3
    )
    argv = ["tokenize", "--jsonl_path", str(path), "--save_path", str(tmp_path / "ds"), "--max_seq_length", "320"]
    assert main(argv + ["--model_name_or_path", str(chatglm6b_tokenizer_dir), "--num_proc", "2"]) == 0
    tokenizer, model_type = load_tokenizer(str(chatglm6b_tokenizer_dir))
    assert model_type == "chatglm"
    expected = tokenizer.encode("你好") + tokenizer.encode(
        "你好，我是 ChatGLM。\n有什么可以帮你？", add_special_tokens=False
    )
    assert datasets.load_from_disk(str(tmp_path / "ds"))["input_ids"] == [expected + [tokenizer.eos_token_id]] * 3


# ---- issue 8 ----------------------------------------------------------------------------------


def _meta(save_path: Path) -> dict:
    return json.loads((save_path / DATA_META).read_text(encoding="utf-8"))


@pytest.mark.parametrize(
    "contexts, template, source",
    [
        (["Instruction: a\\nAnswer: ", "Instruction: b\\nInput: c\\nAnswer: "], "alpaca", "detected"),
        (["指令: a\\n答案: "], "belle", "detected"),
        (["a b", "Instruction: a\\nAnswer: "], "unknown", "unknown"),
    ],
)
def test_data_without_a_sidecar_gets_a_detected_or_unknown_template(tmp_path, llama_tokenizer, contexts, template, source):
    # a jsonl made by the 2023 scripts: no <jsonl>.meta.json beside it
    rows = [{"context": c.replace("\\n", "\n"), "target": "a b"} for c in contexts]
    path = _jsonl(tmp_path / "seed.jsonl", rows)
    tokenize_jsonl(path, tmp_path / "ds", llama_tokenizer, 32)
    meta = _meta(tmp_path / "ds")
    assert (meta["template"], meta["template_source"]) == (template, source)
    assert meta["counts"]["rows"] == len(rows) and "convert_counts" not in meta


def test_a_stale_sidecar_is_not_trusted(tmp_path, llama_tokenizer, capsys):
    # a kill between convert's two renames could leave the new jsonl beside the old sidecar
    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "Instruction: a\nAnswer: ", "target": "b"}])
    sidecar = {"template": "belle", "format": "belle", "jsonl_bytes": 3, "jsonl_sha256": "0" * 64}
    Path(f"{path}.meta.json").write_text(json.dumps(sidecar), encoding="utf-8")
    tokenize_jsonl(path, tmp_path / "ds", llama_tokenizer, 16)
    assert (_meta(tmp_path / "ds")["template"], _meta(tmp_path / "ds")["template_source"]) == ("alpaca", "detected")
    assert "does not describe" in capsys.readouterr().err


def test_cli_says_where_the_template_came_from(tmp_path, llama_dir, capsys):
    from instructglm.cli import main

    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "a b", "target": "c"}])
    argv = ["tokenize", "--jsonl_path", str(path), "--save_path", str(tmp_path / "ds"), "--max_seq_length", "8"]
    assert main(argv + ["--model_name_or_path", str(llama_dir)]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("template: "))
    assert "unknown" in line and "rows.jsonl.meta.json" in line


def test_a_dataset_dir_holding_other_files_is_never_replaced(tmp_path, llama_tokenizer):
    import datasets

    out = tmp_path / "ds"
    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "a", "target": "b"}])
    tokenize_jsonl(path, out, llama_tokenizer, 16)
    before = _rows(datasets.load_from_disk(str(out)))
    inside = _jsonl(out / "rows.jsonl", [{"context": "a b", "target": "c d"}] * 2)  # the input kept beside its dataset
    with pytest.raises(DataError, match=r"rows\.jsonl.*not part of a saved dataset"):
        tokenize_jsonl(inside, out, llama_tokenizer, 16)
    assert inside.is_file() and _rows(datasets.load_from_disk(str(out))) == before
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    inside.unlink()
    with pytest.raises(DataError, match="notes.txt"):
        tokenize_jsonl(path, out, llama_tokenizer, 16)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_a_dataset_dict_dir_is_a_dataset(tmp_path, llama_tokenizer):
    import datasets

    out = tmp_path / "dd"
    split = datasets.Dataset.from_dict({"input_ids": [[1, 2]], "seq_len": [1]})
    datasets.DatasetDict({"train": split, "validation": split}).save_to_disk(str(out))
    tokenize_jsonl(_jsonl(tmp_path / "rows.jsonl", [{"context": "a", "target": "b"}] * 3), out, llama_tokenizer, 16)
    assert len(datasets.load_from_disk(str(out))) == 3


def test_dataset_files_get_the_umask_mode(tmp_path, llama_tokenizer):
    import stat

    old = os.umask(0o022)
    try:
        tokenize_jsonl(_jsonl(tmp_path / "rows.jsonl", [{"context": "a", "target": "b"}]), tmp_path / "ds", llama_tokenizer, 16)
    finally:
        os.umask(old)
    entries = [tmp_path / "ds", *(tmp_path / "ds").iterdir()]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in entries}
    assert modes.pop("ds") == 0o755 and DATA_META in modes
    assert set(modes.values()) == {0o644}, modes


def test_a_kill_after_the_swap_leaves_the_new_dataset_and_the_next_run_cleans_up(tmp_path, llama_tokenizer, monkeypatch):
    import shutil

    import datasets

    from instructglm.data import tokenize as tokenize_module

    out = tmp_path / "ds"
    tokenize_jsonl(_jsonl(tmp_path / "a.jsonl", [{"context": "a", "target": "b"}]), out, llama_tokenizer, 16)
    real_rmtree = shutil.rmtree

    def killed(path, *args, **kwargs):
        raise KeyboardInterrupt  # the old dataset is aside, about to be deleted

    monkeypatch.setattr(tokenize_module.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        tokenize_jsonl(_jsonl(tmp_path / "b.jsonl", [{"context": "a", "target": "b c"}] * 2), out, llama_tokenizer, 16)
    monkeypatch.setattr(tokenize_module.shutil, "rmtree", real_rmtree)
    assert len(datasets.load_from_disk(str(out))) == 2
    tokenize_jsonl(tmp_path / "a.jsonl", out, llama_tokenizer, 16)
    assert len(datasets.load_from_disk(str(out))) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "ds"]


def test_an_old_dataset_put_aside_by_an_interrupted_swap_is_put_back(tmp_path, llama_tokenizer):
    """Where renameat2 cannot exchange (another OS, some file systems) the swap renames the old one aside first."""
    import subprocess
    import sys

    import datasets

    from instructglm.data.io import temp_sibling
    from instructglm.data.tokenize import recover_interrupted_swap

    out = tmp_path / "ds"
    tokenize_jsonl(_jsonl(tmp_path / "a.jsonl", [{"context": "a", "target": "b"}]), out, llama_tokenizer, 16)
    dead_pid = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout)
    os.rename(out, temp_sibling(out, "old", pid=dead_pid))  # killed before the new one was renamed in
    assert not out.exists()
    assert recover_interrupted_swap(out)
    assert len(datasets.load_from_disk(str(out))) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "ds"]


def test_a_deeply_nested_line_is_named_not_a_recursion_error(tmp_path, llama_tokenizer):
    from instructglm.data.stats import jsonl_stats

    path = tmp_path / "rows.jsonl"
    path.write_text('{"context": "a", "target": "b"}\n' + "[" * 200_000 + "]" * 200_000 + "\n", encoding="utf-8")
    for run in (lambda: tokenize_jsonl(path, tmp_path / "ds", llama_tokenizer, 16), lambda: jsonl_stats(str(path))):
        with pytest.raises(DataError, match=rf"{path}:2: too_deep"):
            run()


def _children(pid: int) -> list[int]:
    import psutil

    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_workers_die_with_their_parent(tmp_path, llama_dir):
    """kill -9 of `tokenize --num_proc 2` takes its workers with it (they were reparented and kept running)."""
    import signal
    import subprocess
    import sys
    import time

    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "a", "target": "b"}] * 8)
    script = f"""
import time
from instructglm.cli import main
from instructglm.data.tokenize import RowEncoder
RowEncoder.encode_batch = lambda self, contexts, targets: time.sleep(600)  # workers that would outlive the test
main(["tokenize", "--jsonl_path", {str(path)!r}, "--save_path", {str(tmp_path / "ds")!r},
      "--model_name_or_path", {str(llama_dir)!r}, "--num_proc", "2", "--batch_size", "2"])
"""
    parent = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 60
        while len(workers := _children(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(workers) >= 2, "the workers never started"
        time.sleep(0.5)  # let them reach their initializer and the sleeping batch
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 10
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(map(_alive, workers)), f"workers {workers} outlived their parent"
    finally:
        for pid in [parent.pid, *(w for w in locals().get("workers", []) if _alive(w))]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_tokenize_command_imports_only_what_it_uses(tmp_path, llama_dir):
    import subprocess
    import sys

    path = _jsonl(tmp_path / "rows.jsonl", [{"context": "a b", "target": "c"}])
    script = f"""
import json, sys
from instructglm.cli import main
code = main(["tokenize", "--jsonl_path", {str(path)!r}, "--save_path", {str(tmp_path / "ds")!r},
             "--model_name_or_path", {str(llama_dir)!r}, "--max_seq_length", "8"])
print(json.dumps([code, sorted(sys.modules)]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    code, modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == 0
    unwanted = [
        m
        for m in modules
        if m.split(".")[0] in ("peft", "sklearn", "scipy")
        or m.startswith(("instructglm.train", "instructglm.infer", "instructglm.serve", "instructglm.models.chatglm.model"))
        or (m.startswith("transformers.models.") and ".modeling_" in m and not m.startswith("transformers.models.auto."))
    ]
    assert unwanted == []


def test_the_rename_aside_swap_replaces_a_dataset_too(tmp_path, llama_tokenizer, monkeypatch):
    import errno

    import datasets

    from instructglm.data import tokenize as tokenize_module

    def unsupported(a, b):
        raise OSError(errno.ENOSYS, "no renameat2 here")

    monkeypatch.setattr(tokenize_module, "_exchange", unsupported)
    out = tmp_path / "ds"
    tokenize_jsonl(_jsonl(tmp_path / "a.jsonl", [{"context": "a", "target": "b"}]), out, llama_tokenizer, 16)
    tokenize_jsonl(_jsonl(tmp_path / "b.jsonl", [{"context": "a", "target": "b"}] * 2), out, llama_tokenizer, 16)
    assert len(datasets.load_from_disk(str(out))) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "ds"]


def test_a_symlinked_save_path_keeps_its_link(tmp_path, llama_tokenizer):
    import datasets

    real = tmp_path / "disk" / "ds"
    real.parent.mkdir()
    path = _jsonl(tmp_path / "a.jsonl", [{"context": "a", "target": "b"}])
    tokenize_jsonl(path, real, llama_tokenizer, 16)
    (tmp_path / "ds").symlink_to(real)
    tokenize_jsonl(_jsonl(tmp_path / "b.jsonl", [{"context": "a", "target": "b"}] * 3), tmp_path / "ds", llama_tokenizer, 16)
    assert (tmp_path / "ds").is_symlink() and len(datasets.load_from_disk(str(real))) == 3
