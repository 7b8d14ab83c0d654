"""The HTTP API: an OpenAI-compatible server for causal LMs, and task endpoints for the other model kinds.

    create_app("runs/chat", api_key="secret") -> FastAPI      (lmforge serve runs it with uvicorn)

Endpoints by model kind (GET /v1/models lists the kind and its endpoints):
    causal-lm   POST /v1/completions, POST /v1/chat/completions   (OpenAI shapes, streaming as SSE)
    classifier  POST /v1/classify     {"input": str | [str]} -> per input: labels with scores
    embeddings  POST /v1/embeddings   OpenAI shape; mean pooling, L2-normalised
    qa          POST /v1/answer       {"question", "context"} -> answer span and score
    seq2seq     POST /v1/translate    {"input": str | [str]} -> translations
    always      GET /v1/models, GET /health, GET / (playground), /static/*, /docs, /openapi.json

Errors always have OpenAI's shape {"error": {"message", "type", "param", "code"}}: 400 for invalid JSON,
wrong types and out-of-range values (FastAPI's 422 is turned into 400), 401 for a missing or wrong key, 404
for another model's name, 503 with Retry-After when the wait queue is full, 504 when a request outlives
--request-timeout.

With an API key, every /v1/* path needs `Authorization: Bearer KEY` (compared in constant time);
/health, the playground page, /static and the API docs stay open: they hold no model output and the page
must load before a user can type the key into it.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import hmac
import json
import math
import re
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmforge.errors import LmforgeError
from lmforge.serve import schemas as S
from lmforge.serve.engine import EngineClosed, Event, QueueFull, SamplingParams, ServedModel, load_served

STATIC_DIR = Path(__file__).resolve().parent / "static"
ENDPOINTS = {
    "causal-lm": ["/v1/completions", "/v1/chat/completions"],
    "classifier": ["/v1/classify"],
    "embeddings": ["/v1/embeddings"],
    "qa": ["/v1/answer"],
    "seq2seq": ["/v1/translate"],
}
ALL_ENDPOINTS = {p for eps in ENDPOINTS.values() for p in eps}
MAX_CHOICES = 64  # prompts x n per request
MAX_TEXT_CHARS = 1_000_000
CHAT_ROLES = {"system", "user", "assistant", "developer"}


# ----------------------------------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    # a message quoting the request (a model name) may hold a lone surrogate, which UTF-8 JSON cannot carry:
    # escaped, the error is still the 4xx it is, not a 500 from the encoder
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)


def _is_type_tag(part) -> bool:
    """pydantic names union members in error locations ('str', 'list[int]', 'ChatMessage'); fields are lowercase."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part
                                      or part[:1].isupper() or part.startswith(("function-", "literal")))


def _loc_param(loc) -> str | None:
    parts = [str(x) for x in loc if x != "body" and not _is_type_tag(x)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def _validation_message(errors: list[dict], body: Any = None,
                        content_type: str | None = None) -> tuple[str, str | None]:
    if isinstance(body, (bytes, bytearray)) and body:
        # FastAPI parses JSON only under a JSON content type and validates anything else as raw bytes, whose
        # error would say a JSON object is needed, which the body may well be (curl -d sends it as a form)
        sent = f"this request's is {content_type!r}" if content_type else "it was sent without a Content-Type"
        return f"the request body must be sent with the header 'Content-Type: application/json' ({sent})", None
    if not errors:
        return "invalid request", None
    e = errors[0]
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})", None
    param = _loc_param(e.get("loc", ()))
    if param is None and e.get("type") == "missing":
        return "the request body is empty: send a JSON object", None
    if param is None and e.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        return "the request body must be a JSON object", None
    msg = e.get("msg", "invalid value")
    # unions report one error per member type; the first says enough
    return (f"{param}: {msg}" if param else msg), param


def _undecodable_body(cause: BaseException) -> str:
    """Why FastAPI could not parse a body beyond JSON's syntax (it says only 'There was an error parsing the
    body'): bytes that are not the text json.loads took them for, nesting beyond Python's recursion limit, or
    an integer beyond its digit limit."""
    if isinstance(cause, UnicodeDecodeError):
        bad = cause.object[cause.start:cause.start + 1].hex()
        enc = "UTF-8" if cause.encoding.lower().replace("-", "") == "utf8" else cause.encoding
        return f"the request body is not valid {enc} (byte 0x{bad} at offset {cause.start}); send JSON as UTF-8"
    if isinstance(cause, RecursionError):
        return "the request body is not valid JSON (nested too deeply)"
    # the rest of ValueError's message tells a server's operator how to lift the limit
    return f"the request body is not valid JSON ({str(cause).split(';')[0]})"


class Disconnected(Exception):
    pass


class TimedOut(Exception):
    pass


# ----------------------------------------------------------------------------------------- auth

