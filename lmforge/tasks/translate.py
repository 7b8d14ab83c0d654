"""Machine translation with an encoder-decoder (T5, Marian, BART, NLLB, mBART-50, M2M100: AutoModelForSeq2SeqLM)
or a decoder-only model (Llama, SmolLM2, GPT-2: AutoModelForCausalLM), scored with sacreBLEU's BLEU and chrF.

Encoder-decoder: source -> encoder, target -> labels (T5 gets its "translate English to Spanish: " prefix).
Multilingual ones (NLLB, mBART-50, M2M100) take language codes instead: the tokenizer's src_lang/tgt_lang mark
the source and the labels (eng_Latn / en_XX / __en__), and generation forces the target's code first.
Decoder-only: the source becomes a prompt, the target its continuation, and the loss is on the target (and
the end token that closes it) only. The prompt is, in order of preference, --prompt-template, the tokenizer's
chat template (a user turn "Translate from English to Spanish:\\n{source}", the target as the reply), or
"Translate {source_lang} to {target_lang}:\\n{source}\\n{target_lang}:" followed by " target<eos>".
Evaluation generates greedily (or with --num-beams) and works before any training (zero-shot BLEU).
"""
from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.data.labelled import Loaded
from lmforge.errors import LmforgeError
from lmforge.evaluate.task_metrics import translation_metrics
from lmforge.tasks.base import EvalResult, Task, dtype_kw, load_pretrained, pad_batch
from lmforge.tasks.sft import (can_mask_logits, causal_lm_loss, configure_generation, encode_conversation,
                               encode_text, end_token_ids, generate_batch, labelled_tokens, load_causal, render,
                               setup_chat)
from lmforge.train.common import sharded_generation

LANGUAGES = {
    "ar": "Arabic", "bg": "Bulgarian", "bn": "Bengali", "ca": "Catalan", "cs": "Czech", "da": "Danish",
    "de": "German", "el": "Greek", "en": "English", "es": "Spanish", "et": "Estonian", "eu": "Basque",
    "fa": "Persian", "fi": "Finnish", "fr": "French", "ga": "Irish", "gl": "Galician", "he": "Hebrew",
    "hi": "Hindi", "hr": "Croatian", "hu": "Hungarian", "id": "Indonesian", "is": "Icelandic", "it": "Italian",
    "ja": "Japanese", "ko": "Korean", "la": "Latin", "lo": "Lao", "lt": "Lithuanian", "lv": "Latvian",
    "ms": "Malay", "nl": "Dutch", "no": "Norwegian", "pl": "Polish", "pt": "Portuguese", "ro": "Romanian",
    "ru": "Russian", "sk": "Slovak", "sl": "Slovenian", "sr": "Serbian", "sv": "Swedish", "sw": "Swahili",
    "ta": "Tamil", "th": "Thai", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu",
    "vi": "Vietnamese", "zh": "Chinese",
}
# ISO 639-3 codes of LANGUAGES, which NLLB's FLORES-200 codes begin with (spa_Latn). Where NLLB codes one variety
# of a macrolanguage (Standard Arabic arb, Iranian Persian pes, Standard Malay zsm, Bokmål nob...), that comes first.
ISO639_3 = {
    "ar": ("arb", "ara"), "bg": ("bul",), "bn": ("ben",), "ca": ("cat",), "cs": ("ces",), "da": ("dan",),
    "de": ("deu",), "el": ("ell",), "en": ("eng",), "es": ("spa",), "et": ("est", "ekk"), "eu": ("eus",),
    "fa": ("pes", "fas", "prs"), "fi": ("fin",), "fr": ("fra",), "ga": ("gle",), "gl": ("glg",), "he": ("heb",),
    "hi": ("hin",), "hr": ("hrv",), "hu": ("hun",), "id": ("ind",), "is": ("isl",), "it": ("ita",), "ja": ("jpn",),
    "ko": ("kor",), "la": ("lat",), "lo": ("lao",), "lt": ("lit",), "lv": ("lvs", "lav"), "ms": ("zsm", "msa"),
    "nl": ("nld",), "no": ("nob", "nor", "nno"), "pl": ("pol",), "pt": ("por",), "ro": ("ron",), "ru": ("rus",),
    "sk": ("slk",), "sl": ("slv",), "sr": ("srp",), "sv": ("swe",), "sw": ("swh", "swa"), "ta": ("tam",),
    "th": ("tha",), "tl": ("tgl",), "tr": ("tur",), "uk": ("ukr",), "ur": ("urd",), "vi": ("vie",),
    "zh": ("zho", "cmn"),
}
_FROM_ISO639_3 = {three: two for two, threes in ISO639_3.items() for three in threes}
DEFAULT_TEMPLATE = "Translate {source_lang} to {target_lang}:\n{source}\n{target_lang}:"
CHAT_INSTRUCTION = "Translate from {source_lang} to {target_lang}:\n{source}"
_CODE = re.compile(r"^([a-z]{2,3})(?:[-_][A-Za-z0-9]+)*$")


