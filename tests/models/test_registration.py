"""`import instructglm` is light, and the Auto classes find the native classes whatever the import order.

Each case runs in a fresh interpreter: registration depends on which transformers modules were
already loaded when `import instructglm` ran, which one process cannot undo.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=env, capture_output=True, text=True, timeout=180
    )


def test_import_and_help_load_neither_torch_nor_transformers(tmp_path):
    done = run_python(
        """
        import sys
        import instructglm
        from instructglm.cli import main
        assert main(["--help"]) == 0
        heavy = sorted(m for m in ("torch", "transformers", "peft", "datasets") if m in sys.modules)
        print("HEAVY", heavy)
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "HEAVY []" in done.stdout


@pytest.mark.parametrize(
    "imports",
    [
        "import instructglm\nfrom transformers import AutoConfig, AutoTokenizer, AutoModelForCausalLM",
        "from transformers import AutoConfig, AutoTokenizer, AutoModelForCausalLM\nimport instructglm",
        # transformers' own model code imports modeling_auto half-way through its import
        "import transformers.modeling_layers\nimport instructglm\nfrom transformers import AutoConfig, AutoTokenizer, AutoModelForCausalLM",
        "import instructglm\nfrom transformers import LlamaForCausalLM\nfrom transformers import AutoConfig, AutoTokenizer, AutoModelForCausalLM",
        "import instructglm\nimport peft\nfrom transformers import AutoConfig, AutoTokenizer, AutoModelForCausalLM",
    ],
    ids=["instructglm-first", "transformers-first", "modeling-layers-first", "llama-first", "peft-first"],
)
def test_auto_classes_load_the_native_chatglm(imports, tmp_path, chatglm6b_fixtures, chatglm6b_tokenizer_dir):
    done = run_python(
        imports
        + f"""
import sys
tokenizer = AutoTokenizer.from_pretrained({str(chatglm6b_tokenizer_dir)!r})
print("TOKENIZER", type(tokenizer).__module__, "model code loaded:", "instructglm.models.chatglm.model" in sys.modules)
config = AutoConfig.from_pretrained({str(chatglm6b_fixtures / "tiny")!r})
model = AutoModelForCausalLM.from_pretrained({str(chatglm6b_fixtures / "tiny")!r})
print("MODEL", type(config).__module__, type(model).__module__, type(model).__name__)
from_config = AutoModelForCausalLM.from_config(config)
print("FROM_CONFIG", type(from_config).__name__)
""",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "TOKENIZER instructglm.models.chatglm.tokenizer" in done.stdout
    assert "MODEL instructglm.models.chatglm.config instructglm.models.chatglm.model ChatGLMForConditionalGeneration" in done.stdout
    assert "FROM_CONFIG ChatGLMForConditionalGeneration" in done.stdout


def test_loading_a_tokenizer_imports_no_model_code_nor_torch(tmp_path, chatglm6b_tokenizer_dir):
    done = run_python(
        f"""
        import sys
        import instructglm
        from instructglm.models.loading import load_tokenizer
        tokenizer, model_type = load_tokenizer({str(chatglm6b_tokenizer_dir)!r})
        print("LOADED", type(tokenizer).__name__, model_type)
        print("MODEL_CODE", sorted(m for m in ("instructglm.models.chatglm.model", "transformers.modeling_utils", "peft", "torch") if m in sys.modules))
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert "LOADED ChatGLMTokenizer chatglm" in done.stdout
    assert "MODEL_CODE []" in done.stdout


@pytest.mark.parametrize("version", ["chatglm6b", "chatglm3"])
def test_remote_code_never_runs_even_when_trusted(version, tmp_path, shared_dir):
    """THUDM's snippets pass trust_remote_code=True; the checkpoint's own .py files must still never run."""
    import json
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(shared_dir / "fixtures" / version / "tiny", model_dir)
    tokenizer_dir = shared_dir / "tokenizers" / ("chatglm-6b" if version == "chatglm6b" else "chatglm3-6b")
    for name in os.listdir(tokenizer_dir):
        if name != "config.json":
            shutil.copy(tokenizer_dir / name, model_dir / name)
    marker = tmp_path / "ran"
    for code in ("tokenization_chatglm.py", "configuration_chatglm.py", "modeling_chatglm.py"):
        (model_dir / code).write_text(f"open({str(marker)!r}, 'a').write({code!r})\n")
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "configuration_chatglm.ChatGLMConfig",
        "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
        "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    }
    (model_dir / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    done = run_python(
        f"""
        import instructglm
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        for trust in (None, True):
            kwargs = {{}} if trust is None else {{"trust_remote_code": trust}}
            loaded = [AutoTokenizer.from_pretrained({str(model_dir)!r}, **kwargs),
                      AutoConfig.from_pretrained({str(model_dir)!r}, **kwargs),
                      AutoModelForCausalLM.from_pretrained({str(model_dir)!r}, **kwargs)]
            print("MODULES", sorted({{type(x).__module__.split(".")[0] for x in loaded}}))
        """,
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("MODULES ['instructglm']") == 2, done.stdout
    assert not marker.exists(), marker.read_text()