class APIKeyMiddleware:
    """`Authorization: Bearer KEY` on /v1/*, compared with hmac.compare_digest (pure ASGI: streams untouched)."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.key = api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and (scope["path"] == "/v1" or scope["path"].startswith("/v1/")):
            auth = b""
            for name, value in scope.get("headers", []):
                if name == b"authorization":
                    auth = value
                    break
            scheme, _, token = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.key):
                msg = ("Incorrect API key provided." if auth else
                       "Missing API key: send the header 'Authorization: Bearer KEY'.")
                resp = JSONResponse(error_body(msg, "invalid_request_error", None, "invalid_api_key"), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body above `limit` bytes, by its Content-Length or, sent in chunks without one, as it
    arrives: unknown fields are ignored but parsed all the same, so without a bound one request can take
    gigabytes."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def _too_large(self, scope, receive, send) -> None:
        resp = JSONResponse(error_body(f"request body above this server's limit of {self.limit:,} bytes",
                                       "invalid_request_error", None, "request_too_large"), status_code=413)
        await resp(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                return await self._too_large(scope, receive, send)
            return await self.app(scope, receive, send)
        # chunked: read it here, within the limit, then hand it on (FastAPI would turn an error raised from
        # inside its body reading into a 400)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.limit:
                return await self._too_large(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)


MAX_BODY_BYTES = 64 << 20  # 2,048 texts of 30,000 characters; a long QA context is ~100 KB


# ----------------------------------------------------------------------------------------- the app

def create_app(model_path: str | Path, *, model_name: str | None = None, api_key: str | None = None,
               max_batch: int = 8, max_queue: int = 64, request_timeout: float = 300.0,
               max_tokens_limit: int = 4096, cors_origins: list[str] | tuple = (), device: str = "cpu",
               precision: str = "auto", step_delay: float = 0.0, served: ServedModel | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server for one model. `model_path`: a folder, lmforge output folder, alias or hub id."""
    from lmforge.model.hub import resolve_model

    if max_queue < 0:
        raise LmforgeError("--max-queue must be 0 or more")
    if request_timeout <= 0:
        raise LmforgeError("--request-timeout must be positive")
    if max_tokens_limit < 1:
        raise LmforgeError("--max-tokens-limit must be at least 1")
    path = resolve_model(str(model_path))
    name = model_name or default_model_name(str(model_path), path)
    if served is None:
        served = load_served(path, device=device, precision=precision, max_batch=max_batch, max_queue=max_queue,
                             step_delay=step_delay)
    state = State(served, name, request_timeout, max_tokens_limit, max_batch, max_queue)

    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app):
        if served.engine is not None:
            served.engine.start()
        yield
        served.close()

    from lmforge import __version__

    app = FastAPI(title="lmforge serve", version=__version__, lifespan=lifespan,
                  description=f"Serving **{name}** ({served.kind}). OpenAI-compatible where OpenAI has the endpoint.")
    app.state.lmforge = state

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, e: RequestValidationError):
        msg, param = _validation_message(list(e.errors()), e.body, request.headers.get("content-type"))
        return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, e: StarletteHTTPException):
        msg = str(e.detail) if e.detail else "error"
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        if e.status_code == 404 and request.url.path in ALL_ENDPOINTS:
            msg = (f"{request.url.path} is not served: '{name}' is a {served.kind} model; it serves "
                   f"{', '.join(state.endpoints)}")
        elif e.status_code == 404:
            msg = f"no such endpoint: {request.method} {request.url.path}"
        elif e.status_code == 400 and isinstance(e.__cause__, ValueError | RecursionError):
            # FastAPI's "There was an error parsing the body": json.loads failed beyond a syntax error
            msg, code = _undecodable_body(e.__cause__), "invalid_value"
        typ = "invalid_request_error" if e.status_code < 500 else "server_error"
        return JSONResponse(error_body(msg, typ, None, code), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request, e: Exception):
        return JSONResponse(error_body(f"internal error: {type(e).__name__}", "server_error", None, "internal_error"),
                            status_code=500)

    _add_common_routes(app, state)
    if served.kind == "causal-lm" or served.translator is not None:
        _add_generation_routes(app, state)
    if served.kind == "classifier":
        _add_classify_route(app, state)
    if served.kind == "embeddings":
        _add_embeddings_route(app, state)
    if served.kind == "qa":
        _add_answer_route(app, state)
    if served.kind == "seq2seq":
        _add_translate_route(app, state)

    app.add_middleware(BodyLimitMiddleware, limit=max_body_bytes)
    if api_key:  # outside the body limit: a request without the key is refused before its body is read
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    if cors_origins:  # added last: outermost, so preflights and 401s carry CORS headers
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


def default_model_name(spec: str, path: Path) -> str:
    """The name clients use: an alias or hub id as given, else the folder's name (an lmforge run's
    folder, not its final/)."""
    p = Path(spec).expanduser()
    if not p.exists():
        return spec
    p = p.resolve()
    if p.name == "final" and p.parent.name:
        return p.parent.name
    return p.name


class State:
    def __init__(self, served: ServedModel, name: str, timeout: float, max_tokens_limit: int, max_batch: int,
                 max_queue: int):
        self.served = served
        self.name = name
        self.timeout = timeout
        self.max_tokens_limit = max_tokens_limit
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.created = int(time.time())
        self.started = time.time()
        self.in_flight = 0  # non-engine kinds
        eps = list(ENDPOINTS[served.kind])
        if served.translator is not None:  # a decoder-only translator also completes and chats
            eps += ENDPOINTS["causal-lm"]
        self.endpoints = eps

    def model_entry(self) -> dict:
        s = self.served
        entry = {"id": self.name, "object": "model", "created": self.created, "owned_by": "lmforge",
                 "kind": s.kind, "endpoints": self.endpoints, "context_length": s.context_length}
        if s.kind == "classifier":
            entry["labels"] = s.labels or []
            pair = (s.extras.get("data_fields") or {}).get("text_pair")
            if pair:  # fine-tuned on pairs: /v1/classify needs text_pair too (and the playground shows a field)
                entry["text_pair"] = pair
        return entry

    def check_model(self, requested: str | None) -> None:
        if requested is not None and requested != self.name:
            raise APIError(404, f"The model '{requested}' does not exist; this server serves '{self.name}'.",
                           "model", "model_not_found")


