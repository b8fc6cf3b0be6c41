"""instructglm serve: the official openai client against a tiny model on loopback."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import openai
import pytest

from instructglm.infer.engine import BatchEngine, StopScanner
from instructglm.infer.load import load_model
from instructglm.infer.prompts import text_turns
from instructglm.serve.api import create_app
from tests.infer.helpers import reference_completion, serve_in_thread

KEY = "test-key"
QUESTIONS = ["What is two plus three?", "hi", "Reverse the word cat", "你好", "say hello"]


@pytest.fixture(scope="module")
def loaded(llama_dir, llama_adapter):
    return load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")


@pytest.fixture(scope="module")
def engine(loaded):
    model, tokenizer, _ = loaded
    return BatchEngine(model, tokenizer, max_batch_size=4, max_queue=128)


@pytest.fixture(scope="module")
def server(loaded, engine):
    app = create_app(engine, loaded[2], model_id="tiny", api_key=KEY, max_tokens_limit=64, max_request_bytes=20_000)
    url, srv, thread = serve_in_thread(app)
    yield url
    srv.should_exit = True
    thread.join(timeout=30)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(loaded, question, history=(), max_tokens=8):
    """The one-at-a-time answer (transformers' `generate` alone on this prompt)."""
    model, tokenizer, prompter = loaded
    return reference_completion(model, tokenizer, prompter.chat_ids(question, history), max_tokens, prompter)


def test_models(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_is_the_greedy_answer_with_history(client, loaded):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello world"},
                {"role": "user", "content": "say hello"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=8)
    expected = greedy(loaded, "say hello", [("hi", "hello world")])
    assert reply.object == "chat.completion" and reply.model == "tiny"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens


def test_streaming_adds_up_to_the_same_answer(client, loaded):
    stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                            temperature=0, max_tokens=8, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    expected = greedy(loaded, "hi")
    assert text == expected.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    assert chunks[-1].usage.completion_tokens == expected.completion_tokens


def test_sse_ends_with_done(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_stop_string_cuts_the_answer(client, loaded):
    full = greedy(loaded, "What is two plus three?", max_tokens=12).text
    assert len(full) > 4
    stop = full[3:5]
    for stream in (False, True):
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "What is two plus three?"}],
                                               temperature=0, max_tokens=12, stop=[stop], stream=stream)
        text = "".join(c.choices[0].delta.content or "" for c in reply if c.choices) if stream else reply.choices[0].message.content
        assert text == full[: full.find(stop)], (full, stop, text)


def _error(err: openai.APIStatusError) -> dict:
    body = err.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_api_key_is_required(server):
    for key in ("wrong", ""):
        bad = openai.OpenAI(base_url=server + "/v1", api_key=key or "x", max_retries=0,
                            default_headers={} if key else {"Authorization": ""})
        with pytest.raises(openai.AuthenticationError) as info:
            bad.models.list()
        assert info.value.status_code == 401 and _error(info.value)["code"] == "invalid_api_key"


def test_max_tokens_over_the_limit(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=65)
    error = _error(info.value)
    assert error["param"] == "max_tokens" and "64" in error["message"]


def test_context_overflow(client):
    # The tiny model's context is 256 tokens.
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hello " * 250}], max_tokens=64)
    assert _error(info.value)["code"] == "context_length_exceeded"


def test_bad_requests_get_openai_errors(server, client):
    headers = {"Authorization": f"Bearer {KEY}"}
    url = server + "/v1/chat/completions"
    r = httpx.post(url, content=b"{not json", headers=headers)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(url, content=b'{"messages": [{"role": "user", "content": "' + b"a" * 30_000 + b'"}]}', headers=headers)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = httpx.post(url, json={"messages": []}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.get(server + "/v1/nothing", headers=headers)
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    assert "last non-system message" in _error(info.value)["message"]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "function", "content": "x"}, {"role": "user", "content": "hi"}])
    assert _error(info.value)["param"] == "messages[0].role"
    # a text template (this run's alpaca) cannot show tool results: 400 naming the family and the template
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "tool", "content": "x", "name": "f"}, {"role": "user", "content": "hi"}])
    error = _error(info.value)
    assert error["param"] == "messages" and "causal-lm model family cannot use tools" in error["message"] and "alpaca" in error["message"]


