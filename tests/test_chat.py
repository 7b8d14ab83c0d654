"""`lmforge chat`: a terminal chat that streams replies, obeys /reset, /help, /quit, EOF and Ctrl-C, and keeps
the conversation inside the context window (the tiny session model has a 64-token window)."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time

from conftest import REPO, assert_user_error, cli


def chat_subprocess(model, stdin: str, *args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmforge", "chat", "--model", str(model), *map(str, args)],
                          input=stdin, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ))


def chat_in_process(monkeypatch, model, stdin: str, *args):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    return cli("chat", "--model", model, *args)


def replies(out: str) -> list[str]:
    return [ln[len("assistant> "):] for ln in out.splitlines() if ln.startswith("assistant> ")]


def test_chat_conversation_reset_and_quit(tiny_run):
    res = chat_subprocess(tiny_run.final, "Hello\n/reset\nAgain\n/quit\nnever read\n",
                          "--max-new-tokens", 5, "--seed", 0)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    out = res.stdout
    # piped input is echoed after the prompt, so the transcript reads like the conversation
    assert "you> Hello\n" in out and "you> Again\n" in out and "you> /quit\n" in out
    assert "[conversation reset]" in out
    assert out.count("assistant> ") == 2  # one reply per message; commands get none
    assert "never read" not in out  # /quit ends the session
    # same seed, and /reset forgets everything (turn numbering included): the second reply repeats the first
    first, second = replies(out)
    assert first == second


def test_chat_seed_reproducible_and_help(tiny_run, monkeypatch):
    stdin = "/help\n/nonsense\n\nHi there\n"
    a = chat_in_process(monkeypatch, tiny_run.final, stdin, "--max-new-tokens", 6, "--seed", 3)
    b = chat_in_process(monkeypatch, tiny_run.final, stdin, "--max-new-tokens", 6, "--seed", 3)
    assert a.code == 0 and b.code == 0, a.err
    assert replies(a.out) == replies(b.out) and len(replies(a.out)) == 1
    assert "/reset" in a.out and "/quit" in a.out  # /help
    assert "unknown command /nonsense" in a.out


def test_chat_keeps_within_context_window(tiny_run, monkeypatch):
    """Long messages in a 64-token window: old turns are dropped (said once), the system message kept,
    an over-long message is cut to its end; nothing crashes."""
    long = " ".join(["the king is dead"] * 40)  # far more than 64 tokens
    stdin = "".join(f"{long} {i}\n" for i in range(3)) + "short\n"
    res = chat_in_process(monkeypatch, tiny_run.final, stdin, "--max-new-tokens", 8, "--seed", 1,
                          "--system", "Be brief.")
    assert res.code == 0, res.err
    assert len(replies(res.out)) == 4
    assert res.err.count("dropping the oldest turns") == 1  # told once, not every turn
    assert "only its last part was read" in res.err
    assert "system message does not fit" not in res.err  # "Be brief." fits: it stays
    assert "Traceback" not in res.err


def test_chat_tiny_context_option(tiny_run, monkeypatch):
    """--context shrinks the window below the model's: replies get capped, a long conversation still runs."""
    stdin = "".join(f"message number {i} about kings and queens\n" for i in range(4))
    res = chat_in_process(monkeypatch, tiny_run.final, stdin, "--context", 24, "--max-new-tokens", 50,
                          "--temperature", 0)
    assert res.code == 0, res.err
    assert "replies capped at 12 tokens" in res.err
    assert len(replies(res.out)) == 4
    assert "dropping the oldest turns" in res.err


def test_chat_eof_ends_cleanly(tiny_run):
    # no /quit and no final newline: the last line is still answered, then EOF ends the session
    res = chat_subprocess(tiny_run.final, "Hello there", "--max-new-tokens", 3, "--seed", 0)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stdout.count("assistant> ") == 1
    assert res.stdout.endswith("you> \n")  # the prompt, then a newline so the shell starts on a fresh line


def test_chat_ctrl_c_at_the_prompt_exits_zero(tiny_run):
    # A job started in the background (`cmd &`, nohup, some CI runners) inherits SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: the child would ignore the Ctrl-C this test sends
    proc = subprocess.Popen([sys.executable, "-m", "lmforge", "chat", "--model", str(tiny_run.final)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO,
                            env=dict(os.environ), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    seen = []
    prompt_shown = threading.Event()

    def read():
        while chunk := proc.stdout.read1(1024):
            seen.append(chunk)
            if b"you> " in b"".join(seen):
                prompt_shown.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert prompt_shown.wait(120), b"".join(seen)
        time.sleep(0.2)  # inside readline() now
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        err = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdin.close()
    reader.join(5)
    assert code == 0, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_chat_user_errors(tiny_run, tmp_path):
    assert_user_error(cli("chat"), "--model is required")
    assert_user_error(cli("chat", "--model", tmp_path / "missing"), "no such model folder")
    assert_user_error(cli("chat", "--model", tiny_run.final, "--max-new-tokens", 0), "--max-new-tokens")
    assert_user_error(cli("chat", "--model", tiny_run.final, "--top-p", 0), "--top-p")


def test_chat_does_not_leak_no_grad(tiny_run, monkeypatch):
    import torch

    res = chat_in_process(monkeypatch, tiny_run.final, "Hi\n", "--max-new-tokens", 2, "--temperature", 0)
    assert res.code == 0, res.err
    assert torch.is_grad_enabled()  # scoped torch.no_grad(), not a global switch
