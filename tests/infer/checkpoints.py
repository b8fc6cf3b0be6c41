"""Session fixtures: tiny base checkpoints and adapters, for the inference and the serving tests.

Both `tests/infer/conftest.py` and `tests/serve/conftest.py` import these, so the two suites use
the same models (built once per session in each directory).
"""

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
    """(name, base dir, adapter dir) of each model family: ChatGLM-6B's architecture and a generic causal LM."""
    name = request.param
    prefix = "glm" if name == "chatglm" else "llama"
    return name, request.getfixturevalue(f"{prefix}_dir"), request.getfixturevalue(f"{prefix}_adapter")
