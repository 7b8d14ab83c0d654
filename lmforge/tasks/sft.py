"""Supervised fine-tuning of causal LMs (Llama-like, GPT-like) on chats or prompt/response pairs.

Every example is a conversation ({"messages": [{"role", "content"}, ...]}, see lmforge.data.labelled),
rendered with the tokenizer's chat template. The loss is on assistant tokens only, each assistant turn
including the end-of-turn token that closes it (so the model learns to stop); system and user tokens get
label -100. A template without a system role (Gemma) gets the system message in the first user turn, as
lmforge chat sends it. A tokenizer without a chat template gets one: ChatML when its vocabulary has
<|im_start|> and <|im_end|> (lmforge's own tokenizers, SmolLM2, Qwen), otherwise a plain "### User: /
### Assistant:" one (after BOS where the tokenizer writes one) whose assistant turns end with the EOS token.
The end-of-turn token becomes the tokenizer's EOS and the model's generation EOS, and the template is saved
with the tokenizer, so DIR/final chats out of the box.

Evaluation: mean per-token loss and perplexity on the assistant tokens, plus a few greedy sample replies.
"""
from __future__ import annotations


import torch

from lmforge.data.labelled import Loaded
from lmforge.errors import LmforgeError
from lmforge.evaluate.metrics import perplexity
from lmforge.tasks.base import EvalResult, Task, dtype_kw, load_pretrained, pad_batch
from lmforge.tokenizer.bpe import DEFAULT_CHAT_TEMPLATE
from lmforge.train.common import sharded_generation

CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
EVAL_TOKENS_PER_BATCH = 32_768  # padded tokens per loss batch: bounds the (B, T, vocab) logits


# ------------------------------------------------------------------------------------------ templates

def plain_chat_template(eos_text: str, bos: bool = False) -> str:
    """A template for tokenizers without one: '### User:' / '### Assistant:' blocks, assistant turns ending
    with `eos_text` (written into the template, so the saved template keeps working if EOS changes); with
    `bos`, the text starts with the BOS token."""
    eos = eos_text.replace("\\", "\\\\").replace("'", "\\'")
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
        "{% else %}{{ '### Assistant:\n' + message['content'] + '" + eos + "' + '\n\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
    )


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat template's text for `messages` (never token ids: transformers 5 returns a BatchEncoding)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def merge_system(messages: list[dict]) -> list[dict]:
    """`messages` with a leading system message written into the first user message instead, as lmforge chat
    sends it to templates without a system role (Gemma), so training and inference prompts agree."""
    if len(messages) < 2 or messages[0]["role"] != "system" or messages[1]["role"] != "user":
        return messages
    merged = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [merged] + messages[2:]


