"""Reading unlabelled text: files, folders and built-in corpora, with errors that say where.

A source is a .txt file (one document), a .jsonl file (one document per line, in a text field), either
gzip-compressed, a folder of such files (searched recursively, sorted, hidden ones left out), or the name of a
built-in corpus.
Every byte is decoded as strict UTF-8: a bad byte is reported with its file, line and column.
"""
from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmforge.errors import LmforgeError, closest

BUILTIN_DIR = Path(__file__).parent / "builtin"

# name -> file inside BUILTIN_DIR; provenance in builtin/PROVENANCE.md
BUILTIN_CORPORA = {
    "shakespeare": "shakespeare/shakespeare.txt.gz",
    "peoples_daily": "peoples_daily/peoples_daily_1998_01.txt.gz",
}
TEXT_SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz")


@dataclass(frozen=True)
class Source:
    path: Path
    kind: str  # "txt" or "jsonl"


def _kind(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith((".txt", ".txt.gz", ".text")):
        return "txt"
    if name.endswith((".jsonl", ".jsonl.gz")):
        return "jsonl"
    return None


def _hidden(path: Path, folder: Path) -> bool:
    """A file in a hidden folder or itself hidden: Jupyter's .ipynb_checkpoints copies (the same text twice),
    .git, and the ._ files macOS leaves in zips (binary), which `datasets` leaves out of folders too."""
    return any(part.startswith(".") for part in path.relative_to(folder).parts)


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand built-in names, files and folders into a sorted, de-duplicated list of sources."""
    if not specs:
        raise LmforgeError("no data given: pass --data with a text file, a folder, or a built-in corpus "
                           f"({', '.join(BUILTIN_CORPORA)})")
    out: list[Source] = []
    for spec in specs:
        if not str(spec).strip():  # Path("") is ".": an unset shell variable would train on the current folder
            raise LmforgeError("--data: an empty path (an unset variable?); give a file, a folder or a built-in "
                               "corpus (use . for the current folder)")
        path = Path(spec).expanduser()
        if spec in BUILTIN_CORPORA and not path.exists():
            out.append(Source(BUILTIN_DIR / BUILTIN_CORPORA[spec], "txt"))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _kind(p) and not _hidden(p, path))
            if not found:
                raise LmforgeError(f"{path}: folder has no {', '.join(TEXT_SUFFIXES)} files")
            out.extend(Source(p, _kind(p)) for p in found)
        elif path.is_file():
            kind = _kind(path)
            if kind is None:
                raise LmforgeError(f"{path}: unsupported file type (expected {', '.join(TEXT_SUFFIXES)})")
            out.append(Source(path, kind))
        else:
            hint = closest(spec, BUILTIN_CORPORA)
            raise LmforgeError(f"{spec}: no such file or folder, and not a built-in corpus{hint}")
    seen, unique = set(), []
    for s in out:
        if s.path.resolve() not in seen:
            seen.add(s.path.resolve())
            unique.append(s)
    return unique


_GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: Path) -> bytes:
    try:
        raw = path.read_bytes()
        # by content, not only by name: a download saved without its .gz (curl -o data.jsonl) is still gzip, and
        # its second byte would otherwise be reported as "not valid UTF-8"; 0x1f 0x8b never starts UTF-8 text
        if path.name.lower().endswith(".gz") or raw.startswith(_GZIP_MAGIC):
            raw = gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # zlib.error: a gzip stream with corrupt data
        raise LmforgeError(f"{path}: cannot read ({e})") from None
    return raw


def decode_utf8(raw: bytes, path: Path, keep_bad_bytes: bool = False) -> str:
    """Strict UTF-8 decode; a bad byte is reported as file:line:column. With `keep_bad_bytes`, bad bytes
    become lone surrogates (U+DC80-U+DCFF, which strict decoding never yields) instead, so that a reader
    that skips bad rows can skip just the lines holding one; UTF-16 text is refused all the same."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):  # Excel's "Unicode text", Windows Notepad's "Unicode"
            raise LmforgeError(f"{path}: UTF-16 text, not UTF-8; convert the file, e.g. iconv -f UTF-16 -t UTF-8, "
                               "or save it as 'CSV UTF-8'") from None
        if keep_bad_bytes:
            return raw.decode("utf-8", "surrogateescape")
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise LmforgeError(f"{path}:{line}:{col}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset "
                           f"{e.start}); convert the file to UTF-8, e.g. iconv -f GB18030 -t UTF-8") from None


def _without_bom(text: str) -> str:
    # Notepad and spreadsheet exports start UTF-8 with a byte-order mark: no part of the text
    return text[1:] if text.startswith("\ufeff") else text


def read_text(path: Path) -> str:
    text = _without_bom(decode_utf8(read_bytes(path), path))
    if not text.strip():
        raise LmforgeError(f"{path}: file is empty")
    return text


def json_type(value) -> str:
    """A value's kind as JSON names it ("null", "a number"), for messages; Python's names ("NoneType") else."""
    return {dict: "an object", list: "a list", type(None): "null", bool: "a boolean", str: "a string",
            int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def iter_jsonl(path: Path, field: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; malformed lines raise with their line number."""
    text = _without_bom(decode_utf8(read_bytes(path), path))
    # split on \n only: str.splitlines() also breaks at U+2028, U+0085 and friends, which JSON strings may hold
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{n}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise LmforgeError(f"{path}:{n}: expected a JSON object, got {json_type(obj)}")
        yield n, obj


def iter_documents(sources: list[Source], text_field: str = "text") -> Iterator[str]:
    """Each document's text: a whole .txt file, or the text field of each .jsonl line."""
    for src in sources:
        if src.kind == "txt":
            yield read_text(src.path)
            continue
        count = 0
        for n, obj in iter_jsonl(src.path):
            if text_field not in obj:
                raise LmforgeError(f"{src.path}:{n}: no field '{text_field}'{closest(text_field, obj)} "
                                   f"(fields: {', '.join(obj) or 'none'}); set --text-field")
            value = obj[text_field]
            if not isinstance(value, str):
                raise LmforgeError(f"{src.path}:{n}: field '{text_field}' must be a string, "
                                   f"got {json_type(value)}")
            if value.strip():
                count += 1
                yield value
        if count == 0:
            raise LmforgeError(f"{src.path}: no non-empty '{text_field}' values (file is empty)")


def fingerprint(sources: list[Source]) -> list[list]:
    """What identifies the input for caching: path, size and modification time of each file."""
    return [[str(s.path.resolve()), s.path.stat().st_size, s.path.stat().st_mtime_ns] for s in sources]
