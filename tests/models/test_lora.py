"""`instructglm.models.lora`: peft set-up and adapter loading; both layouts round-trip, every mismatch is a named error."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from instructglm.errors import BadValue, MissingFile
from instructglm.models.lora import attach_lora, load_adapter, lora_config, seed_state_dict
from tests.train.conftest import reverse_jsonl, tiny_chatglm_dir, tiny_llama_dir  # noqa: F401  (the training tests' tiny models)


def base(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)


def trained_adapter(model_dir, rank=8, target=None):
    """A LoRA model whose B matrices are non-zero, as after training."""
    model = attach_lora(base(model_dir), rank=rank, target=target)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    return model


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


def test_family_default_targets():
    assert lora_config("chatglm").target_modules == {"query_key_value"}
    assert lora_config("llama").target_modules == {"q_proj", "v_proj"}
    assert lora_config("llama", target=["o_proj"]).target_modules == {"o_proj"}
    config = lora_config("chatglm", rank=4, alpha=16, dropout=0.0)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 16, 0.0)


def test_chatglm_gets_query_key_value(tiny_chatglm_dir):
    model = attach_lora(base(tiny_chatglm_dir))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(".query_key_value.lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)


def half_precision_base(model_dir, tmp_path, precision):
    """The base as `instructglm train --bf16/--fp16` loads it: `from_pretrained` with finetune's own kwargs."""
    from transformers import AutoModelForCausalLM

    from instructglm.train.args import FinetuneArguments, TrainingArguments
    from instructglm.train.finetune import _load_kwargs

    args = FinetuneArguments(dataset_path=str(tmp_path / "unused"), model_name_or_path=str(model_dir))
    training_args = TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, report_to="none", bf16=precision == "bf16")
    # Without CUDA, TrainingArguments turns --fp16 into an fp32 run; on a GPU the flag survives, as set here.
    training_args.fp16 = precision == "fp16"
    return AutoModelForCausalLM.from_pretrained(str(model_dir), **_load_kwargs(args, training_args))


def assert_fp32_lora_on_half_base(model, dtype):
    """Trainable = exactly the LoRA tensors, all fp32; every frozen (base) weight stays `dtype`;
    a forward + backward runs on the CPU and sends fp32 gradients to the LoRA tensors only."""
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {n: p.dtype for n, p in trainable.items()} == {n: torch.float32 for n in trainable}
    assert frozen and {n: p.dtype for n, p in frozen.items()} == {n: dtype for n in frozen}
    assert model.get_base_model().transformer.layers[0].attention.query_key_value.base_layer.weight.dtype == dtype

    model.train()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
    ids = torch.cat([ids, torch.tensor([[model.config.gmask_token_id, model.config.bos_token_id, 20, 21]])], dim=1)
    out = model(input_ids=ids, labels=ids)
    assert out.logits.dtype == dtype  # the base computes in half precision
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is None for p in frozen.values())
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in trainable.values())
    # lora_B starts at zero, so it is the one that gets a gradient at the first step
    assert any(p.grad.abs().sum() > 0 for n, p in trainable.items() if "lora_B" in n)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_lora_is_fp32_under_a_half_precision_chatglm(tiny_chatglm_dir, tmp_path, precision, dtype):
    """`--bf16` / `--fp16` load the base in half precision; the adapter finetune attaches (fresh, or
    continued from a peft dir or a seed .pt) is fp32, so its updates are not rounded away."""
    fresh = attach_lora(half_precision_base(tiny_chatglm_dir, tmp_path, precision))
    assert_fp32_lora_on_half_base(fresh, dtype)

    trained = trained_adapter(tiny_chatglm_dir)
    trained.save_pretrained(str(tmp_path / "adapter"))
    torch.save(seed_state_dict(trained), tmp_path / "chatglm-lora.pt")
    for path in (tmp_path / "adapter", tmp_path / "chatglm-lora.pt"):
        resumed = load_adapter(half_precision_base(tiny_chatglm_dir, tmp_path, precision), str(path), is_trainable=True)
        assert_fp32_lora_on_half_base(resumed, dtype)
        for key, value in lora_tensors(trained).items():
            torch.testing.assert_close(lora_tensors(resumed)[key], value, rtol=0, atol=0)


