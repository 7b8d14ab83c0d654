"""SFT task: assistant-only labels (single and multi-turn, prompt/response rows), template installation
for tokenizers without one, evaluation, and a tiny fine-tuned model that learns to stop."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from lmforge.data.labelled import Loaded, load_examples
from lmforge.recipes.finetune import FinetuneConfig
from lmforge.tasks.base import pad_batch
from lmforge.tasks.sft import SFTTask, encode_conversation, generate_replies

TEXT = ("The quick brown fox jumps over the lazy dog. Hello world, how are you today? I am fine, thanks.\n"
        "What is the capital of France? Paris is the capital. Two plus two is four. Blue is a color.\n"
        "Tell me a joke. Why did the chicken cross the road? To get to the other side.\n") * 30




@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from lmforge.tokenizer.bpe import train_bpe

    path = tmp_path_factory.mktemp("sft_tok")
    train_bpe([TEXT], 400, path)
    return path


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _plain_tokenizer(bos: bool = False):
    """A byte-level BPE with only an EOS special token (and a BOS with `bos`): no ChatML tokens, no chat
    template, no pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["</s>"] + ["<s>"] * bos, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", bos_token="<s>" if bos else None)


def _task(tokenizer, rows, **kw) -> tuple[SFTTask, Loaded]:
    task = SFTTask(FinetuneConfig(task="sft", **kw))
    loaded = Loaded(rows=rows, source="chats.jsonl", line_numbers=list(range(1, len(rows) + 1)))
    task.prepare(tokenizer, loaded, {})
    return task, loaded


def _labelled(tokenizer, feat) -> str:
    return tokenizer.decode([t for t in feat["labels"] if t != -100])


def _unlabelled(tokenizer, feat) -> str:
    return tokenizer.decode([t for t, lab in zip(feat["input_ids"], feat["labels"]) if lab == -100])


def _chat(user, reply):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]}


def test_labels_cover_exactly_the_assistant_reply(tok_dir):
    tok = _tokenizer(tok_dir)
    task, loaded = _task(tok, [_chat("What is the capital of France?", "Paris is the capital.")])
    assert task.chat["end_of_turn"] == "<|im_end|>" and tok.eos_token == "<|im_end|>"
    assert tok.pad_token == "<|pad|>"  # kept: the tokenizer has one
    (f,) = task.features(loaded, train=True)
    assert len(f["input_ids"]) == len(f["labels"]) == len(f["attention_mask"])
    assert _labelled(tok, f) == "Paris is the capital.<|im_end|>"
    # labelled positions are a contiguous run equal to the input ids there, ending with <|im_end|>
    pos = [i for i, t in enumerate(f["labels"]) if t != -100]
    assert pos == list(range(pos[0], pos[-1] + 1))
    assert all(f["labels"][i] == f["input_ids"][i] for i in pos)
    assert f["input_ids"][pos[-1]] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(f["input_ids"][:pos[0]]).endswith("<|im_start|>assistant\n")


def test_multi_turn_masks_every_assistant_turn_and_nothing_else(tok_dir):
    tok = _tokenizer(tok_dir)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
            {"role": "assistant", "content": "Hello, how are you?"}, {"role": "user", "content": "Tell me a joke."},
            {"role": "assistant", "content": "Why did the chicken cross the road?"}]
    task, loaded = _task(tok, [{"messages": msgs}])
    (f,) = task.features(loaded, train=True)
    assert _labelled(tok, f) == "Hello, how are you?<|im_end|>Why did the chicken cross the road?<|im_end|>"
    unlabelled = _unlabelled(tok, f)
    assert "Be brief." in unlabelled and "Tell me a joke." in unlabelled and "Hello world" in unlabelled
    assert "chicken" not in unlabelled


