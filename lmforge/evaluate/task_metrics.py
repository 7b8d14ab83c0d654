"""Metrics for fine-tuned tasks: pure functions, no model or file access, easy to test.

classify: accuracy, macro F1, per-class scores and a confusion matrix (regression: MSE, Pearson, Spearman);
qa: SQuAD v2 exact match and F1, computed as the official evaluation script does (Chinese and Japanese by
character); translate: sacreBLEU's BLEU and chrF.
"""
from __future__ import annotations

import collections
import re
import string
import unicodedata

import numpy as np


# ------------------------------------------------------------------------------------------ classification

def classification_metrics(y_true: list, y_pred: list, labels: list) -> dict:
    """Accuracy, macro F1 (over the labels that occur in y_true or y_pred), per-class precision/recall/F1/support
    for every one of `labels`, and the confusion matrix (rows = true label, columns = predicted label, both in
    `labels` order)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    for t, p in zip(y_true, y_pred):
        if t not in index or p not in index:
            raise ValueError(f"label {t if t not in index else p!r} is not in labels {labels!r}")
        matrix[index[t]][index[p]] += 1
    n = len(y_true)
    per_class, occurring = {}, []
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        predicted = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        # an undefined ratio counts as 0, as scikit-learn's zero_division default does
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[label] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
        if support or predicted:
            occurring.append(f1)
    correct = sum(matrix[i][i] for i in range(len(labels)))
    return {
        "accuracy": correct / n if n else float("nan"),
        # over the classes in the gold labels or the predictions, as scikit-learn's default: a class the data
        # lacks and the model never predicts has no F1, and counted as 0 it held a perfect run below 1
        "macro_f1": sum(occurring) / len(occurring) if occurring else float("nan"),
        "per_class": per_class,
        "confusion_matrix": matrix,
        "n": n,
    }


def _rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the average of the ranks they span (scipy's rankdata 'average')."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # start of each run of equal values, then each value's run gets the mean of its positions
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    avg = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(x), dtype=float)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def _centred_unit(x: np.ndarray) -> np.ndarray:
    """x - mean(x), scaled so its largest magnitude is 1 (x not constant), as scipy does: unscaled, the squares
    of values near 1e-160 underflow and lose their digits (r = -1.003 for two points) and those near 1e200
    overflow (r = 0.0 for a perfect line). Scaled only after centring, so 1e6 + small steps keep their digits."""
    x = x - x.mean()
    return x / np.abs(x).max()


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if np.all(a == a[0]) or np.all(b == b[0]):
        # a constant side has no correlation; after centring, rounding leaves ~1e-17 that would pass for one
        return float("nan")
    a, b = _centred_unit(a), _centred_unit(b)
    r = (a @ b) / np.sqrt((a @ a) * (b @ b))
    return float(np.clip(r, -1.0, 1.0))  # rounding can leave |r| a hair above 1


def regression_metrics(y_true: list, y_pred: list) -> dict:
    """Mean squared error, Pearson and Spearman correlation (NaN when a side is constant or n < 2)."""
    if len(y_true) != len(y_pred):
        raise ValueError(f"{len(y_true)} true values but {len(y_pred)} predictions")
    t = np.asarray(y_true, dtype=float)
    p = np.asarray(y_pred, dtype=float)
    n = len(t)
    if n == 0:
        return {"mse": float("nan"), "pearson": float("nan"), "spearman": float("nan"), "n": 0}
    return {
        "mse": float(np.mean((t - p) ** 2)),
        "pearson": _pearson(t, p) if n > 1 else float("nan"),
        "spearman": _pearson(_rank(t), _rank(p)) if n > 1 else float("nan"),
        "n": n,
    }


# ------------------------------------------------------------------------------------------ SQuAD

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
# the official script's ASCII punctuation, plus the punctuation of the CJK and full-width blocks (，。、《》！？),
# which Chinese answers carry as English ones carry ',.!?'; no other text has these characters
_CJK_BLOCKS = ((0x3000, 0x30FF), (0xFE30, 0xFE4F), (0xFF00, 0xFF65))
_CJK_PUNCT = {chr(c) for lo, hi in _CJK_BLOCKS for c in range(lo, hi + 1) if unicodedata.category(chr(c))[0] == "P"}
_PUNCT = set(string.punctuation) | _CJK_PUNCT
# Chinese and Japanese are written without spaces: split on whitespace, a whole answer was one token and F1
# was all or nothing ('北京大学' against '北京': 0). Each ideograph or kana is a token instead, the mixed
# segmentation of the CMRC 2018 and MLQA evaluation scripts; text without them splits as the official script's.
_CJK_CHAR = re.compile("([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ffff])")


def _segment(s: str) -> list[str]:
    return _CJK_CHAR.sub(r" \1 ", s).split()


def normalize_answer(s: str) -> str:
    """Lower text and remove punctuation, articles and extra whitespace (official SQuAD v2 script), with
    Chinese and Japanese characters one token each."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(_segment(s))


