"""The recipe end to end on the CPU: run dir contents, data inputs, continued training, flag errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from tests.train.conftest import REPO, adapter_tensors, common_flags, reverse_rows, tokenized, train_in_process, write_jsonl

RUN_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "chatglm-lora.pt",
    "instructglm_train.json", "loss.png",
}
CHECKPOINT_FILES = {
    "README.md", "adapter_config.json", "adapter_model.safetensors", "instructglm_train.json", "optimizer.pt",
    "rng_state.pth", "scheduler.pt", "trainer_state.json", "training_args.bin",
}


def tokenizer_files(model_dir, tmp_path) -> set[str]:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(tmp_path / "tok"))
    return {p.name for p in (tmp_path / "tok").iterdir()}


def assert_pt_matches_adapter(run_dir):
    pt = torch.load(run_dir / "chatglm-lora.pt", weights_only=True)
    safetensors = adapter_tensors(run_dir)
    assert {k.replace(".default", "") for k in pt} == set(safetensors)
    for key, value in pt.items():
        torch.testing.assert_close(value, safetensors[key.replace(".default", "")], rtol=0, atol=0)


@pytest.mark.parametrize("model", ["llama", "chatglm"])
def test_run_dir_exact_files(model, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{model}_dir")
    dataset = request.getfixturevalue(f"{model}_dataset")
    out = tmp_path / "run"
    flags = common_flags(model_dir, dataset, out, max_steps=6, save_steps=2, save_total_limit=2,
                         eval_dataset_path=dataset, eval_steps=3)
    assert train_in_process(*flags) == 0

    tokenizer = tokenizer_files(model_dir, tmp_path)
    assert {p.name for p in out.iterdir()} == RUN_FILES | tokenizer | {"checkpoint-4", "checkpoint-6"}
    for checkpoint in ("checkpoint-4", "checkpoint-6"):
        assert {p.name for p in (out / checkpoint).iterdir()} == CHECKPOINT_FILES | tokenizer
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    torch.testing.assert_close(adapter_tensors(out), adapter_tensors(out / "checkpoint-6"), rtol=0, atol=0)
    assert_pt_matches_adapter(out)

    run = json.loads((out / "instructglm_train.json").read_text())
    assert run["template"] == "plain"  # from the dataset's instructglm_data.json (convert's sidecar)
    assert run["template_source"] == "convert"
    # each checkpoint carries the run's record (template, LoRA, fingerprint), as the run dir does
    at_checkpoint = json.loads((out / "checkpoint-6" / "instructglm_train.json").read_text())
    assert at_checkpoint["global_step"] == 6 and at_checkpoint["fingerprint"] == run["fingerprint"]
    assert at_checkpoint["template"] == "plain" and at_checkpoint["lora"] == run["lora"]
    assert run["fingerprint"]["data"]["dataset_path"]["bytes"] > 0
    assert run["model_type"] == ("chatglm" if model == "chatglm" else "llama")
    assert run["lora"] == {"rank": 8, "alpha": 32, "dropout": 0.1,
                           "target_modules": ["query_key_value"] if model == "chatglm" else ["q_proj", "v_proj"]}
    assert run["dataset"]["rows"] == 64 and run["dataset"]["meta"]["counts"]["kept"] == 64
    assert run["training_args"]["max_steps"] == 6 and run["finetune_args"]["lora_rank"] == 8
    history = json.loads((out / "checkpoint-6" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e] == [3, 6]
    if model == "chatglm":
        state = torch.load(out / "chatglm-lora.pt", weights_only=True)
        assert "base_model.model.transformer.layers.0.attention.query_key_value.lora_A.default.weight" in state


def test_jsonl_tokenized_on_the_fly_and_template_flag(tiny_llama_dir, reverse_jsonl, tmp_path):
    out = tmp_path / "run"
    assert train_in_process(*common_flags(tiny_llama_dir, reverse_jsonl, out, max_steps=2, save_steps=2,
                                          max_seq_length=16, template="alpaca")) == 0
    run = json.loads((out / "instructglm_train.json").read_text())
    assert run["template"] == "alpaca" and run["dataset"]["meta"]["template"] == "plain"
    assert 0 < run["dataset"]["rows"] <= 64


def alpaca_rows(n: int) -> list[dict]:
    """Rows as the 2023 `cover_alpaca2jsonl.py` wrote them (Alpaca template), with no sidecar."""
    return [{"context": f"Instruction: reverse\nInput: {r['target'][::-1]}\nAnswer: ", "target": r["target"]}
            for r in reverse_rows(n)]


def test_template_detected_for_a_jsonl_without_sidecar(tiny_llama_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "seed_made.jsonl", alpaca_rows(16))
    out = tmp_path / "run"
    assert train_in_process(*common_flags(tiny_llama_dir, data, out, max_steps=1, save_steps=1, max_seq_length=48)) == 0
    run = json.loads((out / "instructglm_train.json").read_text())
    assert (run["template"], run["template_source"]) == ("alpaca", "detected")
    assert "template of" not in capsys.readouterr().err  # no warning: the template is known


@pytest.mark.parametrize("layout", ["jsonl", "dataset dir"])
def test_unknown_template_is_recorded_as_unknown_with_one_warning(layout, tiny_llama_dir, tmp_path, capsys):
    """Neither a sidecar nor a recognisable prompt: the record says unknown (never the family's chat template)."""
    data = write_jsonl(tmp_path / "free_text.jsonl", reverse_rows(16))
    if layout == "dataset dir":
        data = tokenized(tiny_llama_dir, data, tmp_path / "dataset")
        (data / "instructglm_data.json").unlink(missing_ok=True)
    out = tmp_path / "run"
    capsys.readouterr()
    assert train_in_process(*common_flags(tiny_llama_dir, data, out, max_steps=1, save_steps=1, max_seq_length=48)) == 0
    run = json.loads((out / "instructglm_train.json").read_text())
    assert (run["template"], run["template_source"]) == (None, "unknown")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "template" in line and line.startswith("warning:")]
    assert len(warnings) == 1 and "pass --template" in warnings[0], warnings


