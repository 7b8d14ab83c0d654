"""The finetune recipe end to end on tiny random models: every task, LoRA, resume, predict/evaluate, bad data."""
from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_user_error, cli, cli_signalled, cli_subprocess, metrics_rows, torchrun


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


POS = ["a wonderful, moving film", "great acting and a clever story", "I loved every minute", "brilliant and funny",
       "a joy to watch", "superb direction"]
NEG = ["a dull, boring mess", "terrible acting and a silly plot", "I hated every minute", "tedious and flat",
       "a waste of time", "awful direction"]


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, width-32 BERT with the packaged MiniLM tokenizer, saved as an HF folder."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lmforge.model.hub import resolve_model

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(resolve_model("minilm-l6"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=128))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def sentiment(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("sentiment")
    train = [{"text": t, "label": "pos"} for t in POS] * 4 + [{"text": t, "label": "neg"} for t in NEG] * 4
    val = [{"sentence": t, "label": "pos"} for t in POS[:3]] + [{"sentence": t, "label": "neg"} for t in NEG[:3]]
    return _write_jsonl(d / "train.jsonl", train), _write_jsonl(d / "val.jsonl", val)


def test_classify_end_to_end_loads_with_plain_transformers(tiny_bert, sentiment, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train, val = sentiment
    out = tmp_path / "run"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val,
              "--out", out, "--epochs", "2", "--batch-size", "8", "--lr", "1e-3", "--no-progress",
              "--precision", "bf16")  # what auto picks on CPUs with native bf16; emulated (slower) elsewhere
    assert res.code == 0, res.err
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["validation"]) >= {"accuracy", "macro_f1", "per_class", "confusion_matrix"}
    assert metrics["validation"]["n"] == 6
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert set(model.config.id2label.values()) == {"neg", "pos"}
    preds = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 6 and set(preds[0]["probabilities"]) == {"neg", "pos"}
    assert (out / "config.yaml").exists() and (out / "final" / "lmforge_config.yaml").exists()
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "final").stat().st_mode & 0o777 == 0o777 & ~umask  # as save_pretrained's (mkdtemp's is 0700)
    # fine-tuned on single texts: a second text is refused, not scored as a pair it never saw
    assert_user_error(cli("predict", "--model", out, "--text", "fine", "--text-pair", "bad"), "single texts")
    from fastapi.testclient import TestClient

    from lmforge.serve import create_app
    with TestClient(create_app(out / "final", model_name="m", device="cpu")) as tc:
        r = tc.post("/v1/classify", json={"input": "fine", "text_pair": "bad"})
        assert r.status_code == 400 and "single texts" in r.json()["error"]["message"]
        assert tc.post("/v1/classify", json={"input": "fine"}).status_code == 200
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["attention"] == "eager"  # CPU bf16 trains with eager attention; the saved model keeps its default
    assert "precision bf16 (fp32 to evaluate), eager attention" in res.out
    assert not any("attn" in k for k in json.loads((out / "final" / "config.json").read_text()))

    pred = cli("predict", "--model", out, "--text", "a wonderful film", "dull")
    assert pred.code == 0, pred.err
    lines = [json.loads(x) for x in pred.out.splitlines()]
    assert len(lines) == 2 and lines[0]["label"] in ("pos", "neg")
    assert abs(sum(lines[0]["scores"].values()) - 1) < 1e-3

    # unlabelled input files: the text field alone; a record without one is named by file and line
    unlabelled = _write_jsonl(tmp_path / "in.jsonl", [{"sentence": "a wonderful film"}, {"text": "dull"}])
    pred = cli("predict", "--model", out, "--input", unlabelled)
    assert pred.code == 0, pred.err
    assert [json.loads(x)["label"] for x in pred.out.splitlines()] == [x["label"] for x in lines]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"review_body": "no known field"}])
    assert_user_error(cli("predict", "--model", out, "--input", bad), "bad.jsonl:2")

    # evaluate needs labels; its hint names its own --field option, not finetune's --label-field
    assert_user_error(cli("evaluate", "--model", out, "--data", unlabelled), "in.jsonl:1", "--field label=NAME")
    ev = cli("evaluate", "--model", out, "--data", val)
    assert ev.code == 0, ev.err
    assert json.loads(ev.out)["accuracy"] == pytest.approx(metrics["validation"]["accuracy"])
    # finetune's own scores are those of the saved model as `evaluate` runs it by default: fp32, the saved attention
    # kernel (not bf16 autocast with the eager kernel that training used, which move the probabilities)
    ev = cli("evaluate", "--model", out, "--data", val, "--batch-size", "64", "--predictions", tmp_path / "ev.jsonl")
    assert ev.code == 0, ev.err
    again = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert [r["probabilities"] for r in again] == [r["probabilities"] for r in preds]


def test_predict_reads_the_field_the_training_data_had(tiny_bert, tmp_path):
    # 'review'/'sentiment' are guessed at training; unlabelled rows with a 'review' field must predict too
    rows = [{"review": t, "sentiment": "pos"} for t in POS] + [{"review": t, "sentiment": "neg"} for t in NEG]
    train = _write_jsonl(tmp_path / "train.jsonl", rows * 2)
    out = tmp_path / "run"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--out", out,
              "--max-steps", "2", "--batch-size", "8", "--no-progress")
    assert res.code == 0, res.err
    saved = yaml.safe_load((out / "final" / "lmforge_config.yaml").read_text())
    assert saved["data_fields"] == {"text": "review", "label": "sentiment"}
    unlabelled = _write_jsonl(tmp_path / "in.jsonl", [{"Review": "a joy to watch"}, {"text": "dull"}])
    pred = cli("predict", "--model", out, "--input", unlabelled)
    assert pred.code == 0, pred.err
    assert len(pred.out.splitlines()) == 2
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"comment": "no known field"}])
    assert_user_error(cli("predict", "--model", out, "--input", bad), "bad.jsonl:1", "review")
    assert_user_error(cli("predict", "--model", out, "--input", bad, "--field", "txt=comment"),
                      "unknown role 'txt'", "did you mean 'text'")
    pred = cli("predict", "--model", out, "--input", bad, "--field", "text=comment")  # or say which field
    assert pred.code == 0, pred.err
    assert json.loads(pred.out)["text"] == "no known field"


def test_predict_and_serve_truncate_as_the_classifier_was_trained():
    # evaluate scores with the fine-tuning max_length (128 by default); predict/serve used 512, so a long
    # review could get another label from `predict` than from `evaluate`
    from lmforge.tasks.classify import trained_max_length

    assert trained_max_length({"finetune": {"max_length": 0}}, 512) == 128
    assert trained_max_length({"finetune": {"max_length": 64}}, 512) == 64
    assert trained_max_length({}, 512) == 512  # a classifier lmforge did not fine-tune keeps its own limit