# ----------------------------------------------------------------------------------------- common routes

def _add_common_routes(app: FastAPI, state: State) -> None:
    @app.get("/", include_in_schema=False)
    async def index():
        page = STATIC_DIR / "index.html"
        if page.is_file():
            return FileResponse(page, media_type="text/html")
        eps = "".join(f"<li><code>{p}</code></li>" for p in state.endpoints)
        return HTMLResponse(f"<!doctype html><title>lmforge serve</title><h1>lmforge serve</h1>"
                            f"<p>Serving <b>{_html(state.name)}</b> ({state.served.kind}).</p><ul>{eps}</ul>"
                            f"<p>API docs: <a href='/docs'>/docs</a></p>")

    @app.get("/static/{file_path:path}", include_in_schema=False)
    async def static(file_path: str):
        root = STATIC_DIR.resolve()
        try:
            target = (root / file_path).resolve()
        except (OSError, ValueError):
            raise APIError(404, "not found", code="not_found") from None
        if not target.is_relative_to(root) or not target.is_file():
            raise APIError(404, "not found", code="not_found")
        return FileResponse(target)

    @app.get("/health", tags=["server"], summary="liveness, model kind and engine counters")
    async def health():
        s = state.served
        out: dict[str, Any] = {"status": "ok", "model": state.name, "kind": s.kind,
                               "uptime_s": round(time.time() - state.started, 1), "device": str(s.device),
                               "precision": s.precision}
        if s.engine is not None:
            out["engine"] = s.engine.snapshot()
            out["native"] = s.native
        else:
            out["in_flight"] = state.in_flight
        return out

    @app.get("/v1/models", tags=["models"], summary="the served model (OpenAI list shape, plus kind and endpoints)")
    async def models():
        return {"object": "list", "data": [state.model_entry()]}

    @app.get("/v1/models/{model_id:path}", tags=["models"])
    async def model(model_id: str):
        state.check_model(model_id)
        return state.model_entry()


