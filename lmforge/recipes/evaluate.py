"""Score a model on data and print the metrics as JSON.

    lmforge evaluate --model runs/shakespeare --task lm --data shakespeare
    -> {"loss": ..., "perplexity": ..., "bits_per_byte": ..., "tokens": ..., "bytes": ...}

    lmforge evaluate --model runs/rt --task classify --data rotten_tomatoes:test
    lmforge evaluate --model runs/qa --task qa --data lmforge_qa:test

--task lm scores next-token prediction over the text in non-overlapping windows of the model's context.
The fine-tuning tasks (classify, qa, sft, translate) score a fine-tuned folder on labelled data with the
task's metrics (accuracy/F1, exact match/F1, loss/perplexity, BLEU/chrF), as `finetune` reports them.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from lmforge.config import opt
from lmforge.errors import LmforgeError


@dataclass
class EvaluateConfig:
    model: str = opt("", "model folder, lmforge output folder, alias or hub id")
    task: str = opt("", "what to measure (default: lm, or the task a fine-tuned folder was made for)",
                    choices=["lm", "classify", "qa", "sft", "translate"])
    data: list[str] = opt([], "text files, folders, or built-in corpora; for tasks a labelled file or built-in set "
                              "(a bare built-in name means its test split)")
    text_field: str = opt("text", "JSON field holding the text in .jsonl files")
    context: int = opt(0, "window length in tokens (0: the model's, at most 1024)", ge=0)
    batch_size: int = opt(8, "windows per forward pass", ge=1)
    max_tokens: int = opt(0, "score at most this many tokens (0: all)", ge=0)
    split: str = opt("all", "'all' the text, or the 'val' tail that pretrain holds out", choices=["all", "val"])
    val_fraction: float = opt(0.05, "with --split val: the held-out fraction used in pretraining", gt=0, lt=1)
    precision: str = opt("fp32", "numeric precision", choices=["auto", "bf16", "fp32"])
    field: list[str] = opt([], "tasks: field names as ROLE=NAME, e.g. text=sentence label=polarity")
    max_examples: int = opt(0, "tasks: score at most this many examples (0: all)", ge=0)
    num_beams: int = opt(0, "translate/sft: beam width (0: as fine-tuned)", ge=0)
    max_new_tokens: int = opt(0, "translate/sft: tokens generated at most per example (0: as fine-tuned)", ge=0)
    predictions: str | None = opt(None, "tasks: also write per-example predictions to this JSONL file")


def field_overrides(items: list[str]) -> dict:
    """--field ROLE=NAME items (evaluate, predict) as FinetuneConfig overrides: {"text_field": "sentence"}."""
    from lmforge import config as C
    from lmforge.errors import closest
    from lmforge.recipes.finetune import FinetuneConfig

    roles = [n[:-len("_field")] for n in C._fields(FinetuneConfig) if n.endswith("_field")]
    out = {}
    for item in items:
        role, sep, name = item.partition("=")
        if not sep or not name:
            raise LmforgeError(f"--field {item!r}: expected ROLE=NAME, e.g. text=sentence")
        if role not in roles:
            raise LmforgeError(f"--field {item!r}: unknown role '{role}'{closest(role, roles)} "
                               f"(roles: {', '.join(roles)})")
        out[f"{role}_field"] = name
    return out


def field_hint(e: LmforgeError) -> LmforgeError:
    """The data reader's errors name finetune's --x-field options; evaluate and predict spell them --field."""
    return LmforgeError(re.sub(r"set --([a-z-]+)-field\b",
                               lambda m: f"set --field {m.group(1).replace('-', '_')}=NAME", str(e)))


def run(cfg: EvaluateConfig) -> int:
    import numpy as np
    import torch

    from lmforge.data.corpus import resolve_sources
    from lmforge.data.shards import tokenize_corpus
    from lmforge.evaluate.lm import evaluate_tokens
    from lmforge.model.causal import load_causal_lm
    from lmforge.model.hub import resolve_model
    from lmforge.tokenizer.bpe import load_tokenizer, mean_token_bytes, token_byte_lengths
    from lmforge.train.common import resolve_precision

    if not cfg.model:
        raise LmforgeError("--model is required")
    path = resolve_model(cfg.model)
    task = cfg.task or saved_task(path) or "lm"
    if task != "lm":
        return evaluate_task(cfg, path, task)
    sources = resolve_sources(cfg.data)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path).eval()
    data = tokenize_corpus(sources, tokenizer, text_field=cfg.text_field, val_fraction=cfg.val_fraction,
                           show_progress=False)
    tokens = data.val if cfg.split == "val" else np.concatenate([data.train, data.val])
    context = min(cfg.context or 1024, model.max_seq_len)
    token_bytes = token_byte_lengths(tokenizer)
    bpt = mean_token_bytes(tokenizer, tokens) if token_bytes is None else None
    device = torch.device("cpu")
    result = evaluate_tokens(model, tokens, context, token_bytes, bpt, batch_size=cfg.batch_size,
                             max_tokens=cfg.max_tokens or None, precision=resolve_precision(cfg.precision, device))
    result = {"task": "lm", "model": str(path), "context": context, **result}
    print(json.dumps(result, indent=2))
    return 0


def saved_task(path) -> str | None:
    """The task a folder was fine-tuned for (from its lmforge_config.yaml), or None."""
    from pathlib import Path

    import yaml

    f = Path(path) / "lmforge_config.yaml"
    if not f.exists():
        return None
    data = yaml.safe_load(f.read_text(encoding="utf-8")) or {}
    return data.get("task") if data.get("task") in ("classify", "qa", "sft", "translate") else None


def load_for_task(path, task: str, overrides: dict):
    """(task object, model, tokenizer, extras) for a fine-tuned folder, set up as it was fine-tuned."""
    from pathlib import Path

    import yaml

    from lmforge import config as C
    from lmforge.model.causal import check_head
    from lmforge.recipes.finetune import FinetuneConfig
    from lmforge.tasks import get_task
    from lmforge.tokenizer.bpe import load_tokenizer

    f = Path(path) / "lmforge_config.yaml"
    extras = (yaml.safe_load(f.read_text(encoding="utf-8")) or {}) if f.exists() else {}
    known = {k: v for k, v in (extras.get("finetune") or {}).items() if k in C._fields(FinetuneConfig)}
    known.update(task=task, model=str(path), **overrides)
    fcfg = C.build(FinetuneConfig, known)
    t = get_task(task)(fcfg)
    check_head(path, task)
    tokenizer = load_tokenizer(path)
    model = t.attach(path, tokenizer, extras).eval()
    return t, model, tokenizer, extras


def evaluate_task(cfg: EvaluateConfig, path, task: str) -> int:
    import torch

    from lmforge.data.labelled import load_examples
    from lmforge.train.common import autocast, check_output_file, json_ready, resolve_precision, write_atomic

    if len(cfg.data) != 1:
        raise LmforgeError(f"--task {task}: pass one --data file or built-in set (e.g. rotten_tomatoes:test)")
    if cfg.predictions:
        check_output_file(cfg.predictions, "--predictions")
    overrides = field_overrides(cfg.field)
    if cfg.num_beams:
        overrides["num_beams"] = cfg.num_beams
    if cfg.max_new_tokens:
        overrides["max_new_tokens"] = cfg.max_new_tokens
    with torch.no_grad():
        t, model, tokenizer, extras = load_for_task(path, task, overrides)
        try:
            # the columns training read, where the file has them (translation: the trained direction)
            loaded = load_examples(cfg.data[0], task, t.fields(), split="test", prefer=extras.get("data_fields"))
        except LmforgeError as e:
            raise field_hint(e) from None
        if cfg.max_examples:
            loaded.rows, loaded.line_numbers = loaded.rows[:cfg.max_examples], loaded.line_numbers[:cfg.max_examples]
        device = torch.device("cpu")
        precision = resolve_precision(cfg.precision, device)
        res = t.evaluate(model, loaded, lambda: autocast(precision, device), device, cfg.batch_size)
    print(json.dumps(json_ready({"task": task, "model": str(path), "data": loaded.source, **res.metrics}), indent=2,
                     ensure_ascii=False))
    if cfg.predictions:
        write_atomic(cfg.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in res.predictions))
    return 0
