"""`instructglm.models.loading`: the one base-model and tokenizer loader names what a user must fix."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from instructglm.errors import BadValue, MissingFile, UserError
from instructglm.models.loading import load_causal_lm, load_tokenizer


@pytest.fixture()
def tiny_copy(tmp_path, chatglm6b_fixtures) -> Path:
    """A writable copy of the THUDM tiny checkpoint (safetensors) plus the real tokenizer files."""
    target = tmp_path / "model"
    shutil.copytree(chatglm6b_fixtures / "tiny_safetensors", target)
    return target


def test_a_good_checkpoint_loads(tiny_copy):
    model = load_causal_lm(str(tiny_copy))
    assert type(model).__name__ == "ChatGLMForConditionalGeneration"


def test_missing_path_is_named_without_asking_the_hub(tmp_path):
    with pytest.raises(MissingFile, match=str(tmp_path / "nowhere")):
        load_causal_lm(str(tmp_path / "nowhere"))
    with pytest.raises(MissingFile, match="does not exist"):
        load_tokenizer(str(tmp_path / "nowhere"))


def test_a_directory_without_config_names_what_it_holds(tmp_path):
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(MissingFile, match="no config.json .*adapter_config.json.*--adapter"):
        load_causal_lm(str(tmp_path))


def test_a_directory_without_weights(tiny_copy):
    (tiny_copy / "model.safetensors").unlink()
    with pytest.raises(MissingFile, match="holds no weights"):
        load_causal_lm(str(tiny_copy))


def test_truncated_safetensors(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadValue, match="truncated or corrupt"):
        load_causal_lm(str(tiny_copy))


def test_truncated_pickle_checkpoint(tmp_path, chatglm6b_fixtures):
    target = tmp_path / "model"
    shutil.copytree(chatglm6b_fixtures / "tiny", target)
    for extra in ("goldens.safetensors", "goldens.json"):
        (target / extra).unlink(missing_ok=True)
    weights = target / "pytorch_model.bin"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadValue, match="truncated or corrupt"):
        load_causal_lm(str(target))


def test_a_malicious_pickle_is_refused_and_never_runs(tiny_copy, tmp_path):
    import torch

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tiny_copy / "model.safetensors").unlink()
    torch.save({"transformer.word_embeddings.weight": Payload()}, tiny_copy / "pytorch_model.bin")
    with pytest.raises(BadValue, match="pickled objects other than tensors"):
        load_causal_lm(str(tiny_copy))
    assert not marker.exists()


def test_tokenizer_dir_missing_its_vocabulary(tmp_path, chatglm6b_tokenizer_dir):
    target = tmp_path / "tok"
    shutil.copytree(chatglm6b_tokenizer_dir, target)
    (target / "ice_text.model").unlink()
    with pytest.raises(MissingFile, match="ice_text.model or tokenizer.model is missing"):
        load_tokenizer(str(target))


def test_unreadable_tokenizer_config(tmp_path, chatglm6b_tokenizer_dir):
    target = tmp_path / "tok"
    shutil.copytree(chatglm6b_tokenizer_dir, target)
    (target / "tokenizer_config.json").write_text("")
    with pytest.raises(UserError, match="tokenizer_config.json"):
        load_tokenizer(str(target))


def test_a_checkpoints_own_code_never_runs_even_when_stdin_says_yes(tmp_path):
    """transformers asks "Do you wish to run the custom code? [y/N]" on stdin for an `auto_map` model it cannot
    load; the loader passes trust_remote_code=False, so a "y" there runs nothing and the error is one line."""
    import json
    import subprocess
    import sys

    from tests.tiny_models import tiny_llama_dir

    model = tiny_llama_dir(tmp_path / "remote", tokenizer="char")
    marker = tmp_path / "PWNED"
    (model / "modeling_evil.py").write_text(f"import pathlib; pathlib.Path({str(marker)!r}).touch()\n")
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "evilmodel"
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilLM"}
    (model / "config.json").write_text(json.dumps(config))
    script = (
        "import sys\n"
        "from instructglm.errors import UserError\n"
        "from instructglm.models.loading import load_causal_lm, load_tokenizer\n"
        "for load in (load_tokenizer, load_causal_lm):\n"
        "    try:\n"
        "        load(sys.argv[1])\n"
        "    except UserError as error:\n"
        "        print('refused:', error)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(model)], input="y\n" * 10, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert not marker.exists(), done.stdout + done.stderr
    assert done.returncode == 0, done.stderr
    refusals = [line for line in done.stdout.splitlines() if line.startswith("refused:")]
    assert len(refusals) == 1 and "needs its own Python code (auto_map)" in refusals[0], done.stdout  # the model
    with pytest.raises(BadValue, match="trust_remote_code=True is refused"):
        load_causal_lm(str(model), trust_remote_code=True)
