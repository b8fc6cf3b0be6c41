"""Multiple-choice benchmarks in the C-Eval, CMMLU and MMLU layouts, scored by log-likelihood.

A benchmark is a local directory of per-subject CSV files (question, four options A-D, the answer
letter) with a `dev` split whose first rows are the few-shot examples. The three layouts, as
released, are told apart by their headers:

| layout | files                                         | header                                  | scored split |
|--------|-----------------------------------------------|-----------------------------------------|--------------|
| C-Eval | `dev/<s>_dev.csv`, `val/<s>_val.csv`, `test/` | `id,question,A,B,C,D,answer[,explanation]` | val (test answers are hidden) |
| CMMLU  | `dev/<s>.csv`, `test/<s>.csv`                 | `,Question,A,B,C,D,Answer` (pandas index) | test |
| MMLU   | `data/dev/<s>_dev.csv`, `data/test/<s>_test.csv`, `data/val/` | none: question,A,B,C,D,answer | test |

The directory given may be the layout's root or (MMLU) its `data/` folder.

Prompts are the ones each benchmark's own evaluation code builds (answer-only, no chain of
thought), with the first k dev rows as shots:

- C-Eval (hkust-nlp/ceval, `code/evaluator_series/evaluators/llama.py`, the answer-only path that
  reads the letter logits): with shots, `以下是中国关于{subject}考试的单项选择题，请选出其中的正确答案。\\n\\n`
  then per shot `{question}\\nA. {A}\\nB. {B}\\nC. {C}\\nD. {D}\\n答案：{answer}\\n\\n`; the question
  ends at `答案：`. `{subject}` is the file's subject name, as `eval.py` passes it.
- CMMLU (haonan-li/CMMLU, `src/mp_utils.py`): always `以下是关于{subject}的单项选择题，请直接给出正确答案的选项。\\n\\n`,
  per shot `题目：{question}\\nA. …\\nD. {D}\\n答案是：{answer}\\n\\n`, the question ends at `答案是：`.
- MMLU (hendrycks/test, `evaluate_hf.py`): always `The following are multiple choice questions
  (with answers) about {subject}.\\n\\n` where `{subject}` is ` abstract algebra` (each `_`-part
  after a space, so the sentence has the original's double space), per shot
  `{question}\\nA. …\\nD. {D}\\nAnswer: {answer}\\n\\n`, the question ends at `Answer:`.

A `subject_mapping.json` in the directory (C-Eval's format, `{subject: [English, Chinese, ...]}`,
or `{subject: name}`) renames subjects: the Chinese name for C-Eval and CMMLU prompts (CMMLU's
code uses its Chinese names), the English one for MMLU.

Scoring: each option letter is an answer to the prompt, encoded as training encodes a target in the
model's family, and the letter with the highest log-likelihood is the prediction, as those scripts
take the argmax of the next-token logits of `A`..`D`. For a text family (ChatGLM-6B, ChatGLM2-6B, a
plain causal LM) that is the raw prompt with the tokenizer's special tokens around it (ChatGLM-6B sees
`[gMASK] <sop>` before the letter) and the letter's ids; for a role-token family (ChatGLM3-6B, GLM-4,
a chat template) the conversation `[user: prompt, assistant: letter]` in its format, the letter being
what differs between the four conversations (ChatGLM3's answer follows `<|assistant|>` and its empty
metadata line). When every letter is one token (the usual case) one forward pass per question scores
all four; otherwise each letter's tokens are summed. Base and adapters see the same prompts. A prompt
whose shots do not fit the model's context drops shots from the end until it does (as hendrycks'
script does); such questions are counted. A question that does not fit even with no shots is left out
of the scores, counted (`questions_too_long`) and located (`too_long`), with a warning.

Accuracy is in percent, per subject; `average` is the mean over the subjects with questions (CMMLU's
and C-Eval's summary), `overall` the fraction of all questions (MMLU's weighted accuracy); both are
None (`-`) when no question was scored.

Why not EleutherAI's lm-evaluation-harness: lm-eval 0.4.13 installs beside transformers 5.24 and
peft 0.21, and its `HFLM(pretrained=model, tokenizer=...)` accepts our model objects, plain and
peft, and matches this scorer on a Llama. But it encodes context + continuation without the
tokenizer's special tokens, so ChatGLM-6B gets no `[gMASK] <sop>`: the answer letter then sits
inside the bidirectional prefix, where the logits that "predict" it already see it (checked: they
change with the letter), and the numbers differ from the model's real layout. Its C-Eval / CMMLU /
MMLU tasks also load their data from the hub. So the scorer is native, on training's row layout.
"""

