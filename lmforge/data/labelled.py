"""Reading labelled data for fine-tuning (classify, qa, sft, translate), with errors that say where.

A data spec is a file (.jsonl, .json, .csv, .tsv, the first four optionally .gz, or .parquet) or a built-in
set, optionally with a split ("rotten_tomatoes:test"). Each task's fields are guessed from common names
and can be named explicitly; every record is normalised to one shape per task:

    classify   {"text": str, "text_pair": str | None, "label": str | int | float}
    qa         {"id": str, "question": str, "context": str, "answers": {"text": [...], "answer_start": [...]}}
    sft        {"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}
    translate  {"source": str, "target": str}

Every problem is one line naming the file, the line (or Parquet row) and the field; with skip_bad_rows a
problem confined to one record is collected in Loaded.skipped instead.
"""
from __future__ import annotations

import collections
import csv
import hashlib
import io
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass, field
from json.decoder import scanstring
from pathlib import Path
from typing import Any, Iterator

from lmforge.data.corpus import BUILTIN_DIR, decode_utf8, json_type as _type, read_bytes
from lmforge.errors import LmforgeError, closest

BUILTIN_SETS = {"rotten_tomatoes": "classify", "chinese_reviews": "classify", "bible_en_es": "translate",
                "lmforge_qa": "qa", "lmforge_chat": "sft"}
SPLITS = ("train", "validation", "test")
# each split and the names data sets give it ('dev' serves as validation)
_SPLIT_NAMES = {"validation": ("validation", "valid", "val", "dev", "eval"), "test": ("test",), "train": ("train",)}
_SPLIT_ALIASES = {alias: split for split, names in _SPLIT_NAMES.items() for alias in names if alias != split}
TASKS = ("classify", "qa", "sft", "translate")
SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


@dataclass
class Loaded:
    rows: list[dict]
    source: str  # path or built-in name, for messages
    line_numbers: list[int]  # 1-based line (Parquet: row) of each kept record in its file
    skipped: list[str] = field(default_factory=list)  # "file:line: reason" per skipped record
    fields: dict[str, str] = field(default_factory=dict)  # role -> input field used, e.g. {"text": "sentence"}
    by_row: bool = False  # Parquet and `datasets` records are counted by row, not by line

    def __len__(self) -> int:
        return len(self.rows)

    def loc(self, i: int) -> str:
        """"file:line" (or "file:row N") of kept record i, as messages name it."""
        n = self.line_numbers[i]
        return f"{self.source}:row {n}" if self.by_row else f"{self.source}:{n}"

    def drop(self, bad: dict[int, str]) -> None:
        """Remove the records at the indices of `bad` ({index: reason}), recording each in `skipped`."""
        self.skipped += [f"{self.loc(i)}: {reason}" for i, reason in sorted(bad.items())]
        keep = [i for i in range(len(self.rows)) if i not in bad]
        self.rows = [self.rows[i] for i in keep]
        self.line_numbers = [self.line_numbers[i] for i in keep]


# ----------------------------------------------------------------------------------------------- sources

def resolve_data(spec: str, split: str = "train") -> tuple[Path, str]:
    """A file path, or a built-in name with an optional ':split'; returns (path, name for messages)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path, spec
    if path.is_dir():
        raise LmforgeError(f"{spec}: is a folder, and not one written by datasets' save_to_disk; pass a data file "
                           f"({', '.join(SUFFIXES)})")
    name, _, part = spec.partition(":")
    if name not in BUILTIN_SETS:
        raise LmforgeError(f"{spec}: no such file, and not a built-in data set{closest(name, BUILTIN_SETS)} "
                           f"(built-in: {', '.join(BUILTIN_SETS)})")
    part = part or split
    part = _SPLIT_ALIASES.get(part, part)
    if part not in SPLITS:
        raise LmforgeError(f"{spec}: unknown split '{part}'{closest(part, SPLITS)} (splits: {', '.join(SPLITS)})")
    file = BUILTIN_DIR / name / f"{part}.jsonl.gz"
    if not file.is_file():
        raise LmforgeError(f"{name}:{part}: built-in data set has no {part} split (missing {file})")
    return file, f"{name}:{part}"


# `datasets` sources: a folder written by Dataset(Dict).save_to_disk, or a data set on the Hugging Face hub
# (`owner/name`, `owner/name/config`, or any hub name as `hf:NAME`), each with an optional ':split'.
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class _DatasetSource:
    kind: str  # "disk" or "hub"
    where: str  # the folder, or the hub id
    config: str | None  # hub: the configuration (subset), e.g. "sst2" of nyu-mll/glue
    split: str | None  # as asked for after ':'
    base: str  # the spec without its split, for naming splits and messages


def _saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


def _dataset_source(spec: str) -> _DatasetSource | None:
    """`spec` as a `datasets` source, or None (a data file, a built-in set, or nothing at all)."""
    hub = spec.startswith(HUB_PREFIX)
    name, _, split = (spec[len(HUB_PREFIX):] if hub else spec).partition(":")
    if not hub:
        path = Path(name).expanduser()
        if _saved_dataset(path):
            return _DatasetSource("disk", str(path), None, split or None, name)
        looks_like_hub_id = (name.count("/") in (1, 2) and not name.startswith((".", "/", "~"))
                             and not name.lower().endswith(tuple(SUFFIXES) + (".gz",)))
        if path.exists() or name in BUILTIN_SETS or not looks_like_hub_id:
            return None
    parts = name.split("/")
    where, config = ("/".join(parts[:2]), parts[2]) if len(parts) == 3 else (name, None)
    return _DatasetSource("hub", where, config or None, split or None, (HUB_PREFIX if hub else "") + name)


_HUB_LOADED: dict[tuple[str, str | None], Any] = {}  # (hub id, config) -> DatasetDict, loaded once per process


def _unreachable_hub(timeout: float = 3.0) -> str | None:
    """The hub's host when it cannot be reached, else None (reachable, offline mode asked for, or a proxy).

    Offline, `datasets` retries each request with back-off for about 25 s before it gives up, so a mistyped
    local path that looks like a hub id (`data/reviews`) would wait that long for its error. A TCP connection
    answers in milliseconds; behind a proxy it says nothing, so then `datasets` is left to find out itself."""
    import os
    import socket
    import urllib.request
    from urllib.parse import urlparse

    # huggingface_hub reads these two by their exact names
    if any(os.environ.get(k, "").strip().upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE",
                                                                                        "HF_DATASETS_OFFLINE")):
        return None  # datasets answers at once from its cache
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    # Proxies as the hub client finds them (requests and httpx both ask urllib): the *_proxy variables in either
    # case, and the system settings on macOS and Windows. Only a host that NO_PROXY names exactly (or "*") is
    # probed directly: the clients read suffixes such as ".huggingface.co" differently, and guessing wrong would
    # call a hub reached through a proxy unreachable.
    proxies = urllib.request.getproxies()
    port = url.port or (80 if url.scheme == "http" else 443)
    exempt = {e.strip().lower() for e in proxies.get("no", "").split(",")}
    if any(proxies.get(k) for k in ("https", "http", "all")) and not exempt & {"*", host, f"{host}:{port}"}:
        return None
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError:
        return host


def _load_dataset(source: _DatasetSource):
    """The Dataset or DatasetDict behind `source` (a hub data set is downloaded once and cached by `datasets`;
    this process keeps it, since finetune reads its splits one by one and each load asks the hub again)."""
    try:
        import datasets
    except ImportError:
        raise LmforgeError(f"{source.base}: reading it needs the 'datasets' package: pip install datasets") from None
    try:
        if source.kind == "disk":
            return datasets.load_from_disk(source.where)
        key = (source.where, source.config)
        if key not in _HUB_LOADED:
            host = _unreachable_hub()
            # datasets falls back to a copy it has cached (after its retries): only a set it never saw fails here
            if host and not (Path(datasets.config.HF_DATASETS_CACHE) / source.where.replace("/", "___")).exists():
                raise LmforgeError(f"{source.base}: no such local file or folder, and the Hugging Face hub ({host}) "
                                   "cannot be reached to load it from there (offline? HF_HUB_OFFLINE=1 reads a "
                                   "copy that `datasets` has cached)")
            _HUB_LOADED[key] = datasets.load_dataset(source.where, source.config)
        return _HUB_LOADED[key]
    except LmforgeError:
        raise
    except Exception as e:  # offline, no such data set, a config it does not have...: one line, never a traceback
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        where = ("a datasets folder" if source.kind == "disk" else
                 "no such local file or folder, and loading it from the Hugging Face hub failed")
        raise LmforgeError(f"{source.base}: {where} ({type(e).__name__}: {first})") from None


def _dataset_split(source: _DatasetSource, split: str):
    """(Dataset, name for messages) of `source`'s split (the one in the spec, else `split`)."""
    import datasets

    obj = _load_dataset(source)
    want = source.split or split
    if isinstance(obj, datasets.DatasetDict):
        group = next((g for g in _SPLIT_NAMES.values() if want in g), (want,))  # 'dev' and 'validation' alike
        names = [n for n in group if n in obj]
        if not names:
            raise LmforgeError(f"{source.base}: no split '{want}'{closest(want, list(obj))} "
                               f"(splits: {', '.join(obj)})")
        return obj[names[0]], f"{source.base}:{names[0]}"
    if source.split and source.split != "train":
        raise LmforgeError(f"{source.base}: a single data set without splits; drop ':{source.split}'")
    return obj, source.base


