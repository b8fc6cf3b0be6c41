"""instructglm chat: the loop keeps history, /clear and /exit work, the CLI streams from stdin; THUDM's
`chat`/`stream_chat` API runs on the project's generation code with THUDM's observable behaviour."""

from __future__ import annotations

import io
import json
import subprocess
import threading

import pytest
import torch

from instructglm.data.messages import Message
from instructglm.errors import BadValue
from instructglm.infer.chat import BOT, chat, chat_loop, process_response, stream_chat
from instructglm.infer.generate import GenerationArguments
from instructglm.infer.engine import generate_batch
from instructglm.infer.load import load_model
from tests.infer.helpers import cli, cli_env

GREEDY = GenerationArguments(max_new_tokens=8, do_sample=False)


def _reply(model, prompter, messages):
    """The parsed greedy reply to `messages` through the engine, as the chat loop prompts and reads it."""
    ids = prompter.prompt_ids(messages)
    return prompter.reply(generate_batch(model, prompter.tokenizer, [ids], GREEDY, prompter)[0].text)


def test_chat_loop_keeps_history_and_clears_it(family):
    _, base, adapter = family
    model, tokenizer, prompter = load_model(str(base), adapter=str(adapter), device="cpu")
    lines = iter(["hi", "say hello", "/clear", "say hello", "/exit", "never read"])
    out = io.StringIO()
    history = chat_loop(model, tokenizer, prompter, GREEDY, read=lambda prompt: next(lines), out=out)
    hi, hello = Message("user", "hi"), Message("user", "say hello")
    first = _reply(model, prompter, [hi])
    second = _reply(model, prompter, [hi, first, hello])
    fresh = _reply(model, prompter, [hello])
    assert history == [hello, fresh]  # /clear dropped the first two rounds
    text = out.getvalue()
    assert text.count(BOT) == 3 and "(history cleared)" in text
    assert BOT + first.content + "\n" in text and BOT + second.content + "\n" in text


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


def test_a_line_of_invalid_utf8_is_refused_and_the_session_goes_on(llama_dir):
    from instructglm.infer.chat import NOT_TEXT

    result = subprocess.run(
        cli("chat", "--model_name_or_path", str(llama_dir), "--device", "cpu", "--max_new_tokens", "3"),
        input=b"\xff\nhello\n", capture_output=True, env=cli_env(), timeout=120,
    )
    stdout = result.stdout.decode("utf-8")
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-2000:]
    assert NOT_TEXT in stdout and stdout.index(NOT_TEXT) < stdout.index(BOT)
    assert stdout.count(BOT) == 1  # `hello` was still answered


def test_chat_loop_refuses_a_line_that_is_not_text(family):
    from instructglm.infer.chat import NOT_TEXT

    _, base, adapter = family
    model, tokenizer, prompter = load_model(str(base), adapter=str(adapter), device="cpu")
    lines = iter(["\udcff\udcfe", "hi", "/exit"])
    out = io.StringIO()
    history = chat_loop(model, tokenizer, prompter, GREEDY, read=lambda prompt: next(lines), out=out)
    assert NOT_TEXT in out.getvalue() and [m.content for m in history if m.role == "user"] == ["hi"]


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


# --- THUDM's ChatGLM2-6B and ChatGLM3-6B chat ---------------------------------------------------

TOOLS = [{"name": "get_weather", "description": "The weather of a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]
CALL = "```python\ntool_call(city='Paris')\n```"
TOOL_HISTORY = [
    {"role": "system", "content": "Answer the following questions as best as you can. You have access to the following tools:", "tools": TOOLS},
    {"role": "user", "content": "How warm is Paris?"},
]


@pytest.fixture(scope="module")
def v3(checkpoints):
    return load_model(str(checkpoints("chatglm3")[0]), device="cpu")


@pytest.fixture(scope="module")
def v2(checkpoints):
    return load_model(str(checkpoints("chatglm2")[0]), device="cpu")


def _recording_generate(model, monkeypatch, reply_ids=None):
    """Record every `generate` call's inputs and kwargs; with `reply_ids`, `generate` answers them (then the stop id)."""
    import torch

    seen = []
    real = type(model).generate

    def recording(self, *args, **kwargs):
        seen.append(kwargs)
        if reply_ids is None:
            return real(self, *args, **kwargs)
        prompt = kwargs["input_ids"]
        return torch.cat([prompt, torch.tensor([reply_ids], dtype=prompt.dtype)], dim=1)

    monkeypatch.setattr(type(model), "generate", recording)
    return seen


def _thudm_plain_response(output, history):
    """THUDM's ChatGLM3 process_response for a reply without tool calls (its code, without the eval branch)."""
    history = [dict(h) for h in history]
    content = ""
    for response in output.split("<|assistant|>"):
        metadata, content = response.split("\n", maxsplit=1) if "\n" in response else ("", response)
        assert not metadata.strip(), "this reference covers text replies only"
        content = content.strip()
        history.append({"role": "assistant", "metadata": metadata, "content": content})
        content = content.replace("[[训练时间]]", "2023年")
    return content, history


def test_chatglm3_chat_is_build_chat_input_its_stop_ids_and_process_response(v3, monkeypatch):
    model, tokenizer, _ = v3
    history = [*TOOL_HISTORY, {"role": "assistant", "metadata": "get_weather", "content": CALL}]
    frozen = json.dumps(history)
    seen = _recording_generate(model, monkeypatch)
    response, new_history = chat(model, tokenizer, '{"temperature": 21}', history, role="observation", do_sample=False, max_new_tokens=6)
    expected_prompt = tokenizer.build_chat_input('{"temperature": 21}', history=history, role="observation")["input_ids"]
    assert seen[0]["input_ids"].tolist() == expected_prompt.tolist()
    stops = [tokenizer.eos_token_id, tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
    assert sorted(seen[0]["eos_token_id"]) == sorted(stops)
    # by hand: the greedy ids up to the first stop id, decoded with the special tokens, read as THUDM did
    monkeypatch.undo()
    with torch.no_grad():
        out = model.generate(input_ids=expected_prompt, attention_mask=torch.ones_like(expected_prompt), do_sample=False,
                             max_new_tokens=6, eos_token_id=stops)
    ids = out[0, expected_prompt.shape[1]:].tolist()
    ids = ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))]
    asked = history + [{"role": "observation", "content": '{"temperature": 21}'}]
    assert (response, new_history) == _thudm_plain_response(tokenizer.decode(ids), asked)
    assert json.dumps(history) == frozen  # the caller's history is not modified
    streamed = list(stream_chat(model, tokenizer, '{"temperature": 21}', history, role="observation", do_sample=False, max_new_tokens=6))
    assert streamed and streamed[-1] == (response, new_history)
    # the model's own method (THUDM's entry point) is the same call
    assert model.chat(tokenizer, '{"temperature": 21}', history, role="observation", do_sample=False, max_new_tokens=6) == (response, new_history)
    # ... with role as THUDM's fourth positional argument
    assert model.chat(tokenizer, '{"temperature": 21}', history, "observation", do_sample=False, max_new_tokens=6) == (response, new_history)
    assert list(model.stream_chat(tokenizer, '{"temperature": 21}', history, "observation", do_sample=False, max_new_tokens=6))[-1] == (response, new_history)