def test_attention_kernel_choice():
    from lmforge.recipes.finetune import _attention

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert _attention("auto", "bf16", cpu, 128) == "eager"  # the slow CPU flash backward is avoided
    assert _attention("auto", "fp32", cpu, 128) is None and _attention("auto", "bf16", cuda, 128) is None
    assert _attention("auto", "bf16", cpu, 4096) is None
    assert _attention("sdpa", "bf16", cpu, 128) == "sdpa"


def test_classify_learns_a_separable_task(tiny_bert, sentiment, tmp_path):
    train, _ = sentiment
    out = tmp_path / "run"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", train,
              "--out", out, "--epochs", "15", "--batch-size", "8", "--lr", "3e-3", "--no-progress",
              "--precision", "fp32")
    assert res.code == 0, res.err
    assert json.loads((out / "metrics.json").read_text())["validation"]["accuracy"] >= 0.9


def test_lora_merged_and_adapter(tiny_bert, sentiment, tmp_path):
    from transformers import AutoModelForSequenceClassification

    train, val = sentiment
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val,
              "--out", tmp_path / "merged", "--lora", "--max-steps", "3", "--batch-size", "8", "--no-progress")
    assert res.code == 0, res.err
    m = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    assert m["trained_parameters"] < m["parameters"] / 2
    assert not (tmp_path / "merged" / "final" / "adapter_config.json").exists()
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged" / "final")
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val,
              "--out", tmp_path / "adapter", "--lora", "--save-adapter", "--max-steps", "2", "--batch-size", "8",
              "--no-progress")
    assert res.code == 0, res.err
    final = tmp_path / "adapter" / "final"
    assert (final / "adapter_config.json").exists() and not (final / "config.json").exists()
    # lmforge reads the adapter as a model: merged onto its base once (cached), head and class names included
    saved = json.loads((tmp_path / "adapter" / "metrics.json").read_text())["validation"]
    cache = Path(os.environ["LMFORGE_CACHE"]) / "models" / "merged"
    before = set(cache.iterdir()) if cache.exists() else set()
    res = cli("evaluate", "--model", tmp_path / "adapter", "--task", "classify", "--data", val)
    assert res.code == 0, res.err
    assert json.loads(res.out)["accuracy"] == saved["accuracy"]
    assert "merging LoRA adapter" in res.err
    res = cli("predict", "--model", final, "--text", "a joy to watch")
    assert res.code == 0, res.err
    assert "merging" not in res.err  # the cached merge is reused
    (first,) = set(cache.iterdir()) - before
    # the adapter changes in place (as a retrain to the same --out changes it): merged again, the stale copy removed
    acfg = json.loads((final / "adapter_config.json").read_text())
    (final / "adapter_config.json").write_text(json.dumps(acfg, indent=1))
    res = cli("predict", "--model", final, "--text", "a joy to watch")
    assert res.code == 0 and "merging LoRA adapter" in res.err, res.err
    (second,) = set(cache.iterdir()) - before
    assert second != first and not first.exists()
    pred = json.loads(res.out.splitlines()[-1])
    assert pred["label"] in ("pos", "neg") and set(pred["scores"]) == {"pos", "neg"}
    # a checkpoint of a LoRA run is an adapter too
    step = next((tmp_path / "adapter" / "checkpoints").glob("step-*"))
    assert cli("predict", "--model", step, "--text", "a joy to watch").code == 0
    # given to a causal-LM verb, a classifier's adapter is refused by the name given, before any merge
    merged_before = set(cache.iterdir())
    for args in (["generate", "--model", step, "--prompt", "hi"],
                 ["pretrain", "--init-from", step, "--data", val, "--out", tmp_path / "pt"]):
        assert_user_error(cli(*args), str(step), "LoRA adapter of a classify model", "not a causal LM model")
    assert set(cache.iterdir()) == merged_before
    # plain peft loads it, given the head recorded beside it
    from peft import AutoPeftModelForSequenceClassification

    head = json.loads((final / "lmforge_model_config.json").read_text())
    assert head["id2label"] == {"0": "neg", "1": "pos"} or head["id2label"] == {"0": "pos", "1": "neg"}
    AutoPeftModelForSequenceClassification.from_pretrained(final, num_labels=2, id2label=head["id2label"])
    # a base model that is not there any more is named, not a traceback
    moved = tmp_path / "moved"
    shutil.copytree(final, moved)
    acfg = json.loads((moved / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = str(tmp_path / "gone")
    (moved / "adapter_config.json").write_text(json.dumps(acfg))
    extras = yaml.safe_load((moved / "lmforge_config.yaml").read_text())
    extras["finetune"]["model"] = str(tmp_path / "gone")
    (moved / "lmforge_config.yaml").write_text(yaml.safe_dump(extras))
    assert_user_error(cli("predict", "--model", moved, "--text", "fine"), "is not on this machine", "gone")


def test_lora_wrapping_is_the_model_that_is_saved(tiny_bert, tiny_run):
    import copy

    from transformers import AutoModelForCausalLM, AutoModelForQuestionAnswering, AutoTokenizer

    from lmforge.errors import LmforgeError
    from lmforge.recipes.finetune import FinetuneConfig, _wrap_lora
    from lmforge.tasks import get_task

    def wrapped(task, model, **kw):
        cfg = FinetuneConfig(task=task, lora=True, **kw)
        peft_model = _wrap_lora(cfg, model, get_task(task)(cfg)).eval()
        torch.manual_seed(0)
        for n, p in peft_model.named_parameters():  # as if trained
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.05)
        return peft_model

    # QA on BERT: PEFT's QA wrapper dropped token_type_ids, so training saw another model than DIR/final
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    qa = wrapped("qa", AutoModelForQuestionAnswering.from_pretrained(tiny_bert))
    batch = tok("Who?", "Bob did it.", return_tensors="pt")
    with torch.no_grad():
        merged = copy.deepcopy(qa).merge_and_unload()
        torch.testing.assert_close(qa(**batch).start_logits, merged(**batch).start_logits, atol=1e-5, rtol=0)
    # a tied decoder's lm_head is its input embeddings too: merged, an adapter there changed both
    with pytest.raises(LmforgeError, match="ties its input and output embeddings"):
        wrapped("sft", AutoModelForCausalLM.from_pretrained(tiny_run.final), lora_targets=["q_proj", "lm_head"])
    # a mistyped target is named, not dropped
    with pytest.raises(LmforgeError, match="v_prj is not a module.*did you mean 'v_proj'"):
        wrapped("sft", AutoModelForCausalLM.from_pretrained(tiny_run.final), lora_targets=["q_proj", "v_prj"])
    wrapped("sft", AutoModelForCausalLM.from_pretrained(tiny_run.final), lora_targets=["model.layers.0.self_attn.k_proj"])


def test_keep_checkpoints_keeps_the_newest_and_the_best(tiny_bert, sentiment, tmp_path):
    train, val = sentiment
    out = tmp_path / "run"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val,
              "--batch-size", "4", "--epochs", "1", "--evals-per-epoch", "4", "--keep-checkpoints", "2",
              "--no-progress", "--precision", "fp32", "--out", out)
    assert res.code == 0, res.err
    evaluated = [r["step"] for r in metrics_rows(out) if "val_accuracy" in r]
    assert len(evaluated) >= 4
    best = json.loads((out / "metrics.json").read_text())["best_step"]
    kept = sorted(int(p.name[5:]) for p in (out / "checkpoints").glob("step-*"))
    assert kept == sorted(set(evaluated[-2:]) | {best})