def _iter_dataset(ds, src: str) -> Iterator[_Record]:
    """Rows of a `datasets.Dataset`; class-label columns give their names ("neg"/"pos"), not their numbers."""
    import datasets

    names = {col: f.names for col, f in ds.features.items() if isinstance(f, datasets.ClassLabel)}
    for i, obj in enumerate(ds, 1):
        for col, labels in names.items():
            value = obj.get(col)
            if isinstance(value, int) and 0 <= value < len(labels):
                obj[col] = labels[value]
        yield _Record(i, f"{src}:row {i}", obj)


def _builtin_name(spec: str) -> str | None:
    """The built-in set `spec` names ("rotten_tomatoes:test" -> "rotten_tomatoes"); None for a path."""
    name = spec.partition(":")[0]
    return name if name in BUILTIN_SETS and not Path(spec).expanduser().exists() else None


def _hidden_labels(ds) -> str | None:
    """The label column of a split whose every label is -1 or null (GLUE and other benchmarks hide their test
    labels so), else None."""
    import datasets

    columns = [c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    guessed = _find(ds.features, _LABEL_NAMES)
    if not columns and guessed is not None and isinstance(ds.features[guessed], datasets.Value):
        columns = [guessed]
    return next((c for c in columns if len(ds) and set(ds.unique(c)) <= {-1, None}), None)


def data_splits(spec: str) -> dict[str, str]:
    """Specs of the validation and test splits that come with `spec`'s source: a built-in set's, or those of a
    saved or hub DatasetDict (a 'dev' split serves as validation); {} for a plain file. A split without labels
    (every one -1 or null) is left out, with a note: there is nothing to score it against."""
    name = _builtin_name(spec)
    if name:
        return {"validation": f"{name}:validation", "test": f"{name}:test"}
    source = _dataset_source(spec)
    if source is None:
        return {}
    import datasets

    obj = _load_dataset(source)
    if not isinstance(obj, datasets.DatasetDict):
        return {}
    out = {}
    for role, group in _SPLIT_NAMES.items():
        name = next((n for n in group if n in obj), None)
        if role == "train" or name is None:
            continue
        column = _hidden_labels(obj[name])
        if column is None:
            out[role] = f"{source.base}:{name}"
        else:
            print(f"{source.base}:{name}: no labels (every '{column}' is -1 or null), so it is not scored",
                  flush=True)
    return out


def _open(spec: str, split: str = "train", skip_bad_bytes: bool = False) -> tuple[Iterator[_Record], str, bool]:
    """(records, name for messages, whether ids count by position rather than line) of a data spec. With
    `skip_bad_bytes`, a JSONL/CSV/TSV line that is not UTF-8 is a bad record instead of a bad file."""
    source = _dataset_source(spec)
    if source is not None:
        ds, src = _dataset_split(source, split)
        return _iter_dataset(ds, src), src, True
    path, src = resolve_data(spec, split)
    # minified SQuAD files put every record on line 1, so ids default to the record's position instead
    return _iter_records(path, src, skip_bad_bytes), src, _format(path) in ("json", "parquet")


def _format(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
        if name.endswith(".parquet"):
            raise LmforgeError(f"{path}: Parquet files are compressed already; pass the .parquet file itself")
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    raise LmforgeError(f"{path}: unsupported file type (expected {', '.join(SUFFIXES)}, optionally .gz "
                       "except .parquet)")


class _Bad(Exception):
    """A problem confined to one record: skippable with skip_bad_rows."""


@dataclass
class _Record:
    line: int
    loc: str  # "file:line" (plus the JSON path for SQuAD-nested records), the prefix of every message
    obj: dict | None
    error: str | None = None  # why the record could not even be parsed
    text_cells: bool = False  # CSV/TSV: every value is a string, so numbers arrive as text
    decimal_comma: bool = False  # a semicolon CSV (European Excel): '0,5' is the number 0.5


def _read_text(path: Path, keep_bad_bytes: bool = False) -> str:
    text = decode_utf8(read_bytes(path), path, keep_bad_bytes)
    # spreadsheet exports often start with a byte-order mark, which would otherwise stick to the first header
    return text[1:] if text.startswith("\ufeff") else text


# a byte that is not UTF-8, as decode_utf8(keep_bad_bytes=True) keeps it (never there when decoded strictly)
_BAD_BYTE = re.compile("[\udc80-\udcff]")


def _bad_utf8(text: str) -> str | None:
    """Why `text` is not valid UTF-8 (its first bad byte and that byte's column), else None."""
    m = _BAD_BYTE.search(text)
    if m is None:
        return None
    column = len(text[:m.start()].encode("utf-8", "surrogateescape")) + 1  # in bytes, as decode_utf8 counts
    return f"not valid UTF-8 (byte 0x{ord(m.group()) - 0xdc00:02x} at column {column})"


def _iter_jsonl(path: Path, src: str, skip_bad_bytes: bool = False) -> Iterator[_Record]:
    text = _read_text(path, skip_bad_bytes)
    if text.lstrip().startswith("["):
        # a JSON list saved as .jsonl (pretty-printed or not) is read as the one document it is, as `datasets`
        # reads it; line by line, its first line would be "expected a JSON object" or "[" an "invalid JSON"
        return _iter_json(path, src)
    return _jsonl_records(text, src)


def _jsonl_records(text: str, src: str) -> Iterator[_Record]:
    # split on \n only: str.splitlines() also breaks at U+2028 and friends, which JSON strings may contain
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        loc = f"{src}:{n}"
        bad = _bad_utf8(line)
        if bad:
            yield _Record(n, loc, None, bad)
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            yield _Record(n, loc, None, f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(obj, dict):
            yield _Record(n, loc, None, f"expected a JSON object, got {_type(obj)}")
            continue
        yield _Record(n, loc, obj)


_WS = re.compile(r"[ \t\n\r]*")


class _LineJson:
    """json.loads that also remembers the line where each object starts (by id), so records nested inside a
    .json file can be reported by line like JSONL records."""

    def __init__(self, text: str):
        self.text = text
        self.lines: dict[int, int] = {}
        self._decoder = json.JSONDecoder()
        self._pos, self._line = 0, 1

    def _line_at(self, pos: int) -> int:
        # objects are met in file order, so counting newlines incrementally keeps this linear
        self._line += self.text.count("\n", self._pos, pos)
        self._pos = pos
        return self._line

    def parse(self) -> Any:
        value, end = self._value(0)
        end = _WS.match(self.text, end).end()
        if end != len(self.text):
            raise json.JSONDecodeError("Extra data", self.text, end)
        return value

    def _value(self, pos: int) -> tuple[Any, int]:
        text, ws = self.text, _WS.match
        pos = ws(text, pos).end()
        ch = text[pos:pos + 1]
        if ch == "{":
            obj: dict = {}
            self.lines[id(obj)] = self._line_at(pos)
            pos = ws(text, pos + 1).end()
            if text[pos:pos + 1] == "}":
                return obj, pos + 1
            while True:
                if text[pos:pos + 1] != '"':
                    raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
                key, pos = scanstring(text, pos + 1)
                pos = ws(text, pos).end()
                if text[pos:pos + 1] != ":":
                    raise json.JSONDecodeError("Expecting ':' delimiter", text, pos)
                obj[key], pos = self._value(pos + 1)
                pos = ws(text, pos).end()
                ch = text[pos:pos + 1]
                if ch == "}":
                    return obj, pos + 1
                if ch != ",":
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
                pos = ws(text, pos + 1).end()
        if ch == "[":
            arr: list = []
            pos = ws(text, pos + 1).end()
            if text[pos:pos + 1] == "]":
                return arr, pos + 1
            while True:
                item, pos = self._value(pos)
                arr.append(item)
                pos = ws(text, pos).end()
                ch = text[pos:pos + 1]
                if ch == "]":
                    return arr, pos + 1
                if ch != ",":
                    raise json.JSONDecodeError("Expecting ',' delimiter", text, pos)
                pos += 1
        return self._decoder.raw_decode(text, pos)


def _json_lines(text: str, e: json.JSONDecodeError) -> bool:
    """Whether a .json file that `e` stopped is JSON Lines: an object, then more data from a later line on
    (`Dataset.to_json` and pandas' `to_json(lines=True)` write .json files so, and `datasets` reads them)."""
    if e.msg != "Extra data" or not text.lstrip().startswith("{"):
        return False
    gap = len(text[:e.pos].rstrip(" \t\r\n"))  # the whitespace between the first object and what follows
    return "\n" in text[gap:e.pos]


def _iter_json(path: Path, src: str) -> Iterator[_Record]:
    """A JSON list of objects, {"data": [...]} around one, or SQuAD's nested data[].paragraphs[].qas[]; JSON
    Lines in a .json file are read as JSON Lines."""
    text = _read_text(path)
    if not text.strip():
        return  # reported as "no examples" like any other empty file
    parser = _LineJson(text)
    try:
        top = parser.parse()
    except json.JSONDecodeError as e:
        if _json_lines(text, e):
            yield from _jsonl_records(text, src)
            return
        raise LmforgeError(f"{src}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None
    except RecursionError:
        raise LmforgeError(f"{src}: JSON nested too deeply") from None
    line = parser.lines.get
    if isinstance(top, dict):
        if not isinstance(top.get("data"), list):
            raise LmforgeError(f"{src}:1: expected a JSON list of objects, or an object with a 'data' list "
                               f"(SQuAD format); found an object with fields {', '.join(top) or 'none'}")
        top = top["data"]
    if not isinstance(top, list):
        raise LmforgeError(f"{src}:1: expected a JSON list of objects, got {_type(top)}")
    # one article with paragraphs makes the file SQuAD's: an article without them (a hand-edited file) is
    # then an error about that article, not the whole list read as flat records lacking a question
    if any(isinstance(a, dict) and "paragraphs" in a for a in top):
        yield from _flatten_squad(top, src, line)
        return
    for i, obj in enumerate(top):
        if isinstance(obj, dict):
            yield _Record(line(id(obj), 1), f"{src}:{line(id(obj), 1)}", obj)
        else:
            # scalars carry no position; the nearest we know is the list's own line
            yield _Record(1, f"{src}: item {i}", None, f"expected a JSON object, got {_type(obj)}")


def _flatten_squad(data: list, src: str, line) -> Iterator[_Record]:
    for i, article in enumerate(data):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            got = (f"got {_type(paragraphs)}" if isinstance(article, dict) and "paragraphs" in article else
                   "it has none" if isinstance(article, dict) else f"the article is {_type(article)}")
            raise LmforgeError(f"{src}:{line(id(article), 1)}: data[{i}].paragraphs must be a list ({got})")
        for j, para in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            if not isinstance(para, dict) or not isinstance(para.get("qas"), list):
                raise LmforgeError(f"{src}:{line(id(para), line(id(article), 1))}: {where} must be an object "
                                   "with 'context' and a 'qas' list")
            for k, qa in enumerate(para["qas"]):
                n = line(id(qa), line(id(para), 1))
                loc = f"{src}:{n} ({where}.qas[{k}])"
                if not isinstance(qa, dict):
                    yield _Record(n, loc, None, f"expected a JSON object, got {_type(qa)}")
                    continue
                row = {key: value for key, value in qa.items() if key not in ("context", "is_impossible")}
                row["context"] = para.get("context")
                if qa.get("is_impossible"):
                    row["answers"] = []  # SQuAD v2 keeps 'plausible_answers' aside; the gold is "no answer"
                if "title" in article:
                    row.setdefault("title", article["title"])
                yield _Record(n, loc, row)


def _csv_delimiter(text: str) -> str:
    """',' or ';': Excel saves CSV with semicolons where the decimal mark is a comma (most of Europe); read
    with commas, such a file is one column named 'text;label'. A header that is one column with commas and
    several with semicolons is taken to be such a file."""
    first = next((line for line in text.split("\n") if line.strip()), "")
    by_comma, by_semicolon = (next(csv.reader([first], delimiter=d)) for d in ",;")
    return ";" if len(by_comma) == 1 and len(by_semicolon) > 1 else ","


def _iter_csv(path: Path, src: str, delimiter: str, skip_bad_bytes: bool = False) -> Iterator[_Record]:
    text = _read_text(path, skip_bad_bytes)
    if delimiter == ",":
        delimiter = _csv_delimiter(text)
    # contexts of QA data easily pass the csv module's 128 KiB default cell limit
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # TSV has no quoting convention (GLUE's files contain bare quotes), so quotes are kept as text there
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, quoting=quoting, strict=True)
    kind = "TSV" if delimiter == "\t" else "CSV"
    header: list[str] | None = None
    end = 0
    while True:
        start = end + 1  # a quoted cell may span lines: report the line where the record starts
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise LmforgeError(f"{src}:{start}: malformed {kind} ({e})") from None
        end = reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        if header is None:
            bad = next(filter(None, map(_bad_utf8, cells)), None)
            if bad:  # no column can be named, so no row can be read
                raise LmforgeError(f"{src}:{start}: header is {bad}; convert the file to UTF-8")
            header = [c.strip() for c in cells]
            dupes = sorted({c for c in header if header.count(c) > 1})
            if dupes:
                raise LmforgeError(f"{src}:{start}: header repeats column {', '.join(map(repr, dupes))}")
            continue
        loc = f"{src}:{start}"
        if len(cells) != len(header):
            yield _Record(start, loc, None, f"{len(cells)} columns, but the header has {len(header)}",
                          text_cells=True)
            continue
        bad = next((f"field '{name}' is {why}" for name, why in zip(header, map(_bad_utf8, cells)) if why), None)
        if bad:
            yield _Record(start, loc, None, bad, text_cells=True)
            continue
        yield _Record(start, loc, dict(zip(header, cells)), text_cells=True, decimal_comma=delimiter == ";")


def _iter_parquet(path: Path, src: str) -> Iterator[_Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        rows = pq.read_table(path).to_pylist()
    except (OSError, pa.ArrowException) as e:
        raise LmforgeError(f"{src}: cannot read Parquet ({e})") from None
    for i, obj in enumerate(rows, 1):
        yield _Record(i, f"{src}:row {i}", obj)


def _iter_records(path: Path, src: str, skip_bad_bytes: bool = False) -> Iterator[_Record]:
    kind = _format(path)
    if kind == "jsonl":
        return _iter_jsonl(path, src, skip_bad_bytes)
    if kind == "json":  # one document: a bad byte is not confined to one record
        return _iter_json(path, src)
    if kind in ("csv", "tsv"):
        return _iter_csv(path, src, "," if kind == "csv" else "\t", skip_bad_bytes)
    return _iter_parquet(path, src)


# ----------------------------------------------------------------------------------------------- fields

@dataclass(frozen=True)
class _Role:
    name: str
    candidates: tuple[str, ...]
    option: str
    required: bool = True


_ROLES: dict[str, list[_Role]] = {
    "classify": [
        _Role("text", ("text", "sentence", "content", "review", "document", "sentence1", "premise", "question",
                       "文本", "句子", "内容", "评论", "正文"), "--text-field"),
        _Role("text_pair", ("text_pair", "sentence2", "hypothesis"), "--text-pair-field", required=False),
        _Role("label", ("label", "labels", "score", "target", "class", "sentiment", "标签", "类别", "情感", "分类"),
              "--label-field"),
    ],
    "qa": [
        _Role("id", ("id", "qid", "question_id", "_id"), "--id-field", required=False),
        _Role("question", ("question", "query", "q", "问题"), "--question-field"),
        _Role("context", ("context", "passage", "paragraph", "document", "text", "上下文", "文章", "段落", "原文"),
              "--context-field"),
        _Role("answers", ("answers", "answer", "answer_text", "答案"), "--answers-field"),
        _Role("answer_start", ("answer_start", "answer_starts", "start"), "--answer-start-field", required=False),
    ],
    "sft": [
        _Role("messages", ("messages", "conversations", "conversation", "chat"), "--messages-field",
              required=False),
        _Role("prompt", ("prompt", "instruction", "question", "query", "input", "指令", "问题", "输入"),
              "--prompt-field"),
        _Role("input", ("input", "输入"), "--input-field", required=False),
        _Role("response", ("response", "completion", "output", "answer", "回答", "输出", "回复", "答案"),
              "--response-field"),
    ],
    "translate": [
        _Role("source", ("source", "src", "source_text"), "--source-field"),
        _Role("target", ("target", "tgt", "target_text"), "--target-field"),
    ],
}
_OPTION = {role.name: role.option for roles in _ROLES.values() for role in roles}
_ALPACA_INPUT = next(r.candidates for r in _ROLES["sft"] if r.name == "input")
_LABEL_NAMES = next(r.candidates for r in _ROLES["classify"] if r.name == "label")
_LANG = re.compile(r"^[a-z]{2,3}([-_][a-z]{2,4})?$", re.IGNORECASE)
# short names that look like ISO codes but rarely are in a data file ('id' is also Indonesian: see below)
_NOT_LANG = {"id", "idx", "uid", "key", "src", "tgt", "url", "ref", "row", "tag", "pos", "len", "num"}


def _find(obj: dict, candidates) -> str | None:
    lower = {str(k).lower(): k for k in reversed(list(obj))}  # first spelling wins on a case clash
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    return None


def _no_field(obj: dict, role: str, key: str | None = None, looked: tuple[str, ...] = ()) -> str:
    keys = list(map(str, obj))
    available = f"(fields: {', '.join(keys) or 'none'})"
    if key is not None:
        return f"no field '{key}'{closest(key, keys)} {available}; set {_OPTION[role]}"
    hint = closest(role, keys) or (closest(looked[0], keys) if looked else "")
    return (f"no {role} field{hint}: looked for {', '.join(looked)} {available}; set {_OPTION[role]}")


def _resolve_fields(task: str, obj: dict, given: dict[str, str | None], prefer: dict[str, str] | None = None,
                    seen: dict | None = None) -> dict[str, str]:
    """Role -> field name, from the explicit names and otherwise by guessing on the record `obj`; optional
    roles (a text pair, Alpaca's input, a QA id) are looked for in `seen`, the fields of every record of the
    file, since a file may leave them out of its first records. `prefer` (the fields another file of the same
    run was read with) wins over guessing where this file has them. A field that cannot be found is _Bad:
    with --skip-bad-rows the fields are resolved on the next record instead."""
    def fail(msg: str):
        raise _Bad(msg)

    if task == "translate":
        return _resolve_translate(obj, given, fail, prefer or {})
    roles = {r.name: r for r in _ROLES[task]}
    seen = obj if seen is None else seen
    out: dict[str, str] = {}
    for name, key in given.items():
        if key is not None:
            if roles[name].required and key not in obj:
                fail(_no_field(obj, name, key))
            out[name] = key
    for name, key in (prefer or {}).items():
        if (name in roles and name not in out and key in (obj if roles[name].required else seen)
                and key not in out.values()):
            out[name] = key
    if task == "sft":
        if "messages" not in out and not ({"prompt", "response"} & set(out)):
            msgs = _find(obj, roles["messages"].candidates)
            if msgs is not None:
                return {"messages": msgs}
        if "messages" in out:
            return out
        if "prompt" not in out:
            prompt = _find(obj, roles["prompt"].candidates)
            if prompt is None:
                fail(_no_field(obj, "prompt", looked=roles["prompt"].candidates)
                     + " (or --messages-field for chat data)")
            out["prompt"] = prompt
        if "response" not in out:
            response = _find({k: v for k, v in obj.items() if k != out["prompt"]}, roles["response"].candidates)
            if response is None:
                fail(_no_field(obj, "response", looked=roles["response"].candidates))
            out["response"] = response
        if "input" not in out:
            # Alpaca: the instruction is the prompt and an 'input' beside it is appended to it
            extra = _find({k: v for k, v in seen.items() if k not in (out["prompt"], out["response"])},
                          roles["input"].candidates)
            if extra is not None:
                out["input"] = extra
        return out
    used = set(out.values())
    for role in _ROLES[task]:
        if role.name in out:
            continue
        pool = obj if role.required else seen
        key = _find({k: v for k, v in pool.items() if k not in used}, role.candidates)
        if key is None:
            if role.required:
                fail(_no_field(obj, role.name, looked=role.candidates))
            continue
        out[role.name] = key
        used.add(key)
    return out


def _resolve_translate(obj: dict, given: dict[str, str | None], fail, prefer: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    inner, nested = obj, _find(obj, ("translation",))
    if nested is not None and isinstance(obj[nested], dict):
        inner = obj[nested]
        out["nested"] = nested
    src, tgt = given.get("source"), given.get("target")
    if src is None and tgt is None and {prefer.get("source"), prefer.get("target")} <= set(inner):
        # the training direction: a validation file that lists es before en is still scored en -> es
        src, tgt = prefer["source"], prefer["target"]
    for role, key in (("source", src), ("target", tgt)):
        if key is not None and key not in inner:
            fail(_no_field(inner, role, key))
    if src is None or tgt is None:
        guess_src = None if src is not None else _find(inner, _ROLES["translate"][0].candidates)
        guess_tgt = None if tgt is not None else _find(inner, _ROLES["translate"][1].candidates)
        if (src or guess_src) and (tgt or guess_tgt):
            src, tgt = src or guess_src, tgt or guess_tgt
        else:
            langs = [k for k, v in inner.items() if isinstance(v, str) and _LANG.match(str(k))]
            if len(langs) > 2:
                langs = [k for k in langs if k.lower() not in _NOT_LANG]
            if src is not None or tgt is not None:
                others = [k for k in langs if k not in (src, tgt)]
                if len(others) != 1:
                    missing = "target" if tgt is None else "source"
                    fail(_no_field(inner, missing, looked=_ROLES["translate"][0 if missing == "source" else 1]
                                   .candidates + ("a language code",)))
                src, tgt = src or others[0], tgt or others[0]
            elif len(langs) == 2:
                # no direction given: the order of the file's fields decides, and is recorded in `fields`
                src, tgt = langs
                out["order"] = "file"
            elif len(langs) > 2:
                fail(f"several language fields ({', '.join(langs)}): set --source-field and --target-field")
            else:
                role = "target" if (src or guess_src) else "source"
                fail(_no_field(inner, role, looked=_ROLES["translate"][0 if role == "source" else 1].candidates
                               + ("two language-code fields such as en/es",)))
    if src == tgt:  # the model would learn to copy its input, and score perfectly doing so
        fail(f"the source and the target are one field '{src}'; set --source-field and --target-field to two")
    result = {"source": src, "target": tgt, **out}
    if all(_LANG.match(k) and k.lower() not in _NOT_LANG - {"id"} for k in (src, tgt)):
        result["source_lang"], result["target_lang"] = src.lower(), tgt.lower()
    return result


# ----------------------------------------------------------------------------------------------- records

def _get(obj: dict, key: str, role: str) -> Any:
    if key not in obj:
        raise _Bad(_no_field(obj, role, key))
    return obj[key]


def _text(obj: dict, key: str, role: str, *, optional: bool = False) -> str | None:
    value = _get(obj, key, role) if not optional else obj.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise _Bad(f"field '{key}' must be a string, got {_type(value)}")
    if not value.strip():
        raise _Bad(f"field '{key}' is empty")
    return value


_DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+")


def _number(text: str, key: str, decimal_comma: bool = False) -> int | float | str:
    """CSV cells are text: '1' and '3.5' mean numbers there (and '3,5' in a semicolon CSV, whose Excel wrote
    it with the comma as decimal mark), anything else stays a string label; 'nan' and 'inf' are refused, as
    NaN and Infinity are in JSON (a score column with a gap, not a class)."""
    if decimal_comma and _DECIMAL_COMMA.fullmatch(text):
        text = text.replace(",", ".")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        raise _Bad(f"field '{key}' is {text} (not a number)")
    return value


def _classify(rec: _Record, f: dict[str, str]) -> dict:
    obj = rec.obj
    text = _text(obj, f["text"], "text")
    pair = _text(obj, f["text_pair"], "text_pair") if "text_pair" in f else None  # pairs in every record
    label = _get(obj, f["label"], "label")
    key = f["label"]
    if isinstance(label, str):
        # "pos " beside "pos" (a spreadsheet's stray space) is the same class, in JSON as in CSV cells
        label = label.strip()
        if not label:
            raise _Bad(f"field '{key}' is empty")
        if rec.text_cells:
            label = _number(label, key, rec.decimal_comma)
    elif label is None:
        raise _Bad(f"field '{key}' is null")
    elif isinstance(label, float) and not math.isfinite(label):
        raise _Bad(f"field '{key}' is {label}")
    elif not isinstance(label, (int, float)):
        more = "; multi-label classification is not supported" if isinstance(label, list) else ""
        raise _Bad(f"field '{key}' must be a string or a number, got {_type(label)}{more}")
    return {"text": text, "text_pair": pair, "label": label}


def _as_int(value: Any, key: str) -> int:
    if isinstance(value, str) and re.fullmatch(r"\s*-?\d+\s*", value):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise _Bad(f"field '{key}': answer_start must be a whole number, got {value!r}")


def _qa_answers(rec: _Record, f: dict[str, str], context: str) -> dict:
    obj, key = rec.obj, f["answers"]
    value = _get(obj, key, "answers")
    if rec.text_cells and isinstance(value, str) and value.strip()[:1] in ("{", "["):
        try:
            value = json.loads(value)  # a CSV cell holding the HF answers struct as JSON
        except json.JSONDecodeError as e:
            raise _Bad(f"field '{key}': invalid JSON ({e.msg} at column {e.colno})") from None
    texts: list = []
    starts: list = []
    if isinstance(value, dict):
        if "text" not in value:
            raise _Bad(f"field '{key}' must have 'text' and 'answer_start' (has {', '.join(value) or 'none'})")
        texts, starts = value.get("text"), value.get("answer_start")
        if not isinstance(texts, list):  # one answer written as {"text": "...", "answer_start": 3}
            texts, starts = [texts], [starts]
        elif "answer_start" not in value:  # texts alone: each is found in the context, as a string answer is
            starts = [None] * len(texts)
        if not isinstance(starts, list) or len(starts) != len(texts):
            raise _Bad(f"field '{key}': 'text' and 'answer_start' must be lists of the same length")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, str):  # ["Paris", "the city of Paris"]: texts, found in the context
                item = {"text": item}
            if not isinstance(item, dict) or "text" not in item:
                raise _Bad(f"field '{key}': each answer must be an object with 'text' and 'answer_start', or a "
                           f"string, got {_type(item)}")
            texts.append(item["text"])
            starts.append(item.get("answer_start"))
    elif value is None or isinstance(value, str):
        if value is not None and value.strip():  # an empty answer means unanswerable
            texts = [value]
            start = obj.get(f["answer_start"]) if "answer_start" in f else None
            starts = [None if start in (None, "") else start]
    else:
        raise _Bad(f"field '{key}' must be answers ({{'text': [...], 'answer_start': [...]}}, a list of "
                   f"them, or a string), got {_type(value)}")
    out_starts = []
    for text, start in zip(texts, starts):
        if not isinstance(text, str) or not text:
            raise _Bad(f"field '{key}': answer text must be a non-empty string, got {text!r}")
        if start is None:
            # no offset given: the answer is taken where it first occurs, and must occur
            found = context.find(text)
            if found < 0:
                raise _Bad(f"field '{key}': answer {_short(text)} does not occur in the context")
            out_starts.append(found)
            continue
        start = _as_int(start, key)
        span = context[start:start + len(text)] if start >= 0 else ""
        if span != text:
            where = context.find(text)
            hint = f" (it occurs at {where})" if where >= 0 else " (it does not occur in the context)"
            raise _Bad(f"field '{key}': answer_start {start} does not match the context: found {_short(span)}, "
                       f"expected {_short(text)}{hint}")
        out_starts.append(start)
    return {"text": list(texts), "answer_start": out_starts}


def _short(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _qa(rec: _Record, f: dict[str, str]) -> dict:
    obj = rec.obj
    question = _text(obj, f["question"], "question")
    context = _text(obj, f["context"], "context")
    answers = _qa_answers(rec, f, context)
    qid = obj.get(f["id"]) if "id" in f else None
    if isinstance(qid, float) and qid.is_integer():
        qid = int(qid)
    if qid is not None and (not isinstance(qid, (str, int)) or isinstance(qid, bool)):
        raise _Bad(f"field '{f['id']}' must be a string or a whole number, got {qid!r}")
    return {"id": None if qid in (None, "") else str(qid), "question": question, "context": context,
            "answers": answers}


# ShareGPT's from/value turns ("human", "gpt", and "chatgpt" in some dumps), Gemma's and the Gemini API's
# "model", and the "bot" of many chat logs; matched in any case ("Human", "User")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "chatgpt": "assistant", "model": "assistant",
                 "bot": "assistant"}
_CHAT_ROLES = ("system", "user", "assistant")


def _text_parts(parts: list, where: str) -> str:
    """The text of OpenAI-style content parts ([{"type": "text", "text": ...}]); other parts are refused."""
    texts = []
    for j, part in enumerate(parts):
        if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
            kind = repr(part.get("type")) if isinstance(part, dict) else _type(part)
            raise _Bad(f"{where}: content[{j}] is {kind}; only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                       "are supported")
        texts.append(part["text"])
    return "".join(texts)


def _chat_turns(turns: Any, key: str, text_cells: bool) -> list[dict]:
    """[{role, content}] from a messages field (OpenAI or ShareGPT turns; a JSON string in CSV cells)."""
    if text_cells and isinstance(turns, str):
        try:
            turns = json.loads(turns)
        except json.JSONDecodeError as e:
            raise _Bad(f"field '{key}': invalid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else _type(turns)
        raise _Bad(f"field '{key}' must be a non-empty list of {{role, content}} turns, got {got}")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise _Bad(f"field '{key}'[{i}] must be an object with role and content, got {_type(turn)}")
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        role = _ROLE_ALIASES.get(role.lower(), role.lower()) if isinstance(role, str) else role
        if role not in _CHAT_ROLES:
            hint = closest(str(role), _CHAT_ROLES)
            raise _Bad(f"field '{key}'[{i}]: role {role!r} is not one of {', '.join(_CHAT_ROLES)}{hint}")
        if isinstance(content, list):  # OpenAI content parts: text parts are joined, as `lmforge serve` joins them
            content = _text_parts(content, f"field '{key}'[{i}]")
        if not isinstance(content, str):
            raise _Bad(f"field '{key}'[{i}]: content must be a string or a list of text parts, got {_type(content)}")
        if role != "system" and not content.strip():
            raise _Bad(f"field '{key}'[{i}]: {role} content is empty")
        messages.append({"role": role, "content": content})
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is not None and messages[first]["role"] == "assistant":
        # nothing to reply to: chat templates that check turn order refuse it, and generation has no prompt
        raise _Bad(f"field '{key}'[{first}]: the conversation starts with an assistant turn; it must start with "
                   "a user turn (after an optional system turn)")
    return messages


def _sft(rec: _Record, f: dict[str, str]) -> dict:
    obj = rec.obj
    if "messages" in f:
        key = f["messages"]
        messages = _chat_turns(_get(obj, key, "messages"), key, rec.text_cells)
        if not any(m["role"] == "assistant" for m in messages):
            raise _Bad(f"field '{key}' has no assistant turn to learn from")
        return {"messages": messages}
    user = _user_turn(obj, f["prompt"], f.get("input"))
    response = _text(obj, f["response"], "response")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": response}]}


def _user_turn(obj: dict, prompt_key: str, input_key: str | None) -> str:
    """The prompt, with Alpaca's input (when the record has one) after a blank line: training and predict
    must build the same text, or the model is asked something it never saw."""
    prompt = _text(obj, prompt_key, "prompt")
    extra = obj.get(input_key) if input_key is not None else None
    if extra is not None and not isinstance(extra, str):
        raise _Bad(f"field '{input_key}' must be a string, got {_type(extra)}")
    return prompt + ("\n\n" + extra if extra and extra.strip() else "")


def _translate(rec: _Record, f: dict[str, str]) -> dict:
    obj = rec.obj
    if "nested" in f:
        inner = _get(obj, f["nested"], "source")
        if not isinstance(inner, dict):
            raise _Bad(f"field '{f['nested']}' must be an object of language: text, got {_type(inner)}")
        obj = inner
    return {"source": _text(obj, f["source"], "source"), "target": _text(obj, f["target"], "target")}


_NORMALISE = {"classify": _classify, "qa": _qa, "sft": _sft, "translate": _translate}


def load_examples(spec: str, task: str, fields: dict[str, str | None] | None = None, *, split: str = "train",
                  skip_bad_rows: bool = False, prefer: dict[str, str] | None = None) -> Loaded:
    """Read and normalise every record of a file or built-in set for `task` (see the module docstring).
    `prefer`: the fields the training data was read with (Loaded.fields), used where this file has them, so
    that every split of a run reads the same columns (translation: the same direction)."""
    if task not in _NORMALISE:
        raise LmforgeError(f"unknown task '{task}'{closest(task, TASKS)} (tasks: {', '.join(TASKS)})")
    given = {k: v for k, v in (fields or {}).items()}
    roles = [r.name for r in _ROLES[task]]
    for name in given:
        if name not in roles:
            raise LmforgeError(f"unknown field role '{name}' for task {task}{closest(name, roles)} "
                               f"(roles: {', '.join(roles)})")
    records, src, by_position = _open(spec, split, skip_bad_bytes=skip_bad_rows)
    builtin = _builtin_name(spec)
    if builtin and BUILTIN_SETS[builtin] != task:
        raise LmforgeError(f"{src}: a built-in {BUILTIN_SETS[builtin]} data set, not for task {task} "
                           f"(built-in {task} sets: "
                           f"{', '.join(n for n, t in BUILTIN_SETS.items() if t == task) or 'none'})")
    records = list(records)
    seen = dict.fromkeys(k for rec in records if rec.obj for k in rec.obj)  # every field of the file, in order
    for role in _ROLES[task]:
        key = given.get(role.name)
        if key is not None and not role.required and seen and key not in seen:
            # an optional field may be missing from any one record, but not from all of them
            names = list(map(str, seen))
            raise LmforgeError(f"{src}: no record has a field '{key}'{closest(key, names)} (fields: "
                               f"{', '.join(names)}); set {role.option}")
    normalise = _NORMALISE[task]
    resolved: dict[str, str] | None = None
    rows: list[dict] = []
    lines: list[int] = []
    skipped: list[str] = []
    seen_ids: dict[str, int] = {}
    by_row = False
    for rec in records:
        by_row = rec.loc.startswith(f"{src}:row ")  # Parquet and datasets records
        try:
            if rec.error is not None:
                raise _Bad(rec.error)
            if resolved is None:
                # the first record that has them decides the fields (with --skip-bad-rows, the records
                # before it are skipped; without, the first record must have them)
                resolved = _resolve_fields(task, rec.obj, given, prefer, seen)
            row = normalise(rec, resolved)
            if task == "qa":
                if row["id"] is None:
                    row["id"] = str(len(rows) + len(skipped) + 1 if by_position else rec.line)
                if row["id"] in seen_ids:
                    raise _Bad(f"duplicate id '{row['id']}' (first at line {seen_ids[row['id']]})")
                seen_ids[row["id"]] = rec.line
        except _Bad as e:
            message = f"{rec.loc}: {e}"
            if not skip_bad_rows:
                raise LmforgeError(message) from None
            skipped.append(message)
            continue
        rows.append(row)
        lines.append(rec.line)
    if not rows:
        if skipped:
            raise LmforgeError(f"{src}: no examples left after skipping {len(skipped)} bad rows "
                               f"(first: {skipped[0]})")
        raise LmforgeError(f"{src}: no examples (file is empty)")
    if resolved and prefer:
        _check_as_trained(task, resolved, prefer, given, src)
    loaded = Loaded(rows=rows, source=src, line_numbers=lines, skipped=skipped, fields=resolved or {},
                    by_row=by_row)
    odd = _odd_labels(loaded, resolved["label"]) if task == "classify" else {}
    if odd and not skip_bad_rows:
        raise LmforgeError(f"{loaded.loc(min(odd))}: {odd[min(odd)]}")
    if odd:
        loaded.drop(odd)
    return loaded


def _check_as_trained(task: str, fields: dict, trained: dict, given: dict, src: str) -> None:
    """A file scored against a model (validation, test, evaluate) must feed it what it was trained on: a
    pair classifier its second text, a translator its target language. Guessing otherwise scores it silently
    wrong (an en->es model against French references)."""
    if task == "classify" and trained.get("text_pair") and "text_pair" not in fields:
        raise LmforgeError(f"{src}: no field '{trained['text_pair']}': the model reads text pairs (the second text "
                           f"was '{trained['text_pair']}' in training); set --text-pair-field")
    if task != "translate":
        return
    for role in ("source", "target"):
        was, now = trained.get(f"{role}_lang"), fields.get(f"{role}_lang")
        if was and now and was != now and given.get(role) is None:
            raise LmforgeError(f"{src}: no field '{trained[role]}', the {role} language the model was trained on "
                               f"(this file has '{fields[role]}'); to score against that anyway, set --{role}-field")


_KINDS = {"a number": "numeric", "a string": "string", "a boolean": "boolean"}


def _odd_labels(loaded: Loaded, key: str) -> dict[int, str]:
    """{index: reason} of the labels not of the kind most labels are (number, string or boolean): one score
    written as "0.84" would otherwise turn a file of scores into classification with a class per score."""
    labels = [r["label"] for r in loaded.rows]
    kinds = [_type(x) for x in labels]
    counts = collections.Counter(kinds)  # in order of first appearance: a tie goes to the first label's kind
    main = max(counts, key=counts.__getitem__)
    named: dict[str, int] = {}  # a saved model knows its classes by name: 1 and "1" would share one
    for i, x in enumerate(labels):
        if kinds[i] == main:
            named.setdefault(str(x), i)
    odd = {}
    for i, x in enumerate(labels):
        if kinds[i] == main:
            continue
        j = named.get(str(x))
        if j is None:
            why = f"label {x!r} is {kinds[i]} among {_KINDS[main]} labels"
        else:
            why = (f"label {x!r} ({kinds[i]}) and label {labels[j]!r} ({main}, at {loaded.loc(j)}) would be two "
                   "classes with one name")
        odd[i] = f"field '{key}': {why}; write every label the same way"
    return odd


_TEXT_FIELDS = ("text", "sentence", "source", "prompt", "content")
_INPUT_ROLE = {"classify": "text", "translate": "source", "sft": "prompt"}  # what a model reads at prediction


def input_role(task: str) -> str:
    """The one field a fine-tuned model reads from an unlabelled row: text, source (translate) or prompt (sft)."""
    return _INPUT_ROLE.get(task, "text")


def input_field_guesses(task: str, trained: str | None = None) -> tuple[str, ...]:
    """Names to guess the input field of an unlabelled row by: the field the model was trained on first, then
    the names its task guesses for that role (classify: text, sentence, review...), then the generic ones."""
    role = input_role(task)
    own = next((r.candidates for r in _ROLES.get(task, []) if r.name == role), ())
    return tuple(dict.fromkeys(((trained.lower(),) if trained else ()) + own + _TEXT_FIELDS))


def load_texts(spec: str, field: str | None = None, guesses: tuple[str, ...] = _TEXT_FIELDS,
               chat: bool = False, role: str = "text", pair_field: str | None = None,
               input_field: str | None = None) -> list[dict]:
    """Unlabelled inputs for prediction: each record's `field` (exactly, as explicit field names are), or without
    one the first of `guesses` it has (case-insensitively, as guessed fields are). With `chat`, a record with a
    messages field (a conversation to continue) gives {"messages": [...]} instead. With `pair_field` (a
    classifier of text pairs), each record's second text too, as {"text", "text_pair"}. For sft (`chat`, or
    role "prompt"), an Alpaca input beside the prompt (`input_field`, else guessed) is joined to it as
    training joins it."""
    records, _, _ = _open(spec)
    looked = (field,) if field else guesses
    alpaca = chat or role == "prompt"
    rows = []
    for rec in records:
        if rec.error:
            raise LmforgeError(f"{rec.loc}: {rec.error}")
        chat_key = _find(rec.obj, _ROLES["sft"][0].candidates) if chat and not field else None
        if chat_key is not None:
            try:
                rows.append({"messages": _chat_turns(rec.obj[chat_key], chat_key, rec.text_cells)})
            except _Bad as e:
                raise LmforgeError(f"{rec.loc}: {e}") from None
            continue
        obj = rec.obj
        nested = _find(obj, ("translation",))  # {"translation": {"en": ..., "es": ...}}, as Hugging Face sets have
        if nested is not None and isinstance(obj[nested], dict):
            obj = obj[nested]
        key = (field if field in obj else None) if field else _find(obj, guesses)
        if key is None:
            raise LmforgeError(f"{rec.loc}: no {role} field: looked for {', '.join(looked)} "
                               f"(fields: {', '.join(map(str, obj)) or 'none'}); set {_OPTION[role]}")
        extra = None
        if alpaca:
            extra = input_field or _find({k: v for k, v in obj.items() if k != key}, _ALPACA_INPUT)
        try:
            row = {"text": _user_turn(obj, key, extra) if alpaca else _text(obj, key, role)}
        except _Bad as e:
            raise LmforgeError(f"{rec.loc}: {e}") from None
        if pair_field is not None:
            try:
                row["text_pair"] = _text(obj, pair_field, "text_pair")
            except _Bad as e:
                raise LmforgeError(f"{rec.loc}: {e} (the model classifies text pairs)") from None
        rows.append(row)
    return rows


def load_questions(spec: str, question_field: str | None = None, context_field: str | None = None) -> list[dict]:
    """Unlabelled QA inputs for prediction: [{"question", "context"}] per record (no answers needed); fields as
    named, else guessed like training data's, including SQuAD's nested JSON."""
    records, _, _ = _open(spec)
    roles = {r.name: r for r in _ROLES["qa"]}
    rows = []
    for rec in records:
        if rec.error:
            raise LmforgeError(f"{rec.loc}: {rec.error}")
        row = {}
        for role, named in (("question", question_field), ("context", context_field)):
            key = named if named is not None else _find(rec.obj, roles[role].candidates)
            if key is None or key not in rec.obj:
                raise LmforgeError(f"{rec.loc}: " + (_no_field(rec.obj, role, key) if key is not None else
                                                     _no_field(rec.obj, role, looked=roles[role].candidates)))
            try:
                row[role] = _text(rec.obj, key, role)
            except _Bad as e:
                raise LmforgeError(f"{rec.loc}: {e}") from None
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------- labels

def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _label_key(x: Any):
    # numbers before strings, so mixed label sets still sort instead of raising TypeError
    return (1, str(x)) if isinstance(x, str) else (0, x)


def build_label_map(train_labels: list, other: dict[str, list] | None = None,
                    source: str | None = None) -> tuple[list, bool]:
    """(sorted class labels, is_regression). Regression when every label is a number and some are not
    whole (train and `other` splits together, so a 0-5 score whose training slice happens to be whole
    numbers is still a score); then the label list is empty. Ints, bools and strings are classes.
    `source` names the training file in messages."""
    if not train_labels:
        raise LmforgeError("no training labels")
    everything = list(train_labels) + [x for labels in (other or {}).values() for x in labels]
    if all(_is_number(x) for x in everything) and any(isinstance(x, float) and not x.is_integer()
                                                     for x in everything):
        return [], True
    labels = sorted(set(train_labels), key=_label_key)
    if len(labels) < 2:
        where = f"{source}: " if source else ""
        raise LmforgeError(f"{where}the training data has a single label {labels[0]!r}: classification needs at "
                           "least two")
    return labels, False


def check_labels(labels: list, label_list: list, loaded: Loaded, skip: bool = False) -> None:
    """Every validation/test label must be a training label: the model has no output for a new one. With
    `skip` (--skip-bad-rows), such records are dropped from `loaded` and reported instead."""
    known = set(label_list)
    bad = [i for i, x in enumerate(labels) if x not in known]
    if not bad:
        return
    shown = ", ".join(map(repr, label_list[:20])) + (", ..." if len(label_list) > 20 else "")
    if skip and len(bad) < len(labels):
        loaded.drop({i: f"label {labels[i]!r} never seen in training" for i in bad})
        print(skipped_report(loaded.source, loaded.skipped[-len(bad):],
                             f"row(s) with labels never seen in training (training labels: {shown})"), flush=True)
        return
    x = labels[bad[0]]
    hint = closest(str(x), map(str, label_list)) if isinstance(x, str) else ""
    more = f"; {len(bad) - 1} more rows have unseen labels" if len(bad) > 1 else ""
    raise LmforgeError(f"{loaded.loc(bad[0])}: label {x!r} never seen in training{hint} (training labels: "
                       f"{shown}){more}")


def skipped_report(source: str, skipped: list[str], what: str = "bad row(s)") -> str:
    """What --skip-bad-rows skipped: the count, then the first ten, one per line."""
    return (f"{source}: skipped {len(skipped)} {what}:\n  " + "\n  ".join(skipped[:10])
            + ("\n  ..." if len(skipped) > 10 else ""))


def check_label_names(loaded: Loaded) -> None:
    """Class labels become names (config.id2label): 1 and "1", or true and "True", would be two classes of
    one name, which a saved model cannot tell apart. Numbers equal in value (1 and 1.0) are one class."""
    first: dict[str, int] = {}
    for i, row in enumerate(loaded.rows):
        x = row["label"]
        j = first.setdefault(str(x), i)
        y = loaded.rows[j]["label"]
        if x != y or isinstance(x, bool) != isinstance(y, bool):
            raise LmforgeError(f"{loaded.loc(i)}: label {x!r} ({_type(x)}) and label {y!r} ({_type(y)}, at "
                               f"{loaded.loc(j)}) would be two classes with one name; write every label the same "
                               "way (all strings or all numbers)")


def holdout(rows: list[dict], line_numbers: list[int], fraction: float = 0.1, seed: int = 0,
            max_rows: int = 2000, labels: list | None = None) -> tuple[list[int], list[int]]:
    """(train indices, validation indices), both sorted. Rows are ordered by a seeded hash of their content,
    so the split does not depend on file order and exact duplicates land on the same side (no leakage).
    With `labels` (one class per row), a row is held out only while its class keeps a training example:
    an automatic slice must never hold a label that training has not seen."""
    if len(rows) != len(line_numbers):
        raise ValueError("rows and line_numbers differ in length")
    n = len(rows)
    if n < 2:
        raise LmforgeError(f"{n} training example(s): too few to hold out a validation slice; pass --validation")
    n_val = min(max_rows, max(1, round(n * fraction)), n - 1)

    def key(i: int) -> tuple[str, int]:
        blob = json.dumps(rows[i], sort_keys=True, ensure_ascii=False, default=str)
        return hashlib.sha1(f"{seed}\0{blob}".encode("utf-8")).hexdigest(), line_numbers[i]

    keys = {i: key(i) for i in range(n)}
    order = sorted(range(n), key=keys.__getitem__)
    left = collections.Counter(labels) if labels is not None else None
    val: list[int] = []
    for _, group in itertools.groupby(order, key=lambda i: keys[i][0]):  # copies of one row, together
        group = list(group)
        if len(val) >= n_val:
            break
        if len(val) + len(group) >= n:
            continue  # leave something to train on
        if left is not None:
            taken = collections.Counter(labels[i] for i in group)
            if any(left[lab] <= c for lab, c in taken.items()):
                continue  # the last training examples of a class stay in training
            left.subtract(taken)
        val += group
    if not val and left is not None:
        raise LmforgeError(f"cannot hold out a validation slice: no class has an example to spare ({n} training "
                           f"examples, {len(left)} classes); pass --validation")
    if not val:  # every row is a copy of one: split copies after all
        val = order[:n_val]
    held = set(val)
    return sorted(i for i in range(n) if i not in held), sorted(val)