def test_template_source_recorded_by_tokenize_is_kept(tiny_llama_dir, tmp_path):
    data = tokenized(tiny_llama_dir, write_jsonl(tmp_path / "d.jsonl", alpaca_rows(16)), tmp_path / "dataset")
    (data / "instructglm_data.json").write_text(json.dumps({"template": "alpaca", "template_source": "detected"}))
    out = tmp_path / "run"
    assert train_in_process(*common_flags(tiny_llama_dir, data, out, max_steps=1, save_steps=1)) == 0
    run = json.loads((out / "instructglm_train.json").read_text())
    assert (run["template"], run["template_source"]) == ("alpaca", "detected")


def test_bad_template_flag_is_one_line(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    err = train_user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, tmp_path / "o", template="no_such"))
    assert re.search(r"--template 'no_such'", err) and not (tmp_path / "o" / "adapter_config.json").exists()


def test_loss_goes_down(tiny_llama_dir, llama_dataset, tmp_path):
    out = tmp_path / "run"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=30, save_steps=30,
                                          learning_rate=0.1, logging_steps=5, lora_target="all-linear",
                                          lora_dropout=0.0, lora_rank=16)) == 0
    losses = [e["loss"] for e in json.loads((out / "checkpoint-30" / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert losses[-1] < losses[0] - 0.3, losses


def test_continue_from_adapter_pt_and_dir(tiny_llama_dir, llama_dataset, tmp_path):
    first = tmp_path / "first"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, first, max_steps=3, save_steps=3, lora_rank=4)) == 0
    for resume_path in (first / "chatglm-lora.pt", first):
        out = tmp_path / f"second-{resume_path.name}"
        # learning rate 0: the continued run's adapter must be exactly the one it started from
        flags = common_flags(tiny_llama_dir, llama_dataset, out, max_steps=1, save_steps=1, lora_rank=4,
                             learning_rate=0.0, is_resume="True", resume_path=resume_path)
        assert train_in_process(*flags) == 0
        torch.testing.assert_close(adapter_tensors(out), adapter_tensors(first), rtol=0, atol=0)
        assert json.loads((out / "instructglm_train.json").read_text())["resumed_from_adapter"] == str(resume_path)


def train_user_error(capsys, *argv) -> str:
    """Run `instructglm train argv`, which must end as a user error (exit 2); its stderr."""
    capsys.readouterr()
    assert train_in_process(*argv) == 2
    return capsys.readouterr().err


def test_continue_with_wrong_rank_is_an_error(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    first = tmp_path / "first"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, first, max_steps=1, save_steps=1, lora_rank=4)) == 0
    flags = common_flags(tiny_llama_dir, llama_dataset, tmp_path / "b", lora_rank=8, is_resume="true",
                         resume_path=first / "chatglm-lora.pt")
    assert re.search(r"rank 4, the run asks for --lora_rank 8 \(pass --lora_rank 4\)", train_user_error(capsys, *flags))


def test_gradient_checkpointing_same_adapter(tiny_llama_dir, llama_dataset, tmp_path):
    runs = {}
    for gc in ("false", "true"):
        out = tmp_path / gc
        assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=3, save_steps=3,
                                              lora_dropout=0.0, gradient_checkpointing=gc)) == 0
        runs[gc] = adapter_tensors(out)
    assert any(v.abs().sum() > 0 for k, v in runs["true"].items() if "lora_B" in k), "the adapter trained"
    torch.testing.assert_close(runs["true"], runs["false"], rtol=1e-5, atol=1e-6)


