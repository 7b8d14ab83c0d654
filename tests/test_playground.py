"""The playground page (GET /) in a real headless Chromium against a real `lmforge serve`.

`chromium --dump-dom` returns as soon as the page has loaded, before a streamed reply arrives (virtual time
does not wait for a response body still streaming), so the browser is driven over the DevTools protocol
through a pipe (--remote-debugging-pipe: JSON messages ending in NUL on fds 3 and 4; no websocket library
needed): open the page, poll `document.body.dataset.state` until the page says "done" or "error", then read
the DOM. The page reads `?prompt=...&autosend=1` (LM) / `?text=...&autosend=1` (classifier).

Needs Chromium: `apt-get install -y chromium` (Debian/Ubuntu; `chromium-browser` also works). Skipped without.
"""
from __future__ import annotations

import fcntl
import html
import json
import os
import re
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO

BROWSER_TIMEOUT = 20.0  # seconds for one page to reach "done"
SERVER_TIMEOUT = 90.0  # model load + imports on a busy 2-core CPU


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if not exe:
        pytest.skip("Chromium not installed (apt-get install chromium): playground test skipped")
    return exe


# ------------------------------------------------------------------------------------------ the server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(model: Path, *extra: str):
    """`python -m lmforge serve --model MODEL --port P ...` until /health answers; yields the base URL."""
    port = free_port()
    log = tempfile.TemporaryFile(mode="w+")
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--model", str(model), "--port", str(port),
                             *extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + SERVER_TIMEOUT
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"lmforge serve exited with {proc.returncode}:\n{log.read()[-3000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:  # open even with --api-key
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            if time.time() > deadline:
                log.seek(0)
                pytest.fail(f"lmforge serve did not answer within {SERVER_TIMEOUT:.0f} s:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


# ------------------------------------------------------------------------------------------ the browser

class Browser:
    """Headless Chromium driven over the DevTools protocol on a pipe (fd 3: commands in, fd 4: replies out)."""

    def __init__(self, exe: str):
        self.profile = tempfile.mkdtemp(prefix="lmforge-chromium-")
        cmd_r, self.cmd_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        # Move the child's ends above the low fds so the shell can place them at 3 and 4 without collisions.
        hi_r, hi_w = fcntl.fcntl(cmd_r, fcntl.F_DUPFD, 20), fcntl.fcntl(resp_w, fcntl.F_DUPFD, 20)
        os.close(cmd_r)
        os.close(resp_w)
        args = [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--remote-debugging-pipe",
                "--no-first-run", "--no-default-browser-check", "--disable-extensions", "--mute-audio",
                f"--user-data-dir={self.profile}", "about:blank"]
        # bash, not sh: dash cannot redirect file descriptors above 9.
        script = f'exec "$@" 3<&{hi_r} 4>&{hi_w} {hi_r}<&- {hi_w}>&-'
        self.proc = subprocess.Popen([shutil.which("bash") or "/bin/bash", "-c", script, "bash", *args],
                                     pass_fds=(hi_r, hi_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(hi_r)
        os.close(hi_w)
        self.buf = b""
        self.next_id = 0

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 15.0):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self.buf:
                raw, self.buf = self.buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self.next_id:  # anything else is an event: ignored
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.time()
            if left <= 0 or self.proc.poll() is not None:
                raise RuntimeError(f"{method}: no answer from Chromium (exit code {self.proc.poll()})")
            ready, _, _ = select.select([self.resp_r], [], [], left)
            if ready:
                chunk = os.read(self.resp_r, 1 << 16)
                if not chunk:
                    raise RuntimeError(f"{method}: Chromium closed the pipe")
                self.buf += chunk

    def open(self, url: str) -> str:
        """Open `url` in a new tab; its DevTools session id."""
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        return self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def evaluate(self, session: str, expr: str):
        res = self.call("Runtime.evaluate", {"expression": expr, "returnByValue": True}, session)
        return res.get("result", {}).get("value")

    def settle(self, session: str, timeout: float = BROWSER_TIMEOUT) -> tuple[str | None, str]:
        """Wait until body[data-state] is done/error (or `timeout`); (state, page HTML)."""
        deadline = time.time() + timeout
        state = None
        while time.time() < deadline:
            state = self.evaluate(session, "document.body ? document.body.dataset.state : null")
            if state in ("done", "error"):
                break
            time.sleep(0.2)
        return state, self.evaluate(session, "document.documentElement.outerHTML")

    def open_until_settled(self, url: str, timeout: float = BROWSER_TIMEOUT) -> tuple[str | None, str]:
        return self.settle(self.open(url), timeout)

    def close(self):
        try:
            self.call("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.cmd_w)
        os.close(self.resp_r)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture
def browser(chromium):
    b = Browser(chromium)
    yield b
    b.close()


def texts(page: str, pattern: str) -> list[str]:
    """Unescaped text of every match of `pattern` (one group) in the page HTML."""
    return [html.unescape(re.sub(r"<[^>]+>", "", m)) for m in re.findall(pattern, page, flags=re.S)]


def status_text(page: str) -> str:
    return " ".join(texts(page, r'<div id="status"[^>]*>(.*?)</div>'))


# ------------------------------------------------------------------------------------------ tests

def test_index_is_self_contained():
    page = (REPO / "lmforge" / "serve" / "static" / "index.html").read_text(encoding="utf-8")
    assert "<script src" not in page and "<link" not in page  # no external scripts or stylesheets
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)  # nothing fetched from elsewhere
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", page)
    for hook in ('aria-live="polite"', "autosend", "dataset.state", "sessionStorage", "/v1/models",
                 "/v1/chat/completions", "/v1/classify", "Authorization"):
        assert hook in page, hook


def test_chat_page_streams_a_reply(tiny_run, browser):
    with serve(tiny_run.final) as url:
        with urllib.request.urlopen(url + "/", timeout=10) as r:
            assert r.status == 200 and "text/html" in r.headers.get("content-type", "")
            assert b"lmforge playground" in r.read()
        state, page = browser.open_until_settled(f"{url}/?prompt=Hello&autosend=1&max_tokens=8&temperature=1&seed=0")
    assert state == "done", f"state {state!r}; status: {status_text(page)!r}"
    assert 'data-kind="causal-lm"' in page
    users = texts(page, r'<li class="user">.*?<span class="content">(.*?)</span>')
    replies = texts(page, r'<li class="assistant[^"]*">.*?<span class="content">(.*?)</span>')
    assert users == ["Hello"]
    assert len(replies) == 1 and replies[0].strip(), page[-2000:]
    assert 'aria-busy="false"' in page and "streaming" not in re.findall(r'<li class="([^"]*)"', page)[-1]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory) -> Path:
    """A random 2-layer BERT classifier (neg/pos) with the MiniLM tokenizer: instant to load and run."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from lmforge.model.hub import resolve_model

    try:
        tok_dir = resolve_model("minilm-l6")
    except Exception as e:  # the alias's package is an optional extra
        pytest.skip(f"minilm-l6 tokenizer unavailable: {e}")
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, num_labels=2,
                     id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    out = tmp_path_factory.mktemp("clf") / "model"
    BertForSequenceClassification(cfg).save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def test_classifier_page_draws_label_bars(tiny_classifier, browser):
    with serve(tiny_classifier) as url:
        state, page = browser.open_until_settled(f"{url}/?text=What%20a%20lovely%20day&autosend=1")
    assert state == "done", f"state {state!r}; status: {status_text(page)!r}"
    assert 'data-kind="classifier"' in page
    bars = dict(re.findall(r'<div class="bar[^"]*" data-label="([^"]+)" data-score="([^"]+)"', page))
    assert set(bars) == {"neg", "pos"}, page[-2000:]
    scores = {k: float(v) for k, v in bars.items()}
    assert all(0 <= s <= 1 for s in scores.values()) and abs(sum(scores.values()) - 1) < 1e-3
    widths = re.findall(r'class="fill" style="[^"]*width:\s*([\d.]+)%', page)
    assert len(widths) == 2 and max(float(w) for w in widths) > 0
    top = max(scores, key=scores.get)
    assert top in status_text(page)  # the status line names the winning label


def test_classifier_page_asks_for_the_second_text_of_a_pair_model(tiny_classifier, browser, tmp_path):
    import shutil

    import yaml

    pair = tmp_path / "pair"
    shutil.copytree(tiny_classifier, pair)
    (pair / "lmforge_config.yaml").write_text(yaml.safe_dump(
        {"task": "classify", "data_fields": {"text": "premise", "text_pair": "hypothesis"}}), encoding="utf-8")
    with serve(pair) as url:
        state, page = browser.open_until_settled(f"{url}/?text=A%20man%20sleeps&text_pair=Someone%20rests&autosend=1")
    assert state == "done", f"state {state!r}; status: {status_text(page)!r}"
    assert 'id="text-pair-field" hidden' not in page and "hypothesis" in page
    assert len(re.findall(r'<div class="bar[^"]*" data-label=', page)) == 2


def test_chat_page_asks_for_the_api_key(tiny_run, browser):
    """Without the key the page ends in "error" and opens the key field; with it (kept in sessionStorage)
    the prompt from the URL is sent."""
    with serve(tiny_run.final, "--api-key", "sekrit") as url:
        tab = browser.open(f"{url}/?prompt=Hello&autosend=1&max_tokens=4&temperature=1&seed=0")
        state, page = browser.settle(tab)
        assert state == "error" and "401" in status_text(page) and "API key" in status_text(page)
        assert re.search(r'<details class="key" id="key-box" open', page)
        browser.evaluate(tab, 'document.getElementById("api-key").value = "sekrit"; '
                              'document.body.dataset.state = "key"; document.getElementById("key-save").click()')
        state, page = browser.settle(tab)
        assert browser.evaluate(tab, 'sessionStorage.getItem("lmforge.apiKey")') == "sekrit"
    assert state == "done", f"state {state!r}; status: {status_text(page)!r}"
    assert texts(page, r'<li class="user">.*?<span class="content">(.*?)</span>') == ["Hello"]