def _tokens(s: str) -> list[str]:
    return normalize_answer(s).split() if s else []


def _f1(gold: str, pred: str) -> float:
    gold_toks, pred_toks = _tokens(gold), _tokens(pred)
    if not gold_toks or not pred_toks:
        # if either is no-answer, F1 is 1 if they agree, 0 otherwise
        return float(gold_toks == pred_toks)
    same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_toks), same / len(gold_toks)
    return 2 * precision * recall / (precision + recall)


def squad_em_f1(prediction: str, gold_answers: list[str]) -> tuple[float, float]:
    """(exact match, F1), each 0..1, maximised over the gold answers. An unanswerable question (no gold
    answer, or only ones that normalise to nothing) counts as answered only by an empty prediction."""
    golds = [a for a in gold_answers if normalize_answer(a)] or [""]
    em = max(float(normalize_answer(g) == normalize_answer(prediction)) for g in golds)
    f1 = max(_f1(g, prediction) for g in golds)
    return em, f1


def squad_metrics(preds: dict[str, str], golds: dict[str, list[str]]) -> dict:
    """exact_match and f1 in percent (0-100, like the official script) over every question in `golds`, with a
    HasAns_/NoAns_ breakdown when both kinds occur. A question without a prediction counts as answered ''."""
    scores = {qid: squad_em_f1(preds.get(qid, ""), answers) for qid, answers in golds.items()}

    def summary(ids: list[str], prefix: str = "") -> dict:
        n = len(ids)
        return {
            f"{prefix}exact_match": 100.0 * sum(scores[i][0] for i in ids) / n if n else float("nan"),
            f"{prefix}f1": 100.0 * sum(scores[i][1] for i in ids) / n if n else float("nan"),
            f"{prefix}n": n,
        }

    out = summary(list(golds))
    has = [qid for qid, answers in golds.items() if answers]
    no = [qid for qid, answers in golds.items() if not answers]
    if has and no:
        out.update(summary(has, "HasAns_"))
        out.update(summary(no, "NoAns_"))
    return out


# ------------------------------------------------------------------------------------------ translation

def translation_metrics(hypotheses: list[str], references: list[str], tokenize: str | None = None) -> dict:
    """Corpus BLEU and chrF (0-100) from sacreBLEU, one reference per hypothesis. `tokenize` is sacreBLEU's
    BLEU tokenizer: None means its default '13a'; use 'zh' for Chinese targets."""
    import sacrebleu  # deferred: only translation needs it

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        return {"bleu": float("nan"), "chrf": float("nan"), "n": 0}
    bleu = sacrebleu.metrics.BLEU(**({"tokenize": tokenize} if tokenize else {}))
    chrf = sacrebleu.metrics.CHRF()
    return {
        "bleu": float(bleu.corpus_score(hypotheses, [references]).score),
        "chrf": float(chrf.corpus_score(hypotheses, [references]).score),
        "n": len(hypotheses),
        # BLEU depends on its tokenizer (13a, zh, char here by target language): the signature says which, so a
        # score can be compared with a paper's
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