def test_glm4_trains_with_the_same_command(tiny_llama_dir, llama_dataset, tmp_path):
    """Any causal LM transformers loads natively: a tiny GLM-4 with the char tokenizer."""
    import shutil

    from transformers import AutoTokenizer, Glm4Config, Glm4ForCausalLM

    path = tmp_path / "glm4"
    shutil.copytree(tiny_llama_dir, path)
    (path / "config.json").unlink()
    (path / "model.safetensors").unlink()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    config = Glm4Config(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    Glm4ForCausalLM(config).save_pretrained(str(path))
    out = tmp_path / "run"
    assert train_in_process(*common_flags(path, llama_dataset, out, max_steps=2, save_steps=2)) == 0
    run = json.loads((out / "instructglm_train.json").read_text())
    assert run["model_type"] == "glm4" and run["family"] == "causal-lm"


def test_quantization_on_cpu_is_a_clear_error(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only message")
    assert re.search("--quantization_bit 4 needs a CUDA GPU", train_user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, tmp_path / "q", quantization_bit=4)))
    assert re.search("--quantization_bit must be 4 or 8, got 3", train_user_error(capsys, *common_flags(tiny_llama_dir, llama_dataset, tmp_path / "q", quantization_bit=3)))


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_configs_and_missing_deepspeed(tiny_llama_dir, llama_dataset, tmp_path, stage, capsys):
    import importlib.util

    path = REPO / "configs" / f"ds_zero{stage}.json"
    config = json.loads(path.read_text())
    assert config["zero_optimization"]["stage"] == stage
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto", key  # filled in from the TrainingArguments by the HF integration
    assert config["fp16"]["enabled"] == "auto" and config["bf16"]["enabled"] == "auto"
    if importlib.util.find_spec("deepspeed") is None:
        assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, tmp_path / "ds", deepspeed=path)) == 2
        assert re.search(f"--deepspeed {path} needs DeepSpeed.*pip install 'instructglm\\[gpu\\]'", capsys.readouterr().err)


def test_bad_inputs_are_named(tiny_llama_dir, tmp_path, capsys):
    import datasets

    assert re.search("--dataset_path .*nope does not exist", train_user_error(capsys, *common_flags(tiny_llama_dir, tmp_path / "nope", tmp_path / "o")))
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(str(tmp_path / "raw"))
    assert re.search(r"missing \['input_ids', 'seq_len'\].*instructglm tokenize", train_user_error(capsys, *common_flags(tiny_llama_dir, tmp_path / "raw", tmp_path / "o")))
    assert re.search("--is_resume True needs --resume_path", train_user_error(capsys, *common_flags(tiny_llama_dir, tmp_path / "raw", tmp_path / "o", is_resume="true")))


def test_report_to_tensorboard_writes_event_files(tiny_llama_dir, llama_dataset, tmp_path):
    out = tmp_path / "run"
    flags = common_flags(tiny_llama_dir, llama_dataset, out, max_steps=2, save_steps=2, logging_steps=1,
                         report_to="tensorboard")
    assert train_in_process(*flags) == 0
    assert list(tmp_path.rglob("events.out.tfevents.*")), "no TensorBoard event file written"


def test_phases_one_by_one_give_what_finetune_gives(tiny_llama_dir, llama_dataset, tmp_path):
    """Each phase is callable alone (no CLI dataclass parsing, no record needed): chained by hand they make the
    adapter `finetune()` makes."""
    from transformers import set_seed

    from instructglm.train import finetune as recipe
    from instructglm.train.args import FinetuneArguments, TrainingArguments

    def arguments(out):
        return (FinetuneArguments(dataset_path=str(llama_dataset), model_name_or_path=str(tiny_llama_dir), lora_dropout=0.0),
                TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                                  save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=7))

    whole = recipe.finetune(*arguments(tmp_path / "whole"))
    assert whole.output_dir == tmp_path / "whole" and whole.metrics["train_loss"] > 0
    assert whole.record["template"] == "plain" and whole.record["lora"]["rank"] == 8

    args, training_args = arguments(tmp_path / "phases")
    set_seed(training_args.seed)
    model, tokenizer = recipe.load_base(args, training_args)
    data = recipe.load_data(args, tokenizer, model.config.model_type)
    assert len(data.train) == 64 and data.eval is None and (data.template, data.template_source) == ("plain", "convert")
    model = recipe.attach_adapter(model, args)
    trainer = recipe.build_trainer(model, tokenizer, data, training_args)
    result = recipe.fit(trainer)
    assert recipe.save_run(trainer, {"note": "by hand"}, result.metrics) == tmp_path / "phases"
    torch.testing.assert_close(adapter_tensors(tmp_path / "phases"), adapter_tensors(tmp_path / "whole"), rtol=0, atol=0)
    assert json.loads((tmp_path / "phases" / "instructglm_train.json").read_text())["note"] == "by hand"