def test_chatglm3_tool_call_reply_is_parsed_like_thudms(v3, monkeypatch):
    """The reply is forced (generate returns the ids ChatGLM3 writes for a call): parsing and history, not the tiny model."""
    model, tokenizer, _ = v3
    reply = tokenizer.build_single_message("assistant", "get_weather", CALL)[1:] + [tokenizer.get_command("<|observation|>")]
    _recording_generate(model, monkeypatch, reply)
    response, history = chat(model, tokenizer, "How warm is Paris?", TOOL_HISTORY[:1])
    # THUDM: {"name": metadata, "parameters": eval of the tool_call(...) line}, the raw part kept in the history
    assert response == {"name": "get_weather", "parameters": {"city": "Paris"}}
    assert history[:2] == [TOOL_HISTORY[0], {"role": "user", "content": "How warm is Paris?"}]
    assert history[2]["role"] == "assistant" and history[2]["metadata"] == "get_weather"
    assert history[2]["content"].strip() == CALL
    # without tools in the history's system message THUDM answered {"name", "content"}
    response, _ = chat(model, tokenizer, "How warm is Paris?", [])
    assert response["name"] == "get_weather" and response["content"].strip() == CALL and "parameters" not in response
    # text, then the call as a second <|assistant|> part: the last part decides the response, both are kept
    text = tokenizer.build_single_message("assistant", "", "Let me look it up.")[1:]
    _recording_generate(model, monkeypatch, text + [tokenizer.get_command("<|assistant|>")] + reply)
    response, history = chat(model, tokenizer, "How warm is Paris?", TOOL_HISTORY[:1])
    assert response == {"name": "get_weather", "parameters": {"city": "Paris"}}
    # (the metadata keeps the space THUDM's decode writes after a special token, as THUDM's history did)
    assert [h["metadata"].strip() for h in history[2:]] == ["", "get_weather"] and history[2]["content"] == "Let me look it up."


def test_chatglm3_and_chatglm2_chat_defaults_are_thudms(v3, v2, monkeypatch):
    for model, tokenizer, _ in (v3, v2):
        seen = _recording_generate(model, monkeypatch)
        chat(model, tokenizer, "hi", max_new_tokens=3)
        list(stream_chat(model, tokenizer, "hi", max_new_tokens=3))
        for kwargs in seen:  # THUDM's ChatGLM2/3 defaults, top_k 0 instead of transformers' 50
            assert (kwargs["do_sample"], kwargs["top_p"], kwargs["temperature"], kwargs["top_k"]) == (True, 0.8, 0.8, 0)
        monkeypatch.undo()


def test_chatglm2_chat_is_build_prompt_with_pairs(v2, monkeypatch):
    model, tokenizer, _ = v2
    history = [("你好", "你好！")]
    seen = _recording_generate(model, monkeypatch)
    response, new_history = chat(model, tokenizer, "讲个笑话", history, do_sample=False, max_new_tokens=8)
    prompt = tokenizer([tokenizer.build_prompt("讲个笑话", history)], return_tensors="pt")["input_ids"]
    assert seen[0]["input_ids"].tolist() == prompt.tolist()
    monkeypatch.undo()
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=8)
    # THUDM's ChatGLM2: decode the new ids (specials dropped), strip
    assert response == tokenizer.decode(out[0, prompt.shape[1]:].tolist()).strip().replace("[[训练时间]]", "2023年")
    assert new_history == history + [("讲个笑话", response)]
    with pytest.raises(BadValue, match="pairs"):
        chat(model, tokenizer, "hi", [{"role": "user", "content": "x"}])


def test_a_v1_checkpoint_chats_in_rounds_and_a_v3_one_in_role_tokens(glm, v3):
    """THUDM's chat picks the checkpoint's own format: never v1's rounds for v3, nor the reverse."""
    model, tokenizer, _ = glm
    with pytest.raises(BadValue, match="pairs"):
        chat(model, tokenizer, "hi", [{"role": "user", "content": "x"}], max_new_tokens=2)
    model3, tokenizer3, _ = v3
    with pytest.raises(BadValue, match="dicts with 'role' and 'content'"):
        chat(model3, tokenizer3, "hi", [("q", "a")], max_new_tokens=2)
