"""Train a byte-level BPE tokenizer on your text.

    lmforge tokenizer train --data corpus.txt more/ --vocab-size 8192 --out my-tokenizer

The folder loads with `transformers.AutoTokenizer.from_pretrained`; encode -> decode round-trips any UTF-8.
"""
from __future__ import annotations

from dataclasses import dataclass

from lmforge.config import opt
from lmforge.errors import LmforgeError


@dataclass
class TokenizerConfig:
    data: list[str] = opt([], "text files, folders of .txt/.jsonl, or built-in corpora")
    out: str = opt("", "output folder for the tokenizer")
    vocab_size: int = opt(8192, "vocabulary size, special tokens included", ge=1)
    min_frequency: int = opt(2, "merge only pairs seen at least this often", ge=1)
    text_field: str = opt("text", "JSON field holding the text in .jsonl files")


def run(cfg: TokenizerConfig) -> int:
    from lmforge.data.corpus import iter_documents, resolve_sources
    from lmforge.tokenizer.bpe import train_bpe

    if not cfg.out:
        raise LmforgeError("--out is required")
    sources = resolve_sources(cfg.data)
    tok = train_bpe(iter_documents(sources, cfg.text_field), cfg.vocab_size, cfg.out, cfg.min_frequency)
    sample = "Hello, world! 你好，世界 🙂"
    print(f"tokenizer: {cfg.out} ({len(tok)} tokens, trained on {len(sources)} file(s))")
    print(f"example: {sample!r} -> {tok.tokenize(sample)[:16]}")
    return 0
