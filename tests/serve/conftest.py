"""Tiny checkpoints shared by the serving tests (built once per session)."""

from __future__ import annotations

import pytest

from tests.infer.helpers import tiny_adapter, tiny_chatglm, tiny_llama


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return tiny_llama(tmp_path_factory.mktemp("llama") / "base")


@pytest.fixture(scope="session")
def llama_adapter(llama_dir, tmp_path_factory):
    return tiny_adapter(llama_dir, tmp_path_factory.mktemp("llama") / "run")


@pytest.fixture(scope="session")
def glm_dir(tmp_path_factory):
    return tiny_chatglm(tmp_path_factory.mktemp("chatglm") / "base")


@pytest.fixture(scope="session")
def glm_adapter(glm_dir, tmp_path_factory):
    return tiny_adapter(glm_dir, tmp_path_factory.mktemp("chatglm") / "run", template="chatglm", targets=("query_key_value",))


@pytest.fixture(scope="session", params=["chatglm", "llama"])
def family(request):
    """(base dir, adapter dir) of each model family: ChatGLM-6B's architecture and a generic causal LM."""
    name = request.param
    return name, request.getfixturevalue(f"{'glm' if name == 'chatglm' else 'llama'}_dir"), request.getfixturevalue(
        f"{'glm' if name == 'chatglm' else 'llama'}_adapter"
    )
