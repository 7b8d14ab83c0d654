"""Supervised fine-tuning on the built-in chats: a model's replies before and after `lmforge finetune --task sft`.

    .venv/bin/python bench/sft_chat.py --json docs/results/smollm2_sft_chat.json     # ~25 minutes on 2 cores
    .venv/bin/python bench/sft_chat.py --max-test 40 --max-train 200                 # a quick look
    .venv/bin/python bench/sft_chat.py --fine-tuned RUN_DIR ...     # rescore a finished `finetune --task sft` run

SmolLM2-135M-Instruct (packaged) answers the `lmforge_chat` test chats greedily, zero-shot; it is then
fine-tuned with LoRA on `lmforge_chat:train` (lmforge's defaults) and answers them again. Every reply is
scored by the kind of its task:
  sentiment (English, Chinese): accuracy of the first label word the reply uses (Positive/Negative, 正面/负面);
  translation (en->es, es->en): corpus BLEU and chrF (sacreBLEU);
  extractive QA: SQuAD exact match and F1 on answerable questions, and the share of those the reply declines
  ("false_refusals"); on unanswerable ones the share of replies that decline ("says_not_in_passage"). A reply
  declines when it opens with "The passage does not ..." in any wording (say, specify, mention, explicitly
  state); the `_exact` variants count only the taught sentence "The passage does not say." alone;
and, over all replies, the share that ended with the end-of-turn token within --max-new-tokens ("stopped"),
and the mean reply length in tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from lmforge.cli import ensure_tcmalloc  # noqa: E402  (light: no torch)

ensure_tcmalloc([sys.executable, *sys.argv])  # before torch loads: the allocator is preloaded
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import gzip  # noqa: E402

import torch  # noqa: E402

from lmforge.data.labelled import resolve_data  # noqa: E402
from lmforge.evaluate.task_metrics import normalize_answer, squad_em_f1, translation_metrics  # noqa: E402
from lmforge.model.hub import resolve_model  # noqa: E402
from lmforge.tasks.sft import (encode_text, end_token_ids, generate_batch, load_causal, render,  # noqa: E402
                               setup_chat, split_for_generation)
from lmforge.train.common import autocast  # noqa: E402

NO_ANSWER = "The passage does not say."  # the refusal the training chats teach (lmforge_chat qa_unanswerable)
LABEL_WORDS = {"sentiment_en": {"positive": "Positive", "negative": "Negative"},
               "sentiment_zh": {"正面": "正面", "好评": "正面", "积极": "正面",
                                "负面": "负面", "差评": "负面", "消极": "负面"}}


def chats(split: str, limit: int = 0) -> list[dict]:
    path, _ = resolve_data(f"lmforge_chat:{split}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[:limit] if limit else rows


# ------------------------------------------------------------------------------------------ scoring (pure)

def first_label(kind: str, reply: str) -> str | None:
    """The label the reply commits to: the label word it uses first (None if it uses none)."""
    text = reply.lower()
    hits = [(m.start(), label) for word, label in LABEL_WORDS[kind].items()
            for m in re.finditer(re.escape(word), text)]
    return min(hits)[1] if hits else None


def refuses(reply: str, exact: bool = False) -> bool:
    """Whether the reply declines: opens with "The passage does not" (exact: is the taught sentence alone).
    Compared after SQuAD normalisation, which drops "the", case and punctuation."""
    text = normalize_answer(reply)
    return text == normalize_answer(NO_ANSWER) if exact else text.startswith(normalize_answer("The passage does not"))


def score(rows: list[dict], replies: list[str], stopped: list[bool], lengths: list[int]) -> dict:
    """Metrics per task kind over the last reply of each chat (see the module docstring)."""
    by_kind: dict[str, list[tuple[str, str]]] = {}
    for row, reply in zip(rows, replies):
        _, reference = split_for_generation(row["messages"])
        by_kind.setdefault(row["tasks"][-1], []).append((reply, reference))
    out: dict = {"n": len(rows), "stopped": sum(stopped) / len(rows), "mean_reply_tokens": sum(lengths) / len(rows)}
    for kind, pairs in sorted(by_kind.items()):
        if kind.startswith("sentiment"):
            out[kind] = {"accuracy": sum(first_label(kind, r) == ref for r, ref in pairs) / len(pairs),
                         "no_label": sum(first_label(kind, r) is None for r, _ in pairs) / len(pairs),
                         "n": len(pairs)}
        elif kind.startswith("translate"):
            out[kind] = translation_metrics([r for r, _ in pairs], [ref for _, ref in pairs])
        elif kind == "qa":
            ems, f1s = zip(*(squad_em_f1(r, [ref]) for r, ref in pairs))
            out[kind] = {"exact_match": 100 * sum(ems) / len(pairs), "f1": 100 * sum(f1s) / len(pairs),
                         "false_refusals": sum(refuses(r) for r, _ in pairs) / len(pairs),
                         "false_refusals_exact": sum(refuses(r, exact=True) for r, _ in pairs) / len(pairs),
                         "n": len(pairs)}
        else:  # qa_unanswerable
            out[kind] = {"says_not_in_passage": sum(refuses(r) for r, _ in pairs) / len(pairs),
                         "says_not_in_passage_exact": sum(refuses(r, exact=True) for r, _ in pairs) / len(pairs),
                         "n": len(pairs)}
    return out


# ------------------------------------------------------------------------------------------ replies

def replies(model_dir: Path, rows: list[dict], max_new_tokens: int, batch_size: int) -> tuple[dict, list[dict]]:
    """(scores, per-chat records) for greedy replies of the model in `model_dir` to each chat's last user turn."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    chat = setup_chat(tok)
    model = load_causal(model_dir).eval()
    end_ids = end_token_ids(tok, model, chat["end_of_turn"])
    prompts = [encode_text(tok, render(tok, split_for_generation(r["messages"])[0], add_generation_prompt=True))
               for r in rows]
    t0 = time.time()
    with torch.no_grad():
        outs = generate_batch(model, tok, prompts, end_ids, max_new_tokens, batch_size=batch_size,
                              autocast_ctx=lambda: autocast("bf16", torch.device("cpu")))
    seconds = time.time() - t0
    texts = [tok.decode(o, skip_special_tokens=True).strip() for o in outs]
    stopped = [len(o) < max_new_tokens for o in outs]  # generate_batch cuts at the first end token
    result = score(rows, texts, stopped, [len(o) for o in outs])
    result["generation_seconds"] = round(seconds, 1)
    records = [{"id": r["id"], "task": r["tasks"][-1], "reference": split_for_generation(r["messages"])[1],
                "reply": t, "stopped": s} for r, t, s in zip(rows, texts, stopped)]
    return result, records