from __future__ import annotations

import sys

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from instructglm.errors import BadValue, MissingFile

CHOICES = ("A", "B", "C", "D")
LAYOUTS = ("ceval", "cmmlu", "mmlu")
DEFAULT_SPLIT = {"ceval": "val", "cmmlu": "test", "mmlu": "test"}
SUBJECT_MAPPING = "subject_mapping.json"


@dataclass(frozen=True)
class Question:
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D"
    location: str  # file:line, for messages


@dataclass
class Subject:
    name: str  # the file's subject (`computer_network`)
    title: str  # as the prompt names it
    dev: list[Question]
    questions: list[Question]


@dataclass
class Benchmark:
    layout: str  # "ceval" | "cmmlu" | "mmlu"
    root: Path
    split: str
    subjects: list[Subject] = field(default_factory=list)

    @property
    def questions(self) -> int:
        return sum(len(s.questions) for s in self.subjects)


# ---------------------------------------------------------------- reading the directory


def _split_dir(root: Path, split: str) -> Path | None:
    for candidate in (root / split, root / "data" / split):
        if candidate.is_dir():
            return candidate
    return None


def _subject_of(path: Path, split: str) -> str:
    """`computer_network_val.csv` -> `computer_network`; CMMLU's `agronomy.csv` -> `agronomy`."""
    stem = path.stem
    return stem[: -len(split) - 1] if stem.endswith(f"_{split}") else stem


def _not_utf8(path: Path, error: UnicodeDecodeError) -> BadValue:
    return BadValue(
        f"{path}: not UTF-8 ({error.reason} at byte {error.start} of a read block); re-save the file as UTF-8 "
        "(C-Eval, CMMLU and MMLU ship as UTF-8; a GBK copy must be converted, e.g. `iconv -f gbk -t utf-8`)"
    )


