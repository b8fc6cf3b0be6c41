"""The demo's bundled instructions: small zh+en tasks whose answers follow fixed rules.

Every answer is a function of the prompt (number words, 中文数字, their inverses, "the next
number", upper-casing and reversing letter sequences), so a tiny model can learn the rules from
the training split and be checked on prompts it has never seen:

- number tasks: the held-out numbers (`EVAL_NUMBERS`) appear in no training record of any task,
  so "forty-seven" / "四十七" / "47" are composed at evaluation time from digits, tens and units
  learnt on other numbers. Irregular numbers (0-19, round tens) stay in training only.
- the letter task: held-out sequences are drawn from the same generator and filtered to be
  absent from the training split.

The files are Alpaca JSON arrays (`instruction`/`input`/`output`), the format `convert` reads
first. Regenerate the committed copies with `python -m instructglm.demo.sample_data`; the output
is byte-identical for a given seed.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
TRAIN_FILE = "sample_data.json"
EVAL_FILE = "sample_eval.json"

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEENS = ["ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
ZH_DIGITS = "零一二三四五六七八九"
# Ten letters: each one is seen in every position many times in a few hundred records.
LETTERS = "abcdefghij"

# Regular two-digit numbers (tens >= 2, units != 0, and the successor also two-digit) that a model
# can only answer by composing digit rules; a seeded sample of them is held out of training.
REGULAR = [n for n in range(21, 99) if n % 10]
N_EVAL_NUMBERS = 12
N_EVAL_STRINGS = 12
N_TRAIN_STRINGS = 150


def english_words(n: int) -> str:
    """0-99 in English words: 7 -> seven, 15 -> fifteen, 40 -> forty, 47 -> forty-seven."""
    if n < 10:
        return ONES[n]
    if n < 20:
        return TEENS[n - 10]
    tens, units = divmod(n, 10)
    return TENS[tens] + (f"-{ONES[units]}" if units else "")


def chinese_numeral(n: int) -> str:
    """0-99 in 中文数字: 7 -> 七, 15 -> 十五, 40 -> 四十, 47 -> 四十七."""
    if n < 10:
        return ZH_DIGITS[n]
    tens, units = divmod(n, 10)
    head = "十" if tens == 1 else ZH_DIGITS[tens] + "十"
    return head + (ZH_DIGITS[units] if units else "")


# One entry per task: the phrasings (instruction, input) with {x} for the operand, how the operand
# is shown, and the answer. The operand is always the record's `input`, so it sits at the same
# place before "Answer:" in every prompt; the instruction (two phrasings per task, picked by the
# seeded generator) says what to do with it.
NumberTask = tuple[list[str], Callable[[int], str], Callable[[int], str]]

NUMBER_TASKS: dict[str, NumberTask] = {
    "en_words": (["Write the number in English words.", "How is this number written in English?"], str, english_words),
    "en_value": (["Write this number with digits.", "What number is this? Answer with digits."], english_words, str),
    "en_next": (["What number comes after this one?", "Add one to the number."], str, lambda n: str(n + 1)),
    "zh_numeral": (["把这个数字写成中文。", "这个数用中文怎么写？"], str, chinese_numeral),
    "zh_value": (["把这个中文数字写成阿拉伯数字。", "这是多少？用阿拉伯数字回答。"], chinese_numeral, str),
    "zh_next": (["这个数的下一个数是几？", "这个数加一等于几？"], str, lambda n: str(n + 1)),
}

# Letter sequences: space-separated so that every letter is one token.
StringTask = tuple[list[str], str, Callable[[list[str]], list[str]]]

STRING_TASKS: dict[str, StringTask] = {
    "en_upper": (
        ["Write these letters in upper case.", "Capitalize the letters."],
        LETTERS,
        lambda items: [c.upper() for c in items],
    ),
}


def _record(instruction: str, operand: str, answer: str) -> dict[str, str]:
    return {"instruction": instruction, "input": operand, "output": answer}


def _number_records(numbers: list[int], rng: random.Random) -> list[dict[str, str]]:
    records = []
    for phrasings, show, answer in NUMBER_TASKS.values():
        for n in numbers:
            records.append(_record(rng.choice(phrasings), show(n), answer(n)))
    return records


def _letter_sequence(alphabet: str, rng: random.Random) -> list[str]:
    return rng.sample(alphabet, 3)


def build(seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """The (train, eval) splits: lists of Alpaca records, deterministic for a given seed."""
    rng = random.Random(seed)
    eval_numbers = sorted(rng.sample(REGULAR, N_EVAL_NUMBERS))
    # 0-98: 99's successor would be the only three-digit answer, a rule shown once is not learnt.
    train_numbers = [n for n in range(99) if n not in eval_numbers]

    # "The number after 25" would show 26 as an answer: drop every training record whose operand
    # or answer is a held-out number, in any script, so those numbers are never seen at all.
    held_out = {form(n) for n in eval_numbers for form in (str, english_words, chinese_numeral)}
    train = [r for r in _number_records(train_numbers, rng) if not {r["input"], r["output"]} & held_out]
    evaluation = _number_records(eval_numbers, rng)
    for phrasings, alphabet, transform in STRING_TASKS.values():
        seen: set[tuple[str, ...]] = set()
        for split, count in ((train, N_TRAIN_STRINGS), (evaluation, N_EVAL_STRINGS)):
            made = 0
            while made < count:
                items = _letter_sequence(alphabet, rng)
                if tuple(items) in seen:
                    continue
                seen.add(tuple(items))
                split.append(_record(rng.choice(phrasings), " ".join(items), " ".join(transform(items))))
                made += 1
    rng.shuffle(train)
    return train, evaluation


def write(assets_dir: Path = ASSETS_DIR, seed: int = 0) -> tuple[Path, Path]:
    """Write `sample_data.json` and `sample_eval.json` into `assets_dir`."""
    train, evaluation = build(seed)
    assets_dir.mkdir(parents=True, exist_ok=True)
    paths = assets_dir / TRAIN_FILE, assets_dir / EVAL_FILE
    for path, records in zip(paths, (train, evaluation)):
        path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return paths


if __name__ == "__main__":
    for written in write(Path(sys.argv[1]) if len(sys.argv) > 1 else ASSETS_DIR):
        print(f"wrote {written}")
