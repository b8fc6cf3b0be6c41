"""instructglm.infer.load: base + adapter (peft dir or seed .pt), template choice, wrong pairs."""

from __future__ import annotations

import json

import pytest
import torch

from instructglm.infer.load import load_model
from tests.infer.helpers import tiny_adapter, tiny_llama


def _logits(model, tokenizer, text="What is two plus three?"):
    batch = tokenizer([text], return_tensors="pt")
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_base_alone_uses_family_template_and_left_padding(llama_dir):
    model, tokenizer, prompter = load_model(str(llama_dir), device="cpu")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert prompter.name == "plain" and prompter.family.name == "causal-lm"  # a generic causal LM without a chat template
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_peft_adapter_changes_outputs_and_brings_its_template(llama_dir, llama_adapter):
    base, tokenizer, _ = load_model(str(llama_dir), device="cpu")
    tuned, _, prompter = load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")
    assert type(tuned).__name__.startswith("Peft")
    assert prompter.name == "alpaca"  # from the run's instructglm_train.json
    assert not torch.allclose(_logits(base, tokenizer), _logits(tuned, tokenizer))


def test_template_flag_overrides_saved_one(llama_dir, llama_adapter):
    _, tokenizer, prompter = load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu", template="belle")
    assert prompter.template.render("hi") == "指令: hi\n答案: "
    assert prompter.chat_ids("hi") == tokenizer("指令: hi\n答案: ")["input_ids"]


def test_seed_pt_adapter_loads_like_the_peft_dir(llama_dir, llama_adapter, tmp_path):
    from instructglm.models.lora import seed_state_dict

    tuned, tokenizer, _ = load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")
    run = tmp_path / "seed_run"
    run.mkdir()
    torch.save(seed_state_dict(tuned), run / "chatglm-lora.pt")
    alpha = json.loads((llama_adapter / "adapter_config.json").read_text())["lora_alpha"]
    (run / "instructglm_train.json").write_text(json.dumps({"template": "belle", "lora": {"alpha": alpha}}))
    from_pt, _, template = load_model(str(llama_dir), adapter=str(run / "chatglm-lora.pt"), device="cpu")
    assert template.name == "belle"  # the run config beside the .pt
    torch.testing.assert_close(_logits(from_pt, tokenizer), _logits(tuned, tokenizer))


def test_wrong_base_adapter_pair_names_the_tensors(llama_dir, tmp_path):
    other = tiny_llama(tmp_path / "other", seed=3)
    # Same architecture family, different width: every LoRA tensor has the wrong shape.
    config = json.loads((other / "config.json").read_text())
    config.update(hidden_size=32, intermediate_size=64)
    (other / "config.json").write_text(json.dumps(config))
    (other / "model.safetensors").unlink()
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(other)).save_pretrained(other)
    wrong = tiny_adapter(other, tmp_path / "wrong_run")
    with pytest.raises(ValueError, match=r"q_proj"):
        load_model(str(llama_dir), adapter=str(wrong), device="cpu")


def test_llama_adapter_on_chatglm_base_names_the_tensors(glm_dir, llama_adapter):
    with pytest.raises(ValueError, match=r"q_proj|query_key_value"):
        load_model(str(glm_dir), adapter=str(llama_adapter), device="cpu")


def test_chatglm_with_adapter(glm_dir, glm_adapter):
    base, tokenizer, base_template = load_model(str(glm_dir), device="cpu")
    tuned, _, template = load_model(str(glm_dir), adapter=str(glm_adapter), device="cpu")
    assert base_template.name == template.name == "chatglm"
    assert template.chat_ids("q", [("a", "b")]) == tokenizer("[Round 0]\n问：a\n答：b\n[Round 1]\n问：q\n答：")["input_ids"]
    assert tokenizer.padding_side == "left"
    assert not torch.allclose(_logits(base, tokenizer), _logits(tuned, tokenizer))


