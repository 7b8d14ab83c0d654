"""Batched text generation for serving, and loading whatever model a folder holds.

The engine runs in one background thread and does continuous batching: every loop it admits waiting
sequences into free batch slots (one batched prefill of their prompts), then runs ONE decode step for all
running sequences together and samples each row with its own parameters (temperature, top-p, top-k, seed,
penalties, stop tokens, stop strings). A sequence leaves the batch the step it finishes or is cancelled, and
a waiting one takes its slot before the next step, so a long reply never holds up a short one.

Batched decode needs per-row positions, which the native model's shared KVCache does not have, so
`LlamaBackend` runs the native LlamaLM's own layers over its own cache: one (max_batch, n_kv, len, hd)
tensor pair per layer, rows 0..n-1 always the running sequences (a finished row is replaced by the last
one), each row attending to its own length through a mask. Other causal LMs (`HFBackend`) keep one
transformers cache per sequence and step rows one by one: correct, but without the batching speed-up.

A long prompt that arrives while others generate is prefilled PREFILL_CHUNK tokens per loop into a cache of
its own (`LlamaBackend.stage`), between decode steps, and joins the batch when complete: the running streams
wait one chunk per token, not the whole prompt.

Events (text deltas and the finish reason) go to a per-request `sink` callable, called from the engine
thread; the HTTP layer turns them into asyncio queue items.
"""
from __future__ import annotations

import collections
import copy
import itertools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from lmforge.errors import LmforgeError
from lmforge.generate.sampling import StreamDecoder

KINDS = ("causal-lm", "classifier", "embeddings", "qa", "seq2seq")
PREFILL_TOKENS = 4096  # padded prompt tokens per prefill forward (bounds activation memory)
# A prompt longer than this, arriving while others generate, is prefilled this many tokens per engine step
# (chunked prefill): the running streams then wait one chunk between tokens instead of the whole prompt
# (a 2,000-token prompt held SmolLM2-135M streams for 1.75 s on 2 CPU cores).
PREFILL_CHUNK = 256


# ----------------------------------------------------------------------------------------- requests

@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    seed: int | None = None
    stop_ids: frozenset = frozenset()
    stop: tuple = ()  # stop strings (not included in the output)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None  # token id -> added logit
    continues_prompt: bool = False  # a completion: decoded as text after the prompt (keeps a leading space)

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.logit_bias)


@dataclass
class Event:
    index: int  # the sequence's index within its request
    text: str = ""  # new text since the last event
    finish_reason: str | None = None  # "stop", "length", "cancelled" or "error" on the last event
    completion_tokens: int = 0  # tokens generated so far (set on the last event)
    error: str | None = None


class QueueFull(Exception):
    """Too many requests are waiting for a batch slot."""


class EngineClosed(Exception):
    pass


class Sequence:
    """One generated continuation: its prompt, sampling state, decoded text and where events go."""

    _ids = itertools.count()

    def __init__(self, prompt_ids: list[int], params: SamplingParams, index: int, sink: Callable[[Event], None],
                 tokenizer, group: "Handle"):
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.index = index
        self.sink = sink
        self.group = group
        self.decoder = StreamDecoder(tokenizer, context=self.prompt_ids if params.continues_prompt else [])
        self.text = ""
        self.sent = 0  # characters of self.text already sent
        self.max_stop = max((len(s) for s in params.stop), default=0)
        self.n_generated = 0
        self.counts: dict[int, int] = {}
        self.last_token: int | None = None
        self.length = len(self.prompt_ids)  # tokens in the cache after prefill / each step
        self.cancelled = False
        self.done = False
        self.gen = torch.Generator(device="cpu")
        if params.seed is not None:
            seed = params.seed if index == 0 else params.seed * 1_000_003 + index
            self.gen.manual_seed(seed & 0x7FFF_FFFF_FFFF_FFFF)
        else:
            self.gen.seed()

    def emit(self, text: str = "", finish: str | None = None, error: str | None = None) -> None:
        if not text and finish is None:
            return
        try:
            self.sink(Event(self.index, text, finish, self.n_generated, error))
        except Exception:  # the consumer went away (closed event loop): nothing to tell
            pass

    def add_text(self, piece: str, final: bool = False) -> bool:
        """Append decoded text; send what is safe. True when a stop string was hit (text cut before it)."""
        self.text += piece
        if self.params.stop:
            cut = -1
            for s in self.params.stop:
                i = self.text.find(s, max(0, self.sent))
                if i >= 0 and (cut < 0 or i < cut):
                    cut = i
            if cut >= 0:
                self.emit(self.text[self.sent:cut])
                self.sent = cut
                self.text = self.text[:cut]
                return True
            if not final:  # hold back a tail that may be the start of a stop string
                hold = 0
                for k in range(min(self.max_stop - 1, len(self.text) - self.sent), 0, -1):
                    tail = self.text[-k:]
                    if any(s.startswith(tail) for s in self.params.stop):
                        hold = k
                        break
                end = len(self.text) - hold
                self.emit(self.text[self.sent:end])
                self.sent = end
                return False
        self.emit(self.text[self.sent:])
        self.sent = len(self.text)
        return False


