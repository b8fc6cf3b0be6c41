"""`instructglm eval` end to end on a tiny ChatGLM: a trained adapter beats the base, the files hold what
they say, adapters come off the base cleanly, and user mistakes end in one line."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch

from instructglm import cli
from instructglm.eval.evaluate import attach_adapter, detach_adapter, load_eval_rows, model_labels
from instructglm.infer.generate import GenerationArguments
from instructglm.infer.engine import generate_batch
from instructglm.infer.load import load_model
from tests.eval.conftest import write_jsonl

ASSETS = Path(__file__).parent / "assets" / "benchmarks"


@pytest.fixture
def run_eval(monkeypatch):
    """`instructglm eval argv` in this process, as the CLI runs it (the coordinator adds `eval` to the table)."""
    monkeypatch.setitem(cli.COMMANDS, "eval", ("instructglm.eval.evaluate", "evaluate base and adapters"))
    return lambda *argv: cli.run_command("eval", [str(a) for a in argv])


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [line for line in err if line.startswith("instructglm eval:")]
    assert len(lines) == 1, err
    return lines[0]


def test_trained_adapter_beats_the_base(run_eval, glm_base, trained_adapter, number_jsonl, number_rows, tmp_path, capsys):
    out = tmp_path / "out"
    code = run_eval(
        "--model_name_or_path", glm_base, "--adapter", "none", trained_adapter, "--data", number_jsonl,
        "--output_dir", out, "--max_new_tokens", 6, "--benchmark", ASSETS / "ceval", "--benchmark_shots", 0,
    )
    printed = capsys.readouterr().out
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    assert list(metrics) == ["base", "numbers"]
    base, adapter = metrics["base"], metrics["numbers"]
    for key in ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match", "loss", "perplexity", "rows", "model", "adapter", "template", "generation"):
        assert key in base and key in adapter, key
    assert adapter["exact_match"] >= 50 > base["exact_match"]
    assert adapter["bleu-4"] > base["bleu-4"] and adapter["rouge-l"] > base["rouge-l"]
    assert adapter["loss"] < base["loss"] - 1 and adapter["perplexity"] < base["perplexity"]
    assert (base["adapter"], adapter["adapter"], adapter["model"]) == (None, str(trained_adapter), str(glm_base))
    assert base["template"] == "alpaca"  # recognised from the prompts (no convert sidecar)
    assert base["generation"]["do_sample"] is False and base["generation"]["max_new_tokens"] == 6
    assert base["data"]["sha256"] == hashlib.sha256(number_jsonl.read_bytes()).hexdigest()
    assert base["rows"] == adapter["rows"] == len(number_rows) == base["loss_rows"]
    assert set(adapter["benchmark"]) >= {"benchmark", "split", "0-shot"} and adapter["benchmark"]["0-shot"]["questions"] == 5

    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [(line["row"], line["context"], line["target"]) for line in lines] == [
        (i, row["context"], row["target"]) for i, row in enumerate(number_rows)
    ]
    assert all(set(line["predictions"]) == set(line["scores"]) == {"base", "numbers"} for line in lines)
    assert sum(line["scores"]["numbers"]["exact_match"] for line in lines) / len(lines) == pytest.approx(adapter["exact_match"])

    # the answers are what a fresh load of each model generates: attaching and detaching on one base changes nothing
    settings = GenerationArguments(max_new_tokens=6, do_sample=False)
    for label, adapter_path in (("base", None), ("numbers", trained_adapter)):
        model, tokenizer, _ = load_model(str(glm_base), str(adapter_path) if adapter_path else None, device="cpu")
        fresh = [c.text.strip() for c in generate_batch(model, tokenizer, [r["context"] for r in number_rows], settings)]
        assert [line["predictions"][label] for line in lines] == fresh, label

    assert (out / "report.html").is_file()
    assert "numbers" in printed and "exact_match" in printed and "arithmetic" in printed  # summary + benchmark table


def test_detaching_an_adapter_gives_the_base_back(glm_base, trained_adapter):
    base, tokenizer, _ = load_model(str(glm_base), device="cpu")
    ids = tokenizer(["Instruction: hi\nAnswer: "], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(input_ids=ids).logits
        with_adapter = attach_adapter(base, str(trained_adapter))
        changed = with_adapter(input_ids=ids).logits
        restored = detach_adapter(with_adapter)
        after = restored(input_ids=ids).logits
    assert not torch.allclose(before, changed)
    assert restored is base and torch.equal(before, after)
    assert not any("lora" in name for name, _ in restored.named_modules())


def test_labels_are_directory_names_made_unique(tmp_path):
    for sub in ("a/checkpoint-10", "b/checkpoint-10", "c/base", "d/run"):
        (tmp_path / sub).mkdir(parents=True)
    (tmp_path / "d" / "run" / "chatglm-lora.pt").write_bytes(b"")
    labels = model_labels(
        [None, tmp_path / "a/checkpoint-10", tmp_path / "b/checkpoint-10", tmp_path / "c/base", tmp_path / "d/run",
         tmp_path / "d/run/chatglm-lora.pt"]
    )
    assert labels == ["base", "a/checkpoint-10", "b/checkpoint-10", "c/base", "run", "run/chatglm-lora.pt"]


def test_a_raw_dataset_is_rendered_with_the_template(tmp_path, number_rows):
    source = tmp_path / "numbers.json"
    records = [{"instruction": "Write the number in English words.", "input": str(i), "output": w}
               for i, w in enumerate(("one", "two"), 1)]
    source.write_text(json.dumps(records), encoding="utf-8")
    data = load_eval_rows(source, template="alpaca")
    expected = [{"row": i, **row} for i, row in enumerate(number_rows[:2])]
    assert (data.format, data.template, data.rows) == ("alpaca", "alpaca", expected)
    assert load_eval_rows(source, template="belle").rows[0]["context"] == "指令: Write the number in English words.\n输入: 1\n答案: "
    assert len(load_eval_rows(source, max_rows=1).rows) == 1


def test_bad_data_ends_in_one_line(run_eval, glm_base, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_eval("--model_name_or_path", glm_base, "--data", tmp_path / "missing.jsonl", "--output_dir", out) == 2
    line = one_error_line(capsys)
    assert "--data" in line and "missing.jsonl does not exist" in line
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"context": "a", "target": "b"}\n{not json\n{"context": "c"}\n', encoding="utf-8")
    assert run_eval("--model_name_or_path", glm_base, "--data", broken, "--output_dir", out) == 2
    line = one_error_line(capsys)
    assert "2 unusable row(s)" in line and "broken.jsonl:2" in line and "broken.jsonl:3" in line
    odd = write_jsonl(tmp_path / "odd.jsonl", [{"question": "q", "answer": "a"}])
    assert run_eval("--model_name_or_path", glm_base, "--data", odd, "--output_dir", out) == 2
    assert "fields answer, question" in one_error_line(capsys)
    assert not out.exists()


def test_missing_extra_ends_in_one_line(run_eval, glm_base, number_jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jieba", None)  # `import jieba` now raises ImportError
    assert run_eval("--model_name_or_path", glm_base, "--data", number_jsonl, "--output_dir", tmp_path / "out") == 2
    assert one_error_line(capsys) == (
        "instructglm eval: error: the generation metrics need jieba, which is not installed: run pip install 'instructglm[eval]'"
    )


def test_mismatched_adapter_ends_in_one_line_before_any_generation(run_eval, glm_base, llama_base, number_jsonl, tmp_path, capsys):
    from tests.infer.helpers import tiny_adapter

    llama_adapter = tiny_adapter(llama_base, tmp_path / "llama-run")  # targets q_proj / v_proj, which ChatGLM lacks
    out = tmp_path / "out"
    code = run_eval("--model_name_or_path", glm_base, "--adapter", "none", llama_adapter, "--data", number_jsonl, "--output_dir", out)
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith(f"instructglm eval: error: --adapter {llama_adapter} does not fit --model_name_or_path")
    assert not out.exists()


def test_adapter_flags_and_existing_outputs(run_eval, glm_base, number_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_eval("--model_name_or_path", glm_base, "--adapter", "none", "none", "--data", number_jsonl, "--output_dir", out) == 2
    assert "none is given twice" in one_error_line(capsys)
    assert run_eval("--model_name_or_path", glm_base, "--adapter", tmp_path / "nope", "--data", number_jsonl, "--output_dir", out) == 2
    assert "does not exist" in one_error_line(capsys)
    out.mkdir()
    (out / "metrics.json").write_text("{}", encoding="utf-8")
    assert run_eval("--model_name_or_path", glm_base, "--data", number_jsonl, "--output_dir", out) == 2
    assert "--overwrite true" in one_error_line(capsys)


def test_a_prompt_past_the_context_is_left_out_not_a_crash(run_eval, glm_base, number_rows, tmp_path, capsys):
    """A 1 MB prompt used to try to allocate its whole attention; it is now counted and located."""
    data = write_jsonl(tmp_path / "long.jsonl", [number_rows[0], {"context": "long text " * 20000, "target": "x"}, number_rows[1]])
    out = tmp_path / "out"
    assert run_eval("--model_name_or_path", glm_base, "--data", data, "--output_dir", out, "--max_new_tokens", "2") == 0
    assert "1 row(s) of" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["base"]
    assert metrics["rows"] == 2 and metrics["data"]["skipped_over_context"] == 1 and metrics["data"]["skipped_rows"] == [1]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["row"] for line in lines] == [0, 2]  # rows keep their index in --data


def test_data_among_the_outputs_is_never_overwritten(run_eval, glm_base, number_jsonl, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    data = out / "predictions.jsonl"
    data.write_bytes(number_jsonl.read_bytes())
    before = data.read_bytes()
    assert run_eval("--model_name_or_path", glm_base, "--data", data, "--output_dir", out, "--overwrite", "true") == 2
    assert "which this eval would overwrite" in one_error_line(capsys)
    assert data.read_bytes() == before


def test_outputs_are_one_run_or_none(run_eval, glm_base, number_jsonl, tmp_path, capsys, monkeypatch):
    """metrics.json goes last and the old one first: a failure half-way leaves no mixed set."""
    import os

    out = tmp_path / "out"
    assert run_eval("--model_name_or_path", glm_base, "--data", number_jsonl, "--output_dir", out, "--max_new_tokens", "2") == 0
    assert all(oct(os.stat(out / name).st_mode & 0o777) == oct(0o666 & ~_umask()) for name in ("metrics.json", "predictions.jsonl", "report.html"))

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device", str(out / "report.html"))

    monkeypatch.setattr("instructglm.eval.report.write_report", full_disk)
    assert run_eval("--model_name_or_path", glm_base, "--data", number_jsonl, "--output_dir", out, "--max_new_tokens", "2", "--max_rows", "3", "--overwrite", "true") == 2
    assert "No space left" in one_error_line(capsys)
    assert not (out / "metrics.json").exists() and not (out / "report.html").exists()


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_max_length_applies_without_max_new_tokens(run_eval, glm_base, number_jsonl, tmp_path):
    from instructglm.eval.evaluate import ARGUMENTS
    from instructglm.infer.generate import DEFAULT_NEW_TOKENS, BatchGenerationArguments
    from instructglm.infer.predict import ARGUMENTS as PREDICT_ARGUMENTS

    assert ARGUMENTS[-1] is PREDICT_ARGUMENTS[-1] is BatchGenerationArguments  # one rule for eval and predict
    assert BatchGenerationArguments().max_new_tokens == DEFAULT_NEW_TOKENS
    settings = BatchGenerationArguments(max_length=30)
    assert settings.max_new_tokens is None and settings.max_length == 30
    out = tmp_path / "out"
    assert run_eval("--model_name_or_path", glm_base, "--data", number_jsonl, "--output_dir", out, "--max_length", "30") == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["base"]
    assert metrics["generation"]["max_length"] == 30 and metrics["generation"]["max_new_tokens"] is None


def test_flag_values_and_templates(run_eval, glm_base, number_jsonl, tmp_path, capsys):
    assert run_eval("--model_name_or_path", glm_base, "--data", number_jsonl, "--output_dir", tmp_path / "o", "--seed", "-1") == 2
    assert "--seed must be between 0 and 2**32 - 1" in one_error_line(capsys)
    load_eval_rows(number_jsonl, template="chatglm")
    assert "--template 'chatglm' does not apply" in capsys.readouterr().err


def test_a_conversation_jsonl_is_prompted_in_the_familys_format_with_the_last_answer_as_reference(run_eval, chatglm3_base, tmp_path):
    from instructglm.infer.engine import generate_batch
    from instructglm.infer.prompts import prompter_for

    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "say hello"}, {"role": "assistant", "content": "hello world"}]},
        {"messages": [{"role": "user", "content": "How warm is Paris?"},
                      {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}],
         "tools": [{"name": "get_weather", "description": "The weather of a city"}]},
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows)
    loaded = load_eval_rows(data)
    assert loaded.format == "messages" and [r["target"] for r in loaded.rows] == [
        "hello world", '{"name": "get_weather", "arguments": {"city": "Paris"}}'  # a call is scored as its JSON
    ]
    out = tmp_path / "out"
    assert run_eval("--model_name_or_path", chatglm3_base, "--data", data, "--output_dir", out, "--max_new_tokens", 5) == 0
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["base"]
    assert (metrics["family"], metrics["prompt_template"], metrics["loss_rows"]) == ("chatglm3-6b", "messages", 2)
    model, tokenizer, _ = load_model(str(chatglm3_base), device="cpu")
    prompter = prompter_for(model, tokenizer)
    prompts = [prompter.prompt_ids(row["messages"][:-1], row.get("tools")) for row in rows]  # the reference left out
    assert prompts[0] == tokenizer.build_chat_input("say hello", [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}])["input_ids"][0].tolist()
    expected = [prompter.reply(c.text).content.strip() for c in generate_batch(model, tokenizer, prompts, GenerationArguments(max_new_tokens=5, do_sample=False), prompter)]
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [line["predictions"]["base"] for line in lines] == expected


def test_a_row_that_is_not_valid_text_is_left_out_counted_and_located(run_eval, glm_base, number_rows, tmp_path, capsys):
    """A lone surrogate escape ("\\ud83d") used to end the eval in a TypeError from the tokenizer, rerun after rerun."""
    data = tmp_path / "sur.jsonl"
    lone = json.dumps({"context": "lone \ud83d s", "target": "b"})  # json.dumps escapes it as \ud83d
    data.write_text(json.dumps(number_rows[0]) + "\n" + lone + "\n" + json.dumps(number_rows[1]) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    assert run_eval("--model_name_or_path", glm_base, "--data", data, "--output_dir", out, "--max_new_tokens", "2") == 0
    assert "not valid text" in capsys.readouterr().err
    metrics = json.loads((out / "metrics.json").read_text(encoding="utf-8"))["base"]
    assert metrics["rows"] == 2 and metrics["data"]["skipped_rows"] == [1]


def test_rows_without_a_target_say_what_is_missing(run_eval, glm_base, tmp_path, capsys):
    data = write_jsonl(tmp_path / "contexts.jsonl", [{"context": "a"}, {"context": "b"}])
    assert run_eval("--model_name_or_path", glm_base, "--data", data, "--output_dir", tmp_path / "out") == 2
    line = one_error_line(capsys)
    assert "contexts.jsonl:1 has a `context` but no string `target`" in line and "instructglm predict" in line
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [{"context": "a", "target": "b"}, {"context": "c"}])
    assert run_eval("--model_name_or_path", glm_base, "--data", mixed, "--output_dir", tmp_path / "out") == 2
    assert "mixed.jsonl:2: no string target" in one_error_line(capsys)


class _Marker:
    """A pickled object whose unpickling would create a file (weights_only=True must refuse it)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_malicious_adapter_is_refused_as_unsafe_not_as_a_mismatch(run_eval, glm_base, number_jsonl, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil" / "chatglm-lora.pt"
    evil.parent.mkdir()
    torch.save({"base_model.model.x.lora_A.weight": torch.zeros(2, 2), "evil": _Marker(marker)}, evil)
    code = run_eval("--model_name_or_path", glm_base, "--adapter", evil, "--data", number_jsonl, "--output_dir", tmp_path / "out")
    assert code == 2
    line = one_error_line(capsys)
    assert line.startswith(f"instructglm eval: error: --adapter {evil} was refused as unsafe") and "does not fit" not in line
    assert not marker.exists()
