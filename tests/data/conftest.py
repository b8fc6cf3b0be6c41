"""Tokenizers of the model families for the data tests (no model weights: the chat formats need only these)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import _need

ASSETS = Path(__file__).parent / "assets"


@pytest.fixture(scope="session")
def chatglm3_tokenizer_dir(shared_dir) -> Path:
    return _need(shared_dir / "tokenizers" / "chatglm3-6b")


@pytest.fixture(scope="session")
def v3_tokenizer(chatglm3_tokenizer_dir):
    from instructglm.models.chatglm3 import ChatGLM3Tokenizer

    return ChatGLM3Tokenizer.from_pretrained(str(chatglm3_tokenizer_dir), chatglm_version=3)


@pytest.fixture(scope="session")
def v2_tokenizer(chatglm3_tokenizer_dir):
    from instructglm.models.chatglm3 import ChatGLM3Tokenizer

    return ChatGLM3Tokenizer.from_pretrained(str(chatglm3_tokenizer_dir), chatglm_version=2)


@pytest.fixture(scope="session")
def glm4_tokenizer():
    from tests.tiny_models import glm4_tokenizer

    return glm4_tokenizer()


@pytest.fixture(scope="session")
def chat_llama_dir(tmp_path_factory) -> Path:
    from tests.tiny_models import tiny_chat_llama_dir

    return tiny_chat_llama_dir(tmp_path_factory.mktemp("chat-llama"), num_hidden_layers=1, hidden_size=32)


@pytest.fixture(scope="session")
def chat_llama_tokenizer(chat_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(chat_llama_dir))


# One tool-using, multi-turn conversation every family test labels token by token.
TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
TOOL_CONVERSATION = [
    {"role": "system", "content": "You are a weather bot."},
    {"role": "user", "content": "How warm is Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
    {"role": "observation", "name": "get_weather", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 °C."},
    {"role": "user", "content": "Thanks!"},
    {"role": "assistant", "content": "You are welcome."},
]
