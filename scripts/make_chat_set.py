#!/usr/bin/env python3
"""Build the built-in ``lmforge_chat`` supervised fine-tuning set (chat ``messages``).

Offline there is no instruction-tuning set to ship, so this one is made from the labelled sets lmforge
already carries, each turned into chats by a few instruction templates (FLAN-style), split for split, so
that no test sentence of a source set is ever a training chat:

  * ``rotten_tomatoes``  -> "Is this movie review positive or negative?"      -> "Positive" / "Negative"
  * ``chinese_reviews``  -> "判断这条评论的情感是正面还是负面"                     -> "正面" / "负面"
  * ``bible_en_es``      -> "Translate into Spanish: ..." (and a fifth the other way, into English)
  * ``lmforge_qa``       -> "Answer from the passage ..." -> the answer span, or "The passage does not say."

Some chats have a system message and some are two tasks in one conversation (both replies are learnt), so
that a fine-tuned model meets the shapes real chat data has. Every row also records, per reply, its kind
(``tasks``) and its origin (``sources``: set, split, 1-based row) for scoring, e.g. by ``bench/sft_chat.py``.

Output: ``lmforge/data/builtin/lmforge_chat/{train,validation,test}.jsonl.gz`` (fixed seed, gzip mtime 0:
reruns give identical bytes) and the counts in its README.

    .venv/bin/python scripts/make_chat_set.py            # build and write
    .venv/bin/python scripts/make_chat_set.py --check    # build and compare with the committed files
"""
from __future__ import annotations

import argparse
import gzip
import io
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "lmforge" / "data" / "builtin"
OUT_DIR = BUILTIN / "lmforge_chat"
SEED = 20261201
# chats per split and source; lmforge_qa gives all its questions ("all")
COUNTS = {"train": {"rotten_tomatoes": 500, "chinese_reviews": 500, "bible_en_es": 600, "lmforge_qa": "all"},
          "validation": {"rotten_tomatoes": 50, "chinese_reviews": 50, "bible_en_es": 50, "lmforge_qa": "all"},
          "test": {"rotten_tomatoes": 100, "chinese_reviews": 100, "bible_en_es": 100, "lmforge_qa": "all"}}
MAX_CHARS = {"chinese_reviews": 200, "bible_en_es": 220}  # short rows keep a CPU demo fast
SYSTEM_SHARE, TWO_TURN_SHARE, INTO_ENGLISH_SHARE = 0.25, 0.15, 0.2
NO_ANSWER = "The passage does not say."
OTHER_PASSAGE_TRAIN = 120  # train questions asked of an unrelated passage (reply: NO_ANSWER)

SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Reply with the answer only.",
           "You are a careful assistant that answers briefly and exactly."]
SENTIMENT_EN = [
    "Is this movie review positive or negative?\n\n{text}",
    "Classify the sentiment of the following review as Positive or Negative.\nReview: {text}",
    "Review: {text}\nDid the critic like the film? Answer Positive or Negative.",
    "What is the sentiment of this sentence from a film review? {text}",
]
SENTIMENT_EN_LABELS = {0: "Negative", 1: "Positive"}
SENTIMENT_ZH = [
    "判断这条评论的情感是正面还是负面：\n{text}",
    "下面这条评论是好评还是差评？请回答“正面”或“负面”。\n{text}",
    "评论：{text}\n情感（正面/负面）：",
    "请分析以下用户评论的情感倾向，回答正面或负面。\n{text}",
]
SENTIMENT_ZH_LABELS = {0: "负面", 1: "正面"}
INTO_SPANISH = [
    "Translate into Spanish:\n{text}",
    "Translate the following English sentence to Spanish.\n\n{text}",
    "How do you say this in Spanish?\n\"{text}\"",
    "English: {text}\nSpanish:",
]
INTO_ENGLISH = [
    "Traduce al inglés:\n{text}",
    "Translate this Spanish verse into English.\n\n{text}",
]
QA = [
    "Answer the question from the passage. If the passage does not say, reply \"" + NO_ANSWER + "\"\n\n"
    "Passage: {context}\n\nQuestion: {question}",
    "Passage: {context}\n\nUsing only the passage above, answer: {question}\n"
    "(If it is not in the passage, say \"" + NO_ANSWER + "\")",
    "Read the text and answer briefly.\n\nText: {context}\n\nQ: {question}\nIf the text does not answer it, "
    "reply \"" + NO_ANSWER + "\"",
]


def read_jsonl_gz(path: Path) -> list[dict]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def turns(source: str, row: dict, rng: random.Random) -> tuple[str, str, str]:
    """(user prompt, assistant reply, task kind) for one row of a source set."""
    if source == "rotten_tomatoes":
        return rng.choice(SENTIMENT_EN).format(text=row["text"]), SENTIMENT_EN_LABELS[row["label"]], "sentiment_en"
    if source == "chinese_reviews":
        return rng.choice(SENTIMENT_ZH).format(text=row["text"]), SENTIMENT_ZH_LABELS[row["label"]], "sentiment_zh"
    if source == "bible_en_es":
        if rng.random() < INTO_ENGLISH_SHARE:
            return rng.choice(INTO_ENGLISH).format(text=row["es"]), row["en"], "translate_es_en"
        return rng.choice(INTO_SPANISH).format(text=row["en"]), row["es"], "translate_en_es"
    answers = row["answers"]["text"]
    prompt = rng.choice(QA).format(context=row["context"], question=row["question"])
    return prompt, (answers[0] if answers else NO_ANSWER), "qa" if answers else "qa_unanswerable"


