"""Streaming terminal chat with a base model and an optional LoRA adapter.

    instructglm chat --model_name_or_path THUDM/chatglm-6b --adapter output/alpaca

Type a message and press Enter; the answer streams as it is generated. `/clear` forgets the
history, `/exit` (or Ctrl-D) quits, Ctrl-C stops the current answer.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from instructglm.infer.generate import GenerationArguments, stream_chat
from instructglm.infer.load import ModelArguments, load_from_args

ARGUMENTS = (ModelArguments, GenerationArguments)

BANNER = "InstructGLM chat: type a message; /clear forgets the history, /exit quits."
USER, BOT = "User: ", "InstructGLM: "


def chat_loop(
    model, tokenizer, template, settings: GenerationArguments, read: Callable[[str], str] = input, out: TextIO = sys.stdout
) -> list[tuple[str, str]]:
    """Run the conversation until /exit or end of input; returns the final history."""
    history: list[tuple[str, str]] = []
    print(BANNER, file=out, flush=True)
    while True:
        try:
            query = read(USER).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=out)
            return history
        if not query:
            continue
        if query == "/exit":
            return history
        if query == "/clear":
            history = []
            print("(history cleared)", file=out, flush=True)
            continue
        print(BOT, end="", file=out, flush=True)
        stream = stream_chat(model, tokenizer, template, query, history, settings)
        answer = ""
        try:
            for piece in stream:
                answer += piece
                print(piece, end="", file=out, flush=True)
        except KeyboardInterrupt:
            # The stream cancels itself when left; the cut answer is not kept in the history.
            print("\n(stopped)", file=out, flush=True)
            continue
        except ValueError as err:
            # The history outgrew --max_length: say so and let the user /clear.
            print(f"\n(error: {err})", file=out, flush=True)
            continue
        print(file=out, flush=True)
        history.append((query, answer))


def main(model_args: ModelArguments, settings: GenerationArguments) -> int:
    model, tokenizer, template = load_from_args(model_args)
    chat_loop(model, tokenizer, template, settings)
    return 0