def _first_row(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return next(csv.reader(f), [])
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None


def detect_layout(root: str | Path) -> tuple[str, Path]:
    """(`ceval` | `cmmlu` | `mmlu`, the folder holding `dev/`) of a benchmark directory.

    Raises:
        MissingFile: no such directory, or no `dev/` (or `data/dev/`) with CSV files in it.
        BadValue: the dev CSV's first line matches none of the three layouts.
    """
    root = Path(root)
    if not root.is_dir():
        raise MissingFile(f"--benchmark {root}: no such directory; give a C-Eval, CMMLU or MMLU data directory")
    dev = _split_dir(root, "dev")
    files = sorted(dev.glob("*.csv")) if dev else []
    if not files:
        raise MissingFile(
            f"--benchmark {root}: no dev/*.csv (nor data/dev/*.csv) in it; a benchmark directory holds dev/ and "
            "val/ or test/ folders of per-subject CSV files (C-Eval, CMMLU or MMLU layout)"
        )
    header = _first_row(files[0])
    lowered = [cell.strip().lower() for cell in header]
    if lowered[:7] == ["id", "question", "a", "b", "c", "d", "answer"]:
        return "ceval", dev.parent
    if [cell.strip() for cell in header[1:7]] == ["Question", "A", "B", "C", "D", "Answer"]:
        return "cmmlu", dev.parent
    if len(header) == 6 and header[5].strip() in CHOICES:
        return "mmlu", dev.parent
    raise BadValue(
        f"--benchmark {root}: {files[0]} starts with {header[:8]}, which is none of C-Eval's "
        "`id,question,A,B,C,D,answer`, CMMLU's `,Question,A,B,C,D,Answer` or MMLU's header-less "
        "`question,A,B,C,D,answer` rows"
    )


def _read_questions(path: Path, layout: str, problems: list[str]) -> list[Question]:
    """The rows of one subject file; bad rows are appended to `problems` as `file:line: why`."""
    try:
        return _read_questions_utf8(path, layout, problems)
    except UnicodeDecodeError as error:
        raise _not_utf8(path, error) from None


def _read_questions_utf8(path: Path, layout: str, problems: list[str]) -> list[Question]:
    questions = []
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f)
        if layout != "mmlu":
            next(reader, None)  # the header
        for row in reader:
            location = f"{path}:{reader.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            cells = row[1:7] if layout in ("ceval", "cmmlu") else row[:6]
            if len(cells) < 6:
                problems.append(f"{location}: {len(row)} field(s), expected question, A, B, C, D and answer")
                continue
            answer = cells[5].strip()
            if answer not in CHOICES:
                what = "no answer" if not answer else f"answer {answer!r}"
                problems.append(f"{location}: {what}, expected one of A, B, C, D")
                continue
            questions.append(Question(cells[0], (cells[1], cells[2], cells[3], cells[4]), answer, location))
    return questions


def _titles(root: Path, layout: str) -> dict[str, str]:
    """Subject -> the name prompts use, from an optional `subject_mapping.json`."""
    path = root / SUBJECT_MAPPING
    if not path.is_file():
        path = root.parent / SUBJECT_MAPPING  # MMLU: the mapping may sit beside data/
        if not path.is_file():
            return {}
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadValue(f"{path}: not valid JSON ({error}); fix or delete it") from None
    titles = {}
    for subject, value in mapping.items() if isinstance(mapping, dict) else ():
        if isinstance(value, str):
            titles[subject] = value
        elif isinstance(value, list) and value and all(isinstance(v, str) for v in value):
            titles[subject] = value[0] if layout == "mmlu" or len(value) < 2 else value[1]
    return titles


def load_benchmark(root: str | Path, split: str = "auto", subjects: Sequence[str] | None = None) -> Benchmark:
    """Read a benchmark directory: its layout, and every subject's dev rows and scored questions.

    Args:
        root: the directory (C-Eval, CMMLU or MMLU layout; see the module docstring).
        split: the scored split (`val`, `test`); `auto` is the layout's split with answers.
        subjects: only these subjects (file names without split suffix); default all.

    Raises:
        MissingFile: see `detect_layout`; the split's folder, a subject or its dev file is missing.
        BadValue: an unknown layout; rows without an answer letter or with too few fields (all named).
    """
    layout, base = detect_layout(root)
    split = DEFAULT_SPLIT[layout] if split == "auto" else split
    split_dir = _split_dir(base, split)
    if split_dir is None:
        raise MissingFile(f"--benchmark {root}: no {split}/ folder for --benchmark_split {split} ({layout} layout)")
    files = {_subject_of(p, split): p for p in sorted(split_dir.glob("*.csv"))}
    wanted = list(subjects) if subjects else sorted(files)
    unknown = [s for s in wanted if s not in files]
    if unknown or not wanted:
        raise MissingFile(
            f"--benchmark {root}: subject(s) {unknown or '(none)'} not in {split_dir} (it has: {', '.join(sorted(files)) or 'nothing'})"
        )
    titles = _titles(base, layout)
    problems: list[str] = []
    benchmark = Benchmark(layout, base, split)
    dev_dir = _split_dir(base, "dev")
    for name in wanted:
        dev_files = [p for p in dev_dir.glob("*.csv") if _subject_of(p, "dev") == name]
        if not dev_files:
            raise MissingFile(f"--benchmark {root}: subject {name} has no file in {dev_dir} for its few-shot examples")
        dev = _read_questions(dev_files[0], layout, problems)
        questions = _read_questions(files[name], layout, problems)
        default_title = " ".join(name.split("_")) if layout == "mmlu" else name
        benchmark.subjects.append(Subject(name, titles.get(name, default_title), dev, questions))
    if problems:
        hint = " (C-Eval's test split has no answers: score --benchmark_split val)" if layout == "ceval" and split == "test" else ""
        shown = "; ".join(problems[:3]) + (f"; ... {len(problems) - 3} more" if len(problems) > 3 else "")
        raise BadValue(f"--benchmark {root}: {len(problems)} unusable row(s){hint}: {shown}")
    return benchmark


