"""stats: the describe() table against numpy (and pandas), token lengths, over-length counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from instructglm.cli import main as cli_main
from instructglm.data.stats import ROWS, check_token_args, compute_stats, describe, format_table, jsonl_stats
from instructglm.data.records import DataError

ASSETS = Path(__file__).parent / "assets"

# (context, target) with known whitespace-word counts; the tiny tokenizer has one id per word
ROWS_KNOWN = [
    ("a b c", "d e"),  # 3 + 2
    ("a", "b c d e f a b c"),  # 1 + 8
    ("a b c d e f a b", "c"),  # 8 + 1
    ("hello world", "zzz"),  # 2 + 1 (an unknown word is one <unk>)
    ("a", "   "),  # 1 + 0
]


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory) -> Path:
    """A tokenizer-only dir: one id per whitespace word, `<bos>` before a sequence, `<eos>` defined."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<bos>": 2, "<eos>": 3}
    for word in "a b c d e f hello world 你好 ， 世界".split():
        vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    path = tmp_path_factory.mktemp("word_tokenizer")
    PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<eos>"
    ).save_pretrained(path)
    return path


def write_rows(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"context": c, "target": t}) + "\n" for c, t in rows), encoding="utf-8")
    return path


def test_describe_matches_numpy_and_hand_values():
    values = [1, 2, 3, 4, 100]
    d = describe(values)
    a = np.array(values, dtype=float)
    assert list(d) == list(ROWS)
    assert d["count"] == 5 and d["mean"] == pytest.approx(a.mean()) == 22.0
    assert d["std"] == pytest.approx(a.std(ddof=1))
    assert (d["min"], d["25%"], d["50%"], d["75%"], d["max"]) == (1.0, 2.0, 3.0, 4.0, 100.0)
    assert d["90%"] == pytest.approx(np.percentile(a, 90)) == pytest.approx(61.6)


def test_describe_matches_pandas_describe():
    pandas = pytest.importorskip("pandas")
    values = np.random.default_rng(0).integers(1, 500, size=257).tolist()
    expected = pandas.Series(values).describe(percentiles=[0.25, 0.5, 0.75, 0.9])
    got = describe(values)
    for key in ROWS:
        assert got[key] == pytest.approx(expected[key]), key


def test_describe_degenerate():
    assert describe([]) == {"count": 0, **{k: None for k in ROWS[1:]}}
    one = describe([7])
    assert one["std"] is None and one["mean"] == one["max"] == 7.0


def test_format_table_rows_and_columns():
    table = format_table({"context": describe([1, 2]), "target": describe([5])}, "chars")
    lines = table.splitlines()
    assert lines[0].split() == ["chars", "context", "target"]
    assert [line.split()[0] for line in lines[1:]] == list(ROWS)
    assert lines[3].split() == ["std", "0.71", "NaN"]


def test_char_stats():
    stats = compute_stats([c for c, _ in ROWS_KNOWN], [t for _, t in ROWS_KNOWN])
    assert stats == {
        "chars": {
            "context": describe([len(c) for c, _ in ROWS_KNOWN]),
            "target": describe([len(t) for _, t in ROWS_KNOWN]),
        }
    }
    assert stats["chars"]["context"]["max"] == 15.0


def test_token_stats_and_over_length(word_tokenizer_dir):
    tokenizer, model_type = check_token_args(str(word_tokenizer_dir), 8)
    contexts, targets = [c for c, _ in ROWS_KNOWN], [t for _, t in ROWS_KNOWN]
    stats = compute_stats(contexts, targets, tokenizer, 8, model_type, batch_size=2)
    assert stats["sequence_rule"] == {"prompt_specials": 1, "eos": 1}
    assert stats["tokens"]["context"] == describe([3, 1, 8, 2, 1])
    assert stats["tokens"]["target"] == describe([2, 8, 1, 1, 0])
    assert stats["tokens"]["sequence"] == describe([7, 11, 11, 5, 3])
    # limit 8: prompt = 1 + context; room for target = 8 - prompt - 1 (eos)
    assert stats["over_length"] == {"rows": 5, "truncated": 1, "dropped_prompt_too_long": 1, "dropped_empty_target": 1}


