"""Tokenize a corpus once into memory-mapped token files, cached by content and tokenizer.

Layout of a cache entry (a folder named by a hash of the sources' size/mtime, the tokenizer and the split):
    train.bin, val.bin   flat uint16 (vocab <= 65536) or uint32 token ids, documents separated by EOS
    meta.json            dtype, token counts, bytes of text, sources
A rerun with the same inputs maps the files instead of tokenizing again. Entries are written to a temp
folder and renamed, so an interrupted run never leaves a half-written cache.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from lmforge.data.corpus import Source, fingerprint, iter_documents
from lmforge.errors import LmforgeError


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))


@dataclass
class TokenData:
    train: np.ndarray  # (N_train,) memmap of token ids
    val: np.ndarray  # (N_val,)
    meta: dict
    path: Path


def _tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()[:16]


def _pieces(text: str, size: int = 1 << 15):
    """Cut at line ends into ~32 KiB pieces: the tokenizer's batch encoder then uses every core."""
    start = 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        yield text[start:end]
        start = end


def tokenize_corpus(sources: list[Source], tokenizer, *, text_field: str = "text", val_fraction: float = 0.05,
                    show_progress: bool = True) -> TokenData:
    if not 0 < val_fraction < 1:
        raise LmforgeError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    eos = tokenizer.eos_token_id
    # the last item is the reader's version: 2 since a leading byte-order mark is no longer read as text
    key = json.dumps([fingerprint(sources), _tokenizer_hash(tokenizer), text_field, val_fraction, eos, 2])
    folder = cache_root() / "tokens" / hashlib.sha256(key.encode()).hexdigest()[:20]
    if (folder / "meta.json").exists():
        return _open(folder)

    dtype = np.uint16 if len(tokenizer) <= 1 << 16 else np.uint32
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=folder.parent))
    n_tokens = 0
    with open(tmp / "all.bin", "wb") as out, tqdm(unit="tok", unit_scale=True, desc="tokenizing",
                                                   disable=not show_progress, leave=False) as bar:
        for text in iter_documents(sources, text_field):
            pieces = list(_pieces(text))
            for i in range(0, len(pieces), 64):
                encs = tokenizer.backend_tokenizer.encode_batch(pieces[i:i + 64], add_special_tokens=False)
                arr = np.fromiter((t for enc in encs for t in enc.ids), dtype=np.int64)
                arr.astype(dtype).tofile(out)
                n_tokens += arr.size
                bar.update(arr.size)
            if eos is not None:
                np.array([eos], dtype=dtype).tofile(out)
                n_tokens += 1
    all_tokens = np.memmap(tmp / "all.bin", dtype=dtype, mode="r")
    n_val = max(1, int(n_tokens * val_fraction))
    # Held-out tokens are the tail: contiguous text keeps validation honest (no overlap of windows).
    np.asarray(all_tokens[: n_tokens - n_val]).tofile(tmp / "train.bin")
    np.asarray(all_tokens[n_tokens - n_val:]).tofile(tmp / "val.bin")
    del all_tokens
    os.remove(tmp / "all.bin")
    meta = {"dtype": np.dtype(dtype).name, "train_tokens": n_tokens - n_val, "val_tokens": n_val,
            "vocab_size": len(tokenizer), "sources": [str(s.path) for s in sources], "text_field": text_field,
            "val_fraction": val_fraction}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    try:
        os.replace(tmp, folder)
    except OSError:  # another process finished the same entry first
        shutil.rmtree(tmp, ignore_errors=True)
    return _open(folder)


def _open(folder: Path) -> TokenData:
    meta = json.loads((folder / "meta.json").read_text())
    dtype = np.dtype(meta["dtype"])
    train = np.memmap(folder / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(folder / "val.bin", dtype=dtype, mode="r")
    return TokenData(train=train, val=val, meta=meta, path=folder)
