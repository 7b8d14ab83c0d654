"""Text classification (and regression) on any encoder or decoder: AutoModelForSequenceClassification.

Labels may be strings or ints (classes; the map is stored in config.id2label) or floats (regression:
one output, MSE loss, Pearson/Spearman). Sentence pairs are supported through a text_pair field.
"""
from __future__ import annotations

import numpy as np
import torch

from lmforge.data.labelled import Loaded, build_label_map, check_label_names, check_labels
from lmforge.errors import LmforgeError
from lmforge.evaluate.task_metrics import classification_metrics, regression_metrics
from lmforge.tasks.base import EvalResult, Task, dtype_kw, load_pretrained, pad_batch


def _is_number(x) -> bool:
    try:
        return np.isfinite(float(x))
    except (TypeError, ValueError):
        return False


class ClassifyTask(Task):
    name = "classify"
    auto_class = "AutoModelForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    metric = "accuracy"
    default_max_length = 128
    default_lr = 1e-4  # small encoders (MiniLM) converge in one or two epochs at 1e-4; 5e-5 is slower
    default_lora_lr = 1e-3
    default_batch_size = 32

    def fields(self):
        return {"text": self.cfg.text_field, "text_pair": self.cfg.text_pair_field, "label": self.cfg.label_field}

    def prepare(self, tokenizer, train: Loaded, others: dict[str, Loaded]) -> None:
        super().prepare(tokenizer, train, others)
        self.labels, self.regression = build_label_map([r["label"] for r in train.rows],
                                                       {k: [r["label"] for r in v.rows] for k, v in others.items()},
                                                       train.source)
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}
        if self.regression:
            self.metric = "pearson"
        else:
            check_label_names(train)
            for loaded in others.values():
                check_label_names(loaded)
                # a CSV's class 1 is a JSON file's "1": the same class, as `lmforge evaluate` reads it
                for r in loaded.rows:
                    r["label"] = self.gold(r["label"])
                check_labels([r["label"] for r in loaded.rows], self.labels, loaded, skip=self.cfg.skip_bad_rows)
        if tokenizer.pad_token_id is None:  # decoder-only tokenizers: pad with EOS (masked out anyway)
            if tokenizer.eos_token is None:
                raise LmforgeError("the tokenizer has neither a pad nor an EOS token to pad batches with")
            tokenizer.pad_token = tokenizer.eos_token

    def attach(self, path, tokenizer, extras: dict):
        from transformers import AutoModelForSequenceClassification

        self.tokenizer = tokenizer
        model = load_pretrained(AutoModelForSequenceClassification, path)
        self.regression = model.config.problem_type == "regression" or model.config.num_labels == 1
        self.labels = [] if self.regression else [model.config.id2label[i] for i in range(model.config.num_labels)]
        self.label_index = {lab: i for i, lab in enumerate(self.labels)}
        if self.regression:
            self.metric = "pearson"
        return model

    def gold(self, label):
        """A data label in the model's label space: a saved model knows its labels as strings, a CSV's class
        1 is a JSON file's "1", and "1.0" is 1. A label that matches no class is returned as it is."""
        if self.regression or isinstance(label, bool) or label in self.label_index:
            return label
        for name in self.labels:
            if str(name) == str(label):
                return name
        try:
            value = float(label)
        except (TypeError, ValueError):
            return label
        for name in self.labels:
            try:
                if not isinstance(name, bool) and float(name) == value:
                    return name
            except (TypeError, ValueError):
                continue
        return label

    def load_model(self, path, dtype=None):
        from transformers import AutoModelForSequenceClassification

        kw = dict(num_labels=1, problem_type="regression") if self.regression else dict(
            num_labels=len(self.labels), problem_type="single_label_classification",
            id2label={i: str(lab) for i, lab in enumerate(self.labels)},
            label2id={str(lab): i for i, lab in enumerate(self.labels)})
        model = load_pretrained(AutoModelForSequenceClassification, path, **kw, **dtype_kw(dtype or torch.float32))
        # Decoder classifiers read the last non-pad token: they must know the pad id.
        model.config.pad_token_id = self.tokenizer.pad_token_id
        return model

    def _encode(self, loaded: Loaded, with_labels: bool) -> list[dict]:
        rows = loaded.rows
        pairs = [r.get("text_pair") for r in rows]
        enc = self.tokenizer([r["text"] for r in rows], pairs if any(p is not None for p in pairs) else None,
                             truncation=True, max_length=self.max_length)
        feats = []
        for i in range(len(rows)):
            f = {k: enc[k][i] for k in enc.keys() if k in ("input_ids", "attention_mask", "token_type_ids")}
            if with_labels:
                lab = rows[i]["label"]
                f["labels"] = float(lab) if self.regression else self.label_index[lab]
            feats.append(f)
        return feats

    def features(self, loaded: Loaded, train: bool) -> list[dict]:
        return self._encode(loaded, with_labels=True)

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        batch = pad_batch(feats, {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0,
                                  "token_type_ids": 0}, self.pad_multiple)
        if "labels" in feats[0]:
            dtype = torch.float32 if self.regression else torch.long
            batch["labels"] = torch.tensor([f["labels"] for f in feats], dtype=dtype)
        return batch

    @torch.no_grad()
    def scores(self, model, feats: list[dict], autocast_ctx, device, batch_size: int) -> np.ndarray:
        """(N, C) class probabilities, or (N,) regression outputs, in the order of `feats`."""
        order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))  # less padding
        out: list = [None] * len(feats)
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            batch = {k: v.to(device) for k, v in self.collate([feats[i] for i in idx]).items() if k != "labels"}
            with autocast_ctx():
                logits = model(**batch).logits.float()  # (B, C)
            vals = logits[:, 0] if self.regression else logits.softmax(-1)
            for i, v in zip(idx, vals.cpu().numpy()):
                out[i] = v
        return np.stack(out)

    def evaluate(self, model, loaded: Loaded, autocast_ctx, device, batch_size: int) -> EvalResult:
        feats = self._encode(loaded, with_labels=False)
        scores = self.scores(model, feats, autocast_ctx, device, batch_size)
        gold = [self.gold(r["label"]) for r in loaded.rows]
        if not self.regression:
            check_labels(gold, self.labels, loaded)
        preds = []
        if self.regression:
            not_numbers = [i for i, g in enumerate(gold) if isinstance(g, bool) or not _is_number(g)]
            if not_numbers:
                i = not_numbers[0]
                raise LmforgeError(f"{loaded.loc(i)}: label {gold[i]!r} is not a number; this model is a regressor "
                                   f"(one score per text)")
            pred = [float(x) for x in scores]
            metrics = regression_metrics([float(g) for g in gold], pred)
            for r, p in zip(loaded.rows, pred):
                preds.append({"text": r["text"], "label": r["label"], "prediction": p})
        else:
            pred = [self.labels[i] for i in scores.argmax(-1)]
            metrics = classification_metrics(gold, pred, self.labels)
            # gold and predicted labels by the names the saved model knows them as (config.id2label), as
            # `lmforge predict` and serve print them: the same file whether finetune or evaluate writes it,
            # and a CSV's class 1 compares equal to a JSON file's "1"
            for r, g, p, s in zip(loaded.rows, gold, pred, scores):
                row = {"text": r["text"], "label": str(g), "prediction": str(p),
                       "probabilities": {str(lab): round(float(x), 5) for lab, x in zip(self.labels, s)}}
                if r.get("text_pair") is not None:
                    row["text_pair"] = r["text_pair"]
                preds.append(row)
        return EvalResult(metrics, preds)