def test_unknown_target_is_named(tiny_llama_dir):
    with pytest.raises(BadValue, match="no_such_proj.*--lora_target"):
        attach_lora(base(tiny_llama_dir), target=["no_such_proj"])


@pytest.mark.parametrize("old_peft_names", [False, True])
def test_seed_pt_round_trip(tiny_llama_dir, tmp_path, old_peft_names):
    trained = trained_adapter(tiny_llama_dir, rank=4)
    state = seed_state_dict(trained)
    assert state and all(".lora_" in k and ".default." in k for k in state)
    if old_peft_names:  # peft 0.2 (the seed's era) named them without the adapter segment
        state = {k.replace(".default", ""): v for k, v in state.items()}
    torch.save(state, tmp_path / "chatglm-lora.pt")

    loaded = load_adapter(base(tiny_llama_dir), str(tmp_path / "chatglm-lora.pt"))
    config = loaded.peft_config["default"]
    assert config.r == 4 and config.target_modules == {"q_proj", "v_proj"} and config.lora_alpha == 32
    assert not any(p.requires_grad for p in loaded.parameters())
    expected, got = lora_tensors(trained), lora_tensors(loaded)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0)
    # same function as the trained model
    ids = torch.tensor([[2, 10, 11, 12, 13]])
    trained.eval()
    torch.testing.assert_close(loaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_pt_alpha_from_flag_or_run_config(tiny_llama_dir, tmp_path):
    torch.save(seed_state_dict(trained_adapter(tiny_llama_dir)), tmp_path / "chatglm-lora.pt")
    assert load_adapter(base(tiny_llama_dir), str(tmp_path / "chatglm-lora.pt"), lora_alpha=8).peft_config["default"].lora_alpha == 8
    (tmp_path / "instructglm_train.json").write_text(json.dumps({"lora": {"alpha": 64}}))
    assert load_adapter(base(tiny_llama_dir), str(tmp_path / "chatglm-lora.pt")).peft_config["default"].lora_alpha == 64


def test_peft_dir_round_trip_trainable(tiny_llama_dir, tmp_path):
    trained = trained_adapter(tiny_llama_dir)
    trained.save_pretrained(str(tmp_path / "adapter"))
    loaded = load_adapter(base(tiny_llama_dir), str(tmp_path / "adapter"), is_trainable=True)
    trainable = {n for n, p in loaded.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    for key, value in lora_tensors(trained).items():
        torch.testing.assert_close(lora_tensors(loaded)[key], value, rtol=0, atol=0)


def test_rank_and_target_mismatch_named(tiny_llama_dir, tmp_path):
    torch.save(seed_state_dict(trained_adapter(tiny_llama_dir, rank=8)), tmp_path / "a.pt")
    with pytest.raises(BadValue, match=r"rank 8.*--lora_rank 4 \(pass --lora_rank 8\)"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "a.pt"), lora_rank=4)
    with pytest.raises(BadValue, match=r"targets \['q_proj', 'v_proj'\].*--lora_target \['o_proj'\]"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "a.pt"), lora_target=["o_proj"])


def test_missing_and_unexpected_tensors_named(tiny_llama_dir, tmp_path):
    state = seed_state_dict(trained_adapter(tiny_llama_dir))
    dropped = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.default.weight"
    del state[dropped]
    state["base_model.model.model.layers.1.self_attn.q_proj.lora_C.default.weight"] = torch.zeros(2, 2)
    torch.save(state, tmp_path / "a.pt")
    with pytest.raises(BadValue) as error:
        load_adapter(base(tiny_llama_dir), str(tmp_path / "a.pt"))
    message = str(error.value)
    assert "missing: base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight" in message
    assert "unexpected: base_model.model.model.layers.1.self_attn.q_proj.lora_C.weight" in message


def test_wrong_base_model_named(tiny_llama_dir, tiny_chatglm_dir, tmp_path):
    """An adapter for one model never loads into another: all its tensors are named."""
    torch.save(seed_state_dict(trained_adapter(tiny_chatglm_dir)), tmp_path / "chatglm-lora.pt")
    with pytest.raises(BadValue, match="query_key_value"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "chatglm-lora.pt"))


