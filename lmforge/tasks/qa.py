"""Extractive question answering (SQuAD v1/v2 style) with any encoder that has a fast tokenizer.

A question and its context are tokenised as a pair; a context longer than max_length is cut into
overlapping windows (doc_stride tokens shared between neighbours), each window a training feature. The
model's QA head scores every token as the answer's start and end; the label of a window is the answer's
first and last token, or the CLS token when the answer is not wholly inside the window or the question
has no answer. At evaluation the best valid span over all windows of an example is the prediction; with
SQuAD v2 data (some questions unanswerable) the empty answer wins when the CLS ("null") score beats it.

Offsets come from the fast tokenizer (return_offsets_mapping), so answers are cut from the original
context text, never detokenised.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lmforge.data.labelled import Loaded
from lmforge.errors import LmforgeError
from lmforge.evaluate.task_metrics import squad_metrics
from lmforge.tasks.base import EvalResult, Task, dtype_kw, load_pretrained, pad_batch


# ----------------------------------------------------------------------------------------------- windows

def _context_first(tokenizer) -> bool:
    # HF run_qa: a tokenizer that pads on the left (XLNet-style) puts the context first, so that truncation
    # and padding happen on the question's far side
    return tokenizer.padding_side == "left"


def _cap_questions(tokenizer, questions: list[str], max_q: int) -> tuple[list[str], list[int]]:
    """Questions cut to at most `max_q` tokens (the context needs room), and their token counts."""
    enc = tokenizer(questions, add_special_tokens=False, return_offsets_mapping=True)
    out, lengths = [], []
    for q, ids, offsets in zip(questions, enc["input_ids"], enc["offset_mapping"]):
        if len(ids) > max_q:
            q = q[: offsets[max_q - 1][1]]
            ids = ids[:max_q]
        out.append(q)
        lengths.append(len(ids))
    return out, lengths


def make_windows(tokenizer, questions: list[str], contexts: list[str], max_length: int,
                 doc_stride: int) -> list[dict]:
    """Tokenise each (question, context) into one or more windows, in example order.

    Each window: input_ids, attention_mask, token_type_ids (when the tokenizer makes them), example_index,
    offsets (per token: (char_start, char_end) in the context for context tokens, None elsewhere) and
    cls_index (where the "no answer" logits are read)."""
    if not getattr(tokenizer, "is_fast", False):
        raise LmforgeError("qa needs a fast (Rust) tokenizer: answer spans are located with offset mappings")
    specials = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_length - specials
    if room < 4:
        raise LmforgeError(f"--max-length {max_length} leaves no room for a question and a context")
    # some SQuAD questions start with runs of spaces that would only waste window positions (as run_qa does)
    questions = [q.lstrip() for q in questions]
    # a question may take at most half the window, so every window still shows a useful piece of context
    questions, q_lens = _cap_questions(tokenizer, questions, room // 2)
    context_first = _context_first(tokenizer)
    ctx_seq = 0 if context_first else 1
    # The stride is the overlap between neighbouring windows. The Rust tokenizer panics (an uncatchable
    # PanicException) unless it is below the tokens left for the context (room - question tokens), and an
    # overlap near that bound moves each window on by a token or two: a 600-token context at --max-length 128
    # would become ~480 windows. So overlap at most half the context room, per example, and tokenise each
    # distinct stride together.
    strides = [max(0, min(doc_stride, (room - q) // 2)) for q in q_lens]
    groups: dict[int, list[int]] = defaultdict(list)
    for i, s in enumerate(strides):
        groups[s].append(i)
    per_example: list[list[dict]] = [[] for _ in questions]
    cls = tokenizer.cls_token_id  # BERT puts it first; XLNet-style tokenizers last; some have none (then 0)
    for stride, idx in groups.items():
        qs = [questions[i] for i in idx]
        cs = [contexts[i] for i in idx]
        enc = tokenizer(cs if context_first else qs, qs if context_first else cs,
                        truncation="only_first" if context_first else "only_second", max_length=max_length,
                        stride=stride, return_overflowing_tokens=True, return_offsets_mapping=True)
        has_types = "token_type_ids" in enc
        for w, sample in enumerate(enc["overflow_to_sample_mapping"]):
            ids = enc["input_ids"][w]
            seq = enc.sequence_ids(w)
            offsets = [tuple(o) if s == ctx_seq else None for o, s in zip(enc["offset_mapping"][w], seq)]
            window = {
                "input_ids": ids,
                "attention_mask": enc["attention_mask"][w],
                "example_index": idx[sample],
                "offsets": offsets,
                "cls_index": ids.index(cls) if cls is not None and cls in ids else 0,
            }
            if has_types:
                window["token_type_ids"] = enc["token_type_ids"][w]
            per_example[idx[sample]].append(window)
    return [w for windows in per_example for w in windows]


def span_labels(offsets: list, cls_index: int, answer_start: int | None, answer_text: str | None) -> tuple[int, int]:
    """(start token, end token) of the answer in a window, or (cls, cls) when it is absent or cut off."""
    if answer_start is None or not answer_text:
        return cls_index, cls_index
    start_char, end_char = answer_start, answer_start + len(answer_text)
    ctx = [i for i, o in enumerate(offsets) if o is not None]
    if not ctx or offsets[ctx[0]][0] > start_char or offsets[ctx[-1]][1] < end_char:
        return cls_index, cls_index  # not wholly inside this window: the model should say "not here"
    # the last token starting at or before the answer's first char, the first ending at or after its last;
    # looking at context tokens only (HF's walk can run onto [SEP] when the answer ends the window)
    start = max(i for i in ctx if offsets[i][0] <= start_char)
    end = min(i for i in ctx if offsets[i][1] >= end_char)
    return start, end


# ----------------------------------------------------------------------------------------------- spans

@dataclass
class WindowLogits:
    start_logits: np.ndarray  # (T,) one window's start scores, padding removed
    end_logits: np.ndarray  # (T,)
    offsets: list  # (T,) (char_start, char_end) for context tokens, None elsewhere
    cls_index: int = 0


def best_span(context: str, windows: list[WindowLogits], n_best: int = 20, max_answer_length: int = 30,
              allow_null: bool = False) -> dict[str, Any]:
    """The best answer over an example's windows (HF postprocess_qa_predictions, vectorised).

    Per window: the n_best highest start and end logits among context tokens, pairs with end >= start and
    at most max_answer_length tokens, scored start_logit + end_logit. The null score is the CLS start + end,
    the lowest over windows (the window that looks at the answer is the one least sure there is none).
    With allow_null (SQuAD v2) the empty answer is predicted when the null score beats the best span.
    Returns {"answer", "score", "start", "end", "null_score"}; start/end are character offsets in
    `context` (end exclusive), None for the empty answer."""
    best_score, best_chars = -np.inf, None
    null_score = np.inf
    for w in windows:
        s_log = np.asarray(w.start_logits, dtype=np.float64)  # (T,)
        e_log = np.asarray(w.end_logits, dtype=np.float64)  # (T,)
        null_score = min(null_score, float(s_log[w.cls_index] + e_log[w.cls_index]))
        in_ctx = np.array([o is not None for o in w.offsets], dtype=bool)  # (T,) context tokens
        if not in_ctx.any():
            continue
        # rank only context tokens, so n_best candidates are not spent on question or special tokens
        k = min(n_best, int(in_ctx.sum()))
        s_idx = np.argsort(np.where(in_ctx, s_log, -np.inf))[::-1][:k]  # (k,) best starts first
        e_idx = np.argsort(np.where(in_ctx, e_log, -np.inf))[::-1][:k]  # (k,)
        length = e_idx[None, :] - s_idx[:, None] + 1  # (k, k) span length in tokens
        valid = (length >= 1) & (length <= max_answer_length)  # (k, k)
        if not valid.any():
            continue
        scores = np.where(valid, s_log[s_idx][:, None] + e_log[e_idx][None, :], -np.inf)  # (k, k)
        i, j = np.unravel_index(int(np.argmax(scores)), scores.shape)
        if scores[i, j] > best_score:
            best_score = float(scores[i, j])
            best_chars = (w.offsets[s_idx[i]][0], w.offsets[e_idx[j]][1])
    null_score = float(null_score) if np.isfinite(null_score) else None
    if best_chars is None or (allow_null and null_score is not None and null_score > best_score):
        # no valid span at all (e.g. a tiny max_answer_length) also falls back to the empty answer
        return {"answer": "", "score": null_score, "start": None, "end": None, "null_score": null_score}
    start, end = best_chars
    # byte-level BPE offsets cover a word's leading space (" Noah"): the answer is the words, not the gap
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    return {"answer": context[start:end], "score": best_score, "start": start, "end": end,
            "null_score": null_score}


# ----------------------------------------------------------------------------------------------- model

def _model_batch(feats: list[dict], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    return pad_batch(feats, {"input_ids": pad_id, "attention_mask": 0, "token_type_ids": 0}, multiple)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def run_windows(model, windows: list[dict], pad_id: int, device, batch_size: int, autocast_ctx=None,
                progress=None) -> list[WindowLogits]:
    """Start/end logits for every window (in the given order), in length-sorted batches."""
    out: list[WindowLogits | None] = [None] * len(windows)
    # longest first: similar lengths share a batch (little padding), and memory peaks at the start
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]["input_ids"]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        batch = {k: v.to(device) for k, v in _model_batch([windows[i] for i in idx], pad_id).items()}
        if autocast_ctx is not None:
            with autocast_ctx():
                res = model(**batch)
        else:
            res = model(**batch)
        starts = res.start_logits.float().cpu().numpy()  # (B, T)
        ends = res.end_logits.float().cpu().numpy()  # (B, T)
        for row, i in enumerate(idx):
            n = len(windows[i]["input_ids"])
            out[i] = WindowLogits(starts[row, :n], ends[row, :n], windows[i]["offsets"], windows[i]["cls_index"])
        if progress is not None:
            progress(len(idx))
    return out  # type: ignore[return-value]


@torch.no_grad()
def answer(model, tokenizer, question: str, context: str, *, max_length: int = 384, doc_stride: int = 128,
           max_answer_length: int = 30, n_best: int = 20, allow_null: bool = False, device=None,
           batch_size: int = 16) -> dict[str, Any]:
    """Answer one question from one context: {"answer", "score", "start", "end"} (start/end are character
    offsets into `context`, end exclusive; None, with answer "", when the model says there is none and
    allow_null is set)."""
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        windows = make_windows(tokenizer, [question], [context], max_length, doc_stride)
        logits = run_windows(model, windows, _pad_id(tokenizer), device, batch_size)
    finally:
        model.train(was_training)
    best = best_span(context, logits, n_best=n_best, max_answer_length=max_answer_length, allow_null=allow_null)
    return {k: best[k] for k in ("answer", "score", "start", "end")}


# ----------------------------------------------------------------------------------------------- task

def _unanswerable(loaded: Loaded) -> bool:
    return any(not r["answers"]["text"] for r in loaded.rows)


class QATask(Task):
    name = "qa"
    auto_class = "AutoModelForQuestionAnswering"
    peft_task_type = "QUESTION_ANS"
    metric = "f1"
    default_max_length = 384
    default_lr = 1e-4  # small encoders (MiniLM) learn span heads slowly at BERT's usual 3e-5
    default_lora_lr = 1e-3
    default_batch_size = 16

    def __init__(self, cfg):
        super().__init__(cfg)
        self.allow_null = False  # SQuAD v2 mode: set by prepare() when any split has unanswerable questions

    def fields(self) -> dict[str, str | None]:
        out = {"question": self.cfg.question_field, "context": self.cfg.context_field,
               "answers": self.cfg.answers_field}
        for role in ("id", "answer_start"):  # not FinetuneConfig options today; honoured if one appears
            value = getattr(self.cfg, f"{role}_field", None)
            if value is not None:
                out[role] = value
        return out

    def prepare(self, tokenizer, train: Loaded, others: dict[str, Loaded]) -> None:
        super().prepare(tokenizer, train, others)
        if not getattr(tokenizer, "is_fast", False):
            raise LmforgeError("qa needs a fast (Rust) tokenizer: answer spans are located with offset mappings")
        self.allow_null = _unanswerable(train) or any(_unanswerable(x) for x in others.values())

    def load_model(self, path, dtype=None):
        from transformers import AutoModelForQuestionAnswering

        return load_pretrained(AutoModelForQuestionAnswering, path, **dtype_kw(dtype or torch.float32),
                               no_head="qa needs an encoder such as minilm-l6 (BERT-like)")

    def _windows(self, loaded: Loaded) -> list[dict]:
        rows = loaded.rows
        windows = make_windows(self.tokenizer, [r["question"] for r in rows], [r["context"] for r in rows],
                               self.max_length, self.cfg.doc_stride)
        for w in windows:
            ans = rows[w["example_index"]]["answers"]
            # train on the first gold answer (SQuAD train sets have exactly one)
            first_start = ans["answer_start"][0] if ans["text"] else None
            first_text = ans["text"][0] if ans["text"] else None
            w["start_positions"], w["end_positions"] = span_labels(w["offsets"], w["cls_index"], first_start,
                                                                  first_text)
        return windows

    def features(self, loaded: Loaded, train: bool = True) -> list[dict]:
        """One feature per window. Training features drop the bookkeeping (offsets, example index) that only
        evaluation needs, keeping memory and batching cheap."""
        windows = self._windows(loaded)
        if not train:
            return windows
        keep = ("input_ids", "attention_mask", "token_type_ids", "start_positions", "end_positions")
        return [{k: w[k] for k in keep if k in w} for w in windows]

    def loss(self, model, batch):
        """transformers' QA loss (the mean of the start and end cross-entropies), over the window's tokens only:
        its own takes the softmax over the padding as well, so an example's loss (and gradient) would depend on
        how long the other windows of its batch are, and one big batch would not train as its parts do."""
        out = model(**{k: v for k, v in batch.items() if k not in ("start_positions", "end_positions")})
        pad = batch["attention_mask"] == 0  # (B, T)
        ce = torch.nn.functional.cross_entropy
        start = ce(out.start_logits.float().masked_fill(pad, float("-inf")), batch["start_positions"])
        end = ce(out.end_logits.float().masked_fill(pad, float("-inf")), batch["end_positions"])
        return (start + end) / 2

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        batch = _model_batch(feats, _pad_id(self.tokenizer), self.pad_multiple)  # (B, T) each
        if "start_positions" in feats[0]:
            batch["start_positions"] = torch.tensor([f["start_positions"] for f in feats], dtype=torch.long)  # (B,)
            batch["end_positions"] = torch.tensor([f["end_positions"] for f in feats], dtype=torch.long)  # (B,)
        return batch

    @torch.no_grad()
    def evaluate(self, model, loaded: Loaded, autocast_ctx, device, batch_size: int) -> EvalResult:
        rows = loaded.rows
        windows = self._windows(loaded)
        logits = run_windows(model, windows, _pad_id(self.tokenizer), device, batch_size, autocast_ctx)
        by_example: dict[int, list[WindowLogits]] = defaultdict(list)
        for w, lg in zip(windows, logits):
            by_example[w["example_index"]].append(lg)
        allow_null = self.allow_null or _unanswerable(loaded)
        preds: dict[str, str] = {}
        golds: dict[str, list[str]] = {}
        predictions = []
        for i, row in enumerate(rows):
            best = best_span(row["context"], by_example.get(i, []), n_best=self.cfg.n_best,
                             max_answer_length=self.cfg.max_answer_length, allow_null=allow_null)
            preds[row["id"]] = best["answer"]
            golds[row["id"]] = list(row["answers"]["text"])
            predictions.append({"id": row["id"], "question": row["question"], "prediction": best["answer"],
                                "answers": golds[row["id"]], "score": best["score"]})
        metrics = squad_metrics(preds, golds)
        metrics["n"] = len(rows)
        return EvalResult(metrics, predictions)

    def attach(self, path, tokenizer, extras: dict):
        self.tokenizer = tokenizer
        self.allow_null = bool(extras.get("qa", {}).get("allow_null", False))
        return self.load_model(path)

    def config_extras(self) -> dict:
        # what a later `predict` needs to answer the way evaluation did
        return {"qa": {"max_length": self.max_length, "doc_stride": self.cfg.doc_stride,
                       "max_answer_length": self.cfg.max_answer_length, "n_best": self.cfg.n_best,
                       "allow_null": self.allow_null}}