def test_concurrent_load_loses_no_request(server, loaded):
    expected = {q: greedy(loaded, q, max_tokens=4).text for q in QUESTIONS}
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)

    def worker(i):
        answers = []
        for j in range(4):
            q = QUESTIONS[(i + j) % len(QUESTIONS)]
            r = client.chat.completions.with_raw_response.create(model="tiny", messages=[{"role": "user", "content": q}],
                                                                 temperature=0, max_tokens=4)
            answers.append((q, r.status_code, r.parse().choices[0].message.content))
        return answers

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        results = [a for answers in pool.map(worker, range(16), timeout=240) for a in answers]
    assert time.monotonic() - started < 240
    assert len(results) == 64
    assert all(status == 200 for _, status, _ in results)
    # Every answer is the one for its own question: no request lost, none mixed with another.
    assert all(content == expected[q] and content for q, _, content in results)


def test_text_template_rounds_rules():
    from instructglm.errors import BadValue

    m = lambda role, content: SimpleNamespace(role=role, content=content)  # noqa: E731
    system, history, query = text_turns([m("system", "Be brief."), m("user", "a"), m("assistant", "b"), m("user", "c"), m("user", "d")])
    assert (system, history, query) == ("Be brief.", [("a", "b")], "c\nd")
    with pytest.raises(BadValue, match="start with a user"):
        text_turns([m("assistant", "x"), m("user", "q")])


def test_system_and_developer_go_on_the_line_before_the_rendered_rounds(client, loaded):
    """As convert writes a system prompt for a text template: `{system}\n{template's rounds}`."""
    model, tokenizer, prompter = loaded
    messages = [{"role": "developer", "content": "Rule."}, {"role": "user", "content": "q"}]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=4)
    ids = tokenizer("Rule.\n" + prompter.template.render("q"))["input_ids"]
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].message.content == reference_completion(model, tokenizer, ids, 4, prompter).text


def test_stop_scanner_holds_back_possible_starts():
    s = StopScanner(["END"])
    assert s.feed("abc E") == "abc " and s.feed("N") == "" and s.feed("X") == "ENX"
    assert s.feed("yE") == "y" and s.feed("ND more") == "" and s.stopped
    assert s.feed("later") == "" and s.flush() == ""
    assert StopScanner([]).feed("E") == "E"


# --- issue 8, item 13 ---------------------------------------------------------------------------

AUTH = {"Authorization": f"Bearer {KEY}"}


def test_every_route_needs_the_key(server):
    for path in ("/openapi.json", "/v1/models", "/v1/nothing", "/docs", "/"):
        r = httpx.get(server + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", path
    assert httpx.post(server + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}).status_code == 401
    r = httpx.get(server + "/openapi.json", headers=AUTH)
    assert r.status_code == 200 and "/v1/chat/completions" in r.json()["paths"]


def test_tiny_temperatures_answer_greedily(server, loaded):
    expected = greedy(loaded, "hi", max_tokens=6).text
    for temperature in (1e-300, 5e-324, 1e-30):
        r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": temperature})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == expected


@pytest.mark.parametrize("param, value", [
    ("max_tokens", True), ("max_tokens", "5"), ("max_tokens", 5.5), ("max_tokens", 5.0), ("max_completion_tokens", False),
    ("n", True), ("n", "1"), ("top_p", "0.5"), ("top_p", True), ("temperature", "0"), ("temperature", False),
    ("stream", "true"), ("stream", 1), ("stream", None), ("seed", "1"), ("seed", 1.5), ("seed", True),
])
def test_parameters_are_not_coerced(server, param, value):
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH,
                   json={"messages": [{"role": "user", "content": "hi"}], param: value})
    assert r.status_code == 400, (param, value, r.text)
    assert r.json()["error"]["param"] == param