def test_resume_matches_uninterrupted(tiny_bert, sentiment, tmp_path):
    train, val = sentiment
    common = ["--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val, "--batch-size", "4",
              "--epochs", "2", "--evals-per-epoch", "2", "--no-progress", "--precision", "fp32"]
    assert cli("finetune", *common, "--out", tmp_path / "a").code == 0
    b = tmp_path / "b"
    res = cli("finetune", *common, "--out", b, "--stop-after-steps", "7")  # mid-epoch, after an evaluation
    assert res.code == 0, res.err
    state = torch.load(b / "checkpoints" / "step-000007" / "lmforge_state" / "trainer.pt", weights_only=True)
    assert state["step"] == 7 and {"optimizer", "scheduler", "rng", "data_position"} <= set(state)
    res = cli("finetune", "--out", b, "--resume", "--no-progress")
    assert res.code == 0, res.err
    rows_a, rows_b = metrics_rows(tmp_path / "a"), metrics_rows(b)
    for key in ("loss", "val_accuracy", "val_macro_f1"):
        seq_a = [(r["step"], r[key]) for r in rows_a if key in r]
        seq_b = [(r["step"], r[key]) for r in rows_b if key in r]
        assert len(seq_a) >= 2 and len(seq_a) == len(seq_b), key
        for (sa, va), (sb, vb) in zip(seq_a, seq_b):
            assert sa == sb and va == pytest.approx(vb, abs=1e-5), (key, sa, va, vb)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "a", b))
    assert ma["validation"]["accuracy"] == mb["validation"]["accuracy"] and ma["best_step"] == mb["best_step"]
    # resumed once finished: nothing is evaluated or written again
    before = {p.name: p.stat().st_mtime_ns for p in (b / "metrics.json", b / "predictions.jsonl", b / "final")}
    res = cli("finetune", "--out", b, "--resume", "--no-progress")
    assert res.code == 0 and "finished run" in res.out and "validation" not in res.out, res.out
    assert before == {p.name: p.stat().st_mtime_ns for p in (b / "metrics.json", b / "predictions.jsonl", b / "final")}
    # a kill between the two renames that replace DIR/final: its only copy is .old-final-PID, beside an
    # unfinished .tmp-final-*; --resume puts it back and clears the rest
    (b / "final").rename(b / ".old-final-4242")
    (b / ".tmp-final-abc_12de").mkdir()
    (b / ".tmp-final-2-abc_12de").mkdir()  # another folder's (final-2): not this one's to touch
    res = cli("finetune", "--out", b, "--resume", "--no-progress")
    assert res.code == 0 and "finished run" in res.out, res.out
    assert (b / "final" / "config.json").exists()
    assert sorted(p.name for p in b.glob(".*")) == [".tmp-final-2-abc_12de"]


def test_resume_refuses_training_data_that_changed(tiny_bert, sentiment, tmp_path):
    """A checkpoint's data position indexes its own data set's order: on edited data it would repeat or skip
    examples, so --resume names the change instead."""
    train, val = sentiment
    mine = tmp_path / "train.jsonl"
    mine.write_text(train.read_text())
    out = tmp_path / "run"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", mine, "--validation", val,
              "--out", out, "--batch-size", "4", "--epochs", "2", "--no-progress", "--stop-after-steps", "2")
    assert res.code == 0, res.err
    with mine.open("a") as f:
        f.write(json.dumps({"text": "One more review, added after the stop.", "label": "pos"}) + "\n")
    assert_user_error(cli("finetune", "--out", out, "--resume", "--no-progress"), "training data", "step-000002",
                      "not what", "start a new run")
    mine.write_text(train.read_text())  # the data as it was: the run goes on
    res = cli("finetune", "--out", out, "--resume", "--no-progress")
    assert res.code == 0 and "resuming from" in res.out, res.err


def test_a_stop_after_an_evaluation_saves_once_and_damage_is_named(tiny_bert, sentiment, tmp_path, monkeypatch):
    from lmforge.train import checkpoint as ckpt

    train, val = sentiment
    saves = []
    real = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda out_dir, step, *a, **kw: saves.append(step) or real(
        out_dir, step, *a, **kw))
    out = tmp_path / "s"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val,
              "--batch-size", "4", "--evals-per-epoch", "4", "--out", out, "--stop-after-steps", "3", "--no-progress")
    assert res.code == 0, res.err
    assert saves == [3]  # evaluated and saved at step 3, then stopped there: one write
    trainable = out / "checkpoints" / "step-000003" / "lmforge_state" / "trainable.safetensors"
    trainable.write_bytes(trainable.read_bytes()[:50])
    assert_user_error(cli("finetune", "--out", out, "--resume", "--no-progress"), "step-000003",
                      "damaged checkpoint", "start the run again")


