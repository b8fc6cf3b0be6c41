"""The static-cache decode step of both ChatGLM families traces as one graph (no host sync, no graph break).

The batching engine compiles its decode step (`torch.compile`, CUDA graphs on a GPU); a `bool(tensor)` in the
model's mask code would break the graph there. Here the step is compiled with `fullgraph=True` on dynamo's eager
backend (tracing only, so it runs on the CPU in seconds): any graph break raises, and the engine would fall back
to the dynamic cache. The compiled answers equal the dynamic cache's.
"""

from __future__ import annotations

import pytest
import torch

from instructglm.infer.engine import BatchEngine, GenerationRequest, generate_requests
from tests.models.chatglm_helpers import random_chatglm, random_prompt
from tests.models.test_chatglm3_model import random_model as random_chatglm3


def _models():
    chatglm = random_chatglm(21, "sdpa")
    chatglm.config.max_sequence_length = 64  # the static slots' length
    chatglm3 = random_chatglm3(21, "sdpa", seq_length=64)
    return {"chatglm": chatglm, "chatglm3": chatglm3}


@pytest.mark.parametrize("family", ["chatglm", "chatglm3"])
def test_static_decode_step_compiles_as_one_graph_and_answers_like_the_dynamic_cache(family):
    model = _models()[family]
    generator = torch.Generator().manual_seed(21)
    if family == "chatglm":
        prompts = [random_prompt(generator, n) for n in (7, 12)]
    else:
        prompts = [torch.randint(5, 120, (n,), generator=generator).tolist() for n in (7, 12)]
    requests = [GenerationRequest(list(prompt), 5) for prompt in prompts]  # two rows: a padded batch

    dynamic = BatchEngine(model, None, max_batch_size=2, stop_ids=[], decode="dynamic")
    expected = [handle.token_ids for handle in generate_requests(dynamic, requests)]
    torch._dynamo.reset()
    compiled = BatchEngine(
        model, None, max_batch_size=2, stop_ids=[], decode="compiled",
        compile_options={"backend": "eager", "fullgraph": True},
    )
    answers = [handle.token_ids for handle in generate_requests(compiled, requests)]
    assert compiled.mode == "compiled", "the compiled step fell back to the dynamic cache (a graph break?)"
    assert answers == expected