def trained_max_length(extras: dict, fallback: int) -> int:
    """The truncation a classifier fine-tuned here was trained and evaluated with (its lmforge_config.yaml), so
    `predict` and `serve` score a long text exactly as `evaluate` does; `fallback` for other folders."""
    finetune = (extras or {}).get("finetune")
    if not finetune:
        return fallback
    return int(finetune.get("max_length") or ClassifyTask.default_max_length)


def classify_texts(model, tokenizer, texts: list[str], max_length: int = 512, batch_size: int = 32,
                   pairs: list[str] | None = None) -> list[dict]:
    """For `lmforge predict` and serving: [{"label", "score", "scores": {label: p}}] per text (and second text
    of its pair, for a model fine-tuned on pairs)."""
    model.eval()
    id2label = model.config.id2label
    regression = model.config.problem_type == "regression" or model.config.num_labels == 1
    out = []
    with torch.no_grad():
        for s in range(0, len(texts), batch_size):
            enc = tokenizer(texts[s:s + batch_size], pairs[s:s + batch_size] if pairs else None, truncation=True,
                            max_length=max_length, padding=True, return_tensors="pt")
            logits = model(**enc).logits.float()  # (B, C)
            if regression:
                out += [{"score": float(v)} for v in logits[:, 0]]
                continue
            probs = logits.softmax(-1)
            for p in probs:
                scores = {id2label[i]: round(float(p[i]), 5) for i in range(len(p))}
                best = int(p.argmax())
                out.append({"label": id2label[best], "score": round(float(p[best]), 5), "scores": scores})
    return out


def single_texts(extras: dict) -> bool:
    """A classifier lmforge fine-tuned on single texts (the fields it read are recorded): a second text would
    be scored as a pair it never saw. Unknown for other folders, which are left to take one."""
    fields = extras.get("data_fields")
    return bool(fields) and "text" in fields and not fields.get("text_pair")