def show(name: str, s: dict) -> None:
    parts = [f"stopped {100 * s['stopped']:.1f} %", f"{s['mean_reply_tokens']:.1f} tokens/reply"]
    for kind in ("sentiment_en", "sentiment_zh"):
        if kind in s:
            parts.append(f"{kind} {100 * s[kind]['accuracy']:.1f} %")
    for kind in ("translate_en_es", "translate_es_en"):
        if kind in s:
            parts.append(f"{kind} BLEU {s[kind]['bleu']:.2f}")
    if "qa" in s:
        parts.append(f"qa EM {s['qa']['exact_match']:.1f} F1 {s['qa']['f1']:.1f} "
                     f"refused {100 * s['qa']['false_refusals']:.1f} %")
    if "qa_unanswerable" in s:
        parts.append(f"unanswerable {100 * s['qa_unanswerable']['says_not_in_passage']:.1f} %")
    print(f"{name}: " + " | ".join(parts), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--max-test", type=int, default=0, help="score only the first N test chats (0: all)")
    ap.add_argument("--max-train", type=int, default=0, help="fine-tune on the first N training chats (0: all)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="generation batch size")
    ap.add_argument("--out", type=Path, help="fine-tuning output folder (default: a temporary one)")
    ap.add_argument("--fine-tuned", type=Path, metavar="RUN_DIR",
                    help="skip fine-tuning: score RUN_DIR/final of an earlier run (its metrics.json is reported)")
    ap.add_argument("--json", type=Path, help="write the results here, and every reply beside it "
                                              "(NAME_replies.jsonl) so the replies can be rescored")
    args = ap.parse_args()
    if args.fine_tuned and not ((args.fine_tuned / "metrics.json").is_file() and (args.fine_tuned / "final").is_dir()):
        ap.error(f"--fine-tuned {args.fine_tuned}: not a finished `lmforge finetune` run (needs metrics.json and final/)")

    rows = chats("test", args.max_test)
    base = resolve_model(args.model)
    before, before_records = replies(base, rows, args.max_new_tokens, args.batch_size)
    show("zero-shot", before)

    work = args.fine_tuned or args.out or Path(tempfile.mkdtemp(prefix="lmforge-sft-bench-")) / "run"
    cmd = [sys.executable, "-m", "lmforge", "finetune", "--task", "sft", "--model", args.model, "--train",
           "lmforge_chat", "--out", str(work), "--lora", "--epochs", str(args.epochs), "--no-progress",
           "--max-new-tokens", str(args.max_new_tokens)]
    if args.max_train:
        cmd += ["--max-train-examples", str(args.max_train)]
    if args.fine_tuned:
        finetune_command, finetune_seconds = f"(earlier run {work})", None
    else:
        t0 = time.time()
        subprocess.run(cmd, check=True, cwd=ROOT)
        finetune_command, finetune_seconds = " ".join(cmd[1:]), round(time.time() - t0, 1)
    metrics = json.loads((work / "metrics.json").read_text())
    after, after_records = replies(work / "final", rows, args.max_new_tokens, args.batch_size)
    show("fine-tuned", after)

    paired = [{"id": b["id"], "task": b["task"], "reference": b["reference"],
               "zero_shot": b["reply"], "zero_shot_stopped": b["stopped"],
               "fine_tuned": a["reply"], "fine_tuned_stopped": a["stopped"]}
              for b, a in zip(before_records, after_records)]
    result = {"model": args.model, "test_chats": len(rows), "finetune_command": finetune_command,
              "finetune_seconds": finetune_seconds, "finetune_metrics": metrics,
              "zero_shot": before, "fine_tuned": after,
              "examples": [{k: p[k] for k in ("id", "task", "reference", "zero_shot", "fine_tuned")}
                           for p in paired[:12]]}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        sidecar = args.json.with_name(args.json.stem + "_replies.jsonl")
        sidecar.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in paired), encoding="utf-8")
        print(f"wrote {args.json} and {sidecar}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
