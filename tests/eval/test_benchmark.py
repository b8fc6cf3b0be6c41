"""The multiple-choice scorer on the tiny self-written C-Eval / CMMLU / MMLU samples in assets/benchmarks."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from instructglm.errors import BadValue, MissingFile
from instructglm.eval.benchmark import (
    CHOICES,
    build_prompt,
    detect_layout,
    evaluate_benchmark,
    format_benchmark_table,
    load_benchmark,
    score_benchmark,
)
from instructglm.eval.perplexity import continuation_logprobs, next_token_logprobs
from instructglm.infer.load import load_model

ASSETS = Path(__file__).parent / "assets" / "benchmarks"


@pytest.mark.parametrize(
    "path, layout, split, subjects",
    [
        ("ceval", "ceval", "val", [("arithmetic", "arithmetic", 5, 3), ("geography", "geography", 5, 2)]),
        ("cmmlu", "cmmlu", "test", [("arithmetic", "算术", 5, 4)]),  # title from its subject_mapping.json
        ("mmlu", "mmlu", "test", [("elementary_arithmetic", "elementary arithmetic", 5, 3)]),
        ("mmlu/data", "mmlu", "test", [("elementary_arithmetic", "elementary arithmetic", 5, 3)]),
    ],
)
def test_layouts_are_detected_and_read(path, layout, split, subjects):
    benchmark = load_benchmark(ASSETS / path)
    assert (benchmark.layout, benchmark.split) == (layout, split)
    assert [(s.name, s.title, len(s.dev), len(s.questions)) for s in benchmark.subjects] == subjects


def test_prompts_are_the_official_formats():
    ceval = load_benchmark(ASSETS / "ceval").subjects[0]
    assert build_prompt("ceval", ceval.title, ceval.dev[:1], ceval.questions[0]) == (
        "以下是中国关于arithmetic考试的单项选择题，请选出其中的正确答案。\n\n"
        "1加1等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：B\n\n"
        "4加4等于几？\nA. 7\nB. 8\nC. 9\nD. 6\n答案："
    )
    # C-Eval's zero-shot prompt is the question alone
    assert build_prompt("ceval", ceval.title, [], ceval.questions[0]) == "4加4等于几？\nA. 7\nB. 8\nC. 9\nD. 6\n答案："
    cmmlu = load_benchmark(ASSETS / "cmmlu").subjects[0]
    assert build_prompt("cmmlu", cmmlu.title, [], cmmlu.questions[0]) == (
        "以下是关于算术的单项选择题，请直接给出正确答案的选项。\n\n题目：4加4等于几\nA. 7\nB. 8\nC. 9\nD. 6\n答案是："
    )
    mmlu = load_benchmark(ASSETS / "mmlu").subjects[0]
    assert build_prompt("mmlu", mmlu.title, mmlu.dev[:1], mmlu.questions[0]) == (
        "The following are multiple choice questions (with answers) about  elementary arithmetic.\n\n"
        "What is 1 + 1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
        "What is 4 + 4?\nA. 7\nB. 8\nC. 9\nD. 6\nAnswer:"
    )


class AlwaysLetter(torch.nn.Module):
    """A 'model' whose next-token logits always favour one token id: its accuracy can be counted by hand."""

    def __init__(self, vocab_size: int, favourite: int):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab_size))
        with torch.no_grad():
            self.bias[favourite] = 5.0
        self.config = SimpleNamespace(model_type="chatglm", max_sequence_length=2048)

    def forward(self, input_ids, attention_mask=None, use_cache=None):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


def test_accuracy_by_hand_with_a_model_that_always_answers_b(glm_base):
    _, tokenizer, _ = load_model(str(glm_base), device="cpu")
    (b_id,) = tokenizer("B", add_special_tokens=False)["input_ids"]
    result = score_benchmark(AlwaysLetter(len(tokenizer), b_id), tokenizer, load_benchmark(ASSETS / "ceval"), shots=5)
    # answers: arithmetic B, A, D; geography B, A
    assert result["subjects"]["arithmetic"] == {"accuracy": pytest.approx(100 / 3), "correct": 1, "questions": 3}
    assert result["subjects"]["geography"] == {"accuracy": 50.0, "correct": 1, "questions": 2}
    assert result["average"] == pytest.approx((100 / 3 + 50) / 2)
    assert result["overall"] == pytest.approx(40.0)
    assert result["predictions"] == {"arithmetic": ["B"] * 3, "geography": ["B"] * 2}


@pytest.mark.parametrize("layout", ["ceval", "cmmlu", "mmlu"])
def test_scorer_matches_a_direct_computation(layout, llama_base):
    """Each question's letter = argmax over A-D of log p(letter | prompt) from one plain forward pass."""
    model, tokenizer, _ = load_model(str(llama_base), device="cpu", dtype="float32")
    benchmark = load_benchmark(ASSETS / layout)
    result = score_benchmark(model, tokenizer, benchmark, shots=2, batch_size=3)
    letter_ids = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in CHOICES]
    for subject in benchmark.subjects:
        expected = []
        for question in subject.questions:
            ids = tokenizer(build_prompt(layout, subject.title, subject.dev[:2], question))["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            expected.append(CHOICES[max(range(4), key=lambda i: logprobs[letter_ids[i][0]].item())])
        correct = sum(p == q.answer for p, q in zip(expected, subject.questions))
        assert result["predictions"][subject.name] == expected
        assert result["subjects"][subject.name]["accuracy"] == pytest.approx(100 * correct / len(subject.questions))


def test_one_pass_and_per_letter_scoring_agree(glm_base):
    model, tokenizer, _ = load_model(str(glm_base), device="cpu")
    prompt = tokenizer("1加1等于几？\nA. 1\nB. 2\nC. 3\nD. 4\n答案：")["input_ids"]  # ends in [gMASK] <sop>
    letters = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in CHOICES]
    (together,) = next_token_logprobs(model, tokenizer, [{"input_ids": prompt + letters[0], "seq_len": len(prompt)}], [[ids[0] for ids in letters]])
    one_by_one = continuation_logprobs(model, tokenizer, [{"input_ids": prompt + ids, "seq_len": len(prompt)} for ids in letters])
    assert together == pytest.approx(one_by_one, abs=1e-5)


