"""`lmforge generate` and `lmforge evaluate --task lm` on the session's tiny model."""
from __future__ import annotations

import json
import math

import pytest

from conftest import cli


def generate(model, *extra) -> str:
    res = cli("generate", "--model", model, "--prompt", "ROMEO:", "--max-new-tokens", "8", *extra)
    assert res.code == 0, res.err
    assert "Traceback" not in res.err
    return res.out


def test_a_tiny_temperature_samples_the_top_token():
    import torch

    from lmforge.generate.sampling import sample_next

    logits = torch.tensor([[0.5, 3.0, -1.0, float("-inf")], [2.0, 1.0, 2.5, 0.0]])
    for t in (1e-40, 1e-300):  # logits / t overflowed to inf: multinomial then raised on NaN probabilities
        assert sample_next(logits, temperature=t, top_p=0.9).tolist() == [1, 2]
    torch.manual_seed(0)
    assert set(sample_next(torch.zeros(400, 3), temperature=1.0).tolist()) == {0, 1, 2}


def test_generate_continues_the_prompt(tiny_run):
    text = generate(tiny_run.final, "--seed", "0")
    assert text.startswith("ROMEO:")
    assert text.endswith("\n")
    assert len(text) > len("ROMEO:\n")


def test_generate_leaves_autograd_on(tiny_run):
    """In-process generation must not switch autograd off for the rest of the process (it once did)."""
    import torch

    generate(tiny_run.final, "--seed", "0")
    assert torch.is_grad_enabled()


def test_generate_same_seed_same_text(tiny_run):
    assert generate(tiny_run.final, "--seed", "0") == generate(tiny_run.final, "--seed", "0")


def test_generate_different_seed_different_text(tiny_run):
    # A barely trained model is close to uniform over 512 tokens: two seeds giving equal 8-token samples
    # would mean the seed is ignored.
    assert generate(tiny_run.final, "--seed", "0", "--top-k", "0") != generate(tiny_run.final, "--seed", "1",
                                                                               "--top-k", "0")


def test_generate_accepts_the_output_folder(tiny_run):
    """An lmforge --out folder resolves to its final/ model."""
    assert generate(tiny_run.out, "--seed", "3") == generate(tiny_run.final, "--seed", "3")


def test_greedy_is_deterministic_and_seed_independent(tiny_run):
    a = generate(tiny_run.final, "--temperature", "0", "--seed", "1")
    b = generate(tiny_run.final, "--temperature", "0", "--seed", "2")
    c = generate(tiny_run.final, "--temperature", "0")
    assert a == b == c
    assert a.startswith("ROMEO:")


def test_a_prompt_that_is_not_utf8_is_named(tiny_run):
    from conftest import assert_user_error

    # argv bytes that are not UTF-8 reach Python as lone surrogates
    assert_user_error(cli("generate", "--model", tiny_run.final, "--prompt", "abc\udcff"), "--prompt", "UTF-8")