def test_mis_shaped_tensor_in_peft_dir_named(tiny_llama_dir, tmp_path):
    trained_adapter(tiny_llama_dir).save_pretrained(str(tmp_path / "adapter"))
    weights = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    weights[key] = torch.zeros(8, 5)
    save_file(weights, str(tmp_path / "adapter" / "adapter_model.safetensors"))
    with pytest.raises(BadValue, match=rf"shape: {key}: file \(8, 5\) vs model \(8, 32\)"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "adapter"))


def test_missing_path_and_not_a_state_dict(tiny_llama_dir, tmp_path):
    with pytest.raises(MissingFile, match="does not exist"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "nope.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFile, match="no adapter_config.json"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "empty"))
    torch.save({"step": 3}, tmp_path / "x.pt")
    with pytest.raises(BadValue, match="not a state dict"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "x.pt"))


# ---- adapters on the embeddings and the output head (the demo's targets) ----

EMBEDDING_TARGETS = "query_key_value,dense,word_embeddings,lm_head"
PROMPTS = ["reverse: abc", "reverse: hello"]


@pytest.fixture(scope="module")
def untied_chatglm_dir(tmp_path_factory):
    """A tiny ChatGLM-6B with its own output head, as the demo's model and THUDM's checkpoint have."""
    from tests import tiny_models
    from tests.train.conftest import TRAIN_CHATGLM

    return tiny_models.tiny_chatglm_dir(tmp_path_factory.mktemp("untied-chatglm"), seed=0, vocab_multiple=1,
                                        **{**TRAIN_CHATGLM, "tie_word_embeddings": False})


@pytest.fixture(scope="module")
def untied_dataset(untied_chatglm_dir, reverse_jsonl, tmp_path_factory):
    from tests.train.conftest import tokenized

    return tokenized(untied_chatglm_dir, reverse_jsonl, tmp_path_factory.mktemp("untied-data") / "reverse")


@pytest.fixture(scope="module")
def embedding_run(tmp_path_factory, untied_chatglm_dir, untied_dataset):
    """A trained run whose LoRA sits on word_embeddings and lm_head too (3 steps, a checkpoint at 3)."""
    from tests.train.conftest import common_flags, train_in_process

    out = tmp_path_factory.mktemp("embedding-run") / "run"
    flags = common_flags(untied_chatglm_dir, untied_dataset, out, max_steps=3, save_steps=3, lora_rank=4,
                         lora_alpha=16, lora_target=EMBEDDING_TARGETS, learning_rate=0.05, lora_dropout=0.0)
    assert train_in_process(*flags) == 0
    return out


def greedy(model_dir, adapter=None) -> tuple[list[str], torch.Tensor]:
    """Greedy answers to PROMPTS and the logits of the first, as `chat`/`predict`/`serve` load the adapter."""
    from instructglm.infer.generate import GenerationArguments
    from instructglm.infer.engine import generate_batch
    from instructglm.infer.load import load_model

    model, tokenizer, _ = load_model(str(model_dir), None if adapter is None else str(adapter), dtype="float32", device="cpu")
    texts = [c.text for c in generate_batch(model, tokenizer, PROMPTS, GenerationArguments(max_new_tokens=6, do_sample=False))]
    with torch.no_grad():
        logits = model(**tokenizer(PROMPTS[:1], return_tensors="pt")).logits
    return texts, logits


def test_embedding_and_head_adapter_loads_back_in_both_layouts(embedding_run, untied_chatglm_dir):
    """The run dir, its chatglm-lora.pt and its checkpoint all load through `load_model` and answer alike."""
    pt = torch.load(embedding_run / "chatglm-lora.pt", weights_only=True)
    assert "base_model.model.transformer.word_embeddings.lora_embedding_A.default" in pt
    assert "base_model.model.lm_head.lora_B.default.weight" in pt
    assert not any("base_layer" in key for key in pt), "the .pt holds the LoRA tensors only"
    assert json.loads((embedding_run / "adapter_config.json").read_text())["lora_alpha"] == 16

    texts, logits = greedy(untied_chatglm_dir, embedding_run)
    _, base_logits = greedy(untied_chatglm_dir)
    assert not torch.allclose(logits, base_logits), "the adapter changes the model"
    for adapter in (embedding_run / "chatglm-lora.pt", embedding_run / "checkpoint-3"):
        other_texts, other_logits = greedy(untied_chatglm_dir, adapter)
        assert other_texts == texts, adapter
        torch.testing.assert_close(other_logits, logits, rtol=1e-5, atol=1e-6)


