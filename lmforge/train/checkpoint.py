"""Checkpoints: a Hugging Face folder plus `lmforge_state/` with everything needed to resume exactly.

    DIR/checkpoints/step-000500/
        config.json, model.safetensors, tokenizer files     <- plain `from_pretrained` loads this
        lmforge_state/trainer.pt                            <- optimizer, scheduler, RNG, step, data position
        lmforge_state/config.yaml                           <- the resolved run config
    DIR/checkpoints/latest                                  <- name of the newest complete checkpoint

Each checkpoint is written into a temp folder and renamed into place, and `latest` is replaced atomically
after that, so a crash mid-save leaves the previous checkpoint as the one `--resume` picks.
State is saved with `torch.save` and read back with `torch.load(weights_only=True)`: no arbitrary unpickling.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch

from lmforge.errors import LmforgeError
from lmforge.model.hub import temp_folder

STATE_DIR = "lmforge_state"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict | list[dict], rank: int = 0) -> None:
    """`state`: one rng_state(), or a list of them, one per rank of a torchrun job (each rank draws its own
    dropout masks); a rank the run did not have takes rank 0's."""
    if isinstance(state, list):
        state = state[rank] if rank < len(state) else state[0]
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_folder_atomic(dest: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a temp folder beside `dest` with `write(tmp)`, then swap it into place. What an earlier kill
    mid-write left for `dest` is tidied first (tidy_leftovers)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tidy_leftovers(dest.parent, dest.name)
    tmp = temp_folder(dest.parent, f".tmp-{dest.name}-")
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
        os.replace(dest, old)
        os.replace(tmp, dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, dest)
    return dest


def tidy_leftovers(parent: Path, name: str | None = None) -> None:
    """Undo what a kill mid-write_folder_atomic left in `parent` for the folder `name` (None: every step-*
    checkpoint): a folder being replaced sits in .old-NAME-PID until its successor is in place, so one without
    a NAME beside it is the only copy and goes back; .tmp-NAME-* folders are unfinished writes (one process
    writes a run's folders at a time), each a model's worth of disk."""
    if not parent.is_dir():
        return
    stem = re.escape(name) if name is not None else r"step-\d+"
    for entry in sorted(parent.iterdir()):
        old = re.fullmatch(rf"\.old-({stem})-\d+", entry.name)
        if old and entry.is_dir():
            if (parent / old[1]).exists():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                os.replace(entry, parent / old[1])
    for entry in parent.iterdir():
        if re.fullmatch(rf"\.tmp-({stem})-[a-z0-9_]+", entry.name) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)


def save_checkpoint(out_dir: str | Path, step: int, write_model: Callable[[Path], None], trainer_state: dict,
                    config_yaml: str, keep: int = 2, protect: tuple[str, ...] = ()) -> Path:
    """Write checkpoint `step` atomically; `write_model(folder)` writes the HF files. Returns its folder.

    The newest `keep` checkpoints survive, plus any named in `protect` (e.g. the best one so far)."""
    root = Path(out_dir) / "checkpoints"
    name = f"step-{step:06d}"
    tidy_leftovers(root)

    def write(folder: Path):
        write_model(folder)
        (folder / STATE_DIR).mkdir(exist_ok=True)
        torch.save(trainer_state, folder / STATE_DIR / "trainer.pt")
        (folder / STATE_DIR / "config.yaml").write_text(config_yaml, encoding="utf-8")

    final = write_folder_atomic(root / name, write)
    latest_tmp = root / ".latest.tmp"
    latest_tmp.write_text(name)
    os.replace(latest_tmp, root / "latest")
    # Oldest first; never delete the one just written.
    done = sorted(p for p in root.glob("step-*") if p.is_dir())
    for old in done[:-keep] if keep > 0 else []:
        if old != final and old.name not in protect:
            discard(old)
    return final


def discard(folder: Path) -> None:
    """Delete a checkpoint folder, first renamed to a .tmp- name that tidy_leftovers clears: a kill mid-delete
    (a model's worth of files, slow to unlink on a network file system) left a step-* folder with half its files,
    which --resume, evaluate or a damaged-checkpoint message could pick."""
    doomed = folder.with_name(f".tmp-{folder.name}-deleted")
    if doomed.exists():  # an earlier run's, killed mid-delete: os.replace needs the name
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    root = Path(out_dir) / "checkpoints"
    tidy_leftovers(root)
    marker = root / "latest"
    if marker.exists():
        path = root / marker.read_text().strip()
        if (path / STATE_DIR / "trainer.pt").exists():
            return path
    done = sorted(p for p in root.glob("step-*") if (p / STATE_DIR / "trainer.pt").exists())
    return done[-1] if done else None


def prepare_run_dir(out: Path, verb: str, resume: bool, rt) -> None:
    """What `pretrain` and `finetune` (`verb`) do to --out before any work: refuse one that cannot become a
    folder; for a new run, refuse another run's checkpoints; resumed, put back a DIR/final that a kill while it
    was being replaced left under a temp name (rank 0 alone, before the others look for it)."""
    from lmforge.train.common import check_out_dir

    check_out_dir(out)
    if not resume:
        refuse_earlier_run(out, verb)
        return
    with rt.main_first():
        if rt.is_main:
            tidy_leftovers(out, "final")


def refuse_earlier_run(out_dir: str | Path, verb: str) -> None:
    """A new run (no --resume) in a folder that holds another run's checkpoints would mix the two: theirs would
    count against --keep-checkpoints and be what a later --resume picks. Refused, naming both ways out."""
    root = Path(out_dir) / "checkpoints"
    found = sorted(p.name for p in root.glob("step-*")) if root.is_dir() else []
    if found:
        from lmforge.config import saved_run_verb

        theirs = saved_run_verb(out_dir) or verb
        again = "--resume" if theirs == verb else f"lmforge {theirs} --out {out_dir} --resume (it is a {theirs} run)"
        raise LmforgeError(f"{out_dir} holds checkpoints of an earlier run (up to {found[-1]}): continue it with "
                           f"{again}, or start afresh in another --out (or after rm -r {root})")


def nothing_to_resume(out_dir: str | Path, verb: str) -> LmforgeError:
    """--resume on a run stopped before its first checkpoint (during the step-0 evaluation, or killed): the
    saved config starts it again as it was started."""
    out = Path(out_dir)
    return LmforgeError(f"--resume: no checkpoint in {out / 'checkpoints'}: the run stopped before it saved one; "
                        f"start it again with: lmforge {verb} --config {out / 'config.yaml'}")


def load_checked(ckpt: Path, load: Callable, *args):
    """`load(ckpt, *args)`, with a damaged checkpoint (a truncated or missing weights file: a full disk, a copy
    cut short) named, with the way out, instead of a safetensors traceback."""
    try:
        return load(ckpt, *args)
    except Exception as e:  # SafetensorError, OSError, a bad header, or a loader's own message about it
        older = sorted(p.name for p in ckpt.parent.glob("step-*") if p.name < ckpt.name)
        way_out = (f"delete it to resume from {older[-1]}" if older else
                   "no earlier checkpoint is left; start the run again")
        what = str(e) if isinstance(e, LmforgeError) else \
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        raise LmforgeError(f"{ckpt}: damaged checkpoint ({what}); {way_out}") from None


def load_trainer_state(ckpt: Path) -> dict:
    path = ckpt / STATE_DIR / "trainer.pt"
    if not path.exists():
        raise LmforgeError(f"{ckpt}: not an lmforge checkpoint (no {STATE_DIR}/trainer.pt)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LmforgeError(f"{path}: unreadable trainer state ({type(e).__name__}: {e})") from None