def render_accepted(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> tuple[str, list[dict]]:
    """(the template's text, the messages it rendered): `messages`, or where the template rejects those, the
    system message merged into the first user turn (merge_system). A conversation it rejects either way is a
    LmforgeError naming the template's complaint."""
    try:
        return render(tokenizer, messages, add_generation_prompt), messages
    except Exception as e:  # jinja2's TemplateError from raise_exception, or whatever else the template trips on
        error = e
    merged = merge_system(messages)
    if merged is not messages:
        try:
            return render(tokenizer, merged, add_generation_prompt), merged
        except Exception as e:
            error = e
    detail = str(error).splitlines()[0] if str(error) else ""
    raise LmforgeError(f"the chat template rejects the conversation ({type(error).__name__}: {detail})")


def encode_text(tokenizer, text: str, offsets: bool = False):
    """Token ids of already-templated text (the template writes BOS itself where it wants one)."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)
    return (list(enc["input_ids"]), list(enc["offset_mapping"])) if offsets else list(enc["input_ids"])


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    for idx, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(idx))
    return ids


def special_texts(tokenizer) -> set[str]:
    """The texts of the tokenizer's special tokens (those _special_ids counts), as chat content would spell them."""
    return {t for t in tokenizer.convert_ids_to_tokens(sorted(_special_ids(tokenizer))) if t}


def _turn_closer(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant reply, or None where the template
    writes none (plain text or nothing follows) or rejects the probe chat."""
    probe = "lmforge probe reply"
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    except Exception:  # templates may reject odd conversations
        return None
    at = text.rfind(probe)
    if at < 0:
        return None
    special = _special_ids(tokenizer)
    for t in encode_text(tokenizer, text[at + len(probe):]):
        if t in special:
            return t
        if tokenizer.decode([t]).strip():
            break  # plain text after the reply before any special token: the template has no end token
    return None


def detect_end_of_turn(tokenizer) -> str | None:
    """The token the chat template closes an assistant turn with: the first special token after the reply
    (<|im_end|> for ChatML, <|eot_id|> for Llama 3, </s> for Mistral, <end_of_turn> for Gemma); EOS when
    the template writes none (fine-tuning then closes each reply with EOS itself: _close_turns)."""
    closer = _turn_closer(tokenizer)
    return tokenizer.eos_token if closer is None else tokenizer.convert_ids_to_tokens(closer)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer starts text with BOS by default (Llama 2, Mistral): the model was trained with it,
    but encode_text leaves special tokens to the template."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("x")["input_ids"][:1] == [bos]


def setup_chat(tokenizer, install_template: bool = True) -> dict:
    """Give `tokenizer` a chat template (if it has none and `install_template`), a pad token, and the
    end-of-turn token as its EOS. Returns {"chat_template", "end_of_turn", "eos_token", "pad_token"}."""
    vocab = tokenizer.get_vocab()
    original_eos = tokenizer.eos_token
    if not tokenizer.chat_template and install_template:
        if all(t in vocab for t in CHATML_TOKENS):
            tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
        else:
            if original_eos is None:
                raise LmforgeError("the tokenizer has no chat template and no EOS token to end replies with; "
                                   "use a tokenizer with a chat template (or an EOS token)")
            tokenizer.chat_template = plain_chat_template(original_eos, bos=adds_bos(tokenizer))
    eot = detect_end_of_turn(tokenizer) if tokenizer.chat_template else original_eos
    if eot is None:
        raise LmforgeError("the tokenizer has no EOS token, and its chat template ends replies with no special "
                           "token: generation would never stop")
    if tokenizer.pad_token is None:
        # pad with the original EOS (distinct from the end of turn where possible); padding is masked anyway
        tokenizer.pad_token = original_eos if original_eos is not None else eot
    if tokenizer.eos_token != eot:
        tokenizer.eos_token = eot
    return {"chat_template": tokenizer.chat_template, "end_of_turn": eot, "eos_token": tokenizer.eos_token,
            "pad_token": tokenizer.pad_token}


def rejects_system(tokenizer) -> bool:
    """Whether the chat template refuses a system message, which then goes into the first user turn."""
    probe = [{"role": "system", "content": "lmforge probe"}, {"role": "user", "content": "hi"}]
    try:
        return render_accepted(tokenizer, probe)[1] is not probe
    except LmforgeError:  # it refuses the merged conversation too: each row's error says so
        return False


def reply_opening(tokenizer) -> tuple[str, bool] | None:
    """(what the chat template writes between the generation prompt and a reply, whether the generation prompt
    writes anything), from a one-question probe: (' ', False) for Llama 2's '[/INST]' then ' reply', ('', True)
    for ChatML. None where the template rejects the probe or its prompt is not where the probe chat starts."""
    user = [{"role": "user", "content": "lmforge probe question"}]
    probe = "lmforge probe reply"
    try:
        prompt = render(tokenizer, user, add_generation_prompt=True)
        bare = render(tokenizer, user)
        chat = render(tokenizer, user + [{"role": "assistant", "content": probe}])
    except Exception:  # a template that rejects the probe: the rows' own rendering reports any problem
        return None
    at = chat.find(probe)
    if not chat.startswith(prompt) or at < len(prompt):
        return None
    return chat[len(prompt):at], prompt != bare


def check_generation_prompt(tokenizer) -> None:
    """Refuse a template whose assistant turns open with a header that add_generation_prompt does not write:
    the header would be labelled as part of every reply, and a served model, prompted without it, would have
    to write it itself. Llama 2 (nothing but a space between '[/INST]' and the reply) and Qwen3 (whose
    generation prompt writes the '<think>' block) pass."""
    found = reply_opening(tokenizer)
    if found is not None and found[0].strip() and not found[1]:
        raise LmforgeError(f"the chat template writes no generation prompt (add_generation_prompt adds nothing) "
                           f"while its assistant turns start with {found[0]!r}: that header would be trained as "
                           f"part of every reply; use a chat template that writes it when add_generation_prompt "
                           f"is set")


def end_token_ids(tokenizer, model=None, end_of_turn: str | None = None) -> list[int]:
    """Ids generation stops on: the end-of-turn token first, then the tokenizer's and the model's EOS."""
    ids: list[int] = []

    def add(t):
        for x in (t if isinstance(t, (list, tuple)) else [t]):
            if x is not None and int(x) not in ids:
                ids.append(int(x))

    if end_of_turn is not None:
        add(tokenizer.convert_tokens_to_ids(end_of_turn))
    add(tokenizer.eos_token_id)
    gen = getattr(model, "generation_config", None) if model is not None else None
    if gen is not None:
        add(gen.eos_token_id)
    return ids


def configure_generation(model, tokenizer, end_ids: list[int]) -> None:
    """Make the model's generation config (saved with DIR/final) stop at the end of a turn and pad properly."""
    pad = tokenizer.pad_token_id
    model.config.pad_token_id = pad
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.eos_token_id = end_ids[0] if len(end_ids) == 1 else list(end_ids)
        gen.pad_token_id = pad


def load_causal(path, dtype=None):
    """AutoModelForCausalLM in float32 unless told otherwise (AdamW wants float32 master weights)."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, **dtype_kw(dtype or torch.float32))


# ------------------------------------------------------------------------------------------ masking

def _token_spans_by_offsets(offsets, start_c: int, end_c: int) -> tuple[int, int]:
    """Token index range [a, b) of the tokens overlapping characters [start_c, end_c)."""
    a = next((k for k, (s, e) in enumerate(offsets) if e > start_c), len(offsets))
    b = next((k for k, (s, e) in enumerate(offsets) if s >= end_c), len(offsets))
    return a, max(a, b)


REPLY_MARK = "lmforge-reply-marker"


def _reply_chars(tokenizer, messages: list[dict], i: int, upto: str) -> tuple[int, int] | None:
    """Characters [start, end) of assistant turn i as rendered in `upto` (the chat through that turn): what lies
    between the text the template writes before and after a marker reply. Searching for the reply's words
    instead can find them in a user turn ('Answer yes or no.' for the reply 'yes') or in the end-of-turn
    token ('s' in '</s>'). None where the template renders the rest of the chat differently for the marker."""
    try:
        marked = render(tokenizer, messages[:i] + [{"role": "assistant", "content": REPLY_MARK}])
    except Exception:  # a template that rejects the probe: the caller searches for the reply instead
        return None
    at = marked.find(REPLY_MARK)
    if at < 0:
        return None
    before, after = marked[:at], marked[at + len(REPLY_MARK):]
    if not (upto.startswith(before) and upto.endswith(after) and len(before) + len(after) < len(upto)):
        return None
    # the turn starts where the generation prompt ends: Mistral's ' ' before the reply is the model's to write
    opening = (reply_opening(tokenizer) or ("", True))[0]
    start = len(before) - len(opening) if before.endswith(opening) else len(before)
    return start, len(upto) - len(after)


def _find_reply(tokenizer, messages: list[dict], i: int, upto: str, text: str, search_from: int,
                prefix: str) -> tuple[int, int]:
    """Characters [start, end) of assistant turn i's reply (without what the template writes after it) in
    `text`, the whole chat."""
    found = _reply_chars(tokenizer, messages, i, upto) if text.startswith(upto) else None
    if found is not None:
        return found
    start = text.find(messages[i]["content"], max(search_from, len(prefix) if text.startswith(prefix) else 0))
    if start < 0:
        raise LmforgeError("the chat template does not reproduce an assistant reply verbatim; cannot tell which "
                           "tokens to train on")
    return start, start + len(messages[i]["content"])


def assistant_spans(tokenizer, messages: list[dict], ids: list[int], text: str) -> tuple[list[tuple[int, int]], bool]:
    """(token ranges [a, b) of each assistant turn within `ids` (the tokens of `text`, the rendered chat),
    whether every range was found exactly).

    For assistant turn i, the tokens of template(messages[:i], add_generation_prompt) and of
    template(messages[:i+1]) must be prefixes of the whole; the turn is what lies between. Where that does
    not hold (templates that rewrite earlier turns; a reply whose leading whitespace merges into one token
    with the template's newline; Mistral v0.3, whose prompt for a turn has the system message that the
    chat leaves out) the range comes from character offsets instead, and is not exact."""
    spans = []
    offsets = None
    exact = True
    search_from = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        try:
            prefix = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        except Exception:  # e.g. a template that rejects a conversation not starting with a user turn
            prefix = ""
        upto = render(tokenizer, messages[:i + 1])
        p_ids, u_ids = encode_text(tokenizer, prefix), encode_text(tokenizer, upto)
        if len(u_ids) > len(p_ids) and ids[:len(u_ids)] == u_ids and ids[:len(p_ids)] == p_ids:
            spans.append((len(p_ids), len(u_ids)))
            search_from = len(upto)
            continue
        exact = False
        if offsets is None:
            _, offsets = encode_text(tokenizer, text, offsets=True)
        if prefix and text.startswith(prefix) and text.startswith(upto) and len(upto) > len(prefix):
            start_c, end_c = len(prefix), len(upto)
            reply_only = False
        else:
            start_c, end_c = _find_reply(tokenizer, messages, i, upto, text, search_from, prefix)
            reply_only = True
        a, b = _token_spans_by_offsets(offsets, start_c, end_c)
        if reply_only and b < len(ids):
            # the reply alone: take the end-of-turn token right after it (past whitespace) as well, if the
            # template wrote one in this turn (not the next turn's opening token)
            turn_end = len(upto) if text.startswith(upto) else len(text)
            k = b
            while k < len(ids) and not tokenizer.decode([ids[k]]).strip():
                k += 1
            if k < len(ids) and ids[k] in _special_ids(tokenizer) and offsets[k][0] < turn_end:
                b = k + 1
        spans.append((a, b))
        search_from = end_c
    return spans, exact


def _extend(tokenizer, built: list[int], done: int, text: str) -> list[int]:
    """Tokens of `text`, whose first `done` characters are already tokenized as `built`: the whole text's tokens
    where they start with `built`, else `built` and then the rest's own tokens."""
    whole = encode_text(tokenizer, text)
    if whole[:len(built)] == built:
        return whole
    return built + encode_text(tokenizer, text[done:])


def _turnwise(tokenizer, messages: list[dict], text: str) -> tuple[list[int], list[tuple[int, int]], int] | None:
    """(ids, assistant spans, characters of `text` covered) of `text` (starting with the rendered `messages`),
    tokenized turn by turn: each reply's prompt is template(messages[:i], add_generation_prompt) continued
    from the turns before as they were tokenized, then the reply. None where the pieces do not join up."""
    built: list[int] = []
    spans = []
    done = 0  # characters of `text` covered so far
    specials = _special_ids(tokenizer)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            return None
        try:
            prefix = render(tokenizer, messages[:i], add_generation_prompt=True)
            upto = render(tokenizer, messages[:i + 1])
        except Exception:  # a template that rejects a partial conversation: no turn-by-turn tokens
            return None
        if not (text.startswith(prefix) and text.startswith(upto) and done <= len(prefix) < len(upto)):
            return None
        prompt = _extend(tokenizer, built, done, prefix)
        built = _extend(tokenizer, prompt, len(prefix), upto)
        if len(built) <= len(prompt):
            return None
        done = len(upto)
        # what the template writes after the reply's end-of-turn token (ChatML's and the plain template's
        # newlines) is not the model's to write: it is tokenized with the next prompt, as in the whole text
        last = max((k for k in range(len(prompt), len(built)) if built[k] in specials), default=None)
        if last is not None and last + 1 < len(built):
            tail = tokenizer.decode(built[last + 1:])
            if tail and upto.endswith(tail) and len(upto) - len(tail) > len(prefix):
                built, done = built[:last + 1], len(upto) - len(tail)
        spans.append((len(prompt), len(built)))
    return built, spans, done


def turnwise_ids(tokenizer, messages: list[dict], text: str, ids: list[int]):
    """(ids, assistant spans) of the rendered chat `text`, tokenized turn by turn (_turnwise). For when the whole
    text's tokens run across a turn boundary: ChatML's 'assistant\n' and a reply starting with a newline or
    spaces (indented code) merge into one token, so the prompt a served model gets would never be seen in
    training. An earlier reply keeps its tokens in later turns' prompts, and encode_prompt gives inference the
    same ones. None where the pieces do not join up (a template that rewrites earlier turns, a tokenizer that
    spells a piece differently on its own)."""
    found = _turnwise(tokenizer, messages, text)
    if found is None:
        return None
    built, spans, done = found
    if done < len(text):
        built += encode_text(tokenizer, text[done:])
    if tokenizer.decode(built) != tokenizer.decode(ids):
        return None
    return built, spans


def _replies_aligned(messages: list[dict], text: str, offsets) -> bool:
    """Whether every assistant reply in `text` starts and ends on a token boundary of its whole-text tokens
    (`offsets`): then turn-by-turn tokens are the whole text's, with no prefix to re-encode. Every message is
    found in order, so that a reply is not matched inside the user turn before it; a reply starting with
    whitespace (the case that merges with the template's newline, and could be found at that newline) is never
    taken as aligned."""
    starts = {s for s, _ in offsets}
    ends = {e for _, e in offsets}
    at = 0
    for m in messages:
        content = m["content"]
        if not isinstance(content, str) or not content:
            continue
        found = text.find(content, at)
        if found < 0:
            return False
        at = found + len(content)
        if m["role"] == "assistant" and (content[0].isspace() or found not in starts or at not in ends):
            return False
    return True


def encode_prompt(tokenizer, messages: list[dict], limit: int | None = None) -> list[int]:
    """Token ids of template(messages, add_generation_prompt), as fine-tuning tokenized the prompt for a reply:
    the earlier replies keep the tokens they were trained (and generated) as, where tokenizing the whole text
    at once would merge a reply's leading whitespace into the template's newline; and where the template ends
    a reply with no special token, each earlier reply is closed with EOS, as training closed it. `messages` as
    the template accepts them (render_accepted). Used by predict, chat and serve so that a later turn's prompt
    is one the model saw in training. A prompt of more than `limit` tokens (one the caller refuses or cuts
    anyway) is tokenized whole: turn by turn costs an encoding per turn."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    whole, offsets = encode_text(tokenizer, text, offsets=True)
    if not any(m["role"] == "assistant" for m in messages) or (limit is not None and len(whole) > limit):
        return whole
    ids, spans = whole, None
    if not _replies_aligned(messages, text, offsets):
        found = _turnwise(tokenizer, messages, text)
        if found is not None:
            built, spans, done = found
            ids = _extend(tokenizer, built, done, text)
    if tokenizer.eos_token_id is None or _turn_closer(tokenizer) is not None:
        return ids
    if spans is None:
        spans, _ = assistant_spans(tokenizer, messages, ids, text)
    return _close_turns(tokenizer, ids, spans, tokenizer.eos_token_id)[0]


def _close_turns(tokenizer, ids: list[int], spans: list[tuple[int, int]],
                 end_id: int) -> tuple[list[int], list[tuple[int, int]]]:
    """(`ids` with every assistant turn in `spans` ending at `end_id`, the turns' new token ranges). A turn
    ends at its last `end_id` (what follows, a newline, is template); a turn without one (a template that
    writes no end token) loses its trailing whitespace tokens to the template and gets `end_id` appended, so
    the model learns to stop."""
    out: list[int] = []
    turns = []
    pos = 0
    for a, b in spans:
        a = max(a, pos)
        out += ids[pos:a]
        seg = ids[a:b]
        ends = [k for k, t in enumerate(seg) if t == end_id]
        if ends:
            cut = ends[-1] + 1
            closed = seg[:cut]
        else:
            cut = len(seg)
            while cut > 1 and not tokenizer.decode([seg[cut - 1]]).strip():
                cut -= 1
            closed = seg[:cut] + [end_id]
        turns.append((len(out), len(out) + len(closed)))
        out += closed + seg[cut:]
        pos = b
    return out + ids[pos:], turns


def encode_conversation(tokenizer, messages: list[dict], end_id: int, max_length: int | None = None) -> dict | None:
    """{"input_ids", "attention_mask", "labels"} with labels only on assistant tokens, each assistant turn
    ending with `end_id` (appended where the template did not write it). None when truncation to
    `max_length` leaves no assistant token."""
    text, messages = render_accepted(tokenizer, messages)
    ids = encode_text(tokenizer, text)
    spans, exact = assistant_spans(tokenizer, messages, ids, text)
    if not exact:
        ids, spans = turnwise_ids(tokenizer, messages, text, ids) or (ids, spans)
    ids, turns = _close_turns(tokenizer, ids, spans, end_id)
    labels = [-100] * len(ids)
    for a, b in turns:
        labels[a:b] = ids[a:b]
    if max_length:
        ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def split_for_generation(messages: list[dict]) -> tuple[list[dict], str]:
    """(the conversation before the last assistant turn, that turn's content)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


# ------------------------------------------------------------------------------------------ the loss

def can_mask_logits(model) -> bool:
    """Whether `model` projects onto the vocabulary only where a boolean (B, T) `logits_to_keep` says
    (transformers' causal LMs in recent 5.x releases); a 2-token probe."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=device),
                        logits_to_keep=torch.tensor([[True, False]], device=device))
        return tuple(out.logits.shape[:-1]) == (1,)
    except (TypeError, ValueError, IndexError, RuntimeError):  # no such argument, or it slices differently
        return False
    finally:
        model.train(was_training)


def labelled_tokens(labels: torch.Tensor, shifted: bool) -> int:
    """The targets a token loss averages over: labels (B, T) other than -100, after the next-token shift of a
    decoder (the first position predicts nothing)."""
    return int((labels[:, 1:] != -100).sum() if shifted else (labels != -100).sum())


def causal_lm_loss(model, batch: dict[str, torch.Tensor], mask_logits: bool) -> torch.Tensor:
    """Mean next-token cross-entropy over the labelled positions, with the vocabulary projection computed only
    there when `mask_logits` (see can_mask_logits); the same value as the model's own loss.

    SFT and prompted translation label only the replies (in lmforge_chat about one token in ten), and the
    (B, T, vocab) logits of all the other positions are a large part of a small model's step on a CPU:
    SmolLM2-135M LoRA steps ran 1.07x faster with them skipped (1.30x without tcmalloc; bench/sft_logits.py)."""
    labels = batch["labels"]
    keep = torch.zeros_like(labels, dtype=torch.bool)  # (B, T): position t is scored on token t + 1
    keep[:, :-1] = labels[:, 1:] != -100
    targets = labels[:, 1:][keep[:, :-1]]  # (N,)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if mask_logits:
        logits = model(**inputs, logits_to_keep=keep).logits  # (N, V)
    else:
        logits = model(**inputs).logits[keep]  # (B, T, V) -> (N, V)
    return torch.nn.functional.cross_entropy(logits.float(), targets)


# ------------------------------------------------------------------------------------------ generation

def _generate_kwargs(tokenizer, end_ids: list[int], max_new_tokens: int, num_beams: int = 1) -> dict:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    return dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False, eos_token_id=end_ids,
                pad_token_id=pad, temperature=None, top_p=None, top_k=None)


@torch.no_grad()
def generate_batch(model, tokenizer, prompts: list[list[int]], end_ids: list[int], max_new_tokens: int,
                   num_beams: int = 1, batch_size: int = 16, autocast_ctx=None) -> list[list[int]]:
    """Greedy (or beam) continuations of decoder-only `prompts` (token ids), left-padded in batches of
    similar length; each result stops before the first end token."""
    import contextlib

    ctx = autocast_ctx or contextlib.nullcontext
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_ids[0]
    kw = _generate_kwargs(tokenizer, end_ids, max_new_tokens, num_beams)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    stop = set(end_ids)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        T = max(len(prompts[i]) for i in idx)
        ids = torch.tensor([[pad] * (T - len(prompts[i])) + list(prompts[i]) for i in idx], device=device)
        mask = torch.tensor([[0] * (T - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        with ctx(), sharded_generation(model) as synced:
            gen = model.generate(input_ids=ids, attention_mask=mask, synced_gpus=synced, **kw)
        for row, i in zip(gen[:, T:].tolist(), idx):
            new = []
            for t in row:
                if t in stop:
                    break
                new.append(t)
            out[i] = new
    return out


def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 256,
                     num_beams: int = 1, batch_size: int = 16) -> list[str]:
    """The model's (greedy) next assistant reply to each conversation, in batches, for `lmforge predict`."""
    model.eval()
    end_ids = end_token_ids(tokenizer, model, detect_end_of_turn(tokenizer))
    prompts = [encode_prompt(tokenizer, render_accepted(tokenizer, m, add_generation_prompt=True)[1])
               for m in conversations]
    outs = generate_batch(model, tokenizer, prompts, end_ids, max_new_tokens, num_beams, batch_size=batch_size)
    return [tokenizer.decode(new, skip_special_tokens=True).strip() for new in outs]


# ------------------------------------------------------------------------------------------ the task

def sum_token_loss(model, feats: list[dict], collate, autocast_ctx, device, batch_size: int,
                   mask_logits: bool) -> tuple[float, int]:
    """(total cross-entropy in nats, number of predicted tokens) over `feats` with "labels"."""
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    total, count = 0.0, 0
    s = 0
    while s < len(order):
        T = len(feats[order[s]]["input_ids"])
        n = 1
        # sorted ascending: grow the batch while its longest row keeps the padded size within budget
        while (s + n < len(order) and n < batch_size
               and (n + 1) * len(feats[order[s + n]]["input_ids"]) <= max(EVAL_TOKENS_PER_BATCH, T)):
            n += 1
        batch = {k: v.to(device) for k, v in collate([feats[i] for i in order[s:s + n]]).items()}
        s += n
        k = int((batch["labels"][:, 1:] != -100).sum())
        if k == 0:
            continue
        with autocast_ctx():
            loss = causal_lm_loss(model, batch, mask_logits)
        total += float(loss.float()) * k
        count += k
    return total, count


class SFTTask(Task):
    name = "sft"
    auto_class = "AutoModelForCausalLM"
    peft_task_type = "CAUSAL_LM"
    metric = "loss"
    greater_is_better = False
    default_max_length = 512
    default_lr = 5e-5
    default_lora_lr = 5e-4
    default_batch_size = 8

    def __init__(self, cfg):
        super().__init__(cfg)
        self.chat: dict = {}
        self.dropped: dict[str, int] = {}  # source -> examples dropped because truncation left no reply
        self.mask_logits = False  # set by load_model: see causal_lm_loss

    def fields(self):
        return {"messages": self.cfg.messages_field, "prompt": self.cfg.prompt_field,
                "input": self.cfg.input_field, "response": self.cfg.response_field}

    def prepare(self, tokenizer, train: Loaded, others: dict[str, Loaded]) -> None:
        super().prepare(tokenizer, train, others)
        self.chat = setup_chat(tokenizer)
        self.end_id = tokenizer.convert_tokens_to_ids(self.chat["end_of_turn"])
        check_generation_prompt(tokenizer)
        if any(row["messages"][0]["role"] == "system" for row in train.rows) and rejects_system(tokenizer):
            print("the chat template does not accept a system message; it is sent as part of the first user "
                  "message instead", flush=True)

    def end_ids(self, model=None) -> list[int]:
        return end_token_ids(self.tokenizer, model, self.chat["end_of_turn"])

    def attach(self, path, tokenizer, extras: dict):
        self.tokenizer = tokenizer
        self.chat = setup_chat(tokenizer)
        self.end_id = tokenizer.convert_tokens_to_ids(self.chat["end_of_turn"])
        return self.load_model(path)

    def load_model(self, path, dtype=None):
        model = load_causal(path, dtype)
        configure_generation(model, self.tokenizer, self.end_ids(model))
        self.mask_logits = can_mask_logits(model)
        return model

    def loss(self, model, batch):
        return causal_lm_loss(model, batch, self.mask_logits)

    def loss_items(self, batch):
        return labelled_tokens(batch["labels"], shifted=True)

    def features(self, loaded: Loaded, train: bool) -> list[dict]:
        feats = []
        for k, row in enumerate(loaded.rows):
            try:
                f = encode_conversation(self.tokenizer, row["messages"], self.end_id, self.max_length)
            except LmforgeError as e:
                raise LmforgeError(f"{loaded.loc(k)}: {e}") from None
            if f is not None:
                feats.append(f)
        dropped = len(loaded.rows) - len(feats)
        first = loaded.source not in self.dropped  # evaluation rebuilds features: say it once per data set
        self.dropped[loaded.source] = dropped
        if dropped and first:
            print(f"{loaded.source}: {dropped} of {len(loaded.rows)} examples dropped: their assistant reply "
                  f"starts after --max-length {self.max_length} tokens", flush=True)
        if not feats:
            raise LmforgeError(f"{loaded.source}: no example has an assistant reply within --max-length "
                               f"{self.max_length} tokens; raise --max-length")
        return feats

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        return pad_batch(feats, {"input_ids": self.tokenizer.pad_token_id, "attention_mask": 0, "labels": -100},
                         self.pad_multiple)

    @torch.no_grad()
    def evaluate(self, model, loaded: Loaded, autocast_ctx, device, batch_size: int) -> EvalResult:
        feats = self.features(loaded, train=False)
        total, count = sum_token_loss(model, feats, self.collate, autocast_ctx, device, batch_size, self.mask_logits)
        loss = total / count if count else float("nan")
        metrics = {"loss": loss, "perplexity": perplexity(loss) if count else float("nan"), "tokens": count,
                   "n": len(feats)}
        preds = []
        samples = loaded.rows[:max(0, self.cfg.eval_samples)]
        if samples:
            end_ids = self.end_ids(model)
            prompts, refs, shown = [], [], []
            for row in samples:
                context, reference = split_for_generation(row["messages"])
                _, context = render_accepted(self.tokenizer, context, add_generation_prompt=True)
                ids = encode_prompt(self.tokenizer, context)
                prompts.append(ids[-self.max_length:])
                refs.append(reference)
                shown.append(next((m["content"] for m in reversed(context) if m["role"] != "assistant"), ""))
            outs = generate_batch(model, self.tokenizer, prompts, end_ids, self.cfg.max_new_tokens,
                                  batch_size=len(prompts), autocast_ctx=autocast_ctx)
            for prompt, ref, new in zip(shown, refs, outs):
                preds.append({"prompt": prompt, "reference": ref,
                              "generated": self.tokenizer.decode(new, skip_special_tokens=True).strip()})
        return EvalResult(metrics, preds)

    def config_extras(self) -> dict:
        return {"chat_template": self.chat.get("chat_template"), "end_of_turn": self.chat.get("end_of_turn"),
                "eos_token": self.chat.get("eos_token")}
