"""instructglm predict: batched == single for greedy, resumable without duplicates, bad input named; rows with
a `messages` conversation are prompted in the family's format; `--max_length` bounds the answers."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from instructglm.infer.generate import GenerationArguments
from instructglm.infer.load import load_model
from instructglm.errors import BadValue
from instructglm.infer.predict import predict_meta_path, predict_rows, read_rows
from tests.infer.helpers import cli, cli_env

GREEDY = GenerationArguments(max_new_tokens=6, do_sample=False)
CONTEXTS = ["What is two plus three?", "hi", "Reverse the word cat: ", "你好，世界。", "The quick brown fox", "say hello", "一二三四五"]


@pytest.fixture(scope="module")
def tuned(llama_dir, llama_adapter):
    return load_model(str(llama_dir), adapter=str(llama_adapter), device="cpu")


@pytest.fixture
def rows(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"context": c, "target": f"t{i}"}, ensure_ascii=False) + "\n" for i, c in enumerate(CONTEXTS)), encoding="utf-8")
    return path


def _lines(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def each_family(family):
    name, base, adapter = family
    return load_model(str(base), adapter=str(adapter), device="cpu")


def test_batched_equals_one_at_a_time(each_family, rows, tmp_path):
    model, _, prompter = each_family
    data = read_rows(rows)
    predict_rows(model, prompter, data, tmp_path / "b3.jsonl", GREEDY, batch_size=3)
    predict_rows(model, prompter, data, tmp_path / "b1.jsonl", GREEDY, batch_size=1)
    batched, single = _lines(tmp_path / "b3.jsonl"), _lines(tmp_path / "b1.jsonl")
    assert batched == single
    assert [r["context"] for r in batched] == CONTEXTS and [r["target"] for r in batched] == [f"t{i}" for i in range(7)]
    assert all("prediction" in r for r in batched)


def test_interrupted_run_resumes_without_duplicates(tuned, rows, tmp_path, monkeypatch):
    from instructglm.infer.engine import BatchEngine

    model, _, prompter = tuned
    data = read_rows(rows)
    reference = tmp_path / "ref.jsonl"
    predict_rows(model, prompter, data, reference, GREEDY, batch_size=2)

    real, calls = BatchEngine.step, []

    def counting(self):
        calls.append(1)
        return real(self)

    monkeypatch.setattr(BatchEngine, "step", counting)
    predict_rows(model, prompter, data, tmp_path / "counted.jsonl", GREEDY, batch_size=2)
    steps, calls[:] = len(calls), []

    def failing(self):
        calls.append(1)
        if len(calls) == steps - 3:
            raise KeyboardInterrupt  # as a Ctrl-C during the last rows would
        return real(self)

    out = tmp_path / "out.jsonl"
    monkeypatch.setattr(BatchEngine, "step", failing)
    with pytest.raises(KeyboardInterrupt):
        predict_rows(model, prompter, data, out, GREEDY, batch_size=2)
    done = len(_lines(out))
    assert 0 < done < len(CONTEXTS)
    assert _lines(out) == _lines(reference)[:done]
    monkeypatch.setattr(BatchEngine, "step", real)
    assert predict_rows(model, prompter, data, out, GREEDY, batch_size=2).written == len(CONTEXTS) - done
    assert _lines(out) == _lines(reference)


def test_predictions_are_the_one_at_a_time_answers(each_family, rows, tmp_path):
    """Each `context` is prompted as tokenize prompted it (a user message for a role-token family) and the
    answers, read by the family, are `generate`'s."""
    from tests.infer.helpers import reference_completion

    model, tokenizer, prompter = each_family
    predict_rows(model, prompter, read_rows(rows), tmp_path / "out.jsonl", GREEDY, batch_size=3)
    expected = []
    for context in CONTEXTS:
        ids = prompter.family.context_prompt_ids(tokenizer, context)
        expected.append(prompter.reply(reference_completion(model, tokenizer, ids, GREEDY.max_new_tokens, prompter).text).content)
    assert [r["prediction"] for r in _lines(tmp_path / "out.jsonl")] == expected


def test_sampled_rows_do_not_depend_on_batch_size_or_resume(tuned, rows, tmp_path):
    model, _, prompter = tuned
    data = read_rows(rows)
    sampled = GenerationArguments(max_new_tokens=8, do_sample=True, temperature=1.0, top_p=0.9)
    predict_rows(model, prompter, data, tmp_path / "b3.jsonl", sampled, batch_size=3, seed=5)
    predict_rows(model, prompter, data[:2], tmp_path / "b1.jsonl", sampled, batch_size=1, seed=5)
    predict_rows(model, prompter, data, tmp_path / "b1.jsonl", sampled, batch_size=1, seed=5)  # resumes at row 3
    assert _lines(tmp_path / "b3.jsonl") == _lines(tmp_path / "b1.jsonl")
    predict_rows(model, prompter, data, tmp_path / "other.jsonl", sampled, batch_size=3, seed=6)
    assert _lines(tmp_path / "other.jsonl") != _lines(tmp_path / "b3.jsonl")


