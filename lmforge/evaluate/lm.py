"""Language-model evaluation: loss, perplexity and bits-per-byte over a token stream."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lmforge.evaluate.metrics import bits_per_byte, perplexity
from lmforge.train.common import autocast


@torch.no_grad()
def evaluate_tokens(model, tokens: np.ndarray, context: int, token_bytes: np.ndarray | None,
                    bytes_per_token: float | None = None, batch_size: int = 8, max_tokens: int | None = None,
                    precision: str = "fp32", device: torch.device | str = "cpu") -> dict:
    """Score `tokens` in non-overlapping windows of `context` (each window predicts its tokens 1..T).

    Bytes per predicted token come from `token_bytes` (exact, byte-level vocabularies) or the
    `bytes_per_token` average of the decoded text (other tokenizers).
    """
    was_training = model.training
    model.eval()
    device = torch.device(device)
    n = len(tokens) if max_tokens is None else min(len(tokens), max_tokens + 1)
    span = context + 1  # inputs and their targets
    starts = list(range(0, max(1, n - 1), context))
    total_nats, total_tokens, total_bytes = 0.0, 0, 0.0
    for i in range(0, len(starts), batch_size):
        windows = [np.asarray(tokens[s:min(s + span, n)], dtype=np.int64) for s in starts[i:i + batch_size]]
        windows = [w for w in windows if len(w) >= 2]
        if not windows:
            continue
        width = max(len(w) for w in windows)
        x = torch.zeros(len(windows), width - 1, dtype=torch.long)
        y = torch.full((len(windows), width - 1), -100, dtype=torch.long)
        for j, w in enumerate(windows):
            x[j, : len(w) - 1] = torch.from_numpy(w[:-1])
            y[j, : len(w) - 1] = torch.from_numpy(w[1:])
        x, y = x.to(device), y.to(device)
        with autocast(precision, device):
            logits = model(x)  # (B, T, V)
        nats = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum")
        total_nats += float(nats)
        targets = y[y != -100].cpu().numpy()
        total_tokens += targets.size
        if token_bytes is not None:
            total_bytes += float(token_bytes[targets].sum())
        else:
            total_bytes += targets.size * (bytes_per_token or 1.0)
    model.train(was_training)
    loss = total_nats / max(1, total_tokens)
    return {"loss": loss, "perplexity": perplexity(loss), "bits_per_byte": bits_per_byte(total_nats, total_bytes),
            "tokens": total_tokens, "bytes": int(total_bytes)}