def language_name(code_or_name: str | None, fallback: str) -> str:
    """'es' / 'es-MX' / 'spa_Latn' / 'spanish' -> 'Spanish'; unknown field names are shown as they are."""
    if not code_or_name:
        return fallback
    text = str(code_or_name)
    code = _lang_code(text)
    if code is not None:
        return LANGUAGES[code]
    return text if text.lower() not in ("source", "target", "src", "tgt") else fallback


def _lang_code(name_or_code: str | None) -> str | None:
    if not name_or_code:
        return None
    m = _CODE.match(str(name_or_code).lower())
    if m and m.group(1) in LANGUAGES:
        return m.group(1)
    if m and m.group(1) in _FROM_ISO639_3:  # NLLB's spa_Latn, zho_Hans
        return _FROM_ISO639_3[m.group(1)]
    for code, name in LANGUAGES.items():
        if name.lower() == str(name_or_code).lower():
            return code
    return None


def bleu_tokenize(target_code: str | None) -> str | None:
    """sacrebleu's tokenizer for a target language, in any spelling (zh, zh-CN, zh_Hans): languages written
    without spaces would be one word per sentence to 13a, and BLEU 0 for every translation. Chinese: 'zh';
    Japanese: 'ja-mecab' where MeCab is installed, else characters; Thai and Lao: characters. None (13a)
    otherwise."""
    code = _lang_code(target_code)
    if code == "zh":
        return "zh"
    if code == "ja":
        import importlib.util

        return "ja-mecab" if importlib.util.find_spec("MeCab") and importlib.util.find_spec("ipadic") else "char"
    return "char" if code in ("th", "lo") else None


def read_model_config(path) -> dict | None:
    """config.json of a model folder (or an lmforge output folder's final/), else None."""
    if not path:
        return None
    p = Path(str(path)).expanduser()
    for folder in (p, p / "final"):
        f = folder / "config.json"
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, json.JSONDecodeError):
                return None
    return None


# Tokenizers that code languages as special tokens and read them from src_lang/tgt_lang (and their ...Fast twins,
# as transformers 4 named them)
_FAMILIES = {"MBart50Tokenizer": "mBART-50", "MBartTokenizer": "mBART", "NllbTokenizer": "NLLB",
             "M2M100Tokenizer": "M2M100"}
_NLLB_CODE = re.compile(r"^[a-z]{3}_[A-Z][a-z]{3}$")
_SCRIPT_OF_REGION = {"tw": "hant", "hk": "hant", "mo": "hant", "cn": "hans", "sg": "hans"}  # zh-TW: zho_Hant


def lang_family(tokenizer) -> str | None:
    """'NLLB', 'mBART-50', 'mBART' or 'M2M100' for a multilingual tokenizer (NLLB and M2M100 models are both
    model_type m2m_100, so the tokenizer tells them apart), else None."""
    for cls in type(tokenizer).__mro__:
        family = _FAMILIES.get(cls.__name__.removesuffix("Fast"))
        if family:
            return family
    return None


def _code_ids(tokenizer) -> dict[str, int]:
    """{code as src_lang takes it: id of its token}: eng_Latn, en_XX, or en for M2M100's __en__."""
    known = getattr(tokenizer, "lang_code_to_id", None)  # mBART, M2M100
    if known:
        return dict(known)
    # NLLB lists them as special tokens (a tokenizer.json that doesn't, has them in its vocabulary)
    codes = ([t for t in tokenizer.all_special_tokens if _NLLB_CODE.match(t)]
             or sorted(t for t in tokenizer.get_vocab() if _NLLB_CODE.match(t)))
    return dict(zip(codes, tokenizer.convert_tokens_to_ids(codes)))