def _html(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ----------------------------------------------------------------------------------------- generation

def _add_generation_routes(app: FastAPI, state: State) -> None:
    @app.post("/v1/completions", tags=["generation"], summary="OpenAI text completions (stream: SSE)")
    async def completions(body: S.CompletionRequest, request: Request):
        state.check_model(body.model)
        if body.logprobs is not None:
            raise APIError(400, "logprobs is not supported by this server", "logprobs", "unsupported")
        if body.suffix:
            raise APIError(400, "suffix is not supported by this server", "suffix", "unsupported")
        n = body.n or 1
        if body.best_of is not None and body.best_of != n:
            raise APIError(400, "best_of is not supported (it may only equal n)", "best_of", "unsupported")
        prompts = await anyio.to_thread.run_sync(_completion_prompts, state, body.prompt)
        params = _sampling(state, body, [len(p) for p in prompts], default_max=16, param="max_tokens",
                           stop_ids=state.served.stop_ids, continues_prompt=True)
        # a text prompt echoes as sent (not with the BOS its encoding starts with); token ids echo decoded
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        echo = [(t if isinstance(t, str) else state.served.tokenizer.decode(p, skip_special_tokens=False))
                if body.echo else "" for t, p in zip(texts, prompts)]
        if len(prompts) * n > MAX_CHOICES:
            raise APIError(400, f"too many choices: {len(prompts)} prompts x n={n} > {MAX_CHOICES}", "n",
                           "invalid_value")
        return await _generate(state, request, "text_completion", prompts, n, params, body, echo=echo)

    @app.post("/v1/chat/completions", tags=["generation"], summary="OpenAI chat completions (stream: SSE)")
    async def chat_completions(body: S.ChatCompletionRequest, request: Request):
        state.check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs is not supported by this server", "logprobs", "unsupported")
        if body.tools:
            raise APIError(400, "tools are not supported by this server", "tools", "unsupported")
        fmt = body.response_format
        if fmt is not None and fmt.get("type", "text") != "text":
            raise APIError(400, "only response_format {'type': 'text'} is supported", "response_format",
                           "unsupported")
        messages = _chat_messages(body.messages)
        ids = await anyio.to_thread.run_sync(_chat_prompt, state, messages)
        param = "max_tokens"
        if body.max_completion_tokens is not None:  # errors name the field the client sent
            body.max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        params = _sampling(state, body, [len(ids)], default_max=None, param=param,
                           stop_ids=state.served.chat_stop_ids)
        return await _generate(state, request, "chat.completion", [ids], body.n or 1, params, body)


def _token_ids(state: State, ids: list[int], param: str) -> list[int]:
    vocab = _vocab_size(state)
    if not ids:
        raise APIError(400, f"{param}: an empty list of token ids", param, "invalid_value")
    for t in ids:
        if not 0 <= t < vocab:
            raise APIError(400, f"{param}: token id {t} is outside the vocabulary (0..{vocab - 1})", param,
                           "invalid_value")
    return list(ids)


def _vocab_size(state: State) -> int:
    m = state.served.model
    cfg = getattr(m, "cfg", None)
    if cfg is not None and hasattr(cfg, "vocab_size"):
        return int(cfg.vocab_size)
    hf = getattr(m, "hf", m)
    return int(getattr(hf.config, "vocab_size", 0) or len(state.served.tokenizer))


def _encode_prompt(state: State, text: str) -> list[int]:
    tok = state.served.tokenizer
    if len(text) > MAX_TEXT_CHARS:
        raise APIError(400, f"prompt: longer than {MAX_TEXT_CHARS} characters", "prompt", "context_length_exceeded")
    if not text:
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [start if start is not None else 0]
    ids = list(tok(text)["input_ids"])  # BOS where the tokenizer is configured to add one
    appended = _appended_token(tok)  # a tokenizer that appends EOS would end the text before it starts
    if len(ids) > 1 and appended is not None and ids[-1] == appended:
        ids = ids[:-1]
    return ids or [tok.eos_token_id or 0]


@functools.lru_cache(maxsize=8)
def _appended_token(tok) -> int | None:
    """The special token `tok` appends to every text, if any (asked once per tokenizer). Asked of the tokenizer
    itself: the chat set-up may have made the end of turn its eos_token, not what its post-processor appends."""
    probe, bare = tok("a")["input_ids"], tok("a", add_special_tokens=False)["input_ids"]
    return probe[-1] if probe and bare and probe[-1] != bare[-1] else None


def _completion_prompts(state: State, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [_encode_prompt(state, prompt)]
    if not prompt:
        raise APIError(400, "prompt: an empty list", "prompt", "invalid_value")
    if all(isinstance(p, str) for p in prompt):
        if len(prompt) > MAX_CHOICES:
            raise APIError(400, f"prompt: more than {MAX_CHOICES} prompts", "prompt", "invalid_value")
        return [_encode_prompt(state, p) for p in prompt]
    if all(isinstance(p, int) for p in prompt):
        return [_token_ids(state, prompt, "prompt")]
    if len(prompt) > MAX_CHOICES:
        raise APIError(400, f"prompt: more than {MAX_CHOICES} prompts", "prompt", "invalid_value")
    return [_token_ids(state, p, "prompt") for p in prompt]


def _chat_messages(messages: list[S.ChatMessage]) -> list[dict]:
    if not messages:
        raise APIError(400, "messages: at least one message is needed", "messages", "invalid_value")
    out = []
    for i, m in enumerate(messages):
        role = "system" if m.role == "developer" else m.role
        if role not in CHAT_ROLES:
            raise APIError(400, f"messages[{i}].role: {m.role!r} is not one of system, user, assistant",
                           f"messages[{i}].role", "invalid_value")
        content = m.content
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        else:
            parts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                                   f"messages[{i}].content", "unsupported")
                parts.append(part.text)
            text = "".join(parts)
        if len(text) > MAX_TEXT_CHARS:
            raise APIError(400, f"messages[{i}].content: longer than {MAX_TEXT_CHARS} characters",
                           f"messages[{i}].content", "context_length_exceeded")
        out.append({"role": role, "content": text})
    return out


@functools.lru_cache(maxsize=4)
def _special_texts(tokenizer) -> re.Pattern | None:
    """The texts of the tokenizer's special tokens, as one pattern (None where it has none)."""
    from lmforge.tasks.sft import special_texts

    texts = sorted(special_texts(tokenizer), key=len, reverse=True)  # a longer token before its own prefix
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def _check_chat_content(state: State, messages: list[dict]) -> None:
    """Refuse a chat the template cannot render into the context or whose content holds special-token text."""
    ctx = state.served.context_length
    filled = sum(1 for m in messages if m["content"])
    if filled > ctx:
        # every message with content renders to one token at least: refused before rendering, which for a
        # body of a million one-character messages took a minute
        raise APIError(400, f"messages: {filled} messages with content cannot fit in this model's maximum "
                            f"context length of {ctx} tokens", "messages", "context_length_exceeded")
    pattern = _special_texts(state.served.tokenizer)
    for i, m in enumerate(messages):
        found = pattern.search(m["content"]) if pattern is not None else None
        if found:
            # tokenized with the rendered chat, it would be the token itself: a message could end its turn and
            # open one in another role (a system turn). As tiktoken does by default, such text is refused.
            raise APIError(400, f"messages[{i}].content: contains {found.group()!r}, a special token of this "
                                f"model's chat template; a message cannot hold one (send a prompt with the "
                                f"template written out to /v1/completions)", f"messages[{i}].content",
                           "invalid_value")


def _chat_prompt(state: State, messages: list[dict]) -> list[int]:
    from lmforge.tasks.sft import encode_prompt, render_accepted

    tok = state.served.tokenizer
    if not getattr(tok, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages",
                       "unsupported")
    _check_chat_content(state, messages)
    try:
        # a system message that the template has no role for (Gemma) goes into the first user turn, as in
        # fine-tuning and lmforge chat
        _, messages = render_accepted(tok, messages, add_generation_prompt=True)
    except LmforgeError as e:  # templates raise on conversations they do not accept (e.g. role order)
        raise APIError(400, f"messages: {str(e)[:300]}", "messages", "invalid_value") from None
    # the earlier replies keep the tokens they were trained as (a reply's leading newline stays its own)
    ids = encode_prompt(tok, messages, limit=state.served.context_length)
    return ids or [tok.eos_token_id or 0]


def _sampling(state: State, body, prompt_lens: list[int], default_max: int | None, param: str,
              stop_ids, continues_prompt: bool = False) -> SamplingParams:
    ctx = state.served.context_length
    longest = max(prompt_lens)
    if longest >= ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens, and the prompt has {longest} "
                            f"tokens: no room to generate.", "messages" if default_max is None else "prompt",
                       "context_length_exceeded")
    room = ctx - longest
    if body.max_tokens is not None:
        mt = body.max_tokens
        if mt > state.max_tokens_limit:
            raise APIError(400, f"{param}: {mt} is above this server's limit of {state.max_tokens_limit}",
                           param, "invalid_value")
        if mt > room:
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{longest + mt} tokens ({longest} in the prompt, {mt} in the completion).",
                           param, "context_length_exceeded")
    else:
        mt = min(room, state.max_tokens_limit, default_max or room)
    stop = body.stop
    if isinstance(stop, str):
        stop = [stop]
    stop = [s for s in (stop or []) if s]
    if len(stop) > S.MAX_STOP:
        raise APIError(400, f"stop: at most {S.MAX_STOP} stop strings", "stop", "invalid_value")
    if any(len(s) > 1000 for s in stop):
        raise APIError(400, "stop: a stop string is longer than 1000 characters", "stop", "invalid_value")
    bias = None
    if body.logit_bias:
        vocab = _vocab_size(state)
        bias = {}
        if len(body.logit_bias) > 1024:
            raise APIError(400, "logit_bias: at most 1024 entries", "logit_bias", "invalid_value")
        for k, v in body.logit_bias.items():
            # a token id in ASCII digits, as OpenAI takes it (int() would also read " 5", "1_0" and other scripts'
            # digits); a long bad key is quoted in part
            if not (k.isascii() and k.isdigit() and len(k) <= 12):
                shown = k if len(k) <= 40 else k[:40] + "..."
                raise APIError(400, f"logit_bias: key {shown!r} is not a token id", "logit_bias", "invalid_value")
            t = int(k)
            if not 0 <= t < vocab:
                raise APIError(400, f"logit_bias: token id {t} is outside the vocabulary", "logit_bias",
                               "invalid_value")
            if not (math.isfinite(v) and -100 <= v <= 100):
                raise APIError(400, f"logit_bias: bias {v} is not in [-100, 100]", "logit_bias", "invalid_value")
            bias[t] = float(v)
    return SamplingParams(
        max_tokens=mt, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, seed=body.seed,
        stop_ids=frozenset() if body.ignore_eos else frozenset(stop_ids), stop=tuple(stop),
        presence_penalty=body.presence_penalty or 0.0, frequency_penalty=body.frequency_penalty or 0.0,
        logit_bias=bias, continues_prompt=continues_prompt)


