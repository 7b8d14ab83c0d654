"""Which attention kernel trains faster on this CPU: PyTorch SDPA (transformers' default) or eager?

    .venv/bin/python bench/attention.py                       # minilm-l6 and smollm2-135m, bf16 and fp32, ~4 min
    .venv/bin/python bench/attention.py --models minilm-l6 --precisions bf16

One full training step (dropout on; forward, backward, fused AdamW) of the sequence-classification model, on a batch with
half its rows padded to half length, as fine-tuning sees it. The two kernels alternate within each shape, so
machine noise hits both; the figure is the median step time. `lmforge finetune --attention auto` uses the
result: eager for bf16 on a CPU (SDPA's flash-attention backward is slow there for short sequences).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmforge.cli import ensure_tcmalloc  # noqa: E402  (light: no torch)

ensure_tcmalloc([sys.executable, *sys.argv])  # before torch loads: the allocator is preloaded
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

from lmforge.model.hub import resolve_model  # noqa: E402

SHAPES = {"minilm-l6": [(32, 16), (32, 64), (16, 128), (8, 256), (4, 512)],
          "smollm2-135m": [(16, 32), (8, 128), (4, 512)]}


def trainer(path: str, kernel: str, precision: str):
    """A closure running one training step on a (batch, length) shape; returns its seconds."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, attn_implementation=kernel)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    model.train()  # dropout on, as in fine-tuning (from_pretrained returns eval mode)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step(batch: int, length: int) -> float:
        ids = torch.randint(5, 1000, (batch, length))  # (B, T)
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[: batch // 2, length // 2:] = 0  # half the rows padded, as in a dynamically padded batch
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = model(input_ids=ids, attention_mask=mask, labels=torch.zeros(batch, dtype=torch.long)).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t
    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="minilm-l6,smollm2-135m")
    ap.add_argument("--precisions", default="bf16,fp32")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per kernel and shape (after 2 warm-up)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for name in args.models.split(","):
        path = str(resolve_model(name))
        for precision in args.precisions.split(","):
            steps = {k: trainer(path, k, precision) for k in ("sdpa", "eager")}
            for batch, length in SHAPES[name]:
                times = {k: [] for k in steps}
                for i in range(args.steps + 2):
                    for k, step in steps.items():  # alternate the kernels
                        dt = step(batch, length)
                        if i >= 2:
                            times[k].append(dt)
                med = {k: statistics.median(v) for k, v in times.items()}
                row = {"model": name, "precision": precision, "batch": batch, "length": length,
                       "sdpa_ms": 1000 * med["sdpa"], "eager_ms": 1000 * med["eager"],
                       "eager_speedup": med["sdpa"] / med["eager"]}
                rows.append(row)
                print(f"{name:<13} {precision} batch {batch:>2} x {length:>3} tokens: sdpa {row['sdpa_ms']:6.0f} ms, "
                      f"eager {row['eager_ms']:6.0f} ms -> eager {row['eager_speedup']:.2f}x", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
