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
    model, tokenizer, template = load_model(str(llama_dir), device="cpu")
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert template.name == "plain"  # a generic causal LM's chat template
    assert not model.training and next(model.parameters()).dtype == torch.float32


def test_peft_adapter_changes_outputs_and_brings_its_template(llama_dir, llama_adapter):
    base, tokenizer, _ = load_model(str(llama_dir), device="cpu")
    tuned, _, template = load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")
    assert type(tuned).__name__.startswith("Peft")
    assert template.name == "alpaca"  # from the run's instructglm_train.json
    assert not torch.allclose(_logits(base, tokenizer), _logits(tuned, tokenizer))


def test_template_flag_overrides_saved_one(llama_dir, llama_adapter):
    _, _, template = load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu", template="belle")
    assert template.render("hi") == "指令: hi\n答案: "


def test_seed_pt_adapter_loads_like_the_peft_dir(llama_dir, llama_adapter, tmp_path):
    from instructglm.train.lora import seed_state_dict

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
    assert template.render("q", history=[("a", "b")]) == "[Round 0]\n问：a\n答：b\n[Round 1]\n问：q\n答："
    assert tokenizer.padding_side == "left"
    assert not torch.allclose(_logits(base, tokenizer), _logits(tuned, tokenizer))


def test_missing_adapter_is_file_not_found(llama_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_model(str(llama_dir), adapter=str(tmp_path / "nope"), device="cpu")


def test_bad_dtype_is_named(llama_dir):
    with pytest.raises(ValueError, match="--dtype 'half'"):
        load_model(str(llama_dir), dtype="half", device="cpu")
