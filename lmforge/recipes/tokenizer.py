"""Train a byte-level BPE tokenizer on your text.

    lmforge tokenizer train --data corpus.txt more/ --vocab-size 8192 --out my-tokenizer

The folder loads with `transformers.AutoTokenizer.from_pretrained`; encode -> decode round-trips any UTF-8.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lmforge.config import opt
from lmforge.errors import LmforgeError


@dataclass
class TokenizerConfig:
    data: list[str] = opt([], "text files, folders of .txt/.jsonl, or built-in corpora")
    out: str = opt("", "output folder for the tokenizer")
    vocab_size: int = opt(8192, "vocabulary size, special tokens included", ge=1)
    min_frequency: int = opt(2, "merge only pairs seen at least this often", ge=1)
    text_field: str = opt("text", "JSON field holding the text in .jsonl files")


# what a tokenizer folder holds (a folder of only these is an earlier tokenizer, and may be replaced)
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "added_tokens.json"}


def run(cfg: TokenizerConfig) -> int:
    from lmforge.data.corpus import iter_documents, resolve_sources
    from lmforge.tokenizer.bpe import train_bpe
    from lmforge.train.common import check_out_dir

    if not cfg.out:
        raise LmforgeError("--out is required")
    check_out_dir(cfg.out)
    out = Path(cfg.out)
    # the tokenizer replaces the whole folder: one holding anything else (a run, the user's files) is refused
    others = sorted(p.name for p in out.iterdir() if p.name not in TOKENIZER_FILES) if out.is_dir() else []
    if others:
        more = ", ..." if len(others) > 3 else ""
        raise LmforgeError(f"--out {out}: holds other files ({', '.join(others[:3])}{more}), which the tokenizer "
                           f"folder would replace; give a new or empty folder")
    sources = resolve_sources(cfg.data)
    tok = train_bpe(iter_documents(sources, cfg.text_field), cfg.vocab_size, cfg.out, cfg.min_frequency)
    sample = "Hello, world! 你好，世界 🙂"
    print(f"tokenizer: {cfg.out} ({len(tok)} tokens, trained on {len(sources)} file(s))")
    print(f"example: {sample!r} -> {tok.tokenize(sample)[:16]}")
    return 0
