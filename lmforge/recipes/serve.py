"""Serve a model over HTTP: OpenAI-compatible completions and chat for causal LMs (continuous batching),
classify / embeddings / answer / translate endpoints for the other kinds, and a playground page at /.

    lmforge serve --model smollm2-135m
    lmforge serve --model runs/rt --port 8080                         # a fine-tuned classifier: /v1/classify
    lmforge serve --model runs/chat --host 0.0.0.0 --api-key "$KEY"   # reachable from other machines

    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
         -d '{"messages": [{"role": "user", "content": "Hi!"}], "max_tokens": 64}'

Any OpenAI client works: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY or anything").
The server binds to 127.0.0.1 unless told otherwise, and refuses any other address without --api-key
(also read from LMFORGE_API_KEY). With a key, /v1/* needs `Authorization: Bearer KEY`; /health, the
playground page and the API docs (/docs) stay open. Browsers on other origins get no CORS access unless
--cors-origin names them. Weights load from safetensors only.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from lmforge.config import opt
from lmforge.errors import LmforgeError


@dataclass
class ServeConfig:
    model: str = opt("", "model folder, lmforge output folder, alias (smollm2-135m, minilm-l6) or hub id")
    host: str = opt("127.0.0.1", "address to listen on; anything but loopback needs --api-key")
    port: int = opt(8000, "TCP port", ge=0, le=65535)
    api_key: str | None = opt(None, "require 'Authorization: Bearer KEY' on /v1/* (default: $LMFORGE_API_KEY)")
    model_name: str | None = opt(None, "the model name clients send and see (default: the model folder's name)")
    max_batch: int = opt(8, "sequences generated together (continuous batching; 1: one at a time)", ge=1)
    max_queue: int = opt(64, "requests waiting for a batch slot; more get 503 with Retry-After", ge=1)
    request_timeout: float = opt(300.0, "seconds a request may take (queue + generation) before 504", gt=0)
    max_tokens_limit: int = opt(4096, "largest max_tokens a request may ask for", ge=1)
    cors_origin: list[str] = opt([], "browser origins allowed to call the API (default: none)")
    device: str = opt("auto", "where the model runs", choices=["auto", "cpu", "cuda", "mps"])
    precision: str = opt("auto", "weights' precision (auto: bf16 for generation on GPUs and on CPUs with native "
                                 "bf16, AVX512-BF16/AMX, where decode measured 1.7-2x faster; else fp32)",
                         choices=["auto", "fp32", "bf16"])


def run(cfg: ServeConfig) -> int:
    from lmforge.serve.app import check_bind

    if not cfg.model:
        raise LmforgeError("--model is required")
    api_key = cfg.api_key or os.environ.get("LMFORGE_API_KEY") or None
    check_bind(cfg.host, api_key)  # before the (slow) model load

    import socket

    import uvicorn

    from lmforge.serve.app import create_app

    # bind first: a port in use is a one-line error, before the model loads
    sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise LmforgeError(f"cannot listen on {cfg.host}:{cfg.port} ({e.strerror or e})") from None
    port = sock.getsockname()[1]
    try:
        app = create_app(cfg.model, model_name=cfg.model_name, api_key=api_key, max_batch=cfg.max_batch,
                         max_queue=cfg.max_queue, request_timeout=cfg.request_timeout,
                         max_tokens_limit=cfg.max_tokens_limit, cors_origins=cfg.cors_origin, device=cfg.device,
                         precision=cfg.precision)
    except BaseException:
        sock.close()
        raise
    state = app.state.lmforge
    s = state.served
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    url = f"http://{host}:{port}"
    engine = (f", batch {cfg.max_batch}{', native KV cache' if s.native else ''}" if s.engine is not None else "")
    if s.engine is not None and not s.native and cfg.max_batch > 1:
        print("note: this architecture runs through transformers, one sequence at a time per step: concurrent "
              "requests share the loop without the batching speed-up (Llama, Mistral, Qwen2 and SmolLM2 get it)",
              flush=True)
    # the "seq2seq" kind is any translator: a decoder-only one is not an encoder-decoder model
    kind = "translator, decoder-only" if s.kind == "seq2seq" and s.translator is not None else s.kind
    print(f"serving {state.name} ({kind}, {s.device}, {s.precision}{engine}) from {s.path}", flush=True)
    print(f"  {url}/  playground    {url}/docs  API docs    {url}/health", flush=True)
    for ep in state.endpoints:
        print(f"  POST {url}{ep}", flush=True)
    print(f"  GET  {url}/v1/models", flush=True)
    print("  auth: " + ("Authorization: Bearer KEY on /v1/*" if api_key else "none (loopback only)"), flush=True)
    config = uvicorn.Config(app, host=cfg.host, port=port, log_level="info", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
