"""Serving throughput: `lmforge serve` (continuous batching, and --max-batch 1) against a plain transformers
generate loop, plus single-stream decode speed against HF `model.generate`.

    .venv/bin/python bench/serve.py --json serve.json          # smollm2-135m, the full run (~4 min on 2 cores)
    .venv/bin/python bench/serve.py --quick                    # a short look (~1-2 min)
    .venv/bin/python bench/serve.py --model runs/x/final --quick

Parts (each prints a table; --json writes them all):
  1. single stream: lmforge's engine (native KV cache) vs HF `model.generate`, greedy, --single-tokens new
     tokens (EOS ignored), same prompt, fp32 both; best of --repeats, alternating. Target: lmforge >= 1.0x.
  2. precision: lmforge decode tokens/s at batch 1 and batch 8: fp32 weights, bf16 weights, and fp32 weights
     under bf16 autocast (what picked --precision auto's CPU default).
  3. serving: C = 1 and 8 concurrent clients, each sending --rounds requests back to back of --tokens new
     tokens (ignore_eos: every request makes exactly that many), distinct prompts:
       (a) `lmforge serve` (continuous batching, --max-batch 8)
       (b) `lmforge serve --max-batch 1` (one sequence at a time)
       (c) a plain transformers loop answering one request at a time (model.generate; in-process, no HTTP;
           the servers' precision)
     Aggregate tokens/s (all tokens / wall time) and p50/p95 request latency. Target: (a) 8 clients >= 3x (b).
The lmforge servers run as real `python -m lmforge serve` processes (with tcmalloc where installed, as the
CLI does); this process re-executes itself under tcmalloc too, so both sides share the allocator.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lmforge.cli import ensure_tcmalloc  # noqa: E402  (light: no torch)

ensure_tcmalloc([sys.executable, *sys.argv])  # before torch loads: the allocator is preloaded

import httpx  # noqa: E402
import torch  # noqa: E402

from lmforge.model.hub import resolve_model  # noqa: E402

TOPICS = ["a lighthouse keeper", "a lost robot", "the first snow", "a bakery at dawn", "two rival chess players",
          "a dragon who hates gold", "a train that never stops", "an old violin", "a city under the sea",
          "a clockmaker's apprentice", "the last library", "a garden on the moon"]


def prompt(i: int) -> str:
    return f"Write a short story about {TOPICS[i % len(TOPICS)]}. Story {i}:"


def pct(values: list[float], p: float) -> float:
    v = sorted(values)
    k = min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))
    return v[k]


# ------------------------------------------------------------------------------------------ 1 + 2: in-process

def engine_run(served, prompts_ids: list[list[int]], tokens: int) -> dict:
    """Submit all prompts at once to a served model's engine; wall time, decode time after first tokens."""
    from lmforge.serve.engine import SamplingParams

    q: queue.Queue = queue.Queue()
    t0 = time.perf_counter()
    firsts: dict[int, float] = {}
    for i, p in enumerate(prompts_ids):
        served.engine.submit([p], [SamplingParams(max_tokens=tokens, temperature=0.0)],
                             lambda ev, i=i: q.put((i, ev, time.perf_counter())))
    done, n = 0, 0
    while done < len(prompts_ids):
        i, ev, t = q.get(timeout=600)
        firsts.setdefault(i, t)
        if ev.finish_reason == "error":
            raise RuntimeError(f"generation failed: {ev.error}")
        if ev.finish_reason is not None:
            done += 1
            n += ev.completion_tokens
    wall = time.perf_counter() - t0
    decode = wall - (max(firsts.values()) - t0)
    return {"tokens": n, "wall_s": wall, "tokens_per_s": n / wall,
            "decode_tokens_per_s": (n - len(prompts_ids)) / max(decode, 1e-9)}


