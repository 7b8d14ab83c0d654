"""Task metrics against hand-computed values: classification, regression, SQuAD v2, translation."""
from __future__ import annotations

import math

import pytest

from lmforge.evaluate.task_metrics import (classification_metrics, normalize_answer, regression_metrics,
                                           squad_em_f1, squad_metrics, translation_metrics)


def test_classification_confusion_matrix_and_f1():
    m = classification_metrics(["a", "a", "b", "b", "c", "c"], ["a", "b", "b", "b", "a", "c"], ["a", "b", "c"])
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 1]]  # rows true, columns predicted
    assert m["accuracy"] == pytest.approx(4 / 6) and m["n"] == 6
    assert m["per_class"]["a"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2})
    assert m["per_class"]["b"] == pytest.approx({"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2})
    assert m["per_class"]["c"] == pytest.approx({"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2})
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)


def test_classification_unpredicted_class_scores_zero():
    m = classification_metrics([0, 0, 1], [0, 0, 0], [0, 1, 2])
    assert m["per_class"][1] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert m["per_class"][2]["support"] == 0
    assert m["macro_f1"] == pytest.approx((0.8 + 0 + 0) / 3)
    with pytest.raises(ValueError):
        classification_metrics([0], [5], [0, 1])


def test_regression_metrics():
    m = regression_metrics([1, 2, 3], [1, 2, 5])
    assert m["mse"] == pytest.approx(4 / 3) and m["n"] == 3
    assert regression_metrics([1, 2, 3], [2, 4, 6])["pearson"] == pytest.approx(1.0)
    # ranks with ties: x -> [1, 2.5, 2.5, 4], y -> [1, 3, 2, 4]; r = 4.5 / sqrt(4.5 * 5)
    m = regression_metrics([1, 2, 2, 3], [1, 3, 2, 4])
    assert m["spearman"] == pytest.approx(0.9486832980505138)
    assert regression_metrics([1, 2, 3], [10, 100, 1000])["spearman"] == pytest.approx(1.0)
    assert math.isnan(regression_metrics([1, 1, 1], [1, 2, 3])["pearson"])
    # constant predictions: undefined, not the ~1e-17 that rounding leaves after centring
    assert math.isnan(regression_metrics([0, 0.5, 1], [0.1] * 3)["pearson"])
    assert math.isnan(regression_metrics([i / 6 for i in range(7)], [0.7] * 7)["pearson"])


@pytest.mark.parametrize("raw, expected", [
    ("The Quick, Brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("  Theater\tof the   absurd. ", "theater of absurd"),
    ("the", ""),
    ("U.S.A.", "usa"),
])
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_squad_em_f1():
    assert squad_em_f1("the cat sat", ["cat sat on mat"]) == (0.0, pytest.approx(2 / 3))
    assert squad_em_f1("Paris", ["paris", "Paris, France"]) == (1.0, 1.0)
    assert squad_em_f1("Paris France", ["in Paris", "Paris, France."]) == (1.0, 1.0)
    assert squad_em_f1("dog", ["cat"]) == (0.0, 0.0)
    # SQuAD v2: no gold answer is answered only by saying nothing ("the" normalises to nothing)
    assert squad_em_f1("", []) == (1.0, 1.0)
    assert squad_em_f1("the", []) == (1.0, 1.0)
    assert squad_em_f1("Paris", []) == (0.0, 0.0)
    assert squad_em_f1("", ["Paris"]) == (0.0, 0.0)


def test_squad_metrics_percent_and_breakdown():
    golds = {"q1": ["Paris"], "q2": ["cat sat on mat"], "q3": [], "q4": []}
    preds = {"q1": "paris", "q2": "the cat sat", "q3": "", "q4": "London"}
    m = squad_metrics(preds, golds)
    assert m["exact_match"] == pytest.approx(50.0) and m["n"] == 4
    assert m["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1 + 0) / 4)
    assert m["HasAns_exact_match"] == pytest.approx(50.0) and m["HasAns_n"] == 2
    assert m["HasAns_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)
    assert m["NoAns_exact_match"] == pytest.approx(50.0) and m["NoAns_n"] == 2
    only = squad_metrics({"q1": "Paris"}, {"q1": ["Paris"], "q2": ["x"]})  # a missing prediction is ''
    assert only["exact_match"] == pytest.approx(50.0) and "HasAns_n" not in only


def test_translation_metrics():
    hyps = ["the cat sat on the mat", "a dog barked loudly at night"]
    m = translation_metrics(hyps, list(hyps))
    assert m["bleu"] == pytest.approx(100.0) and m["chrf"] == pytest.approx(100.0) and m["n"] == 2
    bad = translation_metrics(["xyz qqq"], ["the cat sat on the mat"])
    assert bad["bleu"] == pytest.approx(0.0) and bad["chrf"] < 10
    zh = ["我爱你们大家好朋友"]  # 'zh' splits per character, so BLEU has 4-grams to count
    assert translation_metrics(zh, list(zh), tokenize="zh")["bleu"] == pytest.approx(100.0)
    assert math.isnan(translation_metrics([], [])["bleu"])
    with pytest.raises(ValueError):
        translation_metrics(["a"], [])
