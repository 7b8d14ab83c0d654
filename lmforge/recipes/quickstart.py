"""The two-stage story on built-in data, in a few minutes on a laptop CPU.

    lmforge quickstart                       # ~8 minutes on 2 cores (3 of pretraining, 2 of fine-tuning, evaluations)
    lmforge quickstart --minutes 1 --no-finetune

Stage 1 pretrains a small Llama-style LM on the built-in Shakespeare and reports bits-per-byte (lower is
better; ~8 means random bytes, ~2 is a model that knows English spelling and some style) and a sample.
Stage 2 (when the fine-tuning recipe is installed) fine-tunes the packaged MiniLM encoder on the built-in
Rotten Tomatoes sentiment set and reports test accuracy. Everything lands in --out as Hugging Face folders.
"""
from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from lmforge.config import opt


@dataclass
class QuickstartConfig:
    out: str = opt("runs/quickstart", "folder for everything the quickstart makes")
    minutes: float = opt(3.0, "minutes of pretraining", gt=0)
    size: str = opt("small", "model preset for pretraining", choices=["tiny", "small", "base"])
    prompt: str = opt("ROMEO:\n", "prompt for the generated sample")
    finetune: bool = opt(True, "also fine-tune and evaluate a sentiment classifier (stage 2)")
    finetune_minutes: float = opt(2.0, "minutes of classifier fine-tuning", gt=0)
    progress: bool = opt(True, "show progress bars")


def _banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 70 - len(text)), flush=True)


def run(cfg: QuickstartConfig) -> dict:
    from lmforge.generate.sampling import generate_text
    from lmforge.model.causal import load_causal_lm
    from lmforge.recipes import pretrain
    from lmforge.tokenizer.bpe import load_tokenizer

    out = Path(cfg.out)
    made: list[tuple[str, str]] = []

    _banner(f"stage 1: pretrain a '{cfg.size}' LM on built-in Shakespeare for {cfg.minutes:g} minutes")
    lm_dir = out / "pretrain"
    _fresh(lm_dir)
    pre = pretrain.run(pretrain.PretrainConfig(data=["shakespeare"], out=str(lm_dir), size=cfg.size,
                                               max_minutes=cfg.minutes, progress=cfg.progress,
                                               sample_tokens=0))
    if "stopped_at" in pre:  # Ctrl-C: the checkpoint is saved and its --resume command printed; stop here
        raise KeyboardInterrupt
    final = Path(pre["final_model"])
    model = load_causal_lm(final).eval()
    tok = load_tokenizer(final)
    sample = cfg.prompt + generate_text(model, tok, cfg.prompt, max_new_tokens=120, temperature=0.8, top_k=40,
                                        seed=0)
    print(f"\nvalidation bits/byte: {pre['initial_val_bits_per_byte']:.3f} before training -> "
          f"{pre['val_bits_per_byte']:.3f} after ({pre['steps']} steps, "
          + (f"{pre['median_tokens_per_s']:,.0f} tokens/s)" if pre["median_tokens_per_s"] else "too short to time)"))
    print("sample:\n" + "\n".join("  | " + line for line in sample.splitlines()))
    made += [("language model (HF LlamaForCausalLM)", str(final)), ("pretraining metrics", str(lm_dir / "metrics.json")),
             ("loss curve", str(lm_dir / "loss.png"))]
    summary = {"pretrain": {k: pre[k] for k in ("steps", "parameters", "val_bits_per_byte", "val_perplexity",
                                                "initial_val_bits_per_byte", "median_tokens_per_s")},
               "sample": sample}

    if cfg.finetune:
        if importlib.util.find_spec("lmforge.recipes.finetune") is None:
            print("\n(stage 2, fine-tuning, is not available in this version: skipped)")
        else:
            summary["finetune"] = _finetune(cfg, out, made)

    _banner("summary")
    for what, where in made:
        print(f"  {what:<50} {where}")
    print(f"\nNext: lmforge generate --model {final} --prompt 'KING HENRY:'\n"
          f"      lmforge pretrain --data YOUR_TEXT --out runs/mine --max-minutes 10")
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8")
    return summary


def _fresh(run_dir: Path) -> None:
    """Each quickstart is a new run: an earlier quickstart's checkpoints go (training refuses to mix runs)."""
    import shutil

    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _finetune(cfg: QuickstartConfig, out: Path, made: list) -> dict:
    from lmforge import config as C
    from lmforge.recipes import finetune

    _banner(f"stage 2: fine-tune minilm-l6 on built-in rotten_tomatoes for {cfg.finetune_minutes:g} minutes")
    ft_dir = out / "classifier"
    _fresh(ft_dir)
    ft_cfg = C.build(finetune.FinetuneConfig, dict(task="classify", model="minilm-l6", train="rotten_tomatoes",
                                                   out=str(ft_dir), max_minutes=cfg.finetune_minutes,
                                                   progress=cfg.progress))
    res = finetune.run(ft_cfg)
    if "stopped_at" in res:
        raise KeyboardInterrupt
    test = res.get("test") or res.get("validation") or {}
    if "accuracy" in test:
        print(f"\nsentiment classifier test accuracy: {100 * test['accuracy']:.1f} % "
              f"(macro-F1 {100 * test['macro_f1']:.1f})")
    made += [("sentiment classifier (HF SequenceClassification)", str(ft_dir / "final")),
             ("classifier metrics", str(ft_dir / "metrics.json"))]
    return test
