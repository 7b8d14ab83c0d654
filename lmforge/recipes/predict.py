"""Run a fine-tuned model on new inputs and print one JSON line per input.

    lmforge predict --model runs/rt --text "A gorgeous, witty film." --text "Dull and overlong."
    lmforge predict --model runs/qa --question "Who built the ark?" --context "Noah built the ark ..."
    lmforge predict --model runs/en-es --text "In the beginning God created the heavens."
    lmforge predict --model runs/chat --text "Write a haiku about rain."
    lmforge predict --model runs/rt --input reviews.jsonl            # rows with the fields the task reads

classify -> label and probabilities; qa -> answer span and score; translate -> translation;
sft (and any causal LM) -> the generated reply, through the model's chat template.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from lmforge.config import opt
from lmforge.errors import LmforgeError


@dataclass
class PredictConfig:
    model: str = opt("", "fine-tuned folder (or any HF folder / alias with --task)")
    task: str = opt("", "task (default: the one the folder was fine-tuned for)",
                    choices=["classify", "qa", "sft", "translate"])
    text: list[str] = opt([], "input text(s): a sentence to classify or translate, or a prompt")
    text_pair: list[str] = opt([], "classify, a model fine-tuned on text pairs: the second text of each --text")
    question: str = opt("", "qa: the question")
    context: str = opt("", "qa: the passage to find the answer in")
    input: str | None = opt(None, "a data file (.jsonl/.csv/...) whose rows to predict")
    field: list[str] = opt([], "with --input: field names as ROLE=NAME, e.g. text=review (default: as trained)")
    max_new_tokens: int = opt(0, "translate/sft: tokens to generate at most (0: as fine-tuned, as evaluate and "
                                 "serve do)", ge=0)
    num_beams: int = opt(0, "translate/sft: beam width (0: as fine-tuned; 1: greedy)", ge=0)
    batch_size: int = opt(16, "inputs per batch", ge=1)


def _rows(cfg: PredictConfig, task: str, t, extras: dict) -> list[dict]:
    from lmforge.recipes.evaluate import field_hint

    if cfg.input:
        try:
            return _input_rows(cfg, task, t, extras)
        except LmforgeError as e:
            raise field_hint(e) from None
    if task == "qa":
        if not cfg.question or not cfg.context:
            raise LmforgeError("qa needs --question and --context (or --input FILE)")
        return [{"question": cfg.question, "context": cfg.context}]
    if not cfg.text:
        raise LmforgeError("pass --text (one or more) or --input FILE")
    if any(not x.strip() for x in cfg.text + cfg.text_pair):
        raise LmforgeError("--text/--text-pair: an empty text (there is nothing to classify, translate or reply to)")
    if task != "classify" and cfg.text_pair:
        raise LmforgeError("--text-pair is for classifiers fine-tuned on text pairs")
    if task == "classify":
        pair_field = (extras.get("data_fields") or {}).get("text_pair")
        if pair_field and not cfg.text_pair:
            # scoring the first text alone would give confident, meaningless labels
            raise LmforgeError(f"this classifier was fine-tuned on text pairs (second text: '{pair_field}'); "
                               f"give a --text-pair for each --text")
        from lmforge.tasks.classify import single_texts

        if cfg.text_pair and single_texts(extras):
            raise LmforgeError("--text-pair: this classifier was fine-tuned on single texts, not pairs")
        if cfg.text_pair and len(cfg.text_pair) != len(cfg.text):
            raise LmforgeError(f"{len(cfg.text)} --text but {len(cfg.text_pair)} --text-pair: give one pair per text")
        if cfg.text_pair:
            return [{"text": x, "text_pair": y} for x, y in zip(cfg.text, cfg.text_pair)]
    return [{"text": x} for x in cfg.text]


def _input_rows(cfg: PredictConfig, task: str, t, extras: dict) -> list[dict]:
    from lmforge.data.labelled import input_field_guesses, input_role, load_examples, load_questions, load_texts

    trained_fields = extras.get("data_fields") or {}  # as read from the training data, e.g. {"text": "review"}
    try:
        return load_examples(cfg.input, task, t.fields(), prefer=trained_fields).rows
    except LmforgeError as e:
        # Prediction inputs have no labels/answers/targets: fall back to the inputs alone.
        if "field" not in str(e):
            raise
    given = t.fields()
    if task == "qa":
        return load_questions(cfg.input, given.get("question"), given.get("context"))
    role = input_role(task)
    pair = (given.get("text_pair") or trained_fields.get("text_pair")) if task == "classify" else None
    # sft: Alpaca's input, joined to the instruction as in training
    extra = (given.get("input") or trained_fields.get("input")) if task == "sft" else None
    if given.get(role):  # --field text=..., or the model was fine-tuned with --text-field and the like: exactly
        return load_texts(cfg.input, given[role], role=role, pair_field=pair, input_field=extra)
    trained = trained_fields.get(role)  # guessed in the training data, e.g. 'review'
    return load_texts(cfg.input, guesses=input_field_guesses(task, trained), chat=task == "sft", role=role,
                      pair_field=pair, input_field=extra)


def run(cfg: PredictConfig) -> int:
    import torch

    from lmforge.model.hub import resolve_model
    from lmforge.recipes.evaluate import field_overrides, load_for_task, saved_task

    if not cfg.model:
        raise LmforgeError("--model is required")
    path = resolve_model(cfg.model)
    task = cfg.task or saved_task(path)
    if task is None:
        raise LmforgeError(f"{path}: not made by 'lmforge finetune'; say what it is with --task")
    with torch.no_grad():
        given = {k: v for k, v in (("num_beams", cfg.num_beams), ("max_new_tokens", cfg.max_new_tokens)) if v}
        t, model, tokenizer, extras = load_for_task(path, task, {**given, **field_overrides(cfg.field)})
        rows = _rows(cfg, task, t, extras)
        for row, result in zip(rows, predict_rows(task, t, model, tokenizer, extras, rows, cfg)):
            print(json.dumps(result, ensure_ascii=False), flush=True)
    return 0


def predict_rows(task: str, t, model, tokenizer, extras: dict, rows: list[dict], cfg: PredictConfig) -> list[dict]:
    if task == "classify":
        from lmforge.tasks.classify import classify_texts, trained_max_length

        texts = [r["text"] for r in rows]
        pairs = [r.get("text_pair") for r in rows]
        pairs = pairs if all(p is not None for p in pairs) else None  # --text, or a model of single texts
        results = classify_texts(model, tokenizer, texts, max_length=trained_max_length(extras, 512),
                                 batch_size=cfg.batch_size, pairs=pairs)
        return [{"text": x, **({"text_pair": y} if pairs else {}), **p}
                for x, y, p in zip(texts, pairs or texts, results)]
    if task == "qa":
        from lmforge.tasks.qa import answer

        q = extras.get("qa", {})
        return [{"question": r["question"], **answer(model, tokenizer, r["question"], r["context"],
                                                     max_length=q.get("max_length", 384),
                                                     doc_stride=q.get("doc_stride", 128),
                                                     max_answer_length=q.get("max_answer_length", 30),
                                                     n_best=q.get("n_best", 20),
                                                     allow_null=q.get("allow_null", False))} for r in rows]
    if task == "translate":
        texts = [r.get("source", r.get("text")) for r in rows]
        return [{"source": x, "translation": y} for x, y in zip(texts, t.translate_texts(model, texts))]
    # sft: a chat turn per input
    from lmforge.tasks.sft import generate_replies

    conversations = []
    for r in rows:
        messages = r.get("messages") or [{"role": "user", "content": r.get("text") or r.get("prompt")}]
        conversations.append(messages[:-1] if messages[-1]["role"] == "assistant" else messages)
    replies = generate_replies(model, tokenizer, conversations, max_new_tokens=t.cfg.max_new_tokens,
                               num_beams=t.cfg.num_beams, batch_size=cfg.batch_size)
    return [{"prompt": m[-1]["content"], "reply": reply} for m, reply in zip(conversations, replies)]