def test_over_length_counts_agree_with_tokenize(tmp_path, word_tokenizer_dir):
    from instructglm.data.tokenize import load_tokenizer, tokenize_dataset

    path = write_rows(tmp_path / "rows.jsonl", ROWS_KNOWN * 3)
    tokenizer, model_type = load_tokenizer(str(word_tokenizer_dir))
    for limit in (5, 8, 12):
        over = jsonl_stats(str(path), tokenizer, limit, model_type)["over_length"]
        _, counts = tokenize_dataset(path, tokenizer, limit, model_type=model_type)
        assert over == {
            "rows": counts.rows,
            "truncated": counts.truncated,
            "dropped_prompt_too_long": counts.dropped_prompt_too_long,
            "dropped_empty_target": counts.dropped_empty_target,
        }


def test_stats_command_saves_json(tmp_path, word_tokenizer_dir, capsys):
    path = write_rows(tmp_path / "rows.jsonl", ROWS_KNOWN)
    out = tmp_path / "stats.json"
    argv = ["stats", "--jsonl_path", str(path), "--model_name_or_path", str(word_tokenizer_dir)]
    assert cli_main(argv + ["--max_seq_length", "8", "--stats_path", str(out)]) == 0
    saved = json.loads(out.read_text(encoding="utf-8"))
    assert saved["source"] == str(path) and saved["max_seq_length"] == 8
    assert saved["tokens"]["sequence"]["max"] == 11.0 and saved["over_length"]["truncated"] == 1
    printed = capsys.readouterr().out
    assert "tokens" in printed and "would truncate 1" in printed and "90%" in printed


def test_convert_prints_token_stats(tmp_path, word_tokenizer_dir, capsys):
    out = tmp_path / "o.jsonl"
    argv = ["convert", "--data_path", str(ASSETS / "firefly.jsonl"), "--save_path", str(out)]
    assert cli_main(argv + ["--model_name_or_path", str(word_tokenizer_dir), "--max_seq_length", "16"]) == 0
    printed = capsys.readouterr().out
    assert "tokens" in printed and "max_seq_length 16" in printed


def test_bad_token_arguments_fail_before_writing(tmp_path, word_tokenizer_dir, capsys):
    out = tmp_path / "o.jsonl"
    base = ["convert", "--data_path", str(ASSETS / "firefly.jsonl"), "--save_path", str(out)]
    assert cli_main(base + ["--model_name_or_path", str(tmp_path / "no_such_model")]) == 2
    assert cli_main(base + ["--model_name_or_path", str(word_tokenizer_dir), "--max_seq_length", "2"]) == 2
    assert "fits no row" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(DataError, match="--model_name_or_path"):
        check_token_args(None, 8)


def test_stats_command_errors(tmp_path, capsys):
    assert cli_main(["stats", "--jsonl_path", str(tmp_path / "none.jsonl")]) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "a", "target": "b"}\n{"instruction": "raw"}\n', encoding="utf-8")
    assert cli_main(["stats", "--jsonl_path", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "bad.jsonl:2" in err


def test_chatglm_token_stats(tmp_path, chatglm6b_tokenizer_dir, chatglm6b_tokenizer):
    path = tmp_path / "b.jsonl"
    assert cli_main(["convert", "--data_path", str(ASSETS / "belle_input_target.json"), "--save_path", str(path)]) == 0
    tokenizer, model_type = check_token_args(str(chatglm6b_tokenizer_dir), 320)
    stats = jsonl_stats(str(path), tokenizer, 320, model_type)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    lengths = [len(chatglm6b_tokenizer(r["context"], add_special_tokens=False)["input_ids"]) for r in rows]
    assert stats["sequence_rule"] == {"prompt_specials": 2, "eos": 1}  # [gMASK] <sop>, then <eop>
    assert stats["tokens"]["context"] == describe(lengths)
    assert stats["over_length"]["truncated"] == 0
