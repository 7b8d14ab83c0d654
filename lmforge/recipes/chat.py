"""Chat with a causal LM in the terminal: replies stream token by token.

    lmforge chat --model smollm2-135m
    lmforge chat --model runs/sft/final --system "You are a terse assistant." --temperature 0.3

Type a message and press Enter. Commands: /reset forgets the conversation, /quit (or Ctrl-D) ends the
session, /help lists the commands. Ctrl-C during a reply cuts it short; at the prompt it ends the session.
The model's chat template frames the conversation (a default one where the tokenizer has none) and a reply
ends at the template's end-of-turn token. When the conversation outgrows the context window the oldest
turns are dropped (the system message stays). Input may also be piped: `echo "Hi" | lmforge chat --model M`.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

from lmforge.config import opt
from lmforge.errors import LmforgeError

USER_PROMPT = "you> "
ASSISTANT_PROMPT = "assistant> "
HELP = """commands:
  /reset   forget the conversation (the system message stays)
  /quit    end the session (also /exit, Ctrl-D, or Ctrl-C at the prompt)
  /help    this list
Ctrl-C while a reply streams cuts it short."""
QUIT = ("/quit", "/exit", "/bye")


@dataclass
class ChatConfig:
    model: str = opt("", "model folder, lmforge output folder, alias (smollm2-135m) or hub id")
    system: str = opt("", "system message that opens the conversation (kept when old turns are dropped)")
    max_new_tokens: int = opt(256, "tokens per reply at most (capped at half the context window)", ge=1)
    temperature: float = opt(0.7, "sampling temperature (0: greedy)", ge=0)
    top_k: int = opt(50, "sample from the k most likely tokens (0: off)", ge=0)
    top_p: float = opt(1.0, "nucleus sampling: smallest set with this much probability (1: off)", gt=0, le=1)
    seed: int | None = opt(None, "random seed for reproducible replies (turn n uses seed + n)", ge=0,
                            lt=2 ** 32)
    repetition_penalty: float = opt(1.0, "make tokens already in the prompt or reply less likely (1: off; 1.1-1.3 "
                                         "curbs loops), as transformers' repetition_penalty", gt=0)
    context: int | None = opt(None, "context window in tokens (default and maximum: the model's)", ge=8)


def run(cfg: ChatConfig) -> int:
    import torch

    # Scoped, not torch.set_grad_enabled(False): run() is also called in-process (tests), where a global
    # switch would leak into whatever runs next in the same process.
    try:
        with torch.no_grad():
            return Chat(cfg).loop()
    except KeyboardInterrupt:  # Ctrl-C while loading or at the prompt: a normal way to leave
        _write("\n")
        return 0
    except BrokenPipeError:  # stdout closed (piped into `head`): nothing left to say
        return 0


def _write(text: str, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(text)
    stream.flush()


def _note(text: str) -> None:
    """Messages about the session (not the conversation) go to stderr, in brackets."""
    sys.stdout.flush()
    _write(f"[{text}]\n", sys.stderr)


class Chat:
    def __init__(self, cfg: ChatConfig):
        from lmforge.generate.sampling import model_stop_ids
        from lmforge.model.causal import load_causal_lm
        from lmforge.model.hub import resolve_model
        from lmforge.tasks.sft import setup_chat
        from lmforge.tokenizer.bpe import load_tokenizer

        if not cfg.model:
            raise LmforgeError("--model is required")
        self.cfg = cfg
        path = resolve_model(cfg.model, head="causal LM")
        self.tokenizer = load_tokenizer(path)
        self.model = load_causal_lm(path).eval()
        # What serve stops a chat turn on: the template's end-of-turn token, the tokenizer's EOS and those of
        # generation_config.json (Llama 3.1 names <|eom_id|> only there).
        self.stop_ids = model_stop_ids(self.tokenizer, path, chat=True)
        setup_chat(self.tokenizer)  # the model's chat template (or lmforge's default); fails here if it cannot
        model_window = int(getattr(self.model, "max_seq_len", None) or 2048)
        self.window = min(model_window, cfg.context) if cfg.context else model_window
        # Room kept for the reply: the conversation may use the rest of the window.
        self.reply_room = min(cfg.max_new_tokens, max(1, self.window // 2))
        self.budget = self.window - self.reply_room
        if self.reply_room < cfg.max_new_tokens:
            _note(f"replies capped at {self.reply_room} tokens: the context window holds {self.window} tokens "
                  f"and the conversation needs room too")
        self.system = [{"role": "system", "content": cfg.system}] if cfg.system else []
        self.turns: list[dict] = []  # user / assistant messages, oldest first
        self.turn_count = 0
        self.told_dropped = False
        self.told_cut = False
        self.interactive = sys.stdin is not None and sys.stdin.isatty()
        if self.interactive:
            try:  # line editing and history for input()
                import readline  # noqa: F401
            except ImportError:
                pass

    # -------------------------------------------------------------------------------------- prompt

    def encode(self, messages: list[dict]) -> list[int]:
        from lmforge.tasks.sft import encode_prompt

        try:
            return encode_prompt(self.tokenizer, messages, limit=self.budget)
        except Exception as e:  # a template that rejects the conversation (e.g. no system role)
            if messages and messages[0]["role"] == "system":
                raise _SystemRejected() from e
            raise LmforgeError(f"the model's chat template rejects the conversation "
                               f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    def prompt_ids(self) -> list[int]:
        """Token ids of system + turns + the generation prompt, within the budget: the oldest turns go
        first; a single message too long for the window keeps its end."""
        while True:
            try:
                ids = self.encode(self.system + self.turns)
            except _SystemRejected:
                _note("the chat template does not accept a system message; it is sent as part of the first "
                      "user message instead")
                self._merge_system()
                continue
            if len(ids) <= self.budget:
                return ids
            # drop the oldest exchange: everything before the second user message
            users = [i for i, m in enumerate(self.turns) if m["role"] == "user"]
            if len(users) < 2:
                return self._cut_last_message()
            del self.turns[:users[1]]
            if not self.told_dropped:
                self.told_dropped = True
                _note(f"the conversation outgrew the {self.window}-token context window: dropping the oldest "
                      f"turns{' (the system message stays)' if self.system else ''}")

    def _merge_system(self) -> None:
        from lmforge.tasks.sft import merge_system

        merged = merge_system(self.system + self.turns)
        self.system = []
        if merged[0]["role"] != "system":  # else no user turn yet: the system message is dropped, as before
            self.turns = merged

    def _cut_last_message(self) -> list[int]:
        """Only the latest user message is left and it is still too long: keep its last tokens."""
        from lmforge.tasks.sft import encode_text

        last = self.turns[-1]
        overhead = len(self.encode(self.system + [{"role": "user", "content": ""}]))
        room = self.budget - overhead
        if room < 1:
            if self.system:  # the system message alone fills the window: it has to go
                _note(f"the system message does not fit in the {self.window}-token context window; "
                      f"continuing without it")
                self.system = []
                return self.prompt_ids()
            room = 1
        content_ids = encode_text(self.tokenizer, last["content"])
        keep = min(room, len(content_ids))
        while True:
            text = self.tokenizer.decode(content_ids[-keep:], skip_special_tokens=True)
            self.turns[-1] = {"role": "user", "content": text}
            ids = self.encode(self.system + self.turns)
            if len(ids) <= self.budget or keep <= 1:
                break
            keep -= max(1, (len(ids) - self.budget))  # decode/encode round trips may not be exact
        if not self.told_cut:
            self.told_cut = True
            _note(f"your message is too long for the {self.window}-token context window: only its last part "
                  f"was read")
        return ids[-self.budget:]

    # -------------------------------------------------------------------------------------- turns

    def reply(self, text: str) -> None:
        from lmforge.generate.sampling import StreamDecoder, generate_ids

        self.turns.append({"role": "user", "content": text})
        ids = self.prompt_ids()
        seed = None if self.cfg.seed is None else self.cfg.seed + self.turn_count
        self.turn_count += 1
        dec = StreamDecoder(self.tokenizer)
        _write(ASSISTANT_PROMPT)
        try:
            for token in generate_ids(self.model, ids, self.reply_room, self.cfg.temperature,
                                      self.cfg.top_k or None, self.cfg.top_p if self.cfg.top_p < 1 else None,
                                      self.stop_ids, seed, self.cfg.repetition_penalty):
                _write(dec.push(token))
        except KeyboardInterrupt:  # Ctrl-C mid-reply: keep what was said, back to the prompt
            _write(" [interrupted]")
        _write(dec.flush().replace("\ufffd", ""))  # what a cut-off multi-byte character left pending
        full = self.tokenizer.decode(dec.ids, skip_special_tokens=True)
        _write("\n")
        self.turns.append({"role": "assistant", "content": full.replace("\ufffd", "").strip()})

    def read(self) -> str | None:
        """The next line of input; None at the end of input."""
        if self.interactive:
            try:
                return input(USER_PROMPT)
            except EOFError:
                _write("\n")
                return None
        _write(USER_PROMPT)
        line = sys.stdin.readline() if sys.stdin is not None else ""
        if not line:
            _write("\n")
            return None
        line = line.rstrip("\r\n")
        _write(line + "\n")  # echo piped input so the transcript reads like a conversation
        return line

    def loop(self) -> int:
        if self.interactive:
            _note("type a message; /help for commands, /quit or Ctrl-D to leave")
        while True:
            line = self.read()
            if line is None:
                return 0
            text = line.strip()
            if not text:
                continue
            cmd = text.lower()
            if cmd in QUIT:
                return 0
            if cmd == "/reset":
                self.turns = []
                self.turn_count = 0
                self.system = [{"role": "system", "content": self.cfg.system}] if self.cfg.system else []
                _write("[conversation reset]\n")
                continue
            if cmd in ("/help", "/?"):
                _write(HELP + "\n")
                continue
            if cmd.startswith("/") and " " not in cmd and len(cmd) > 1:
                _write(f"[unknown command {text}; /help lists the commands]\n")
                continue
            self.reply(text)


class _SystemRejected(Exception):
    """The chat template raised on a conversation that starts with a system message (e.g. Gemma's)."""