def test_fp16_trains_through_a_grad_scaler(tiny_bert, sentiment, tmp_path, monkeypatch):
    """fp16 (GPUs without bf16) scales the loss; the scale is saved with the checkpoint and a resume finishes. The
    model is stored in fp16, as OPT or Llama-2 are: it must train from fp32 master weights (the scaler refuses
    fp16 gradients)."""
    from transformers import AutoModel, AutoTokenizer

    from lmforge.train import common

    half = tmp_path / "tiny-bert-fp16"
    AutoModel.from_pretrained(tiny_bert).half().save_pretrained(half)
    AutoTokenizer.from_pretrained(tiny_bert).save_pretrained(half)
    assert "float16" in (half / "config.json").read_text()
    monkeypatch.setattr(common, "resolve_precision", lambda precision, device: "fp16")
    train, val = sentiment
    out = tmp_path / "fp16"
    res = cli("finetune", "--task", "classify", "--model", half, "--train", train, "--validation", val,
              "--batch-size", "4", "--max-steps", "6", "--evals-per-epoch", "1", "--no-progress", "--out", out,
              "--stop-after-steps", "3")
    assert res.code == 0, res.err
    assert "precision fp16" in res.out
    state = torch.load(out / "checkpoints" / "step-000003" / "lmforge_state" / "trainer.pt", weights_only=True)
    assert state["grad_scaler"]["scale"] > 0
    res = cli("finetune", "--out", out, "--resume", "--no-progress")
    assert res.code == 0, res.err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_ctrl_c_saves_a_checkpoint_that_resumes(tiny_bert, sentiment, tmp_path):
    train, val = sentiment
    out = tmp_path / "run"
    res = cli_signalled("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val,
                        "--out", out, "--max-steps", "400", "--batch-size", "4", "--no-progress",
                        out_dir=out, sig=signal.SIGINT)
    assert res.returncode == 130, res.stderr  # a stopped run is not a finished one: exit as Ctrl-C exits
    assert "Traceback" not in res.stderr and "stopped at step" in res.stdout, res.stdout
    stopped = int(res.stdout.split("stopped at step ")[1].split(";")[0])
    assert 10 <= stopped < 400 and not (out / "final").exists()
    assert (out / "checkpoints" / f"step-{stopped:06d}" / "lmforge_state").is_dir()
    res = cli("finetune", "--out", out, "--resume", "--no-progress")
    assert res.code == 0, res.err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 400 and (out / "final").is_dir()


def test_two_processes_with_torchrun_and_max_minutes(tiny_bert, sentiment, tmp_path):
    # each rank fits --max-minutes on its own clock; Runtime.agree makes them stop on the same step
    train, val = sentiment
    out = tmp_path / "ddp"
    res = torchrun("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val,
                   "--out", out, "--max-minutes", "0.15", "--batch-size", "2", "--no-progress")
    assert "--max-minutes 0.15: about" in res.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] >= 13 and (out / "final" / "config.json").is_file()


def test_a_step_weights_every_reply_token_alike_over_micro_batches_and_processes(tiny_run, tmp_path):
    """One batch of 4, two micro-batches of 2 (--grad-accum 2) and two processes of 2 train to the same weights
    (fp32): the loss is the mean over the step's reply tokens, not a mean of per-batch means, which weighted a
    token of a short reply above one of a long reply. 7 examples: the epoch's last step is short, and used."""
    from safetensors.torch import load_file

    words = ["king", "queen", "lord", "lady", "duke", "earl", "page"]
    rows = [{"prompt": f"Say {w}.", "response": " ".join([w] * (1 + 3 * (i % 3)))} for i, w in enumerate(words)]
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    args = ("finetune", "--task", "sft", "--model", tiny_run.final, "--train", data, "--validation", data,
            "--epochs", "1", "--lr", "1e-3", "--precision", "fp32", "--no-group-by-length", "--no-progress",
            "--max-new-tokens", "2", "--eval-samples", "0")
    assert cli(*args, "--batch-size", "4", "--out", tmp_path / "one").code == 0
    assert cli(*args, "--batch-size", "2", "--grad-accum", "2", "--out", tmp_path / "accum").code == 0
    torchrun(*args, "--batch-size", "2", "--out", tmp_path / "ddp")
    ref = load_file(tmp_path / "one" / "final" / "model.safetensors")
    for run in ("accum", "ddp"):
        assert json.loads((tmp_path / run / "metrics.json").read_text())["steps"] == 2
        got = load_file(tmp_path / run / "final" / "model.safetensors")
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5, run
    losses = [[r["loss"] for r in metrics_rows(tmp_path / run) if "loss" in r] for run in ("one", "ddp")]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)  # the ranks' shares summed, not rank 0's alone
    # the sft default (512) is cut to the model's 64-token context, and recorded for predict and serve
    assert yaml.safe_load((tmp_path / "one" / "config.yaml").read_text())["max_length"] == 64


def test_max_length_fits_the_model_context(tiny_bert, tmp_path):
    from lmforge.errors import LmforgeError
    from lmforge.recipes.finetune import FinetuneConfig, fit_max_length
    from lmforge.tasks import get_task

    def fit(folder, task="classify", **kw):
        cfg = FinetuneConfig(task=task, **kw)
        return fit_max_length(cfg, get_task(task)(cfg), folder)

    assert fit(tiny_bert, "qa") == 128  # 384 by default; the model has 128 positions
    assert fit(tiny_bert, max_length=100) == 100
    with pytest.raises(LmforgeError, match="--max-length 256: the model reads at most 128 tokens"):
        fit(tiny_bert, max_length=256)
    roberta = tmp_path / "roberta"
    roberta.mkdir()
    (roberta / "config.json").write_text(json.dumps({"model_type": "roberta", "max_position_embeddings": 514}))
    assert fit(roberta, "sft") == 512  # two of its positions come before the first token
    assert fit(tmp_path, "sft") == 512  # a config that says nothing (or none): the task's default


