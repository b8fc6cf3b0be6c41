"""Reading rows from JSON / JSON Lines files and `datasets`, and writing files atomically.

Every row comes with a location string that error messages and skip reports quote:
`path:LINE` for JSON Lines (1-based), `path[INDEX]` for a JSON array and a dataset split (0-based).

`iter_json_rows` is the one JSON / JSON Lines reader: convert, stats, tokenize and train read
through it. What one row can get wrong costs that row (a `BadRow` in its place), never the file:
a line that is not JSON, not UTF-8, or nested deeper than Python's parser can recurse.

Writes go to a temp file beside the target and replace it only when complete (`atomic_write`),
with the umask's mode. Temp names carry the writer's pid (`temp_sibling`), so a later run can tell
the leftovers of a killed writer from files in use and remove them (`remove_stale_siblings`).
"""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from instructglm.data.records import BadRow, DataError
from instructglm.errors import MissingFile

Row = tuple[str, Any]  # (location, parsed JSON value, or a BadRow for a line that did not parse)

BOM = b"\xef\xbb\xbf"
_JSON_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STRUCTURE = re.compile(r'[\[\]{}"]')
_STRING_END = re.compile(r'["\\]')
_DECODER = json.JSONDecoder()
TOO_DEEP = "nested deeper than Python's JSON parser can follow (its recursion limit); flatten the record"


def _check_file(path: Path) -> None:
    if not path.is_file():
        hint = " (a directory: pass it as --dataset_name to load it with `datasets`)" if path.is_dir() else ""
        raise MissingFile(f"{path}: no such file{hint}")


def iter_json_rows(path: str | os.PathLike) -> Iterator[Row]:
    """Rows of a JSON array or JSON Lines file, whatever its extension says.

    A file that starts with `[` and parses as one array is an array; anything else is read line
    by line, so a `.json` holding JSON Lines just works. Lines end at LF, CRLF or a lone CR
    (never at U+2028 / U+2029 / U+0085, which JSON allows inside strings); a UTF-8 BOM, on the
    first line or any other, is dropped. A line that is not JSON, not UTF-8 or too deeply nested
    is a `BadRow` (`malformed_json`, `not_utf8`, `too_deep`) at its line number; so is a too
    deeply nested element of an array. An array file is decoded with `surrogateescape`, so bytes
    that are not UTF-8 reach the readers as invalid text, which costs that one record.

    Raises:
        MissingFile: `path` is not a file.
        DataError: an array that is broken as a whole (the message has its line and column).
    """
    path = Path(path)
    _check_file(path)
    if _starts_with_bracket(path):
        values = _array_values(path)
        if values is not None:
            yield from ((f"{path}[{i}]", value) for i, value in enumerate(values))
            return
    yield from _line_rows(path)


