"""SFT training steps with the vocabulary projection at the labelled positions only, against full logits.

    .venv/bin/python bench/sft_logits.py --json docs/results/sft_logits_bench.json     # ~6 minutes on 2 cores

SFT (and prompted translation) learns only the replies; lmforge's `causal_lm_loss` asks transformers for the
logits of those positions alone (`logits_to_keep` with a boolean mask), where the model's own loss computes
(B, T, vocab) logits for every position. Both give the same loss. Here: SmolLM2-135M-Instruct with lmforge's
LoRA defaults (r16 on every projection), bf16 autocast, fused AdamW, batches of 8 length-grouped
`lmforge_chat` training chats; each round times the same batches both ways, the order alternating by round.
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

import torch  # noqa: E402

from lmforge import config as C  # noqa: E402
from lmforge.data.labelled import load_examples  # noqa: E402
from lmforge.model.hub import resolve_model  # noqa: E402
from lmforge.recipes.finetune import FinetuneConfig, _wrap_lora  # noqa: E402
from lmforge.tasks.sft import SFTTask  # noqa: E402
from lmforge.train.common import autocast, build_optimizer  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batches", type=int, default=8, help="batches per timing (spread over the length range)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    path = resolve_model(args.model)
    cfg = C.build(FinetuneConfig, {"task": "sft", "model": args.model, "train": "lmforge_chat",
                                           "out": "unused", "lora": True})
    task = SFTTask(cfg)
    tok = AutoTokenizer.from_pretrained(str(path))
    train = load_examples("lmforge_chat:train", "sft")
    task.prepare(tok, train, {})
    torch.manual_seed(0)
    model = _wrap_lora(cfg, task.load_model(path), task)
    model.train()
    feats = sorted(task.features(train, train=True), key=lambda f: len(f["input_ids"]))
    step = len(feats) // args.batches
    batches = [task.collate(feats[i * step:i * step + 8]) for i in range(args.batches)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    labelled = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)
    optimizer = build_optimizer(model, 5e-4, 0.0, device=torch.device("cpu"))
    amp = lambda: autocast("bf16", torch.device("cpu"))  # noqa: E731
    ways = {"labelled positions only (lmforge)": lambda b: task.loss(model, b),
            "full logits (the model's own loss)": lambda b: model(**b).loss}
    assert task.mask_logits, "this transformers release cannot slice logits by a mask"

    def timed(fn) -> float:
        t0 = time.perf_counter()
        for b in batches:
            with amp():
                loss = fn(b)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for fn in ways.values():  # warm-up
        timed(fn)
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(args.rounds):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            times[name].append(timed(ways[name]))
            print(f"round {r + 1}: {name}: {times[name][-1]:.2f} s for {len(batches)} steps", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    fast, full = med["labelled positions only (lmforge)"], med["full logits (the model's own loss)"]
    with torch.no_grad(), amp():
        model.eval()
        same = [(float(task.loss(model, b)), float(model(**b).loss)) for b in batches[:3]]
    result = {"model": args.model, "steps_per_timing": len(batches), "tokens": tokens, "labelled_tokens": labelled,
              "median_seconds": med, "speedup": full / fast, "rounds": times,
              "loss_pairs_eval_mode": same}
    print(f"{len(batches)} steps, {tokens:,} tokens of which {labelled:,} labelled: "
          f"{full:.2f} s full logits, {fast:.2f} s labelled only: {full / fast:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