class _Run:
    """One submitted request: an asyncio queue fed by the engine thread."""

    def __init__(self, state: State, prompts: list[list[int]], params: list[SamplingParams]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.deadline = self.loop.time() + state.timeout
        self.checked = self.loop.time()
        engine = state.served.engine

        def sink(ev: Event) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, ev)

        try:
            self.handle = engine.submit(prompts, params, sink)
        except QueueFull:
            raise APIError(503, f"The server is busy ({state.max_queue} requests are waiting); retry shortly.",
                           None, "queue_full", headers={"Retry-After": "1"}) from None
        except EngineClosed:
            raise APIError(503, "The server is shutting down.", None, "unavailable",
                           headers={"Retry-After": "5"}) from None

    async def next(self, request: Request | None) -> Event:
        if request is not None and self.loop.time() - self.checked > 0.25:  # events may never pause: check anyway
            self.checked = self.loop.time()
            if await request.is_disconnected():
                raise Disconnected()
        try:
            return self.queue.get_nowait()
        except asyncio.QueueEmpty:
            pass
        while True:
            remaining = self.deadline - self.loop.time()
            if remaining <= 0:
                raise TimedOut()
            try:
                return await asyncio.wait_for(self.queue.get(), min(remaining, 0.25))
            except asyncio.TimeoutError:
                self.checked = self.loop.time()
                if request is not None and await request.is_disconnected():
                    raise Disconnected() from None

    def cancel(self) -> None:
        self.handle.cancel()


def _timeout_error(state: State) -> APIError:
    return APIError(504, f"The request did not finish within {state.timeout:g} s (--request-timeout).", None,
                    "timeout", type="timeout_error")