@dataclass(frozen=True)
class LangCodes:
    """A multilingual model's source and target codes, as its tokenizer's src_lang/tgt_lang take them."""
    family: str
    source: str
    target: str
    target_id: int

    def set_on(self, tokenizer) -> None:
        """The tokenizer then puts the source's code in input ids and, for text_target, the target's in labels."""
        if tokenizer.src_lang != self.source:
            tokenizer.src_lang = self.source  # the setter rebuilds the post-processor: only when it changes
        tokenizer.tgt_lang = self.target

    def generation(self) -> dict[str, int]:
        """What tells the decoder the target language, for generate() and the saved generation config."""
        if self.family == "mBART":
            # mBART's labels end with the code, which its shift_tokens_right moves to the decoder's start
            return {"decoder_start_token_id": self.target_id}
        # NLLB, mBART-50, M2M100: labels begin with the code; the decoder starts with EOS (decoder_start_token_id)
        # and must be made to say the target's code next, or it writes whichever language it likes
        return {"forced_bos_token_id": self.target_id}


def _pick_code(family: str, codes: dict[str, int], lang: str, option: str | None) -> str:
    """The tokenizer's code for `lang`: one of its codes in any case (spa_latn), else the code of the language
    written in ISO 639 (es, es-MX, spa) or by name, picking the script or region given with it (zh-Hant)."""
    text = str(lang).strip()
    by_lower = {c.lower(): c for c in codes}
    m2m = re.fullmatch(r"__(.+)__", text)  # M2M100's token for the code
    for spelling in (text, m2m and m2m.group(1)):
        if spelling and spelling.lower() in by_lower:
            return by_lower[spelling.lower()]
    iso = _lang_code(text)
    if iso is not None:
        candidates = _codes_for(codes, iso)
        hints = set(re.split(r"[-_]", text.lower())[1:])
        hints |= {_SCRIPT_OF_REGION[h] for h in hints if h in _SCRIPT_OF_REGION}
        for c in candidates:
            if c.lower().split("_")[-1] in hints:
                return c
        if candidates:
            return candidates[0]
    common = [c for k in ("en", "fr", "de", "es", "zh", "ar", "hi", "ru") for c in _codes_for(codes, k)[:1]]
    examples = list(dict.fromkeys(common + list(codes)))[:6]
    what = f"{language_name(text, text)} ('{text}')" if iso else f"'{text}'"
    fix = f"; set {option} to one of its codes" if option else ""
    raise LmforgeError(f"the {family} tokenizer has no language code for {what}: it has {', '.join(examples)}"
                       f"{', ...' if len(codes) > len(examples) else ''} ({len(codes)} codes){fix}")


def _codes_for(codes: dict[str, int], iso: str) -> list[str]:
    """The codes of an ISO 639-1 language: es_XX, es, or NLLB's spa_Latn (zh: zho_Hans, zho_Hant)."""
    names = (iso, *ISO639_3.get(iso, ()))
    return [c for name in names for c in codes if c.split("_")[0].lower() == name]


def language_codes(tokenizer, source: str | None, target: str | None,
                   options: tuple[str, str] | None = None) -> LangCodes | None:
    """The codes of a multilingual seq2seq tokenizer (NLLB, mBART-50, mBART, M2M100) for `source` and `target`
    (ISO codes, names, or the tokenizer's own codes), or None for a tokenizer that has none (T5, Marian, BART).
    `options` name the settings that choose the languages (--source-lang, --target-lang), for the errors."""
    family = lang_family(tokenizer)
    if family is None:
        return None
    codes = _code_ids(tokenizer)
    if not codes:
        raise LmforgeError(f"the {family} tokenizer ({type(tokenizer).__name__}) has no language codes")
    roles = [("source", source, options and options[0]), ("target", target, options and options[1])]
    missing = [(role, option) for role, lang, option in roles if not lang]
    if missing:
        what = " and ".join(role for role, _ in missing)
        fix = " and ".join(option for _, option in missing if option)
        raise LmforgeError(f"{family} models need the {what} language{'s' if len(missing) > 1 else ''}: name the "
                           f"data's fields by language (such as en and es){f' or set {fix}' if fix else ''}")
    src, tgt = (_pick_code(family, codes, lang, option) for _, lang, option in roles)
    return LangCodes(family, src, tgt, codes[tgt])


