"""Byte-level BPE tokenizers (Hugging Face `tokenizers`), saved so `AutoTokenizer.from_pretrained` loads them.

Byte-level means every UTF-8 byte sequence is representable: encode -> decode gives back exactly the input
for English, Chinese, emoji or control characters, with no unknown token.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable

import numpy as np

from lmforge.errors import LmforgeError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
# Reserved now so that chat fine-tuning later needs no vocabulary resize.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
SPECIAL_TOKENS = [EOS, PAD, *CHAT_TOKENS]
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_bpe(texts: Iterable[str], vocab_size: int, out_dir: str | Path, min_frequency: int = 2):
    """Train a byte-level BPE on `texts` and save it (atomically) as a Hugging Face tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB:
        raise LmforgeError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least {MIN_VOCAB}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_chunks(texts), trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None,
        clean_up_tokenization_spaces=False, model_max_length=1_000_000,
    )
    hf.chat_template = DEFAULT_CHAT_TEMPLATE
    save_atomic(hf, out_dir)
    return hf


# ChatML, the template SmolLM2 and Qwen use; our tokenizers reserve its two special tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _chunks(texts: Iterable[str], size: int = 1 << 16) -> Iterable[str]:
    """Split long documents at line ends so the trainer sees bounded pieces (it is fed in parallel)."""
    for text in texts:
        start = 0
        while start < len(text):
            end = text.find("\n", start + size)
            end = len(text) if end < 0 else end + 1
            yield text[start:end]
            start = end


def save_atomic(tokenizer, out_dir: str | Path) -> None:
    from lmforge.train.checkpoint import write_folder_atomic

    write_folder_atomic(out_dir, tokenizer.save_pretrained)


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    p = Path(path)
    if p.is_dir() and not (p / "tokenizer.json").exists() and not (p / "tokenizer_config.json").exists():
        raise LmforgeError(f"{p}: not a tokenizer folder (no tokenizer.json or tokenizer_config.json)")
    if not p.exists():
        raise LmforgeError(f"{p}: tokenizer folder not found")
    try:
        return AutoTokenizer.from_pretrained(str(p))
    except Exception as e:  # transformers raises many types for a broken folder
        raise LmforgeError(f"{p}: cannot load tokenizer ({type(e).__name__}: {str(e).splitlines()[0]})") from None


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the printable stand-in characters back to bytes."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def token_byte_lengths(tokenizer) -> np.ndarray | None:
    """Bytes of text each token id stands for (special tokens: 0), for exact bits-per-byte.

    Works for byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2, ours); None for others, where callers
    fall back to counting the bytes of the decoded text.
    """
    vocab = tokenizer.get_vocab()
    size = max(len(tokenizer), max(vocab.values()) + 1)
    lengths = np.zeros(size, dtype=np.int32)
    dec = _byte_decoder()
    special = set(tokenizer.all_special_tokens) | set(getattr(tokenizer, "added_tokens_encoder", {}))
    for tok, idx in vocab.items():
        if tok in special:
            continue
        if not all(ch in dec for ch in tok):
            return None
        lengths[idx] = len(tok)
    return lengths


def mean_token_bytes(tokenizer, tokens) -> float:
    """Bytes of text per token over `tokens` (a sample), for tokenizers token_byte_lengths cannot measure
    exactly. Special tokens (the EOS between documents) are no text: decoded, each "</s>" would count 4."""
    sample = np.asarray(tokens[:20000]).tolist()
    return len(tokenizer.decode(sample, skip_special_tokens=True).encode("utf-8")) / max(1, len(sample))
