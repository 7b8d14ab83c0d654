"""Stream text from a causal LM, token by token, with a KV cache.

    lmforge generate --model runs/shakespeare/final --prompt "ROMEO:" --max-new-tokens 200
    lmforge generate --model smollm2-135m --prompt "What is the capital of France?" --chat
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from lmforge.config import opt
from lmforge.errors import LmforgeError


@dataclass
class GenerateConfig:
    model: str = opt("", "model folder, lmforge output folder, alias (smollm2-135m) or hub id")
    prompt: str = opt("", "text to continue")
    chat: bool = opt(False, "wrap the prompt as a user message with the model's chat template")
    max_new_tokens: int = opt(128, "tokens to generate at most", ge=1)
    temperature: float = opt(0.8, "sampling temperature (0: greedy)", ge=0)
    top_k: int = opt(50, "sample from the k most likely tokens (0: off)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling: smallest set with this much probability (1: off)", gt=0, le=1)
    seed: int | None = opt(None, "random seed for reproducible samples", ge=0, lt=2 ** 32)
    repetition_penalty: float = opt(1.0, "make tokens already in the prompt or reply less likely (1: off; 1.1-1.3 "
                                         "curbs loops), as transformers' repetition_penalty", gt=0)
    stats: bool = opt(False, "print tokens/s to stderr at the end")


def run(cfg: GenerateConfig) -> int:
    import torch

    # Scoped, not torch.set_grad_enabled(False): run() is also called in-process (tests, quickstart),
    # where a global switch would leak and break any later training in the same process.
    with torch.no_grad():
        return _run(cfg)


def _run(cfg: GenerateConfig) -> int:
    from lmforge.generate.sampling import StreamDecoder, fit_window, generate_ids, model_stop_ids, model_window
    from lmforge.model.causal import load_causal_lm
    from lmforge.model.hub import resolve_model
    from lmforge.tokenizer.bpe import load_tokenizer

    if not cfg.model:
        raise LmforgeError("--model is required")
    path = resolve_model(cfg.model, head="causal LM")
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path).eval()
    prompt = cfg.prompt
    if any("\udc80" <= c <= "\udcff" for c in prompt):  # how Python hands over argv bytes that are not UTF-8
        raise LmforgeError("--prompt: not valid UTF-8 (a terminal or file in another encoding, or text cut in "
                           "the middle of a character)")
    # as serve stops: a chat turn at the template's end-of-turn token, and every EOS the model names
    stops = model_stop_ids(tokenizer, path, chat=cfg.chat)
    if cfg.chat:
        from lmforge.tasks.sft import encode_prompt, setup_chat

        # the model's chat template, or lmforge's default where it has none (as chat, serve and sft use)
        setup_chat(tokenizer)
        ids = encode_prompt(tokenizer, [{"role": "user", "content": prompt}])
    else:
        ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_token_id or 0]
    window = model_window(model)
    n_prompt = len(ids)
    keep, room = fit_window(n_prompt, cfg.max_new_tokens, window)
    if keep < n_prompt and cfg.chat:
        ids = cut_chat_message(tokenizer, prompt, keep)
    if keep < n_prompt and len(ids) <= keep:
        print(f"[the chat prompt has {n_prompt} tokens and the context window {window}: only the message's last "
              f"part is read ({len(ids)} tokens with the chat template) to leave {room} for new ones]",
              file=sys.stderr)
    elif keep < len(ids):
        print(f"[the prompt has {len(ids)} tokens and the context window {window}: its first {len(ids) - keep} "
              f"tokens are dropped to leave {room} for new ones]", file=sys.stderr)
    elif room < cfg.max_new_tokens:
        print(f"[at most {room} new tokens: the {len(ids)}-token prompt and the reply share a {window}-token "
              "context window]", file=sys.stderr)
    if not cfg.chat:
        sys.stdout.write(prompt)
    dec = StreamDecoder(tokenizer, context=[] if cfg.chat else ids)  # the text goes on after the prompt
    t, n = time.time(), 0
    for token in generate_ids(model, ids, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                              cfg.top_p if cfg.top_p < 1 else None, stops, cfg.seed, cfg.repetition_penalty):
        n += 1
        sys.stdout.write(dec.push(token))
        sys.stdout.flush()
    sys.stdout.write(dec.flush() + "\n")
    if cfg.stats:
        dt = time.time() - t
        print(f"[{n} tokens in {dt:.2f} s: {n / max(dt, 1e-9):.1f} tokens/s]", file=sys.stderr)
    return 0


def cut_chat_message(tokenizer, message: str, limit: int) -> list[int]:
    """Chat prompt ids of at most `limit` tokens for a user message too long for them: the message keeps its last
    tokens inside the chat template. Cutting the rendered prompt's first tokens instead (as a plain continuation
    is cut) would drop the template's opening (`<|im_start|>user`), and the model would read a turn that never
    began. A template longer than `limit` on its own is left to generate_ids, which keeps the prompt's end."""
    from lmforge.tasks.sft import encode_prompt, encode_text

    content = encode_text(tokenizer, message)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": message}])
    n = len(content) - (len(ids) - limit)  # content tokens that fit beside the template
    while len(ids) > limit and n >= 1:
        # decode/encode of a cut text may merge differently at the cut: re-measure until it fits
        text = tokenizer.decode(content[-n:], skip_special_tokens=True).lstrip("\ufffd")  # a character cut in two
        ids = encode_prompt(tokenizer, [{"role": "user", "content": text}])
        n -= max(1, len(ids) - limit)
    return ids