class Prompter:
    """How sources become model inputs (and, with targets, training features), for one model/tokenizer.

    style: "seq2seq" (encoder input, T5 prefix), "chat" (the tokenizer's chat template) or "template".
    langs: a multilingual seq2seq model's language codes (seq2seq only)."""

    def __init__(self, tokenizer, style: str, source_name: str, target_name: str, template: str | None = None,
                 prefix: str = "", max_length: int = 128, end_ids: list[int] | None = None,
                 single_line: bool = True, langs: LangCodes | None = None):
        self.tok = tokenizer
        self.style = style
        self.langs = langs
        if langs is not None:
            langs.set_on(tokenizer)  # also what the saved tokenizer records
        self.source_name, self.target_name = source_name, target_name
        # a template typed on a command line has "\\n" where a line break is meant
        self.template = (template or DEFAULT_TEMPLATE).replace("\\n", "\n")
        self.prefix = prefix
        self.max_length = max_length
        self.end_ids = end_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        self.single_line = single_line
        if style == "template":
            try:
                self.template.format(source="x", source_lang="A", target_lang="B")  # validates the placeholders
            except (KeyError, IndexError, ValueError) as e:
                raise LmforgeError(f"--prompt-template {self.template!r}: {type(e).__name__}: {e} (use {{source}}, "
                                   "{source_lang} and {target_lang}; write literal braces as {{ and }})") from None
            if "{source}" not in self.template:
                raise LmforgeError(f"--prompt-template {self.template!r} has no {{source}}")

    # ---- text
    def clip(self, text: str) -> str:
        """`text` cut to max_length tokens (decoder-only prompts are built from text)."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        return text if len(ids) <= self.max_length else self.tok.decode(ids[:self.max_length])

    def _fill(self, pattern: str, source: str) -> str:
        return pattern.format(source=source, source_lang=self.source_name, target_lang=self.target_name)

    def _user(self, source: str) -> list[dict]:
        return [{"role": "user", "content": self._fill(CHAT_INSTRUCTION, self.clip(source))}]

    def _template_prompt_ids(self, source: str) -> list[int]:
        ids = list(self.tok(self._fill(self.template, self.clip(source)))["input_ids"])  # BOS where configured
        eos = self.tok.eos_token_id
        if ids and eos is not None and ids[-1] == eos and eos != self.tok.bos_token_id:
            ids = ids[:-1]  # a tokenizer that appends EOS would end the prompt before the answer
        return ids

    # ---- model inputs
    def prompt_ids(self, source: str) -> list[int]:
        """Decoder-only: the tokens the model continues with the translation."""
        if self.style == "chat":
            return encode_text(self.tok, render(self.tok, self._user(source), add_generation_prompt=True))
        return self._template_prompt_ids(source)

    def feature(self, source: str, target: str) -> dict | None:
        """Training feature with labels (None when nothing of the target survives truncation)."""
        if self.style == "seq2seq":
            if self.langs is not None:
                self.langs.set_on(self.tok)
            enc = self.tok(self.prefix + source, text_target=target, truncation=True, max_length=self.max_length)
            labels = list(enc["labels"])
            eos = self.tok.eos_token_id
            # (a multilingual tokenizer places EOS and the language code itself, mBART's code after EOS)
            if self.langs is None and eos is not None and (not labels or labels[-1] != eos):
                labels = labels[:self.max_length - 1] + [eos]  # the decoder must learn to stop
            return {"input_ids": list(enc["input_ids"]), "attention_mask": list(enc["attention_mask"]),
                    "labels": labels}
        target = self.clip(target)
        if self.style == "chat":
            msgs = self._user(source) + [{"role": "assistant", "content": target}]
            return encode_conversation(self.tok, msgs, self.end_ids[0])
        prompt = self._template_prompt_ids(source)
        sep = "" if self._fill(self.template, "x")[-1:].isspace() else " "
        answer = self.tok(sep + target, add_special_tokens=False)["input_ids"] + [self.end_ids[0]]
        ids = prompt + answer
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(prompt) + answer}

    def clean(self, text: str) -> str:
        text = text.strip()
        if self.style == "template" and self.single_line:
            text = text.split("\n", 1)[0].strip()  # base models run on past the one-line answer
        return text


@torch.no_grad()
def generate_translations(model, prompter: Prompter, sources: list[str], num_beams: int = 1,
                          max_new_tokens: int = 128, batch_size: int = 16, autocast_ctx=None) -> list[str]:
    """Translations of `sources` in order, generated in batches of similar length."""
    ctx = autocast_ctx or contextlib.nullcontext
    tok = prompter.tok
    if prompter.style != "seq2seq":
        prompts = [prompter.prompt_ids(s) for s in sources]
        outs = generate_batch(model, tok, prompts, prompter.end_ids, max_new_tokens, num_beams, batch_size, ctx)
        return [prompter.clean(tok.decode(o, skip_special_tokens=True)) for o in outs]
    device = next(model.parameters()).device
    if prompter.langs is not None:
        prompter.langs.set_on(tok)
    enc = tok([prompter.prefix + s for s in sources], truncation=True, max_length=prompter.max_length)
    feats = [{"input_ids": list(i), "attention_mask": list(m)} for i, m in zip(enc["input_ids"], enc["attention_mask"])]
    order = sorted(range(len(feats)), key=lambda i: len(feats[i]["input_ids"]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    gen_kw = dict(num_beams=num_beams, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                  temperature=None, top_p=None, top_k=None)
    if prompter.end_ids:
        gen_kw["eos_token_id"] = prompter.end_ids
    if prompter.langs is not None:
        gen_kw.update(prompter.langs.generation())
    out: list[str] = [""] * len(sources)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([feats[i] for i in idx],
                                                       {"input_ids": pad, "attention_mask": 0}, 1).items()}
        with ctx(), sharded_generation(model) as synced:
            gen = model.generate(**batch, **gen_kw, synced_gpus=synced)
        for i, text in zip(idx, tok.batch_decode(gen, skip_special_tokens=True)):
            out[i] = prompter.clean(text)
    return out


def translate(model, tokenizer, texts: list[str], *, source_lang: str | None = "en", target_lang: str | None = "es",
              prompt_style: str | None = None, prompt_template: str | None = None, source_prefix: str | None = None,
              num_beams: int = 1, max_new_tokens: int = 128, max_length: int = 128, batch_size: int = 16,
              single_line: bool = True, source_code: str | None = None, target_code: str | None = None) -> list[str]:
    """Translate `texts` (for `lmforge predict` and serving). The keyword arguments are those recorded by
    TranslateTask.config_extras() in DIR/final/lmforge_config.yaml; languages may be codes or names.
    source_code/target_code: a multilingual model's codes (eng_Latn), else found from the languages."""
    model.eval()
    config = getattr(model, "config", None)
    is_s2s = bool(getattr(config, "is_encoder_decoder", False))
    src, tgt = language_name(source_lang, "the source language"), language_name(target_lang, "the target language")
    style = prompt_style or ("seq2seq" if is_s2s else "template" if prompt_template
                             else "chat" if tokenizer.chat_template else "template")
    if style == "seq2seq":
        prefix = source_prefix if source_prefix is not None else _t5_prefix(config, source_lang, target_lang)
        langs = language_codes(tokenizer, source_code or source_lang, target_code or target_lang)
        prompter = Prompter(tokenizer, style, src, tgt, prefix=prefix, max_length=max_length, langs=langs)
    else:
        from lmforge.tasks.sft import detect_end_of_turn

        eot = detect_end_of_turn(tokenizer) if style == "chat" else tokenizer.eos_token
        end_ids = end_token_ids(tokenizer, model, eot)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        prompter = Prompter(tokenizer, style, src, tgt, template=prompt_template, max_length=max_length,
                            end_ids=end_ids, single_line=single_line)
    return generate_translations(model, prompter, list(texts), num_beams, max_new_tokens, batch_size)