def _starts_with_bracket(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.read(3) != BOM:
            f.seek(0)
        while chunk := f.read(1 << 16):
            stripped = chunk.lstrip(b" \t\r\n")
            if stripped:
                return stripped.startswith(b"[")
    return False


def _line_rows(path: Path) -> Iterator[Row]:
    number = 0
    with open(path, "rb") as f:
        for chunk in f:  # binary iteration ends lines at b"\n" only
            chunk = chunk.removesuffix(b"\n").removesuffix(b"\r")
            # a raw CR cannot be inside a JSON string, so every CR left ends a line (old Mac files)
            for raw in chunk.split(b"\r"):
                number += 1
                location = f"{path}:{number}"
                row = _parse_line(raw.removeprefix(BOM))
                if row is not _BLANK:
                    yield location, row


_BLANK = object()  # a blank line (None is the JSON value null)


def _parse_line(raw: bytes) -> Any:
    """The line's JSON value, a BadRow saying why not, or `_BLANK`."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        return BadRow("not_utf8", f"byte {e.start + 1} of the line (0x{raw[e.start]:02x}) is not UTF-8 ({e.reason}); re-save the file as UTF-8")
    if not line:
        return _BLANK
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        return BadRow("malformed_json", f"{e.msg} at column {e.colno}")
    except RecursionError:
        return BadRow("too_deep", TOO_DEEP)


def _array_values(path: Path) -> list[Any] | None:
    """The elements of the file's one JSON array, or None when more follows it (JSON Lines of arrays).

    Elements are decoded one at a time, so a single element too deep for the parser becomes a
    `too_deep` BadRow (its end found by a scan that needs no recursion) and the rest still count.
    """
    text = path.read_bytes().removeprefix(BOM).decode("utf-8", errors="surrogateescape")
    try:
        end, values = _decode_array(text)
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}:{e.colno}: malformed JSON array ({e.msg}); fix the file, or write it "
            "as JSON Lines (one record per line), where a broken line is skipped and counted"
        ) from None
    if _JSON_WHITESPACE.match(text, end).end() != len(text):
        return None
    return values


def _decode_array(text: str) -> tuple[int, list[Any]]:
    """(index after the array, its elements) of the array that starts `text` after whitespace."""
    pos = _JSON_WHITESPACE.match(text).end() + 1  # past "["
    pos = _JSON_WHITESPACE.match(text, pos).end()
    values: list[Any] = []
    if text.startswith("]", pos):
        return pos + 1, values
    while True:
        try:
            value, pos = _DECODER.raw_decode(text, pos)
        except RecursionError:
            value, pos = BadRow("too_deep", TOO_DEEP), _end_of_value(text, pos)
        values.append(value)
        pos = _JSON_WHITESPACE.match(text, pos).end()
        if text.startswith(",", pos):
            pos = _JSON_WHITESPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return pos + 1, values
        else:
            raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)


def _end_of_value(text: str, start: int) -> int:
    """The index after the array or object that opens at `start`, found without recursion."""
    depth, pos = 0, start
    while match := _STRUCTURE.search(text, pos):
        pos = match.end()
        char = match.group()
        if char == '"':
            while (end := _STRING_END.search(text, pos)) and end.group() == "\\":
                pos = end.end() + 1  # an escape: skip the escaped character
            if end is None:
                break
            pos = end.end()
        elif char in "[{":
            depth += 1
        else:
            depth -= 1
            if depth == 0:
                return pos
    raise json.JSONDecodeError("Unterminated array or object", text, start)


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
    except (FileNotFoundError, ConnectionError) as e:
        # no such local dir or data files, an unknown hub name, or the hub out of reach (offline)
        raise MissingFile(
            f"--dataset_name {name}: {e}; give a local file or dir, or a hub name that exists (online)"
        ) from None
    for i, row in enumerate(dataset):
        yield f"{name}[{split}][{i}]", row


# ---- temp files beside a target -------------------------------------------------------------

_TEMP_NAME = re.compile(r"\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.(?P<kind>tmp|old)")


def temp_sibling(path: str | os.PathLike, kind: str = "tmp", pid: int | None = None) -> Path:
    """A fresh hidden name beside `path` (same file system, so renames are atomic), tagged with the writer's pid.

    `kind` is `tmp` (being written) or `old` (an earlier result put aside during a swap).
    """
    path = Path(path)
    name = path.parent / f".{path.name}.{pid or os.getpid()}-{uuid.uuid4().hex[:8]}.{kind}"
    if pid is None:
        _IN_USE.add(str(name))
    return name


def release(name: str | os.PathLike) -> None:
    """Mark a `temp_sibling` of this process as no longer in use (done with, or left by an interrupted write)."""
    _IN_USE.discard(str(name))


# This process's temp names still in use: its own leftovers (an interrupted write in a long-lived
# process, such as a notebook) are stale once released, while a live pid's are never touched.
_IN_USE: set[str] = set()


def _stale(entry: Path, pid: int) -> bool:
    if pid == os.getpid():
        return str(entry) not in _IN_USE
    return not _running(pid)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def stale_siblings(path: str | os.PathLike) -> list[tuple[Path, str]]:
    """(sibling, kind) of the temp names beside `path` whose writer is no longer running, oldest first.

    A writer is recognised by its pid on this machine; one on another host sharing the directory
    looks dead, so do not point two hosts' runs at one output path.
    """
    path = Path(path)
    try:
        entries = list(path.parent.iterdir())
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        match = _TEMP_NAME.fullmatch(entry.name)
        if match and match["name"] == path.name and _stale(entry, int(match["pid"])):
            found.append((entry, match["kind"]))
    return sorted(found, key=lambda item: _mtime(item[0]))


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def remove_stale_siblings(path: str | os.PathLike) -> None:
    """Delete what killed writers left beside `path` (temp files and dirs; see `stale_siblings`)."""
    import shutil

    for entry, _ in stale_siblings(path):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make renames in `directory` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _open_temp(path: Path) -> tuple[int, Path | None]:
    """(fd, temp path) to write `path`'s new content to; the path is None for an unnamed O_TMPFILE inode.

    An unnamed inode vanishes with the process, so a kill mid-write leaves nothing behind. Both
    kinds are created with mode 0o666, which the umask narrows as for any new file (mkstemp's
    0o600 would hide the output from the user's group).
    """
    if hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd"):
        try:
            return os.open(path.parent, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o666), None
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT):
                raise
    tmp = temp_sibling(path)
    return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666), tmp


def _link_unnamed(fd: int, name: Path) -> None:
    """Give the O_TMPFILE inode open as `fd` the name `name`.

    linkat must follow the /proc/self/fd magic link (AT_SYMLINK_FOLLOW); `os.link` passes that
    flag only when given a dir fd, so the link is taken relative to an open /proc/self/fd.
    """
    proc = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.link(str(fd), name, src_dir_fd=proc, follow_symlinks=True)
    finally:
        os.close(proc)


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[IO[str]]:
    """Open a temp file beside `path` for writing; it replaces `path` only if the block succeeds.

    An exception (or a kill) inside the block leaves `path` as it was, never half written, and
    no temp file behind (a kill can leave one only on systems without O_TMPFILE; the next write
    to `path` removes it). A symlink at `path` keeps pointing at the file, which is replaced.
    A full disk raises the OSError with `path` in its message.
    """
    path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(path)
    fd, tmp = _open_temp(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
            if tmp is None:  # name the complete inode only now, then rename it over the target
                tmp = temp_sibling(path)
                _link_unnamed(fd, tmp)
        os.replace(tmp, path)
    except BaseException as error:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT) and str(path) not in str(error):
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    finally:
        if tmp is not None:
            release(tmp)
    fsync_dir(path.parent)


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


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """`{"jsonl_bytes", "jsonl_sha256"}` of a file: what convert's sidecar records of its jsonl, so a
    reader can tell a sidecar that describes another version of the file (see tokenize)."""
    import hashlib

    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"jsonl_bytes": os.path.getsize(path), "jsonl_sha256": digest}


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name one file: the same path, another spelling, a symlink or a hard link."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def umask_modes(directory: str | os.PathLike) -> None:
    """Give the files directly in `directory` that are narrower than the umask allows (0o666 & ~umask) that mode.

    safetensors (0.8) creates its files 0600, whatever the umask, so an adapter or a merged model saved through
    transformers would be unreadable to the other users and services a 0644 neighbour serves.
    """
    mask = os.umask(0)
    os.umask(mask)
    wanted = 0o666 & ~mask
    for entry in Path(directory).iterdir():
        if entry.is_file() and not entry.is_symlink():
            mode = entry.stat().st_mode & 0o777
            if mode | wanted != mode:  # only widen, up to what the umask allows
                entry.chmod(mode | wanted)
