"""The generation metrics against values worked out by hand (THUDM's ptuning/main.py formulas).

BLEU-4 (nltk sentence_bleu, characters, smoothing method 3): BP * exp(mean log p_n), BP =
exp(1 - len(ref)/len(hyp)) when the hypothesis is shorter; method 3 replaces the k-th zero
precision by 1 / (2^k * denominator). ROUGE (rouge_chinese on jieba words): distinct n-gram
overlap for ROUGE-1/2, LCS for ROUGE-L; F = 2PR / (P + R + 1e-8). Both x 100, rounded to 4 places.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile

import pytest

from instructglm.errors import MissingDependency
from instructglm.eval import metrics
from instructglm.eval.metrics import bleu_4, jieba_words, rouge_f, score_pair, score_predictions


def f_score(p: float, r: float) -> float:
    return round(2 * p * r / (p + r + 1e-8) * 100, 4)


def test_jieba_segments_the_classic_sentence():
    assert jieba_words("我爱北京天安门") == ["我", "爱", "北京", "天安门"]
    assert jieba_words("我爱北京") == ["我", "爱", "北京"]
    assert jieba_words("the cat") == ["the", " ", "cat"]


def test_identical_english_scores_100_everywhere():
    scores = score_pair("hello world", "hello world")
    assert scores.as_dict() == {"bleu-4": 100.0, "rouge-1": 100.0, "rouge-2": 100.0, "rouge-l": 100.0, "exact_match": 100.0}


def test_identical_short_strings_follow_method3_smoothing():
    # "abc": p1..p3 = 1, no 4-gram at all -> p4 = 1/2 -> (1/2)^(1/4)
    assert bleu_4("abc", "abc") == round(0.5**0.25 * 100, 4) == 84.0896
    # "ab": p3 = 1/2, p4 = 1/4 -> (1/8)^(1/4)
    assert bleu_4("ab", "ab") == round((1 / 8) ** 0.25 * 100, 4) == 59.4604
    # one jieba word: no bigram, so ROUGE-2 is 0 even for identical text (as THUDM's numbers have it)
    assert rouge_f("abc", "abc") == {"rouge-1": 100.0, "rouge-2": 0.0, "rouge-l": 100.0}


def test_chinese_prefix_by_hand():
    scores = score_pair("我爱北京", "我爱北京天安门")
    # every character n-gram of the 4-character hypothesis is in the reference: BLEU = BP = exp(1 - 7/4)
    assert scores.bleu_4 == round(math.exp(1 - 7 / 4) * 100, 4) == 47.2367
    # words 我 爱 北京 vs 我 爱 北京 天安门
    assert scores.rouge_1 == f_score(1, 3 / 4) == 85.7143
    assert scores.rouge_2 == f_score(1, 2 / 3) == 80.0
    assert scores.rouge_l == f_score(1, 3 / 4)
    assert scores.exact_match == 0.0


def test_english_prefix_by_hand():
    scores = score_pair("the cat", "the cat sat")
    assert scores.bleu_4 == round(math.exp(1 - 11 / 7) * 100, 4) == 56.4718
    assert scores.rouge_1 == f_score(1, 2 / 3) == 80.0
    assert scores.rouge_2 == f_score(1, 1 / 2) == 66.6667
    assert scores.rouge_l == f_score(1, 2 / 3)


@pytest.mark.parametrize("prediction, reference", [("", "答案"), ("答案", ""), ("", ""), ("   ", "ab")])
def test_empty_sides_score_zero_without_raising(prediction, reference):
    # rouge_chinese itself raises "Hypothesis is empty." / "Reference is empty." here
    assert score_pair(prediction, reference).as_dict() == dict.fromkeys(
        ("bleu-4", "rouge-1", "rouge-2", "rouge-l", "exact_match"), 0.0
    )


def test_corpus_scores_are_row_means_and_count_empties():
    corpus, rows = score_predictions(["我爱北京", "", "hello world"], ["我爱北京天安门", "答案", "hello world"])
    assert [r.bleu_4 for r in rows] == [47.2367, 0.0, 100.0]
    assert corpus["bleu-4"] == pytest.approx((47.2367 + 0 + 100) / 3)
    assert corpus["rouge-1"] == pytest.approx((85.7143 + 0 + 100) / 3)
    assert corpus["rouge-2"] == pytest.approx((80 + 0 + 100) / 3)
    assert corpus["exact_match"] == pytest.approx(100 / 3)
    assert (corpus["rows"], corpus["empty_predictions"], corpus["empty_references"]) == (3, 1, 0)
    assert corpus["answer_chars"] == pytest.approx((4 + 0 + 11) / 3)
    assert corpus["reference_chars"] == pytest.approx((7 + 2 + 11) / 3)


def test_mismatched_lengths_are_a_bug():
    with pytest.raises(ValueError):
        score_predictions(["a"], [])


def test_missing_extra_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "rouge_chinese", None)  # import now raises ImportError
    with pytest.raises(MissingDependency, match=r"rouge-chinese.*pip install 'instructglm\[eval\]'"):
        metrics.require_eval_deps()


def test_jieba_is_quiet_and_writes_no_cache(tmp_path):
    """A fresh interpreter scoring Chinese text logs nothing and leaves no jieba cache in its temp dir."""
    env = dict(os.environ, TMPDIR=str(tmp_path))
    code = "from instructglm.eval.metrics import score_pair; print(score_pair('今天天气很好', '今天天气不错').rouge_1)"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "40.0"  # 今天天气 很 好 vs 今天天气 不错: 1 of 3 and 1 of 2 words
    assert "jieba" not in done.stderr.lower() and "prefix dict" not in done.stderr.lower()
    assert list(tmp_path.iterdir()) == []
    assert tempfile.gettempdir() != str(tmp_path)  # the test did not just look in its own process's dir
