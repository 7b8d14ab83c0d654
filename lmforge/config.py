"""Typed configs: dataclass defaults <- `--config FILE.yaml` <- command-line `--key value`.

Each verb owns one dataclass. Its fields become command-line options (underscores read as dashes), the
same names are the keys of the YAML file, and the resolved dataclass is written next to the outputs so a
run can be repeated or resumed from it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import LmforgeError, closest


_BOUNDS = {"gt": ("more than", lambda v, b: v > b), "ge": ("at least", lambda v, b: v >= b),
           "lt": ("less than", lambda v, b: v < b), "le": ("at most", lambda v, b: v <= b)}


def opt(default: Any = None, help: str = "", **extra) -> Any:
    """A config field with its help text, argparse extras such as choices, and numeric bounds checked by `build`:
    gt/ge/lt/le, e.g. opt(1, "batches per step", ge=1)."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **extra})
    return dataclasses.field(default=default, metadata={"help": help, **extra})


def _base_type(tp) -> tuple[type, bool]:
    """(element type, is_list) for str/int/float/bool, Optional[...] and list[...] annotations."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin is list:
        return typing.get_args(tp)[0], True
    return tp, False


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def _fields(cls) -> dict[str, dataclasses.Field]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def add_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One option per dataclass field; defaults are suppressed so we know what the user actually typed."""
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="read options from a YAML file; command-line options override it")
    for name, f in _fields(cls).items():
        tp, is_list = _base_type(f.type)
        flag = "--" + name.replace("_", "-")
        meta = {k: v for k, v in f.metadata.items() if k not in _BOUNDS}
        help_text = meta.pop("help", "")
        default = _default(f)
        if default not in (None, [], "") and tp is not bool:
            help_text += f" (default: {default})"
        help_text = help_text.replace("%", "%%")  # argparse %-formats help ("5% of the run" crashed --help)
        kwargs: dict[str, Any] = dict(help=help_text, default=argparse.SUPPRESS, dest=name, **meta)
        if tp is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif is_list:
            # "extend": `--text a --text b` means both, as `--text a b` does (store kept only the last)
            parser.add_argument(flag, nargs="+", action="extend", type=tp, metavar=name.upper(), **kwargs)
        else:
            parser.add_argument(flag, type=tp, metavar=name.upper() if "choices" not in meta else None, **kwargs)