async def _generate(state: State, request: Request, obj: str, prompts: list[list[int]], n: int,
                    params: SamplingParams, body, echo: list[str] | None = None):
    chat = obj == "chat.completion"
    seq_prompts = [p for p in prompts for _ in range(n)]
    run = _Run(state, seq_prompts, [params] * len(seq_prompts))
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    prompt_tokens = sum(len(p) for p in prompts)
    total = len(seq_prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        try:
            first = await run.next(request)  # wait for the first token before sending headers: errors before
        except TimedOut:                    # it still get a proper status code
            run.cancel()
            raise _timeout_error(state) from None
        except Disconnected:
            run.cancel()
            return Response(status_code=499)
        except BaseException:
            run.cancel()
            raise
        if first.finish_reason == "error":
            run.cancel()
            raise APIError(500, f"generation failed: {first.error}", None, "generation_error")
        # background: also frees the slots when the client leaves before the stream's first chunk (then the
        # generator never starts and its finally never runs); a no-op after a finished stream
        return StreamingResponse(_sse(state, run, first, rid, created, obj, total, prompt_tokens, include_usage,
                                      echo, n), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                 background=BackgroundTask(run.cancel))
    texts = [""] * total
    finish: list[str | None] = [None] * total
    tokens = [0] * total
    done = 0
    try:
        while done < total:
            try:
                ev = await run.next(request)
            except TimedOut:
                raise _timeout_error(state) from None
            except Disconnected:
                return Response(status_code=499)
            texts[ev.index] += ev.text
            if ev.finish_reason is not None:
                if ev.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.error}", None, "generation_error")
                finish[ev.index] = ev.finish_reason
                tokens[ev.index] = ev.completion_tokens
                done += 1
    finally:
        if done < total:
            run.cancel()
    choices = []
    for i in range(total):
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": texts[i]}, "logprobs": None,
                            "finish_reason": finish[i]})
        else:
            pre = echo[i // n] if echo else ""
            choices.append({"index": i, "text": pre + texts[i], "logprobs": None, "finish_reason": finish[i]})
    completion_tokens = sum(tokens)
    return {"id": rid, "object": obj, "created": created, "model": state.name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def _sse_line(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _sse(state: State, run: _Run, first: Event, rid: str, created: int, obj: str, total: int,
               prompt_tokens: int, include_usage: bool, echo: list[str] | None, n: int):
    chat = obj == "chat.completion"
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(index: int, text: str | None, finish: str | None, role: bool = False) -> str:
        if chat:
            delta: dict = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text:
                delta = {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        else:
            choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
        return _sse_line({"id": rid, "object": kind, "created": created, "model": state.name, "choices": [choice]})

    done = 0
    completion_tokens = 0
    try:
        for i in range(total):
            if chat:
                yield chunk(i, None, None, role=True)
            elif echo and echo[i // n]:
                yield chunk(i, echo[i // n], None)
        ev: Event | None = first
        while done < total:
            if ev is None:
                try:
                    ev = await run.next(None)  # a disconnect cancels this generator (finally below)
                except TimedOut:
                    yield _sse_line(error_body(f"The request did not finish within {state.timeout:g} s "
                                               f"(--request-timeout).", "timeout_error", None, "timeout"))
                    break
            if ev.finish_reason == "error":
                yield _sse_line(error_body(f"generation failed: {ev.error}", "server_error", None, "generation_error"))
                break
            if ev.text:
                yield chunk(ev.index, ev.text, None)
            if ev.finish_reason is not None:
                yield chunk(ev.index, None, ev.finish_reason)
                completion_tokens += ev.completion_tokens
                done += 1
            ev = None
        if done == total and include_usage:
            yield _sse_line({"id": rid, "object": kind, "created": created, "model": state.name, "choices": [],
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                       "total_tokens": prompt_tokens + completion_tokens}})
        yield "data: [DONE]\n\n"
    finally:
        if done < total:
            run.cancel()  # client gone (or timed out): free the batch slots now


# ----------------------------------------------------------------------------------------- other kinds

async def _in_thread(state: State, fn, *args):
    """Run a model call in a worker thread (one at a time), with the queue bound and the timeout."""
    if state.in_flight >= state.max_queue + 1:
        raise APIError(503, f"The server is busy ({state.in_flight} requests in flight); retry shortly.", None,
                       "queue_full", headers={"Retry-After": "1"})
    # A timed-out call cannot be stopped: its thread runs on, holding the model. So it counts as in flight
    # until it ends (the queue bound then holds: retries of a slow request get 503s, not more hidden work),
    # and one that had not started when its client gave up does nothing.
    loop = asyncio.get_running_loop()
    abandoned = threading.Event()
    state.in_flight += 1

    def ended() -> None:
        state.in_flight -= 1

    def locked():
        try:
            with state.served.lock, torch.inference_mode():
                return None if abandoned.is_set() else fn(*args)
        finally:
            try:
                loop.call_soon_threadsafe(ended)
            except RuntimeError:  # the server has shut down meanwhile: nothing left to count
                pass
    try:
        with anyio.fail_after(state.timeout):
            return await anyio.to_thread.run_sync(locked, abandon_on_cancel=True)
    except TimeoutError:
        abandoned.set()
        raise _timeout_error(state) from None
    except LmforgeError as e:
        raise APIError(400, str(e), None, "invalid_value") from None


def _texts(value, param: str = "input") -> list[str]:
    texts = [value] if isinstance(value, str) else list(value)
    if not texts:
        raise APIError(400, f"{param}: an empty list", param, "invalid_value")
    if len(texts) > S.MAX_INPUTS:
        raise APIError(400, f"{param}: at most {S.MAX_INPUTS} texts per request", param, "invalid_value")
    if any(not t.strip() for t in texts):  # as lmforge predict: nothing to classify, embed or translate
        raise APIError(400, f"{param}: an empty text", param, "invalid_value")
    if any(len(t) > MAX_TEXT_CHARS for t in texts):
        raise APIError(400, f"{param}: a text is longer than {MAX_TEXT_CHARS} characters", param, "invalid_value")
    return texts


def _usage(n_tokens: int) -> dict:
    return {"prompt_tokens": n_tokens, "total_tokens": n_tokens}


def _add_classify_route(app: FastAPI, state: State) -> None:
    @app.post("/v1/classify", tags=["tasks"], summary="labels with scores for each input text")
    async def classify(body: S.ClassifyRequest):
        state.check_model(body.model)
        texts = _texts(body.input)
        pairs = None if body.text_pair is None else _texts(body.text_pair, "text_pair")
        pair_field = (state.served.extras.get("data_fields") or {}).get("text_pair")
        if pair_field and pairs is None:
            # the first text alone would get a confident, meaningless label
            raise APIError(400, f"text_pair: required, this classifier was fine-tuned on text pairs (second "
                                f"text: '{pair_field}')", "text_pair", "invalid_value")
        from lmforge.tasks.classify import single_texts

        if pairs is not None and single_texts(state.served.extras):
            raise APIError(400, "text_pair: this classifier was fine-tuned on single texts, not pairs", "text_pair",
                           "invalid_value")
        if pairs is not None and len(pairs) != len(texts):
            raise APIError(400, f"text_pair: {len(pairs)} texts for {len(texts)} inputs", "text_pair",
                           "invalid_value")
        rows, n_tokens = await _in_thread(state, _classify, state, texts, pairs)
        return {"object": "list", "model": state.name,
                "data": [{"index": i, **r} for i, r in enumerate(rows)], "usage": _usage(n_tokens)}


def _classify(state: State, texts: list[str], pairs: list[str] | None = None,
              batch_size: int = 32) -> tuple[list[dict], int]:
    from lmforge.tasks.classify import trained_max_length

    s = state.served
    model, tok = s.model, s.tokenizer
    max_length = min(s.context_length, trained_max_length(s.extras, s.context_length))
    out, n_tokens = [], 0
    for b in range(0, len(texts), batch_size):
        enc = tok(texts[b:b + batch_size], pairs[b:b + batch_size] if pairs else None, truncation=True,
                  max_length=max_length, padding=True, return_tensors="pt")
        n_tokens += int(enc["attention_mask"].sum())
        logits = model(**{k: v.to(s.device) for k, v in enc.items()}).logits.float().cpu()  # (B, C)
        if not s.labels:  # regression: one value
            out += [{"prediction": float(v), "labels": [{"label": "value", "score": float(v)}]} for v in logits[:, 0]]
            continue
        for p in logits.softmax(-1):
            ranked = sorted(zip(s.labels, p.tolist()), key=lambda x: -x[1])
            out.append({"prediction": ranked[0][0],
                        "labels": [{"label": lab, "score": round(sc, 6)} for lab, sc in ranked]})
    return out, n_tokens


def _add_embeddings_route(app: FastAPI, state: State) -> None:
    @app.post("/v1/embeddings", tags=["tasks"], summary="OpenAI embeddings (mean pooling, L2-normalised)")
    async def embeddings(body: S.EmbeddingsRequest):
        state.check_model(body.model)
        if not isinstance(body.input, str) and body.input and not all(isinstance(x, str) for x in body.input):
            raise APIError(400, "input: token ids are not supported; send text", "input", "unsupported")
        texts = _texts(body.input)
        vectors, n_tokens = await _in_thread(state, _embed, state, texts)
        if body.dimensions is not None:
            if body.dimensions > vectors.shape[1]:
                raise APIError(400, f"dimensions: at most {vectors.shape[1]} for this model", "dimensions",
                               "invalid_value")
            vectors = torch.nn.functional.normalize(vectors[:, :body.dimensions], dim=-1)
        data = []
        for i, v in enumerate(vectors):
            if body.encoding_format == "base64":
                emb: Any = base64.b64encode(v.numpy().astype("<f4").tobytes()).decode("ascii")
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        return {"object": "list", "data": data, "model": state.name, "usage": _usage(n_tokens)}


def _embed(state: State, texts: list[str], batch_size: int = 32) -> tuple[torch.Tensor, int]:
    s = state.served
    out, n_tokens = [], 0
    for b in range(0, len(texts), batch_size):
        enc = s.tokenizer(texts[b:b + batch_size], truncation=True, max_length=s.context_length, padding=True,
                          return_tensors="pt")
        n_tokens += int(enc["attention_mask"].sum())
        enc = {k: v.to(s.device) for k, v in enc.items()}
        hidden = s.model(**enc)[0].float()  # (B, T, d)
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
    return torch.cat(out), n_tokens


def _add_answer_route(app: FastAPI, state: State) -> None:
    @app.post("/v1/answer", tags=["tasks"], summary="extractive QA: the answer span in the context")
    async def answer(body: S.AnswerRequest):
        state.check_model(body.model)
        if not body.question.strip():
            raise APIError(400, "question: empty", "question", "invalid_value")
        if not body.context.strip():
            raise APIError(400, "context: empty", "context", "invalid_value")
        if len(body.context) > MAX_TEXT_CHARS or len(body.question) > MAX_TEXT_CHARS:
            raise APIError(400, f"question/context: longer than {MAX_TEXT_CHARS} characters", "context",
                           "invalid_value")
        result = await _in_thread(state, _answer, state, body.question, body.context, body.max_answer_length)
        return {"object": "answer", "model": state.name, **result}


def _answer(state: State, question: str, context: str, max_answer_length: int | None) -> dict:
    from lmforge.tasks.qa import answer

    s = state.served
    q = s.extras.get("qa") or {}
    max_length = min(int(q.get("max_length", 384)), s.context_length)
    return answer(s.model, s.tokenizer, question, context, max_length=max_length,
                  doc_stride=min(int(q.get("doc_stride", 128)), max_length // 2),
                  max_answer_length=max_answer_length or int(q.get("max_answer_length", 30)),
                  n_best=int(q.get("n_best", 20)), allow_null=bool(q.get("allow_null", False)), device=s.device)


def _add_translate_route(app: FastAPI, state: State) -> None:
    @app.post("/v1/translate", tags=["tasks"], summary="translate each input text")
    async def translate(body: S.TranslateRequest, request: Request):
        state.check_model(body.model)
        texts = _texts(body.input)
        s = state.served
        extras = s.extras
        finetune = extras.get("finetune") or {}
        # the fine-tuned length is a default: like completions' and chat's, it stays within the server's limit
        # (an error would name max_tokens, which the client never sent)
        max_new = body.max_tokens or min(int(finetune.get("max_new_tokens") or 128), state.max_tokens_limit)
        if max_new > state.max_tokens_limit:
            raise APIError(400, f"max_tokens: {max_new} is above this server's limit of {state.max_tokens_limit}",
                           "max_tokens", "invalid_value")
        beams = int(finetune.get("num_beams") or 1)
        if s.translator is not None and beams > 1:
            # the batching engine decodes greedily; a model fine-tuned (and scored) with beam search is
            # served with it too, as predict and evaluate run it
            prompts = await anyio.to_thread.run_sync(_translator_prompts, state, texts)
            out = await _in_thread(state, _translate_beams, state, prompts, max_new, beams)
        elif s.translator is not None:
            out = await _translate_with_engine(state, request, texts, max_new)
        else:
            out = await _in_thread(state, _translate_seq2seq, state, texts, max_new)
        return {"object": "list", "model": state.name,
                "data": [{"index": i, "translation": t} for i, t in enumerate(out)]}


def _translate_seq2seq(state: State, texts: list[str], max_new: int) -> list[str]:
    from lmforge.tasks.translate import translate

    s = state.served
    e = s.extras
    finetune = e.get("finetune") or {}
    return translate(s.model, s.tokenizer, texts, source_lang=e.get("source_lang", "en"),
                     target_lang=e.get("target_lang", "es"), prompt_style="seq2seq",
                     source_prefix=e.get("source_prefix"), source_code=e.get("source_code"),
                     target_code=e.get("target_code"), num_beams=int(finetune.get("num_beams") or 1),
                     max_new_tokens=max_new, max_length=int(finetune.get("max_length") or 128))


def _translator_prompts(state: State, texts: list[str]) -> list[list[int]]:
    """A decoder-only translator's prompt ids; one that leaves no room to translate is refused (cut from the
    left, the prompt would lose its instruction and the model translate nothing it knows)."""
    prompts = [state.served.translator.prompt_ids(t) or [0] for t in texts]
    ctx = state.served.context_length
    if any(len(p) >= ctx for p in prompts):
        raise APIError(400, f"input: a text whose prompt fills this model's {ctx}-token context: no room to "
                            f"translate it", "input", "context_length_exceeded")
    return prompts


def _translate_beams(state: State, prompts: list[list[int]], max_new: int, beams: int) -> list[str]:
    from lmforge.tasks.sft import generate_batch

    s, prompter = state.served, state.served.translator
    room = s.context_length - max(len(p) for p in prompts)
    outs = generate_batch(s.model.hf, prompter.tok, prompts, prompter.end_ids, max(1, min(max_new, room)), beams)
    return [prompter.clean(prompter.tok.decode(o, skip_special_tokens=True)) for o in outs]


async def _translate_with_engine(state: State, request: Request, texts: list[str], max_new: int) -> list[str]:
    s = state.served
    prompter = s.translator
    prompts = await anyio.to_thread.run_sync(_translator_prompts, state, texts)
    ctx = s.context_length
    params = [SamplingParams(max_tokens=max(1, min(max_new, ctx - len(p))), temperature=0.0,
                             stop_ids=frozenset(prompter.end_ids)) for p in prompts]
    run = _Run(state, prompts, params)
    out = [""] * len(prompts)
    done = 0
    try:
        while done < len(prompts):
            try:
                ev = await run.next(request)
            except TimedOut:
                raise _timeout_error(state) from None
            except Disconnected:
                return out
            out[ev.index] += ev.text
            if ev.finish_reason is not None:
                if ev.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.error}", None, "generation_error")
                done += 1
    finally:
        if done < len(prompts):
            run.cancel()
    return [prompter.clean(t) for t in out]


def is_loopback(host: str) -> bool:
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None) -> None:
    """Refuse to expose the server beyond this machine without a key."""
    if not is_loopback(host) and not api_key:
        raise LmforgeError(f"--host {host} exposes the server beyond this machine: set --api-key KEY (or "
                           f"LMFORGE_API_KEY) so that only clients with the key can use it")
