"""`instructglm <command> [flags]`: one entry point, a thin skin over library functions.

Every command is a module with `ARGUMENTS` (a tuple of dataclasses; their fields and `help`
metadata are the flags) and `main(*parsed) -> int | None`. A `ValueError` or `OSError` from a
command is a user error: it is printed as `instructglm <command>: error: ...` and exits 2. Parsing goes through
`transformers.HfArgumentParser`, so booleans accept `true/false/True/False/1/0` and
`TrainingArguments` flags pass through unchanged. Modules are imported only when their command
runs, so `instructglm --help` stays fast.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

from instructglm.errors import BadValue, UserError

# command name -> (module, one-line summary)
COMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("instructglm.data.convert", "dataset (json/jsonl/HF name or dir) -> jsonl of {context, target}"),
    "stats": ("instructglm.data.stats", "length table of a converted jsonl, in characters and tokens"),
    "tokenize": ("instructglm.data.tokenize", "jsonl -> tokenized Arrow dataset on disk (input_ids, seq_len)"),
    "train": ("instructglm.train.finetune", "LoRA fine-tuning through the HF Trainer"),
    "demo": ("instructglm.demo.pipeline", "the bundled end-to-end job: convert, tokenize, train, evaluate"),
    "chat": ("instructglm.infer.chat", "streaming terminal chat with a base model and an adapter"),
    "predict": ("instructglm.infer.predict", "batched generation over a jsonl, resumable"),
    "merge": ("instructglm.infer.merge", "merge a LoRA adapter into the base and save it"),
    "web": ("instructglm.serve.web", "Gradio streaming chat"),
    "serve": ("instructglm.serve.api", "OpenAI-compatible API server"),
    "eval": ("instructglm.eval.evaluate", "evaluate base and adapters: BLEU/ROUGE, loss, benchmarks, report.html"),
}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Keep module docstrings' layout (examples, lists) and show each flag's default."""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: instructglm <command> [flags]   (instructglm <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def run_command(name: str, argv: list[str]) -> int:
    """Parse `argv` into the command's argument dataclasses and call its `main`."""
    from transformers import HfArgumentParser

    module = importlib.import_module(COMMANDS[name][0])
    parser = HfArgumentParser(
        module.ARGUMENTS, prog=f"instructglm {name}", description=module.__doc__, formatter_class=_HelpFormatter
    )
    try:
        *parsed, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)  # dataclasses validate here
        if unknown:
            raise BadValue(unknown_flags_message(name, unknown))
        return module.main(*parsed) or 0
    except (UserError, OSError) as error:
        if isinstance(error, OSError) and not isinstance(error, UserError) and error.errno not in USER_FIXABLE_ERRNOS:
            raise  # a bug, or a failure the user cannot act on: keep the traceback
        # The message names the path or value and the fix; a traceback would only bury it.
        # one write, line end included: processes of one torchrun sharing stderr then never splice their lines
        sys.stderr.write(f"instructglm {name}: error: {error}\n")
        sys.stderr.flush()
        return 2


def unknown_flags_message(name: str, unknown: list[str]) -> str:
    """One line naming the flags (or stray values) `instructglm <name>` does not take."""
    flags = [arg.split("=", 1)[0] for arg in unknown if arg.startswith("-")]
    what = f"unknown flag(s) {', '.join(flags)}" if flags else f"unexpected value(s) {' '.join(unknown)}"
    return f"{what}: `instructglm {name}` does not take them (a typo?); see `instructglm {name} --help` for its flags"


# Operating-system refusals that name a path the user can free, unlock or move (the OSError's text
# carries the errno's message and the file name).
USER_FIXABLE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"instructglm: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return run_command(name, rest)


if __name__ == "__main__":
    sys.exit(main())