def test_missing_adapter_is_file_not_found(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(str(llama_dir), adapter=str(tmp_path / "nope"), device="cpu")


def test_bad_dtype_is_named(llama_dir):
    with pytest.raises(ValueError, match="--dtype 'half'"):
        load_model(str(llama_dir), dtype="half", device="cpu")


# --- issue 8, item 12: a training template that is not known is never used silently -------------


def test_unknown_training_template_warns_in_one_line(llama_dir, llama_adapter, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(llama_adapter, run)
    # as train records it (template null, source unknown), and the bare "unknown" form
    for record in ({"template": None, "template_source": "unknown"}, {"template": "unknown"}):
        (run / "instructglm_train.json").write_text(json.dumps(record))
        _, _, template = load_model(str(llama_dir), adapter=str(run), device="cpu")
        assert template.name == "plain"  # the family's chat template
        warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
        assert len(warning) == 1 and "template is unknown" in warning[0] and "`plain`" in warning[0] and "--template" in warning[0]
    # the same for an adapter without any run config
    (run / "instructglm_train.json").unlink()
    load_model(str(llama_dir), adapter=str(run), device="cpu")
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "no instructglm_train.json" in warning[0] and "--template" in warning[0]
    # --template says which: no warning
    _, _, template = load_model(str(llama_dir), adapter=str(run), device="cpu", template="alpaca")
    assert template.name == "alpaca" and "warning" not in capsys.readouterr().err


# --- issue 8, item 15: what a user cannot act on ends as one line naming the path ---------------


def _cli_error(*args, escapes_allowed: bool = False) -> str:
    """Run `instructglm ...` in this process through the CLI's own code path; return its one-line error."""
    import contextlib
    import io

    from instructglm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    text = err.getvalue()
    assert code == 2, (code, text[-3000:])
    assert "Traceback" not in text, text[-3000:]
    # stderr also carries progress bars; the error is one line, the last one
    lines = [line for line in text.splitlines() if line.startswith("instructglm ") and ": error: " in line]
    assert len(lines) == 1 and text.rstrip("\n").endswith(lines[0]), text[-3000:]
    assert escapes_allowed or "\x1b" not in lines[0]  # no terminal escapes (from torch's message)
    return lines[0]


def _predict_args(base, tmp_path, *more):
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"context": "hi"}\n')
    return ("predict", "--model_name_or_path", str(base), "--device", "cpu", "--input", str(inp), "--output", str(tmp_path / "out.jsonl"), *more)


class _Marker:
    """Pickles to a call that creates `path`: a checkpoint that runs code when loaded unsafely."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_broken_base_checkpoints_end_in_one_line_naming_the_path(llama_dir, glm_dir, tmp_path):
    import shutil

    truncated = tmp_path / "truncated"
    shutil.copytree(llama_dir, truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    message = _cli_error(*_predict_args(truncated, tmp_path))
    assert str(truncated) in message and "truncated or corrupt" in message

    pickled = tmp_path / "pickled"
    shutil.copytree(llama_dir, pickled)
    (pickled / "model.safetensors").unlink()
    marker = tmp_path / "ran"
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "evil": _Marker(marker)}, pickled / "pytorch_model.bin")
    # models/loading.py quotes torch's first line, bold escapes included (reported to its owner)
    message = _cli_error("chat", "--model_name_or_path", str(pickled), "--device", "cpu", escapes_allowed=True)
    assert str(pickled) in message and "weights_only" in message and not marker.exists()

    no_vocab = tmp_path / "no_vocab"
    shutil.copytree(glm_dir, no_vocab)
    (no_vocab / "ice_text.model").unlink()
    message = _cli_error(*_predict_args(no_vocab, tmp_path))
    assert str(no_vocab) in message and "ice_text.model" in message


def test_broken_adapters_end_in_one_line_naming_the_file(llama_dir, llama_adapter, tmp_path):
    import shutil

    for content in (b"", b"{not json"):
        run = tmp_path / f"run{len(content)}"
        shutil.copytree(llama_adapter, run)
        (run / "adapter_config.json").write_bytes(content)
        message = _cli_error(*_predict_args(llama_dir, tmp_path, "--adapter", str(run)))
        assert str(run / "adapter_config.json") in message and ("is empty" if not content else "not valid JSON") in message

    marker = tmp_path / "ran"
    evil = tmp_path / "evil_run" / "chatglm-lora.pt"
    evil.parent.mkdir()
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2), "evil": _Marker(marker)}, evil)
    message = _cli_error(*_predict_args(llama_dir, tmp_path, "--adapter", str(evil)))
    assert str(evil) in message and "never loaded" in message
    assert not marker.exists()  # nothing in the pickle ran

    message = _cli_error(*_predict_args(llama_dir, tmp_path, "--adapter", str(tmp_path / "absent")))
    assert str(tmp_path / "absent") in message


def test_bad_dtype_is_a_user_error(llama_dir):
    from instructglm.errors import BadValue

    with pytest.raises(BadValue, match="--dtype"):
        load_model(str(llama_dir), dtype="half", device="cpu")


# --- families: each checkpoint is prompted in its own format, never another's -------------------


def test_each_family_gets_its_own_prompt_format(checkpoints):
    from instructglm.data.messages import Message

    conversation = [Message("user", "hi"), Message("assistant", "ok"), Message("user", "say hello")]
    expected = {  # checkpoint -> (family, template of its base alone)
        "chatglm": ("chatglm-6b", "chatglm"), "chatglm2": ("chatglm2-6b", "chatglm2"), "chatglm3": ("chatglm3-6b", "messages"),
        "glm4": ("glm-4", "messages"), "llama": ("causal-lm", "plain"),
    }
    for name, (family, template) in expected.items():
        base, _ = checkpoints(name)
        _, tokenizer, prompter = load_model(str(base), device="cpu")
        assert (prompter.family.name, prompter.name) == (family, template), name
        ids = prompter.prompt_ids(conversation)
        if name == "chatglm3":  # THUDM's build_chat_input
            assert ids == tokenizer.build_chat_input("say hello", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}])["input_ids"][0].tolist()
        elif name == "glm4":  # the tokenizer's chat template
            rendered = tokenizer.apply_chat_template([m.to_dict() for m in conversation], add_generation_prompt=True, tokenize=False)
            assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
        else:  # text rounds through the template, with the tokenizer's special tokens
            assert ids == tokenizer(prompter.template.render("say hello", "", [("hi", "ok")]))["input_ids"]
        assert prompter.stop_ids == tuple(prompter.family.stop_token_ids(tokenizer, load_model(str(base), device="cpu")[0].generation_config))


@pytest.mark.parametrize("base_name, recorded", [("chatglm", "chatglm3-6b"), ("chatglm3", "chatglm-6b")])
def test_a_run_recorded_for_another_chatglm_version_is_refused(base_name, recorded, checkpoints, tmp_path):
    """A v1 checkpoint is never prompted as v3, nor the reverse, whatever a run record says."""
    import shutil

    from instructglm.errors import BadValue

    base, adapter = checkpoints(base_name)
    run = tmp_path / "run"
    shutil.copytree(adapter, run)
    (run / "instructglm_train.json").write_text(json.dumps({"template": "messages", "family": recorded}))
    with pytest.raises(BadValue, match=f"trained for the {recorded} model family, but .* is a {'chatglm-6b' if base_name == 'chatglm' else 'chatglm3-6b'} model"):
        load_model(str(base), adapter=str(run), device="cpu")
    # --template messages on ChatGLM-6B is its own rounds (a text family), never ChatGLM3's role tokens
    if base_name == "chatglm":
        _, tokenizer, prompter = load_model(str(base), device="cpu", template="messages")
        assert prompter.name == "chatglm" and prompter.prompt_ids([{"role": "user", "content": "hi"}]) == tokenizer("hi")["input_ids"]


def test_device_cuda_without_a_gpu_is_one_line_naming_the_flag(llama_dir):
    from instructglm.errors import BadValue

    if not torch.cuda.is_available():
        with pytest.raises(BadValue, match=r"--device cuda: this machine has no CUDA GPU"):
            load_model(str(llama_dir), device="cuda")
        message = _cli_error("chat", "--model_name_or_path", str(llama_dir), "--device", "cuda:1")
        assert "--device cuda:1" in message and "--device cpu" in message
    with pytest.raises(BadValue, match=r"--device 'gpu' is not a device"):
        load_model(str(llama_dir), device="gpu")


def test_a_tokenizer_larger_than_the_embedding_is_refused_at_load(tmp_path):
    from instructglm.errors import BadValue
    from tests.tiny_models import tiny_llama_dir

    small = tiny_llama_dir(tmp_path / "small", vocab_size=40)  # the word tokenizer has more than 40 tokens
    with pytest.raises(BadValue, match=r"the tokenizer has \d+ tokens but the model's embedding has only 40 rows"):
        load_model(str(small), device="cpu")


def test_a_lone_pt_adapter_takes_lora_alpha_and_warns_about_the_assumed_one(llama_dir, llama_adapter, tmp_path, capsys):
    """A `.pt` without its run's instructglm_train.json stores no alpha: 32 is assumed (with a warning that
    names --lora_alpha), and --lora_alpha gives the trained one back (the adapter's outputs exactly)."""
    from instructglm.models.lora import seed_state_dict

    tuned, tokenizer, _ = load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")
    alpha = json.loads((llama_adapter / "adapter_config.json").read_text())["lora_alpha"]
    assert alpha != 32
    lone = tmp_path / "copied" / "chatglm-lora.pt"
    lone.parent.mkdir()
    torch.save(seed_state_dict(tuned), lone)
    capsys.readouterr()
    assumed, _, _ = load_model(str(llama_dir), adapter=str(lone), device="cpu")
    warning = capsys.readouterr().err
    assert "alpha assumed 32 (the 2023 scripts' value); pass --lora_alpha if it was trained with another" in warning
    assert not torch.allclose(_logits(assumed, tokenizer), _logits(tuned, tokenizer))
    given, _, _ = load_model(str(llama_dir), adapter=str(lone), device="cpu", lora_alpha=alpha)
    assert "alpha assumed" not in capsys.readouterr().err
    torch.testing.assert_close(_logits(given, tokenizer), _logits(tuned, tokenizer))
    # a peft dir records its own alpha: the same value is accepted, another refused
    load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu", lora_alpha=alpha)
    with pytest.raises(ValueError, match=f"lora_alpha={alpha}, not 64"):
        load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu", lora_alpha=64)


@pytest.mark.parametrize("command", ["predict", "chat", "web", "serve", "merge", "eval"])
def test_every_inference_command_takes_lora_alpha(command):
    import dataclasses
    import importlib

    from instructglm.cli import COMMANDS

    module = importlib.import_module(COMMANDS[command][0])
    assert any(f.name == "lora_alpha" for args in module.ARGUMENTS for f in dataclasses.fields(args))
