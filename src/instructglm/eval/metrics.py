"""Generation metrics as THUDM's ChatGLM-6B `ptuning/main.py` computes them (LLaMA-Factory too).

Per row, for a prediction and its reference (both as given; callers strip them first):

- BLEU-4: `nltk` `sentence_bleu([list(reference)], list(prediction),
  smoothing_function=SmoothingFunction().method3)`: characters are the tokens, 1- to 4-grams
  equally weighted, NIST geometric smoothing of zero counts. Times 100, rounded to 4 places.
- ROUGE-1 / ROUGE-2 / ROUGE-L: the F score of `rouge_chinese.Rouge().get_scores(hyp, ref)`
  where both are `' '.join(jieba.cut(text))`: jieba words are the tokens. Times 100, rounded
  to 4 places.
- exact match: 100 when prediction == reference, else 0.

The corpus score of each is the mean over rows, THUDM's `np.mean` of the rounded row scores.

Empty text: rouge_chinese raises on an empty hypothesis or reference, and THUDM's loop would stop
there. As LLaMA-Factory does, a row whose prediction or reference has no word after jieba scores 0
on every ROUGE; nltk already gives BLEU 0 for an empty side. An empty prediction is never an exact
match (an empty answer is no answer); rows with an empty prediction or reference are counted.

jieba is used through a private `jieba.Tokenizer` whose dictionary is built in memory: the module
-level `jieba.cut` would log to stderr and read and write a marshal cache at
`$TMPDIR/jieba.cache`, a fixed name in a shared directory that another user could plant. Building
the dictionary takes ~0.4 s, as long as loading that cache did here.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from instructglm.errors import MissingDependency

TEXT_METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")
EVAL_EXTRA = "pip install 'instructglm[eval]'"


def require_eval_deps() -> None:
    """Raise `MissingDependency` naming the `eval` extra unless jieba, rouge-chinese and nltk import."""
    missing = []
    for module, package in (("jieba", "jieba"), ("rouge_chinese", "rouge-chinese"), ("nltk", "nltk")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise MissingDependency(
            f"the generation metrics need {', '.join(missing)}, which is not installed: run {EVAL_EXTRA}"
        )


@functools.lru_cache(maxsize=1)
def _word_splitter():
    """A jieba tokenizer with its default dictionary built in memory: no cache file, no log lines."""
    require_eval_deps()
    import jieba

    tokenizer = jieba.Tokenizer()
    with tokenizer.lock:
        tokenizer.FREQ, tokenizer.total = tokenizer.gen_pfdict(tokenizer.get_dict_file())
        tokenizer.initialized = True
    return tokenizer


def jieba_words(text: str) -> list[str]:
    """`list(jieba.cut(text))` with the default dictionary and HMM on, as THUDM called it."""
    return list(_word_splitter().cut(text))


@functools.lru_cache(maxsize=1)
def _scorers():
    require_eval_deps()
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    return sentence_bleu, SmoothingFunction().method3, Rouge()


@dataclass(frozen=True)
class RowScores:
    """One row's scores, each on THUDM's 0-100 scale."""

    bleu_4: float
    rouge_1: float
    rouge_2: float
    rouge_l: float
    exact_match: float

    def as_dict(self) -> dict[str, float]:
        """Keyed by the metric names of `metrics.json` (`bleu-4`, ..., `exact_match`)."""
        return {
            "bleu-4": self.bleu_4,
            "rouge-1": self.rouge_1,
            "rouge-2": self.rouge_2,
            "rouge-l": self.rouge_l,
            "exact_match": self.exact_match,
        }


def bleu_4(prediction: str, reference: str) -> float:
    """Character-level sentence BLEU-4 with smoothing method 3, x 100, rounded to 4 places."""
    sentence_bleu, method3, _ = _scorers()
    return round(float(sentence_bleu([list(reference)], list(prediction), smoothing_function=method3)) * 100, 4)


def rouge_f(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L F x 100 (rounded to 4 places) on jieba words; 0 for all when a side has no word."""
    hypothesis = " ".join(jieba_words(prediction))
    target = " ".join(jieba_words(reference))
    if not hypothesis.split() or not target.split():
        return {"rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}
    scores = _scorers()[2].get_scores(hypothesis, target)[0]
    return {name: round(scores[name]["f"] * 100, 4) for name in ("rouge-1", "rouge-2", "rouge-l")}


def score_pair(prediction: str, reference: str) -> RowScores:
    """Every metric of one (prediction, reference) pair."""
    rouge = rouge_f(prediction, reference)
    return RowScores(
        bleu_4=bleu_4(prediction, reference),
        rouge_1=rouge["rouge-1"],
        rouge_2=rouge["rouge-2"],
        rouge_l=rouge["rouge-l"],
        exact_match=100.0 if prediction and prediction == reference else 0.0,
    )


def score_predictions(predictions: Sequence[str], references: Sequence[str]) -> tuple[dict[str, Any], list[RowScores]]:
    """Corpus metrics and per-row scores of paired texts.

    Texts are scored as given (strip them first for answers; `evaluate_generation` does). The
    corpus entry holds the mean of each row metric (`bleu-4`, `rouge-1`, `rouge-2`, `rouge-l`,
    `exact_match`, all 0-100), `rows`, `empty_predictions`, `empty_references` and
    `answer_chars` / `reference_chars` (mean lengths in characters).

    Raises:
        ValueError: the two sequences differ in length (a caller's bug).
        MissingDependency: jieba, rouge-chinese or nltk is not installed.
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    rows = [score_pair(p, r) for p, r in zip(predictions, references)]
    corpus: dict[str, Any] = {name: mean(row.as_dict()[name] for row in rows) for name in (*TEXT_METRICS, "exact_match")}
    corpus.update(
        rows=len(rows),
        empty_predictions=sum(not p for p in predictions),
        empty_references=sum(not r for r in references),
        answer_chars=mean(len(p) for p in predictions),
        reference_chars=mean(len(r) for r in references),
    )
    return corpus, rows


def mean(values: Iterable[float]) -> float:
    """The arithmetic mean; NaN for no values (metrics.json writes it as null, the report as a dash)."""
    values = list(values)
    return math.fsum(values) / len(values) if values else math.nan