def test_a_continuation_keeps_the_space_a_sentencepiece_decoder_strips():
    """Llama 2 / Mistral decoders drop the space a text's first token opens with: decoded on its own, the first
    new token of "The capital is" + "▁Paris" read "Paris" and the printed text "The capital isParis"."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from lmforge.generate.sampling import StreamDecoder

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "▁The": 3, "▁capital": 4, "▁is": 5, "▁Paris": 6, ".": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tk.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])  # as Llama 2's tokenizer.json has it
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    prompt, new = [1] + tok.encode("The capital is", add_special_tokens=False), [6, 7]

    def stream(**kw):
        dec = StreamDecoder(tok, **kw)
        return "".join(dec.push(t) for t in new) + dec.flush()

    assert stream(context=prompt) == " Paris." == tok.decode(prompt + new)[len(tok.decode(prompt)):]
    assert stream() == "Paris."  # a chat reply, a message of its own


def test_a_character_cut_off_by_the_token_limit_is_left_out(tiny_run):
    """Byte-level BPE spells a rare character in byte tokens; generation stopped between them would end the
    reply (generate, serve) in U+FFFD."""
    from transformers import AutoTokenizer

    from lmforge.generate.sampling import StreamDecoder

    tok = AutoTokenizer.from_pretrained(str(tiny_run.final))
    ids = tok.encode("北京龘", add_special_tokens=False)
    assert len(ids) > 3  # bytes, in this tiny vocabulary
    dec = StreamDecoder(tok)
    text = "".join(dec.push(t) for t in ids[:-1]) + dec.flush()
    assert "\ufffd" not in text and "龘".startswith(text[len("北京"):]) and text.startswith("北京")
    dec = StreamDecoder(tok)
    assert "".join(dec.push(t) for t in ids) + dec.flush() == "北京龘"


def test_greedy_text_matches_the_model(tiny_run):
    """The streamed text is the decode of the greedy tokens (StreamDecoder loses nothing)."""
    import torch

    from lmforge.generate.sampling import generate_ids, stop_token_ids
    from lmforge.model.causal import load_causal_lm
    from lmforge.tokenizer.bpe import load_tokenizer

    tok = load_tokenizer(tiny_run.final)
    model = load_causal_lm(tiny_run.final).eval()
    with torch.no_grad():
        ids = list(generate_ids(model, tok.encode("ROMEO:"), 8, 0.0, None, None, stop_token_ids(tok), None))
    expected = "ROMEO:" + tok.decode(ids, skip_special_tokens=True)
    # A trailing incomplete UTF-8 sequence is held back by the stream decoder.
    got = generate(tiny_run.final, "--temperature", "0")[:-1]
    assert expected.startswith(got) and expected[len(got):] in ("", "\ufffd", "\ufffd\ufffd", "\ufffd\ufffd\ufffd")


def test_generate_stats_go_to_stderr(tiny_run):
    res = cli("generate", "--model", tiny_run.final, "--prompt", "A", "--max-new-tokens", "3", "--seed", "0",
              "--stats")
    assert res.code == 0
    assert "tokens/s]" in res.err and "tokens/s" not in res.out


def test_generate_chat_uses_the_template(tiny_run):
    res = cli("generate", "--model", tiny_run.final, "--prompt", "hi", "--chat", "--max-new-tokens", "3",
              "--seed", "0")
    assert res.code == 0, res.err
    assert "<|im_start|>" not in res.out  # the template is applied to the input, not echoed


def test_generate_chat_without_a_template_uses_the_default_one(tiny_run, tmp_path, monkeypatch):
    """As chat, serve and sft do: lmforge's default template, not a refusal."""
    import shutil

    import lmforge.generate.sampling as sampling

    folder = tmp_path / "plain"
    shutil.copytree(tiny_run.final, folder)
    (folder / "chat_template.jinja").unlink()
    prompts = []
    real = sampling.generate_ids
    monkeypatch.setattr(sampling, "generate_ids", lambda model, ids, *a, **kw: prompts.append(ids) or real(
        model, ids, *a, **kw))
    res = cli("generate", "--model", folder, "--prompt", "hi", "--chat", "--max-new-tokens", "3", "--seed", "0")
    assert res.code == 0, res.err
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    assert not tok.chat_template
    from lmforge.tasks.sft import render, setup_chat

    setup_chat(tok)  # lmforge's default for it (ChatML, as its special tokens are)
    assert tok.decode(prompts[0]) == render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True)


def test_evaluate_lm(tiny_run):
    res = cli("evaluate", "--model", tiny_run.final, "--task", "lm", "--data", tiny_run.corpus,
              "--max-tokens", "1024")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["task"] == "lm" and result["context"] == 64
    for key in ("loss", "perplexity", "bits_per_byte", "tokens", "bytes"):
        assert key in result, key
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-6)
    assert result["bits_per_byte"] > 0 and math.isfinite(result["bits_per_byte"])
    assert result["tokens"] == 1024
    assert result["bytes"] >= result["tokens"]  # BPE tokens are at least one byte
    # bits/byte = nats per token * tokens / bytes / ln 2
    assert result["bits_per_byte"] == pytest.approx(
        result["loss"] * result["tokens"] / result["bytes"] / math.log(2), rel=1e-3)


def test_evaluate_val_split_matches_pretrain_metrics(tiny_run):
    """--split val scores the same held-out tail that pretrain reported."""
    metrics = json.loads((tiny_run.out / "metrics.json").read_text())
    res = cli("evaluate", "--model", tiny_run.out, "--data", tiny_run.corpus, "--split", "val",
              "--max-tokens", "2048", "--batch-size", "4", "--precision", "auto")
    assert res.code == 0, res.err
    result = json.loads(res.out)
    assert result["loss"] == pytest.approx(metrics["val_loss"], abs=2e-2)
    assert result["bits_per_byte"] == pytest.approx(metrics["val_bits_per_byte"], abs=2e-2)


