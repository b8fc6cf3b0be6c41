"""The next transformers: no deprecated API used from instructglm code on the inference paths.

transformers announces most deprecations with `logger.warning_once` (not `warnings.warn`), once
per process, and raises them inside its own frames, so `-W error::FutureWarning` misses them and
`filterwarnings(module="instructglm")` matches nothing. Here every Python warning and every
transformers log warning is recorded with its stack while chat, stream_chat, predict, merge and
serve run (warning_once's cache bypassed), and attributed to the frame that called into the
library: a deprecation counts as ours when that frame is instructglm code. One it raises inside
peft (`is_gradient_checkpointing`, from peft's own PeftModel) is peft's, not ours.
"""

from __future__ import annotations

import logging
import traceback
import warnings
from pathlib import Path

import pytest

import instructglm

PACKAGE = str(Path(instructglm.__file__).parent)
LIBRARIES = ("/transformers/", "/torch/", "/accelerate/", "/logging/", "/warnings.py", "/safetensors/")


def _caller(stack: list[traceback.FrameSummary]) -> str | None:
    """'path:line' of the frame that called into the libraries, if it is instructglm code."""
    for frame in reversed(stack):
        if any(part in frame.filename for part in LIBRARIES) or frame.filename == __file__:
            continue
        if frame.filename.startswith(PACKAGE):
            return f"{Path(frame.filename).relative_to(PACKAGE)}:{frame.lineno}"
        return None
    return None


@pytest.fixture(scope="module")
def deprecations(glm_dir, glm_adapter, tmp_path_factory):
    """{(message, instructglm caller)} of every deprecation the inference paths trigger."""
    from fastapi.testclient import TestClient

    from instructglm.infer.chat import chat, stream_chat
    from instructglm.infer.generate import GenerationArguments
    from instructglm.infer.load import load_model
    from instructglm.infer.merge import merge
    from instructglm.infer.predict import predict_rows
    from instructglm.infer.engine import BatchEngine
    from instructglm.serve.api import create_app

    found: set[tuple[str, str]] = set()

    def note(message: str) -> None:
        if "deprecat" in message.lower():
            caller = _caller(traceback.extract_stack()[:-2])
            if caller:
                found.add((message[:120], caller))

    class Recorder(logging.Handler):
        def emit(self, record):
            note(record.getMessage())

    def showwarning(message, category, *args, **kwargs):
        note(f"{category.__name__}: {message}")

    mp = pytest.MonkeyPatch()
    mp.setattr(logging.Logger, "warning_once", lambda self, *a, **k: self.warning(*a, **k))
    mp.setattr(warnings, "showwarning", showwarning)
    handler = Recorder(logging.WARNING)
    logging.getLogger("transformers").addHandler(handler)
    tmp = tmp_path_factory.mktemp("deprecations")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = showwarning
            model, tokenizer, template = load_model(str(glm_dir), adapter=str(glm_adapter), device="cpu")
            chat(model, tokenizer, "hi", max_new_tokens=3)
            list(stream_chat(model, tokenizer, "hi", do_sample=False, max_new_tokens=3))
            predict_rows(model, tokenizer, [{"context": "hi"}, {"context": "say hello"}], tmp / "p.jsonl",
                         GenerationArguments(max_new_tokens=3, do_sample=False), batch_size=2)
            merge(str(glm_dir), str(glm_adapter), tmp / "merged")
            load_model(str(tmp / "merged"), device="cpu")
            with TestClient(create_app(BatchEngine(model, tokenizer), template)) as client:
                body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
                assert client.post("/v1/chat/completions", json=body).status_code == 200
                assert client.post("/v1/chat/completions", json={**body, "stream": True}).status_code == 200
    finally:
        logging.getLogger("transformers").removeHandler(handler)
        mp.undo()
    return found


def test_no_deprecated_api_from_the_inference_and_serving_code(deprecations):
    ours = {(m, c) for m, c in deprecations if c.startswith(("infer/", "serve/"))}
    assert not ours, sorted(ours)


def test_no_deprecated_api_from_any_instructglm_code(deprecations):
    assert not deprecations, sorted(deprecations)
