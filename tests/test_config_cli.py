"""The command line: verbs, --help, YAML configs and the precedence of the command line over the file."""
from __future__ import annotations

import pytest
import yaml

from conftest import assert_user_error, cli, cli_subprocess
from lmforge.cli import VERBS, main


def test_top_help_lists_every_verb(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for verb in VERBS:
        assert f"  {verb}" in out, verb
    assert "--config" in out


def test_no_arguments_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "verbs:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [[v, "--help"] for v in VERBS] + [["tokenizer", "train", "--help"]],
                         ids=lambda a: " ".join(a))
def test_verb_help_exits_zero(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(list(argv))
    assert exc.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: lmforge " + argv[0])
    assert "--config" in out


def test_pretrain_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit):
        main(["pretrain", "--help"])
    out = capsys.readouterr().out
    assert "--max-steps" in out and "--no-progress" in out
    assert "{tiny,small,base}" in out


def test_yaml_config_and_command_line_override(tmp_path, tiny_run):
    out = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({
        "data": [str(tiny_run.corpus)], "out": str(out), "tokenizer": str(tiny_run.tokenizer),
        "size": "tiny", "n_layer": 1, "n-embd": 32, "n_head": 2, "context": 32,  # dashed keys work too
        "max_steps": 1, "batch_size": 2, "seed": 7, "lr": 0.0005, "eval_tokens": 64, "sample_tokens": 0,
        "progress": False, "log_interval": 5,
    }), encoding="utf-8")
    res = cli("pretrain", "--config", cfg, "--seed", "9", "--batch-size", "3", "--log-interval", "1")
    assert res.code == 0, res.err
    saved = yaml.safe_load((out / "config.yaml").read_text())
    # From the file:
    assert saved["n_layer"] == 1 and saved["n_embd"] == 32 and saved["context"] == 32
    assert saved["lr"] == pytest.approx(0.0005)
    assert saved["max_steps"] == 1 and saved["eval_tokens"] == 64 and saved["progress"] is False
    assert saved["tokenizer"] == str(tiny_run.tokenizer)
    # The command line wins over the file:
    assert saved["seed"] == 9 and saved["batch_size"] == 3 and saved["log_interval"] == 1
    # Untouched options keep their defaults:
    assert saved["grad_accum"] == 1 and saved["weight_decay"] == pytest.approx(0.1)
    # The saved config is itself a valid --config file (keys and values round-trip through the dataclass).
    from lmforge import config as C
    from lmforge.recipes.pretrain import PretrainConfig

    assert C.build(PretrainConfig, saved).seed == 9