def test_evaluate_is_deterministic(tiny_run):
    args = ("evaluate", "--model", tiny_run.final, "--data", tiny_run.corpus, "--max-tokens", "300")
    a, b = cli(*args), cli(*args)
    assert a.code == b.code == 0
    assert json.loads(a.out) == json.loads(b.out)


def test_a_long_max_new_tokens_keeps_the_prompt(tiny_run):
    """The context window (64 tokens here) holds prompt + reply: asking for more new tokens than fit caps the
    reply, it must not drop the prompt (it once kept only the prompt's last token)."""
    short = generate(tiny_run.final, "--temperature", "0")
    res = cli("generate", "--model", tiny_run.final, "--prompt", "ROMEO:", "--max-new-tokens", "1000",
              "--temperature", "0")
    assert res.code == 0, res.err
    assert res.out.startswith(short.rstrip("\n")), (short, res.out)
    assert "at most" in res.err and "new tokens" in res.err


def test_generate_and_chat_stop_at_every_eos_the_model_names(tiny_run, tmp_path, monkeypatch):
    """generation_config.json may name end tokens the tokenizer does not (Llama 3.1's <|eom_id|>, Gemma's
    <end_of_turn>); serve stops on them, and so must generate (--chat or not) and chat. Here it names the
    token greedy decoding emits first, so each must print nothing new."""
    import io
    import shutil
    import sys

    from lmforge.generate.sampling import generate_ids
    from lmforge.model.causal import load_causal_lm
    from lmforge.tasks.sft import encode_text, render
    from lmforge.tokenizer.bpe import load_tokenizer

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_run.final, model_dir)
    tok, model = load_tokenizer(model_dir), load_causal_lm(model_dir).eval()
    chat_ids = encode_text(tok, render(tok, [{"role": "user", "content": "hi"}], add_generation_prompt=True))
    for args, ids, stdin in ((["generate", "--prompt", "ROMEO:"], tok.encode("ROMEO:"), None),
                             (["generate", "--prompt", "hi", "--chat"], chat_ids, None),
                             (["chat"], chat_ids, "hi\n")):
        first = next(generate_ids(model, ids, 1, temperature=0))
        (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, first]}))
        if stdin is not None:
            monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
        res = cli(args[0], "--model", model_dir, *args[1:], "--max-new-tokens", "6", "--temperature", "0")
        assert res.code == 0, res.err
        said = [ln for ln in res.out.splitlines() if ln.startswith("assistant> ")][0][len("assistant> "):] \
            if stdin else res.out.removeprefix("ROMEO:" if "--chat" not in args else "")
        assert said.strip() == "", (args, res.out)


def test_a_chat_prompt_too_long_for_the_window_keeps_the_template(tiny_run, monkeypatch):
    """A plain continuation too long for the window keeps its last tokens; a chat prompt cut so lost the
    template's opening (<|im_start|>user): the model read a turn that never began. The message is cut instead."""
    import lmforge.generate.sampling as sampling
    from lmforge.tokenizer.bpe import load_tokenizer

    prompts = []
    real = sampling.generate_ids
    monkeypatch.setattr(sampling, "generate_ids", lambda model, ids, *a, **kw: prompts.append(ids) or real(
        model, ids, *a, **kw))
    res = cli("generate", "--model", tiny_run.final, "--prompt", "ROMEO: " * 100 + "the end", "--chat",
              "--max-new-tokens", "8", "--temperature", "0")
    assert res.code == 0, res.err
    text = load_tokenizer(tiny_run.final).decode(prompts[0])
    assert text.startswith("<|im_start|>user\n") and text.endswith("the end<|im_end|>\n<|im_start|>assistant\n")
    assert len(prompts[0]) <= 64 - 8  # the window (64) less the reply
    assert "only the message's last part is read" in res.err


def test_generation_runs_no_forward_after_its_last_token(tiny_run):
    """The last token's logits are never used: computing them cost a whole decode step per reply."""
    from lmforge.generate.sampling import generate_ids
    from lmforge.model.causal import load_causal_lm

    model = load_causal_lm(tiny_run.final).eval()
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    assert len(list(generate_ids(model, [1, 2, 3], max_new_tokens=5, temperature=0.0))) == 5
    assert len(calls) == 5  # the prefill and 4 decode steps
