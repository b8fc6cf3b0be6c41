"""Every model family through the same commands: convert -> tokenize -> train -> chat / predict / serve.

One tiny random model per family (tests/tiny_models.py): ChatGLM-6B, ChatGLM2-6B, ChatGLM3-6B (native),
GLM-4 (`glm`, `glm4`: transformers' own classes) and a Llama with a chat template. The data are ChatGLM3's
fine-tuning layout with tools, tool calls and results, and multi-turn rows, kept whole by
`convert --template messages`; the text families drop the tool rows (counted) and train the rest. The
trained run is then used by `chat` (stdin), `predict` (the converted conversations) and `serve` (the
command's own `main`, its app served on a loopback port, asked with the openai client), each answer
checked against transformers' `generate` on the family's own prompt.

Tool calls through `serve` (ChatGLM3-6B, GLM-4): a random tiny model does not write tool calls, and an
adapter that makes it write one takes minutes of training on a CPU (tried: 40 steps left the loss at 10.8).
So the test checks the mapping at the prompt-ids level — the ids the engine receives for a multi-turn
OpenAI conversation with tools, tool calls and tool results are THUDM's `build_chat_input` ids / the GLM-4
chat template's, built independently — and forces the reply: the engine's token choice
(`BatchEngine._choose`) is replaced by the ids the family writes for a tool call, so prefill, decoding, the
stop at `<|observation|>`, decoding with special tokens, the family's parsing and the OpenAI mapping
(plain and streaming) all run for real on that fixed reply text.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from tests.conftest import _need

pytestmark = pytest.mark.slow

ASSETS = Path(__file__).parent / "data" / "assets"
FAMILIES = {  # family -> whether it can express the tool rows
    "chatglm-6b": False,
    "chatglm2-6b": False,
    "chatglm3-6b": True,
    "glm-4": True,
    "glm-4-0414": True,
    "chat-template": True,
}


@pytest.fixture(scope="module")
def chatglm3_tokenizer_dir(shared_dir) -> Path:
    return _need(shared_dir / "tokenizers" / "chatglm3-6b")


def _model_dir(family: str, path: Path, chatglm3_tokenizer_dir: Path) -> Path:
    from tests import tiny_models

    if family == "chatglm-6b":
        return tiny_models.tiny_chatglm_dir(path)
    if family in ("chatglm2-6b", "chatglm3-6b"):
        return tiny_models.tiny_chatglm3_dir(path, chatglm3_tokenizer_dir, version=int(family[7]))
    # the character-level tokenizers spend a token per character of a tools prompt (GLM-4's is ~450): room for it
    if family in ("glm-4", "glm-4-0414"):
        return tiny_models.tiny_glm4_dir(path, "glm" if family == "glm-4" else "glm4", max_position_embeddings=1024)
    return tiny_models.tiny_chat_llama_dir(path, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def conversations(tmp_path_factory) -> Path:
    """24 rows: 8 copies of the demo's three (a tool-using multi-turn one, a single turn, one with loss: false)."""
    rows = json.loads((ASSETS / "chatglm3_tools.json").read_text(encoding="utf-8")) * 8
    path = tmp_path_factory.mktemp("data") / "chatglm3_tools.json"
    path.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return path


def _run(command: str, *argv) -> int:
    from instructglm.cli import run_command

    return run_command(command, [str(a) for a in argv])


