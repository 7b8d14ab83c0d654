"""The qa task: windowing and span labels, span post-processing, evaluation and a short overfit.

A tiny random-init BERT (hidden 32, 2 layers) with the packaged MiniLM tokenizer keeps this CPU-cheap."""
from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from lmforge.data.labelled import Loaded
from lmforge.recipes.finetune import FinetuneConfig
from lmforge.tasks.qa import QATask, WindowLogits, answer, best_span, make_windows

FILLER = ("The river flows past the old mill and the village green where children play every summer "
          "afternoon while farmers bring their carts to market along the dusty road near the church ")
ANSWER = "a keeper of sheep"
LONG_CONTEXT = FILLER * 3 + f"Abel was {ANSWER} and Cain tilled the ground. " + FILLER * 3


def _row(qid, question, context, answer_text=None):
    answers = ({"text": [answer_text], "answer_start": [context.index(answer_text)]} if answer_text
               else {"text": [], "answer_start": []})
    return {"id": qid, "question": question, "context": context, "answers": answers}


def _loaded(rows):
    return Loaded(rows=rows, source="test", line_numbers=list(range(1, len(rows) + 1)))




@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from lmforge.model.hub import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A random-init tiny BERT QA model saved with the MiniLM tokenizer, as a Hugging Face folder."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    path = tmp_path_factory.mktemp("tiny_qa")
    BertForQuestionAnswering(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _task(tokenizer, rows=(), **kw):
    cfg = FinetuneConfig(task="qa", **kw)
    task = QATask(cfg)
    task.prepare(tokenizer, _loaded(list(rows) or [_row("x", "q?", "c", None)]), {})
    return task


# ---------------------------------------------------------------------------------------------- features

def test_fields_and_defaults():
    task = QATask(FinetuneConfig(task="qa", question_field="q", context_field="passage", answers_field="ans"))
    assert task.fields() == {"question": "q", "context": "passage", "answers": "ans"}
    assert task.max_length == 384 and task.peft_task_type == "QUESTION_ANS" and task.metric == "f1"


def test_long_context_windows_point_at_answer(tokenizer):
    row = _row("1", "What was Abel?", LONG_CONTEXT, ANSWER)
    task = _task(tokenizer, [row], max_length=48, doc_stride=16)
    feats = task.features(_loaded([row]), train=True)
    assert len(feats) > 3  # a long context becomes several overlapping windows
    start_char = LONG_CONTEXT.index(ANSWER)
    end_char = start_char + len(ANSWER)
    windows = make_windows(tokenizer, [row["question"]], [row["context"]], 48, 16)
    assert len(windows) == len(feats)
    hits = 0
    for f, w in zip(feats, windows):
        assert set(f) >= {"input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions"}
        assert len(f["input_ids"]) <= 48
        ctx = [o for o in w["offsets"] if o is not None]
        inside = ctx[0][0] <= start_char and ctx[-1][1] >= end_char
        if inside:
            hits += 1
            s, e = f["start_positions"], f["end_positions"]
            assert 0 < s <= e
            assert tokenizer.decode(f["input_ids"][s:e + 1]).lower() == ANSWER.lower()
        else:
            assert (f["start_positions"], f["end_positions"]) == (0, 0)
    assert hits >= 1 and hits < len(feats)


def test_a_stride_above_the_window_overlaps_half_not_all(tokenizer):
    # --doc-stride 128 (the default) with --max-length 48: neighbouring windows share at most half their
    # context, so each moves on by half a window, not by a token (which made hundreds of windows)
    windows = make_windows(tokenizer, ["What was Abel?"], [LONG_CONTEXT], 48, 128)
    firsts = [next(o for o in w["offsets"] if o is not None)[0] for w in windows]
    n_ctx = len(tokenizer(LONG_CONTEXT, add_special_tokens=False)["input_ids"])
    room = 48 - tokenizer.num_special_tokens_to_add(pair=True) - len(tokenizer("What was Abel?",
                                                                              add_special_tokens=False)["input_ids"])
    assert len(windows) <= 2 * n_ctx / room + 1
    assert firsts == sorted(set(firsts))  # every window starts further on
    ends = [[o for o in w["offsets"] if o is not None][-1][1] for w in windows]
    assert ends[-1] == len(LONG_CONTEXT.rstrip())  # and the context is still covered to its end


def test_unanswerable_points_at_cls(tokenizer):
    row = _row("1", "Who built the mill?", FILLER, None)
    task = _task(tokenizer, [row], max_length=32, doc_stride=8)
    feats = task.features(_loaded([row]), train=True)
    assert len(feats) > 1
    assert all((f["start_positions"], f["end_positions"]) == (0, 0) for f in feats)
    assert task.allow_null  # the data has an unanswerable question: SQuAD v2 mode


def test_answer_ending_a_window_and_long_question(tokenizer):
    # the answer is the context's last word: the end label must stay on it, not run onto [SEP]
    context = "The mill stands by the river near Abel"
    row = _row("1", "Who? " * 40, context, "Abel")  # a question longer than the window is cut, no panic
    feats = _task(tokenizer, [row], max_length=24, doc_stride=128).features(_loaded([row]))
    labelled = [f for f in feats if f["start_positions"]]
    assert labelled and all(tokenizer.decode(f["input_ids"][f["start_positions"]:f["end_positions"] + 1]) == "abel"
                            for f in labelled)


def test_context_first_for_left_padding_tokenizers(tokenizer):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.padding_side = "left"
    row = _row("1", "What was Abel?", LONG_CONTEXT, ANSWER)
    task = _task(tok, [row], max_length=48, doc_stride=16)
    feats = task.features(_loaded([row]))
    labelled = [f for f in feats if f["start_positions"]]
    assert labelled
    for f in labelled:
        assert f["token_type_ids"][f["start_positions"]] == 0  # the context is the first sequence now
        assert tok.decode(f["input_ids"][f["start_positions"]:f["end_positions"] + 1]).lower() == ANSWER


def test_collate_pads(tokenizer):
    rows = [_row("1", "What was Abel?", "Abel was a keeper of sheep.", ANSWER),
            _row("2", "Who?", "Nobody knows anything at all about this long story here.", None)]
    task = _task(tokenizer, rows)
    feats = task.features(_loaded(rows))
    batch = task.collate(feats)
    B, T = batch["input_ids"].shape
    assert B == 2 and T == max(len(f["input_ids"]) for f in feats)  # padded to the longest only
    assert batch["attention_mask"].shape == batch["token_type_ids"].shape == (B, T)
    assert batch["start_positions"].dtype == torch.long and batch["start_positions"].shape == (B,)
    assert batch["end_positions"].tolist()[1] == 0


# ---------------------------------------------------------------------------------------------- spans

def _window(start, end, n_question=3, context_tokens=None):
    """Hand-made logits over [CLS] q q q [SEP] c0 c1 ... [SEP]; context token i covers chars 10i..10i+5."""
    T = len(start)
    n_ctx = context_tokens if context_tokens is not None else T - n_question - 3
    offsets = [None] * (n_question + 2) + [(10 * i, 10 * i + 5) for i in range(n_ctx)]
    offsets += [None] * (T - len(offsets))
    return WindowLogits(np.array(start, float), np.array(end, float), offsets, 0)


CTX = "".join(f"w{i:02d}__     " for i in range(20))  # token i is CTX[10i:10i+5] == "wNN__"


def test_best_span_picks_best_valid_span():
    T = 14  # 5 positions before the context, 8 context tokens, final [SEP]
    start, end = np.zeros(T), np.zeros(T)
    start[7], end[9] = 5.0, 4.0  # context tokens 2..4
    start[2], end[2] = 9.0, 9.0  # a question token: never part of an answer
    end[6] = 8.0  # ends before the best start: invalid with start 7
    out = best_span(CTX, [_window(start, end)])
    assert (out["start"], out["end"]) == (20, 45)
    assert out["answer"] == CTX[20:45] and out["score"] == pytest.approx(9.0)


def test_best_span_leaves_out_the_space_a_byte_level_token_carries():
    # byte-level BPE: " Noah" is one token whose offsets start at the space
    ctx = "Who? Noah built the ark. "
    start, end = np.zeros(8), np.zeros(8)
    start[5], end[6] = 5.0, 5.0
    w = WindowLogits(start, end, [None] * 5 + [(4, 9), (9, 15), (24, 25)], 0)
    out = best_span(ctx, [w])
    assert out["answer"] == "Noah built" and (out["start"], out["end"]) == (5, 15)


def test_best_span_respects_max_answer_length():
    T = 14
    start, end = np.zeros(T), np.zeros(T)
    start[5], end[12] = 5.0, 5.0  # 8 tokens long
    end[6] = 2.0  # 2 tokens long
    assert best_span(CTX, [_window(start, end)], max_answer_length=30)["start"] == 0
    out = best_span(CTX, [_window(start, end)], max_answer_length=3)
    assert (out["start"], out["end"]) == (0, 15) and out["score"] == pytest.approx(7.0)


def test_best_span_null_logic_and_windows():
    T = 14
    start, end = np.zeros(T), np.zeros(T)
    start[0], end[0] = 6.0, 6.0  # null 12
    start[6], end[7] = 5.0, 5.0  # span 10
    w1 = _window(start, end)
    # v1: always a span; v2: the null score beats the best span
    assert best_span(CTX, [w1], allow_null=False)["answer"] == CTX[10:25]
    v2 = best_span(CTX, [w1], allow_null=True)
    assert v2["answer"] == "" and v2["start"] is None and v2["score"] == pytest.approx(12.0)
    # a second window with a low null score: the null score is the minimum over windows, so the span wins
    s2, e2 = np.zeros(T), np.zeros(T)
    s2[0], e2[0] = -3.0, -3.0
    s2[8], e2[8] = 1.0, 1.0
    out = best_span(CTX, [w1, _window(s2, e2)], allow_null=True)
    assert out["answer"] == CTX[10:25] and out["null_score"] == pytest.approx(-6.0)
    # the best span across windows wins
    s3, e3 = np.zeros(T), np.zeros(T)
    s3[9], e3[9] = 20.0, 20.0
    assert best_span(CTX, [w1, _window(s3, e3)])["answer"] == CTX[40:45]


def test_best_span_n_best_limits_candidates():
    start = np.array([0, 0, 0, 0, 0, 9, 8, 7, 0, 0, 0, 0, 0, 0], float)
    end = np.array([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0], float)  # only position 12 is a good end
    # with n_best=1 the only end candidate is 12 and the only start 5: 8 tokens, too long for length 3
    assert best_span(CTX, [_window(start, end)], n_best=1, max_answer_length=3)["answer"] == ""
    assert best_span(CTX, [_window(start, end)], n_best=20, max_answer_length=3)["answer"] != ""


# ---------------------------------------------------------------------------------------------- model

def _train_rows():
    return [_row("a", "What was Abel?", "Abel was a keeper of sheep, and Cain was a tiller of the ground.",
                 "a keeper of sheep"),
            _row("b", "Who killed Abel?", "In the field Cain rose up against his brother and killed him.", "Cain"),
            _row("c", "Where did they go?", "Cain said to Abel, let us go into the field, and they went.",
                 "into the field"),
            _row("d", "What colour is the sky?", "Yahweh respected Abel and his offering of the flock.", None)]


def test_evaluate_end_to_end(tiny_dir, tokenizer):
    rows = _train_rows()
    task = _task(tokenizer, rows, max_length=32, doc_stride=8)
    model = task.load_model(tiny_dir).eval()
    result = task.evaluate(model, _loaded(rows), contextlib.nullcontext, torch.device("cpu"), batch_size=2)
    m = result.metrics
    assert {"exact_match", "f1", "n", "HasAns_f1", "NoAns_f1"} <= set(m)
    assert m["n"] == 4 and 0.0 <= m["f1"] <= 100.0
    assert [p["id"] for p in result.predictions] == ["a", "b", "c", "d"]
    for p, row in zip(result.predictions, rows):
        assert set(p) == {"id", "question", "prediction", "answers", "score"}
        assert p["answers"] == row["answers"]["text"]
        assert p["prediction"] == "" or p["prediction"] in row["context"]
    out = answer(model, tokenizer, "What was Abel?", rows[0]["context"], max_length=32, doc_stride=8)
    assert set(out) == {"answer", "score", "start", "end"}
    assert out["answer"] == rows[0]["context"][out["start"]:out["end"]]


def test_overfit_lowers_loss(tiny_dir, tokenizer):
    rows = _train_rows()
    task = _task(tokenizer, rows, max_length=64)
    torch.manual_seed(0)
    model = task.load_model(tiny_dir).train()
    batch = task.collate(task.features(_loaded(rows), train=True))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


class _Oracle(torch.nn.Module):
    """Stands in for a perfect QA model: logits peak at each window's labelled start/end (CLS when the
    window has no answer), so evaluation must reproduce the gold answers exactly."""

    def __init__(self, feats):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.labels = {tuple(f["input_ids"]): (f["start_positions"], f["end_positions"]) for f in feats}

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        from types import SimpleNamespace

        start = torch.zeros(input_ids.shape)  # (B, T)
        end = torch.zeros(input_ids.shape)  # (B, T)
        for b, (ids, mask) in enumerate(zip(input_ids.tolist(), attention_mask.tolist())):
            s, e = self.labels[tuple(ids[:sum(mask)])]
            start[b, s] += 10.0
            end[b, e] += 10.0
        return SimpleNamespace(start_logits=start, end_logits=end)


@pytest.mark.parametrize("with_unanswerable", [True, False])
def test_evaluate_with_oracle_logits_is_exact(tokenizer, with_unanswerable):
    rows = _train_rows() + [_row("long", "What was Abel?", LONG_CONTEXT, ANSWER)]
    if not with_unanswerable:
        rows = [r for r in rows if r["answers"]["text"]]
    task = _task(tokenizer, rows, max_length=40, doc_stride=12)
    assert task.allow_null == with_unanswerable
    feats = task.features(_loaded(rows), train=True)
    assert len(feats) > len(rows)  # the long context spans several windows, most without the answer
    result = task.evaluate(_Oracle(feats), _loaded(rows), contextlib.nullcontext, torch.device("cpu"), 3)
    assert result.metrics["exact_match"] == 100.0 and result.metrics["f1"] == 100.0
    assert [p["prediction"] for p in result.predictions] == [(r["answers"]["text"] or [""])[0] for r in rows]