def test_shots_that_do_not_fit_are_dropped_and_counted(glm_base):
    model, tokenizer, _ = load_model(str(glm_base), device="cpu")
    benchmark = load_benchmark(ASSETS / "ceval")
    result = evaluate_benchmark(model, tokenizer, benchmark, shots=(0, 5), max_seq_length=120)
    assert result["0-shot"]["shots_dropped"] == 0
    assert 0 < result["5-shot"]["shots_dropped"] <= result["5-shot"]["questions"] == 5
    table = format_benchmark_table({"base": result, "other": result})
    assert "base 0-shot" in table and "other 5-shot" in table and "geography" in table and "average" in table
    # no question fits 20 tokens even without shots: every one is left out, counted and located, none scored
    none_fit = score_benchmark(model, tokenizer, benchmark, shots=0, max_seq_length=20)
    assert none_fit["questions"] == 0 and none_fit["questions_too_long"] == 5 and none_fit["average"] is None
    assert none_fit["too_long"][0].startswith(str(ASSETS / "ceval" / "val"))


def test_layout_errors_name_the_file_and_the_fix(tmp_path):
    with pytest.raises(MissingFile, match="no such directory"):
        detect_layout(tmp_path / "nope")
    with pytest.raises(MissingFile, match="no dev/"):
        detect_layout(tmp_path)
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "x_dev.csv").write_text("q,a,b\n", encoding="utf-8")
    with pytest.raises(BadValue, match=r"x_dev.csv starts with \['q', 'a', 'b'\]"):
        detect_layout(tmp_path)
    with pytest.raises(BadValue, match=r"test split has no answers.*arithmetic_test.csv:2: no answer"):
        load_benchmark(ASSETS / "ceval", split="test")
    with pytest.raises(MissingFile, match=r"subject\(s\) \['physics'\] not in"):
        load_benchmark(ASSETS / "ceval", subjects=["physics"])