# ---------------------------------------------------------------- prompts


def _options(question: Question) -> str:
    return "".join(f"\n{letter}. {option}" for letter, option in zip(CHOICES, question.options))


def _ceval(title: str, shots: Sequence[Question], question: Question) -> str:
    header = f"以下是中国关于{title}考试的单项选择题，请选出其中的正确答案。\n\n" if shots else ""
    body = "".join(f"{q.question}{_options(q)}\n答案：{q.answer}\n\n" for q in shots)
    return f"{header}{body}{question.question}{_options(question)}\n答案："


def _cmmlu(title: str, shots: Sequence[Question], question: Question) -> str:
    header = f"以下是关于{title}的单项选择题，请直接给出正确答案的选项。\n\n"
    body = "".join(f"题目：{q.question}{_options(q)}\n答案是：{q.answer}\n\n" for q in shots)
    return f"{header}{body}题目：{question.question}{_options(question)}\n答案是："


def _mmlu(title: str, shots: Sequence[Question], question: Question) -> str:
    subject = "".join(f" {part}" for part in title.split(" "))
    header = f"The following are multiple choice questions (with answers) about {subject}.\n\n"
    body = "".join(f"{q.question}{_options(q)}\nAnswer: {q.answer}\n\n" for q in shots)
    return f"{header}{body}{question.question}{_options(question)}\nAnswer:"


PROMPTS: dict[str, Callable[[str, Sequence[Question], Question], str]] = {"ceval": _ceval, "cmmlu": _cmmlu, "mmlu": _mmlu}


def build_prompt(layout: str, title: str, shots: Sequence[Question], question: Question) -> str:
    """The prompt for `question` after the `shots` dev examples, in `layout`'s official format."""
    return PROMPTS[layout](title, shots, question)


# ---------------------------------------------------------------- scoring


@dataclass
class _Item:
    subject: str
    answer: str
    input_ids: list[int]  # the prompt as the family writes it, then the first letter's ids
    seq_len: int  # ids before the letter
    letters: list[list[int]]  # the ids of each answer letter A-D after the prompt
    shots_dropped: int


class LetterEncoder:
    """A question's prompt ids and the ids of each answer letter after it, in the model family's format."""

    def __init__(self, model: Any, tokenizer: Any, limit: int):
        from instructglm.eval.perplexity import row_encoder

        self.tokenizer = tokenizer
        self.encoder = row_encoder(model, tokenizer, limit)
        self.family = self.encoder.family
        self.letter_ids = [tokenizer(letter, add_special_tokens=False)["input_ids"] for letter in CHOICES]
        if not self.family.role_tokens and any(not ids for ids in self.letter_ids):
            raise BadValue(f"the tokenizer encodes the option letters A-D as {self.letter_ids}: an empty letter cannot be scored")

    def encode(self, prompt: str) -> tuple[list[int], list[list[int]]]:
        """(the prompt's ids, each letter's ids after them)."""
        if not self.family.role_tokens:
            ids = self.encoder.prefix + self.tokenizer(prompt, add_special_tokens=False)["input_ids"] + self.encoder.suffix
            return ids, self.letter_ids
        rows = [self.family.training_ids(self.tokenizer, [{"role": "user", "content": prompt}, {"role": "assistant", "content": c}])[0] for c in CHOICES]
        start = _common_length(rows)
        end = _common_length([row[start:][::-1] for row in rows])  # the end-of-turn tokens every answer shares
        letters = [row[start : len(row) - end] for row in rows]
        if any(not ids for ids in letters):
            raise BadValue(f"the {self.family.name} format writes the option letters A-D alike ({letters}): they cannot be scored")
        return rows[0][:start], letters


