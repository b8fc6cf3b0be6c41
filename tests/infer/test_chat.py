"""instructglm chat: the loop keeps history, /clear and /exit work, the CLI streams from stdin."""

from __future__ import annotations

import io
import subprocess

from instructglm.infer.chat import BOT, chat_loop
from instructglm.infer.generate import GenerationArguments, build_prompt, generate_batch
from instructglm.infer.load import load_model
from tests.infer.helpers import cli, cli_env

GREEDY = GenerationArguments(max_new_tokens=8, do_sample=False)


def test_chat_loop_keeps_history_and_clears_it(family):
    _, base, adapter = family
    model, tokenizer, template = load_model(str(base), adapter=str(adapter), device="cpu")
    lines = iter(["hi", "say hello", "/clear", "say hello", "/exit", "never read"])
    out = io.StringIO()
    history = chat_loop(model, tokenizer, template, GREEDY, read=lambda prompt: next(lines), out=out)
    first = generate_batch(model, tokenizer, [build_prompt(template, "hi")], GREEDY)[0].text
    second = generate_batch(model, tokenizer, [build_prompt(template, "say hello", [("hi", first)])], GREEDY)[0].text
    fresh = generate_batch(model, tokenizer, [build_prompt(template, "say hello")], GREEDY)[0].text
    assert history == [("say hello", fresh)]  # /clear dropped the first two rounds
    text = out.getvalue()
    assert text.count(BOT) == 3 and "(history cleared)" in text
    assert BOT + first + "\n" in text and BOT + second + "\n" in text


def test_chat_cli_over_stdin(glm_dir, glm_adapter):
    result = subprocess.run(
        cli("chat", "--model_name_or_path", str(glm_dir), "--adapter", str(glm_adapter), "--device", "cpu",
            "--do_sample", "false", "--max_new_tokens", "6"),
        input="hi\n/clear\nsay hello\n/exit\n",
        capture_output=True,
        text=True,
        env=cli_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "InstructGLM chat" in result.stdout
    assert result.stdout.count(BOT) == 2 and "(history cleared)" in result.stdout


def test_chat_cli_ends_at_end_of_input(llama_dir):
    result = subprocess.run(
        cli("chat", "--model_name_or_path", str(llama_dir), "--device", "cpu", "--max_new_tokens", "3"),
        input="hi\n", capture_output=True, text=True, env=cli_env(), timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count(BOT) == 1
