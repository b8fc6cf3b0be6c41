"""The one record type every input format is read into, and the two errors of the data stage.

Readers (`readers.py`) turn a raw row into an `Example` or raise `BadRow`; convert counts bad
rows by reason and skips them (or stops at the first with `--strict`). `DataError` is for
problems with the input as a whole — an unrecognised shape, a file that is not UTF-8 — and
is what the commands turn into a non-zero exit with the message.
"""

from __future__ import annotations

from dataclasses import dataclass

from instructglm.errors import BadValue


@dataclass(frozen=True)
class Example:
    """One training example: the prompt parts, the answer, and earlier rounds of a dialogue.

    `instruction` and `input` follow Alpaca; formats with a single prompt field (BELLE's
    `input`/`target`, a chat's last user turn) leave `input` empty. `history` holds the earlier
    (query, answer) rounds, oldest first. `system` is a system prompt where the format has one.
    """

    instruction: str
    output: str
    input: str = ""
    history: tuple[tuple[str, str], ...] = ()
    system: str = ""


class BadRow(Exception):
    """One row that cannot become an `Example`; `reason` is a short key that convert counts by."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DataError(BadValue):
    """The input as a whole is unusable; the message names the file or record and the fix."""


def text_problem(value: str) -> str | None:
    """Why `value` cannot be written as UTF-8, or None when it can.

    Two things get into a parsed string that UTF-8 cannot hold: a lone surrogate from a JSON escape
    such as `"\\ud83d"` cut off from its pair, and a byte of a file that was not UTF-8, which the
    array reader keeps as U+DC80..U+DCFF (Python's `surrogateescape`) so it costs one row.
    """
    if value.isascii():
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        char = value[e.start]
        if 0xDC80 <= ord(char) <= 0xDCFF:
            return f"byte 0x{ord(char) - 0xDC00:02x} at character {e.start} is not UTF-8; re-save the file as UTF-8"
        return f"{char!r} at character {e.start} is half a surrogate pair, not valid Unicode"
    return None
