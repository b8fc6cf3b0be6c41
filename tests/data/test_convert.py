"""convert: every format to {context, target} lines, bad rows by reason, --strict, atomic output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from instructglm.cli import main as cli_main
from instructglm.data import convert as convert_module
from instructglm.data.convert import convert
from instructglm.data.io import write_jsonl
from instructglm.data.records import DataError
from instructglm.layout import jsonl_meta_path

ASSETS = Path(__file__).parent / "assets"


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def read_meta(save_path) -> dict:
    return json.loads(Path(jsonl_meta_path(str(save_path))).read_text(encoding="utf-8"))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_alpaca_json_array(tmp_path, shared_data):
    out = tmp_path / "alpaca_data.jsonl"
    meta = convert(str(out), data_path=str(shared_data / "llamafactory__alpaca_zh_demo.json"))
    rows = read_jsonl(out)
    source = json.loads((shared_data / "llamafactory__alpaca_zh_demo.json").read_text(encoding="utf-8"))
    assert len(rows) == 1000 and meta["counts"] == {"rows": 1000, "written": 1000, "skipped": {}}
    first, second = source[0], source[1]
    assert rows[0] == {"context": f"Instruction: {first['instruction']}\nAnswer: ", "target": first["output"]}
    assert rows[1]["context"] == f"Instruction: {second['instruction']}\nInput: {second['input']}\nAnswer: "
    # UTF-8 with non-ASCII kept as is, one object per line
    raw = out.read_bytes().decode("utf-8")
    assert "识别并解释" in raw and "\\u" not in raw
    meta = read_meta(out)
    assert meta.pop("jsonl_bytes") == out.stat().st_size and len(meta.pop("jsonl_sha256")) == 64
    assert meta == {
        "template": "alpaca",
        "format": "alpaca",
        "source": str(shared_data / "llamafactory__alpaca_zh_demo.json"),
        "counts": {"rows": 1000, "written": 1000, "skipped": {}},
        "skipped_at": {},
    }


@pytest.mark.parametrize(
    "name, fmt, template, n",
    [
        ("llamafactory__alpaca_en_demo.json", "alpaca", "alpaca", 999),
        ("chatglm-efficient-tuning__oaast_sft_zh.json", "history", "chatglm", 689),
        ("fastchat__dummy_conversation.json", "sharegpt", "chatglm", 500),
    ],
)
def test_shared_datasets_auto_format_and_default_template(tmp_path, shared_data, name, fmt, template, n):
    out = tmp_path / "out.jsonl"
    meta = convert(str(out), data_path=str(shared_data / name))
    assert (meta["format"], meta["template"], meta["counts"]["written"]) == (fmt, template, n)
    rows = read_jsonl(out)
    assert len(rows) == n
    if fmt != "alpaca":
        assert any(r["context"].startswith("[Round 0]\n问：") and r["context"].endswith("答：") for r in rows)


def test_oaast_history_row_renders_chatglm_rounds(tmp_path, shared_data):
    source = json.loads((shared_data / "chatglm-efficient-tuning__oaast_sft_zh.json").read_text(encoding="utf-8"))
    index = next(i for i, r in enumerate(source) if r["history"])
    row = source[index]
    out = tmp_path / "o.jsonl"
    convert(str(out), data_path=str(shared_data / "chatglm-efficient-tuning__oaast_sft_zh.json"))
    expected = "".join(f"[Round {i}]\n问：{q}\n答：{a}\n" for i, (q, a) in enumerate(row["history"]))
    query = row["instruction"] + (f"\n{row['input']}" if row["input"] else "")
    expected += f"[Round {len(row['history'])}]\n问：{query}\n答："
    assert read_jsonl(out)[index] == {"context": expected, "target": row["output"]}


def test_sharegpt_sample_counts_dialogue_problems(tmp_path):
    out = tmp_path / "s.jsonl"
    meta = convert(str(out), data_path=str(ASSETS / "sharegpt.json"))
    assert meta["counts"] == {"rows": 5, "written": 2, "skipped": {"bad_conversation": 3}}
    assert read_jsonl(out)[0] == {
        "context": "You are terse.\n[Round 0]\n问：2+2?\n答：4\n[Round 1]\n问：and 3+3?\n答：",
        "target": "6",
    }
    where = f"{ASSETS / 'sharegpt.json'}"
    assert meta["skipped_at"] == {"bad_conversation": [f"{where}[2]", f"{where}[3]", f"{where}[4]"]}


def test_firefly_and_history_assets(tmp_path):
    out = tmp_path / "f.jsonl"
    assert convert(str(out), data_path=str(ASSETS / "firefly.jsonl"))["format"] == "firefly"
    assert read_jsonl(out) == [
        {"context": "[Round 0]\n问：你好\n答：你好！有什么可以帮你？\n[Round 1]\n问：一加一等于几？\n答：", "target": "二"},
        {"context": "你是一个数学助手。\n五乘二", "target": "十"},
    ]
    convert(str(out), data_path=str(ASSETS / "history.json"))
    assert read_jsonl(out) == [
        {"context": "[Round 0]\n问：一加一等于几？\n答：二\n[Round 1]\n问：再加一呢？\n答：", "target": "三"},
        {"context": "Upper-case it.\nabc", "target": "ABC"},
    ]


def test_belle_json_lines_in_a_json_file(tmp_path):
    out = tmp_path / "b.jsonl"
    meta = convert(str(out), data_path=str(ASSETS / "belle_input_target.json"))
    assert (meta["format"], meta["template"]) == ("belle", "belle")
    assert read_jsonl(out)[0] == {
        "context": "指令: 用一句话描述地球为什么是独一无二的。\n\n答案: ",
        "target": "地球上有适宜生命存在的条件和多样化的生命形式",
    }


def test_belle_dataset_dir_with_split(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "belle"
    data.mkdir()
    (data / "test.json").write_text((ASSETS / "belle_input_target.json").read_text(encoding="utf-8"), encoding="utf-8")
    out = tmp_path / "b.jsonl"
    meta = convert(str(out), dataset_name=str(data), split="test")
    assert meta["counts"]["written"] == 3 and read_meta(out)["split"] == "test"
    assert read_jsonl(out)[2] == {"context": "指令: 三加四等于几？\n答案: ", "target": "七"}


def test_explicit_format_and_template(tmp_path):
    out = tmp_path / "a.jsonl"
    # BELLE's later releases are Alpaca-shaped: --format belle gives them the BELLE template
    meta = convert(str(out), data_path=str(ASSETS / "history.json"), format="belle")
    assert meta["template"] == "belle"
    assert read_jsonl(out)[1]["context"] == "指令: Upper-case it.\n输入: abc\n答案: "
    meta = convert(str(out), data_path=str(ASSETS / "history.json"), template="instruction-response")
    assert (meta["format"], meta["template"]) == ("history", "instruction-response")
    assert read_jsonl(out)[1]["context"] == "###Instruction:Upper-case it.###Input:abc###Response:"
    convert(str(out), data_path=str(ASSETS / "history.json"), template=r"<{instruction}|{input}>\n")
    assert read_jsonl(out)[1]["context"] == "<Upper-case it.|abc>\n"
    assert read_meta(out)["template"] == r"<{instruction}|{input}>\n"


def test_bad_rows_skipped_and_counted_by_reason(tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    code = cli_main(["convert", "--data_path", str(ASSETS / "alpaca_bad_rows.jsonl"), "--save_path", str(out)])
    assert code == 0
    assert read_jsonl(out) == [
        {"context": "Instruction: Add 2 and 3.\nAnswer: ", "target": "5"},
        {"context": "Instruction: Reverse the word.\nInput: abc\nAnswer: ", "target": "cba"},
        {"context": "Instruction: 数字：三\nAnswer: ", "target": "3"},
    ]
    where = str(ASSETS / "alpaca_bad_rows.jsonl")
    expected = {
        "malformed_json": 2,
        "missing_field": 4,
        "non_string_field": 5,
        "empty_output": 6,
        "not_an_object": 7,
        "empty_prompt": 9,
        "bad_history": 10,
    }
    meta = read_meta(out)
    assert meta["counts"] == {"rows": 10, "written": 3, "skipped": dict.fromkeys(expected, 1)}
    assert meta["skipped_at"] == {reason: [f"{where}:{line}"] for reason, line in expected.items()}
    err = capsys.readouterr().err
    assert "skipped 7 rows" in err
    for reason, line in expected.items():
        assert f"{reason}: 1 (at {where}:{line};" in err


def test_lone_surrogate_is_a_counted_bad_row(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "\\ud83d"}\n', encoding="utf-8")
    meta = convert(str(tmp_path / "o.jsonl"), data_path=str(path))
    assert meta["counts"]["skipped"] == {"invalid_unicode": 1} and meta["skipped_at"]["invalid_unicode"] == [f"{path}:2"]


def test_first_locations_are_capped(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n' + '{"instruction": "a", "output": ""}\n' * 8, encoding="utf-8")
    meta = convert(str(tmp_path / "o.jsonl"), data_path=str(path))
    assert meta["counts"]["skipped"] == {"empty_output": 8}
    assert meta["skipped_at"]["empty_output"] == [f"{path}:{n}" for n in range(2, 7)]
    assert ", ...;" in meta["report"]


def test_strict_stops_at_first_bad_row_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "a.jsonl"
    out.write_text("previous run\n", encoding="utf-8")
    argv = ["convert", "--data_path", str(ASSETS / "alpaca_bad_rows.jsonl"), "--save_path", str(out), "--strict"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "alpaca_bad_rows.jsonl:2: malformed_json" in err and "--strict" in err
    assert out.read_text(encoding="utf-8") == "previous run\n"
    assert not Path(jsonl_meta_path(str(out))).exists() and leftovers(tmp_path) == []
    # HfArgumentParser booleans: `--strict false` is off
    assert cli_main(argv + ["false"]) == 0


def test_unrecognised_shape_names_fields_and_formats(tmp_path, capsys):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps([{"prompt": "a", "completion": "b"}]), encoding="utf-8")
    out = tmp_path / "o.jsonl"
    assert cli_main(["convert", "--data_path", str(path), "--save_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unrecognised record shape; fields seen: completion, prompt" in err
    for name in ("alpaca", "history", "belle", "sharegpt", "firefly"):
        assert name in err
    assert "--format" in err
    assert list(tmp_path.iterdir()) == [path]


def test_no_usable_row_is_an_error_and_writes_nothing(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"instruction": "a", "output": " "}\n', encoding="utf-8")
    with pytest.raises(DataError, match="(?s)no usable row.*empty_output: 1"):
        convert(str(tmp_path / "o.jsonl"), data_path=str(path))
    with pytest.raises(DataError, match="(?s)no usable row as format .sharegpt.*missing_field"):
        convert(str(tmp_path / "o.jsonl"), data_path=str(ASSETS / "history.json"), format="sharegpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of --data_path"),
        ({"data_path": "a.json", "dataset_name": "b"}, "exactly one of --data_path"),
        ({"data_path": str(ASSETS / "history.json"), "template": "nope"}, "unknown template"),
        ({"data_path": str(ASSETS / "history.json"), "format": "csv"}, "--format 'csv'"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    from instructglm.errors import BadValue

    with pytest.raises(BadValue, match=message):
        convert(str(tmp_path / "o.jsonl"), **kwargs)


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.json"
    path.write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no JSON object found"):
        convert(str(tmp_path / "o.jsonl"), data_path=str(path))


def test_missing_data_path_exits_nonzero(tmp_path, capsys):
    assert cli_main(["convert", "--data_path", str(tmp_path / "no.json"), "--save_path", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


# ---- atomic output --------------------------------------------------------------------------


def test_write_jsonl_interrupted_leaves_old_file_and_no_temp(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text("old\n", encoding="utf-8")

    def rows():
        yield {"context": "a", "target": "b"}
        yield {"context": "c", "target": "d"}
        raise KeyboardInterrupt  # a user's Ctrl-C mid-way

    with pytest.raises(KeyboardInterrupt):
        write_jsonl(out, rows())
    assert out.read_text(encoding="utf-8") == "old\n" and leftovers(tmp_path) == []


def test_convert_interrupted_midway_never_leaves_a_partial_file(tmp_path, shared_data, monkeypatch):
    out = tmp_path / "data" / "alpaca_data.jsonl"
    calls = 0
    real_render = convert_module.render

    def failing_render(example, template):
        nonlocal calls
        calls += 1
        if calls == 500:
            raise OSError("disk full")
        return real_render(example, template)

    monkeypatch.setattr(convert_module, "render", failing_render)
    with pytest.raises(OSError, match="disk full"):
        convert(str(out), data_path=str(shared_data / "llamafactory__alpaca_en_demo.json"))
    assert calls == 500
    assert not out.exists() and not Path(jsonl_meta_path(str(out))).exists()
    assert leftovers(out.parent) == []


def test_output_dir_is_created_and_stats_saved(tmp_path, capsys):
    out = tmp_path / "new" / "dir" / "a.jsonl"
    stats = tmp_path / "stats.json"
    argv = ["convert", "--data_path", str(ASSETS / "firefly.jsonl"), "--save_path", str(out), "--stats_path", str(stats)]
    assert cli_main(argv) == 0
    assert len(read_jsonl(out)) == 2
    saved = json.loads(stats.read_text(encoding="utf-8"))
    assert saved["chars"]["target"]["count"] == 2 and saved["chars"]["target"]["max"] == 1.0
    printed = capsys.readouterr().out
    assert "wrote 2 of 2 rows" in printed and "count" in printed and "90%" in printed


def test_max_seq_length_needs_a_tokenizer(tmp_path, capsys):
    argv = ["convert", "--data_path", str(ASSETS / "firefly.jsonl"), "--save_path", str(tmp_path / "o"), "--max_seq_length", "8"]
    assert cli_main(argv) == 2
    assert "--model_name_or_path" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_format_flag_choices_are_the_readers():
    from dataclasses import fields
    from typing import get_args, get_type_hints

    from instructglm.data.convert import ConvertArguments
    from instructglm.data.readers import FORMATS

    assert next(f for f in fields(ConvertArguments) if f.name == "format")
    assert get_args(get_type_hints(ConvertArguments)["format"]) == ("auto", *FORMATS)


# ---- issue 8 ----------------------------------------------------------------------------------


def _write_json(path: Path, value) -> Path:
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def test_empty_string_history_keeps_every_row(tmp_path):
    # hikariming's Chinese Alpaca code questions write `"history": ""` on rows without earlier rounds
    rows = [
        {"instruction": "写一个加法函数", "input": "", "output": "def add(a, b): return a + b", "history": ""},
        {"instruction": "再写减法", "input": "", "output": "def sub(a, b): return a - b", "history": [["加法?", "def add"]]},
        {"instruction": "乘法", "input": "", "output": "def mul(a, b): return a * b", "history": None},
        {"instruction": "除法", "input": "", "output": "def div(a, b): return a / b", "history": []},
    ]
    meta = convert(str(tmp_path / "o.jsonl"), data_path=str(_write_json(tmp_path / "code.json", rows)))
    assert meta["counts"] == {"rows": 4, "written": 4, "skipped": {}}
    assert read_jsonl(tmp_path / "o.jsonl")[0] == {"context": "写一个加法函数", "target": rows[0]["output"]}


DPO_DEMO = [  # the shape of LLaMA-Factory's data/dpo_en_demo.json
    {
        "conversations": [{"from": "human", "value": "Name a color."}],
        "chosen": {"from": "gpt", "value": "Blue."},
        "rejected": {"from": "gpt", "value": "Seven."},
    },
    {
        "conversations": [
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello!"},
            {"from": "human", "value": "Name a fruit."},
        ],
        "chosen": {"from": "gpt", "value": "An apple."},
        "rejected": {"from": "gpt", "value": "A chair."},
    },
    {
        "conversations": [{"from": "human", "value": "Bad row"}],
        "chosen": {"from": "human", "value": "a user turn is no answer"},
        "rejected": {"from": "gpt", "value": "x"},
    },
]


def test_preference_data_is_refused_by_auto_naming_the_fields(tmp_path, capsys):
    path = _write_json(tmp_path / "dpo_en_demo.json", DPO_DEMO)
    out = tmp_path / "o.jsonl"
    assert cli_main(["convert", "--data_path", str(path), "--save_path", str(out)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "chosen, conversations, rejected" in err and "--format preference" in err and "chosen" in err
    assert not out.exists()


def test_format_preference_takes_chosen_as_the_answer(tmp_path):
    path = _write_json(tmp_path / "dpo_en_demo.json", DPO_DEMO)
    meta = convert(str(tmp_path / "o.jsonl"), data_path=str(path), format="preference")
    assert meta["format"] == "preference" and meta["template"] == "chatglm"
    assert meta["counts"] == {"rows": 3, "written": 2, "skipped": {"bad_conversation": 1}}
    assert meta["skipped_at"] == {"bad_conversation": [f"{path}[2]"]}
    assert read_jsonl(tmp_path / "o.jsonl") == [
        {"context": "Name a color.", "target": "Blue."},
        {"context": "[Round 0]\n问：Hi\n答：Hello!\n[Round 1]\n问：Name a fruit.\n答：", "target": "An apple."},
    ]


def test_alpaca_shaped_preference_pairs_take_alpacas_template(tmp_path):
    """instruction/input + chosen/rejected (LLaMA-Factory's Alpaca-style DPO rows): the Alpaca prompt, as the same
    rows without the pair would get."""
    rows = [{"instruction": "Add", "input": "2 and 2", "chosen": "4", "rejected": "5"}]
    path = _write_json(tmp_path / "pairs.json", rows)
    meta = convert(str(tmp_path / "o.jsonl"), data_path=str(path), format="preference")
    plain = convert(str(tmp_path / "p.jsonl"), data_path=str(_write_json(tmp_path / "a.json", [
        {"instruction": "Add", "input": "2 and 2", "output": "4"}])))
    assert meta["template"] == plain["template"] == "alpaca"
    assert read_jsonl(tmp_path / "o.jsonl") == read_jsonl(tmp_path / "p.jsonl")


def test_format_preference_prompt_chosen_rejected_jsonl(tmp_path):
    path = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "2+2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "3+3?"}], "chosen": [{"role": "assistant", "content": "6"}], "rejected": []},
        {"prompt": "x", "rejected": "y"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    meta = convert(str(tmp_path / "o.jsonl"), data_path=str(path), format="preference", template="plain")
    assert meta["counts"] == {"rows": 3, "written": 2, "skipped": {"missing_field": 1}}
    assert meta["skipped_at"] == {"missing_field": [f"{path}:3"]}
    assert [r["target"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["4", "6"]


@pytest.mark.parametrize("how", ["same", "relative", "symlink", "hardlink"])
def test_save_path_equal_to_data_path_is_refused(tmp_path, monkeypatch, how):
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps([{"instruction": "a", "output": "b"}]), encoding="utf-8")
    before = data.read_bytes()
    save = {
        "same": data,
        "relative": Path("sub/../alpaca_data.json"),
        "symlink": tmp_path / "link.json",
        "hardlink": tmp_path / "hard.json",
    }[how]
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    if how == "symlink":
        save.symlink_to(data)
    if how == "hardlink":
        os.link(data, save)
    with pytest.raises(DataError, match="is the input"):
        convert(str(save), data_path=str(data))
    assert data.read_bytes() == before and not Path(jsonl_meta_path(str(save))).exists()


def test_save_path_that_is_a_directory_is_refused(tmp_path):
    (tmp_path / "out").mkdir()
    with pytest.raises(DataError, match="is a directory"):
        convert(str(tmp_path / "out"), data_path=str(ASSETS / "firefly.jsonl"))


def test_deeply_nested_rows_cost_one_counted_row_each(tmp_path):
    deep = 200_000
    path = tmp_path / "in.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text("\n".join([good, "[" * deep + "]" * deep, '{"a":' * deep + "1" + "}" * deep, good]) + "\n")
    meta = convert(str(tmp_path / "o.jsonl"), data_path=str(path))
    assert meta["counts"] == {"rows": 4, "written": 2, "skipped": {"too_deep": 2}}
    assert meta["skipped_at"] == {"too_deep": [f"{path}:2", f"{path}:3"]}


def test_not_utf8_row_is_one_counted_row(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b'{"instruction": "a", "output": "b"}\n{"instruction": "\xc3(", "output": "b"}\n')
    meta = convert(str(tmp_path / "o.jsonl"), data_path=str(path))
    assert meta["counts"] == {"rows": 2, "written": 1, "skipped": {"not_utf8": 1}}
    assert meta["skipped_at"] == {"not_utf8": [f"{path}:2"]}


def test_outputs_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        convert(str(tmp_path / "o.jsonl"), data_path=str(ASSETS / "firefly.jsonl"))
    finally:
        os.umask(old)
    for name in ("o.jsonl", "o.jsonl.meta.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_sidecar_fingerprints_the_jsonl(tmp_path):
    import hashlib

    out = tmp_path / "o.jsonl"
    convert(str(out), data_path=str(ASSETS / "firefly.jsonl"))
    meta = read_meta(out)
    assert meta["jsonl_bytes"] == out.stat().st_size
    assert meta["jsonl_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()


def test_convert_imports_neither_torch_nor_transformers(tmp_path, repo_dir):
    """`instructglm --help` and convert's own code import neither; the CLI's `instructglm convert`
    imports no torch (its argument parser, `transformers.HfArgumentParser` in cli.py, loads
    transformers' top level, which stays torch-free)."""
    import subprocess
    import sys

    script = f"""
import json, sys
from instructglm.cli import main
code = main(["--help"])
assert code == 0
heavy = lambda: sorted({{m.split(".")[0] for m in sys.modules}} & {{"torch", "transformers", "datasets", "peft"}})
after_help = heavy()
from instructglm.data.convert import ConvertArguments, main as convert_main
convert_main(ConvertArguments(save_path={str(tmp_path / "o.jsonl")!r}, data_path={str(ASSETS / "firefly.jsonl")!r}))
after_library = heavy()
code = main(["convert", "--data_path", {str(ASSETS / "firefly.jsonl")!r}, "--save_path", {str(tmp_path / "p.jsonl")!r}])
assert code == 0
print(json.dumps([after_help, after_library, "torch" in sys.modules]))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 0, done.stderr
    after_help, after_library, torch_after_cli = json.loads(done.stdout.strip().splitlines()[-1])
    assert after_help == [] and after_library == [] and torch_after_cli is False
