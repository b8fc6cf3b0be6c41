"""instructglm chat: the loop keeps history, /clear and /exit work, the CLI streams from stdin; THUDM's
`chat`/`stream_chat` API runs on the project's generation code with THUDM's observable behaviour."""

from __future__ import annotations

import io
import subprocess
import threading

import pytest

from instructglm.errors import BadValue
from instructglm.infer.chat import BOT, chat, chat_loop, process_response, stream_chat
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


# --- THUDM's chat API on the project's generation code ------------------------------------------


@pytest.fixture(scope="module")
def glm(glm_dir):
    return load_model(str(glm_dir), device="cpu")


def _by_hand(model, tokenizer, prompt, max_new_tokens):
    """THUDM's chat, step by step: generate greedily, drop eos and pad, decode, post-process."""
    import torch

    inputs = tokenizer([prompt], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
    stop = {model.config.eos_token_id, model.config.pad_token_id}
    return process_response(tokenizer.decode([t for t in out[0, inputs["input_ids"].shape[1] :].tolist() if t not in stop]))


def test_chat_is_the_round_prompt_generation_with_thudm_clean_up(glm):
    model, tokenizer, _ = glm
    history = [("你好", "你好！")]
    response, new_history = chat(model, tokenizer, "讲个笑话", history, do_sample=False, max_length=None, max_new_tokens=8)
    assert new_history == history + [("讲个笑话", response)] and history == [("你好", "你好！")]
    prompt = "[Round 0]\n问：你好\n答：你好！\n[Round 1]\n问：讲个笑话\n答："  # ChatGLM-6B's round prompt
    assert response == _by_hand(model, tokenizer, prompt, 8)
    streamed = list(stream_chat(model, tokenizer, "讲个笑话", history, do_sample=False, max_new_tokens=8))
    assert 1 <= len(streamed) <= 8  # one yield per generated token
    assert streamed[-1] == (response, new_history)
    # max_length counts prompt + answer, as THUDM's did
    n = len(tokenizer("hi")["input_ids"])
    assert chat(model, tokenizer, "hi", do_sample=False, max_length=n + 3)[0] == _by_hand(model, tokenizer, "hi", 3)


def test_chat_samples_by_top_p_alone_like_every_command(glm, monkeypatch):
    model, tokenizer, _ = glm
    seen = []
    real = type(model).generate

    def recording(self, *args, **kwargs):
        seen.append(kwargs)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", recording)
    chat(model, tokenizer, "hi", max_new_tokens=3)
    list(stream_chat(model, tokenizer, "hi", max_new_tokens=3))
    assert len(seen) == 2
    for kwargs in seen:  # THUDM's defaults, and top_k 0 instead of transformers' 50
        assert (kwargs["do_sample"], kwargs["top_p"], kwargs["temperature"], kwargs["top_k"]) == (True, 0.7, 0.95, 0)
        assert kwargs["eos_token_id"] == model.config.eos_token_id and kwargs["pad_token_id"] == model.config.pad_token_id
    # an explicit generate argument still wins
    chat(model, tokenizer, "hi", max_new_tokens=3, top_k=5)
    assert seen[-1]["top_k"] == 5


def test_non_finite_scores_force_token_5_instead_of_crashing(glm):
    model, tokenizer, _ = glm

    def overflow(input_ids, scores):  # what an fp16 overflow looks like to the sampler
        return scores * float("nan")

    for do_sample in (True, False):
        response, _ = chat(model, tokenizer, "hi", do_sample=do_sample, max_new_tokens=4, logits_processor=[overflow])
        assert response == process_response(tokenizer.decode([5] * 4))


def test_leaving_stream_chat_early_stops_generation_at_once(glm):
    model, tokenizer, _ = glm
    steps = []

    def count(input_ids, scores):
        steps.append(1)
        return scores

    before = threading.active_count()
    for _ in stream_chat(model, tokenizer, "hi", do_sample=False, max_new_tokens=500, logits_processor=[count]):
        break
    stopped_at = len(steps)
    assert threading.active_count() <= before  # the generation thread was joined, not left running
    assert stopped_at < 10
    threading.Event().wait(0.3)
    assert len(steps) == stopped_at  # and nothing generates afterwards


def test_chat_errors_are_user_errors(glm):
    model, tokenizer, _ = glm
    with pytest.raises(BadValue, match="--max_length 2"):
        chat(model, tokenizer, "a longer question than two tokens", max_length=2)
    with pytest.raises(BadValue, match="--max_new_tokens"):
        list(stream_chat(model, tokenizer, "hi", do_sample=False, max_new_tokens=-3))


def test_process_response_is_thudms():
    assert process_response("  我在[[训练时间]]训练,好吗?  ok, fine ") == "我在2023年训练，好吗？  ok, fine"
