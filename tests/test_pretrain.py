"""`lmforge pretrain`: outputs, the token cache, exact resume, continued pretraining and --max-minutes."""
from __future__ import annotations

import json
import math
import re
import signal
from pathlib import Path

import pytest
import torch
import yaml

from conftest import assert_user_error, cli, cli_signalled, metrics_rows, token_cache_entries, torchrun

# A fast run that reuses the session tokenizer (no tokenizer training).
FAST = ["--size", "tiny", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--context", "32",
        "--batch-size", "2", "--no-progress", "--eval-tokens", "128", "--sample-tokens", "0"]


def fast_args(tiny_run, out, *extra):
    return ["pretrain", "--data", tiny_run.corpus, "--out", out, "--tokenizer", tiny_run.tokenizer, *FAST, *extra]


def test_outputs(tiny_run):
    out = tiny_run.out
    final = tiny_run.final
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "lmforge_config.yaml"):
        assert (final / name).is_file(), name
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert (out / "config.yaml").is_file()
    assert yaml.safe_load((final / "lmforge_config.yaml").read_text())["max_steps"] == 6
    hf = json.loads((final / "config.json").read_text())
    tok = json.loads((final / "tokenizer_config.json").read_text())
    assert hf["pad_token_id"] is not None and hf["eos_token_id"] is not None  # transformers' batches pad with it
    assert tok.get("pad_token") == "<|pad|>"

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 6
    assert math.isfinite(metrics["val_bits_per_byte"]) and metrics["val_bits_per_byte"] > 0
    for key in ("initial_val_loss", "initial_val_perplexity", "initial_val_bits_per_byte"):
        assert metrics[key] is not None and math.isfinite(metrics[key]), key
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]), rel=1e-6)
    # 6 steps of training on Shakespeare already beat the random init.
    assert metrics["val_loss"] < metrics["initial_val_loss"]
    # A random init is close to uniform over the vocabulary.
    assert metrics["initial_val_loss"] == pytest.approx(math.log(512), abs=0.3)
    assert metrics["tokens_seen"] == 6 * 4 * 64
    assert metrics["final_model"] == str(final)
    assert isinstance(metrics["sample"], str) and metrics["sample"]

    rows = metrics_rows(out)
    val_steps = [r["step"] for r in rows if "val_loss" in r]
    assert val_steps[0] == 0 and val_steps[-1] == 6
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert any(r.get("step") == 6 and "loss" in r for r in rows)

    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert 1 <= len(ckpts) <= 2  # --keep-checkpoints 2 (default)
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest / "lmforge_state" / "trainer.pt").is_file()
    assert (out / "checkpoints" / latest / "lmforge_state" / "config.yaml").is_file()
    assert (out / "checkpoints" / latest / "model.safetensors").is_file()
    state = torch.load(out / "checkpoints" / latest / "lmforge_state" / "trainer.pt", weights_only=True)
    assert state["step"] == int(latest.split("-")[1]) and state["max_steps"] == 6

    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    assert not list(out.glob(".tmp-*")) and not list(out.glob(".old-*"))


def test_token_cache_is_reused(tmp_path, tiny_run):
    first_cache = re.search(r"\(cache (\S+)\)", tiny_run.stdout).group(1)
    meta_path = Path(first_cache) / "meta.json"
    before_meta = meta_path.read_text()
    before_mtime = meta_path.stat().st_mtime_ns
    entries = token_cache_entries()
    assert Path(first_cache).name in entries

    res = cli(*fast_args(tiny_run, tmp_path / "again", "--max-steps", "1"))
    assert res.code == 0, res.err
    assert re.search(r"\(cache (\S+)\)", res.out).group(1) == first_cache
    assert token_cache_entries() == entries  # no new entry
    assert meta_path.read_text() == before_meta and meta_path.stat().st_mtime_ns == before_mtime
    assert "training a byte-level BPE tokenizer" not in res.out  # --tokenizer given


