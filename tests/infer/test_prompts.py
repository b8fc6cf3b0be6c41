"""instructglm.infer.prompts: replies read back per family, and streamed so the pieces add up to the parsed content."""

from __future__ import annotations

import pytest

from instructglm.data.messages import Message, ToolCall
from instructglm.errors import BadValue
from instructglm.infer.load import load_model

CALL = ToolCall("get_weather", {"city": "Paris"})
# decoded replies as each family writes them (special tokens kept), and the message each one is
REPLIES = {
    "chatglm3": [
        (" \n 你好，我是 ChatGLM3。 ", Message("assistant", "你好，我是 ChatGLM3。")),
        ("get_weather\n ```python\ntool_call(city='Paris')\n```", Message("assistant", "", (CALL,))),
        (" \n Let me look it up.<|assistant|> get_weather\n ```python\ntool_call(city='Paris')\n```", Message("assistant", "Let me look it up.", (CALL,))),
        ("no metadata line at all", Message("assistant", "no metadata line at all")),
    ],
    "glm4": [
        ("\nHello there.\n", Message("assistant", "Hello there.")),
        ('get_weather\n{"city": "Paris"}', Message("assistant", "", (CALL,))),
        ('\nLet me look it up.<|assistant|>get_weather\n{"city": "Paris"}', Message("assistant", "Let me look it up.", (CALL,))),
    ],
}


@pytest.fixture(scope="module")
def prompters(checkpoints):
    return {name: load_model(str(checkpoints(name)[0]), device="cpu")[2] for name in ("chatglm3", "glm4", "llama")}


@pytest.mark.parametrize("name", list(REPLIES))
def test_replies_are_read_as_the_family_writes_them(name, prompters):
    prompter = prompters[name]
    assert not prompter.skip_special_tokens and prompter.metadata_line  # `<|assistant|>` separates a reply's parts
    for text, expected in REPLIES[name]:
        assert prompter.reply(text) == expected, text


@pytest.mark.parametrize("name", list(REPLIES))
def test_streamed_content_adds_up_to_the_parsed_content_and_holds_back_calls(name, prompters):
    prompter = prompters[name]
    for text, expected in REPLIES[name]:
        for step in (1, 2, 5):
            stream = prompter.stream()
            shown = "".join(stream.feed(text[i : i + step]) for i in range(0, len(text), step))
            rest, message = stream.finish()
            assert message == expected and shown + rest == expected.content, (text, step)
            if expected.tool_calls:  # nothing of the call itself is ever shown as text
                assert "get_weather" not in shown + rest and "tool_call" not in shown + rest


def test_a_text_familys_reply_streams_as_it_comes(prompters):
    prompter = prompters["llama"]
    assert prompter.skip_special_tokens and not prompter.metadata_line
    stream = prompter.stream()
    assert [stream.feed(p) for p in (" a", "\nb ", "")] == [" a", "\nb ", ""]
    assert stream.finish() == ("", Message("assistant", " a\nb "))


def test_tools_on_a_text_template_are_refused_naming_the_family(prompters):
    with pytest.raises(BadValue, match="the causal-lm model family cannot use tools: its prompt is text .plain template"):
        prompters["llama"].prompt_ids([{"role": "user", "content": "hi"}], tools=[{"name": "get_weather"}])
    with pytest.raises(BadValue, match="cannot use tools"):
        prompters["llama"].prompt_ids([{"role": "user", "content": "hi"}, {"role": "tool", "content": "21"}, {"role": "user", "content": "ok?"}])


def test_a_chat_template_without_tools_refuses_them_instead_of_dropping_them(tmp_path):
    from tests.tiny_models import tiny_chat_llama_dir

    model_dir = tiny_chat_llama_dir(tmp_path / "m")
    template = "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}</s>{% endfor %}<|assistant|>\n"
    (model_dir / "chat_template.jinja").write_text(template, encoding="utf-8")  # where transformers 5 saves it
    _, tokenizer, prompter = load_model(str(model_dir), device="cpu")
    assert tokenizer.chat_template == template
    assert prompter.family.name == "chat-template" and prompter.uses_tools
    with pytest.raises(BadValue, match="never reads `tools`"):
        prompter.prompt_ids([{"role": "user", "content": "hi"}], tools=[{"name": "get_weather"}])
    assert prompter.prompt_ids([{"role": "user", "content": "hi"}])  # without tools it prompts as usual