def test_a_gbk_file_and_an_empty_subject(tmp_path):
    import shutil

    root = tmp_path / "cmmlu"
    shutil.copytree(ASSETS / "cmmlu", root)
    first = sorted((root / "test").glob("*.csv"))[0]
    first.write_bytes(first.read_text(encoding="utf-8").encode("gbk"))
    with pytest.raises(BadValue, match=rf"{first.name}: not UTF-8 .*re-save the file as UTF-8"):
        load_benchmark(root)
    result = {"benchmark": "cmmlu", "split": "test", "0-shot": {
        "average": 50.0, "overall": 50.0, "shots_dropped": 0, "short_dev": {},
        "subjects": {"empty": {"accuracy": None, "correct": 0, "questions": 0}, "full": {"accuracy": 50.0, "correct": 1, "questions": 2}}}}
    table = format_benchmark_table({"base": result})
    assert "empty" in table and table.splitlines()[3].split()[-1] == "-"


def test_a_role_token_family_answers_inside_its_chat_format(chatglm3_base):
    """ChatGLM3: the letter is the assistant's message after the question as a user message — `<|assistant|>`, its
    empty metadata line, then the letter — scored against a direct forward over THUDM's build_chat_input ids."""
    model, tokenizer, _ = load_model(str(chatglm3_base), device="cpu", dtype="float32")
    benchmark = load_benchmark(ASSETS / "ceval")
    result = score_benchmark(model, tokenizer, benchmark, shots=1, batch_size=3)
    for subject in benchmark.subjects:
        expected = []
        for question in subject.questions:
            prompt = tokenizer.build_chat_input(build_prompt("ceval", subject.title, subject.dev[:1], question))["input_ids"][0].tolist()
            answers = [prompt[:-1] + tokenizer.build_single_message("assistant", "", letter) for letter in CHOICES]
            # build_chat_input ends at <|assistant|>; the answer opens with the empty metadata line "\n"
            header = len(prompt) - 1 + len(tokenizer.build_single_message("assistant", "", ""))
            assert all(ids[:header] == answers[0][:header] for ids in answers)
            scores = []
            for ids in answers:
                with torch.no_grad():
                    logprobs = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), dim=-1)
                scores.append(sum(logprobs[t - 1, ids[t]].item() for t in range(header, len(ids))))
            expected.append(CHOICES[max(range(4), key=lambda i: scores[i])])
        assert result["predictions"][subject.name] == expected


def _ceval_copy(tmp_path: Path) -> Path:
    import shutil

    root = tmp_path / "ceval"
    shutil.copytree(ASSETS / "ceval", root)
    return root


def test_a_subject_without_questions_is_left_out_of_the_average_and_none_at_all_is_none(glm_base, tmp_path):
    _, tokenizer, _ = load_model(str(glm_base), device="cpu")
    (b_id,) = tokenizer("B", add_special_tokens=False)["input_ids"]
    model = AlwaysLetter(len(tokenizer), b_id)
    root = _ceval_copy(tmp_path)
    (root / "val" / "geography_val.csv").write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
    result = score_benchmark(model, tokenizer, load_benchmark(root), shots=0)
    assert result["subjects"]["geography"]["accuracy"] is None
    assert result["average"] == pytest.approx(100 / 3) and result["overall"] == pytest.approx(100 / 3)
    (root / "val" / "arithmetic_val.csv").write_text("id,question,A,B,C,D,answer\n", encoding="utf-8")
    empty = score_benchmark(model, tokenizer, load_benchmark(root), shots=0)
    assert empty["questions"] == 0 and empty["average"] is None and empty["overall"] is None
    table = format_benchmark_table({"base": {"benchmark": "ceval", "split": "val", "0-shot": empty}})
    assert [line.split()[-1] for line in table.splitlines() if line.startswith(("average", "overall"))] == ["-", "-"]


def test_a_question_too_long_for_any_prompt_is_left_out_counted_and_located(glm_base, tmp_path, capsys):
    model, tokenizer, _ = load_model(str(glm_base), device="cpu")
    root = _ceval_copy(tmp_path)
    path = root / "val" / "geography_val.csv"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[1] = "0," + "很长的问题" * 20000 + ",西藏,新疆,内蒙古,青海,B"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = score_benchmark(model, tokenizer, load_benchmark(root), shots=0, max_seq_length=256)
    assert result["questions"] == 4 and result["questions_too_long"] == 1
    assert result["subjects"]["geography"]["questions"] == 1
    assert result["too_long"] == [f"{path}:2 ({result['too_long'][0].split('(')[1]}"]
    assert "1 benchmark question(s) left out" in capsys.readouterr().err
