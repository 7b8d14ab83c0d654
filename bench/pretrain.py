"""Pretraining throughput: lmforge's loop against the Hugging Face Trainer, side by side, alternating.

    .venv/bin/python bench/pretrain.py                       # small preset, ~5 minutes
    .venv/bin/python bench/pretrain.py --rounds 1 --steps 4  # a quick look

Both sides train the same Llama shape (the `small` preset unless overridden) on the same built-in
Shakespeare tokens, batch and context. The HF side is what `run_clm.py` does: `LlamaForCausalLM` from a
config, the text cut into fixed blocks, `Trainer` with `labels = input_ids`. lmforge runs its real
`pretrain` recipe. Each measurement skips warm-up steps and times the rest; the sides alternate within
each round so machine noise hits both. Reported:
  * equal precision: fp32 vs fp32 and bf16 vs bf16 (target: lmforge >= 1.1x);
  * each side's defaults: lmforge (--precision auto = bf16 here, --compile auto = on for runs of 2+ minutes)
    vs Trainer (fp32 on CPU, no compile) (target >= 2x);
  * lmforge fp32 MFU against the fp32 matmul peak measured here (target >= 0.75).
Both sides run in this one process under the same allocator (tcmalloc when installed, as the lmforge CLI
uses), so allocator differences do not count for lmforge.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lmforge.cli import ensure_tcmalloc  # noqa: E402  (light: no torch)

ensure_tcmalloc([sys.executable, *sys.argv])  # before torch loads: the allocator is preloaded

import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmforge.data.corpus import resolve_sources  # noqa: E402
from lmforge.data.shards import tokenize_corpus  # noqa: E402
from lmforge.model.llama import PRESETS, LlamaLM, ModelConfig  # noqa: E402
from lmforge.recipes import pretrain  # noqa: E402
from lmforge.tokenizer.bpe import train_bpe  # noqa: E402
from lmforge.data.corpus import iter_documents  # noqa: E402


def matmul_peak_gflops(dtype=torch.float32, repeats: int = 5) -> float:
    """Best sustained GFLOP/s of large square matmuls: the roof a training step can approach."""
    best = 0.0
    for n in (1024, 2048, 3072):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)
        for _ in range(repeats):
            t = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
    return best


def run_lmforge(work: Path, tok_dir: Path, shape: dict, batch: int, precision: str, warmup: int, steps: int,
                compile: str = "off") -> float:
    out = work / f"lmforge-{precision}-{compile}"
    shutil.rmtree(out, ignore_errors=True)  # each round is a new run (pretrain refuses to mix runs)
    cfg = pretrain.PretrainConfig(
        data=["shakespeare"], out=str(out), tokenizer=str(tok_dir), size=shape["size"], n_layer=shape["n_layer"],
        n_head=shape["n_head"], n_embd=shape["n_embd"], context=shape["context"], batch_size=batch,
        max_steps=warmup + steps, precision=precision, log_interval=1, eval_interval=10 ** 6, eval_tokens=2048,
        sample_tokens=0, save_interval=10 ** 6, progress=False, warmup_steps=1, compile=compile)
    pretrain.run(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "tokens_per_s" in r and r["step"] > warmup]
    # Per-step windows: the harmonic view (total tokens / total time) is what a user waits for.
    seconds = sum(batch * shape["context"] / r["tokens_per_s"] for r in rows)
    return len(rows) * batch * shape["context"] / seconds


def run_hf_trainer(work: Path, model_cfg: ModelConfig, blocks: np.ndarray, batch: int, precision: str,
                   warmup: int, steps: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

    torch.manual_seed(0)
    hf_cfg = LlamaConfig(**{k: v for k, v in LlamaLM(model_cfg).hf_config().items() if k != "architectures"})
    model = LlamaForCausalLM(hf_cfg)

    class Blocks(torch.utils.data.Dataset):  # run_clm's group_texts output: input_ids == labels
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = torch.from_numpy(blocks[i].astype(np.int64))
            return {"input_ids": ids, "labels": ids.clone()}

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter())

    args = TrainingArguments(output_dir=str(work / f"hf-{precision}"), per_device_train_batch_size=batch,
                             max_steps=warmup + steps, learning_rate=2e-3, logging_steps=10 ** 6,
                             save_strategy="no", report_to=[], use_cpu=True, bf16=(precision == "bf16"),
                             disable_tqdm=True, seed=0, dataloader_num_workers=0)
    Trainer(model=model, args=args, train_dataset=Blocks(), callbacks=[Clock()]).train()
    timed = times[warmup - 1:]
    return (len(timed) - 1) * batch * model_cfg.max_seq_len / (timed[-1] - timed[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="small", choices=list(PRESETS))
    ap.add_argument("--n-layer", type=int, default=0)
    ap.add_argument("--n-head", type=int, default=0)
    ap.add_argument("--n-embd", type=int, default=0)
    ap.add_argument("--context", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args()

    torch.set_num_threads(torch.get_num_threads())
    work = Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    tok_dir = work / "tokenizer"
    sources = resolve_sources(["shakespeare"])
    tok = train_bpe(iter_documents(sources), a.vocab_size, tok_dir)
    data = tokenize_corpus(sources, tok, show_progress=False)
    shape = dict(size=a.size, n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, context=a.context)
    model_cfg = pretrain.model_config(pretrain.PretrainConfig(**shape), len(tok), tok)
    T = model_cfg.max_seq_len
    shape = dict(size=a.size, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, n_embd=model_cfg.n_embd, context=T)
    n_blocks = len(data.train) // T
    blocks = np.asarray(data.train[:n_blocks * T]).reshape(n_blocks, T)

    print(f"shape: {model_cfg.n_layer} layers x {model_cfg.n_embd}, {model_cfg.n_head} heads, context {T}, "
          f"vocab {model_cfg.vocab_size}, {LlamaLM(model_cfg).cfg.num_params() / 1e6:.2f}M params, batch {a.batch_size}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator "
          f"{'tcmalloc' if 'tcmalloc' in os.environ.get('LD_PRELOAD', '') else 'glibc'}", flush=True)
    peak = matmul_peak_gflops()
    print(f"fp32 matmul peak: {peak:.1f} GFLOP/s", flush=True)

    keys = ("lmforge_fp32", "hf_fp32", "lmforge_bf16", "hf_bf16", "lmforge_bf16_compiled")
    results: dict[str, list[float]] = {k: [] for k in keys}
    order = list(results)
    for r in range(a.rounds):
        for key in order[r % len(order):] + order[:r % len(order)]:  # rotate who goes first
            side, prec = key.split("_")[:2]
            if side == "lmforge":
                tps = run_lmforge(work, tok_dir, shape, a.batch_size, prec, a.warmup, a.steps,
                                  "on" if key.endswith("compiled") else "off")
            else:
                tps = run_hf_trainer(work, model_cfg, blocks, a.batch_size, prec, a.warmup, a.steps)
            results[key].append(tps)
            print(f"round {r + 1}: {key:<13} {tps:8,.0f} tokens/s", flush=True)

    med = {k: statistics.median(v) for k, v in results.items()}
    flops = model_cfg.flops_per_token(T)
    summary = {
        "shape": {"n_layer": model_cfg.n_layer, "n_embd": model_cfg.n_embd, "n_head": model_cfg.n_head,
                  "context": T, "vocab": model_cfg.vocab_size, "batch": a.batch_size},
        "tokens_per_s_median": {k: round(v, 1) for k, v in med.items()},
        "ratio_fp32": med["lmforge_fp32"] / med["hf_fp32"],
        "ratio_bf16": med["lmforge_bf16"] / med["hf_bf16"],
        "ratio_bf16_compiled": med["lmforge_bf16_compiled"] / med["hf_bf16"],
        "ratio_defaults": med["lmforge_bf16_compiled"] / med["hf_fp32"],
        "fp32_matmul_peak_gflops": peak,
        "lmforge_fp32_gflops": med["lmforge_fp32"] * flops / 1e9,
        "mfu_fp32": med["lmforge_fp32"] * flops / 1e9 / peak,
        "hf_fp32_mfu": med["hf_fp32"] * flops / 1e9 / peak,
    }
    print(json.dumps(summary, indent=2))
    print(f"\nlmforge / HF Trainer: fp32 {summary['ratio_fp32']:.2f}x (target 1.1x), bf16 {summary['ratio_bf16']:.2f}x "
          f"(compiled {summary['ratio_bf16_compiled']:.2f}x), "
          f"defaults {summary['ratio_defaults']:.2f}x (target 2x); lmforge fp32 MFU {summary['mfu_fp32']:.2f} "
          f"(target 0.75)")
    if a.json:
        Path(a.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
