"""The errors a user can fix, apart from bugs.

`instructglm <command>` prints a `UserError` as one line, `instructglm <command>: error: <message>`,
and exits 2; any other exception is a bug and keeps its traceback. So raise a `UserError` (one of
the subclasses below, which also are the built-in type a caller may already catch) only when the
message names the thing at fault — the file, line or record, the flag and its value — and what to
do about it. Validation collects every problem and raises once.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, flags or files; the message says which and how to fix it."""


class BadValue(UserError, ValueError):
    """A flag, record or file content that cannot be used as given."""


class MissingFile(UserError, FileNotFoundError):
    """A path the user named (or a file expected inside it) that does not exist."""


class OutputExists(UserError, FileExistsError):
    """An output path that holds something this command will not overwrite."""


class MissingDependency(UserError, ImportError):
    """An optional package the command needs is not installed; the message names the pip extra."""
