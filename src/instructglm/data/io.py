"""Reading rows from JSON / JSON Lines files and `datasets`, and writing files atomically.

Every row comes with a location string that error messages and skip reports quote:
`path:LINE` for JSON Lines (1-based), `path[INDEX]` for a JSON array and a dataset split (0-based).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from instructglm.data.records import BadRow, DataError

Row = tuple[str, Any]  # (location, parsed JSON value or a BadRow for a line that did not parse)


def read_text(path: str | os.PathLike) -> str:
    """The file's text; a UTF-8 BOM is dropped (real releases carry one)."""
    path = Path(path)
    if not path.is_file():
        hint = " (a directory: pass it as --dataset_name to load it with `datasets`)" if path.is_dir() else ""
        raise FileNotFoundError(f"{path}: no such file{hint}")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {e.start}: {e.reason}); re-save the file as UTF-8") from None


def iter_json_rows(path: str | os.PathLike) -> Iterator[Row]:
    """Rows of a JSON array or JSON Lines file, whatever its extension says.

    A file that starts with `[` and parses is an array; anything else is read line by line, so a
    `.json` holding JSON Lines just works and one broken line costs one row, reported as a
    `malformed_json` BadRow, not the whole file. A broken array cannot be split into rows and
    raises `DataError` with the line and column.
    """
    text = read_text(path)
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            # "Extra data" after a complete first value means one JSON value per line.
            if not e.msg.startswith("Extra data"):
                raise DataError(
                    f"{path}:{e.lineno}:{e.colno}: malformed JSON array ({e.msg}); fix the file, or write it "
                    "as JSON Lines (one record per line), where a broken line is skipped and counted"
                ) from None
        else:
            yield from ((f"{path}[{i}]", row) for i, row in enumerate(value))
            return
    # split on "\n" only: str.splitlines would also break at U+2028, which JSON allows inside strings
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.strip()  # CRLF line ends leave a trailing "\r"
        if not line:
            continue
        try:
            yield f"{path}:{number}", json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{path}:{number}", BadRow("malformed_json", f"{e.msg} at column {e.colno}")


def iter_dataset_rows(name: str, split: str = "train") -> Iterator[Row]:
    """Rows of `datasets.load_dataset(name, split=split)`: a hub name, or a local dir / file.

    A local `.json`/`.jsonl` file is read with `iter_json_rows` instead, so its rows get line numbers.
    """
    if Path(name).is_file():
        yield from iter_json_rows(name)
        return
    from datasets import load_dataset

    try:
        dataset = load_dataset(name, split=split)
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"{name}: {e}; choose one with --split") from None
        raise
    for i, row in enumerate(dataset):
        yield f"{name}[{split}][{i}]", row


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Open a temp file beside `path` for writing; it replaces `path` only if the block succeeds.

    An exception (or a kill) inside the block leaves `path` as it was, never half written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl(path: str | os.PathLike, rows) -> int:
    """Write dicts one per line (UTF-8, non-ASCII kept) atomically; return how many."""
    count = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def write_json(path: str | os.PathLike, value: Any, default: Callable[[Any], Any] | None = None) -> None:
    """Write one JSON document (indented, non-ASCII kept) atomically; `default` as in `json.dump`."""
    with atomic_write(path) as f:
        json.dump(value, f, ensure_ascii=False, indent=2, default=default)
        f.write("\n")