class Handle:
    """A submitted request: its sequences, cancellable as a whole."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.seqs: list[Sequence] = []

    def cancel(self) -> None:
        self.engine._cancel(self)


# ----------------------------------------------------------------------------------------- backends

class LlamaBackend:
    """Per-row KV cache over the native LlamaLM's weights: batched prefill and decode with row positions."""

    def __init__(self, model, max_batch: int, max_len: int):
        from lmforge.model.llama import rope_cache

        self.model = model
        self.cfg = model.cfg
        self.max_batch = max_batch
        self.max_len = max_len
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        cos, sin = rope_cache(self.cfg, max_len, device=self.device)
        self.cos, self.sin = cos.to(self.dtype), sin.to(self.dtype)
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.cap = 0
        self.lens = [0] * max_batch
        self.n = 0
        self.staged: dict | None = None  # one long prompt being prefilled in chunks, beside rows 0..n-1

    def reset(self) -> None:
        self.n = 0
        self.staged = None

    def _ensure(self, need: int) -> None:
        if need <= self.cap:
            return
        cap = min(self.max_len, max(need, 2 * self.cap, 256))
        cap = min(self.max_len, -(-cap // 64) * 64)
        c = self.cfg
        shape = (self.max_batch, c.n_kv_head, cap, c.head_dim)
        k = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layer)]
        v = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layer)]
        if self.cap and self.n:
            for i in range(c.n_layer):
                k[i][:self.n, :, :self.cap] = self.k[i][:self.n]
                v[i][:self.n, :, :self.cap] = self.v[i][:self.n]
        self.k, self.v, self.cap = k, v, cap

    def _qkv(self, block, x, B, T):
        c = self.cfg
        q, k, v = block.attn.qkv(block.attn_norm(x)).split(
            [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim], -1)
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)
        k = k.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        v = v.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        return q, k, v

    @staticmethod
    def _block_out(block, x, y):
        """The rest of a decoder block after attention: y (B, H, T, hd) -> output projection, residual, MLP."""
        B, H, T, hd = y.shape
        x = x + block.attn.o(y.transpose(1, 2).reshape(B, T, H * hd))
        return x + block.mlp(block.mlp_norm(x))

    @staticmethod
    def _rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat((-x2, x1), dim=-1) * sin

    def _logits(self, h) -> torch.Tensor:
        m = self.model
        return m.lm_head(m.norm(h)).float()

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Append one row per prompt; (len(prompts), vocab) logits of each prompt's last position."""
        out = []
        s = 0
        while s < len(prompts):  # chunks of at most PREFILL_TOKENS padded tokens, in order
            e = s + 1
            longest = len(prompts[s])
            while e < len(prompts) and (e - s + 1) * max(longest, len(prompts[e])) <= PREFILL_TOKENS:
                longest = max(longest, len(prompts[e]))
                e += 1
            out.append(self._prefill(prompts[s:e]))
            s = e
        return torch.cat(out)

    def _prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        m, c = self.model, self.cfg
        B, T = len(prompts), max(len(p) for p in prompts)
        self._ensure(T)
        r0 = self.n
        # right padding: a real position never attends to a pad (causal), and pad keys lie beyond the
        # row's length, where decode masks them and later tokens overwrite them
        ids = torch.tensor([list(p) + [0] * (T - len(p)) for p in prompts], dtype=torch.long, device=self.device)
        lens = torch.tensor([len(p) for p in prompts], device=self.device)
        cos, sin = self.cos[:T], self.sin[:T]
        x = m.embed(ids)
        gqa = c.n_head != c.n_kv_head
        for i, block in enumerate(m.layers):
            q, k, v = self._qkv(block, x, B, T)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.k[i][r0:r0 + B, :, :T] = k.to(self.dtype)  # (no-op unless under autocast)
            self.v[i][r0:r0 + B, :, :T] = v.to(self.dtype)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
            x = self._block_out(block, x, y)
        last = x[torch.arange(B, device=self.device), lens - 1]  # (B, d)
        for j, p in enumerate(prompts):
            self.lens[r0 + j] = len(p)
        self.n += B
        return self._logits(last)

    # ---- chunked prefill: a long prompt is prefilled into a private cache one chunk per engine step, and
    # joins the running rows (as row n) only when complete, so decode steps never see a half-filled row.
    def stage(self, prompt: list[int]) -> None:
        c, L = self.cfg, len(prompt)
        shape = (1, c.n_kv_head, L, c.head_dim)
        self.staged = {"prompt": list(prompt), "pos": 0,
                       "k": [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layer)],
                       "v": [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in range(c.n_layer)]}

    def stage_step(self, chunk: int) -> torch.Tensor | None:
        """Prefill the next `chunk` tokens of the staged prompt; on the last one the prompt becomes row n and
        its (1, vocab) next-token logits are returned, before that None."""
        m, c, st = self.model, self.cfg, self.staged
        p0, prompt = st["pos"], st["prompt"]
        p1 = min(len(prompt), p0 + chunk)
        T = p1 - p0
        ids = torch.tensor([prompt[p0:p1]], dtype=torch.long, device=self.device)
        cos, sin = self.cos[p0:p1], self.sin[p0:p1]
        mask = torch.ones(T, p1, dtype=torch.bool, device=self.device).tril(diagonal=p0)  # causal after the prefix
        x = m.embed(ids)
        gqa = c.n_head != c.n_kv_head
        for i, block in enumerate(m.layers):
            q, k, v = self._qkv(block, x, 1, T)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            st["k"][i][:, :, p0:p1] = k.to(self.dtype)
            st["v"][i][:, :, p0:p1] = v.to(self.dtype)
            y = F.scaled_dot_product_attention(q, st["k"][i][:, :, :p1], st["v"][i][:, :, :p1], attn_mask=mask,
                                               enable_gqa=gqa)
            x = self._block_out(block, x, y)
        st["pos"] = p1
        if p1 < len(prompt):
            return None
        self._ensure(p1)
        r = self.n
        for i in range(c.n_layer):
            self.k[i][r, :, :p1] = st["k"][i][0]
            self.v[i][r, :, :p1] = st["v"][i][0]
        self.lens[r] = p1
        self.n += 1
        self.staged = None
        return self._logits(x[:, -1])

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token per running row (rows 0..n-1); (n, vocab) logits."""
        m, c = self.model, self.cfg
        n = self.n
        lens = self.lens[:n]
        L = max(lens) + 1
        self._ensure(L)
        pos = torch.tensor(lens, dtype=torch.long, device=self.device)  # where each new token goes
        rows = torch.arange(n, device=self.device)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(n, 1)
        cos, sin = self.cos[pos].view(n, 1, 1, -1), self.sin[pos].view(n, 1, 1, -1)
        mask = None
        if min(lens) != max(lens):
            mask = (torch.arange(L, device=self.device)[None, :] <= pos[:, None]).view(n, 1, 1, L)
        x = m.embed(ids)
        gqa = c.n_head != c.n_kv_head
        for i, block in enumerate(m.layers):
            q, k, v = self._qkv(block, x, n, 1)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.k[i][rows, :, pos] = k[:, :, 0].to(self.dtype)
            self.v[i][rows, :, pos] = v[:, :, 0].to(self.dtype)
            y = F.scaled_dot_product_attention(q, self.k[i][:n, :, :L], self.v[i][:n, :, :L], attn_mask=mask,
                                               enable_gqa=gqa)
            x = self._block_out(block, x, y)
        for j in range(n):
            self.lens[j] += 1
        return self._logits(x[:, 0])

    def duplicate(self, row: int) -> None:
        """Append a copy of `row` (same prompt: its prefill is shared)."""
        dst, L = self.n, self.lens[row]
        for i in range(self.cfg.n_layer):
            self.k[i][dst, :, :L] = self.k[i][row, :, :L]
            self.v[i][dst, :, :L] = self.v[i][row, :, :L]
        self.lens[dst] = L
        self.n += 1

    def remove(self, row: int) -> None:
        """Drop `row`; the last row moves into its place (the engine mirrors this)."""
        last = self.n - 1
        if row != last:
            L = self.lens[last]
            for i in range(self.cfg.n_layer):
                self.k[i][row, :, :L] = self.k[i][last, :, :L]
                self.v[i][row, :, :L] = self.v[i][last, :, :L]
            self.lens[row] = L
        self.n -= 1


class HFBackend:
    """Any transformers causal LM: one cache per sequence, rows stepped one at a time (no batching gain)."""

    def __init__(self, model, max_batch: int, max_len: int):
        self.model = model  # lmforge.model.causal.HFCausalLM
        self.max_batch = max_batch
        self.max_len = max_len
        self.device = next(model.parameters()).device
        self.rows: list[list] = []  # [cache, length]

    @property
    def n(self) -> int:
        return len(self.rows)

    def reset(self) -> None:
        self.rows = []

    def prefill(self, prompts):
        out = []
        for p in prompts:
            cache = self.model.new_cache(1, len(p))
            idx = torch.tensor([list(p)], dtype=torch.long, device=self.device)
            out.append(self.model(idx, cache)[:, -1].float())
            self.rows.append([cache, len(p)])
        return torch.cat(out)

    def decode(self, tokens):
        out = []
        for row, t in zip(self.rows, tokens):
            idx = torch.tensor([[t]], dtype=torch.long, device=self.device)
            out.append(self.model(idx, row[0])[:, -1].float())
            row[1] += 1
        return torch.cat(out)

    def duplicate(self, row: int) -> None:
        cache, length = self.rows[row]
        self.rows.append([copy.deepcopy(cache), length])

    def remove(self, row: int) -> None:
        self.rows[row] = self.rows[-1]
        self.rows.pop()


# ----------------------------------------------------------------------------------------- engine

class Engine:
    """Continuous batching over a backend, in one background thread."""

    def __init__(self, backend, tokenizer, max_batch: int = 8, max_queue: int = 64, step_delay: float = 0.0):
        if max_batch < 1:
            raise LmforgeError("--max-batch must be at least 1")
        self.backend = backend
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.max_len = backend.max_len
        self.step_delay = step_delay  # tests: a slow model on demand
        self._cv = threading.Condition()
        self._pending: collections.deque[Sequence] = collections.deque()
        self._active: list[Sequence] = []
        self._admitting = 0
        self._staged: Sequence | None = None  # a long prompt being prefilled in chunks (it holds a slot)
        self._thread: threading.Thread | None = None
        self._stop = False
        self.stats = {"requests": 0, "sequences": 0, "steps": 0, "tokens_generated": 0, "prompt_tokens": 0,
                      "max_batch_seen": 0, "cancelled": 0, "rejected_queue_full": 0, "errors": 0,
                      "chunked_prefills": 0}

    # ---- public, any thread
    def start(self) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive():
                self._stop = False
                self._thread = threading.Thread(target=self._run, name="lmforge-engine", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, prompts: list[list[int]], params: list[SamplingParams], sink: Callable[[Event], None]) -> Handle:
        """Queue one sequence per prompt (indices 0..); raises QueueFull when the wait queue is full."""
        if self._thread is None or not self._thread.is_alive():
            self.start()
        handle = Handle(self)
        for i, (p, sp) in enumerate(zip(prompts, params)):
            handle.seqs.append(Sequence(p, sp, i, sink, self.tokenizer, handle))
        with self._cv:
            if self._stop:
                raise EngineClosed()
            free = self.max_batch - self._busy() - len(self._pending)
            # an idle engine takes any request, even one wider than the batch (n x prompts > max_batch, whose
            # rest waits for its first rows): refused, it would be refused on every retry ("busy, retry")
            idle = not self._busy() and not self._pending
            if len(handle.seqs) > free and not idle and self._queued_requests() >= self.max_queue:
                self.stats["rejected_queue_full"] += 1
                raise QueueFull()
            self._pending.extend(handle.seqs)
            self.stats["requests"] += 1
            self.stats["sequences"] += len(handle.seqs)
            self._cv.notify_all()
        return handle

    def snapshot(self) -> dict:
        with self._cv:
            return {"active": self._busy(), "queued_requests": self._queued_requests(),
                    "queued_sequences": len(self._pending), "max_batch": self.max_batch,
                    "max_queue": self.max_queue, **self.stats}

    # ---- internals
    def _busy(self) -> int:
        """Batch slots taken: generating, being admitted, or being prefilled in chunks."""
        return len(self._active) + self._admitting + (self._staged is not None)

    def _chunked(self, s: Sequence) -> bool:
        """Prefill `s` in chunks between decode steps: a long prompt while others are generating."""
        return bool(self._active) and len(s.prompt_ids) > PREFILL_CHUNK and hasattr(self.backend, "stage")

    def _queued_requests(self) -> int:
        return len({id(s.group) for s in self._pending})

    def _cancel(self, handle: Handle) -> None:
        with self._cv:
            for s in handle.seqs:
                if not s.done and not s.cancelled:
                    s.cancelled = True
            if self._pending:
                kept = [s for s in self._pending if not s.cancelled]
                for s in self._pending:
                    if s.cancelled and not s.done:
                        s.done = True
                        self.stats["cancelled"] += 1
                self._pending = collections.deque(kept)
            self._cv.notify_all()

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and not self._pending and not self._active and self._staged is None:
                        self._cv.wait()
                    if self._stop:
                        break
                    admit: list[Sequence] = []
                    while self._pending and self._busy() + len(admit) < self.max_batch:
                        if self._chunked(self._pending[0]):
                            if self._staged is not None:
                                break  # one chunked prefill at a time; the queue keeps its order
                            self._staged = self._pending.popleft()
                            continue
                        admit.append(self._pending.popleft())
                    self._admitting = len(admit)
                try:
                    if admit:
                        self._prefill(admit)
                    with self._cv:
                        self._admitting = 0
                    self._drop_cancelled()
                    if self._staged is not None:
                        self._prefill_chunk()
                    if self._active:
                        self._step()
                        if self.step_delay:
                            time.sleep(self.step_delay)
                except Exception as e:  # never let one bad step kill the server: fail what was running
                    self.stats["errors"] += 1
                    msg = f"{type(e).__name__}: {e}"
                    for s in self._active + admit + ([self._staged] if self._staged is not None else []):
                        if not s.done:
                            s.done = True
                            s.emit(finish="error", error=msg)
                    with self._cv:
                        self._active = []
                        self._admitting = 0
                        self._staged = None
                    self.backend.reset()
        # shutting down: tell everyone still waiting
        with self._cv:
            for s in list(self._pending) + self._active + ([self._staged] if self._staged is not None else []):
                if not s.done:
                    s.done = True
                    s.emit(finish="error", error="the server is shutting down")
            self._pending.clear()
            self._active = []
            self._staged = None

    def _prefill(self, admit: list[Sequence]) -> None:
        live = []
        for s in admit:
            if s.cancelled:
                if not s.done:
                    s.done = True
                    self.stats["cancelled"] += 1
            else:
                live.append(s)
        if not live:
            return
        # identical prompts (n > 1, or clients sending the same prompt) share one prefill
        first: dict[tuple, int] = {}
        uniques: list[Sequence] = []
        dups: list[tuple[Sequence, int]] = []
        for s in live:
            key = tuple(s.prompt_ids)
            if key in first:
                dups.append((s, first[key]))
            else:
                first[key] = len(uniques)
                uniques.append(s)
        base = self.backend.n
        logits = self.backend.prefill([s.prompt_ids for s in uniques])
        self.stats["prompt_tokens"] += sum(len(s.prompt_ids) for s in uniques)
        rows = list(uniques)
        picks = list(range(len(uniques)))
        for s, j in dups:
            self.backend.duplicate(base + j)
            rows.append(s)
            picks.append(j)
        with self._cv:
            self._active.extend(rows)  # backend rows base.. in the same order
        self._sample_and_advance(rows, logits[picks])

    def _prefill_chunk(self) -> None:
        """One chunk of the staged prompt; when it is complete the sequence (and any queued copies of the same
        prompt, e.g. n > 1) joins the running batch with its first token."""
        s = self._staged
        if s.cancelled:
            self.backend.staged = None
            with self._cv:
                self._staged = None
            if not s.done:
                s.done = True
                self.stats["cancelled"] += 1
            return
        if self.backend.staged is None:
            self.backend.stage(s.prompt_ids)
            self.stats["chunked_prefills"] += 1
        logits = self.backend.stage_step(PREFILL_CHUNK)
        if logits is None:
            return
        self.stats["prompt_tokens"] += len(s.prompt_ids)
        row = self.backend.n - 1
        with self._cv:
            self._staged = None
            self._active.append(s)
            twins = [t for t in self._pending if t.prompt_ids == s.prompt_ids and not t.cancelled]
            twins = twins[:self.max_batch - self._busy()]
            for t in twins:
                self._pending.remove(t)
        for t in twins:
            self.backend.duplicate(row)
            with self._cv:
                self._active.append(t)
        self._sample_and_advance([s, *twins], logits.repeat(1 + len(twins), 1))

    def _step(self) -> None:
        active = self._active
        self.stats["max_batch_seen"] = max(self.stats["max_batch_seen"], len(active))
        self.stats["steps"] += 1
        logits = self.backend.decode([s.last_token for s in active])
        for s in active:
            s.length += 1
        self._sample_and_advance(list(active), logits)

    def _drop_cancelled(self) -> None:
        for s in [s for s in self._active if s.cancelled]:
            self._finish(s, "cancelled")

    def _sample_and_advance(self, seqs: list[Sequence], logits: torch.Tensor) -> None:
        tokens = sample_rows(seqs, logits)
        finished: list[tuple[Sequence, str]] = []
        for s, t in zip(seqs, tokens):
            if s.cancelled:
                finished.append((s, "cancelled"))
                continue
            s.n_generated += 1
            self.stats["tokens_generated"] += 1
            if t in s.params.stop_ids:
                finished.append((s, "stop"))
                continue
            s.last_token = t
            s.counts[t] = s.counts.get(t, 0) + 1
            if s.add_text(s.decoder.push(t)):
                finished.append((s, "stop_string"))
            elif s.n_generated >= s.params.max_tokens or s.length + 1 > self.max_len:
                finished.append((s, "length"))
        for s, reason in finished:
            self._finish(s, reason)

    def _finish(self, s: Sequence, reason: str) -> None:
        """Send what is left, free the row, then send the finish reason."""
        finish = None
        if not s.done:
            if reason == "cancelled":
                self.stats["cancelled"] += 1
            else:
                if reason in ("stop", "length") and s.add_text(s.decoder.flush(), final=True):
                    reason = "stop"  # a stop string completed by the held-back tail
                finish = "stop" if reason == "stop_string" else reason
            s.done = True
        with self._cv:
            row = self._active.index(s)
            self.backend.remove(row)
            last = self._active.pop()
            if row < len(self._active):
                self._active[row] = last
        if finish is not None:
            # only once the row is free: a client that sends its next request as this reply ends found the
            # engine still busy with it (503 under --max-queue 0)
            s.emit(finish=finish)


def sample_rows(seqs: list[Sequence], logits: torch.Tensor) -> list[int]:
    """One token per row, each with its own parameters and generator; logits (n, V)."""
    logits = logits.float()
    if logits.device.type != "cpu":
        logits = logits.cpu()
    out = [0] * len(seqs)
    plain_greedy = [i for i, s in enumerate(seqs) if s.params.temperature <= 0 and not s.params.adjusts_logits]
    if plain_greedy:
        for i, t in zip(plain_greedy, logits[plain_greedy].argmax(-1).tolist()):
            out[i] = int(t)
    for i, s in enumerate(seqs):
        p = s.params
        if p.temperature <= 0 and not p.adjusts_logits:
            continue
        row = logits[i].clone()
        if p.logit_bias:
            ids = torch.tensor([k for k in p.logit_bias if k < row.shape[0]], dtype=torch.long)
            if len(ids):
                row[ids] += torch.tensor([p.logit_bias[int(k)] for k in ids], dtype=row.dtype)
        if (p.presence_penalty or p.frequency_penalty) and s.counts:
            ids = torch.tensor(list(s.counts), dtype=torch.long)
            cnt = torch.tensor(list(s.counts.values()), dtype=row.dtype)
            ok = ids < row.shape[0]
            row[ids[ok]] -= p.frequency_penalty * cnt[ok] + p.presence_penalty
        row = torch.nan_to_num(row, nan=-1e30, posinf=1e30, neginf=-1e30)
        if p.temperature < torch.finfo(row.dtype).tiny or p.top_p <= 0:  # greedy (a tiny one is 0 in float32)
            out[i] = int(row.argmax())
            continue
        row = row / p.temperature
        if p.top_k and 0 < p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = torch.sort(row, descending=True)
            probs_sorted = sorted_logits.softmax(-1)
            drop_sorted = (probs_sorted.cumsum(-1) - probs_sorted) >= p.top_p
            drop_sorted[0] = False
            row = row.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
        probs = row.softmax(-1)
        if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
            out[i] = int(row.argmax())
            continue
        out[i] = int(torch.multinomial(probs, 1, generator=s.gen))
    return out


# ----------------------------------------------------------------------------------------- models

def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def read_extras(path: Path) -> dict:
    """The folder's lmforge_config.yaml ({} when absent or unreadable)."""
    import yaml

    f = path / "lmforge_config.yaml"
    if not f.exists():
        return {}
    try:
        data = yaml.safe_load(f.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def detect_kind(path: Path) -> str:
    """What a model folder is, from lmforge_config.yaml's task and config.json's architectures."""
    config = read_json(path / "config.json")
    task = read_extras(path).get("task")
    archs = [str(a) for a in config.get("architectures") or []]
    if task == "classify":
        return "classifier"
    if task == "qa":
        return "qa"
    if task == "translate":
        return "seq2seq"
    if task == "sft":
        return "causal-lm"
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return "classifier"
    if any(a.endswith("ForQuestionAnswering") for a in archs):
        return "qa"
    if config.get("is_encoder_decoder") or any(a.endswith(("ForConditionalGeneration", "MTModel")) for a in archs):
        return "seq2seq"
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "causal-lm"
    if not archs and config.get("model_type") in ("llama", "mistral", "gpt2", "qwen2", "phi3", "gemma"):
        return "causal-lm"
    return "embeddings"  # an encoder without a task head (BertModel, sentence-transformers folders)


def pick_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise LmforgeError("--device cuda: no CUDA GPU is visible")
    if device == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError("--device mps: MPS is not available")
    return torch.device(device)


def pick_precision(precision: str, device: torch.device, kind: str = "causal-lm") -> str:
    """fp32 or bf16 weights. auto: bf16 on GPUs; on CPUs bf16 for generation where the CPU has native bf16
    dot products (AVX512-BF16 / AMX): decode is memory-bound, and bf16 weights halve the bytes read per
    token (bench/serve.py part 2 measured 1.7-2.3x over fp32, where bf16 *autocast* of fp32 weights is
    slower than fp32). Without native bf16, and for the encoder kinds, fp32."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "cpu" and kind == "causal-lm":
        from lmforge.train.common import cpu_supports_bf16

        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


@dataclass
class ServedModel:
    """A loaded model and what the server needs to know about it."""

    kind: str
    path: Path
    tokenizer: Any
    model: Any
    device: torch.device
    precision: str = "fp32"
    engine: Engine | None = None
    context_length: int = 512
    labels: list | None = None
    extras: dict = field(default_factory=dict)
    stop_ids: frozenset = frozenset()  # completions
    chat_stop_ids: frozenset = frozenset()  # chat (end of turn first)
    translator: Any = None  # decoder-only translate models: a tasks.translate.Prompter
    native: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)  # one forward at a time (non-engine kinds)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()


def load_served(path: Path, *, device: str = "cpu", precision: str = "auto", max_batch: int = 8,
                max_queue: int = 64, step_delay: float = 0.0) -> ServedModel:
    """Load `path` (a resolved model folder) by kind; causal LMs get a started engine."""
    from lmforge.tokenizer.bpe import load_tokenizer

    path = Path(path)
    dev = pick_device(device)
    kind = detect_kind(path)
    is_s2s = bool(read_json(path / "config.json").get("is_encoder_decoder"))
    prec = pick_precision(precision, dev, "causal-lm" if kind == "causal-lm" or (kind == "seq2seq" and not is_s2s)
                          else kind)
    extras = read_extras(path)
    if not list(path.glob("*.safetensors")):
        raise LmforgeError(f"{path}: no *.safetensors weights (lmforge serves safetensors only, never pickles)")
    tokenizer = load_tokenizer(path)
    if kind == "causal-lm" or (kind == "seq2seq" and not is_s2s):
        return _load_causal(path, tokenizer, dev, prec, kind, extras, max_batch, max_queue, step_delay)
    from lmforge.tasks.base import dtype_kw, load_pretrained

    if kind == "classifier":
        from transformers import AutoModelForSequenceClassification as Auto
    elif kind == "qa":
        from transformers import AutoModelForQuestionAnswering as Auto
    elif kind == "seq2seq":
        from transformers import AutoModelForSeq2SeqLM as Auto
    else:
        from transformers import AutoModel as Auto
    model = load_pretrained(Auto, path, **dtype_kw(torch.bfloat16 if prec == "bf16" else torch.float32))
    model = model.to(dev).eval()
    ctx = int(getattr(model.config, "max_position_embeddings", 0) or 512)
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < ctx:
        ctx = tok_max
    st_max = read_json(path / "sentence_bert_config.json").get("max_seq_length")
    if kind == "embeddings" and isinstance(st_max, int) and 0 < st_max < ctx:
        ctx = st_max  # a sentence-transformers folder: embed as it was trained to
    served = ServedModel(kind, path, tokenizer, model, dev, prec, context_length=ctx, extras=extras)
    if kind == "classifier":
        cfg = model.config
        regression = cfg.problem_type == "regression" or cfg.num_labels == 1
        served.labels = [] if regression else [str(cfg.id2label[i]) for i in range(cfg.num_labels)]
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        if cfg.pad_token_id is None:
            cfg.pad_token_id = tokenizer.pad_token_id
    if kind == "seq2seq":
        cfg = model.config
        if cfg.pad_token_id is None:
            cfg.pad_token_id = tokenizer.pad_token_id
        if cfg.decoder_start_token_id is None:
            cfg.decoder_start_token_id = cfg.pad_token_id
        gen = model.generation_config
        if gen.pad_token_id is None:
            gen.pad_token_id = cfg.pad_token_id
        if gen.decoder_start_token_id is None:
            gen.decoder_start_token_id = cfg.decoder_start_token_id
        if gen.eos_token_id is None and tokenizer.eos_token_id is not None:
            gen.eos_token_id = tokenizer.eos_token_id
    return served


def _load_causal(path, tokenizer, dev, prec, kind, extras, max_batch, max_queue, step_delay) -> ServedModel:
    from lmforge.generate.sampling import generation_eos, model_stop_ids
    from lmforge.model.causal import HFCausalLM, load_causal_lm

    # a decoder-only translator fine-tuned with beam search is served with it (as predict and evaluate run
    # it), which needs transformers' generate: it is loaded as a transformers model, not the native one
    beams = kind == "seq2seq" and int((extras.get("finetune") or {}).get("num_beams") or 1) > 1
    model = load_causal_lm(path, native=not beams).eval()
    native = not isinstance(model, HFCausalLM)
    if prec == "bf16":
        model = model.to(torch.bfloat16)
    model = model.to(dev)
    plain_stops = model_stop_ids(tokenizer, path, chat=False)
    # before the chat set-up below makes the end of turn the tokenizer's EOS: a translator prompted by a
    # template ends its translations with the EOS it was trained with (and those generation_config names)
    translator = decoder_prompter(tokenizer, extras, generation_eos(path)) if kind == "seq2seq" else None
    chat_stops = model_stop_ids(tokenizer, path, chat=True)  # sets the chat template up
    max_len = int(model.max_seq_len)
    backend = LlamaBackend(model, max_batch, max_len) if native else HFBackend(model, max_batch, max_len)
    engine = Engine(backend, tokenizer, max_batch=max_batch, max_queue=max_queue, step_delay=step_delay)
    served = ServedModel(kind, path, tokenizer, model, dev, prec, engine=engine, context_length=max_len,
                         extras=extras, stop_ids=frozenset(plain_stops), chat_stop_ids=frozenset(chat_stops),
                         native=native)
    if translator is not None:  # a decoder-only model fine-tuned to translate: prompts as it was trained
        served.translator = translator
    engine.start()
    return served


def decoder_prompter(tokenizer, extras: dict, more_stops=()):
    """The Prompter a decoder-only translate model was fine-tuned with (from lmforge_config.yaml); it stops
    at its end token and at `more_stops` (the model's generation_config EOS ids, as `lmforge predict` does)."""
    from lmforge.tasks.sft import detect_end_of_turn, end_token_ids
    from lmforge.tasks.translate import Prompter, language_name

    src = language_name(extras.get("source_lang", "en"), "the source language")
    tgt = language_name(extras.get("target_lang", "es"), "the target language")
    template = extras.get("prompt_template") if extras.get("prompt_style") == "template" else None
    style = extras.get("prompt_style") or ("template" if template else "chat" if tokenizer.chat_template
                                           else "template")
    if style not in ("chat", "template"):
        style = "chat" if tokenizer.chat_template else "template"
    eot = detect_end_of_turn(tokenizer) if style == "chat" else tokenizer.eos_token
    finetune = extras.get("finetune") or {}
    return Prompter(tokenizer, style, src, tgt, template=template,
                    max_length=int(finetune.get("max_length") or 128),
                    end_ids=list(dict.fromkeys(end_token_ids(tokenizer, None, eot) + sorted(more_stops))),
                    single_line=extras.get("single_line", True))