def _mean_loss(model, tokenizer, dataset) -> float:
    """The training loss of the first rows, batched as train batches them."""
    import torch

    from instructglm.train.collator import collator_for

    collate = collator_for(tokenizer, model.config)
    with torch.no_grad():
        return float(model(**collate([dataset[i] for i in range(6)])).loss)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_same_commands_for_every_family(family, conversations, chatglm3_tokenizer_dir, tmp_path):
    import datasets
    import torch

    from instructglm.models.loading import load_causal_lm, load_tokenizer
    from instructglm.models.lora import load_adapter

    model_dir = _model_dir(family, tmp_path / "model", chatglm3_tokenizer_dir)
    jsonl, data, run = tmp_path / "chat.jsonl", tmp_path / "data", tmp_path / "run"
    assert _run("convert", "--data_path", conversations, "--save_path", jsonl, "--template", "messages") == 0
    assert _run("tokenize", "--jsonl_path", jsonl, "--save_path", data, "--max_seq_length", 512,
                "--model_name_or_path", model_dir) == 0
    meta = json.loads((data / "instructglm_data.json").read_text(encoding="utf-8"))
    assert meta["family"] == family and meta["template"] == "messages"
    tools = FAMILIES[family]
    assert meta["counts"]["dropped_unsupported"] == (0 if tools else 8) and meta["counts"]["kept"] == (24 if tools else 16)
    dataset = datasets.load_from_disk(str(data))
    assert ("labels" in dataset.column_names) == (family not in ("chatglm-6b", "chatglm2-6b"))

    assert _run(
        "train", "--model_name_or_path", model_dir, "--dataset_path", data, "--output_dir", run,
        "--per_device_train_batch_size", 4, "--max_steps", 12, "--learning_rate", 3e-2, "--lora_rank", 8,
        "--logging_steps", 4, "--save_steps", 12, "--report_to", "none", "--seed", 7, "--disable_tqdm", "true",
    ) == 0
    record = json.loads((run / "instructglm_train.json").read_text(encoding="utf-8"))
    # a text family records the round template it wrote the conversations with
    template = {"chatglm-6b": "chatglm", "chatglm2-6b": "chatglm2"}.get(family, "messages")
    assert record["family"] == family and record["template"] == template and record["stop_token_ids"]
    assert record["chat_format"] == {"chatglm-6b": "text", "chatglm2-6b": "text", "chatglm3-6b": "chatglm3"}.get(
        family, "chat-template"
    )
    expected_targets = ["query_key_value"] if family.startswith("chatglm") else None
    if expected_targets:
        assert record["lora"]["target_modules"] == expected_targets

    tokenizer, _ = load_tokenizer(str(model_dir))
    base = load_causal_lm(str(model_dir), dtype=torch.float32)
    before = _mean_loss(base, tokenizer, dataset)
    tuned = load_adapter(base, str(run))
    after = _mean_loss(tuned, tokenizer, dataset)
    assert after < before, (before, after)  # the adapter loads back, and it learned the rows

    _check_chat_predict_serve(family, model_dir, run, jsonl, tmp_path)


def _greedy_reply(loaded, messages, tools=None, tokens=6):
    """(prompt ids, the parsed reply) of transformers' `generate`, greedy, on the family's own prompt for `messages`."""
    from tests.infer.helpers import reference_completion

    model, tokenizer, prompter = loaded
    ids = prompter.prompt_ids(messages, tools)
    return ids, prompter.reply(reference_completion(model, tokenizer, ids, tokens, prompter).text)


@contextlib.contextmanager
def _serving(argv):
    """`instructglm serve ARGV` through the command's own `main`, its app served on a free loopback port; yields the URL."""
    import threading

    import uvicorn

    from tests.infer.helpers import serve_in_thread

    apps, ready = [], threading.Event()

    def capture(app, **kwargs):
        apps.append(app)
        ready.set()

    real, uvicorn.run = uvicorn.run, capture
    try:
        assert _run("serve", *argv) == 0 and ready.is_set()
    finally:
        uvicorn.run = real
    url, server, thread = serve_in_thread(apps[0])
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def _check_chat_predict_serve(family, model_dir, run, jsonl, tmp_path):
    import openai

    from instructglm.data.messages import Message
    from instructglm.infer.chat import BOT
    from instructglm.infer.load import load_model

    loaded = load_model(str(model_dir), adapter=str(run), device="cpu")
    model_args = ("--model_name_or_path", model_dir, "--adapter", run, "--device", "cpu")
    # chat: the terminal loop over stdin, prompted in the family's format with the run's template
    _, hi = _greedy_reply(loaded, [Message("user", "hi")])
    out, stdin = io.StringIO(), io.StringIO("hi\n/exit\n")
    with contextlib.redirect_stdout(out), _stdin(stdin):
        assert _run("chat", *model_args, "--do_sample", "false", "--max_new_tokens", 6) == 0
    assert f"{BOT}{hi.content}\n" in out.getvalue()

    # predict: the converted conversations, each prompted without its last answer
    predictions = tmp_path / "predictions.jsonl"
    assert _run("predict", *model_args, "--input", jsonl, "--output", predictions, "--max_new_tokens", 4, "--batch_size", 8) == 0
    lines = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 24
    tool_rows = [line for line in lines if line.get("tools")]
    if FAMILIES[family]:
        assert all(line["prediction"] is not None for line in lines)
    else:  # a text family cannot show tools: those rows are skipped, named
        assert tool_rows and all(line["prediction"] is None and f"the {family} model family cannot use tools" in line["skipped"] for line in tool_rows)
    plain = next(line for line in lines if not line.get("tools"))
    _, expected = _greedy_reply(loaded, plain["messages"][:-1], tokens=4)
    assert plain["prediction"] == expected.content

    # serve: the OpenAI API, greedy answers equal to generate's; tools are refused by the text families
    question = [{"role": "system", "content": "You are a weather bot."}, {"role": "user", "content": "How warm is Paris?"}]
    with _serving(model_args) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        reply = client.chat.completions.create(model="m", messages=question, temperature=0, max_tokens=6)
        ids, expected = _greedy_reply(loaded, question)
        assert reply.choices[0].message.content == expected.content and reply.usage.prompt_tokens == len(ids)
        if not FAMILIES[family]:
            with pytest.raises(openai.BadRequestError) as info:
                client.chat.completions.create(model="m", messages=question, tools=OPENAI_TOOLS, max_tokens=4)
            assert f"the {family} model family cannot use tools" in info.value.response.json()["error"]["message"]
        else:
            reply = client.chat.completions.create(model="m", messages=question, tools=OPENAI_TOOLS, temperature=0, max_tokens=6)
            ids, expected = _greedy_reply(loaded, question, OPENAI_TOOLS)
            assert reply.usage.prompt_tokens == len(ids)
            if not expected.tool_calls:  # (a random model's reply is text, nearly always)
                assert reply.choices[0].message.content == expected.content


