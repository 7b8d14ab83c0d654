"""Metric functions: pure, no model or file access, easy to test."""
from __future__ import annotations

import math

LN2 = math.log(2)


def perplexity(mean_loss_nats: float) -> float:
    """exp of the mean per-token cross-entropy; capped so a diverged model reports inf, not an overflow."""
    return math.exp(mean_loss_nats) if mean_loss_nats < 700 else float("inf")


def bits_per_byte(total_loss_nats: float, total_bytes: int) -> float:
    """Tokenizer-independent compression: total nats over the predicted text, in bits, per UTF-8 byte."""
    return total_loss_nats / (LN2 * total_bytes) if total_bytes else float("nan")