def test_fsdp_matches_ddp_resumes_and_generates(tiny_bert, sentiment, tiny_t5, tmp_path):
    """--fsdp under torchrun: LoRA classification stopped and resumed ends with DDP's weights (fp32), written as
    a plain merged HF folder; a sharded seq2seq model evaluates through generate() (its encoder runs outside
    the model's forward) to the same weights and predictions as DDP."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    def weights(run: Path) -> dict:
        return load_file(run / "final" / "model.safetensors")

    def same(a: Path, b: Path):
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5
        assert (a / "predictions.jsonl").read_text() == (b / "predictions.jsonl").read_text()

    train, val = sentiment
    args = ("finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val, "--lora",
            "--epochs", "2", "--batch-size", "4", "--lr", "1e-3", "--precision", "fp32", "--no-progress")
    torchrun(*args, "--out", tmp_path / "ddp")
    res = torchrun(*args, "--out", tmp_path / "fsdp", "--fsdp", "--stop-after-steps", "4")
    assert "world 2 (FSDP)" in res.stdout and "stopped at step 4" in res.stdout
    assert "Continue with: torchrun --nproc-per-node 2 -m lmforge finetune" in res.stdout
    # a step is world x batch examples: one process cannot continue a two-process run exactly, so it refuses
    assert_user_error(cli("finetune", "--out", tmp_path / "fsdp", "--resume"), "trained by 2 process(es)",
                      "--nproc-per-node 2")
    torchrun("finetune", "--out", tmp_path / "fsdp", "--resume")
    same(tmp_path / "ddp", tmp_path / "fsdp")
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "fsdp" / "final")  # merged, not an adapter

    model_dir, data = tiny_t5
    args = ("finetune", "--task", "translate", "--model", model_dir, "--train", data, "--validation", data,
            "--max-steps", "4", "--batch-size", "4", "--max-new-tokens", "6", "--precision", "fp32", "--no-progress")
    torchrun(*args, "--out", tmp_path / "t5-ddp")
    torchrun(*args, "--out", tmp_path / "t5-fsdp", "--fsdp")
    same(tmp_path / "t5-ddp", tmp_path / "t5-fsdp")


def test_fit_steps_follows_the_pace_and_the_budget():
    from lmforge.recipes.finetune import fit_steps

    # 60 s budget, 10 s gone at step 20, 0.5 s per step, no evaluation timed yet: 10 % of the rest is kept
    assert fit_steps(60, 10, 20, 0.5, None, 100, 10 ** 9) == 20 + 90
    # evaluations of 5 s every 10 steps: 50 s left - the final one = 45 s for steps of 0.5 + 0.5 s
    assert fit_steps(60, 10, 20, 0.5, 5.0, 10, 10 ** 9) == 20 + 45
    assert fit_steps(60, 10, 20, 0.5, None, 100, 50) == 50  # never past --epochs/--max-steps
    assert fit_steps(60, 75, 20, 0.5, 5.0, 10, 10 ** 9) == 21  # over budget (a slowed machine): stop next step


def test_bad_rows_are_named_or_skipped(tiny_bert, tmp_path):
    rows = [{"text": f"good film {i}", "label": 1} for i in range(5)] + \
        [{"text": f"bad film {i}", "label": 0} for i in range(5)]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"text": "oops", "label": \n'
                   + json.dumps({"txt": "no text", "label": 1}) + "\n", encoding="utf-8")
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", bad, "--out", tmp_path / "o",
              "--max-steps", "1", "--no-progress")
    assert_user_error(res, "bad.jsonl:11")
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", bad, "--out", tmp_path / "o",
              "--max-steps", "1", "--no-progress", "--skip-bad-rows")
    assert res.code == 0, res.err
    assert "skipped 2 bad row" in res.out

    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": "meh", "label": 7}, {"text": "fine", "label": 1}])
    good = _write_jsonl(tmp_path / "t.jsonl", rows)
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", good,
              "--validation", val, "--out", tmp_path / "o2", "--max-steps", "1", "--no-progress")
    assert_user_error(res, "val.jsonl:1", "never seen in training")
    assert not (tmp_path / "o2").exists()  # refused before anything was written
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", good, "--validation", val,
              "--out", tmp_path / "o2", "--max-steps", "1", "--no-progress", "--skip-bad-rows")
    assert res.code == 0, res.err
    assert "val.jsonl:1: label 7 never seen in training" in res.out
    assert json.loads((tmp_path / "o2" / "metrics.json").read_text())["validation"]["n"] == 1

    mixed = _write_jsonl(tmp_path / "mixed.jsonl", rows + [{"text": "so so", "label": "1"}])
    assert_user_error(cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", mixed, "--out",
                          tmp_path / "o3", "--max-steps", "1", "--no-progress"),
                      "mixed.jsonl:11:", "would be two classes with one name")


def test_pairs_predict_as_they_were_trained(tiny_bert, tmp_path):
    rows = [{"premise": t, "hypothesis": h, "label": int(h == "yes")} for t in POS + NEG for h in ("yes", "no")]
    out = tmp_path / "pairs"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", _write_jsonl(tmp_path / "t.jsonl", rows),
              "--out", out, "--max-steps", "2", "--batch-size", "8", "--no-progress")
    assert res.code == 0, res.err
    same_premise = [{"premise": "I loved it", "hypothesis": "yes"}, {"premise": "I loved it", "hypothesis": "no"}]
    for rows_in in (same_premise, [dict(r, label=1) for r in same_premise]):  # unlabelled, and labelled
        pred = cli("predict", "--model", out, "--input", _write_jsonl(tmp_path / "in.jsonl", rows_in))
        assert pred.code == 0, pred.err
        got = [json.loads(line) for line in pred.out.splitlines()]
        assert [g["text_pair"] for g in got] == ["yes", "no"]
        assert got[0]["scores"] != got[1]["scores"]  # the second text is read, not dropped
    by_input = got
    # --text: the pair is asked for, not silently dropped
    assert_user_error(cli("predict", "--model", out, "--text", "I loved it"), "text pairs", "--text-pair")
    assert_user_error(cli("predict", "--model", out, "--text", " ", "--text-pair", "yes"), "empty text")
    assert_user_error(cli("predict", "--model", out, "--text", "I loved it", "--text-pair", "yes", "--text-pair",
                          "no"), "--text-pair")
    pred = cli("predict", "--model", out, "--text", "I loved it", "--text", "I loved it", "--text-pair", "yes",
               "--text-pair", "no")
    assert pred.code == 0, pred.err
    assert [json.loads(line)["scores"] for line in pred.out.splitlines()] == [g["scores"] for g in by_input]
    # and so does the server
    from fastapi.testclient import TestClient

    from lmforge.serve import create_app

    with TestClient(create_app(out / "final", model_name="pairs", device="cpu", precision="fp32")) as tc:
        r = tc.post("/v1/classify", json={"input": "I loved it"})
        assert r.status_code == 400 and "text_pair" in r.json()["error"]["message"]
        assert tc.post("/v1/classify", json={"input": ["a", "b"], "text_pair": "c"}).status_code == 400
        r = tc.post("/v1/classify", json={"input": ["I loved it"] * 2, "text_pair": ["yes", "no"]})
        assert r.status_code == 200, r.text
        served = [{x["label"]: x["score"] for x in d["labels"]} for d in r.json()["data"]]
    for s_, g in zip(served, by_input):
        assert served[0] != served[1] and all(abs(s_[k] - v) < 1e-4 for k, v in g["scores"].items())


def test_eval_splits_fail_before_out_is_written(tiny_run, tmp_path):
    chats = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi"}]}
             for i in range(8)]
    train = _write_jsonl(tmp_path / "train.jsonl", chats)
    long = _write_jsonl(tmp_path / "long.jsonl", [{"messages": [{"role": "user", "content": "word " * 200},
                                                                {"role": "assistant", "content": "ok"}]}])
    out = tmp_path / "sft"
    res = cli("finetune", "--task", "sft", "--model", tiny_run.final, "--train", train, "--test", long,
              "--out", out, "--max-steps", "1", "--no-progress", "--max-length", "32")
    assert_user_error(res, "long.jsonl", "--max-length")
    assert not out.exists()  # not after training, with checkpoints and no final/


def test_classify_on_a_saved_datasets_folder_uses_its_splits(tiny_bert, tmp_path):
    import datasets

    rows = {"text": POS + NEG, "label": [1] * len(POS) + [0] * len(NEG)}
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    datasets.DatasetDict({s: datasets.Dataset.from_dict(rows, features=features)
                          for s in ("train", "validation", "test")}).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "run"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", tmp_path / "ds", "--out", out,
              "--max-steps", "2", "--batch-size", "4", "--no-progress")
    assert res.code == 0, res.err
    assert f"validation {len(POS) + len(NEG)} ({tmp_path / 'ds'}:validation)" in res.out
    m = json.loads((out / "metrics.json").read_text())
    assert m["test"]["n"] == len(POS) + len(NEG)  # the folder's own test split
    assert set(json.loads((out / "final" / "config.json").read_text())["id2label"].values()) == {"neg", "pos"}


def test_qa_end_to_end(tiny_bert, tmp_path):
    out = tmp_path / "qa"
    res = cli("finetune", "--task", "qa", "--model", tiny_bert, "--train", "lmforge_qa", "--out", out,
              "--max-steps", "2", "--batch-size", "8", "--max-train-examples", "32", "--max-eval-examples", "8",
              "--max-length", "128", "--doc-stride", "32", "--no-progress")
    assert res.code == 0, res.err
    m = json.loads((out / "metrics.json").read_text())
    assert {"exact_match", "f1"} <= set(m["test"])
    pred = cli("predict", "--model", out, "--question", "Who built it?", "--context", "Noah built the ark.")
    assert pred.code == 0, pred.err
    assert "answer" in json.loads(pred.out)


def test_sft_end_to_end(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [{"prompt": f"Say {w}.", "response": f"{w} {w}"} for w in ("king", "queen", "lord", "lady", "duke")] * 3
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "sft"
    res = cli("finetune", "--task", "sft", "--model", tiny_run.final, "--train", data, "--validation", data,
              "--out", out, "--max-steps", "3", "--batch-size", "4", "--no-progress", "--max-new-tokens", "8")
    assert res.code == 0, res.err
    m = json.loads((out / "metrics.json").read_text())
    assert m["validation"]["perplexity"] > 1 and m["validation"]["loss"] > 0
    tok = AutoTokenizer.from_pretrained(out / "final")
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    AutoModelForCausalLM.from_pretrained(out / "final")
    pred = cli("predict", "--model", out, "--text", "Say king.", "--max-new-tokens", "5")
    assert pred.code == 0, pred.err
    assert "reply" in json.loads(pred.out)


def test_a_sigterm_during_the_zero_shot_evaluation_saves_a_step_0_checkpoint(tiny_run, tmp_path, monkeypatch):
    """The zero-shot evaluation takes minutes with a real model; a SIGTERM there killed the run unsaved (the
    default handler), and --resume found nothing. It now stops with a step-0 checkpoint, the baseline kept."""
    import os
    import signal

    from lmforge.tasks.sft import SFTTask

    rows = [{"prompt": f"Say {w}.", "response": f"{w} {w}"} for w in ("king", "queen", "lord", "lady")] * 2
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "sft"
    real, calls = SFTTask.evaluate, []

    def preempted(self, *a, **kw):  # the scheduler's SIGTERM arrives mid-evaluation
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **kw)

    monkeypatch.setattr(SFTTask, "evaluate", preempted)
    res = cli("finetune", "--task", "sft", "--model", tiny_run.final, "--train", data, "--validation", data,
              "--out", out, "--max-steps", "2", "--batch-size", "4", "--no-progress", "--max-new-tokens", "2")
    assert res.code == 143 and "stopped at step 0" in res.out, (res.out, res.err)
    assert (out / "checkpoints" / "step-000000" / "lmforge_state").is_dir() and len(calls) == 1
    res = cli("finetune", "--out", out, "--resume", "--no-progress")
    assert res.code == 0, res.err
    assert "zero-shot validation" not in res.out  # the resumed run kept the baseline it was saved with
    m = json.loads((out / "metrics.json").read_text())
    assert m["steps"] == 2 and "perplexity" in m["zero_shot_validation"]


def test_sft_alpaca_input_beyond_the_first_row_is_trained_and_predicted(tiny_run, tmp_path):
    # Alpaca files leave 'input' out where it is empty: a first row without one must not drop everyone's
    rows = [{"instruction": "Say hi.", "output": "hi"}] + [
        {"instruction": f"Add {i}.", "ctx": f"{i} {i}", "output": str(2 * i)} for i in range(6)]
    data = _write_jsonl(tmp_path / "alpaca.jsonl", rows)
    out = tmp_path / "sft"
    res = cli("finetune", "--task", "sft", "--model", tiny_run.final, "--train", data, "--validation", data,
              "--input-field", "ctx", "--out", out, "--max-steps", "1", "--batch-size", "4", "--no-progress",
              "--max-new-tokens", "2", "--eval-samples", "7")
    assert res.code == 0, res.err
    prompts = [json.loads(line)["prompt"] for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert "Add 3.\n\n3 3" in prompts and "Say hi." in prompts
    unlabelled = _write_jsonl(tmp_path / "in.jsonl", [{"instruction": "Add 3.", "ctx": "3 3"}])
    pred = cli("predict", "--model", out, "--input", unlabelled, "--max-new-tokens", "2")
    assert pred.code == 0, pred.err
    assert json.loads(pred.out)["prompt"] == "Add 3.\n\n3 3"  # asked as it was trained


def test_sft_lora_adapter_reads_as_its_merged_model(tiny_run, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    rows = [{"prompt": f"Say {w}.", "response": f"{w} {w}"} for w in ("king", "queen", "lord", "lady", "duke")] * 3
    data = _write_jsonl(tmp_path / "chat.jsonl", rows)
    out = tmp_path / "sft"
    res = cli("finetune", "--task", "sft", "--model", tiny_run.final, "--train", data, "--validation", data,
              "--out", out, "--max-steps", "3", "--batch-size", "4", "--no-progress", "--max-new-tokens", "4",
              "--lora", "--save-adapter", "--lr", "1e-2")
    assert res.code == 0, res.err
    saved = json.loads((out / "metrics.json").read_text())["validation"]
    res = cli("evaluate", "--model", out, "--task", "sft", "--data", data, "--max-new-tokens", "4")
    assert res.code == 0, res.err
    assert json.loads(res.out)["loss"] == pytest.approx(saved["loss"], rel=1e-4)
    # the merged folder stops where the fine-tuned model was taught to: the end-of-turn id sft set
    merged = next((Path(os.environ["LMFORGE_CACHE"]) / "models" / "merged").glob("sft-final-*"))
    end = AutoTokenizer.from_pretrained(merged).convert_tokens_to_ids("<|im_end|>")
    eos = GenerationConfig.from_pretrained(merged).eos_token_id
    assert end in (eos if isinstance(eos, list) else [eos])
    assert (merged / "lmforge_config.yaml").exists()
    pred = cli("predict", "--model", out / "final", "--text", "Say king.", "--max-new-tokens", "5")
    assert pred.code == 0, pred.err
    assert "reply" in json.loads(pred.out)


def test_sft_on_the_builtin_chat_set(tiny_run, tmp_path):
    """The README's sft line on the built-in chats: validation and test metrics, samples, and predict on it."""
    # the tiny model's 64 tokens hold no reply of the built-in chats: a 128-token copy (RoPE positions: its
    # weights do not depend on the window)
    model = tmp_path / "model"
    shutil.copytree(tiny_run.final, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 128}))
    out = tmp_path / "chat"
    res = cli("finetune", "--task", "sft", "--model", model, "--train", "lmforge_chat", "--out", out,
              "--max-steps", "2", "--batch-size", "4", "--max-eval-examples", "16",
              "--no-progress", "--max-new-tokens", "4")
    assert res.code == 0, res.err
    assert "max length 128 tokens: the model's context window" in res.out  # the sft default is 512
    m = json.loads((out / "metrics.json").read_text())
    assert m["validation"]["n"] <= 16 and m["test"]["perplexity"] > 1
    assert m["zero_shot_validation"]["n"] == m["validation"]["n"]  # the perplexity before fine-tuning too
    assert "lmforge_chat:validation" in res.out and "lmforge_chat:test" in res.out
    pred = cli("predict", "--model", out, "--input", "lmforge_chat:test", "--max-new-tokens", "3")
    assert pred.code == 0, pred.err
    rows = [json.loads(line) for line in pred.out.splitlines()]
    assert len(rows) > 300 and all("reply" in r for r in rows)


