"""Shared test fixtures.

`shared_dir` points at `../shared` (the tokenizer files, THUDM goldens and sample datasets beside
the repo). Where it is absent, tests that need it skip with the reason; with
`INSTRUCTGLM_REQUIRE_SHARED=1` (set by `.ci/run`) they fail instead, so CI never passes by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("INSTRUCTGLM_SHARED", REPO.parent / "shared"))


def _need(path: Path) -> Path:
    if path.exists():
        return path
    reason = f"{path} is missing: these tests need the shared goldens beside the repo (set INSTRUCTGLM_SHARED to their folder)"
    if os.environ.get("INSTRUCTGLM_REQUIRE_SHARED") == "1":
        pytest.fail(reason + "; INSTRUCTGLM_REQUIRE_SHARED=1 forbids skipping", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def repo_dir() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    return _need(SHARED)


@pytest.fixture(scope="session")
def chatglm6b_tokenizer_dir(shared_dir) -> Path:
    return _need(shared_dir / "tokenizers" / "chatglm-6b")


@pytest.fixture(scope="session")
def chatglm6b_fixtures(shared_dir) -> Path:
    return _need(shared_dir / "fixtures" / "chatglm6b")


@pytest.fixture(scope="session")
def shared_data(shared_dir) -> Path:
    return _need(shared_dir / "data")


@pytest.fixture(scope="session")
def chatglm6b_tokenizer(chatglm6b_tokenizer_dir):
    from transformers import AutoTokenizer

    import instructglm  # noqa: F401  (registers ChatGLM)

    return AutoTokenizer.from_pretrained(str(chatglm6b_tokenizer_dir))


@pytest.fixture(autouse=True)
def _torch_defaults():
    """Tests may change torch's global defaults; put them back so no test leaks into another."""
    import torch

    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