def test_rows_with_labels_are_trained_on_those_labels():
    from instructglm.errors import BadValue
    from instructglm.train.collator import CausalLMCollator

    collate = CausalLMCollator(pad_token_id=0)
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, -100, 8, 9], "seq_len": 1},
        {"input_ids": [5, 6, 7], "labels": [-100, -100, 7], "seq_len": 2},
    ]
    batch = collate(rows)
    assert batch["labels"].tolist() == [[-100, 6, -100, 8, 9], [-100, -100, 7, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    # rows without labels keep the seq_len rule
    assert collate([{"input_ids": [5, 6, 7], "seq_len": 2}])["labels"].tolist() == [[-100, -100, 7]]
    with pytest.raises(BadValue, match="2 labels for 3 input ids"):
        collate([{"input_ids": [5, 6, 7], "labels": [-100, 7], "seq_len": 2}])


def test_record_names_the_family_and_its_stop_ids(tiny_llama_dir, llama_dataset, tmp_path):
    out = tmp_path / "run"
    assert train_in_process(*common_flags(tiny_llama_dir, llama_dataset, out, max_steps=2, save_steps=2)) == 0
    run = json.loads((out / "instructglm_train.json").read_text())
    assert (run["family"], run["chat_format"], run["template"]) == ("causal-lm", "text", "plain")
    assert run["stop_token_ids"] == [3]  # the char tokenizer's </s>


def test_a_dataset_tokenized_for_another_family_is_refused(tiny_llama_dir, llama_dataset, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(llama_dataset, data)
    meta = json.loads((data / "instructglm_data.json").read_text())
    (data / "instructglm_data.json").write_text(json.dumps({**meta, "family": "chatglm3-6b"}))
    message = train_user_error(capsys, *common_flags(tiny_llama_dir, data, tmp_path / "o", max_steps=1))
    assert "was tokenized for the chatglm3-6b family, but the model is causal-lm" in message


@pytest.mark.parametrize("model", ["llama", "chatglm"])
def test_eval_generate_logs_scores_beside_the_eval_loss(model, request, reverse_jsonl, tmp_path):
    """--eval_generate N: BLEU-4 / ROUGE at each evaluation, in the log, the loss plot and the run record."""
    model_dir = request.getfixturevalue("tiny_llama_dir" if model == "llama" else "tiny_chatglm_dir")
    dataset = request.getfixturevalue("llama_dataset" if model == "llama" else "chatglm_dataset")
    out = tmp_path / "run"
    flags = common_flags(model_dir, dataset, out, max_steps=4, save_steps=4, eval_dataset_path=reverse_jsonl,
                         eval_steps=2, eval_generate=3, eval_max_new_tokens=4, max_seq_length=64)
    assert train_in_process(*flags) == 0
    record = json.loads((out / "instructglm_train.json").read_text())
    final = record["eval_metrics"]  # the run's last evaluation, generation scores included
    assert final["step"] == 4 and "eval_loss" in final
    for name in ("eval_bleu-4", "eval_rouge-1", "eval_rouge-2", "eval_rouge-l", "eval_exact_match"):
        assert 0.0 <= final[name] <= 100.0, (name, final)
    assert (out / "loss.png").stat().st_size > 0


def test_packing_and_labelled_only_logits_through_the_command(tiny_chatglm_dir, chatglm_dataset, tmp_path, capsys):
    """The flags reach the recipe: the same adapter (up to float rounding) as the plain padded run."""
    plain, fast = tmp_path / "plain", tmp_path / "fast"
    # no LoRA dropout: packed and padded batches have other shapes, so they would draw other masks
    flags = dict(max_steps=3, save_steps=3, max_seq_length=64, per_device_train_batch_size=64, lora_dropout=0.0)
    assert train_in_process(*common_flags(tiny_chatglm_dir, chatglm_dataset, plain, **flags)) == 0
    # one pack holds every row here, as one padded batch of 64 rows does: the steps see the same tokens
    assert train_in_process(*common_flags(tiny_chatglm_dir, chatglm_dataset, fast, packing="true",
                                          labelled_only_logits="true", logits_chunk_size=16, **flags)) == 0
    assert "--packing:" in capsys.readouterr().out
    record = json.loads((fast / "instructglm_train.json").read_text())
    assert record["finetune_args"]["packing"] and record["finetune_args"]["labelled_only_logits"]
    import torch

    ours, reference = adapter_tensors(fast), adapter_tensors(plain)
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-4, atol=1e-5, msg=name)