@contextlib.contextmanager
def _stdin(stream):
    import sys

    real, sys.stdin = sys.stdin, stream
    try:
        yield
    finally:
        sys.stdin = real


OPENAI_TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather of a city",
                                                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


@pytest.mark.parametrize("data_family, model_family", [("chatglm-6b", "chatglm3-6b"), ("chatglm3-6b", "chatglm-6b")])
def test_a_dataset_of_one_chatglm_version_never_trains_another(data_family, model_family, conversations, chatglm3_tokenizer_dir, tmp_path):
    from instructglm.errors import BadValue

    data_model = _model_dir(data_family, tmp_path / "a", chatglm3_tokenizer_dir)
    model = _model_dir(model_family, tmp_path / "b", chatglm3_tokenizer_dir)
    jsonl, data = tmp_path / "chat.jsonl", tmp_path / "data"
    assert _run("convert", "--data_path", conversations, "--save_path", jsonl, "--template", "messages") == 0
    assert _run("tokenize", "--jsonl_path", jsonl, "--save_path", data, "--model_name_or_path", data_model) == 0
    from instructglm.train.args import FinetuneArguments, TrainingArguments
    from instructglm.train.finetune import finetune

    with pytest.raises(BadValue, match=f"tokenized for the {data_family} family, but the model is {model_family}"):
        finetune(
            FinetuneArguments(dataset_path=str(data), model_name_or_path=str(model)),
            TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, report_to="none"),
        )
    assert not (tmp_path / "run" / "adapter_model.safetensors").exists()


# --- a multi-turn, tool-using conversation through serve: ChatGLM3-6B and GLM-4 ------------------------------------

CALL_ID = "call_weather_1"
CONVERSATION = [  # OpenAI's shape: a tool call with its id, the tool's result naming it, then a new question
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "How warm is Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": CALL_ID, "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": CALL_ID, "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 °C in Paris."},
    {"role": "user", "content": "And in Rome?"},
]