def test_deeply_nested_json_is_a_400(server, loaded):
    # within the fixture's 20 kB body limit, far beyond the JSON parser's recursion limit
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH, content=b"[" * 19_000)
    assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
    model, tokenizer, prompter = loaded
    from fastapi.testclient import TestClient

    app = create_app(BatchEngine(model, tokenizer), prompter, max_request_bytes=1_000_000)
    with TestClient(app) as local:
        for body in (b"[" * 200_000, b'{"messages": ' + b"[" * 200_000 + b"]" * 200_000 + b"}"):
            r = local.post("/v1/chat/completions", content=body)
            assert r.status_code == 400, r.text[:200]


def test_internal_errors_are_logged_not_returned(loaded, monkeypatch, caplog):
    from fastapi.testclient import TestClient

    model, tokenizer, prompter = loaded

    class BrokenPrompter:
        uses_tools, stop_ids, skip_special_tokens = True, prompter.stop_ids, True

        def prompt_ids(self, *args, **kwargs):
            raise RuntimeError("secret-detail /home/me/internal.py")

    def broken_generation(*args, **kwargs):
        raise RuntimeError("secret-detail from generate")

    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with TestClient(create_app(BatchEngine(model, tokenizer), BrokenPrompter()), raise_server_exceptions=False) as local:
        r = local.post("/v1/chat/completions", json=body)
    assert r.status_code == 500 and "secret" not in r.text
    request_id = r.json()["error"]["message"].split("request id ")[1].split(")")[0]
    logged = [rec for rec in caplog.records if request_id in rec.getMessage()]
    assert logged and logged[0].exc_info and "secret-detail /home/me" in str(logged[0].exc_info[1])

    caplog.clear()
    monkeypatch.setattr(BatchEngine, "_prefill_cache", broken_generation)
    with TestClient(create_app(BatchEngine(model, tokenizer), loaded[2]), raise_server_exceptions=False) as local:
        plain = local.post("/v1/chat/completions", json=body)
        streamed = local.post("/v1/chat/completions", json={**body, "stream": True})
    assert plain.status_code == 500 and "secret" not in plain.text and "chatcmpl-" in plain.text
    assert "secret" not in streamed.text and "internal server error" in streamed.text
    assert any(rec.exc_info and "secret-detail from generate" in str(rec.exc_info[1]) for rec in caplog.records)


def slowed(monkeypatch, seconds=0.05):
    """Make every decode step of every engine take at least `seconds`."""
    real = BatchEngine._decode

    def slow(self):
        time.sleep(seconds)
        return real(self)

    monkeypatch.setattr(BatchEngine, "_decode", slow)


def wait_for(condition, timeout):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_plain_client_that_disconnects_frees_its_row(server, engine, loaded, monkeypatch):
    """A non-streaming request abandoned by its client must not keep its batch row to max_tokens."""
    import socket

    question = "What is two plus three?"
    assert greedy(loaded, question, max_tokens=64).finish_reason == "length"  # it would run the full 64 tokens
    slowed(monkeypatch)  # 50 ms per token: 64 tokens take over 3 s
    host, port = server.removeprefix("http://").split(":")
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": 64, "temperature": 0}).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert wait_for(lambda: engine.running == 1, 5)  # generating now
    started = time.monotonic()
    # freed within a disconnect poll (0.25 s) and a step, not after ~3 s more
    assert wait_for(lambda: engine.running == 0 and engine.waiting == 0, 1.5), time.monotonic() - started


def test_streaming_client_that_disconnects_frees_its_row_at_once(server, engine, loaded, monkeypatch):
    question = "What is two plus three?"
    slowed(monkeypatch)
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 64, "temperature": 0, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, headers=AUTH, timeout=60) as r:
        contents = []
        for line in r.iter_lines():
            if line.startswith("data: ") and '"content"' in line:
                contents.append(line)
                if len(contents) >= 3:
                    break
        assert engine.running == 1
    started = time.monotonic()
    assert wait_for(lambda: engine.running == 0, 1.0), time.monotonic() - started
    # the row is free: the next request is answered at once, and correctly
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy(loaded, "hi", max_tokens=4).text