@pytest.fixture(scope="session")
def tiny_t5(tmp_path_factory) -> tuple[Path, Path]:
    """A random 2-layer T5 with a BPE tokenizer, and 16 en/es pairs."""
    from transformers import T5Config, T5ForConditionalGeneration

    from lmforge.tokenizer.bpe import train_bpe

    d = tmp_path_factory.mktemp("t5")
    pairs = [("the house", "la casa"), ("the dog", "el perro"), ("the cat", "el gato"), ("good day", "buen dia")]
    model_dir = d / "t5"
    tok = train_bpe(["\n".join(f"{a}\n{b}" for a, b in pairs) * 30], 300, model_dir)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=16, num_layers=2, num_decoder_layers=2,
                                        num_heads=2, d_ff=64, pad_token_id=tok.pad_token_id,
                                        eos_token_id=tok.eos_token_id,
                                        decoder_start_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    return model_dir, _write_jsonl(d / "pairs.jsonl", [{"en": a, "es": b} for a, b in pairs] * 4)


def test_translate_seq2seq_end_to_end(tiny_t5, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    model_dir, data = tiny_t5
    out = tmp_path / "tr"
    res = cli("finetune", "--task", "translate", "--model", model_dir, "--train", data, "--validation", data,
              "--test", data, "--out", out, "--max-steps", "4", "--batch-size", "8", "--no-progress",
              "--max-new-tokens", "6")
    assert res.code == 0, res.err
    m = json.loads((out / "metrics.json").read_text())
    assert {"bleu", "chrf"} <= set(m["test"]) and "bleu" in m["zero_shot_validation"]
    AutoModelForSeq2SeqLM.from_pretrained(out / "final")
    pred = cli("predict", "--model", out, "--text", "the house", "--max-new-tokens", "6")
    assert pred.code == 0, pred.err
    assert "translation" in json.loads(pred.out)
    ev = cli("evaluate", "--model", out, "--data", data)
    assert ev.code == 0, ev.err
    assert "bleu" in json.loads(ev.out)
    # a file that lists es before en is read in the trained direction, by finetune, evaluate and predict
    flipped = _write_jsonl(tmp_path / "flipped.jsonl", [{"es": "el perro", "en": "the dog"}])
    ev = cli("evaluate", "--model", out, "--data", flipped, "--predictions", tmp_path / "p.jsonl")
    assert ev.code == 0, ev.err
    assert json.loads((tmp_path / "p.jsonl").read_text())["source"] == "the dog"
    pred = cli("predict", "--model", out, "--input", flipped, "--max-new-tokens", "2")
    assert pred.code == 0, pred.err
    assert json.loads(pred.out)["source"] == "the dog"
    res = cli("finetune", "--task", "translate", "--model", model_dir, "--train", data, "--validation", flipped,
              "--out", tmp_path / "tr2", "--max-steps", "1", "--no-progress", "--max-new-tokens", "2")
    assert res.code == 0, res.err
    assert json.loads((tmp_path / "tr2" / "predictions.jsonl").read_text())["source"] == "the dog"
    # another target language is refused by evaluate as by finetune's validation (it scored against French)
    french = _write_jsonl(tmp_path / "enfr.jsonl", [{"en": "the dog", "fr": "le chien"}])
    assert_user_error(cli("evaluate", "--model", out, "--data", french), "enfr.jsonl", "no field 'es'",
                      "--field target=")


def test_regression_and_gradient_checkpointing(tiny_bert, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rows = [{"sentence1": f"a {w} film", "score": s} for w, s in
            (("great", 4.5), ("fine", 3.2), ("dull", 1.1), ("awful", 0.4), ("good", 3.9), ("bad", 1.6))] * 3
    data = _write_jsonl(tmp_path / "scores.jsonl", rows)
    out = tmp_path / "reg"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", data, "--validation", data,
              "--out", out, "--max-steps", "3", "--batch-size", "6", "--gradient-checkpointing", "--no-progress")
    assert res.code == 0, res.err
    m = json.loads((out / "metrics.json").read_text())
    assert {"mse", "pearson", "spearman"} <= set(m["validation"])
    model = AutoModelForSequenceClassification.from_pretrained(out / "final")
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def _strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_undefined_metrics_are_null_and_bad_outputs_are_named(tiny_bert, tmp_path):
    rows = [{"text": f"a {w} film", "score": s} for w, s in (("great", 4.5), ("dull", 1.1), ("good", 3.9))] * 4
    const = [{"text": "a fine film", "score": 2.5}, {"text": "a so-so film", "score": 2.5}]
    out = tmp_path / "reg"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", _write_jsonl(tmp_path / "t.jsonl", rows),
              "--validation", _write_jsonl(tmp_path / "v.jsonl", const), "--out", out, "--max-steps", "2",
              "--batch-size", "4", "--no-progress")
    assert res.code == 0, res.err
    # Pearson of a constant set is undefined: null, not a bare NaN that strict JSON readers refuse
    m = _strict_json((out / "metrics.json").read_text())
    assert m["validation"]["pearson"] is None and m["validation"]["mse"] > 0
    assert all(_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines())
    ev = cli("evaluate", "--model", out / "final", "--data", out.parent / "v.jsonl")
    assert ev.code == 0 and _strict_json(ev.out)["pearson"] is None
    # a regressor scored against a word, not a number
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "score": "low"}, {"text": "b", "score": "high"}])
    assert_user_error(cli("evaluate", "--model", out / "final", "--data", bad), "bad.jsonl:1", "'low'", "not a number")
    # outputs that cannot be written are named before any work
    assert_user_error(cli("evaluate", "--model", out / "final", "--data", bad, "--predictions",
                          tmp_path / "no" / "p.jsonl"), "--predictions", "does not exist")
    assert_user_error(cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", tmp_path / "t.jsonl",
                          "--out", tmp_path / "t.jsonl", "--max-steps", "1"), "--out", "is a file")