def test_unknown_yaml_key_suggests_closest(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("data: [shakespeare]\nout: x\nmax_step: 3\n", encoding="utf-8")
    res = cli("pretrain", "--config", cfg)
    assert_user_error(res, "unknown option 'max_step'", "did you mean 'max_steps'", str(cfg))
    assert not (tmp_path / "x").exists()


def test_yaml_wrong_type_is_a_clear_error(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("batch_size: lots\n", encoding="utf-8")
    assert_user_error(cli("pretrain", "--config", cfg), "batch_size", "expected int", "'lots'")


@pytest.mark.parametrize("argv,fragment", [
    (["finetune", "--task", "classify", "--lr", "-1"], "--lr must be at least 0 (got -1.0)"),
    (["finetune", "--task", "classify", "--grad-accum", "0"], "--grad-accum must be at least 1"),
    (["finetune", "--task", "classify", "--warmup-ratio", "1.5"], "--warmup-ratio must be at least 0 and at most 1"),
    (["finetune", "--task", "sft", "--lora", "--lora-r", "0"], "--lora-r must be at least 1"),
    (["pretrain", "--val-fraction", "1"], "--val-fraction must be more than 0 and less than 1"),
    (["serve", "--model", "x", "--port", "70000"], "--port must be at least 0 and at most 65535"),
    (["generate", "--model", "x", "--top-p", "0"], "--top-p must be more than 0"),
])
def test_out_of_range_options_are_refused_before_any_work(argv, fragment, tmp_path):
    # a negative learning rate used to reach torch's ValueError traceback; --grad-accum 0 a ZeroDivisionError
    assert_user_error(cli(*argv, "--out", tmp_path / "x") if argv[0] in ("finetune", "pretrain") else cli(*argv),
                      fragment)
    assert not (tmp_path / "x").exists()


def test_out_of_range_yaml_value_names_the_file(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("batch_size: 0\n", encoding="utf-8")
    assert_user_error(cli("pretrain", "--config", cfg), str(cfg), "field 'batch_size' must be at least 1 (got 0)")


def test_yaml_not_a_mapping(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("- a\n- b\n", encoding="utf-8")
    assert_user_error(cli("pretrain", "--config", cfg), "mapping")


def test_missing_config_file(tmp_path):
    assert_user_error(cli("pretrain", "--config", tmp_path / "nope.yaml"), "nope.yaml", "not found")


def test_unknown_cli_option_suggests_closest():
    res = cli("pretrain", "--batchsize", "4")
    assert_user_error(res, "unknown option '--batchsize'", "did you mean '--batch-size'")


def test_other_tools_option_names_suggest_ours(tmp_path):
    # the Hugging Face Trainer's names, which no spelling distance leads to
    assert_user_error(cli("finetune", "--learning-rate", "1e-3"), "'--learning-rate'", "did you mean '--lr'")
    assert_user_error(cli("finetune", "--num-train-epochs", "2"), "did you mean '--epochs'")
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("gradient_accumulation_steps: 4\n", encoding="utf-8")
    assert_user_error(cli("finetune", "--config", cfg), "unknown option 'gradient_accumulation_steps'",
                      "did you mean 'grad_accum'")


def test_unknown_verb_suggests_closest():
    assert_user_error(cli("pretrian"), "unknown verb 'pretrian'", "did you mean 'pretrain'")
    assert_user_error(cli("generat", "--model", "x"), "did you mean 'generate'")


def test_unknown_subverb_suggests_closest():
    assert_user_error(cli("tokenizer", "trian"), "train", "did you mean 'train'")
    assert_user_error(cli("tokenizer"), "needs one of: train")


def test_unknown_verb_exit_code_in_a_real_process():
    proc = cli_subprocess("pretrian")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_user_error(proc, "did you mean 'pretrain'")


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("lmforge ")


def test_bf16_on_a_cpu_without_it_says_it_is_emulated(monkeypatch, capsys):
    import torch

    from lmforge.train import common

    cpu = torch.device("cpu")
    monkeypatch.setattr(common, "cpu_supports_bf16", lambda: False)
    assert common.resolve_precision("auto", cpu) == "fp32" and capsys.readouterr().err == ""
    assert common.resolve_precision("bf16", cpu) == "bf16"  # asked for: honoured, with the cost named
    assert "bf16 is emulated" in capsys.readouterr().err  # stderr: evaluate's stdout is JSON
    monkeypatch.setattr(common, "cpu_supports_bf16", lambda: True)
    assert common.resolve_precision("bf16", cpu) == "bf16" and capsys.readouterr().err == ""
    assert common.resolve_precision("auto", cpu) == "bf16"


def test_a_repeated_list_option_adds_to_it():
    import argparse

    from lmforge import config as C
    from lmforge.recipes.predict import PredictConfig

    parser = argparse.ArgumentParser()
    C.add_arguments(parser, PredictConfig)
    # `--text A --text B` (as the predict docs write it) means both texts, not only the last
    assert vars(parser.parse_args(["--text", "a", "--text", "b", "c"])) == {"text": ["a", "b", "c"]}
    assert vars(parser.parse_args(["--text", "a", "b"])) == {"text": ["a", "b"]}


def test_metrics_files_keep_chinese_readable(tmp_path):
    """Per-class keys of a 正面/负面 classifier and pretraining's sample texts: UTF-8, not \\uXXXX escapes."""
    import json

    from lmforge.train.common import MetricsLog

    log = MetricsLog(tmp_path)
    log.log(step=1, sample="新华社北京")
    log.log(step=2, sample="人民日报")
    log.truncate_after(1)
    log.summary({"test": {"per_class_f1": {"正面": 0.7, "负面": 0.6}}})
    assert "新华社北京" in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8")
    assert "人民日报" not in (tmp_path / "metrics.jsonl").read_text(encoding="utf-8")
    text = (tmp_path / "metrics.json").read_text(encoding="utf-8")
    assert "正面" in text and json.loads(text)["test"]["per_class_f1"]["负面"] == 0.6