def test_embedding_and_head_adapter_merges(embedding_run, untied_chatglm_dir, tmp_path):
    from instructglm.infer.merge import merge

    texts, logits = greedy(untied_chatglm_dir, embedding_run)
    for adapter in (embedding_run, embedding_run / "chatglm-lora.pt"):
        merged = merge(str(untied_chatglm_dir), str(adapter), tmp_path / adapter.name)
        merged_texts, merged_logits = greedy(merged)
        assert merged_texts == texts, adapter
        torch.testing.assert_close(merged_logits, logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("resume_from", ["chatglm-lora.pt", "."])
def test_embedding_and_head_adapter_continues_training(embedding_run, untied_chatglm_dir, untied_dataset, tmp_path, resume_from):
    """--is_resume from either layout; at learning rate 0 the continued adapter is the one it started from."""
    from tests.train.conftest import adapter_tensors, common_flags, train_in_process

    out = tmp_path / "continued"
    flags = common_flags(untied_chatglm_dir, untied_dataset, out, max_steps=1, save_steps=1, lora_rank=4,
                         learning_rate=0.0, lora_dropout=0.0, is_resume="true", resume_path=embedding_run / resume_from)
    assert train_in_process(*flags) == 0
    assert json.loads((out / "adapter_config.json").read_text())["lora_alpha"] == 16  # from the run's record
    lora = lambda tensors: {k: v for k, v in tensors.items() if ".lora_" in k}  # noqa: E731
    torch.testing.assert_close(lora(adapter_tensors(out)), lora(adapter_tensors(embedding_run)), rtol=0, atol=0)


def test_corrupt_adapter_config_is_named(tiny_llama_dir, tmp_path):
    trained_adapter(tiny_llama_dir).save_pretrained(str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "adapter_config.json").write_text("")
    with pytest.raises(BadValue, match=r"adapter_config.json: not valid JSON .*0 bytes"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "adapter"))
    (tmp_path / "adapter" / "adapter_config.json").unlink()
    with pytest.raises(MissingFile, match="no adapter_config.json"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "adapter"))


def test_truncated_adapter_weights_are_named(tiny_llama_dir, tmp_path):
    trained_adapter(tiny_llama_dir).save_pretrained(str(tmp_path / "adapter"))
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(BadValue, match="adapter_model.safetensors: truncated or corrupt"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "adapter"))
    torch.save(seed_state_dict(trained_adapter(tiny_llama_dir)), tmp_path / "a.pt")
    (tmp_path / "b.pt").write_bytes((tmp_path / "a.pt").read_bytes()[:200])
    with pytest.raises(BadValue, match="b.pt: a weight file is truncated or corrupt"):
        load_adapter(base(tiny_llama_dir), str(tmp_path / "b.pt"))


def test_seed_pt_from_the_saved_file_equals_the_one_from_the_model(tiny_chatglm_dir, tmp_path):
    from safetensors.torch import load_file

    from instructglm.models.lora import seed_state_dict_from_saved

    model = trained_adapter(tiny_chatglm_dir, target=EMBEDDING_TARGETS.split(","))
    model.save_pretrained(str(tmp_path / "adapter"))
    from_file = seed_state_dict_from_saved(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    from_model = seed_state_dict(model)
    assert from_file.keys() == from_model.keys()
    torch.testing.assert_close(from_file, from_model, rtol=0, atol=0)


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"peft_type": "LORA", "r": "eight", "lora_alpha": 16, "target_modules": ["q_proj"]}, "r is 'eight'"),
        ({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": 5}, "target_modules is 5"),
        ({"peft_type": "PREFIX_TUNING", "r": 8, "target_modules": ["q_proj"]}, "peft_type is 'PREFIX_TUNING'"),
        ([1, 2], "a JSON list"),
    ],
)
def test_an_adapter_config_of_wrong_types_is_named(fields, named, tmp_path):
    import json

    from instructglm.errors import BadValue
    from instructglm.models.lora import read_adapter_config

    (tmp_path / "adapter_config.json").write_text(json.dumps(fields))
    with pytest.raises(BadValue, match=f"adapter_config.json: not a LoRA adapter config .*{named}"):
        read_adapter_config(tmp_path)