def test_validation_labels_match_training_classes_by_name(tiny_bert, tmp_path):
    # training labels "0"/"1"/"2" from JSON; the validation CSV's cells read as numbers: the same classes
    rows = [{"text": f"{w} {i}", "label": str(i % 3)} for i, w in enumerate(["good", "bad", "meh"] * 8)]
    csv = tmp_path / "v.csv"
    csv.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows[:6]), encoding="utf-8")
    out = tmp_path / "cls"
    res = cli("finetune", "--task", "classify", "--model", tiny_bert, "--train", _write_jsonl(tmp_path / "t.jsonl", rows),
              "--validation", csv, "--out", out, "--max-steps", "1", "--batch-size", "8", "--no-progress")
    assert res.code == 0, res.err
    assert json.loads((out / "metrics.json").read_text())["validation"]["n"] == 6
    # predictions.jsonl names gold and predicted classes as the saved model does, as `evaluate` writes them
    res = cli("evaluate", "--model", out / "final", "--task", "classify", "--data", csv,
              "--predictions", tmp_path / "p.jsonl")
    assert res.code == 0, res.err
    ours, theirs = ([json.loads(x) for x in f.read_text().splitlines()] for f in (out / "predictions.jsonl",
                                                                                    tmp_path / "p.jsonl"))
    assert [(r["label"], r["prediction"]) for r in ours] == [(r["label"], r["prediction"]) for r in theirs]
    assert [r["label"] for r in ours] == ["0", "1", "2"] * 2 and all(isinstance(r["prediction"], str) for r in ours)