def _t5_prefix(config, source_lang, target_lang) -> str:
    """T5 was pretrained with task prefixes: "translate English to German: "."""
    model_type = getattr(config, "model_type", None) if not isinstance(config, dict) else config.get("model_type")
    if model_type not in ("t5", "mt5", "umt5"):
        return ""
    src, tgt = language_name(source_lang, ""), language_name(target_lang, "")
    return f"translate {src} to {tgt}: " if src and tgt else ""


class TranslateTask(Task):
    name = "translate"
    auto_class = "AutoModelForCausalLM"  # AutoModelForSeq2SeqLM for encoder-decoders, set once the model is known
    peft_task_type = "CAUSAL_LM"
    metric = "bleu"
    greater_is_better = True
    default_max_length = 128  # source and target, each
    default_lr = 5e-5
    default_lora_lr = 5e-4
    default_batch_size = 16
    SEQ2SEQ_LR = 3e-4  # T5/Marian fine-tuning

    def __init__(self, cfg):
        super().__init__(cfg)
        self.seq2seq: bool | None = None
        self.model_type: str | None = None
        self.prompter: Prompter | None = None
        self.mask_logits = False  # decoder-only: set by load_model, see causal_lm_loss
        self.dropped: dict[str, int] = {}

    def fields(self):
        return {"source": self.cfg.source_field, "target": self.cfg.target_field}

    # ---- set-up
    def _set_arch(self, config: dict) -> None:
        self.seq2seq = bool(config.get("is_encoder_decoder", False))
        self.model_type = config.get("model_type")
        if self.seq2seq:
            self.auto_class, self.peft_task_type, self.default_lr = "AutoModelForSeq2SeqLM", "SEQ_2_SEQ_LM", self.SEQ2SEQ_LR
        else:
            self.auto_class, self.peft_task_type = "AutoModelForCausalLM", "CAUSAL_LM"
            self.default_lr = type(self).default_lr

    def prepare(self, tokenizer, train: Loaded, others: dict[str, Loaded]) -> None:
        super().prepare(tokenizer, train, others)
        f = train.fields or {}
        # --source-lang/--target-lang: a language the fields don't name, or a multilingual model's code (zho_Hant)
        self.source_code = (getattr(self.cfg, "source_lang", None) or f.get("source_lang")
                            or _lang_code(f.get("source")))
        self.target_code = (getattr(self.cfg, "target_lang", None) or f.get("target_lang")
                            or _lang_code(f.get("target")))
        self.source_name = language_name(self.source_code or f.get("source"), "the source language")
        self.target_name = language_name(self.target_code or f.get("target"), "the target language")
        self.single_line = not any("\n" in r["target"].strip() for r in train.rows)
        if self.seq2seq is None:  # known before the model is built when the tokenizer sits beside its config
            for where in (getattr(tokenizer, "name_or_path", None), getattr(self.cfg, "model", None)):
                config = read_model_config(where)
                if config is not None:
                    self._set_arch(config)
                    break
        if self.seq2seq is not None:
            self._make_prompter()

    def _make_prompter(self) -> None:
        tok = self.tokenizer
        if self.seq2seq:
            if tok.pad_token is None:
                raise LmforgeError("the tokenizer has no pad token, which an encoder-decoder model needs")
            prefix = _t5_prefix({"model_type": self.model_type}, self.source_code or self.source_name,
                                self.target_code or self.target_name)
            langs = language_codes(tok, self.source_code, self.target_code, ("--source-lang", "--target-lang"))
            self.prompter = Prompter(tok, "seq2seq", self.source_name, self.target_name, prefix=prefix,
                                     max_length=self.max_length, langs=langs)
            return
        style = "chat" if tok.chat_template and not self.cfg.prompt_template else "template"
        if style == "chat":
            chat = setup_chat(tok, install_template=False)
            eot = chat["end_of_turn"]
        else:
            if tok.eos_token is None:
                raise LmforgeError("the tokenizer has no EOS token to end translations with")
            if tok.pad_token is None:
                tok.pad_token = tok.eos_token
            eot = tok.eos_token
        self.end_of_turn = eot
        self.prompter = Prompter(tok, style, self.source_name, self.target_name,
                                 template=self.cfg.prompt_template, max_length=self.max_length,
                                 end_ids=end_token_ids(tok, None, eot), single_line=self.single_line)

    def load_model(self, path, dtype=None):
        config = read_model_config(path)
        if config is None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(path)).to_dict()
        known = self.seq2seq
        self._set_arch(config)
        if self.prompter is None or known != self.seq2seq:
            self._make_prompter()
        if self.seq2seq:
            from transformers import AutoModelForSeq2SeqLM

            model = load_pretrained(AutoModelForSeq2SeqLM, path, **dtype_kw(dtype or torch.float32))
            pad = self.tokenizer.pad_token_id
            if model.config.pad_token_id is None:
                model.config.pad_token_id = pad
            if model.config.decoder_start_token_id is None:
                model.config.decoder_start_token_id = model.config.pad_token_id
            gen = model.generation_config
            if gen.pad_token_id is None:
                gen.pad_token_id = model.config.pad_token_id
            if gen.decoder_start_token_id is None:
                gen.decoder_start_token_id = model.config.decoder_start_token_id
            if gen.eos_token_id is None and self.tokenizer.eos_token_id is not None:
                gen.eos_token_id = self.tokenizer.eos_token_id
            if self.prompter.langs is not None:
                # saved with DIR/final: plain transformers generate() then writes the target language too
                for key, value in self.prompter.langs.generation().items():
                    setattr(gen, key, value)
            return model
        model = load_causal(path, dtype)
        self.prompter.end_ids = end_token_ids(self.tokenizer, model, self.end_of_turn)
        configure_generation(model, self.tokenizer, self.prompter.end_ids)
        self.mask_logits = can_mask_logits(model)
        return model

    def loss(self, model, batch):
        if self.seq2seq:
            return model(**batch).loss
        return causal_lm_loss(model, batch, self.mask_logits)  # the prompt is unlabelled: logits for the target only

    def loss_items(self, batch):
        return labelled_tokens(batch["labels"], shifted=not self.seq2seq)

    # ---- data
    def _need_prompter(self) -> Prompter:
        if self.prompter is None:
            raise LmforgeError("translate: the model must be loaded (load_model) before building features: "
                               "encoder-decoder and decoder-only models take different inputs")
        return self.prompter

    def features(self, loaded: Loaded, train: bool) -> list[dict]:
        prompter = self._need_prompter()
        feats = []
        for row in loaded.rows:
            f = prompter.feature(row["source"], row["target"])
            if f is not None:
                feats.append(f)
        self.dropped[loaded.source] = len(loaded.rows) - len(feats)
        if not feats:
            raise LmforgeError(f"{loaded.source}: no example fits in --max-length {self.max_length}")
        return feats

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if not self.seq2seq:
            return pad_batch(feats, {"input_ids": pad, "attention_mask": 0, "labels": -100}, self.pad_multiple)
        batch = pad_batch(feats, {"input_ids": pad, "attention_mask": 0}, self.pad_multiple)
        if "labels" in feats[0]:
            # targets have their own length: pad them separately (the model shifts them into decoder inputs)
            T = max(len(f["labels"]) for f in feats)
            T = -(-T // 8) * 8
            batch["labels"] = torch.tensor([list(f["labels"]) + [-100] * (T - len(f["labels"])) for f in feats],
                                           dtype=torch.long)
        return batch

    # ---- scoring
    @torch.no_grad()
    def evaluate(self, model, loaded: Loaded, autocast_ctx, device, batch_size: int) -> EvalResult:
        prompter = self._need_prompter()
        sources = [r["source"] for r in loaded.rows]
        refs = [r["target"] for r in loaded.rows]
        hyps = generate_translations(model, prompter, sources, self.cfg.num_beams, self.cfg.max_new_tokens,
                                     batch_size, autocast_ctx)
        metrics = translation_metrics(hyps, refs, tokenize=bleu_tokenize(self.target_code))
        preds = [{"source": s, "reference": r, "prediction": h} for s, r, h in zip(sources, refs, hyps)]
        return EvalResult(metrics, preds)

    def attach(self, path, tokenizer, extras: dict):
        """Set up from a fine-tuned folder's lmforge_config.yaml (languages, prompt) instead of training data."""
        self.tokenizer = tokenizer
        src, tgt = extras.get("source_lang", "en"), extras.get("target_lang", "es")
        # a multilingual model's codes as trained (zho_Hant, where "zh" alone would find zho_Hans)
        self.source_code = extras.get("source_code") or _lang_code(src)
        self.target_code = extras.get("target_code") or _lang_code(tgt)
        self.source_name = language_name(src, "the source language")
        self.target_name = language_name(tgt, "the target language")
        self.single_line = extras.get("single_line", True)
        if extras.get("prompt_style") == "template" and extras.get("prompt_template") and not self.cfg.prompt_template:
            self.cfg.prompt_template = extras["prompt_template"]
        return self.load_model(path)

    def translate_texts(self, model, texts: list[str]) -> list[str]:
        return generate_translations(model, self._need_prompter(), texts, self.cfg.num_beams, self.cfg.max_new_tokens)

    def config_extras(self) -> dict:
        p = self.prompter
        extras = {"source_lang": self.source_code or self.source_name,
                  "target_lang": self.target_code or self.target_name, "single_line": self.single_line}
        if p is not None:
            extras["prompt_style"] = p.style
            if p.style == "seq2seq":
                extras["source_prefix"] = p.prefix
                if p.langs is not None:
                    extras["source_code"], extras["target_code"] = p.langs.source, p.langs.target
            elif p.style == "template":
                extras["prompt_template"] = p.template
        return extras