def single_stream(path: Path, tokens: int, repeats: int) -> dict:
    """lmforge's engine vs HF generate, one sequence, at equal precision (fp32 and bf16 weights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.serve.engine import load_served

    tok = AutoTokenizer.from_pretrained(str(path))
    ids = tok(prompt(0))["input_ids"]
    x = torch.tensor([ids])
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = {"new_tokens": tokens, "prompt_tokens": len(ids)}
    for precision in ("fp32", "bf16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        served = load_served(path, device="cpu", precision=precision, max_batch=1)
        hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True).eval()

        def run_hf(n: int) -> float:
            t = time.perf_counter()
            with torch.inference_mode():
                y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=pad)
            assert y.shape[1] - x.shape[1] == n
            return n / (time.perf_counter() - t)

        engine_run(served, [ids], 4)  # warm-up both
        run_hf(4)
        ours, theirs = [], []
        for _ in range(repeats):  # alternating, best of each: machine noise hits both
            ours.append(engine_run(served, [ids], tokens)["tokens_per_s"])
            theirs.append(run_hf(tokens))
        served.close()
        hf = None  # noqa: F841  (free it before the next precision loads)
        out[precision] = {"lmforge_tokens_per_s": round(max(ours), 2), "hf_generate_tokens_per_s": round(max(theirs), 2),
                          "speedup": round(max(ours) / max(theirs), 3)}
    return out


def precision_sweep(path: Path, tokens: int, repeats: int) -> dict:
    from transformers import AutoTokenizer

    from lmforge.serve.engine import load_served

    tok = AutoTokenizer.from_pretrained(str(path))
    prompts = [tok(prompt(i))["input_ids"] for i in range(8)]
    out = {}
    for precision in ("fp32", "bf16", "bf16-autocast"):
        served = load_served(path, device="cpu", precision="fp32" if precision == "bf16-autocast" else precision,
                             max_batch=8)
        if precision == "bf16-autocast":  # fp32 weights, matmuls autocast to bf16 (weights cast every step)
            backend = served.engine.backend
            for name in ("prefill", "decode"):
                def wrapped(*args, _f=getattr(backend, name)):
                    with torch.autocast("cpu", dtype=torch.bfloat16):
                        return _f(*args)
                setattr(backend, name, wrapped)
        engine_run(served, prompts[:2], 4)  # warm-up
        row = {}
        for batch in (1, 8):
            runs = [engine_run(served, prompts[:batch], tokens) for _ in range(repeats)]
            best = max(runs, key=lambda r: r["decode_tokens_per_s"])
            row[f"batch{batch}"] = {k: round(v, 2) for k, v in best.items()}
        served.close()
        out[precision] = row
    return out


# ------------------------------------------------------------------------------------------ 3: serving

def start_server(path: Path, max_batch: int, port: int, precision: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge", "serve", "--model", str(path), "--port", str(port), "--max-batch",
           str(max_batch), "--max-queue", "256", "--model-name", "bench", "--precision", precision,
           "--max-tokens-limit", "4096"]
    env = dict(os.environ, LD_PRELOAD="")  # the CLI adds tcmalloc itself (sys.argv matches the verb)
    env.pop("LMFORGE_NO_TCMALLOC", None)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"lmforge serve exited: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("lmforge serve did not start within 300 s")


def drive(clients: int, rounds: int, one_request) -> dict:
    """`clients` threads, each making `rounds` requests back to back; one_request(i) -> tokens made."""
    lat: list[float] = []
    toks: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients)

    def client(c: int):
        barrier.wait()
        for r in range(rounds):
            t = time.perf_counter()
            try:
                n = one_request(c * rounds + r)
            except Exception as e:  # counted, reported
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                lat.append(time.perf_counter() - t)
                toks.append(n)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"clients": clients, "requests": len(lat), "errors": errors[:3], "n_errors": len(errors),
            "tokens": sum(toks), "wall_s": round(wall, 2), "tokens_per_s": round(sum(toks) / wall, 2),
            "p50_latency_s": round(pct(lat, 50), 3) if lat else None,
            "p95_latency_s": round(pct(lat, 95), 3) if lat else None}


def serve_setup(path: Path, max_batch: int, port: int, tokens: int, rounds: int, client_counts, precision) -> dict:
    proc = start_server(path, max_batch, port, precision)
    url = f"http://127.0.0.1:{port}/v1/completions"
    http = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=64))

    def one(i: int) -> int:
        r = http.post(url, json={"model": "bench", "prompt": prompt(i), "max_tokens": tokens, "temperature": 0,
                                 "ignore_eos": True})
        r.raise_for_status()
        return r.json()["usage"]["completion_tokens"]

    try:
        one(0)  # warm-up
        out = {}
        for c in client_counts:
            out[f"{c}_clients"] = drive(c, rounds, one)
        out["engine"] = http.get(f"http://127.0.0.1:{port}/health").json().get("engine")
        return out
    finally:
        http.close()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()


def hf_loop_setup(path: Path, tokens: int, rounds: int, client_counts, precision: str) -> dict:
    """A plain transformers server core: one worker thread, model.generate per request, FIFO."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    jobs: queue.Queue = queue.Queue()

    def worker():
        while True:
            job = jobs.get()
            if job is None:
                return
            text, box, done = job
            x = tok(text, return_tensors="pt")
            with torch.inference_mode():
                out = model.generate(**x, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                     pad_token_id=pad)
            box.append(tok.decode(out[0, x["input_ids"].shape[1]:], skip_special_tokens=True))
            box.append(out.shape[1] - x["input_ids"].shape[1])
            done.set()

    th = threading.Thread(target=worker, daemon=True)
    th.start()

    def one(i: int) -> int:
        box: list = []
        done = threading.Event()
        jobs.put((prompt(i), box, done))
        done.wait()
        return box[1]

    one(0)
    out = {f"{c}_clients": drive(c, rounds, one) for c in client_counts}
    jobs.put(None)
    th.join()
    return out