# --- issue 12: batching -------------------------------------------------------------------------


def test_concurrent_requests_of_different_lengths_get_the_one_at_a_time_answers(server, engine, loaded, monkeypatch):
    """Requests that arrive while others decode join the running batch; each gets its `generate`-alone answer."""
    questions = ["What is two plus three?", "hi", "The quick brown fox jumps over the lazy dog again and again", "say hello",
                 "你好，世界。一二三", "Reverse the word cat"]
    expected = {q: greedy(loaded, q, max_tokens=12) for q in questions}
    slowed(monkeypatch, 0.01)
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)
    widest = []

    def ask(i):
        time.sleep(0.03 * i)  # staggered: rows join at different decode steps
        q = questions[i]
        if i % 2:
            stream = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], temperature=0,
                                                    max_tokens=12, stream=True)
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        else:
            text = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": q}], temperature=0,
                                                  max_tokens=12).choices[0].message.content
        widest.append(engine.running)
        return q, text

    with ThreadPoolExecutor(len(questions)) as pool:
        answers = list(pool.map(ask, range(len(questions)), timeout=120))
    assert all(text == expected[q].text for q, text in answers), [(t, expected[q].text) for q, t in answers]
    assert max(widest) > 1  # they really were decoded together


def test_the_queue_limit_answers_503_in_openai_shape(loaded, monkeypatch):
    model, tokenizer, prompter = loaded
    small = BatchEngine(model, tokenizer, max_batch_size=1, max_queue=1)
    url, srv, thread = serve_in_thread(create_app(small, prompter, max_tokens_limit=64))
    gate = threading.Event()
    real = BatchEngine._decode
    monkeypatch.setattr(BatchEngine, "_decode", lambda self: gate.wait(30) and real(self))
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}
    try:
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
            assert wait_for(lambda: small.running == 1, 10)
            waiting = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
            assert wait_for(lambda: small.waiting == 1, 10)
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=30)
            with pytest.raises(openai.InternalServerError) as info:
                client.chat.completions.create(model="tiny", messages=body["messages"], max_tokens=4)
            assert info.value.status_code == 503
            error = _error(info.value)
            assert error["type"] == "server_error" and error["code"] == "overloaded" and "retry" in error["message"]
            gate.set()
            answers = [f.result(timeout=60) for f in (running, waiting)]
        expected = greedy(loaded, "hi", max_tokens=4).text
        assert [r.status_code for r in answers] == [200, 200]
        assert [r.json()["choices"][0]["message"]["content"] for r in answers] == [expected, expected]
    finally:
        gate.set()
        srv.should_exit = True
        thread.join(timeout=30)


POISON = "thanks thanks thanks"  # a prompt (in the tiny vocabulary) whose forward the test makes fail