def _coerce(value: Any, tp, is_list: bool, where: str):
    if value is None:
        return None
    if is_list:
        items = value if isinstance(value, list) else [value]
        return [_coerce(v, tp, False, where) for v in items]
    if isinstance(value, (list, dict)):  # a YAML list or mapping where one value belongs (str() made a path of it)
        raise LmforgeError(f"{where}: expected one {tp.__name__}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "yes", "1", "on"):
            return True
        if str(value).lower() in ("false", "no", "0", "off"):
            return False
        raise LmforgeError(f"{where}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, bool) or tp is int and isinstance(value, float) and value != int(value):
        raise LmforgeError(f"{where}: expected {tp.__name__}, got {value!r}")  # int(True) is 1, int(2.7) is 2
    try:
        return tp(value)
    except (TypeError, ValueError, OverflowError):
        raise LmforgeError(f"{where}: expected {tp.__name__}, got {value!r}") from None


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise LmforgeError(f"{p}: config file not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise LmforgeError(f"{p}:{line} invalid YAML: {getattr(e, 'problem', e)}") from None
    except UnicodeDecodeError as e:
        raise LmforgeError(f"{p}: not valid UTF-8 at byte {e.start}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise LmforgeError(f"{p}: expected a mapping of option: value at the top level")
    return data


def build(cls, values: dict, source: str = "config"):
    """Make a `cls` from a dict, rejecting unknown keys with the closest valid name."""
    fields = _fields(cls)
    kwargs = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            raise LmforgeError(f"{source}: unknown option '{key}'{closest(name, fields)}")
        tp, is_list = _base_type(fields[name].type)
        where = f"{source}: field '{key}'"
        if value is None and type(None) not in typing.get_args(fields[name].type):
            raise LmforgeError(f"{where}: needs a value (null/empty is not one: leave the key out for the default)")
        choices = fields[name].metadata.get("choices")
        value = _coerce(value, tp, is_list, where)
        if choices and value is not None and value not in choices:
            raise LmforgeError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}"
                               f"{closest(str(value), map(str, choices))}")
        _check_bounds(fields[name].metadata, value, f"--{name.replace('_', '-')}" if source == "options" else where)
        kwargs[name] = value
    return cls(**kwargs)


def _check_bounds(meta, value, where: str) -> None:
    bounds = [(k, meta[k]) for k in _BOUNDS if k in meta]
    if not bounds or value is None:
        return
    if not all(_BOUNDS[k][1](value, b) for k, b in bounds):
        rule = " and ".join(f"{_BOUNDS[k][0]} {b}" for k, b in bounds)
        raise LmforgeError(f"{where} must be {rule} (got {value!r})")


def resolve(cls, args: argparse.Namespace, base: dict | None = None):
    """defaults <- base (e.g. a saved config on resume) <- --config file <- command-line options."""
    values: dict = dict(base or {})
    cli = vars(args).copy()
    cli.pop("verb", None)
    cli.pop("func", None)
    cfg_file = cli.pop("config", None)
    keep = cli.pop("resume_keep", ())
    if cfg_file:
        from_file = {str(k).replace("-", "_"): v for k, v in load_yaml(cfg_file).items()}
        build(cls, from_file, source=str(cfg_file))  # validate names and types against the file itself
        values.update(from_file)
    values.update(cli)
    for key in keep:  # set by resume_base: a default typed again must not re-resolve what the run resolved
        values[key] = base[key]
    return build(cls, values, source="options")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save(cfg, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML, atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)


# Options that may differ on --resume: how this invocation runs, not what the run trains. Precision and the
# attention kernel belong here with the device: a run moved to another machine must be able to pick what that
# machine runs well ("--precision auto" again), and the weights and optimizer state are fp32 whichever it is.
RESUME_MAY_CHANGE = {"out", "resume", "stop_after_steps", "progress", "device", "eval_batch_size", "keep_checkpoints",
                     "log_interval", "save_interval", "fsdp", "precision", "attention", "compile"}


def run_verb(saved: dict) -> str | None:
    """Which training verb wrote a run's config.yaml (`saved`): 'finetune' (it names a task), 'pretrain' (it
    names data and no task), else None."""
    if not isinstance(saved, dict):
        return None
    if "task" in saved and "train" in saved:
        return "finetune"
    if "data" in saved and "task" not in saved:
        return "pretrain"
    return None


def saved_run_verb(out: str | os.PathLike) -> str | None:
    """run_verb of DIR/config.yaml, or None where there is none (or it does not parse)."""
    try:
        return run_verb(load_yaml(Path(out) / "config.yaml"))
    except LmforgeError:
        return None


_VERBS = {"FinetuneConfig": "finetune", "PretrainConfig": "pretrain"}


def resume_base(args: argparse.Namespace, cls, resolved: tuple[str, ...] = ()) -> dict:
    """With --resume, a run's saved DIR/config.yaml is the base, so `--out DIR --resume` alone is enough.
    Training recipes use it as their `base_config`. An option given again with another value (a longer
    --max-steps, a new --lr) is refused by name instead of being half-applied: the saved state fixes the
    schedule and data order, so a resumed run is the run that was started. `resolved` names the options whose
    default means "work it out" and whose worked-out value the recipe saves (max_steps 0, lr 0...)."""
    if not getattr(args, "resume", False) or not getattr(args, "out", None):
        return {}
    path = Path(args.out) / "config.yaml"
    if not path.exists():
        raise LmforgeError(f"--resume: {args.out} holds no run to continue (no config.yaml); drop --resume to "
                           f"start one")
    saved = load_yaml(path)
    verb, theirs = _VERBS.get(cls.__name__), run_verb(saved)
    if verb and theirs and theirs != verb:  # else each verb's options are "unknown" to the other
        raise LmforgeError(f"--resume: {args.out} is a {theirs} run; continue it with: lmforge {theirs} --out "
                           f"{args.out} --resume")
    for key in ("resume", "stop_after_steps"):  # per-invocation choices, not part of the run
        saved.pop(key, None)
    build(cls, saved, source=str(path))  # an edited or damaged saved config is named as the file it is
    given = {k: v for k, v in vars(args).items() if k not in ("verb", "func", "config")}
    if getattr(args, "config", None):
        fields, from_file = _fields(cls), {}
        for key, value in load_yaml(args.config).items():
            name = str(key).replace("-", "_")
            if name in fields:  # typed as `build` types it: YAML reads 1e-3 as a string, `data: x` as no list
                value = _coerce(value, *_base_type(fields[name].type), f"{args.config}: field '{key}'")
            from_file[name] = value
        given = {**from_file, **given}
    # "Work it out" typed again ("--lr 0", "--eval-interval 0") is what the saved value was worked out from, e.g.
    # when the first command line is repeated with --resume: not a change. It must not replace the saved value
    # either: the run fitted --eval-interval to a timed evaluation that a resumed run does not repeat, so working
    # it out again would evaluate on another schedule than the run that was started. Any other option typed with
    # its default where the run has another value is a change, refused like any other.
    defaults = {n: _default(f) for n, f in _fields(cls).items()}
    args.resume_keep = [k for k, v in given.items() if k in saved and k not in RESUME_MAY_CHANGE and k in resolved
                        and _same(v, defaults[k]) and not _same(v, saved[k])]
    changed = [k for k, v in given.items() if k in saved and k not in RESUME_MAY_CHANGE and not _same(v, saved[k])
               and k not in args.resume_keep]
    if changed:
        shown = ", ".join(f"--{k.replace('_', '-')} {given[k]} (the run has {saved[k]})" for k in changed)
        raise LmforgeError(f"--resume continues {args.out} as it was started; its config.yaml disagrees with "
                           f"{shown}: drop those options, or start a new run in another --out (from "
                           f"{Path(args.out) / 'final'} to build on this one)")
    return saved


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(a - b) <= 1e-12 * max(abs(a), abs(b), 1.0)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b or str(a) == str(b)
