"""`instructglm.data.io`: the one JSON / JSON Lines reader, and atomic writes (issue 8, items 9 and 10)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from instructglm.data.io import atomic_write, iter_json_rows, write_json, write_jsonl
from instructglm.data.records import BadRow, DataError
from instructglm.errors import MissingFile, UserError

DEEP = 200_000


def _reasons(rows) -> list[str | None]:
    return [row.reason if isinstance(row, BadRow) else None for _, row in rows]


# ---- line ends, BOM, encodings --------------------------------------------------------------


def test_cr_only_line_ends_are_lines(tmp_path):
    path = tmp_path / "mac.jsonl"
    path.write_bytes(b'{"a": 1}\r{"a": 2}\r\r{"a": 3}\r')
    assert list(iter_json_rows(path)) == [(f"{path}:1", {"a": 1}), (f"{path}:2", {"a": 2}), (f"{path}:4", {"a": 3})]


def test_crlf_and_a_bom_on_a_later_line(tmp_path):
    # two files joined with `cat`: the second one's BOM sits at the start of a line
    path = tmp_path / "joined.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\r\n\xef\xbb\xbf{"a": 2}\r\n')
    assert [row for _, row in iter_json_rows(path)] == [{"a": 1}, {"a": 2}]


def test_unicode_line_separators_inside_strings_stay_in_the_row(tmp_path):
    path = tmp_path / "a.jsonl"
    rows = [{"t": f"a{sep}b"} for sep in ("\u2028", "\u2029", "\u0085", "\x1c", "\x1d", "\x1e")]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert [row for _, row in iter_json_rows(path)] == rows


def test_invalid_utf8_costs_one_row_with_its_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": "ok"}\n{"a": "\xff\xfe"}\n{"a": "fine"}\n')
    rows = list(iter_json_rows(path))
    assert [loc for loc, _ in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert _reasons(rows) == [None, "not_utf8", None]
    assert "byte" in rows[1][1].detail and "UTF-8" in rows[1][1].detail


def test_invalid_utf8_in_an_array_reaches_the_reader_as_invalid_text(tmp_path):
    from instructglm.data.readers import read_rows

    path = tmp_path / "a.json"
    path.write_bytes(b'[{"instruction": "q", "output": "ok"}, {"instruction": "q", "output": "\xff"}]')
    out = list(read_rows(iter_json_rows(path), "alpaca"))
    assert _reasons(out) == [None, "invalid_unicode"]
    assert "0xff" in out[1][1].detail and out[1][0] == f"{path}[1]"


def test_a_50_mb_line(tmp_path):
    path = tmp_path / "big.jsonl"
    big = "字" * (50 * 1024 * 1024 // 3)
    path.write_text(json.dumps({"t": "x"}) + "\n" + json.dumps({"t": big}, ensure_ascii=False) + "\n", encoding="utf-8")
    rows = list(iter_json_rows(path))
    assert len(rows) == 2 and rows[1][1]["t"] == big


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(MissingFile, match="no such file"):
        list(iter_json_rows(tmp_path / "nope.json"))
    with pytest.raises(UserError, match="--dataset_name"):
        list(iter_json_rows(tmp_path))


# ---- deep nesting (item 10) -----------------------------------------------------------------


@pytest.mark.parametrize("deep", ["[" * DEEP + "]" * DEEP, '{"a":' * DEEP + "1" + "}" * DEEP], ids=["array", "object"])
def test_a_deeply_nested_line_is_one_counted_row(tmp_path, deep):
    path = tmp_path / "a.jsonl"
    path.write_text('{"a": 1}\n' + deep + '\n{"a": 2}\n', encoding="utf-8")
    rows = list(iter_json_rows(path))
    assert [loc for loc, _ in rows] == [f"{path}:1", f"{path}:2", f"{path}:3"]
    assert _reasons(rows) == [None, "too_deep", None]


@pytest.mark.parametrize("deep", ["[" * DEEP + "]" * DEEP, '{"a":' * DEEP + '"x"' + "}" * DEEP], ids=["array", "object"])
def test_a_deeply_nested_element_of_an_array_file_is_one_counted_row(tmp_path, deep):
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1},\n ' + deep + ' ,\n{"a": "]"}]', encoding="utf-8")
    rows = list(iter_json_rows(path))
    assert [loc for loc, _ in rows] == [f"{path}[0]", f"{path}[1]", f"{path}[2]"]
    assert _reasons(rows) == [None, "too_deep", None] and rows[2][1] == {"a": "]"}


def test_an_unclosed_deep_element_is_a_broken_array(tmp_path):
    path = tmp_path / "a.json"
    path.write_text('[{"a": 1}, ' + "[" * DEEP, encoding="utf-8")
    with pytest.raises(DataError, match="malformed JSON array"):
        list(iter_json_rows(path))


# ---- atomic writes --------------------------------------------------------------------------


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_written_files_get_the_umask_mode(tmp_path, umask_022):
    write_jsonl(tmp_path / "a.jsonl", [{"a": 1}])
    write_json(tmp_path / "b.json", {"b": 2})
    assert _mode(tmp_path / "a.jsonl") == _mode(tmp_path / "b.json") == 0o644
    os.umask(0o077)
    write_json(tmp_path / "c.json", {})
    assert _mode(tmp_path / "c.json") == 0o600


def test_atomic_write_through_a_symlink_replaces_the_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "real.jsonl"
    real.write_text("old\n", encoding="utf-8")
    (tmp_path / "link.jsonl").symlink_to(real)
    with atomic_write(tmp_path / "link.jsonl") as f:
        f.write("new\n")
    assert (tmp_path / "link.jsonl").is_symlink() and real.read_text(encoding="utf-8") == "new\n"


def test_stale_temp_files_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys

    from instructglm.data.io import temp_sibling

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    target = tmp_path / "out.jsonl"
    stale = temp_sibling(target, "tmp", pid=dead_pid)
    stale.write_text("half", encoding="utf-8")
    live = temp_sibling(target, "tmp")  # this process's: in use
    live.write_text("mine", encoding="utf-8")
    unrelated = tmp_path / ".out.jsonl.swp"
    unrelated.write_text("an editor's", encoding="utf-8")
    write_jsonl(target, [{"a": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, unrelated.name])


def test_no_space_names_the_path(tmp_path, monkeypatch):
    import errno

    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="out.jsonl") as info:
        write_jsonl(tmp_path / "out.jsonl", [{"a": 1}])
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert info.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []


def test_a_null_line_is_a_row_not_a_blank_line(tmp_path):
    # found by the fuzz suite: the blank-line marker was None, so a `null` line vanished uncounted
    path = tmp_path / "a.jsonl"
    path.write_text('null\n\n{"a": 1}\n', encoding="utf-8")
    assert list(iter_json_rows(path)) == [(f"{path}:1", None), (f"{path}:3", {"a": 1})]
