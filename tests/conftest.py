"""Shared fixtures: an isolated cache, a small corpus, and one tiny model trained once per session.

Everything here is sized for a shared 2-core CPU: the whole suite trains only a handful of ~50k-parameter
models for a few steps each.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

# Token caches (and the model-alias cache) go to a throwaway folder, never ~/.cache. Set at import so that
# it is in place before any lmforge code runs, including in subprocesses started by the tests.
_CACHE = Path(tempfile.mkdtemp(prefix="lmforge-test-cache-"))
os.environ["LMFORGE_CACHE"] = str(_CACHE)
os.environ.setdefault("LMFORGE_NO_TCMALLOC", "1")  # no re-exec in subprocess tests
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread():
    """Every model in the suite is tiny: threads buy nothing, and on a shared CPU OpenMP threads waiting on
    each other can make a step ~100x slower. Subprocesses started by tests keep torch's default."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# Arguments of the session's tiny model (the brief's canonical tiny run).
TINY_ARGS = ["--size", "tiny", "--n-layer", "2", "--n-embd", "32", "--n-head", "2", "--context", "64",
             "--vocab-size", "512", "--max-steps", "6", "--batch-size", "4", "--no-progress",
             "--eval-tokens", "2048", "--sample-tokens", "4"]


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def cli(*args) -> CliResult:
    """Run `lmforge ARGS` in-process, capturing stdout and stderr (usable from session fixtures too)."""
    from lmforge.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return CliResult(code, out.getvalue(), err.getvalue())


def cli_subprocess(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m lmforge ARGS` as a real process (exit code and stderr as a user sees them)."""
    return subprocess.run([sys.executable, "-m", "lmforge", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ))


def torchrun(*args, nproc: int = 2, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m lmforge ARGS`: N CPU processes over gloo. With `check`, a
    failed run fails the test showing both outputs (and, if a worker crashed, its Python stacks)."""
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                          str(nproc), "-m", "lmforge", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                         timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"})
    assert not check or res.returncode == 0, f"torchrun {' '.join(map(str, args))}: exit {res.returncode}\n" \
        f"--- stdout ---\n{res.stdout[-3000:]}\n--- stderr ---\n{res.stderr[-6000:]}"
    return res


def cli_signalled(*args, out_dir: Path, sig: int, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run `python -m lmforge ARGS` and send it `sig` (Ctrl-C, or a scheduler's SIGTERM) as soon as
    OUT_DIR/metrics.jsonl has a training-loss row, i.e. mid-run; then wait for it to exit."""
    import time

    proc = subprocess.Popen([sys.executable, "-m", "lmforge", *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    log, deadline = Path(out_dir) / "metrics.jsonl", time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if log.exists() and '"loss"' in log.read_text():
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_user_error(res, *fragments: str) -> str:
    """Exit code 2, exactly one stderr line `lmforge: error: ...` containing every fragment, no traceback."""
    code = res.code if isinstance(res, CliResult) else res.returncode
    err = res.err if isinstance(res, CliResult) else res.stderr
    assert code == 2, f"exit code {code}, stderr: {err!r}"
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith(("Loading weights", "\r"))]
    errors = [ln for ln in lines if ln.startswith("lmforge: error:")]
    assert len(errors) == 1 and errors == lines, f"expected one error line, got: {err!r}"
    for frag in fragments:
        assert frag in errors[0], f"{frag!r} not in {errors[0]!r}"
    return errors[0]


def token_cache_entries() -> list[str]:
    root = _CACHE / "tokens"
    return sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) if root.exists() else []


def metrics_rows(out_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (Path(out_dir) / "metrics.jsonl").read_text().splitlines() if ln.strip()]


@pytest.fixture(scope="session", autouse=True)
def lmforge_cache() -> Path:
    """The session's LMFORGE_CACHE folder (set at import); removed when the session ends."""
    os.environ["LMFORGE_CACHE"] = str(_CACHE)
    yield _CACHE
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    from lmforge.data.corpus import BUILTIN_CORPORA, BUILTIN_DIR, read_text

    return read_text(BUILTIN_DIR / BUILTIN_CORPORA["shakespeare"])


def _cut(text: str, start: int, size: int) -> str:
    """`size` characters from `start`, ending at a line end."""
    piece = text[start:start + size]
    return piece[: piece.rfind("\n") + 1]


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory, shakespeare_text) -> Path:
    """~60 KB of Shakespeare (~30k tokens with a 512-token vocabulary)."""
    path = tmp_path_factory.mktemp("corpus") / "shakespeare_60k.txt"
    path.write_text(_cut(shakespeare_text, 0, 60_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def other_corpus_file(tmp_path_factory, shakespeare_text) -> Path:
    """Different text (from much later in the corpus) for continued pretraining."""
    path = tmp_path_factory.mktemp("corpus_other") / "other.txt"
    path.write_text(_cut(shakespeare_text, 3_000_000, 30_000), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def mixed_corpus_file(tmp_path_factory, shakespeare_text) -> Path:
    """English and Chinese (People's Daily) text, for tokenizer training."""
    from lmforge.data.corpus import BUILTIN_CORPORA, BUILTIN_DIR, read_text

    chinese = read_text(BUILTIN_DIR / BUILTIN_CORPORA["peoples_daily"])
    path = tmp_path_factory.mktemp("corpus_mixed") / "mixed.txt"
    path.write_text(_cut(shakespeare_text, 0, 20_000) + _cut(chinese, 0, 8_000) + "emoji 🙂👍🏽 done\n",
                    encoding="utf-8")
    return path


@dataclass
class TinyRun:
    out: Path  # the pretrain --out folder
    final: Path  # out/final
    tokenizer: Path  # out/tokenizer
    corpus: Path
    stdout: str


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, corpus_file) -> TinyRun:
    """One tiny model, trained once for the whole session (~10 s)."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    res = cli("pretrain", "--data", corpus_file, "--out", out, *TINY_ARGS)
    assert res.code == 0, res.err
    return TinyRun(out=out, final=out / "final", tokenizer=out / "tokenizer", corpus=corpus_file, stdout=res.out)
