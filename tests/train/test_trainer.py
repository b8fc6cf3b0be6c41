"""The Trainer hooks of `--packing` and `--labelled_only_logits`: the same training, less padding and memory.

A short LoRA run through `InstructGLMTrainer` ends on the weights of the same run through
transformers' `Trainer` (tiny Llama and tiny native ChatGLM-6B, with gradient accumulation, so
`num_items_in_batch` is in play); evaluation keeps full logits; packing + labelled-only logits
resume exactly from a checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from instructglm.errors import BadValue
from instructglm.train.collator import collator_for
from instructglm.train.trainer import (
    InstructGLMTrainer,
    SpeedArguments,
    check_speed_flags,
    packing_data,
    trainer_kwargs_for,
)

TARGETS = {"llama": ["q_proj", "v_proj", "lm_head"], "chatglm": ["query_key_value"]}


@pytest.fixture
def family(request, tiny_llama_dir, llama_dataset, tiny_chatglm_dir, chatglm_dataset):
    """(model dir, tokenized dataset dir, model type) of the parametrised family."""
    import instructglm  # noqa: F401  (registers ChatGLM)

    return {
        "llama": (tiny_llama_dir, llama_dataset, "llama"),
        "chatglm": (tiny_chatglm_dir, chatglm_dataset, "chatglm"),
    }[request.param]


def lora_model(model_dir, model_type):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    torch.manual_seed(0)  # LoRA A is random
    # LoRA dropout on the output head would drop other elements: the head sees only the labelled positions there
    dropout = 0.0 if "lm_head" in TARGETS[model_type] else 0.1
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=TARGETS[model_type])
    return get_peft_model(model, config)


def training_args(output_dir, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(output_dir), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=4,
        learning_rate=2e-2, report_to="none", seed=5, remove_unused_columns=False, dataloader_num_workers=0,
        disable_tqdm=True, logging_steps=1, save_strategy="no", use_cpu=True,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def head_calls(model) -> list[int]:
    """Positions per output-head call, recorded from now on."""
    calls: list[int] = []
    model.get_output_embeddings().register_forward_hook(lambda module, args, out: calls.append(args[0].shape[-2]))
    return calls


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("family", ["llama", "chatglm"], indirect=True)
def test_labelled_only_logits_train_the_same_weights_and_evaluate_with_full_logits(family, tmp_path):
    import datasets

    model_dir, dataset_dir, model_type = family
    rows = datasets.load_from_disk(str(dataset_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    results = {}
    for name, trainer_class, options in (
        ("plain", Trainer, {}),
        ("labelled_only", InstructGLMTrainer, {"labelled_only_logits": True}),
    ):
        model = lora_model(model_dir, model_type)
        trainer = trainer_class(
            model=model, args=training_args(tmp_path / name), train_dataset=rows, eval_dataset=rows.select(range(8)),
            data_collator=collator_for(tokenizer, model_type), **options,
        )
        calls = head_calls(model)
        trainer.train()
        trained_calls = list(calls)
        eval_loss = trainer.evaluate()["eval_loss"]
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        results[name] = trainable(model), losses, eval_loss, trained_calls, calls[len(trained_calls) :]
    (plain, plain_losses, plain_eval, _, _), (ours, our_losses, our_eval, calls, eval_calls) = results.values()
    # the model's own head call got no positions; the chunks then covered the labelled ones
    assert 0 in calls and min(calls) == 0
    assert all(n > 0 for n in eval_calls), "evaluation runs the head over every position"
    assert plain.keys() == ours.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(ours[name], plain[name], rtol=1e-5, atol=1e-5, msg=name)
    assert our_losses == pytest.approx(plain_losses, rel=1e-5) and our_eval == pytest.approx(plain_eval, rel=1e-6)


def test_packing_with_labelled_only_logits_resumes_exactly(tiny_chatglm_dir, chatglm_dataset, tmp_path):
    import datasets

    import instructglm  # noqa: F401

    rows = datasets.load_from_disk(str(chatglm_dataset))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_chatglm_dir))
    speed = SpeedArguments(packing=True, labelled_only_logits=True, logits_chunk_size=16)

    def train(output_dir, resume=None):
        model = lora_model(tiny_chatglm_dir, "chatglm")
        args = training_args(output_dir, per_device_train_batch_size=2, max_steps=6, save_strategy="steps", save_steps=3)
        check_speed_flags(speed, args)
        packed, collator = packing_data(rows, tokenizer, model.config, max_seq_length=64, seed=args.seed)
        assert collator.attention == "segment_ids" and len(packed) < len(rows)
        trainer = InstructGLMTrainer(
            model=model, args=args, train_dataset=packed, data_collator=collator, **trainer_kwargs_for(speed)
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainable(model), [e["loss"] for e in trainer.state.log_history if "loss" in e and e["step"] > 3]

    unbroken, losses = train(tmp_path / "unbroken")
    resumed, resumed_losses = train(tmp_path / "resumed", resume=str(tmp_path / "unbroken" / "checkpoint-3"))
    torch.testing.assert_close(resumed, unbroken, rtol=0, atol=0)
    assert resumed_losses == losses and len(losses) == 3


def test_flag_checks_name_the_flags(tiny_llama_dir, tmp_path):
    with pytest.raises(BadValue, match="--logits_chunk_size must be >= 1"):
        SpeedArguments(logits_chunk_size=0)
    args = training_args(tmp_path, train_sampling_strategy="group_by_length", label_smoothing_factor=0.1)
    with pytest.raises(BadValue, match="drop --train_sampling_strategy group_by_length.*drop --label_smoothing_factor 0.1"):
        check_speed_flags(SpeedArguments(packing=True, labelled_only_logits=True), args)
    check_speed_flags(SpeedArguments(), args)  # neither flag: nothing to refuse
    assert trainer_kwargs_for(SpeedArguments())["labelled_only_logits"] is False


def test_packing_data_refuses_rows_longer_than_a_pack_and_marks_flash_batches(tiny_llama_dir):
    from transformers import AutoConfig

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    rows = [{"input_ids": list(range(4, 14)), "seq_len": 3}, {"input_ids": list(range(4, 9)), "seq_len": 2}]
    with pytest.raises(BadValue, match=r"row 0 \(10 tokens\).*--max_seq_length 8"):
        packing_data(rows, tokenizer, "llama", max_seq_length=8, seed=0)
    config = AutoConfig.from_pretrained(str(tiny_llama_dir))
    config._attn_implementation = "flash_attention_2"
    packed, collator = packing_data(rows, tokenizer, config, max_seq_length=16, seed=0)
    assert len(packed) == 1 and collator.flash_attention_kwargs
    assert {"cu_seq_lens_q", "max_length_q"} <= set(collator([packed[0]]))
