"""Task metrics against hand-computed values: classification, regression, SQuAD v2, translation."""
from __future__ import annotations

import math

import pytest

from lmforge.evaluate.task_metrics import (classification_metrics, normalize_answer, regression_metrics,
                                           squad_em_f1, squad_metrics, translation_metrics)
from lmforge.tasks.translate import bleu_tokenize


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
    assert m["per_class"][2] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # class 2 is neither in the data nor predicted: left out of the macro average, as scikit-learn's default
    assert m["macro_f1"] == pytest.approx((0.8 + 0) / 2)
    # a perfect run on data without one of the model's classes (old: 2/3)
    assert classification_metrics(["a", "b"], ["a", "b"], ["a", "b", "c"])["macro_f1"] == 1.0
    # a predicted class the data lacks still counts, with F1 0
    assert classification_metrics(["a", "a"], ["a", "c"], ["a", "b", "c"])["macro_f1"] == pytest.approx(1 / 3)
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


def test_pearson_of_tiny_and_huge_values():
    # two points correlate exactly; squared deviations near 1e-321 had lost their digits (old: -0.9055)
    m = regression_metrics([-7.372600748578804e-161, -9.043868750710514e-161], [-0.590319829701875, -0.2496874061])
    assert m["pearson"] == pytest.approx(-1.0)
    # a perfect line whose squared deviations overflowed to inf (old: 0.0)
    assert regression_metrics([1e200, 2e200, 3e200], [1, 2, 3])["pearson"] == pytest.approx(1.0)
    # scipy.stats.pearsonr, and never outside [-1, 1]
    assert regression_metrics([1e-160, 2e-160, 3.5e-160], [1, 2, 3])["pearson"] == pytest.approx(0.9933992677987827)
    assert abs(regression_metrics([0.1, 0.2, 0.3], [0.3, 0.6, 0.9])["pearson"]) <= 1.0


@pytest.mark.parametrize("raw, expected", [
    ("The Quick, Brown fox!", "quick brown fox"),
    ("An apple a day", "apple day"),
    ("  Theater\tof the   absurd. ", "theater of absurd"),
    ("the", ""),
    ("U.S.A.", "usa"),
    ("《红楼梦》，", "红 楼 梦"),  # CJK punctuation goes; each character is a token
    ("Beijing大学 ", "beijing 大 学"),
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


def test_squad_chinese_scores_characters():
    # whitespace tokens made a Chinese answer one token, so F1 was all or nothing (old: 0.0, 0.0, 0.0)
    assert squad_em_f1("北京大学", ["北京"]) == (0.0, pytest.approx(2 / 3))
    assert squad_em_f1("在北京。", ["北京"]) == (0.0, pytest.approx(0.8))
    assert squad_em_f1("東京タワー", ["東京"]) == (0.0, pytest.approx(4 / 7))
    # spacing and punctuation do not matter, as in English (old: 0.0, 0.0)
    assert squad_em_f1("北京 大学", ["北京大学"]) == (1.0, 1.0)
    assert squad_em_f1("《红楼梦》", ["红楼梦"]) == (1.0, 1.0)
    assert squad_em_f1("上海", ["北京"]) == (0.0, 0.0)


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
    assert "tok:zh" in translation_metrics(zh, list(zh), tokenize="zh")["bleu_signature"]
    assert "tok:13a" in m["bleu_signature"] and "nrefs:1" in m["chrf_signature"]
    assert math.isnan(translation_metrics([], [])["bleu"])
    with pytest.raises(ValueError):
        translation_metrics(["a"], [])


def test_bleu_splits_lao_into_characters():
    # Lao is written without spaces, as Thai is: 13a would make each sentence one word (old: None, i.e. 13a)
    assert [bleu_tokenize(c) for c in ("lo", "lo-LA", "lao_Laoo", "Lao")] == ["char"] * 4
    assert bleu_tokenize("th") == "char" and bleu_tokenize("es") is None
