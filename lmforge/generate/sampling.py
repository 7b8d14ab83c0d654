"""Token sampling with a KV cache, and streaming detokenisation.

The prompt is run once (prefill) to fill the cache; each later step feeds one token. Sampling applies, in
order: the repetition penalty, temperature, top-k, top-p (nucleus), as transformers' generate does.
temperature 0 means greedy (after the penalty).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (B, V) with everything outside top-k / the top-p nucleus set to -inf."""
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already hold top_p of the mass; the first always stays.
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def penalize_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """logits (B, V) with each token in `seen` (B, N) made less likely by `penalty` (> 1; < 1 favours repeats):
    a positive logit divided by it, a negative one multiplied, as transformers' repetition_penalty (CTRL's)."""
    scores = logits.gather(-1, seen)  # (B, N)
    scores = torch.where(scores < 0, scores * penalty, scores / penalty)
    return logits.scatter(-1, seen, scores)


def sample_next(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    logits = logits.float()
    if temperature < torch.finfo(logits.dtype).tiny:  # 0, or so small that it is greedy (and 0 in float32)
        return logits.argmax(-1)
    # shifted so that the top logit is 0: a tiny temperature then sends the others to -inf, never to inf/NaN
    logits = filter_logits((logits - logits.amax(-1, keepdim=True)) / temperature, top_k, top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def fit_window(n_prompt: int, max_new_tokens: int, limit: int) -> tuple[int, int]:
    """(prompt tokens to keep, the last ones; new tokens at most) within a context window of `limit` tokens. A
    prompt that fits is kept whole and the reply gets the room left (as `lmforge serve` does); one that does
    not keeps its last tokens and leaves the reply min(max_new_tokens, half the window)."""
    n_prompt = max(1, n_prompt)
    if n_prompt < limit:
        return n_prompt, max(0, min(max_new_tokens, limit - n_prompt))
    room = max(1, min(max_new_tokens, limit // 2))
    return limit - room, room


def model_window(model) -> int:
    return int(getattr(model, "max_seq_len", None) or 2048)


@torch.no_grad()
def generate_ids(model, prompt_ids: list[int], max_new_tokens: int = 128, temperature: float = 0.8,
                 top_k: int | None = None, top_p: float | None = None, stop_ids: Iterable[int] = (),
                 seed: int | None = None, repetition_penalty: float = 1.0) -> Iterator[int]:
    """Yield new token ids one at a time; stops after a stop id (not yielded) or max_new_tokens.
    `repetition_penalty` (1: off) counts the prompt's tokens too, as transformers' does."""
    device = next(model.parameters()).device
    prompt_ids = list(prompt_ids) or [0]
    keep, max_new_tokens = fit_window(len(prompt_ids), max_new_tokens, model_window(model))
    prompt_ids = prompt_ids[-keep:]  # the context window holds prompt + answer
    gen = torch.Generator(device=device)
    if seed is not None:
        gen.manual_seed(seed)
    else:
        gen.seed()
    stop = set(stop_ids)
    cache = model.new_cache(1, len(prompt_ids) + max_new_tokens)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    logits = model(idx, cache)[:, -1]  # (1, V)
    seen = idx  # (1, T + new so far): the tokens the penalty applies to
    for step in range(max_new_tokens):
        if repetition_penalty != 1.0:
            logits = penalize_repeats(logits.float(), seen, repetition_penalty)
        nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (1,)
        token = int(nxt.item())
        if token in stop:
            return
        yield token
        if repetition_penalty != 1.0:
            seen = torch.cat([seen, nxt.view(1, 1)], dim=1)
        if step + 1 < max_new_tokens:  # after the last token its logits would be computed for nothing
            logits = model(nxt.view(1, 1), cache)[:, -1]


class StreamDecoder:
    """Token ids -> text pieces as soon as they are complete characters, O(1) per token.

    Decoding token by token breaks multi-byte characters (Chinese, emoji) split across tokens, and loses
    spaces some tokenizers attach at decode time. So each step decodes a short window (the previous piece
    and the new tokens) and emits what the new tokens add, holding back an incomplete UTF-8 character;
    `flush` releases whatever is left when generation ends (less a character cut off there).

    `context`, the prompt's ids for a text continuation: its last tokens start the window, so that the first
    new token is decoded as it reads after the prompt. SentencePiece decoders (Llama 2, Mistral) strip the
    space a text's first token opens with: "The capital is" + "▁Paris" would read "The capital isParis".
    A chat reply starts a message of its own and is decoded without one.
    """

    CONTEXT_TOKENS = 4

    def __init__(self, tokenizer, context: list[int] = ()):
        self.tok = tokenizer
        self.ids: list[int] = list(context)[-self.CONTEXT_TOKENS:]
        self.prefix = 0  # start of the window decoded for context
        self.read = len(self.ids)  # end of what has been emitted

    def _decode(self, ids) -> str:
        return self.tok.decode(ids, skip_special_tokens=True) if ids else ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        """What is left. A character the token limit cut in half (byte tokens of a rare CJK character) is left
        out rather than shown as U+FFFD: it was never written."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):].rstrip("\ufffd") if len(now) > len(before) else ""


def stop_token_ids(tokenizer, model=None) -> set[int]:
    """EOS of the tokenizer, and the common end tokens its vocabulary has (ChatML models end turns with
    <|im_end|>)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for tok in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        if tok in tokenizer.get_vocab():
            ids.add(tokenizer.convert_tokens_to_ids(tok))
    return ids


def generation_eos(path) -> list[int]:
    """The eos_token_id(s) of a model folder's generation_config.json: the only place some instruct models name
    all their end tokens (Llama 3.1's <|eom_id|>, Gemma's <end_of_turn>)."""
    import json
    from pathlib import Path

    f = Path(path) / "generation_config.json"
    try:
        eos = json.loads(f.read_text(encoding="utf-8")).get("eos_token_id") if f.is_file() else None
    except (OSError, ValueError, AttributeError):
        return []
    return [int(x) for x in (eos if isinstance(eos, list) else [eos]) if isinstance(x, int)]


def model_stop_ids(tokenizer, path, chat: bool) -> set[int]:
    """What `generate`, `chat` and `serve` stop on for the model at `path`: its EOS ids (tokenizer and
    generation config) and, for a chat turn, the chat template's end-of-turn token (sets the template up)."""
    from lmforge.errors import LmforgeError
    from lmforge.tasks.sft import end_token_ids, setup_chat

    ids = stop_token_ids(tokenizer) | set(generation_eos(path))
    if chat:
        try:
            ids |= set(end_token_ids(tokenizer, None, setup_chat(tokenizer)["end_of_turn"]))
        except LmforgeError:  # no template and no EOS to build one with: EOS-less models stop on length
            pass
    return ids


def generate_text(model, tokenizer, prompt: str, **kwargs) -> str:
    # encode() adds BOS exactly where the tokenizer is configured to (Llama yes, SmolLM2 and lmforge no).
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_token_id or 0]
    dec = StreamDecoder(tokenizer, context=ids)
    text = "".join(dec.push(t) for t in generate_ids(model, ids, stop_ids=stop_token_ids(tokenizer), **kwargs))
    return text + dec.flush()