# ------------------------------------------------------------------------------------------ main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per serving request")
    ap.add_argument("--rounds", type=int, default=2, help="requests per client, back to back")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--single-tokens", type=int, default=128, help="new tokens for the single-stream comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"], help="the servers' precision")
    ap.add_argument("--port", type=int, default=8731)
    ap.add_argument("--skip", nargs="*", default=[], choices=["single", "precision", "batched", "sequential", "hf"])
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 round, 1 repeat: checks that it runs")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args()
    if a.quick:
        a.tokens, a.rounds, a.single_tokens, a.repeats = 16, 1, 16, 1
    path = resolve_model(a.model)
    from lmforge.serve.engine import pick_precision

    precision = pick_precision(a.precision, torch.device("cpu"), "causal-lm")  # what the servers will use
    res: dict = {"model": str(path), "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
                 "tokens": a.tokens, "rounds": a.rounds, "clients": a.clients, "serving_precision": precision}
    print(f"model {path} | torch threads {torch.get_num_threads()} | {a.tokens} tokens x {a.rounds} rounds per client",
          flush=True)

    if "single" not in a.skip:
        s = res["single_stream"] = single_stream(path, a.single_tokens, a.repeats)
        print(f"\n[1] single stream, {a.single_tokens} new tokens, greedy   lmforge   HF generate   speedup (target >= 1.0)")
        for prec in ("fp32", "bf16"):
            r = s[prec]
            print(f"    {prec} weights {'':<33} {r['lmforge_tokens_per_s']:7.1f} {r['hf_generate_tokens_per_s']:12.1f}"
                  f" {r['speedup']:8.2f}x", flush=True)
    if "precision" not in a.skip:
        p = res["precision_sweep"] = precision_sweep(path, a.single_tokens // 2 or 8, a.repeats)
        print("\n[2] decode tokens/s (after the first token)   batch 1    batch 8 (aggregate)")
        for prec, row in p.items():
            print(f"    {prec:<42} {row['batch1']['decode_tokens_per_s']:8.1f}   {row['batch8']['decode_tokens_per_s']:8.1f}",
                  flush=True)
    setups = []
    if "batched" not in a.skip:
        setups.append(("lmforge_batched", lambda: serve_setup(path, 8, a.port, a.tokens, a.rounds, a.clients,
                                                              precision)))
    if "sequential" not in a.skip:
        setups.append(("lmforge_max_batch_1", lambda: serve_setup(path, 1, a.port + 1, a.tokens, a.rounds, a.clients,
                                                                  precision)))
    if "hf" not in a.skip:
        setups.append(("hf_generate_loop", lambda: hf_loop_setup(path, a.tokens, a.rounds, a.clients, precision)))
    if setups:
        print(f"\n[3] serving ({precision}), {a.tokens} new tokens per request clients   tok/s     p50 s    p95 s",
              flush=True)
    for name, fn in setups:
        r = res[name] = fn()
        for c in a.clients:
            row = r[f"{c}_clients"]
            err = f"  ({row['n_errors']} errors: {row['errors'][:1]})" if row["n_errors"] else ""
            print(f"    {name:<40} {c:7d} {row['tokens_per_s']:8.1f} {row['p50_latency_s']:8.2f} "
                  f"{row['p95_latency_s']:8.2f}{err}", flush=True)
    hi = max(a.clients)
    ratios = {}
    if "lmforge_batched" in res and "lmforge_max_batch_1" in res:
        ratios[f"batched_vs_max_batch_1_at_{hi}_clients"] = (res["lmforge_batched"][f"{hi}_clients"]["tokens_per_s"]
                                                             / res["lmforge_max_batch_1"][f"{hi}_clients"]["tokens_per_s"])
    if "lmforge_batched" in res and "hf_generate_loop" in res:
        ratios[f"batched_vs_hf_loop_at_{hi}_clients"] = (res["lmforge_batched"][f"{hi}_clients"]["tokens_per_s"]
                                                         / res["hf_generate_loop"][f"{hi}_clients"]["tokens_per_s"])
    if "lmforge_batched" in res:
        ratios["batched_max_batch_seen"] = (res["lmforge_batched"].get("engine") or {}).get("max_batch_seen")
    if ratios:
        res["ratios"] = {k: round(v, 2) if isinstance(v, float) else v for k, v in ratios.items()}
        print("\nsummary: " + ", ".join(f"{k} {v}" for k, v in res["ratios"].items())
              + " (target: batched >= 3x max-batch-1 at 8 clients)")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