def test_prompt_response_and_alpaca_rows(tok_dir, tmp_path):
    tok = _tokenizer(tok_dir)
    path = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "Tell me a joke.", "input": "", "output": "To get to the other side."},
            {"instruction": "Add the numbers.", "input": "two plus two", "output": "Four."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = SFTTask(FinetuneConfig(task="sft"))
    loaded = load_examples(str(path), "sft", task.fields())
    task.prepare(tok, loaded, {})
    feats = task.features(loaded, train=True)
    assert [_labelled(tok, f) for f in feats] == ["To get to the other side.<|im_end|>", "Four.<|im_end|>"]
    assert "two plus two" in tok.decode(feats[1]["input_ids"])
    # explicit prompt/response field names
    path2 = tmp_path / "pairs.jsonl"
    path2.write_text(json.dumps({"q": "Blue is?", "a": "A color."}) + "\n")
    task2 = SFTTask(FinetuneConfig(task="sft", prompt_field="q", response_field="a"))
    loaded2 = load_examples(str(path2), "sft", task2.fields())
    task2.prepare(tok, loaded2, {})
    assert _labelled(tok, task2.features(loaded2, train=True)[0]) == "A color.<|im_end|>"


def test_plain_template_installed_without_chat_tokens():
    tok = _plain_tokenizer()
    assert tok.chat_template is None and tok.pad_token is None
    task, loaded = _task(tok, [_chat("Hello world", "I am fine, thanks.")])
    assert "### Assistant:" in tok.chat_template and task.chat["end_of_turn"] == "</s>"
    assert tok.pad_token == "</s>" and tok.eos_token == "</s>"
    (f,) = task.features(loaded, train=True)
    assert tok.decode(f["input_ids"]) == "### User:\nHello world\n\n### Assistant:\nI am fine, thanks.</s>\n\n"
    assert _labelled(tok, f) == "I am fine, thanks.</s>"
    assert task.config_extras()["chat_template"] == tok.chat_template


def test_end_token_appended_when_the_template_writes_none():
    tok = _plain_tokenizer()
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    task, loaded = _task(tok, [{"messages": [{"role": "user", "content": "Hello"},
                                             {"role": "assistant", "content": "Blue is a color."},
                                             {"role": "user", "content": "Two plus two?"},
                                             {"role": "assistant", "content": "Four."}]}])
    assert task.chat["end_of_turn"] == "</s>"
    (f,) = task.features(loaded, train=True)
    assert _labelled(tok, f) == "Blue is a color.</s>Four.</s>"
    assert tok.decode(f["input_ids"]).count("</s>") == 2


def test_truncation_drops_examples_without_a_reply(tok_dir):
    tok = _tokenizer(tok_dir)
    rows = [_chat("Hello world " * 20, "Fine."), _chat("Hi", "The quick brown fox jumps over the lazy dog.")]
    task, loaded = _task(tok, rows, max_length=24)
    feats = task.features(loaded, train=True)
    assert task.dropped["chats.jsonl"] == 1 and len(feats) == 1
    assert len(feats[0]["input_ids"]) <= 24 and any(t != -100 for t in feats[0]["labels"])


def test_padding_rounds_to_eight_on_cuda_only(tok_dir):
    tok = _tokenizer(tok_dir)
    rows = [_chat("Hi", "Fine."), _chat("Hello there", "The quick brown fox jumps over the lazy dog.")]
    cpu_task, loaded = _task(tok, rows)
    gpu_task, _ = _task(tok, rows)
    gpu_task.use_device("cuda")  # only shapes batches: nothing is moved, so no GPU is needed
    feats = cpu_task.features(loaded, train=True)
    longest = max(len(f["input_ids"]) for f in feats)
    assert longest % 8 != 0  # otherwise the test cannot tell the two apart
    assert cpu_task.collate(feats)["input_ids"].shape[1] == longest
    padded = gpu_task.collate(feats)
    assert padded["input_ids"].shape[1] == -(-longest // 8) * 8
    assert (padded["labels"][:, longest:] == -100).all()
    cpu_task.use_device("cpu")  # the setting is per task: one task's device never changes another's batches
    assert cpu_task.collate(feats)["input_ids"].shape[1] == longest


def _tiny_llama(tok, path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    return path


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_reply_loss_equals_the_models_own_with_logits_only_where_labelled(tok_dir, arch):
    """causal_lm_loss computes the vocabulary projection only at labelled positions; its value and gradients
    are the model's own loss's, and a model that cannot slice by a mask takes the full-logits path."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from lmforge.tasks.sft import can_mask_logits, causal_lm_loss

    tok = _tokenizer(tok_dir)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=64)) \
        if arch == "llama" else GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32,
                                                           n_layer=2, n_head=2))
    model.config.pad_token_id = tok.pad_token_id
    model.eval()  # no dropout: the three losses below see the same network
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    feats = [encode_conversation(tok, _chat(p, r)["messages"], end_id) for p, r in PAIRS]
    batch = pad_batch(feats, {"input_ids": tok.pad_token_id, "attention_mask": 0, "labels": -100})
    assert (batch["labels"] != -100).float().mean() < 0.7  # prompts and padding are unlabelled
    masked = can_mask_logits(model)
    if arch == "llama":
        assert masked  # transformers' Llama slices by a boolean mask: the fast path is the one tested
    grads = []
    for loss_fn in (lambda: model(**batch).loss, lambda: causal_lm_loss(model, batch, masked),
                    lambda: causal_lm_loss(model, batch, False)):
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        grads.append((loss.item(), model.get_input_embeddings().weight.grad.clone()))
    for value, grad in grads[1:]:
        assert value == pytest.approx(grads[0][0], rel=1e-5)
        assert torch.allclose(grad, grads[0][1], atol=1e-6)


PAIRS = [("What is the capital of France?", "Paris."), ("Tell me a joke.", "The chicken crossed the road."),
         ("Two plus two?", "Four."), ("Hello world", "Hello, how are you?")]


def test_fine_tuned_model_stops_and_evaluates(tok_dir, tmp_path):
    tok = _tokenizer(tok_dir)
    task, loaded = _task(tok, [_chat(p, r) for p, r in PAIRS], eval_samples=2, max_new_tokens=40)
    model = task.load_model(_tiny_llama(tok, tmp_path / "base"))
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.eos_token_id in (end_id, [end_id]) or end_id in model.generation_config.eos_token_id
    feats = task.features(loaded, train=True)
    batch = task.collate(feats)
    assert batch["input_ids"].shape == batch["labels"].shape
    assert batch["input_ids"].shape[1] == max(len(f["input_ids"]) for f in feats)  # padded to the longest only
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()

    before = task.evaluate(model.eval(), loaded, contextlib.nullcontext, "cpu", 8)
    assert set(before.metrics) == {"loss", "perplexity", "tokens", "n"} and before.metrics["n"] == 4
    assert before.metrics["tokens"] == sum(sum(t != -100 for t in f["labels"]) for f in feats)
    assert len(before.predictions) == 2 and set(before.predictions[0]) == {"prompt", "reference", "generated"}

    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    after = task.evaluate(model, loaded, contextlib.nullcontext, "cpu", 8)
    assert after.metrics["loss"] < before.metrics["loss"] / 4
    assert [p["generated"] for p in after.predictions] == [r for _, r in PAIRS[:2]]

    prompt, response = PAIRS[1]
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    enc = tok(ids, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=40, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:].tolist()
    assert len(new) < 40 and new[-1] == end_id  # stopped on its own, by the generation config alone
    assert tok.decode(new, skip_special_tokens=True) == response
    assert generate_replies(model, tok, [[{"role": "user", "content": prompt}]], max_new_tokens=40) == [response]
    # batched, prompts of different lengths left-padded together: the same replies as one at a time
    chats = [[{"role": "user", "content": p}] for p, _ in PAIRS]
    one_by_one = [generate_replies(model, tok, [c], max_new_tokens=40)[0] for c in chats]
    assert generate_replies(model, tok, chats, max_new_tokens=40, batch_size=len(chats)) == one_by_one
    assert one_by_one[:2] == [r for _, r in PAIRS[:2]]


def test_saved_tokenizer_keeps_template_and_eos(tmp_path):
    from transformers import AutoTokenizer

    tok = _plain_tokenizer()
    task, _ = _task(tok, [_chat("Hi", "Hello.")])
    tok.save_pretrained(str(tmp_path))
    again = AutoTokenizer.from_pretrained(str(tmp_path))
    assert again.chat_template == tok.chat_template and again.eos_token == "</s>"
    f = encode_conversation(again, _chat("Hi", "Hello.")["messages"], again.eos_token_id)
    assert again.decode([t for t in f["labels"] if t != -100]) == "Hello.</s>"


@pytest.mark.parametrize("variant", ["newline", "rewrite"])
def test_templates_that_render_earlier_turns_differently(tok_dir, variant):
    """Templates whose earlier turns are not token prefixes of the whole chat fall back to char offsets."""
    tok = _tokenizer(tok_dir)
    older = "'\\n\\n'" if variant == "newline" else "'\\n'"
    mark = "''" if variant == "newline" else "'[old]\\n'"
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ " + mark + " }}{% endif %}"
        "{{ m['content'] + '<|im_end|>' }}{% if loop.last %}{{ '\\n' }}{% else %}{{ " + older + " }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    msgs = [{"role": "user", "content": "Hello world"}, {"role": "assistant", "content": "Hello, how are you?"},
            {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Blue is a color."}]
    task, loaded = _task(tok, [{"messages": msgs}])
    (f,) = task.features(loaded, train=True)
    assert _labelled(tok, f) == "Hello, how are you?<|im_end|>Blue is a color.<|im_end|>"


@pytest.fixture(scope="module")
def ws_tok_dir(tmp_path_factory):
    """A tokenizer whose vocabulary merges runs of newlines and spaces."""
    from lmforge.tokenizer.bpe import train_bpe

    path = tmp_path_factory.mktemp("sft_ws_tok")
    train_bpe([TEXT.replace(". ", "." + chr(10) * 3 + "  ")], 400, path)  # blank lines, indents: whitespace merges
    return path


def test_a_reply_starting_with_whitespace_is_trained_on_the_prompt_inference_sends(ws_tok_dir):
    """The template's 'assistant\\n' and a reply's leading newline or spaces merge into one token when the whole
    chat is tokenized at once; the prompt serve/chat/predict encode ends in a lone '\\n' and must be what
    training shows before the reply."""
    from lmforge.tasks.sft import encode_text, render, setup_chat

    tok = _tokenizer(ws_tok_dir)
    setup_chat(tok)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    merged = 0
    for reply in ("\n\nTwo plus two is four.", "  Paris is the capital.", "Blue is a color."):
        msgs = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": reply}]
        prompt = encode_text(tok, render(tok, msgs[:1], add_generation_prompt=True))
        merged += encode_text(tok, render(tok, msgs))[:len(prompt)] != prompt
        f = encode_conversation(tok, msgs, end_id)
        assert f["input_ids"][:len(prompt)] == prompt
        first = next(i for i, x in enumerate(f["labels"]) if x != -100)
        assert first == len(prompt) and tok.decode([x for x in f["labels"] if x != -100]) == reply + "<|im_end|>"
    assert merged  # the case arises with this tokenizer: whole-text tokens do run across the boundary


# a template that ends a reply with no special token: fine-tuning closes each reply with EOS itself
BARE_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ 'User: ' + m['content'] + '\n' }}"
                 "{% else %}{{ 'Assistant: ' + m['content'] + '\n' }}{% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}")


@pytest.mark.parametrize("template", ["chatml", "plain", "bare"])
def test_every_later_turn_is_trained_on_the_prompt_inference_encodes(ws_tok_dir, template):
    """In a multi-turn chat, an earlier reply starting with whitespace keeps the tokens it was trained as in every
    later prompt, in training and in encode_prompt (predict, chat, serve) alike; tokenizing the whole history at
    once would merge that whitespace into the template's newline, a prompt the model never saw. With a template
    that writes no end token, each earlier reply in the prompt ends with the EOS that training closed it with."""
    import random

    from lmforge.tasks.sft import (detect_end_of_turn, encode_prompt, encode_text, plain_chat_template, render,
                                   setup_chat)

    tok = _tokenizer(ws_tok_dir)
    if template == "plain":
        tok.chat_template = plain_chat_template(tok.eos_token)
    elif template == "bare":
        tok.chat_template = BARE_TEMPLATE
    setup_chat(tok)
    end_id = tok.convert_tokens_to_ids(detect_end_of_turn(tok) or tok.eos_token)
    rng = random.Random(0)
    pieces = ["Hello", " world", "\n", "\n\n", "  ", "Paris is the capital.", " no", "\t", "ok ", "Blue"]
    whole_differs = 0
    for _ in range(60):
        msgs = []
        for _ in range(rng.randint(2, 4)):
            msgs += [{"role": role, "content": "".join(rng.choice(pieces) for _ in range(rng.randint(1, 4)))}
                     for role in ("user", "assistant")]
        f = encode_conversation(tok, msgs, end_id)
        labels = f["labels"]
        starts = [k for k in range(len(labels)) if labels[k] != -100 and (k == 0 or labels[k - 1] == -100)]
        replies = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        assert len(starts) == len(replies)
        for n, (k, i) in enumerate(zip(starts, replies)):
            prompt = encode_prompt(tok, msgs[:i])
            assert prompt == f["input_ids"][:k], (msgs, i)
            if template == "bare":
                assert prompt.count(end_id) == n  # every earlier reply closed with EOS, as training closed it
            whole_differs += encode_text(tok, render(tok, msgs[:i], add_generation_prompt=True)) != f["input_ids"][:k]
    assert whole_differs  # the case arises: whole-text tokens of the history are not what was trained
    from types import SimpleNamespace

    from lmforge.serve.app import _chat_prompt

    served = SimpleNamespace(served=SimpleNamespace(tokenizer=tok, context_length=4096))
    assert _chat_prompt(served, msgs[:replies[-1]]) == f["input_ids"][:starts[-1]]


def _with_specials(tok, template, *specials):
    tok.add_special_tokens({"additional_special_tokens": list(specials)})
    tok.chat_template = template
    return tok


# Mistral-7B-Instruct-v0.3's template (its tools branch left out): the system message goes into the last user turn
# only, so a chat ending with a reply has none, and the prompt for that reply is not a prefix of the chat
MISTRAL_V3 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}{%- endif %}"
    "{%- endfor %}")


def test_a_reply_also_written_in_the_user_turn_is_labelled_where_the_reply_is(tok_dir):
    tok = _with_specials(_tokenizer(tok_dir), MISTRAL_V3, "[INST]", "[/INST]")
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Is the sky blue? Answer yes or no."},
            {"role": "assistant", "content": "yes"}, {"role": "user", "content": "Say no or yes."},
            {"role": "assistant", "content": " no "}]
    task, loaded = _task(tok, [{"messages": msgs}])
    (f,) = task.features(loaded, train=True)
    assert _labelled(tok, f) == " yes<|endoftext|> no<|endoftext|>"
    unlabelled = _unlabelled(tok, f)
    assert "Answer yes or no." in unlabelled and "Say no or yes." in unlabelled


def test_the_input_field_option_is_appended_to_the_instruction(tok_dir, tmp_path):
    tok = _tokenizer(tok_dir)
    path = tmp_path / "dolly.jsonl"
    path.write_text(json.dumps({"instruction": "Summarise the text.", "context": "Two plus two is four.",
                                "response": "Four."}) + "\n")
    task = SFTTask(FinetuneConfig(task="sft", input_field="context"))
    loaded = load_examples(str(path), "sft", task.fields())
    assert loaded.rows[0]["messages"][0]["content"] == "Summarise the text.\n\nTwo plus two is four."
    task.prepare(tok, loaded, {})
    assert _labelled(tok, task.features(loaded, train=True)[0]) == "Four.<|im_end|>"


# Gemma's template: no system role, strictly alternating user/model turns
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}")


def test_a_system_message_goes_into_the_first_user_turn_where_the_template_has_no_system_role(
        tok_dir, tmp_path, monkeypatch, capsys):
    """As lmforge chat sends it: training, evaluation samples and predict prompt the model alike."""
    import lmforge.tasks.sft as sft

    tok = _with_specials(_tokenizer(tok_dir), GEMMA, "<start_of_turn>", "<end_of_turn>")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"},
            {"role": "assistant", "content": "Hello, how are you?"}]
    task, loaded = _task(tok, [{"messages": msgs}], eval_samples=1, max_new_tokens=2)
    assert "sent as part of the first user message" in capsys.readouterr().out
    (f,) = task.features(loaded, train=True)
    assert _labelled(tok, f) == "Hello, how are you?<end_of_turn>"
    first = next(i for i, t in enumerate(f["labels"]) if t != -100)
    trained_prompt = f["input_ids"][:first]
    assert tok.decode(trained_prompt).endswith("<start_of_turn>user\nBe brief.\n\nHello world<end_of_turn>\n"
                                               "<start_of_turn>model\n")

    prompts = []
    real = sft.generate_batch

    def generate_batch(model, tokenizer, batch_prompts, *args, **kwargs):
        prompts.extend(batch_prompts)
        return real(model, tokenizer, batch_prompts, *args, **kwargs)

    monkeypatch.setattr(sft, "generate_batch", generate_batch)
    model = task.load_model(_tiny_llama(tok, tmp_path / "base"))
    task.evaluate(model, loaded, contextlib.nullcontext, "cpu", 8)
    generate_replies(model, tok, [msgs[:2]], max_new_tokens=2)
    assert prompts == [trained_prompt, trained_prompt]
    # and lmforge serve's chat endpoint prompts it so too (it answered 400 before)
    from types import SimpleNamespace

    from lmforge.serve.app import _chat_prompt

    assert _chat_prompt(SimpleNamespace(served=SimpleNamespace(tokenizer=tok, context_length=2048)), msgs[:2]) == trained_prompt


def test_a_conversation_the_template_rejects_is_a_clear_error(tok_dir):
    from lmforge.errors import LmforgeError

    tok = _with_specials(_tokenizer(tok_dir), GEMMA, "<start_of_turn>", "<end_of_turn>")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "user", "content": "Hello?"},
            {"role": "assistant", "content": "Fine."}]
    task, loaded = _task(tok, [_chat("Hi", "Fine."), {"messages": msgs}])
    with pytest.raises(LmforgeError, match=r"chats.jsonl:2: the chat template rejects the conversation "
                                           r"\(TemplateError: Conversation roles must alternate"):
        task.features(loaded, train=True)


def _bos_tokenizer():
    """Like Llama 2's and Mistral's base tokenizers: <s> before every text by default, no chat template."""
    from tokenizers import processors

    tok = _plain_tokenizer(bos=True)
    bos = tok.convert_tokens_to_ids("<s>")
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    return tok


def test_plain_template_starts_with_bos_where_the_tokenizer_adds_one():
    tok = _bos_tokenizer()
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id
    task, loaded = _task(tok, [_chat("Hello world", "I am fine, thanks.")])
    (f,) = task.features(loaded, train=True)
    assert tok.decode(f["input_ids"]) == "<s>### User:\nHello world\n\n### Assistant:\nI am fine, thanks.</s>\n\n"
    assert f["input_ids"].count(tok.bos_token_id) == 1 and _labelled(tok, f) == "I am fine, thanks.</s>"


def _label_runs(feat) -> list[tuple[int, int]]:
    """[a, b) of each run of labelled positions."""
    runs = []
    for k, lab in enumerate(feat["labels"]):
        if lab == -100:
            continue
        if runs and runs[-1][1] == k:
            runs[-1] = (runs[-1][0], k + 1)
        else:
            runs.append((k, k + 1))
    return runs


def test_an_earlier_reply_starting_with_whitespace_is_labelled_from_right_after_its_header(ws_tok_dir):
    """In a later turn's prompt the first reply's leading spaces merge with its header's newline; its tokens stay as
    its own turn's prompt has them, so its labels still start after that newline, not on it."""
    from lmforge.tasks.sft import encode_text, render, setup_chat

    tok = _tokenizer(ws_tok_dir)
    setup_chat(tok)
    msgs = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "  Paris is the capital."},
            {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Blue is a color."}]
    first_prompt = encode_text(tok, render(tok, msgs[:1], add_generation_prompt=True))
    assert encode_text(tok, render(tok, msgs[:3], add_generation_prompt=True))[:len(first_prompt)] != first_prompt
    f = encode_conversation(tok, msgs, tok.convert_tokens_to_ids("<|im_end|>"))
    (a1, b1), (a2, b2) = _label_runs(f)
    assert f["input_ids"][:a1] == first_prompt
    assert tok.decode(f["input_ids"][a1:b1]) == "  Paris is the capital.<|im_end|>"
    assert tok.decode(f["input_ids"][:a2]) == render(tok, msgs[:3], add_generation_prompt=True)
    assert tok.decode(f["input_ids"][a2:b2]) == "Blue is a color.<|im_end|>"


def test_a_template_whose_replies_carry_a_header_the_generation_prompt_does_not_write_is_refused(tok_dir):
    from lmforge.errors import LmforgeError
    from lmforge.tasks.sft import setup_chat

    tok = _tokenizer(tok_dir)
    tok.chat_template = ("{% for m in messages %}"  # ChatML with no add_generation_prompt branch
                         "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}")
    setup_chat(tok)  # inference with it (chat, predict) is not refused
    with pytest.raises(LmforgeError, match=r"writes no generation prompt .* start with '<\|im_start\|>assistant\\n'"):
        _task(tok, [_chat("Hello world", "Blue is a color.")])


LLAMA2 = ("{{ bos_token }}{% for m in messages %}"
          "{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
          "{% elif m['role'] == 'assistant' %}{{ ' ' + m['content'] + ' ' + eos_token }}{% endif %}{% endfor %}")
# Qwen3 with thinking off: the generation prompt writes an empty '<think>' block, which the last reply carries too
QWEN3 = ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
         "{% if loop.last %}{{ '<think>\\n\\n</think>\\n\\n' }}{% endif %}{{ m['content'] + '<|im_end|>\\n' }}"
         "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' }}{% endif %}")


@pytest.mark.parametrize("template, labelled", [(LLAMA2, " Blue is a color. <|endoftext|>"),
                                                (QWEN3, "Blue is a color.<|im_end|>")], ids=["llama2", "qwen3"])
def test_templates_whose_generation_prompt_ends_where_the_reply_starts_are_accepted(tok_dir, template, labelled):
    tok = _with_specials(_tokenizer(tok_dir), template, "[INST]", "[/INST]", "<think>", "</think>")
    task, loaded = _task(tok, [_chat("Hello world", "Blue is a color.")])
    assert _labelled(tok, task.features(loaded, train=True)[0]) == labelled
