"""Is bf16 autocast worth it on this CPU? fp32 against bf16 training steps, side by side.

    .venv/bin/python bench/precision.py --json docs/results/precision_bench.json
    # ~1 min; ~4 min where bf16 is emulated

`--precision auto` (pretrain, finetune) picks bf16 only on CPUs with native bf16 dot products (avx512_bf16 or
AMX), where the brief measured it 2-2.6x faster; elsewhere PyTorch emulates bf16 and autocast is much slower
than fp32, which this script shows on such a machine. One full training step of MiniLM-L6 sequence
classification (dropout on; forward, backward, fused AdamW); the precisions alternate each round, so machine
noise hits both; the figure is the median step time.
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
from lmforge.train.common import cpu_supports_bf16  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--length", type=int, default=48, help="tokens per row (rotten_tomatoes averages ~30)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per precision per round")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model("minilm-l6"), num_labels=2)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(1000, 5000, (args.batch, args.length))  # (B, T)
    labels = torch.randint(0, 2, (args.batch,))  # (B,)

    def step(bf16: bool) -> float:
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t

    cpu = {"capability": torch.backends.cpu.get_cpu_capability(), "native_bf16": cpu_supports_bf16(),
           "threads": torch.get_num_threads()}
    print(f"CPU {cpu['capability']}, {'native' if cpu['native_bf16'] else 'no native'} bf16, {cpu['threads']} "
          f"threads; minilm-l6, batch {args.batch} x {args.length} tokens", flush=True)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in times:
            step(name == "bf16")  # warm-up: kernels for this precision
            times[name] += [step(name == "bf16") for _ in range(args.steps)]
    med = {k: statistics.median(v) for k, v in times.items()}
    res = {"cpu": cpu, "shape": [args.batch, args.length], "median_step_s": med, "steps": times,
           "bf16_speedup": med["fp32"] / med["bf16"], "auto_picks": "bf16" if cpu["native_bf16"] else "fp32"}
    print(f"median step: fp32 {med['fp32']:.3f} s, bf16 {med['bf16']:.3f} s -> bf16 is "
          f"{res['bf16_speedup']:.2f}x fp32's speed; --precision auto picks {res['auto_picks']} here", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