def test_qa_lora(tiny_bert, tmp_path):
    out = tmp_path / "qa-lora"
    res = cli("finetune", "--task", "qa", "--model", tiny_bert, "--train", "lmforge_qa", "--out", out, "--lora",
              "--max-steps", "2", "--batch-size", "8", "--max-train-examples", "16", "--max-eval-examples", "4",
              "--max-length", "128", "--doc-stride", "32", "--no-progress")
    assert res.code == 0, res.err
    from transformers import AutoModelForQuestionAnswering

    AutoModelForQuestionAnswering.from_pretrained(out / "final")


def test_gold_labels_match_the_saved_classes_by_value():
    """A classifier trained on a CSV's '1.0'/'2.0' classes is evaluated on a JSON file's 1 and 2."""
    from lmforge.tasks.classify import ClassifyTask

    t = ClassifyTask.__new__(ClassifyTask)
    t.regression, t.labels = False, ["1.0", "2.0", "neg"]
    t.label_index = {lab: i for i, lab in enumerate(t.labels)}
    assert [t.gold(x) for x in (1, 2.0, "1.0", "neg", 3, True)] == ["1.0", "2.0", "1.0", "neg", 3, True]


def test_grad_accum_with_leftover_batches_finishes_and_resumes_exactly(tiny_t5, tmp_path):
    """16 pairs in batches of 2 are 8 batches an epoch: 3 steps, the last of 2 batches (its third place is
    weighted 0, and no batch is left out). The loop once spun forever at the end of the first epoch (in a
    subprocess here, so that a hang fails the test). A resume also keeps the zero-shot baseline and the training
    time of the first invocation."""
    model_dir, data = tiny_t5
    common = ["finetune", "--task", "translate", "--model", model_dir, "--train", data, "--validation", data,
              "--batch-size", "2", "--grad-accum", "3", "--epochs", "2", "--no-progress", "--precision", "fp32",
              "--max-new-tokens", "3"]
    a, b = tmp_path / "a", tmp_path / "b"
    res = cli_subprocess(*common, "--out", a, timeout=240)
    assert res.returncode == 0, res.stderr
    ma = json.loads((a / "metrics.json").read_text())
    assert ma["steps"] == 6 and ma["epochs"] == 2.0
    res = cli_subprocess(*common, "--out", b, "--stop-after-steps", "4", timeout=240)  # mid-epoch 2
    assert res.returncode == 0, res.stderr
    first = torch.load(b / "checkpoints" / "step-000004" / "lmforge_state" / "trainer.pt", weights_only=True)
    assert first["data_position"] == {"epoch": 1, "batch": 3, "seed": 42}
    assert first["progress"]["samples"] == 16 + 3 * 2  # the first epoch's 16 pairs once each, then one step
    res = cli_subprocess("finetune", "--out", b, "--resume", "--no-progress", timeout=240)
    assert res.returncode == 0, res.stderr
    mb = json.loads((b / "metrics.json").read_text())
    assert [r["loss"] for r in metrics_rows(a) if "loss" in r] == pytest.approx(
        [r["loss"] for r in metrics_rows(b) if "loss" in r], abs=1e-6)
    assert mb["zero_shot_validation"] == ma["zero_shot_validation"]  # once lost on resume
    assert mb["train_seconds"] >= first["progress"]["train_seconds"] - 0.05


def test_a_new_run_refuses_an_out_holding_another_runs_checkpoints(tiny_bert, sentiment, tmp_path):
    train, val = sentiment
    common = ["finetune", "--task", "classify", "--model", tiny_bert, "--train", train, "--validation", val,
              "--out", tmp_path / "r", "--max-steps", "2", "--no-progress"]
    assert cli(*common).code == 0
    assert_user_error(cli(*common), "holds checkpoints of an earlier run", "--resume", "rm -r")
