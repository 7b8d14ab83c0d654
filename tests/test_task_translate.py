"""Translate task: encoder-decoder (tiny T5, tiny Marian) and decoder-only (tiny Llama) features, masking,
zero-shot evaluation, and a T5 overfit to BLEU 100."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from lmforge.data.labelled import load_examples
from lmforge.recipes.finetune import FinetuneConfig
from lmforge.tasks.translate import TranslateTask, bleu_tokenize, language_name, translate

PAIRS = [
    ("In the beginning God created the heaven and the earth.", "En el principio creó Dios los cielos y la tierra."),
    ("And God said, Let there be light: and there was light.", "Y dijo Dios: Sea la luz; y fue la luz."),
    ("And God saw the light, that it was good.", "Y vio Dios que la luz era buena."),
    ("And the evening and the morning were the first day.", "Y fue la tarde y la mañana un día."),
]
TEXT = "\n".join(f"{en}\n{es}" for en, es in PAIRS) * 20 + "\nTranslate English to Spanish: Spanish English"




@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from lmforge.tokenizer.bpe import train_bpe

    path = tmp_path_factory.mktemp("tr_tok")
    train_bpe([TEXT], 400, path)
    return path


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tr_data") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"en": en, "es": es}, ensure_ascii=False) + "\n" for en, es in PAIRS))
    return path


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _t5(tok, path):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=2,
                   d_ff=64, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(cfg).save_pretrained(str(path))
    return path


def _marian(tok, path):
    from transformers import MarianConfig, MarianMTModel

    torch.manual_seed(0)
    cfg = MarianConfig(vocab_size=len(tok), decoder_vocab_size=len(tok), d_model=32, encoder_layers=2,
                       decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                       decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id,
                       forced_eos_token_id=tok.eos_token_id)
    MarianMTModel(cfg).save_pretrained(str(path))
    return path


def _llama(tok, path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


def _task(tok, data_file, **kw):
    task = TranslateTask(FinetuneConfig(task="translate", max_new_tokens=24, **kw))
    loaded = load_examples(str(data_file), "translate", task.fields())
    task.prepare(tok, loaded, {})
    return task, loaded


def _subset(loaded, n):
    from lmforge.data.labelled import Loaded

    return Loaded(rows=loaded.rows[:n], source=loaded.source, line_numbers=loaded.line_numbers[:n],
                  fields=loaded.fields)


def test_language_names():
    assert language_name("es", "?") == "Spanish" and language_name("en-US", "?") == "English"
    assert language_name("spanish", "?") == "Spanish" and language_name(None, "the target") == "the target"


def test_targets_written_without_spaces_score_bleu_with_a_tokenizer_that_splits_them():
    # a region-tagged field name (zh-CN) reached metrics.json as 'zh-cn' and was scored with 13a
    assert [bleu_tokenize(c) for c in ("zh", "zh-cn", "zh-CN", "zh_Hans", "Chinese")] == ["zh"] * 5
    assert [bleu_tokenize(c) for c in ("es", "en-US", "ko", None)] == [None] * 4
    assert bleu_tokenize("th") == "char" and bleu_tokenize("ja-JP") in ("char", "ja-mecab")
    from lmforge.evaluate.task_metrics import translation_metrics

    refs, hyps = ["私は毎朝コーヒーを飲みます。"], ["私は毎朝コーヒーを飲む。"]  # 13a: one "word" each, BLEU 0
    assert translation_metrics(hyps, refs, tokenize=bleu_tokenize("ja"))["bleu"] > 30


def test_t5_features_evaluate_and_overfit(tok_dir, data_file, tmp_path):
    tok = _tokenizer(tok_dir)
    task, loaded = _task(tok, data_file)
    assert task.source_name == "English" and task.target_name == "Spanish"
    model = task.load_model(_t5(tok, tmp_path / "t5"))
    assert task.auto_class == "AutoModelForSeq2SeqLM" and task.peft_task_type == "SEQ_2_SEQ_LM"
    assert task.default_lr == pytest.approx(3e-4)
    feats = task.features(loaded, train=True)
    assert len(feats) == 4
    assert tok.decode(feats[0]["input_ids"]).startswith("translate English to Spanish: In the beginning")
    assert feats[0]["labels"][-1] == tok.eos_token_id  # appended: this tokenizer adds no EOS itself
    assert tok.decode(feats[0]["labels"][:-1]) == PAIRS[0][1]
    batch = task.collate(feats)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["input_ids"].shape[0] == 4
    assert batch["labels"].shape[1] >= max(len(f["labels"]) for f in feats)
    assert (batch["labels"] == -100).any() and "decoder_input_ids" not in batch

    zero = task.evaluate(model.eval(), loaded, contextlib.nullcontext, "cpu", 3)  # zero-shot, before training
    assert set(zero.metrics) == {"bleu", "chrf", "n"} and zero.metrics["n"] == 4
    assert 0 <= zero.metrics["bleu"] < 100 and len(zero.predictions) == 4
    assert set(zero.predictions[0]) == {"source", "reference", "prediction"}

    two = _subset(loaded, 2)
    train = task.collate(task.features(two, train=True))
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(100):
        model(**train).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    res = task.evaluate(model, two, contextlib.nullcontext, "cpu", 2)
    assert [p["prediction"] for p in res.predictions] == [PAIRS[0][1], PAIRS[1][1]]
    assert res.metrics["bleu"] == pytest.approx(100.0) and res.metrics["chrf"] == pytest.approx(100.0)
    extras = task.config_extras()
    assert extras["prompt_style"] == "seq2seq" and extras["source_prefix"] == "translate English to Spanish: "
    assert translate(model, tok, [PAIRS[0][0]], **extras) == [PAIRS[0][1]]


def test_architecture_known_from_the_tokenizer_folder(tok_dir, data_file, tmp_path):
    tok = _tokenizer(tok_dir)
    folder = _t5(tok, tmp_path / "t5")
    tok.save_pretrained(str(folder))
    task, loaded = _task(_tokenizer(folder), data_file)
    assert task.seq2seq and task.auto_class == "AutoModelForSeq2SeqLM"
    assert len(task.features(loaded, train=True)) == 4  # before load_model


def test_marian_features_and_zero_shot(tok_dir, data_file, tmp_path):
    tok = _tokenizer(tok_dir)
    task, loaded = _task(tok, data_file, num_beams=2)
    model = task.load_model(_marian(tok, tmp_path / "marian"))
    assert task.auto_class == "AutoModelForSeq2SeqLM"
    feats = task.features(loaded, train=True)
    assert tok.decode(feats[0]["input_ids"]) == PAIRS[0][0]  # no T5 prefix for Marian
    loss = model(**task.collate(feats)).loss
    assert torch.isfinite(loss)
    res = task.evaluate(model.eval(), loaded, contextlib.nullcontext, "cpu", 4)
    assert res.metrics["n"] == 4 and 0 <= res.metrics["chrf"] <= 100


def test_decoder_only_chat_template_masks_the_target(tok_dir, data_file, tmp_path):
    tok = _tokenizer(tok_dir)  # has ChatML
    task, loaded = _task(tok, data_file)
    model = task.load_model(_llama(tok, tmp_path / "llama"))
    assert task.auto_class == "AutoModelForCausalLM" and task.peft_task_type == "CAUSAL_LM"
    assert task.prompter.style == "chat"
    feats = task.features(loaded, train=True)
    f = feats[0]
    assert tok.decode([t for t in f["labels"] if t != -100]) == PAIRS[0][1] + "<|im_end|>"
    text = tok.decode(f["input_ids"])
    assert "Translate from English to Spanish:\n" + PAIRS[0][0] in text
    batch = task.collate(feats)
    assert batch["input_ids"].shape == batch["labels"].shape
    assert torch.isfinite(model(**batch).loss)
    res = task.evaluate(model.eval(), loaded, contextlib.nullcontext, "cpu", 4)  # zero-shot
    assert set(res.metrics) == {"bleu", "chrf", "n"} and res.metrics["n"] == 4
    out = translate(model, tok, [PAIRS[0][0]], max_new_tokens=5, **task.config_extras())
    assert len(out) == 1 and isinstance(out[0], str)


def test_decoder_only_plain_template_overfits(tok_dir, data_file, tmp_path):
    tok = _tokenizer(tok_dir)
    tok.chat_template = None
    task, loaded = _task(tok, data_file)
    model = task.load_model(_llama(tok, tmp_path / "llama"))
    assert task.prompter.style == "template"
    f = task.features(loaded, train=True)[1]
    prompt = tok.decode([t for t, lab in zip(f["input_ids"], f["labels"]) if lab == -100])
    assert prompt == f"Translate English to Spanish:\n{PAIRS[1][0]}\nSpanish:"
    assert tok.decode([t for t in f["labels"] if t != -100]) == " " + PAIRS[1][1] + tok.eos_token
    one = _subset(loaded, 1)
    train = task.collate(task.features(one, train=True))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(60):
        model(**train).loss.backward()
        opt.step()
        opt.zero_grad()
    res = task.evaluate(model.eval(), one, contextlib.nullcontext, "cpu", 1)
    assert res.predictions[0]["prediction"] == PAIRS[0][1] and res.metrics["bleu"] == pytest.approx(100.0)


def test_custom_prompt_template_is_checked(tok_dir, data_file):
    from lmforge.errors import LmforgeError

    tok = _tokenizer(tok_dir)
    with pytest.raises(LmforgeError, match="prompt-template"):
        task, _ = _task(tok, data_file, prompt_template="Translate {sauce}")
        task._set_arch({"is_encoder_decoder": False})
        task._make_prompter()
    task, _ = _task(tok, data_file, prompt_template="{source_lang}: {source}\\n{target_lang}:")  # as typed in a shell
    task._set_arch({"is_encoder_decoder": False})
    task._make_prompter()
    assert task.prompter.style == "template" and task.prompter.template == "{source_lang}: {source}\n{target_lang}:"
    assert task.prompter.feature("Hi", "Hola")["labels"][-1] == tok.eos_token_id
