"""Session fixtures: tiny base checkpoints and adapters, for the inference and the serving tests.

Both `tests/infer/conftest.py` and `tests/serve/conftest.py` import these, so the two suites use
the same models (built once per session in each directory). `FAMILIES` is the table of model
families every `family`-parametrized test runs on: adding a family is one entry there.
"""

from __future__ import annotations

import pytest

from tests.infer.helpers import tiny_adapter, tiny_chatglm, tiny_chatglm2, tiny_chatglm3, tiny_glm4, tiny_llama

# name -> (builder of a tiny base checkpoint at a path, the adapter's template, its LoRA targets, its family)
FAMILIES = {
    "chatglm": (tiny_chatglm, "chatglm", ("query_key_value",), "chatglm-6b"),  # ChatGLM-6B's architecture
    "llama": (tiny_llama, "alpaca", ("q_proj", "v_proj"), "causal-lm"),  # a generic transformers causal LM
    "chatglm2": (tiny_chatglm2, "chatglm2", ("query_key_value",), "chatglm2-6b"),  # native, text rounds from 1
    "chatglm3": (tiny_chatglm3, "messages", ("query_key_value",), "chatglm3-6b"),  # native, role tokens
    "glm4": (tiny_glm4, "messages", ("q_proj", "v_proj"), "glm-4"),  # transformers' Glm, its chat template
}


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    """name -> (base dir, adapter dir) of a family in `FAMILIES`, each built once."""
    built: dict[str, tuple] = {}

    def get(name: str) -> tuple:
        if name not in built:
            build, template, targets, family_name = FAMILIES[name]
            root = tmp_path_factory.mktemp(name)
            base = build(root / "base")
            built[name] = (base, tiny_adapter(base, root / "run", template=template, targets=targets, family=family_name))
        return built[name]

    return get


@pytest.fixture(scope="session")
def llama_dir(checkpoints):
    return checkpoints("llama")[0]


@pytest.fixture(scope="session")
def llama_adapter(checkpoints):
    return checkpoints("llama")[1]


@pytest.fixture(scope="session")
def glm_dir(checkpoints):
    return checkpoints("chatglm")[0]


@pytest.fixture(scope="session")
def glm_adapter(checkpoints):
    return checkpoints("chatglm")[1]


@pytest.fixture(scope="session", params=list(FAMILIES))
def family(request, checkpoints):
    """(name, base dir, adapter dir) of each model family in `FAMILIES`."""
    return (request.param, *checkpoints(request.param))