def _expected_prompt(family, tokenizer):
    """The prompt ids of CONVERSATION with OPENAI_TOOLS, built without instructglm's prompt code."""
    if family == "chatglm3-6b":  # THUDM's own builder; its OpenAI demo puts the tools in a first system message
        history = [
            {"role": "system", "content": "Answer the following questions as best as you can. You have access to the following tools:",
             "tools": [tool["function"] for tool in OPENAI_TOOLS]},
            {"role": "system", "content": "You are a weather bot."},
            {"role": "user", "content": "How warm is Paris?"},
            {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Paris')\n```"},
            {"role": "observation", "content": '{"temperature": 21}'},
            {"role": "assistant", "content": "It is 21 °C in Paris."},
        ]
        return tokenizer.build_chat_input("And in Rome?", history=history)["input_ids"][0].tolist()
    messages = [  # GLM-4's template: a call is `<|assistant|>{name}\n{JSON arguments}`, a result an observation
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "How warm is Paris?"},
        {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Paris"}'},
        {"role": "observation", "content": '{"temperature": 21}'},
        {"role": "assistant", "metadata": "", "content": "It is 21 °C in Paris."},
        {"role": "user", "content": "And in Rome?"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=OPENAI_TOOLS, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tool_call_reply(family, tokenizer, with_text: bool) -> list[int]:
    """The ids the family writes for `get_weather(city="Rome")` (after "Checking." when `with_text`), then its stop."""
    observation = tokenizer.convert_tokens_to_ids("<|observation|>")
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    if family == "chatglm3-6b":
        call = tokenizer.build_single_message("assistant", "get_weather", "```python\ntool_call(city='Rome')\n```")[1:]
        text = tokenizer.build_single_message("assistant", "", "Checking.")[1:] + [assistant] if with_text else []
    else:
        call = tokenizer('get_weather\n{"city": "Rome"}', add_special_tokens=False)["input_ids"]
        text = tokenizer("\nChecking.", add_special_tokens=False)["input_ids"] + [assistant] if with_text else []
    return text + call + [observation]


@contextlib.contextmanager
def _scripted(reply_ids, monkeypatch):
    """Every row the engine decodes takes `reply_ids` as its tokens, whatever the model's logits say (the prompts it
    prefilled are recorded)."""
    from instructglm.infer.engine import BatchEngine

    prompts = []
    real_prefill = BatchEngine._prefill

    def prefill(self, handle):
        prompts.append(list(handle.request.prompt_ids))
        return real_prefill(self, handle)

    monkeypatch.setattr(BatchEngine, "_choose", lambda self, rows, logits: [reply_ids[min(len(row.ids), len(reply_ids) - 1)] for row in rows])
    monkeypatch.setattr(BatchEngine, "_prefill", prefill)
    yield prompts
    monkeypatch.undo()


@pytest.mark.parametrize("family", ["chatglm3-6b", "glm-4"])
def test_a_tool_using_conversation_through_serve_returns_a_parsed_tool_call(family, chatglm3_tokenizer_dir, tmp_path, monkeypatch):
    import httpx
    import openai

    from instructglm.models.loading import load_tokenizer

    model_dir = _model_dir(family, tmp_path / "model", chatglm3_tokenizer_dir)
    tokenizer, _ = load_tokenizer(str(model_dir))
    expected_prompt = _expected_prompt(family, tokenizer)
    with _serving(("--model_name_or_path", model_dir, "--device", "cpu")) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        for with_text in (False, True):
            with _scripted(_tool_call_reply(family, tokenizer, with_text), monkeypatch) as prompts:
                reply = client.chat.completions.create(model="m", messages=CONVERSATION, tools=OPENAI_TOOLS, max_tokens=40)
                stream = list(client.chat.completions.create(model="m", messages=CONVERSATION, tools=OPENAI_TOOLS, max_tokens=40, stream=True))
                untooled = client.chat.completions.create(model="m", messages=CONVERSATION[:2], max_tokens=40)
            assert prompts[0] == prompts[1] == expected_prompt  # the mapping onto the family's roles, id for id
            choice = reply.choices[0]
            assert choice.finish_reason == "tool_calls"
            assert choice.message.content == ("Checking." if with_text else None)
            (call,) = choice.message.tool_calls
            assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "get_weather", {"city": "Rome"})
            assert call.id.startswith("call_")
            # streaming: the text as it comes, then one tool_calls delta, then finish_reason tool_calls
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
            deltas = [d for c in stream if c.choices for d in (c.choices[0].delta.tool_calls or [])]
            assert text == ("Checking." if with_text else "")
            assert [(d.index, d.function.name, json.loads(d.function.arguments)) for d in deltas] == [(0, "get_weather", {"city": "Rome"})]
            assert [c.choices[0].finish_reason for c in stream if c.choices][-1] == "tool_calls"
            # without `tools` in the request, a call-shaped reply is the model's text
            assert untooled.choices[0].finish_reason == "stop" and "get_weather" in untooled.choices[0].message.content
        # the returned call goes back as the next turn's history: mapped onto the family's roles again
        follow_up = CONVERSATION + [
            {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
                                                                  "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
            {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 25}'},
        ]
        with _scripted(_tool_call_reply(family, tokenizer, False), monkeypatch) as prompts:
            client.chat.completions.create(model="m", messages=follow_up, tools=OPENAI_TOOLS, max_tokens=40)
        observation = tokenizer.convert_tokens_to_ids("<|observation|>")
        assert prompts[0][: len(expected_prompt) - 1] == expected_prompt[:-1] and prompts[0].count(observation) == 2
        # a tool result that is not the reply to a user turn's question: a 400 names what is wrong, not a 500
        r = httpx.post(url + "/v1/chat/completions", json={"messages": CONVERSATION[:5], "tools": OPENAI_TOOLS}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
