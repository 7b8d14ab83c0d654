"""Score a model on data and print the metrics as JSON.

    lmforge evaluate --model runs/shakespeare --task lm --data shakespeare
    -> {"loss": ..., "perplexity": ..., "bits_per_byte": ..., "tokens": ..., "bytes": ...}

--task lm scores next-token prediction over the text in non-overlapping windows of the model's context.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from lmforge.config import opt
from lmforge.errors import LmforgeError


@dataclass
class EvaluateConfig:
    model: str = opt("", "model folder, lmforge output folder, alias or hub id")
    task: str = opt("lm", "what to measure", choices=["lm"])
    data: list[str] = opt([], "text files, folders, or built-in corpora")
    text_field: str = opt("text", "JSON field holding the text in .jsonl files")
    context: int = opt(0, "window length in tokens (0: the model's, at most 1024)")
    batch_size: int = opt(8, "windows per forward pass")
    max_tokens: int = opt(0, "score at most this many tokens (0: all)")
    split: str = opt("all", "'all' the text, or the 'val' tail that pretrain holds out", choices=["all", "val"])
    val_fraction: float = opt(0.05, "with --split val: the held-out fraction used in pretraining")
    precision: str = opt("fp32", "numeric precision", choices=["auto", "bf16", "fp32"])


def run(cfg: EvaluateConfig) -> int:
    import numpy as np
    import torch

    from lmforge.data.corpus import resolve_sources
    from lmforge.data.shards import tokenize_corpus
    from lmforge.evaluate.lm import evaluate_tokens
    from lmforge.model.causal import load_causal_lm
    from lmforge.model.hub import resolve_model
    from lmforge.tokenizer.bpe import load_tokenizer, token_byte_lengths
    from lmforge.train.common import resolve_precision

    if not cfg.model:
        raise LmforgeError("--model is required")
    path = resolve_model(cfg.model)
    sources = resolve_sources(cfg.data)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path).eval()
    data = tokenize_corpus(sources, tokenizer, text_field=cfg.text_field, val_fraction=cfg.val_fraction,
                           show_progress=False)
    tokens = data.val if cfg.split == "val" else np.concatenate([data.train, data.val])
    context = min(cfg.context or 1024, model.max_seq_len)
    token_bytes = token_byte_lengths(tokenizer)
    bpt = None
    if token_bytes is None:
        sample = np.asarray(tokens[:20000])
        bpt = len(tokenizer.decode(sample.tolist()).encode("utf-8")) / max(1, len(sample))
    device = torch.device("cpu")
    result = evaluate_tokens(model, tokens, context, token_bytes, bpt, batch_size=cfg.batch_size,
                             max_tokens=cfg.max_tokens or None, precision=resolve_precision(cfg.precision, device))
    result = {"task": "lm", "model": str(path), "context": context, **result}
    print(json.dumps(result, indent=2))
    return 0
