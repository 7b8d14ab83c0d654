"""`lmforge tokenizer train`: a byte-level BPE that loads with AutoTokenizer and round-trips any text."""
from __future__ import annotations

import random

import pytest

from conftest import assert_user_error, cli

SAMPLES = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "ROMEO:\nBut, soft! what light through yonder window breaks?\n",
    "你好，世界。人民日报社论：经济建设取得新成就。",
    "mixed 中文 and English, 数字 12345 and punctuation！？",
    "emoji 🙂🚀👍🏽 flags 🇫🇷🇯🇵 keycap 1️⃣",
    "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 and 🧑🏽‍💻 (ZWJ sequences)",
    "tab\tseparated\tvalues\r\nwindows line\r\nand \x00 nul \x1b[31mANSI\x1b[0m \x07 bell \x7f del",
    "combining: e\u0301 a\u0308 o\u0302\u0323 Z\u0351\u0352\u0353 \u0915\u094d\u0937 (Devanagari)",
    "   leading spaces",
    "trailing spaces   ",
    "  both  \n\n  ",
    " ",
    "\n",
    "",
    "double  spaces   and    more\u00a0nbsp\u2009thin\u3000ideographic",
    "RTL: مرحبا بالعالم שלום עולם",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑∫√∞ ≤≥ and private-use \ue000 and \U0010fffd",
    "\ufeffBOM at the start and zero\u200bwidth\u200cjoiners\u200d",
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Seeded random unicode: ASCII, controls, CJK, emoji, combining marks, astral planes (no surrogates)."""
    rng = random.Random(seed)
    ranges = [(0x00, 0x7F), (0x80, 0x7FF), (0x0300, 0x036F), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF),
              (0xE000, 0xF8FF), (0x10000, 0x10FFFF), (0x0800, 0xD7FF), (0xE000, 0xFFFD)]
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 40)):
            lo, hi = rng.choice(ranges)
            chars.append(chr(rng.randint(lo, hi)))
            if rng.random() < 0.1:
                chars.append(rng.choice([" ", "  ", "\n", "\t", "\u200d", "\r\n"]))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def trained_tokenizer(tmp_path_factory, mixed_corpus_file):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    res = cli("tokenizer", "train", "--data", mixed_corpus_file, "--vocab-size", "300", "--out", out)
    assert res.code == 0, res.err
    assert "tokenizer:" in res.out and "300 tokens" in res.out
    return out


@pytest.fixture(scope="module")
def both_tokenizers(trained_tokenizer):
    from transformers import AutoTokenizer

    from lmforge.tokenizer.bpe import load_tokenizer

    return {"lmforge": load_tokenizer(trained_tokenizer), "auto": AutoTokenizer.from_pretrained(str(trained_tokenizer))}


def test_tokenizer_folder_layout(trained_tokenizer, both_tokenizers):
    assert (trained_tokenizer / "tokenizer.json").is_file()
    assert (trained_tokenizer / "tokenizer_config.json").is_file()
    assert not list(trained_tokenizer.parent.glob(".tmp-*"))  # atomic write left nothing behind
    for tok in both_tokenizers.values():
        assert len(tok) == 300
        assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|pad|>"
        assert tok.eos_token_id is not None and tok.pad_token_id is not None
        assert tok.unk_token is None
        assert tok.chat_template
        for special in ("<|im_start|>", "<|im_end|>"):
            assert special in tok.get_vocab()
        # Nothing is added around the text: the encoded ids are the text's own.
        ids = tok.encode("hello")
        assert tok.eos_token_id not in ids


def test_vocab_learned_merges(both_tokenizers):
    tok = both_tokenizers["auto"]
    # A trained BPE needs fewer tokens than bytes on text like its training data.
    text = "the king and the queen"
    assert len(tok.encode(text)) < len(text.encode("utf-8"))


@pytest.mark.parametrize("which", ["lmforge", "auto"])
@pytest.mark.parametrize("text", SAMPLES, ids=range(len(SAMPLES)))
def test_round_trip_samples(both_tokenizers, which, text):
    tok = both_tokenizers[which]
    ids = tok.encode(text)
    assert all(0 <= i < len(tok) for i in ids)
    assert tok.decode(ids) == text


@pytest.mark.parametrize("which", ["lmforge", "auto"])
def test_round_trip_random_unicode(both_tokenizers, which):
    tok = both_tokenizers[which]
    for text in random_strings(300, seed=1234):
        assert tok.decode(tok.encode(text)) == text, repr(text)


def test_lmforge_and_auto_agree(both_tokenizers):
    a, b = both_tokenizers["lmforge"], both_tokenizers["auto"]
    for text in SAMPLES + random_strings(50, seed=7):
        assert a.encode(text) == b.encode(text)


def test_token_byte_lengths_match_utf8(both_tokenizers):
    """bits/byte relies on each token's byte length; their sum must equal the UTF-8 length of the text."""
    from lmforge.tokenizer.bpe import token_byte_lengths

    tok = both_tokenizers["lmforge"]
    lengths = token_byte_lengths(tok)
    assert lengths is not None
    for text in SAMPLES + random_strings(30, seed=3):
        assert int(lengths[tok.encode(text)].sum()) == len(text.encode("utf-8"))
    assert lengths[tok.eos_token_id] == 0


def test_mean_token_bytes_counts_no_bytes_for_the_eos_between_documents(both_tokenizers):
    """The fallback for tokenizers token_byte_lengths cannot measure: decoded with its special tokens, each
    EOS between documents counted as the bytes of its name ("</s>")."""
    from lmforge.tokenizer.bpe import mean_token_bytes

    tok = both_tokenizers["lmforge"]
    a, b = tok.encode("To be, or not to be"), tok.encode("that is the question")
    ids = a + [tok.eos_token_id] + b + [tok.eos_token_id]
    text_bytes = len("To be, or not to be".encode()) + len("that is the question".encode())
    assert mean_token_bytes(tok, ids) == pytest.approx(text_bytes / len(ids))


def test_vocab_size_too_small(tmp_path, mixed_corpus_file):
    res = cli("tokenizer", "train", "--data", mixed_corpus_file, "--vocab-size", "100", "--out", tmp_path / "t")
    assert_user_error(res, "--vocab-size 100 is too small")
    assert not (tmp_path / "t").exists()


def test_tokenizer_needs_out(mixed_corpus_file):
    assert_user_error(cli("tokenizer", "train", "--data", mixed_corpus_file), "--out is required")