def test_a_request_that_errors_does_not_disturb_its_batch(server, engine, loaded, monkeypatch, caplog):
    model, tokenizer, prompter = loaded
    poison = prompter.chat_ids(POISON)
    assert all(prompter.chat_ids(q) != poison for q in QUESTIONS)
    real = BatchEngine._prefill_cache

    def prefill(self, prompt_ids):
        if list(prompt_ids) == poison:
            raise RuntimeError("secret-detail: this prompt's forward failed")
        return real(self, prompt_ids)

    monkeypatch.setattr(BatchEngine, "_prefill_cache", prefill)
    slowed(monkeypatch, 0.02)
    questions = ["What is two plus three?", "hi", "say hello"]
    assert set(questions) <= set(QUESTIONS) | {"say hello"}
    expected = [greedy(loaded, q, max_tokens=12).text for q in questions]

    def ask(question, stream):
        body = {"messages": [{"role": "user", "content": question}], "max_tokens": 12, "temperature": 0, "stream": stream}
        r = httpx.post(server + "/v1/chat/completions", headers=AUTH, json=body, timeout=60)
        if not stream:
            return r.status_code, r.json()
        chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
        return r.status_code, "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))

    with ThreadPoolExecutor(5) as pool:
        good = [pool.submit(ask, q, i == 1) for i, q in enumerate(questions)]
        assert wait_for(lambda: engine.running >= 2, 10)  # the batch is running
        bad_plain, bad_stream = pool.submit(ask, POISON, False), pool.submit(ask, POISON, True)
        status, body = bad_plain.result(timeout=60)
        assert status == 500 and "secret" not in json.dumps(body) and body["error"]["type"] == "server_error"
        status, text = bad_stream.result(timeout=60)
        assert status == 200 and "secret" not in text
        results = [f.result(timeout=60) for f in good]
    assert [r[0] for r in results] == [200, 200, 200]
    assert [results[0][1]["choices"][0]["message"]["content"], results[1][1], results[2][1]["choices"][0]["message"]["content"]] == expected
    assert any("secret-detail" in str(rec.exc_info[1]) for rec in caplog.records if rec.exc_info)


def test_a_seed_makes_a_sampled_answer_reproducible(client, loaded):
    def ask(seed):
        return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=12,
                                              temperature=1.0, top_p=0.95, seed=seed).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        first, second, third, other = pool.map(ask, [11, 11, 11, 12])
    assert first == second == third
    assert other != first
    assert first != greedy(loaded, "hi", max_tokens=12).text  # it did sample


def test_a_seed_outside_64_bits_is_a_400_naming_it(server):
    for seed in (99999999999999999999999, 2**64, -(2**63) - 1):
        r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60,
                       json={"messages": [{"role": "user", "content": "hi"}], "seed": seed, "max_tokens": 2, "temperature": 1})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "seed" and str(seed) in error["message"] and str(2**64 - 1) in error["message"]
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60,
                   json={"messages": [{"role": "user", "content": "hi"}], "seed": 2**64 - 1, "max_tokens": 2, "temperature": 1})
    assert r.status_code == 200, r.text


def test_a_tool_result_answering_no_earlier_call_is_a_400_naming_the_id(server):
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_9"},
        {"role": "user", "content": "and?"},
    ]
    r = httpx.post(server + "/v1/chat/completions", headers=AUTH, timeout=60, json={"messages": messages})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages[2].tool_call_id" and "'call_9'" in error["message"] and "'call_1'" in error["message"]


def test_request_messages_resolve_a_matching_tool_call_id():
    from instructglm.serve.api import _schemas, request_messages

    request = _schemas().model_validate({"messages": [
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
        {"role": "tool", "content": "x", "tool_call_id": "c1"},
    ]})
    assert request_messages(request.messages)[1] == {"role": "tool", "content": "x", "name": "w"}


@pytest.mark.parametrize(
    "flags, message",
    [
        ({"port": 99999}, "--port 99999 is not a TCP port"),
        ({"port": -1}, "--port -1 is not a TCP port"),
        ({"max_tokens_limit": 0}, "--max_tokens_limit must be at least 1, got 0"),
        ({"max_tokens_limit": -1}, "--max_tokens_limit must be at least 1, got -1"),
        ({"max_request_bytes": 0}, "--max_request_bytes must be at least 1, got 0"),
    ],
)
def test_serve_flags_that_cannot_work_are_refused(flags, message):
    from instructglm.errors import BadValue
    from instructglm.serve.api import ServeArguments

    with pytest.raises(BadValue, match=message):
        ServeArguments(**flags)
    ServeArguments(port=0)  # any free port: uvicorn logs the one it bound


def test_web_port_is_checked_too():
    from instructglm.errors import BadValue
    from instructglm.serve.web import WebArguments

    with pytest.raises(BadValue, match="--port 70000 is not a TCP port"):
        WebArguments(port=70000)
