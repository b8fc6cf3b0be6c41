"""Readers per input format, format detection, and reading JSON / JSON Lines files and datasets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructglm.data.io import iter_dataset_rows, iter_json_rows
from instructglm.data.readers import (
    FORMATS,
    detect_format,
    read_alpaca,
    read_belle,
    read_firefly,
    read_rows,
    read_sharegpt,
)
from instructglm.data.records import BadRow, DataError, Example

ASSETS = Path(__file__).parent / "assets"


def _bad(read, row) -> BadRow:
    with pytest.raises(BadRow) as info:
        read(row)
    return info.value


# ---- one reader per format ------------------------------------------------------------------


def test_alpaca_fields_and_optional_input():
    assert read_alpaca({"instruction": "Add.", "input": "2 3", "output": "5"}) == Example("Add.", "5", input="2 3")
    assert read_alpaca({"instruction": "Hi", "output": "Hello"}) == Example("Hi", "Hello")
    # `datasets` fills a column missing from some rows with None
    assert read_alpaca({"instruction": "Hi", "input": None, "output": "Hello"}).input == ""


def test_alpaca_history_and_system():
    row = {"instruction": "q2", "input": "", "output": "a2", "history": [["q1", "a1"]], "system": "be brief"}
    assert read_alpaca(row) == Example("q2", "a2", history=(("q1", "a1"),), system="be brief")


def test_belle_input_target_and_later_alpaca_shape():
    assert read_belle({"input": "三加四？\n", "target": "七"}) == Example("三加四？\n", "七")
    assert read_belle({"instruction": "三加四？", "input": "", "output": "七"}) == Example("三加四？", "七")


def test_sharegpt_rounds_system_merge_and_cut_off_turn():
    rows = json.loads((ASSETS / "sharegpt.json").read_text(encoding="utf-8"))
    first = read_sharegpt(rows[0])
    assert first == Example("and 3+3?", "6", history=(("2+2?", "4"),), system="You are terse.")
    # role/content turns; two user turns in a row are one query
    assert read_sharegpt(rows[1]) == Example("Spell cat backwards.\nLowercase please.", "tac")


@pytest.mark.parametrize(
    "index, detail",
    [(2, "starts with an assistant turn"), (3, "unknown role 'function'"), (4, "no assistant reply")],
)
def test_sharegpt_bad_conversations(index, detail):
    rows = json.loads((ASSETS / "sharegpt.json").read_text(encoding="utf-8"))
    bad = _bad(read_sharegpt, rows[index])
    assert bad.reason == "bad_conversation" and detail in bad.detail


def test_sharegpt_turns_as_datasets_gives_them():
    # a column mixing from/value and role/content turns: datasets fills the absent keys with None
    turns = [
        {"from": "human", "value": "hi", "role": None, "content": None},
        {"from": None, "value": None, "role": "assistant", "content": "hello"},
    ]
    assert read_sharegpt({"conversations": turns}) == Example("hi", "hello")


def test_sharegpt_system_turn_mid_conversation_is_bad():
    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "system", "value": "s"}, {"from": "gpt", "value": "b"}]}
    assert _bad(read_sharegpt, row).reason == "bad_conversation"


def test_firefly_rounds_and_system():
    rows = [json.loads(line) for line in (ASSETS / "firefly.jsonl").read_text(encoding="utf-8").splitlines()]
    assert read_firefly(rows[0]) == Example("一加一等于几？", "二", history=(("你好", "你好！有什么可以帮你？"),))
    assert read_firefly(rows[1]) == Example("五乘二", "十", system="你是一个数学助手。")


# ---- every bad-row kind ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "read, row, reason",
    [
        (read_alpaca, {"instruction": "x"}, "missing_field"),
        (read_alpaca, {"output": "x"}, "missing_field"),
        (read_alpaca, {"instruction": "x", "output": None}, "missing_field"),
        (read_alpaca, {"instruction": "x", "output": 3}, "non_string_field"),
        (read_alpaca, {"instruction": ["x"], "output": "y"}, "non_string_field"),
        (read_alpaca, {"instruction": "x", "input": 1, "output": "y"}, "non_string_field"),
        (read_alpaca, {"instruction": "x", "output": ""}, "empty_output"),
        (read_alpaca, {"instruction": "x", "output": " \n\t"}, "empty_output"),
        (read_alpaca, {"instruction": " ", "input": "", "output": "y"}, "empty_prompt"),
        (read_alpaca, {"instruction": "x", "output": "y", "history": "no"}, "bad_history"),
        (read_alpaca, {"instruction": "x", "output": "y", "history": [["q"]]}, "bad_history"),
        (read_alpaca, {"instruction": "x", "output": "y", "history": [["q", 1]]}, "bad_history"),
        (read_alpaca, {"instruction": "x", "output": "half an emoji \ud83d"}, "invalid_unicode"),
        (read_belle, {"input": "x"}, "missing_field"),
        (read_belle, {"input": "x", "target": "  "}, "empty_output"),
        (read_sharegpt, {"id": 1}, "missing_field"),
        (read_sharegpt, {"conversations": "hi"}, "bad_conversation"),
        (read_sharegpt, {"conversations": [{"from": "human", "value": 2}]}, "non_string_field"),
        (read_sharegpt, {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": ""}]}, "empty_output"),
        (read_firefly, {"conversation": [{"human": "a"}]}, "missing_field"),
        (read_firefly, {"conversation": ["a"]}, "bad_conversation"),
    ],
)
def test_bad_rows_have_a_reason(read, row, reason):
    bad = _bad(read, row)
    assert bad.reason == reason and bad.detail


def test_read_rows_passes_locations_and_reasons():
    rows = [("f:1", {"instruction": "a", "output": "b"}), ("f:2", [1]), ("f:3", BadRow("malformed_json", "x"))]
    out = list(read_rows(rows, "alpaca"))
    assert out[0] == ("f:1", Example("a", "b"))
    assert [(loc, r.reason) for loc, r in out[1:]] == [("f:2", "not_an_object"), ("f:3", "malformed_json")]


# ---- format detection -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, fmt",
    [
        ({"instruction", "input", "output"}, "alpaca"),
        ({"instruction", "output"}, "alpaca"),
        ({"instruction", "input", "output", "history"}, "history"),
        ({"input", "target"}, "belle"),
        ({"id", "conversations"}, "sharegpt"),
        ({"conversation_id", "category", "conversation"}, "firefly"),
        ({"prompt", "completion"}, None),
        (set(), None),
    ],
)
def test_detect_format(fields, fmt):
    assert detect_format(fields) == fmt


def test_every_format_has_a_registered_default_template():
    from instructglm.data.templates import TEMPLATES

    assert {f.default_template for f in FORMATS.values()} <= set(TEMPLATES)


# ---- files ----------------------------------------------------------------------------------


def test_json_array_rows_are_indexed(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps([{"a": 1}, {"a": 2}]), encoding="utf-8")
    assert list(iter_json_rows(path)) == [(f"{path}[0]", {"a": 1}), (f"{path}[1]", {"a": 2})]


def test_json_file_holding_json_lines_with_bom_and_crlf(tmp_path):
    path = tmp_path / "belle.json"
    records = [{"input": "你好", "target": "hi"}, {"input": "[x]", "target": "y"}]
    body = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\r\n\r\n"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    assert list(iter_json_rows(path)) == [(f"{path}:1", records[0]), (f"{path}:2", records[1])]


def test_json_array_with_bom_and_crlf(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps([{"a": "\u4e00"}], indent=2).replace("\n", "\r\n").encode())
    assert [row for _, row in iter_json_rows(path)] == [{"a": "一"}]


def test_json_lines_of_arrays_are_rows_not_one_array(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('["a"]\n["b"]\n', encoding="utf-8")
    assert [row for _, row in iter_json_rows(path)] == [["a"], ["b"]]


def test_line_separator_inside_a_string_is_not_a_line_break(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"t": "a\u2028b"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert [row for _, row in iter_json_rows(path)] == [{"t": "a\u2028b"}]


def test_malformed_line_is_a_bad_row_with_its_line_number(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n\n{"a": \n{"a": 3}\n', encoding="utf-8")
    rows = list(iter_json_rows(path))
    assert [loc for loc, _ in rows] == [f"{path}:1", f"{path}:3", f"{path}:4"]
    assert isinstance(rows[1][1], BadRow) and rows[1][1].reason == "malformed_json"


def test_broken_json_array_names_line_and_column(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[\n  {"a": 1},\n  {"a": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{path.name}:3:\d+: malformed JSON array"):
        list(iter_json_rows(path))


def test_not_utf8_costs_the_line_not_the_file(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "\xff"}\n')
    (_, first), (location, bad) = iter_json_rows(path)
    assert first == {"a": "ok"} and location == f"{path}:2"
    assert bad.reason == "not_utf8" and "re-save the file as UTF-8" in bad.detail


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(iter_json_rows(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="--dataset_name"):
        list(iter_json_rows(tmp_path))


# ---- datasets sources -----------------------------------------------------------------------


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def test_dataset_dir_relative_to_cwd(tmp_path, monkeypatch, offline_datasets):
    data_dir = tmp_path / "BelleGroup" / "generated_train_0.5M_CN"
    data_dir.mkdir(parents=True)
    (data_dir / "Belle_open_source_0.5M.json").write_text(
        (ASSETS / "belle_input_target.json").read_text(encoding="utf-8"), encoding="utf-8"
    )
    monkeypatch.chdir(tmp_path)
    rows = list(iter_dataset_rows("BelleGroup/generated_train_0.5M_CN"))
    assert [loc for loc, _ in rows] == [f"BelleGroup/generated_train_0.5M_CN[train][{i}]" for i in range(3)]
    assert rows[2][1] == {"input": "三加四等于几？", "target": "七"}


def test_dataset_split_and_unknown_split(tmp_path, offline_datasets):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text('{"input": "a", "target": "b"}\n', encoding="utf-8")
    (tmp_path / "d" / "test.jsonl").write_text('{"input": "c", "target": "d"}\n', encoding="utf-8")
    assert [row for _, row in iter_dataset_rows(str(tmp_path / "d"), split="test")] == [{"input": "c", "target": "d"}]
    with pytest.raises(DataError, match="--split"):
        list(iter_dataset_rows(str(tmp_path / "d"), split="validation"))


def test_dataset_name_that_is_a_file_gets_line_numbers():
    path = str(ASSETS / "firefly.jsonl")
    assert [loc for loc, _ in iter_dataset_rows(path)] == [f"{path}:1", f"{path}:2"]


# ---- the real datasets in ../shared/data ----------------------------------------------------


@pytest.mark.parametrize(
    "name, fmt, n",
    [
        ("llamafactory__alpaca_en_demo.json", "alpaca", 999),
        ("llamafactory__alpaca_zh_demo.json", "alpaca", 1000),
        ("chatglm-efficient-tuning__oaast_sft_zh.json", "history", 689),
        ("fastchat__dummy_conversation.json", "sharegpt", 500),
    ],
)
def test_shared_datasets_read_whole(shared_data, name, fmt, n):
    rows = list(iter_json_rows(shared_data / name))
    assert detect_format(rows[0][1]) == fmt
    results = [r for _, r in read_rows(rows, fmt)]
    bad = [r for r in results if isinstance(r, BadRow)]
    assert len(rows) == n
    assert not bad, bad[:3]
    if fmt in ("history", "sharegpt"):
        assert any(r.history for r in results)


# ---- history shapes of real releases (issue 8, item 2) ----------------------------------------


@pytest.mark.parametrize(
    "history",
    [
        "",  # hikariming's Chinese Alpaca code questions: 973 of 9,057 rows
        "  ",
        None,  # JSON null, and what `datasets` fills a column missing from some rows with
        [],  # ChatGLM-Efficient-Tuning / LLaMA-Factory rows without earlier rounds
        (),
    ],
    ids=["empty-string", "blank-string", "null", "empty-list", "empty-tuple"],
)
def test_empty_or_null_history_is_no_history(history):
    assert read_alpaca({"instruction": "q", "output": "a", "history": history}) == Example("q", "a")


def test_history_pairs_as_lists_or_tuples():
    row = {"instruction": "q2", "output": "a2", "history": [["q0", "a0"], ("q1", "")]}
    assert read_alpaca(row).history == (("q0", "a0"), ("q1", ""))


@pytest.mark.parametrize(
    "history, detail",
    [
        ("[['q', 'a']]", "a string"),
        ({"q": "a"}, "dict"),
        ([["q", "a", "extra"]], "history[0]"),
        ([["q", None]], "history[0]"),
        ([["q", "half an emoji \ud83d"]], "history[0]"),
    ],
)
def test_bad_history_is_a_counted_row_not_a_crash(history, detail):
    bad = _bad(read_alpaca, {"instruction": "q", "output": "a", "history": history})
    assert bad.reason in ("bad_history", "invalid_unicode") and detail in bad.detail


# ---- preference data (issue 8, item 3) -------------------------------------------------------

from instructglm.data.readers import read_preference  # noqa: E402


def test_preference_sharegpt_layout_takes_chosen_as_the_answer():
    # LLaMA-Factory's dpo_en_demo.json: the conversation before the answer, then one chosen and one rejected turn
    row = {
        "conversations": [
            {"from": "human", "value": "2+2?"},
            {"from": "gpt", "value": "4"},
            {"from": "human", "value": "and 3+3?"},
        ],
        "chosen": {"from": "gpt", "value": "6"},
        "rejected": {"from": "gpt", "value": "7"},
    }
    assert read_preference(row) == Example("and 3+3?", "6", history=(("2+2?", "4"),))
    row["system"] = "be terse"
    assert read_preference(row).system == "be terse"


def test_preference_alpaca_layout():
    row = {"instruction": "Add.", "input": "2 3", "chosen": "5", "rejected": "6", "history": ""}
    assert read_preference(row) == Example("Add.", "5", input="2 3")


@pytest.mark.parametrize(
    "prompt, chosen, expected",
    [
        ("2+2?", "4", Example("2+2?", "4")),
        ("2+2?", [{"role": "assistant", "content": "4"}], Example("2+2?", "4")),
        (
            [{"role": "system", "content": "s"}, {"role": "user", "content": "2+2?"}],
            [{"role": "assistant", "content": "4"}],
            Example("2+2?", "4", system="s"),
        ),
        (
            [{"role": "user", "content": "2+2?"}],
            [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],  # UltraFeedback: chosen repeats the prompt
            Example("2+2?", "4"),
        ),
    ],
    ids=["strings", "string-prompt-message-answer", "messages", "chosen-repeats-prompt"],
)
def test_preference_prompt_chosen_rejected_layout(prompt, chosen, expected):
    assert read_preference({"prompt": prompt, "chosen": chosen, "rejected": chosen}) == expected


def test_preference_without_prompt_field():
    # the implicit-prompt layout: chosen is the whole conversation (messages, or Anthropic HH's transcript)
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert read_preference({"chosen": messages, "rejected": messages}) == Example("hi", "hello")
    transcript = "\n\nHuman: 2+2?\n\nAssistant: 4\n\nHuman: and 3+3?\n\nAssistant: 6"
    assert read_preference({"chosen": transcript, "rejected": "x"}) == Example("and 3+3?", "6", history=(("2+2?", "4"),))


@pytest.mark.parametrize(
    "row, reason",
    [
        ({"prompt": "q", "rejected": "r"}, "missing_field"),
        ({"prompt": "q", "chosen": 3, "rejected": "r"}, "non_string_field"),
        ({"prompt": "q", "chosen": "", "rejected": "r"}, "empty_output"),
        ({"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "human", "value": "a"}}, "bad_conversation"),
        ({"conversations": [{"from": "human", "value": "q"}], "chosen": ["a"]}, "bad_conversation"),
        ({"chosen": "no transcript markers", "rejected": "r"}, "bad_conversation"),
        ({"prompt": "q", "chosen": [{"role": "user", "content": "q"}]}, "bad_conversation"),
    ],
)
def test_preference_bad_rows_have_a_reason(row, reason):
    bad = _bad(read_preference, row)
    assert bad.reason == reason and bad.detail


@pytest.mark.parametrize(
    "fields",
    [
        {"conversations", "chosen", "rejected"},
        {"prompt", "chosen", "rejected"},
        {"instruction", "input", "chosen", "rejected"},
        {"chosen", "rejected"},
    ],
)
def test_preference_fields_are_not_guessed_as_another_format(fields):
    from instructglm.data.readers import is_preference

    assert is_preference(fields)
    assert detect_format(fields) is None