def test_token_cache_invalidated_by_new_text(tmp_path, tiny_run):
    corpus = tmp_path / "c.txt"
    corpus.write_text(tiny_run.corpus.read_text()[:20_000], encoding="utf-8")
    before = set(token_cache_entries())
    args = ["pretrain", "--data", corpus, "--out", tmp_path / "r", "--tokenizer", tiny_run.tokenizer, *FAST,
            "--max-steps", "1"]
    assert cli(*args).code == 0
    after = set(token_cache_entries())
    assert len(after - before) == 1
    # Same file, new content: a fresh entry, not stale tokens.
    corpus.write_text(tiny_run.corpus.read_text()[20_000:45_000], encoding="utf-8")
    assert cli(*args).code == 0
    assert len(set(token_cache_entries()) - after) == 1


def _curve(out):
    rows = metrics_rows(out)
    train = [(r["step"], r["loss"], r["lr"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"], r["val_bpb"]) for r in rows if "val_loss" in r]
    return train, val


def test_resume_is_exact(tmp_path, tiny_run):
    common = ["--max-steps", "8", "--eval-interval", "2", "--log-interval", "1"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli(*fast_args(tiny_run, a, *common)).code == 0

    res = cli(*fast_args(tiny_run, b, *common, "--stop-after-steps", "4"))
    assert res.code == 0, res.err
    assert "stopped at step 4" in res.out
    assert not (b / "final").exists()
    assert (b / "checkpoints" / "latest").read_text().strip() == "step-000004"

    res = cli("pretrain", "--out", b, "--resume")  # the saved config supplies everything else
    assert res.code == 0, res.err
    assert "resuming from" in res.out and "at step 4" in res.out

    train_a, val_a = _curve(a)
    train_b, val_b = _curve(b)
    assert [s for s, *_ in train_a] == list(range(1, 9))
    assert [s for s, *_ in val_a] == [0, 2, 4, 6, 8]
    assert [s for s, *_ in train_b] == [s for s, *_ in train_a]  # no duplicated or missing rows
    assert [s for s, *_ in val_b] == [s for s, *_ in val_a]
    for ra, rb in zip(train_a + val_a, train_b + val_b):
        assert ra[0] == rb[0]
        assert ra[1:] == pytest.approx(rb[1:], abs=1e-6, rel=1e-6), (ra, rb)

    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for key in ("steps", "tokens_seen"):
        assert ma[key] == mb[key]
    for key in ("val_loss", "initial_val_loss", "final_train_loss"):
        assert ma[key] == pytest.approx(mb[key], abs=1e-6), key

    from safetensors.torch import load_file

    wa, wb = load_file(str(a / "final" / "model.safetensors")), load_file(str(b / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0, msg=k)


def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path, tiny_run):
    out = tmp_path / "t"
    res = cli_signalled(*fast_args(tiny_run, out, "--max-steps", "300", "--log-interval", "1", "--eval-interval",
                                   "300"), out_dir=out, sig=signal.SIGTERM)
    assert res.returncode == 143, res.stderr  # 128 + SIGTERM: a Kubernetes Job would count 0 as done
    assert "Traceback" not in res.stderr and "stopped at step" in res.stdout, res.stdout
    stopped = int(res.stdout.split("stopped at step ")[1].split(";")[0])
    assert 1 <= stopped < 300 and not (out / "final").exists()
    res = cli("pretrain", "--out", out, "--resume")
    assert res.code == 0, res.err
    assert [r["step"] for r in metrics_rows(out) if "loss" in r][-1] == 300 and (out / "final").is_dir()


def test_two_processes_with_torchrun(tmp_path, tiny_run):
    out = tmp_path / "ddp"
    torchrun(*fast_args(tiny_run, out, "--max-steps", "6", "--eval-interval", "3"))
    assert (out / "final" / "model.safetensors").is_file()
    assert [r["step"] for r in metrics_rows(out) if "val_loss" in r] == [0, 3, 6]  # rank 0 alone writes the log

    # bad data under torchrun: rank 0 says so once; rank 1 (waiting for rank 0's tokenizer) stops quietly with
    # the same exit code, not with a gloo traceback or an abort
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"hello world\n\xb0\xb1 not utf8\n" + tiny_run.corpus.read_bytes())
    res = torchrun("pretrain", "--data", bad, "--out", tmp_path / "bad", "--size", "tiny", "--vocab-size", "300",
                   "--max-steps", "1", "--no-progress", check=False)
    assert res.returncode != 0
    assert res.stderr.count("lmforge: error:") == 1 and "bad.txt:2:1: not valid UTF-8" in res.stderr
    assert "Fatal Python error" not in res.stderr and "[rank1]" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.count("exitcode  : 2") == 2, res.stderr[-3000:]  # torchrun's summary of both ranks
    assert not (tmp_path / "bad" / "final").exists()


def test_fsdp_matches_ddp_and_resumes_either_way(tmp_path, tiny_run):
    """Sharded training is the same training: FSDP's losses and weights equal DDP's (fp32), its checkpoint is a
    plain HF folder, and a run resumes across the two (the optimizer state is saved in either layout)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    args = ("--max-steps", "6", "--eval-interval", "3", "--precision", "fp32")
    ddp = tmp_path / "ddp"
    torchrun(*fast_args(tiny_run, ddp, *args))
    fsdp = tmp_path / "fsdp"
    res = torchrun(*fast_args(tiny_run, fsdp, *args, "--fsdp", "--stop-after-steps", "3"))
    assert "world 2 (FSDP)" in res.stdout and "stopped at step 3" in res.stdout
    AutoModelForCausalLM.from_pretrained(fsdp / "checkpoints" / "step-000003")  # gathered, not shards
    torchrun("pretrain", "--out", fsdp, "--resume")
    switched = tmp_path / "switched"  # started under DDP, finished sharded
    torchrun(*fast_args(tiny_run, switched, *args, "--stop-after-steps", "3"))
    torchrun("pretrain", "--out", switched, "--resume", "--fsdp")

    want = [r["val_loss"] for r in metrics_rows(ddp) if "val_loss" in r]
    ref = load_file(ddp / "final" / "model.safetensors")
    for run in (fsdp, switched):
        assert [r["val_loss"] for r in metrics_rows(run) if "val_loss" in r] == pytest.approx(want, abs=1e-5)
        got = load_file(run / "final" / "model.safetensors")
        assert got.keys() == ref.keys()
        assert max((got[k] - ref[k]).abs().max().item() for k in ref) < 1e-5


def test_resume_refuses_changed_options_by_name(tmp_path, tiny_run):
    out = tmp_path / "c"
    assert cli(*fast_args(tiny_run, out, "--max-steps", "6", "--stop-after-steps", "2")).code == 0
    res = cli("pretrain", "--out", out, "--resume", "--max-steps", "12", "--lr", "0.01")
    assert_user_error(res, "--max-steps 12 (the run has 6)", "--lr 0.01", "another --out")
    # a default typed where the run has another value is a change too (it was once applied silently, mid-run)
    assert_user_error(cli("pretrain", "--out", out, "--resume", "--batch-size", "16"), "--batch-size 16 (the run has 2)")
    assert not (out / "final").exists()
    # the first command line repeated with --resume (and a default typed out) is no change
    res = cli(*fast_args(tiny_run, out, "--max-steps", "6", "--precision", "auto", "--resume",
                         "--stop-after-steps", "2"))
    assert res.code == 0, res.err
    assert "stopped at step 4" in res.out
    # how this invocation runs may change; the run itself finishes as started
    res = cli("pretrain", "--out", out, "--resume", "--max-steps", "6", "--no-progress", "--log-interval", "1",
              "--precision", "fp32")  # another machine may run another precision
    assert res.code == 0, res.err
    assert [r["step"] for r in metrics_rows(out) if "loss" in r][-1] == 6
    assert_user_error(cli("pretrain", "--out", tmp_path / "nothing", "--resume"), "no run to continue")


def test_resume_keeps_resolved_values_when_defaults_are_typed(tmp_path, tiny_run):
    """'--eval-interval 0' typed again on --resume keeps the interval the run resolved (with --max-minutes it was
    fitted to a timed evaluation that a resumed run does not repeat); it does not resolve it again."""
    out = tmp_path / "k"
    assert cli(*fast_args(tiny_run, out, "--max-steps", "6", "--stop-after-steps", "1", "--log-interval", "1")).code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["eval_interval"] == 1  # resolved: ceil(6 / 10)
    saved["eval_interval"] = 3  # as --max-minutes would have fitted it
    (out / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    res = cli(*fast_args(tiny_run, out, "--max-steps", "6", "--eval-interval", "0", "--resume"))
    assert res.code == 0, res.err
    assert [r["step"] for r in metrics_rows(out) if "val_loss" in r] == [0, 1, 3, 6]
    assert yaml.safe_load((out / "config.yaml").read_text())["eval_interval"] == 3


def test_fp16_scales_the_loss_and_resumes_its_scale(tmp_path, tiny_run, monkeypatch):
    """fp16 (picked on GPUs without bf16) trains through a GradScaler, whose scale is saved for resume. A CPU
    autocasts to fp16 too, so the path runs here with the precision forced."""
    from lmforge.train import checkpoint as ckpt
    from lmforge.train import common

    monkeypatch.setattr(common, "resolve_precision", lambda precision, device: "fp16")
    out = tmp_path / "fp16"
    res = cli(*fast_args(tiny_run, out, "--max-steps", "4", "--stop-after-steps", "2", "--log-interval", "1"))
    assert res.code == 0, res.err
    assert "precision fp16" in res.out
    state_file = out / "checkpoints" / "step-000002" / "lmforge_state" / "trainer.pt"
    state = ckpt.load_trainer_state(out / "checkpoints" / "step-000002")
    assert state["grad_scaler"]["scale"] > 0
    state["grad_scaler"]["scale"] = 1024.0  # a scale a fresh scaler (65536) cannot reach in two steps
    torch.save(state, state_file)
    res = cli("pretrain", "--out", out, "--resume")
    assert res.code == 0, res.err
    assert ckpt.load_trainer_state(out / "checkpoints" / "step-000003")["grad_scaler"]["scale"] <= 1024.0
    rows = [r for r in metrics_rows(out) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)


def test_resume_of_a_finished_run_is_harmless(tmp_path, tiny_run):
    """--resume after the run completed trains no further steps and keeps the log consistent."""
    out = tmp_path / "r"
    assert cli(*fast_args(tiny_run, out, "--max-steps", "2", "--eval-interval", "1", "--save-interval", "1",
                          "--log-interval", "1")).code == 0
    rows_before = [r for r in metrics_rows(out) if "loss" in r]
    final_before = (out / "final" / "model.safetensors").read_bytes()
    metrics_before = (out / "metrics.json").read_text()
    res = cli("pretrain", "--out", out, "--resume")
    assert res.code == 0, res.err
    assert "finished run" in res.out and "--init-from" in res.out
    rows_after = [r for r in metrics_rows(out) if "loss" in r]
    assert [r["step"] for r in rows_after] == [r["step"] for r in rows_before]
    # nothing retrained or rewritten (a --max-minutes stop saves no checkpoint: resuming from the one before
    # trained on past the budget and replaced the model)
    assert (out / "final" / "model.safetensors").read_bytes() == final_before
    assert (out / "metrics.json").read_text() == metrics_before


def test_resume_survives_what_a_kill_leaves_and_names_damage(tmp_path, tiny_run, monkeypatch):
    from lmforge.train import checkpoint as ckpt

    out = tmp_path / "k"
    saves = []
    real = ckpt.save_checkpoint
    monkeypatch.setattr(ckpt, "save_checkpoint", lambda out_dir, step, *a, **kw: saves.append(step) or real(
        out_dir, step, *a, **kw))
    res = cli(*fast_args(tiny_run, out, "--max-steps", "8", "--save-interval", "2", "--stop-after-steps", "4"))
    assert res.code == 0, res.err
    assert saves == [2, 4]  # the stop on a save step writes it once, not twice
    root = out / "checkpoints"
    # a kill between the two renames of a rewrite: only the .old- copy exists; an unfinished .tmp- write
    (root / "step-000004").rename(root / ".old-step-000004-12345")
    (root / ".tmp-step-000006-abc").mkdir()
    (out / "metrics.jsonl").open("a").write('{"time": 1, "step": 5, "lo')  # a torn last line
    res = cli("pretrain", "--out", out, "--resume", "--stop-after-steps", "1")
    assert res.code == 0, res.err
    assert "at step 4" in res.out
    assert not list(root.glob(".tmp-*")) and not list(root.glob(".old-*"))
    # a truncated weights file is named, with the way out
    weights = root / "step-000005" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert_user_error(cli("pretrain", "--out", out, "--resume"), "step-000005", "damaged checkpoint",
                      "resume from step-000004")


def test_a_kill_mid_delete_of_an_old_checkpoint_leaves_no_half_checkpoint(tmp_path, tiny_run, monkeypatch):
    """save_checkpoint removes checkpoints past --keep-checkpoints; a kill during that removal left a step-*
    folder without its weights, which --resume's fallback or the damaged-checkpoint hint could name."""
    import shutil

    from safetensors.torch import load_file

    real = shutil.rmtree

    def killed_mid_delete(path, *a, **kw):  # the weights are unlinked, then the process dies
        if "step-" in Path(path).name:
            (Path(path) / "model.safetensors").unlink()
            raise KeyboardInterrupt
        return real(path, *a, **kw)

    out = tmp_path / "d"
    args = fast_args(tiny_run, out, "--max-steps", "6", "--save-interval", "1", "--keep-checkpoints", "1")
    monkeypatch.setattr(shutil, "rmtree", killed_mid_delete)
    assert cli(*args).code == 130  # interrupted while step-000001 went on step-000002's save
    monkeypatch.setattr(shutil, "rmtree", real)
    root = out / "checkpoints"
    for folder in root.glob("step-*"):
        load_file(folder / "model.safetensors")
    res = cli("pretrain", "--out", out, "--resume")
    assert res.code == 0 and "at step 2" in res.out, res.err
    assert not list(root.glob(".tmp-*"))


def test_a_kill_once_final_is_written_leaves_a_complete_run(tmp_path, tiny_run, monkeypatch):
    """--resume takes a run with DIR/final for finished: a kill just after DIR/final was written (where SIGTERM
    meets the default handler) must not leave a run without metrics.json that no --resume completes."""
    from lmforge.train import checkpoint as ckpt

    real = ckpt.write_folder_atomic

    def killed_after(dest, write):
        real(dest, write)
        if Path(dest).name == "final":
            raise KeyboardInterrupt

    monkeypatch.setattr(ckpt, "write_folder_atomic", killed_after)
    out = tmp_path / "f"
    assert cli(*fast_args(tiny_run, out, "--max-steps", "2", "--log-interval", "1")).code == 130
    monkeypatch.setattr(ckpt, "write_folder_atomic", real)
    res = cli("pretrain", "--out", out, "--resume")
    assert res.code == 0 and "finished run" in res.out, res.err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2 and (out / "loss.png").is_file()


def test_resume_needs_no_init_from_model(tmp_path, tiny_run):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_run.final, base)
    out = tmp_path / "cont"
    args = ["pretrain", "--data", tiny_run.corpus, "--out", out, "--init-from", base, "--max-steps", "4",
            "--batch-size", "2", "--no-progress", "--eval-tokens", "256", "--sample-tokens", "0"]
    assert cli(*args, "--stop-after-steps", "2").code == 0
    shutil.rmtree(base)  # the checkpoint holds model and tokenizer: resuming must not look for it
    res = cli("pretrain", "--out", out, "--resume")
    assert res.code == 0, res.err
    assert (out / "final" / "model.safetensors").exists()


def test_init_from_continues_training(tmp_path, tiny_run, other_corpus_file):
    out = tmp_path / "cont"
    res = cli("pretrain", "--data", other_corpus_file, "--out", out, "--init-from", tiny_run.final,
              "--max-steps", "3", "--batch-size", "2", "--no-progress", "--eval-tokens", "256",
              "--sample-tokens", "0", "--precision", "fp32")
    assert res.code == 0, res.err
    assert "training a byte-level BPE tokenizer" not in res.out  # the model's own tokenizer is used
    assert "(before:" in res.out
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("initial_val_perplexity", "val_perplexity"):
        assert math.isfinite(metrics[key]), key
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == pytest.approx(1e-4)  # the continued-pretraining default
    assert saved["context"] == 64  # the model's context
    cfg = json.loads((out / "final" / "config.json").read_text())
    assert cfg["hidden_size"] == 32 and cfg["vocab_size"] == 512
    # The starting point is the given model: its score on this text equals the step-0 evaluation.
    ev = cli("evaluate", "--model", tiny_run.final, "--data", other_corpus_file, "--split", "val",
             "--max-tokens", "256", "--batch-size", "2")
    assert ev.code == 0, ev.err
    assert json.loads(ev.out)["loss"] == pytest.approx(metrics["initial_val_loss"], abs=1e-4)
    # --context is the training window: the model keeps its own (it became the saved max_position_embeddings,
    # capping generate, chat and serve, and every model fine-tuned from it, at the training window)
    short = tmp_path / "short"
    res = cli("pretrain", "--data", other_corpus_file, "--out", short, "--init-from", tiny_run.final, "--context",
              "32", "--max-steps", "1", "--batch-size", "2", "--no-progress", "--eval-tokens", "256",
              "--sample-tokens", "0", "--precision", "fp32")
    assert res.code == 0, res.err
    assert json.loads((short / "final" / "config.json").read_text())["max_position_embeddings"] == 64
    assert yaml.safe_load((short / "config.yaml").read_text())["context"] == 32
    assert_user_error(cli("pretrain", "--data", other_corpus_file, "--out", tmp_path / "long", "--init-from",
                          tiny_run.final, "--context", "128", "--max-steps", "1", "--no-progress"),
                      "--context 128", "at most 64 tokens")


def test_max_minutes_leaves_room_for_evaluations():
    from lmforge.recipes.pretrain import fit_steps

    # cheap evaluations: ten of them, 8 % of the budget kept for them and checkpoints
    assert fit_steps(600, 0.265, 1.0, False) == (int(600 * 0.92 / 0.265), 10)
    # an 11 s evaluation in a 3-minute budget: once, at the end, instead of ten times (110 s of 180)
    assert fit_steps(180, 1.6, 11.0, False) == (int(180 * 0.92 / 1.6), 1)
    assert fit_steps(180, 1.6, 4.0, False)[1] == 3
    # one evaluation costs more than 8 %: the steps make room for it
    assert fit_steps(60, 1.6, 30.0, False) == (int(30 / 1.6), 1)
    # --eval-interval given: the user's cadence, the 8 % rule for the steps
    assert fit_steps(180, 1.6, 11.0, True) == (int(180 * 0.92 / 1.6), 10)


def test_max_minutes_sets_the_step_count(tmp_path, tiny_run):
    out = tmp_path / "timed"
    res = cli(*fast_args(tiny_run, out, "--max-minutes", "0.05", "--batch-size", "1", "--context", "16"))
    assert res.code == 0, res.err
    m = re.search(r"0\.05 minutes is about (\d+) steps", res.out)
    assert m, res.out
    steps = int(m.group(1))
    assert steps >= 10
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == steps
    n_evals = int(re.search(r"evaluated (\d+) times?", res.out).group(1))
    assert saved["eval_interval"] == math.ceil(steps / n_evals)  # saved, so that --resume keeps the cadence
    metrics = json.loads((out / "metrics.json").read_text())
    assert 1 <= metrics["steps"] <= steps
    assert (out / "final" / "model.safetensors").is_file()


def test_resume_with_the_config_file_that_started_the_run(tmp_path, tiny_run):
    """YAML reads `lr: 1e-3` as a string and `data: x` as a single value: the file that started the run must
    still be accepted on --resume (it was refused as a change)."""
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"data: {tiny_run.corpus}\ntokenizer: {tiny_run.tokenizer}\nsize: tiny\nn_layer: 2\nn_embd: 32\n"
                   "n_head: 2\ncontext: 64\nmax_steps: 4\nbatch_size: 2\nlr: 1e-3\neval_tokens: 1024\n"
                   "sample_tokens: 0\nprogress: false\n")
    out = tmp_path / "r"
    assert cli("pretrain", "--config", cfg, "--out", out, "--stop-after-steps", "2").code == 0
    res = cli("pretrain", "--config", cfg, "--out", out, "--resume", "--compile", "off")  # compile may change
    assert res.code == 0, res.err
    assert (out / "final" / "config.json").exists()


def test_a_new_run_in_an_old_out_trains_its_own_tokenizer_or_is_refused(tmp_path, tiny_run):
    out = tmp_path / "o"
    base = ["pretrain", "--data", tiny_run.corpus, "--out", out, "--size", "tiny", "--n-layer", "2", "--n-embd", "32",
            "--n-head", "2", "--context", "64", "--batch-size", "2", "--eval-tokens", "1024", "--sample-tokens", "0",
            "--no-progress"]
    assert cli(*base, "--vocab-size", "300", "--max-steps", "2", "--stop-after-steps", "1").code == 0
    assert_user_error(cli(*base, "--vocab-size", "300", "--max-steps", "2"), "holds checkpoints of an earlier run")
    import shutil

    shutil.rmtree(out / "checkpoints")
    res = cli(*base, "--vocab-size", "280", "--max-steps", "2")  # another vocabulary: not the old tokenizer
    assert res.code == 0, res.err
    assert "training a byte-level BPE tokenizer (vocab 280)" in res.out
    assert json.loads((out / "final" / "config.json").read_text())["vocab_size"] <= 280
    shutil.rmtree(out / "checkpoints")
    res = cli(*base, "--vocab-size", "280", "--max-steps", "2")  # the same spec: reused
    assert res.code == 0, res.err
    assert "training a byte-level BPE tokenizer" not in res.out
    # the same files with other text (more added after "corpus too small; add text"): trained again
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    grown = tmp_path / "grown.txt"
    grown.write_text(Path(tiny_run.corpus).read_text(encoding="utf-8"), encoding="utf-8")
    grown_base = [str(grown) if a == tiny_run.corpus else a for a in base]
    assert cli(*grown_base, "--vocab-size", "280", "--max-steps", "1").code == 0
    with grown.open("a", encoding="utf-8") as f:
        f.write("A few more lines of text.\n" * 20)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    res = cli(*grown_base, "--vocab-size", "280", "--max-steps", "1")
    assert res.code == 0, res.err
    assert "training a byte-level BPE tokenizer (vocab 280)" in res.out


def test_jsonl_corpora_keep_unicode_line_separators_and_drop_a_bom(tmp_path):
    from lmforge.data.corpus import iter_documents, resolve_sources

    f = tmp_path / "u.jsonl"
    f.write_text("\ufeff" + json.dumps({"text": "a\u2028b\u0085c"}, ensure_ascii=False) + "\n", encoding="utf-8")
    t = tmp_path / "b.txt"
    t.write_text("\ufeffplain text\n", encoding="utf-8")
    assert list(iter_documents(resolve_sources([str(f), str(t)]))) == ["a\u2028b\u0085c", "plain text\n"]
