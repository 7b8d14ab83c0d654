"""User errors: exit code 2 and one line `lmforge: error: ...` that says what and where; never a traceback."""
from __future__ import annotations

import json

import pytest

from conftest import assert_user_error, cli, cli_subprocess


def pretrain(data, out, *extra):
    return cli("pretrain", "--data", data, "--out", out, "--size", "tiny", "--max-steps", "1", "--no-progress",
               "--sample-tokens", "0", *extra)


def test_missing_data_file(tmp_path):
    res = pretrain(tmp_path / "nope.txt", tmp_path / "out")
    assert_user_error(res, "nope.txt", "no such file or folder")
    assert not (tmp_path / "out").exists()


def test_misspelled_builtin_corpus(tmp_path):
    assert_user_error(pretrain("shakespear", tmp_path / "out"), "did you mean 'shakespeare'")


def test_empty_file(tmp_path):
    f = tmp_path / "empty.txt"
    f.write_text("  \n\n", encoding="utf-8")
    assert_user_error(pretrain(f, tmp_path / "out"), str(f), "empty")


def test_empty_folder(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.md").write_text("not a text source")
    assert_user_error(pretrain(tmp_path / "d", tmp_path / "out"), "folder has no")


def test_unsupported_file_type(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    assert_user_error(pretrain(f, tmp_path / "out"), "data.csv", "unsupported file type")


def test_non_utf8_reports_file_line_column(tmp_path):
    f = tmp_path / "latin1.txt"
    f.write_bytes("first line\nsecond line\ncaf".encode() + b"\xe9 au lait\nlast\n")
    line = assert_user_error(pretrain(f, tmp_path / "out"), f"{f}:3:4:", "not valid UTF-8", "0xe9")
    assert "iconv" in line  # says how to fix it


def test_non_utf8_in_a_real_process(tmp_path):
    """Exit code and stderr as a shell sees them (the same failure, through `python -m lmforge`)."""
    f = tmp_path / "gbk.txt"
    f.write_bytes(b"hello\nworld\n" + "中文".encode("gbk") + b"\n")
    proc = cli_subprocess("tokenizer", "train", "--data", f, "--out", tmp_path / "tok", "--vocab-size", "300")
    assert proc.returncode == 2
    assert_user_error(proc, f"{f}:3:1:", "not valid UTF-8")
    assert not (tmp_path / "tok").exists()


def test_corpus_too_small_for_the_context(tmp_path, tiny_run):
    f = tmp_path / "small.txt"
    f.write_text("To be, or not to be, that is the question.\n" * 10, encoding="utf-8")
    res = pretrain(f, tmp_path / "out", "--tokenizer", tiny_run.tokenizer, "--context", "64")
    assert_user_error(res, "corpus too small", "context length 64", "--context")


def test_unknown_preset_on_the_command_line(tmp_path, capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as exc:  # argparse choices
        main(["pretrain", "--data", "shakespeare", "--out", str(tmp_path / "o"), "--size", "huge"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'huge'" in err and "Traceback" not in err


def test_unknown_preset_in_yaml(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data: [shakespeare]\nout: {tmp_path / 'o'}\nsize: smal\n", encoding="utf-8")
    assert_user_error(cli("pretrain", "--config", cfg), "'size'", "'smal' is not one of tiny, small, base",
                      "did you mean 'small'")
    cfg.write_text("size: huge\n", encoding="utf-8")
    assert_user_error(cli("pretrain", "--config", cfg), "'huge' is not one of tiny, small, base")


def test_unknown_config_key_with_suggestion(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("vocab_sise: 512\n", encoding="utf-8")
    assert_user_error(cli("pretrain", "--config", cfg), "unknown option 'vocab_sise'", "did you mean 'vocab_size'")
    cfg.write_text("promt: hi\n", encoding="utf-8")
    assert_user_error(cli("generate", "--config", cfg), "did you mean 'prompt'")


def test_invalid_yaml_reports_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("seed: 1\nout: [unclosed\nlr: 2\n", encoding="utf-8")
    assert_user_error(cli("pretrain", "--config", cfg), str(cfg), "invalid YAML", "line")


@pytest.mark.parametrize("verb", ["generate", "evaluate"])
def test_model_folder_that_is_empty(tmp_path, verb, tiny_run):
    d = tmp_path / "empty_model"
    d.mkdir()
    res = cli(verb, "--model", d, "--data", tiny_run.corpus) if verb == "evaluate" else \
        cli(verb, "--model", d, "--prompt", "x")
    assert_user_error(res, str(d), "not a model folder")


def test_model_folder_with_a_random_file(tmp_path):
    d = tmp_path / "junk"
    d.mkdir()
    (d / "weights.bin").write_bytes(b"\x00\x01garbage")
    assert_user_error(cli("generate", "--model", d, "--prompt", "x"), str(d), "not a model folder")


def test_model_that_is_a_file(tmp_path):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"x")
    assert_user_error(cli("generate", "--model", f, "--prompt", "x"), "must be a folder")


def test_model_folder_without_weights(tmp_path, tiny_run):
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text((tiny_run.final / "config.json").read_text())
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_text((tiny_run.final / name).read_text())
    assert_user_error(cli("generate", "--model", d, "--prompt", "x"), "no *.safetensors weights")


def test_model_folder_with_broken_config(tmp_path, tiny_run):
    d = tmp_path / "brokencfg"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama",\n  oops}\n')
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (d / name).write_text((tiny_run.final / name).read_text())
    # The tokenizer (which also reads config.json) or the model loader reports it; either names the file.
    line = assert_user_error(cli("generate", "--model", d, "--prompt", "x"), "config.json")
    assert "JSON" in line


def test_missing_folder_that_could_be_a_hub_id(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert_user_error(cli("generate", "--model", "runs/nowhere", "--prompt", "x"), "runs/nowhere: no such local folder",
                      "Hugging Face hub", "LocalEntryNotFoundError")


def test_unknown_model_name():
    assert_user_error(cli("generate", "--model", "smollm2-13m", "--prompt", "x"), "did you mean 'smollm2-135m'")


def test_resume_without_checkpoint(tmp_path, tiny_run):
    out = tmp_path / "fresh"
    res = pretrain(tiny_run.corpus, out, "--resume")
    assert_user_error(res, "--resume", str(out), "no run to continue")
    out.mkdir()
    (out / "config.yaml").write_text("seed: 1337\n", encoding="utf-8")  # started, killed before a checkpoint
    assert_user_error(pretrain(tiny_run.corpus, out, "--resume"), "--resume", "no checkpoint", str(out / "checkpoints"))
    # a real run killed before its first checkpoint: the command the message gives starts it again
    import shutil

    run = tmp_path / "killed"
    assert pretrain(tiny_run.corpus, run, "--tokenizer", tiny_run.tokenizer).code == 0
    for name in ("checkpoints", "final"):
        shutil.rmtree(run / name, ignore_errors=True)  # a 1-step run saves no checkpoint before final
    msg = assert_user_error(cli("pretrain", "--out", run, "--resume"), "no checkpoint", "start it again with")
    again = msg.split("start it again with: lmforge ")[1].split()
    assert again == ["pretrain", "--config", str(run / "config.yaml")]
    res = cli(*again)
    assert res.code == 0 and (run / "final").is_dir(), res.err


def test_malformed_jsonl_reports_file_and_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps({"text": "also fine"}) + "\n"
                 + '{"text": "broken\n' + json.dumps({"text": "never read"}) + "\n", encoding="utf-8")
    assert_user_error(pretrain(f, tmp_path / "out"), f"{f}:4:", "invalid JSON")


def test_jsonl_missing_field_suggests(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"txt": "hello"}) + "\n", encoding="utf-8")
    assert_user_error(pretrain(f, tmp_path / "out"), f"{f}:1:", "no field 'text'", "did you mean 'txt'",
                      "--text-field")


def test_jsonl_non_object_line(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text(json.dumps({"text": "a"}) + "\n[1, 2]\n", encoding="utf-8")
    assert_user_error(pretrain(f, tmp_path / "out"), f"{f}:2:", "expected a JSON object")


def test_missing_required_options(tmp_path, tiny_run):
    assert_user_error(cli("pretrain", "--data", tiny_run.corpus), "--out is required")
    assert_user_error(cli("pretrain", "--out", tmp_path / "o"), "no data given")
    assert_user_error(cli("generate", "--prompt", "x"), "--model is required")
    assert_user_error(cli("generate", "--model", tiny_run.final, "--max-new-tokens", "0"), "--max-new-tokens")


def test_bad_numeric_option_values(tmp_path, tiny_run):
    res = pretrain(tiny_run.corpus, tmp_path / "o", "--tokenizer", tiny_run.tokenizer, "--val-fraction", "1.5")
    assert_user_error(res, "--val-fraction")
    res = pretrain(tiny_run.corpus, tmp_path / "o2", "--tokenizer", tiny_run.tokenizer, "--n-embd", "30",
                   "--n-head", "4")
    assert_user_error(res, "--n-embd 30")


def test_tokenizer_folder_that_is_not_one(tmp_path, tiny_run):
    d = tmp_path / "notatok"
    d.mkdir()
    assert_user_error(pretrain(tiny_run.corpus, tmp_path / "o", "--tokenizer", d), "not a tokenizer folder")


def test_config_values_that_are_not_values(tmp_path, tiny_run):
    """null, a list where one value belongs, 2.7 or true for an int: named, not passed on (a folder named
    "['a', 'b']", 2 steps for 2.7, a None that failed deep inside)."""
    cases = {"batch_size: null": "needs a value", "out: [runs/a, runs/b]": "expected one str",
             "max_steps: 2.7": "expected int, got 2.7", "max_steps: true": "expected int, got True"}
    for i, (line, fragment) in enumerate(cases.items()):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text(line + "\n", encoding="utf-8")
        assert_user_error(cli("pretrain", "--data", tiny_run.corpus, "--config", cfg), str(cfg), fragment)
    assert not list(tmp_path.glob("*runs*"))


def test_out_of_range_options_and_devices(tmp_path, tiny_run):
    assert_user_error(pretrain(tiny_run.corpus, tmp_path / "o", "--seed", "-1"), "--seed must be at least 0")
    assert_user_error(cli("finetune", "--task", "classify", "--model", "minilm-l6", "--train", "rotten_tomatoes",
                          "--out", tmp_path / "f", "--epochs", "inf"), "--epochs must be", "inf")
    assert_user_error(pretrain(tiny_run.corpus, tmp_path / "o", "--device", "gpu"), "--device gpu", "cpu")
    assert_user_error(pretrain("", tmp_path / "o"), "--data: an empty path")  # Path("") would be the cwd
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_user_error(pretrain(tiny_run.corpus, afile / "run"), f"{afile} is a file")
    assert not (tmp_path / "o").exists()


def test_tokenizer_out_holding_other_files_is_refused(tmp_path, tiny_run):
    mine = tmp_path / "project"
    (mine / "src").mkdir(parents=True)
    (mine / "notes.txt").write_text("mine")
    res = cli("tokenizer", "train", "--data", tiny_run.corpus, "--vocab-size", "300", "--out", mine)
    assert_user_error(res, "holds other files", "notes.txt")
    assert (mine / "notes.txt").read_text() == "mine" and (mine / "src").is_dir()
    # an earlier tokenizer may be replaced
    assert cli("tokenizer", "train", "--data", tiny_run.corpus, "--vocab-size", "300", "--out", tmp_path / "t").code == 0
    assert cli("tokenizer", "train", "--data", tiny_run.corpus, "--vocab-size", "300", "--out", tmp_path / "t").code == 0


def test_finetune_loads_safetensors_only_and_names_a_broken_folder(tmp_path, tiny_run):
    """A pytorch_model.bin is a pickle: never loaded (generate and serve refused it; finetune, predict and
    evaluate unpickled it). A truncated safetensors file is named, not shown as a traceback."""
    import shutil

    import torch
    from safetensors.torch import load_file

    binonly = tmp_path / "bin"
    shutil.copytree(tiny_run.final, binonly)
    torch.save(load_file(binonly / "model.safetensors"), binonly / "pytorch_model.bin")
    (binonly / "model.safetensors").unlink()
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps({"prompt": "Say hi.", "response": "hi"}) + "\n")
    args = ("finetune", "--task", "sft", "--train", data, "--validation", data, "--max-steps", "1", "--no-progress")
    assert_user_error(cli(*args, "--model", binonly, "--out", tmp_path / "a"), "safetensors", "never pickles")
    trunc = tmp_path / "trunc"
    shutil.copytree(tiny_run.final, trunc)
    (trunc / "model.safetensors").write_bytes((tiny_run.final / "model.safetensors").read_bytes()[:1000])
    assert_user_error(cli(*args, "--model", trunc, "--out", tmp_path / "b"), str(trunc), "cannot load")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_model_with_another_tasks_head_is_refused(tmp_path, tiny_run):
    """A classifier given to generate (or predict --task qa) would run with a new random head: noise."""
    import shutil

    folder = tmp_path / "clf"
    shutil.copytree(tiny_run.final, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForSequenceClassification"]}))
    assert_user_error(cli("generate", "--model", folder, "--prompt", "hi"), "LlamaForSequenceClassification",
                      "not a causal LM model")
    assert_user_error(cli("predict", "--model", folder, "--task", "qa", "--question", "Who?", "--context", "Me."),
                      "not a qa model")
    # no head for the task at all (a pretrained LM, a base encoder): a new random head's output would be noise
    # that changes from run to run (and a decoder without a pad id ended in a traceback on a batch of two)
    assert_user_error(cli("predict", "--model", tiny_run.final, "--task", "classify", "--text", "good", "bad"),
                      "LlamaForCausalLM", "no classify head", "lmforge finetune --task classify")
    assert_user_error(cli("evaluate", "--model", tiny_run.final, "--task", "qa", "--data", "lmforge_qa:test",
                          "--max-examples", "2"), "no qa head")


def test_a_run_of_the_other_training_verb_is_named_with_its_own_resume(tmp_path, tiny_run):
    import shutil

    run = tmp_path / "pt"
    shutil.copytree(tiny_run.out, run)
    assert list((run / "checkpoints").glob("step-*"))
    res = cli("finetune", "--task", "sft", "--model", tiny_run.final, "--train", "lmforge_chat", "--out", run)
    assert_user_error(res, f"lmforge pretrain --out {run} --resume", "pretrain run")
    # its config.yaml's options are "unknown" to finetune: say what the folder is instead
    assert_user_error(cli("finetune", "--out", run, "--resume"), "is a pretrain run",
                      f"lmforge pretrain --out {run} --resume")


# ---- data-loading audit (2026-12-09): each of these failed before its fix

def test_corpus_folders_leave_hidden_files_out_and_read_gzip_by_its_bytes(tmp_path):
    """Jupyter's .ipynb_checkpoints copy was trained on twice; gzip saved as .txt was 'not valid UTF-8'."""
    import gzip

    from lmforge.data.corpus import iter_documents, resolve_sources

    (tmp_path / ".ipynb_checkpoints").mkdir()
    (tmp_path / ".ipynb_checkpoints" / "a-checkpoint.txt").write_text("one")
    (tmp_path / "._b.txt").write_bytes(b"\x00\x05\x16\x07\xff")  # macOS's AppleDouble file from a zip
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_bytes(gzip.compress(b"two"))
    assert list(iter_documents(resolve_sources([str(tmp_path)]))) == ["one", "two"]


def test_jsonl_corpus_names_json_types(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text('{"text": "a"}\n{"text": null}\n', encoding="utf-8")
    assert_user_error(pretrain(f, tmp_path / "out"), f"{f}:2:", "field 'text' must be a string, got null")