def test_partial_last_line_is_dropped_and_redone(tuned, rows, tmp_path):
    model, _, prompter = tuned
    data = read_rows(rows)
    reference = tmp_path / "ref.jsonl"
    predict_rows(model, prompter, data, reference, GREEDY, batch_size=4)
    text = reference.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    out = tmp_path / "out.jsonl"
    out.write_text("".join(lines[:3]) + lines[3][:10], encoding="utf-8")  # a write cut off mid-line
    shutil.copyfile(predict_meta_path(reference), predict_meta_path(out))  # the interrupted run's sidecar
    assert predict_rows(model, prompter, data, out, GREEDY, batch_size=4).written == 4
    assert out.read_text(encoding="utf-8") == text


def test_output_of_another_input_is_refused(tuned, rows, tmp_path):
    model, _, prompter = tuned
    out = tmp_path / "out.jsonl"
    predict_rows(model, prompter, read_rows(rows)[:1], out, GREEDY)  # this run's sidecar, then another input's line
    out.write_text(json.dumps({"context": "something else", "prediction": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 1 .*--overwrite true"):
        predict_rows(model, prompter, read_rows(rows), out, GREEDY)
    assert predict_rows(model, prompter, read_rows(rows), out, GREEDY, overwrite=True).written == len(CONTEXTS)


def test_bad_rows_are_all_named(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"context": "ok"}\nnot json\n{"target": "no context"}\n')
    with pytest.raises(ValueError, match=r"2 bad row\(s\): .*bad.jsonl:2: not JSON.*bad.jsonl:3: no string field `context`"):
        read_rows(path)


def test_cli_killed_mid_run_then_rerun_gives_one_line_per_row(llama_dir, llama_adapter, tmp_path):
    inp = tmp_path / "in.jsonl"
    n = 40
    inp.write_text("".join(json.dumps({"context": f"{CONTEXTS[i % 7]} {i}"}, ensure_ascii=False) + "\n" for i in range(n)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    args = cli("predict", "--model_name_or_path", str(llama_dir), "--adapter", str(llama_adapter), "--device", "cpu",
               "--input", str(inp), "--output", str(out), "--batch_size", "1", "--max_new_tokens", "24")
    proc = subprocess.Popen(args, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if out.exists() and out.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL) if killed else None
    proc.wait(timeout=30)
    done_before = out.read_bytes().count(b"\n")
    result = subprocess.run(args, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _lines(out)
    assert [r["context"] for r in rows] == [f"{CONTEXTS[i % 7]} {i}" for i in range(n)]
    assert f"{n - done_before} row(s) written now" in result.stdout
    assert killed and done_before < n, "the first run finished before it could be killed; raise n"


# --- issue 8, item 8 ----------------------------------------------------------------------------


def test_rows_with_unicode_line_separators_resume(tuned, tmp_path):
    """json.dumps(ensure_ascii=False) writes U+2028/U+2029/U+0085 raw; str.splitlines broke lines at them."""
    model, _, prompter = tuned
    contexts = ["one\u2028two", "three\u2029four", "five\u0085six", "plain"]
    data = [{"context": c} for c in contexts]
    out = tmp_path / "out.jsonl"
    assert predict_rows(model, prompter, data[:2], out, GREEDY, batch_size=2).written == 2
    assert predict_rows(model, prompter, data, out, GREEDY, batch_size=2).written == 2  # resumes after row 2
    assert predict_rows(model, prompter, data, out, GREEDY, batch_size=2).written == 0  # complete: nothing to do
    assert [r["context"] for r in map(json.loads, out.read_text(encoding="utf-8").split("\n")[:-1])] == contexts


def test_input_is_read_with_the_one_jsonl_reader(tmp_path):
    """A JSON array and JSON Lines with a BOM and CRLF line ends are read alike (data.io.iter_json_rows)."""
    array = tmp_path / "rows.json"
    array.write_text(json.dumps([{"context": "a"}, {"context": "b\u2028c"}]), encoding="utf-8")
    lines = tmp_path / "rows.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + '{"context": "a"}\r\n{"context": "b\u2028c"}\r\n'.encode())
    assert read_rows(array) == read_rows(lines) == [{"context": "a"}, {"context": "b\u2028c"}]


def _run_cli(*args):
    """`instructglm predict ...` in this process (the CLI's own code path): (exit code, stdout, stderr)."""
    import contextlib
    import io

    from instructglm.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_output_equal_to_input_is_refused_before_anything_is_deleted(llama_dir, rows, tmp_path):
    original = rows.read_bytes()
    link = tmp_path / "link.jsonl"
    link.symlink_to(rows)
    hard = tmp_path / "hard.jsonl"
    hard.hardlink_to(rows)
    for output in (rows, tmp_path / "." / "in.jsonl", link, hard):
        for overwrite in ("false", "true"):
            code, _, err = _run_cli("predict", "--model_name_or_path", str(llama_dir), "--device", "cpu", "--input", str(rows),
                                    "--output", str(output), "--overwrite", overwrite)
            assert code == 2 and err.count("\n") == 1 and "is the --input file" in err, err
            assert rows.read_bytes() == original


def test_prompt_longer_than_the_context_is_skipped_not_generated(tuned, tmp_path, monkeypatch):
    model, tokenizer, prompter = tuned  # the tiny Llama's context is 256 tokens
    huge = "hello " * 200_000  # 1.2 MB: generating it would try to allocate the attention of 200k tokens
    data = [{"context": "hi"}, {"context": huge}, {"context": "hello " * 253}, {"context": "say hello"}]
    from instructglm.infer.engine import BatchEngine, encode_prompt
    from instructglm.infer.engine import generate_batch

    generated = []
    real = BatchEngine.submit
    monkeypatch.setattr(BatchEngine, "submit", lambda self, request, *a: generated.append(list(request.prompt_ids)) or real(self, request, *a))
    out = tmp_path / "out.jsonl"
    result = predict_rows(model, prompter, data, out, GREEDY, batch_size=2)
    assert result == (4, 2)
    assert generated == [encode_prompt(tokenizer, "hi"), encode_prompt(tokenizer, "say hello")]  # the long ones never reached the engine
    lines = _lines(out)
    assert [r["context"] for r in lines] == [r["context"] for r in data]
    assert lines[1]["prediction"] is None and "200001 prompt tokens + --max_new_tokens 6" in lines[1]["skipped"]
    assert "context of 256 tokens" in lines[1]["skipped"]
    assert lines[2]["prediction"] is None and "skipped" in lines[2]  # 254 + 6 > 256
    assert lines[0]["prediction"] == generate_batch(model, tokenizer, ["hi"], GREEDY, prompter)[0].text and "skipped" not in lines[0]
    assert predict_rows(model, prompter, data, out, GREEDY, batch_size=2) == (0, 0)  # a rerun resumes past them
    # with --max_length instead of --max_new_tokens, a prompt that leaves no room is skipped the same way
    settings = GenerationArguments(max_length=8, do_sample=False)
    out2 = tmp_path / "out2.jsonl"
    assert predict_rows(model, prompter, [{"context": "hi"}, {"context": "hello " * 10}], out2, settings).skipped == 1
    assert "under --max_length 8" in _lines(out2)[1]["skipped"]


def test_cli_summary_counts_skipped_rows(llama_dir, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"context": "hi"}) + "\n" + json.dumps({"context": "hello " * 300}) + "\n", encoding="utf-8")
    code, out, _ = _run_cli("predict", "--model_name_or_path", str(llama_dir), "--device", "cpu", "--input", str(inp),
                            "--output", str(tmp_path / "out.jsonl"), "--max_new_tokens", "4")
    assert code == 0 and "2 row(s) written now (1 skipped, prompt too long" in out, out


# --- conversations, and --max_length ------------------------------------------------------------

TOOL_ROW = {
    "messages": [
        {"role": "system", "content": "You are a weather bot."},
        {"role": "user", "content": "How warm is Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]},
        {"role": "observation", "name": "get_weather", "content": '{"temperature": 21}'},
        {"role": "assistant", "content": "It is 21 °C in Paris."},
    ],
    "tools": [{"name": "get_weather", "description": "The weather of a city", "parameters": {"type": "object"}}],
}
CHAT_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "say hello"},
                         {"role": "assistant", "content": "hello world"}]}


@pytest.mark.parametrize("name", ["chatglm3", "glm4", "chatglm2"])
def test_message_rows_are_prompted_as_conversations_without_their_reference(name, checkpoints, tmp_path):
    from instructglm.data.messages import conversation_of
    from tests.infer.helpers import reference_completion

    base, adapter = checkpoints(name)
    model, tokenizer, prompter = load_model(str(base), adapter=str(adapter), device="cpu")
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in (TOOL_ROW, CHAT_ROW)), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert predict_rows(model, prompter, read_rows(path), out, GREEDY, batch_size=2).written == 2
    lines = _lines(out)
    assert [line["messages"] for line in lines] == [TOOL_ROW["messages"], CHAT_ROW["messages"]]
    if name == "chatglm2":  # a text family cannot show the tool row: skipped, named; the chat row is its rounds
        assert lines[0]["prediction"] is None and "chatglm2-6b model family cannot use tools" in lines[0]["skipped"]
        rows = [CHAT_ROW]
    else:
        rows = [TOOL_ROW, CHAT_ROW]
    for row in rows:
        conversation = conversation_of(row["messages"][:-1], row.get("tools"))  # the last assistant message is the reference
        ids = prompter.prompt_ids(conversation.messages, conversation.tools)
        expected = prompter.reply(reference_completion(model, tokenizer, ids, GREEDY.max_new_tokens, prompter).text)
        line = lines[0] if row is TOOL_ROW else lines[1]
        assert line["prediction"] == expected.content
    assert predict_rows(model, prompter, read_rows(path), out, GREEDY).written == 0  # resumes: messages rows match too


def test_max_length_bounds_the_answers_and_max_new_tokens_defaults_to_256(llama_dir, tmp_path):
    from instructglm.infer.generate import BatchGenerationArguments

    assert BatchGenerationArguments().max_new_tokens == 256
    assert BatchGenerationArguments(max_length=20).max_new_tokens is None  # --max_length alone decides
    inp = tmp_path / "in.jsonl"
    inp.write_text(json.dumps({"context": "hi"}) + "\n" + json.dumps({"context": "What is two plus three?"}) + "\n", encoding="utf-8")
    code, _, err = _run_cli("predict", "--model_name_or_path", str(llama_dir), "--device", "cpu", "--input", str(inp),
                            "--output", str(tmp_path / "out.jsonl"), "--max_length", "12")
    assert code == 0, err
    from instructglm.infer.engine import generate_batch

    model, tokenizer, prompter = load_model(str(llama_dir), device="cpu")
    prompts = [prompter.context_ids(line["context"]) for line in _lines(tmp_path / "out.jsonl")]
    bounded = generate_batch(model, tokenizer, prompts, GenerationArguments(max_length=12, do_sample=False), prompter)
    unbounded = generate_batch(model, tokenizer, prompts, BatchGenerationArguments(), prompter)
    assert [line["prediction"] for line in _lines(tmp_path / "out.jsonl")] == [c.text for c in bounded]
    assert all(len(ids) + c.completion_tokens <= 12 for ids, c in zip(prompts, bounded))
    assert [c.text for c in bounded] != [c.text for c in unbounded]  # the bound took effect


# --- the hostile tester's findings (B1, B2, B5 and the messages) ---------------------------------------------


@pytest.mark.parametrize(
    "foreign",
    [
        '{\n  "r": 8,\n  "lora_alpha": 16\n}',  # an adapter_config.json, no final newline
        '{"context": "hi", "prediction": "x"}',  # one unterminated line that even looks like a row
        "".join(json.dumps({"n": i}) + "\n" for i in range(44)) + '{"half',  # more rows than the input, a half line
    ],
    ids=["json-document", "one-unterminated-line", "many-rows"],
)
def test_an_output_predict_did_not_write_is_never_modified(tuned, rows, tmp_path, foreign):
    model, _, prompter = tuned
    out = tmp_path / "adapter_config.json"
    out.write_text(foreign, encoding="utf-8")
    with pytest.raises(BadValue, match="--overwrite true"):
        predict_rows(model, prompter, read_rows(rows), out, GREEDY)
    assert out.read_text(encoding="utf-8") == foreign  # not one byte cut off
    assert not predict_meta_path(out).exists()


def test_with_its_sidecar_a_bad_line_still_refuses_before_the_partial_line_is_cut(tuned, rows, tmp_path):
    model, _, prompter = tuned
    out = tmp_path / "out.jsonl"
    predict_rows(model, prompter, read_rows(rows)[:2], out, GREEDY)
    broken = "not json\n" + out.read_text(encoding="utf-8") + '{"half'
    out.write_text(broken, encoding="utf-8")
    with pytest.raises(BadValue, match="line 1 is not JSON"):
        predict_rows(model, prompter, read_rows(rows), out, GREEDY)
    assert out.read_text(encoding="utf-8") == broken


def test_a_directory_as_output_is_one_user_error(tuned, rows, tmp_path):
    model, _, prompter = tuned
    with pytest.raises(BadValue, match="is a directory"):
        predict_rows(model, prompter, read_rows(rows), tmp_path, GREEDY)


def test_a_lone_surrogate_row_is_written_as_skipped_and_resumed_past(tuned, tmp_path):
    model, _, prompter = tuned
    path = tmp_path / "sur.jsonl"
    path.write_bytes(b'{"context":"ok","target":"a"}\n{"context":"lone \\ud83d s","target":"b"}\n{"context":"hi"}\n')
    data = read_rows(path)
    assert data[1]["context"] == "lone \ud83d s"
    out = tmp_path / "out.jsonl"
    assert predict_rows(model, prompter, data, out, GREEDY) == (3, 1)
    written = _lines(out)
    assert written[1]["context"] == "lone \ud83d s" and written[1]["prediction"] is None
    assert "not valid text" in written[1]["skipped"] and "\\ud83d" in written[1]["skipped"]
    assert written[0]["prediction"] is not None and written[2]["prediction"] is not None
    assert predict_rows(model, prompter, data, out, GREEDY) == (0, 0)  # the rerun resumes past it


def test_a_resume_with_other_settings_or_model_is_refused(tuned, llama_dir, rows, tmp_path):
    model, _, prompter = tuned
    data = read_rows(rows)
    out = tmp_path / "out.jsonl"
    tuned_run = {"model": str(llama_dir), "adapter": "run-a"}
    predict_rows(model, prompter, data[:3], out, GREEDY, run=tuned_run)
    before = out.read_bytes()
    with pytest.raises(BadValue, match=r"generation\.max_new_tokens 6 -> 5"):
        predict_rows(model, prompter, data, out, GenerationArguments(max_new_tokens=5, do_sample=False), run=tuned_run)
    with pytest.raises(BadValue, match=r"adapter 'run-a' -> None"):
        predict_rows(model, prompter, data, out, GREEDY, run={"model": str(llama_dir), "adapter": None})
    assert out.read_bytes() == before
    assert predict_rows(model, prompter, data, out, GREEDY, run=tuned_run).written == len(CONTEXTS) - 3
    recorded = json.loads(predict_meta_path(out).read_text(encoding="utf-8"))
    assert recorded["settings"]["adapter"] == "run-a" and recorded["settings"]["generation.max_new_tokens"] == 6
    assert recorded["input"]["rows"] == 3  # the input of the run that started the file
    other = GenerationArguments(max_new_tokens=5, do_sample=False)
    assert predict_rows(model, prompter, data, out, other, overwrite=True, run=tuned_run).written == len(CONTEXTS)


def test_max_new_tokens_over_the_whole_context_is_refused_up_front(tuned, rows, tmp_path):
    from instructglm.infer.generate import context_limit

    model, _, prompter = tuned
    limit = context_limit(model)
    out = tmp_path / "out.jsonl"
    with pytest.raises(BadValue, match=f"--max_new_tokens {limit} alone fills the model's context of {limit}"):
        predict_rows(model, prompter, read_rows(rows), out, GenerationArguments(max_new_tokens=limit, do_sample=False))
    assert not out.exists() and not predict_meta_path(out).exists()


def test_a_full_disk_is_named_with_the_output(tuned, rows, tmp_path, monkeypatch):
    import errno

    model, _, prompter = tuned
    out = tmp_path / "out.jsonl"
    real = os.fsync

    def full(fd):
        if os.path.exists(out) and os.path.samefile(f"/proc/self/fd/{fd}", out):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError) as raised:
        predict_rows(model, prompter, read_rows(rows), out, GREEDY)
    assert raised.value.errno == errno.ENOSPC and str(out) in str(raised.value)


def test_an_unwritable_output_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from instructglm.cli import main
    from instructglm.infer import predict

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(predict, "load_from_args", no_loading)
    monkeypatch.setattr(predict, "_read_only_fs", lambda folder: True)  # as on a read-only mount
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"context": "hi"}\n', encoding="utf-8")
    out = tmp_path / "ro" / "out.jsonl"
    argv = ["predict", "--model_name_or_path", str(tmp_path), "--input", str(inp), "--output", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("instructglm predict: error: --output") and "not writable" in err and err.count("\n") == 1


def test_a_row_without_context_names_what_is_missing(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"target": "x", "id": 3}\n', encoding="utf-8")
    with pytest.raises(BadValue, match=r":1: no string field `context`.*its fields: target, id"):
        read_rows(path)