def pick(source: str, split: str, n, rng: random.Random) -> list[tuple[int, dict]]:
    rows = read_jsonl_gz(BUILTIN / source / f"{split}.jsonl.gz")
    limit = MAX_CHARS.get(source)
    field = "en" if source == "bible_en_es" else "text"
    keep = [(i, r) for i, r in enumerate(rows)
            if limit is None or (len(r[field]) <= limit and len(r.get("es", "")) <= int(limit * 1.3))]
    if n == "all":
        return keep
    return sorted(rng.sample(keep, n), key=lambda x: x[0])


def build_split(split: str, rng: random.Random) -> list[dict]:
    singles = []
    for source, n in COUNTS[split].items():
        for i, row in pick(source, split, n, rng):
            user, reply, kind = turns(source, row, rng)
            singles.append({"task": kind, "source": f"{source}:{split}:{i + 1}", "user": user, "reply": reply})
    rng.shuffle(singles)
    chats = []
    k = 0
    while k < len(singles):
        group = singles[k:k + 2] if rng.random() < TWO_TURN_SHARE and k + 1 < len(singles) else singles[k:k + 1]
        k += len(group)
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < SYSTEM_SHARE else []
        for g in group:
            messages += [{"role": "user", "content": g["user"]}, {"role": "assistant", "content": g["reply"]}]
        chats.append({"id": f"{split}-{len(chats) + 1:04d}", "tasks": [g["task"] for g in group],
                      "sources": [g["source"] for g in group], "messages": messages})
    return chats


# books that tell the same stories: a question about one may be answered by a passage of another
PARALLEL = {"Matthew": "Gospels", "Mark": "Gospels", "Luke": "Gospels", "John": "Gospels",
            "1 Samuel": "Samuel-Kings", "2 Samuel": "Samuel-Kings", "1 Kings": "Samuel-Kings", "2 Kings": "Samuel-Kings"}


def story(title: str) -> str:
    """'2 Kings 5' -> 'Samuel-Kings', 'Genesis 37' -> 'Genesis', 'Macbeth' -> 'Macbeth'."""
    head, _, last = title.rpartition(" ")
    book = head if last.isdigit() else title
    return PARALLEL.get(book, book)


def other_passage_chats(n: int, start: int, rng: random.Random) -> list[dict]:
    """Train-only refusals: a train question asked of another story's passage, which cannot hold its answer.
    lmforge_qa has few unanswerable questions (57 in train), too few to teach a model to refuse; these add
    the plain case (the passage is about something else) without touching validation or test."""
    rows = read_jsonl_gz(BUILTIN / "lmforge_qa" / "train.jsonl.gz")
    first = {}  # each passage once, as the first row that has it
    for j, r in enumerate(rows):
        first.setdefault(r["context"], j)
    chats = []
    for i in sorted(rng.sample(range(len(rows)), n)):
        q = rows[i]
        answers = [a.lower() for a in q["answers"]["text"]]
        # another book or play (not a parallel telling), and none of the question's gold answers in it
        options = [j for j in first.values() if story(rows[j]["title"]) != story(q["title"])
                   and not any(a in rows[j]["context"].lower() for a in answers)]
        j = rng.choice(options)
        prompt = rng.choice(QA).format(context=rows[j]["context"], question=q["question"])
        messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < SYSTEM_SHARE else []
        messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": NO_ANSWER}]
        chats.append({"id": f"train-{start + len(chats) + 1:04d}", "tasks": ["qa_other_passage"],
                      "sources": [f"lmforge_qa:train:{i + 1}"], "passage_from": f"lmforge_qa:train:{j + 1}",
                      "messages": messages})
    return chats


def encode(rows: list[dict]) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8"))
    return buf.getvalue()


def validate(split: str, rows: list[dict]) -> None:
    for r in rows:
        roles = [m["role"] for m in r["messages"]]
        body = roles[1:] if roles[0] == "system" else roles
        assert body and body == ["user", "assistant"] * (len(body) // 2), (split, r["id"], roles)
        assert all(m["content"].strip() for m in r["messages"]), (split, r["id"])
        assert len(r["tasks"]) == len(r["sources"]) == roles.count("assistant"), (split, r["id"])
        assert all(s.split(":")[1] == split for s in r["sources"]), (split, r["id"])


def table(splits: dict[str, list[dict]]) -> str:
    kinds = ["sentiment_en", "sentiment_zh", "translate_en_es", "translate_es_en", "qa", "qa_unanswerable",
             "qa_other_passage"]
    lines = ["| split | chats | two-task chats | with a system message | " + " | ".join(kinds) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(kinds)]
    for split, rows in splits.items():
        per_kind = {k: sum(r["tasks"].count(k) for r in rows) for k in kinds}  # replies of each kind
        two = sum(1 for r in rows if len(r["tasks"]) == 2)
        system = sum(1 for r in rows if r["messages"][0]["role"] == "system")
        lines.append(f"| {split} | {len(rows):,} | {two} | {system} | "
                     + " | ".join(str(per_kind[k]) for k in kinds) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="compare with the committed files instead of writing")
    args = ap.parse_args()
    rng = random.Random(SEED)
    splits = {s: build_split(s, rng) for s in COUNTS}
    # appended from a stream of their own, so the other chats (and validation and test) stay as they were
    splits["train"] += other_passage_chats(OTHER_PASSAGE_TRAIN, len(splits["train"]), random.Random(SEED + 1))
    for split, rows in splits.items():
        validate(split, rows)
    if args.check:
        stale = [s for s, rows in splits.items() if (OUT_DIR / f"{s}.jsonl.gz").read_bytes() != encode(rows)]
        print("lmforge_chat: " + (f"differs from the committed files: {', '.join(stale)}" if stale else "up to date"))
        return 1 if stale else 0
    OUT_DIR.mkdir(exist_ok=True)
    for split, rows in splits.items():
        (OUT_DIR / f"{split}.jsonl.gz").write_bytes(encode(rows))
    print(table(splits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
