"""Models load and run where sentencepiece is not installed (the GPU image); only a ChatGLM tokenizer needs it.

`import instructglm` registers the tokenizer classes when transformers' tokenizer module loads, which imports our
tokenizer modules; they import sentencepiece only when a tokenizer is built. The check runs in a fresh interpreter
whose import system cannot find sentencepiece, exactly as on a machine without it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

# Every meta-path finder is wrapped so that none finds sentencepiece: `import sentencepiece` fails and
# `importlib.util.find_spec("sentencepiece")` (transformers' availability check) is None, as without the package.
HIDE_SENTENCEPIECE = """
import sys

class _Hidden:
    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name == "sentencepiece" or name.startswith("sentencepiece."):
            return None
        return self._finder.find_spec(name, path, target)

    def __getattr__(self, name):
        return getattr(self._finder, name)

sys.meta_path[:] = [_Hidden(finder) for finder in sys.meta_path]
import importlib.util
assert importlib.util.find_spec("sentencepiece") is None
"""


def run_without_sentencepiece(code: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    script = HIDE_SENTENCEPIECE + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.tiny_models import tiny_chatglm_dir

    return tiny_chatglm_dir(tmp_path_factory.mktemp("no_spm") / "tiny")


def test_models_load_and_run_and_tokenizers_say_what_is_missing(tiny_dir, tmp_path):
    done = run_without_sentencepiece(
        f"""
        import instructglm
        import torch
        from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained({str(tiny_dir)!r})
        assert type(model).__name__ == "ChatGLMForConditionalGeneration"
        ids = torch.tensor([[5, 6, 7, model.config.gmask_token_id, model.config.bos_token_id]])
        out = model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
        assert out.shape == (1, 8)
        # THUDM's auto_map (kept here) sends AutoModel to the causal LM too
        assert type(AutoModel.from_pretrained({str(tiny_dir)!r})).__name__ == "ChatGLMForConditionalGeneration"
        print("TOKENIZER MODULES", sorted(m for m in sys.modules if m.endswith("tokenizer") and "instructglm" in m))

        from instructglm.errors import MissingDependency
        from instructglm.models.chatglm.tokenizer import ChatGLMTokenizer
        from instructglm.models.chatglm3.tokenizer import ChatGLM3Tokenizer

        vocab = {str(tiny_dir / "ice_text.model")!r}
        for build in (
            lambda: ChatGLMTokenizer(vocab_file=vocab),
            lambda: ChatGLM3Tokenizer(vocab_file=vocab, chatglm_version=3),
            lambda: AutoTokenizer.from_pretrained({str(tiny_dir)!r}),
        ):
            try:
                build()
            except MissingDependency as error:
                print("ERROR", str(error))
            else:
                raise AssertionError("a ChatGLM tokenizer was built without sentencepiece")
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    # the tokenizer modules were imported (by the registration) and did not need sentencepiece
    assert any("instructglm.models.chatglm.tokenizer" in line for line in lines if line.startswith("TOKENIZER MODULES"))
    errors = [line.removeprefix("ERROR ") for line in lines if line.startswith("ERROR ")]
    assert errors == [
        "ChatGLMTokenizer needs the sentencepiece package, which is not installed: run pip install 'sentencepiece>=0.2'",
        "ChatGLM3Tokenizer needs the sentencepiece package, which is not installed: run pip install 'sentencepiece>=0.2'",
        "ChatGLMTokenizer needs the sentencepiece package, which is not installed: run pip install 'sentencepiece>=0.2'",
    ]


def test_the_same_script_fails_on_the_tokenizer_only_with_sentencepiece_hidden(tiny_dir, tmp_path):
    """The blocker itself works: importing sentencepiece fails in that interpreter (so the test above means it)."""
    done = run_without_sentencepiece("import sentencepiece\n", tmp_path)
    assert done.returncode != 0 and "No module named 'sentencepiece'" in done.stderr
