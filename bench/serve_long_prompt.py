"""A long prompt arriving while another stream generates: chunked prefill against one-shot prefill.

    .venv/bin/python bench/serve_long_prompt.py                       # smollm2-135m, ~1 minute on 2 cores
    .venv/bin/python bench/serve_long_prompt.py --prompt-tokens 4000 --json out.json

In-process engine (what `lmforge serve` runs), precision auto. Stream A (a short prompt, --stream-tokens new
tokens, greedy) starts; once it has produced 8 tokens a second request with a --prompt-tokens prompt arrives.
Reported: A's longest wait between two tokens (what a chatting user feels) and the long request's time to its
first token, with the engine's PREFILL_CHUNK (chunked) and with chunking off, alternating, best of --repeats.
"""
from __future__ import annotations

import argparse
import json
import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def one(served, engine_mod, chunk: int, long_ids: list[int], stream_tokens: int) -> dict:
    engine_mod.PREFILL_CHUNK = chunk
    E = engine_mod
    tok = served.tokenizer
    events: queue.Queue = queue.Queue()
    greedy = dict(temperature=0)  # no stop ids: every request makes exactly its max_tokens
    served.engine.submit([tok.encode("Once upon a time")], [E.SamplingParams(max_tokens=stream_tokens, **greedy)],
                         lambda ev: events.put(("a", ev, time.perf_counter())))
    stamps, long_first, t_long = [], None, None
    done = 0
    while done < 2:
        who, ev, t = events.get(timeout=600)
        if who == "a" and ev.text:
            stamps.append(t)
            if len(stamps) == 8:
                t_long = time.perf_counter()
                served.engine.submit([long_ids], [E.SamplingParams(max_tokens=4, **greedy)],
                                     lambda ev: events.put(("b", ev, time.perf_counter())))
        if who == "b" and long_first is None and (ev.text or ev.finish_reason):
            long_first = t - t_long
        done += ev.finish_reason is not None
    gaps = [b - a for a, b in zip(stamps[8:], stamps[9:])] or [0.0]
    return {"stream_max_gap_s": max(gaps), "long_first_token_s": long_first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--stream-tokens", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=0, help="chunk size to try (default: the engine's PREFILL_CHUNK)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()

    from lmforge.model.hub import resolve_model
    from lmforge.serve import engine as E

    served = E.load_served(resolve_model(args.model), device="cpu", precision="auto", max_batch=8)
    text = "The quick brown fox jumps over the lazy dog. " * (args.prompt_tokens // 5)
    long_ids = served.tokenizer.encode(text)[:args.prompt_tokens]
    chunk = args.chunk or E.PREFILL_CHUNK
    one(served, E, chunk, long_ids[:300], 20)  # warm-up
    rows: dict[str, list[dict]] = {"chunked": [], "one-shot": []}
    for _ in range(args.repeats):
        for name, c in (("chunked", chunk), ("one-shot", 10 ** 9)):
            rows[name].append(one(served, E, c, long_ids, args.stream_tokens))
    served.close()
    best = {k: {m: min(r[m] for r in v) for m in v[0]} for k, v in rows.items()}
    print(f"{args.model}, a {len(long_ids)}-token prompt arriving beside a generating stream "
          f"(PREFILL_CHUNK {chunk}, best of {args.repeats}):")
    print(f"{'prefill':<10} {'stream max gap':>15} {'long prompt first token':>25}")
    for k, v in best.items():
        print(f"{k:<10} {v['stream_max_gap_s']:>14.2f}s {v['long_first_token_s']:>24.2f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": args.model, "prompt_tokens": len(long_ids),
                                               "prefill_chunk": chunk, "runs": rows, "best": best}, indent=2))


if __name__ == "__main__":
    main()