def _common_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest prefix all `rows` share."""
    shortest = min(len(row) for row in rows)
    return next((i for i in range(shortest) if len({row[i] for row in rows}) > 1), shortest)


def _encode_items(benchmark: Benchmark, shots: int, letters: LetterEncoder, limit: int) -> tuple[list[_Item], list[str]]:
    """Every question as a scored row; shots are dropped from the end while the prompt does not fit.

    Returns:
        The scored rows, and the locations of the questions left out because they alone do not fit `limit`.
    """
    items, skipped = [], []
    for subject in benchmark.subjects:
        for question in subject.questions:
            k = min(shots, len(subject.dev))
            while True:
                context, answers = letters.encode(build_prompt(benchmark.layout, subject.title, subject.dev[:k], question))
                longest = len(context) + max(len(ids) for ids in answers)
                if longest <= limit or k == 0:
                    break
                k -= 1
            if longest > limit:  # no prompt can hold it: left out of the scores, counted and located
                skipped.append(f"{question.location} ({len(context)} tokens)")
                continue
            dropped = min(shots, len(subject.dev)) - k
            items.append(_Item(subject.name, question.answer, context + answers[0], len(context), answers, dropped))
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        print(
            f"eval: warning: {len(skipped)} benchmark question(s) left out ({shots}-shot): each alone is over the "
            f"{limit}-token limit (--max_seq_length, else the model's context): {shown}",
            file=sys.stderr,
            flush=True,
        )
    return items, skipped


def _letter_logprobs(model: Any, tokenizer: Any, items: list[_Item], batch_size: int) -> list[list[float]]:
    from instructglm.eval.perplexity import continuation_logprobs, next_token_logprobs

    rows = [{"input_ids": item.input_ids, "seq_len": item.seq_len} for item in items]
    if all(len(ids) == 1 for item in items for ids in item.letters):
        candidates = [[ids[0] for ids in item.letters] for item in items]
        return next_token_logprobs(model, tokenizer, rows, candidates, batch_size)
    per_letter = []
    for letter in range(len(CHOICES)):
        letter_rows = [{"input_ids": item.input_ids[: item.seq_len] + item.letters[letter], "seq_len": item.seq_len} for item in items]
        per_letter.append(continuation_logprobs(model, tokenizer, letter_rows, batch_size))
    return [list(values) for values in zip(*per_letter)]


def score_benchmark(
    model: Any,
    tokenizer: Any,
    benchmark: Benchmark,
    shots: int = 5,
    batch_size: int = 8,
    max_seq_length: int | None = None,
) -> dict[str, Any]:
    """Accuracy of `model` on `benchmark` with `shots` dev examples per prompt.

    Returns:
        `{"shots", "average", "overall", "questions", "shots_dropped", "subjects": {name:
        {"accuracy", "correct", "questions"}}, "predictions": {name: [letter, ...]}}`, accuracies
        in percent.
    """
    from instructglm.eval.perplexity import sequence_limit

    limit = max_seq_length or sequence_limit(model)
    items, too_long = _encode_items(benchmark, shots, LetterEncoder(model, tokenizer, limit), limit)
    logprobs = _letter_logprobs(model, tokenizer, items, batch_size) if items else []
    subjects: dict[str, dict[str, Any]] = {s.name: {"accuracy": 0.0, "correct": 0, "questions": 0} for s in benchmark.subjects}
    predictions: dict[str, list[str]] = {s.name: [] for s in benchmark.subjects}
    for item, values in zip(items, logprobs):
        # max() keeps the first of equal scores, as numpy's argmax in the reference scripts does
        predicted = CHOICES[max(range(len(CHOICES)), key=lambda i: values[i])]
        entry = subjects[item.subject]
        entry["questions"] += 1
        entry["correct"] += predicted == item.answer
        predictions[item.subject].append(predicted)
    for entry in subjects.values():
        entry["accuracy"] = 100.0 * entry["correct"] / entry["questions"] if entry["questions"] else None
    scored = [e for e in subjects.values() if e["questions"]]
    total = sum(e["questions"] for e in scored)
    return {
        "shots": shots,
        # over the subjects with questions; None (shown `-`) when no question was scored at all
        "average": sum(e["accuracy"] for e in scored) / len(scored) if scored else None,
        "overall": 100.0 * sum(e["correct"] for e in scored) / total if total else None,
        "questions": total,
        "questions_too_long": len(too_long),
        "too_long": too_long,
        "shots_dropped": sum(item.shots_dropped > 0 for item in items),
        # subjects whose dev split has fewer rows than `shots`: their questions got only that many examples
        "short_dev": {s.name: len(s.dev) for s in benchmark.subjects if len(s.dev) < shots},
        "subjects": subjects,
        "predictions": predictions,
    }


def evaluate_benchmark(
    model: Any,
    tokenizer: Any,
    benchmark: Benchmark,
    shots: Sequence[int] = (0, 5),
    batch_size: int = 8,
    max_seq_length: int | None = None,
) -> dict[str, Any]:
    """`score_benchmark` at each shot count: `{"benchmark", "path", "split", "<k>-shot": result, ...}`."""
    result: dict[str, Any] = {"benchmark": benchmark.layout, "path": str(benchmark.root), "split": benchmark.split}
    for k in shots:
        result[f"{k}-shot"] = score_benchmark(model, tokenizer, benchmark, k, batch_size, max_seq_length)
    return result


def format_benchmark_table(results: dict[str, dict[str, Any]]) -> str:
    """Per-subject and average accuracy of every model (label -> `evaluate_benchmark` result), side by side."""
    labels = list(results)
    first = next(iter(results.values()))
    shot_keys = [key for key in first if key.endswith("-shot")]
    columns = [(label, key) for label in labels for key in shot_keys]
    headers = ["subject"] + [f"{label} {key}" for label, key in columns]
    subjects = list(first[shot_keys[0]]["subjects"]) if shot_keys else []
    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    lines = [[s] + [cell(results[l][k]["subjects"][s]["accuracy"]) for l, k in columns] for s in subjects]
    lines.append(["average"] + [cell(results[l][k]["average"]) for l, k in columns])
    lines.append(["overall"] + [cell(results[l][k]["overall"]) for l, k in columns])
    widths = [max(len(row[i]) for row in [headers] + lines) for i in range(len(headers))]

    def render(row: list[str]) -> str:
        return "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    title = f"{first['benchmark']} ({first['split']} split, accuracy %; - = no questions)"
    notes = []
    for key in shot_keys:
        result = first[key]
        if result.get("short_dev"):
            short = ", ".join(f"{name} ({n})" for name, n in result["short_dev"].items())
            notes.append(f"{key}: fewer dev rows than shots in {short}: those questions had that many examples")
        dropped = {label: results[label][key]["shots_dropped"] for label in labels if results[label][key]["shots_dropped"]}
        if dropped:
            notes.append(f"{key}: {max(dropped.values())} question(s) had shots dropped to fit the context")
    table = [title, render(headers), "  ".join("-" * w for w in widths)] + [render(row) for row in lines]
    return "\n".join(table + notes)
