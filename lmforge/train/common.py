"""Pieces every training recipe shares: device and precision, distributed setup, optimizer, LR schedule,
metrics log and loss-curve plot. The loop itself lives in each recipe, where it can be read top to bottom.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge.errors import LmforgeError, closest


# ---- processes and devices ------------------------------------------------------------------------------

@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def agree(self, values: list[float], op: str = "max") -> list[float]:
        """The same numbers on every rank (the max, min or sum over ranks). Decisions a rank takes from its own
        clock or signals (stop now, how many steps fit the time budget) must not split the processes: a rank
        that stops or plans one step fewer leaves the others waiting in an all-reduce forever."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        reduce = torch.distributed.ReduceOp
        torch.distributed.all_reduce(t, op={"max": reduce.MAX, "min": reduce.MIN, "sum": reduce.SUM}[op])
        return t.tolist()

    def command(self, verb: str) -> str:
        """How to run `lmforge VERB` the way this process was started (for resume hints)."""
        return f"torchrun --nproc-per-node {self.world_size} -m lmforge {verb}" if self.distributed \
            else f"lmforge {verb}"

    def all_ranks(self, obj) -> list:
        """Every rank's `obj` (picklable), in rank order, on every rank; [obj] in a single process."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    @contextlib.contextmanager
    def main_first(self):
        """Rank 0 runs the block first (converting a model, filling a cache), then the other ranks, which find
        its work done. Where rank 0 fails, the others stop with it, quietly: waiting at a plain barrier, they
        would end in a traceback when its process group hung up."""
        if not self.distributed:
            yield
            return
        if self.is_main:
            try:
                yield
            except BaseException:
                self.agree([1])
                raise
            self.agree([0])
            return
        if self.agree([0])[0]:
            raise LmforgeError("stopped: rank 0 failed")  # rank 0 says why; the CLI prints only rank 0's errors
        yield


class StopOnSignal:
    """Ctrl-C or SIGTERM (a preempted job) sets `requested`: the loop finishes its step, saves a checkpoint and
    says how to resume. A second Ctrl-C aborts at once. `install()` before the loop, `restore()` in its finally."""

    def __init__(self):
        self.requested = False
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signum = True, signum
        print("\nstopping after this step (a checkpoint will be saved; press again to abort)", flush=True)

    def exit_code(self) -> int:
        """The exit status of a run this stopped, as a shell gives a process the signal ended: 130 for Ctrl-C,
        143 for SIGTERM (also on a torchrun rank stopped by another rank's signal). Not 0: a Kubernetes Job
        would count a preempted run as done, and `lmforge pretrain ... && next-step` would go on without it."""
        import signal
        return 128 + int(self.signum or signal.SIGTERM)

    def install(self) -> "StopOnSignal":
        import signal
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def restore(self) -> None:
        import signal
        for s, h in self._old.items():
            signal.signal(s, h)


def setup_runtime(device: str = "auto") -> Runtime:
    """One process, or one of `torchrun`'s: RANK/WORLD_SIZE/LOCAL_RANK come from its environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps"):
        raise LmforgeError(f"--device {device}: not a device; one of auto, cpu, cuda (or cuda:N), mps"
                           f"{closest(kind, ['cpu', 'cuda', 'mps'])}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise LmforgeError(f"--device {device}: no CUDA GPU is visible")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise LmforgeError(f"--device {device}: MPS (Apple GPU) is not available here")
    if device == "cuda":
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        try:
            dev = torch.device(device)
            if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
                raise RuntimeError(f"only {torch.cuda.device_count()} GPU(s)")
        except RuntimeError as e:
            raise LmforgeError(f"--device {device}: {e}") from None
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if world > 1 and rank != 0 and not os.environ.get("LMFORGE_ALL_RANKS_PRINT"):
        # Progress and metrics lines would repeat once per process; errors still reach stderr from every rank.
        sys.stdout = open(os.devnull, "w")
    return Runtime(dev, rank, world, local)


def cpu_supports_bf16() -> bool:
    """bf16 autocast pays off on CPUs with native bf16 dot products (AVX512-BF16 / AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()) and \
            torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        if precision == "fp16" and device.type == "cpu":
            raise LmforgeError("--precision fp16 is for GPUs; use bf16 or fp32 on a CPU")
        if precision == "bf16" and device.type == "cpu" and not cpu_supports_bf16():
            # bench/precision.py on a 2-core AVX2 machine: a MiniLM training step took 24.4 s in bf16, 1.1 s in fp32.
            print("note: this CPU has no native bf16 (avx512_bf16 or AMX), so bf16 is emulated and about 20x "
                  "slower than fp32 here; --precision auto picks fp32 on it", file=sys.stderr, flush=True)
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu":
        return "bf16" if cpu_supports_bf16() else "fp32"
    return "fp32"


def autocast(precision: str, device: torch.device):
    """Mixed precision: matmuls in bf16/fp16, master weights and optimizer state stay fp32."""
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def grad_scaler(precision: str, device: torch.device, state: dict | None = None) -> "torch.amp.GradScaler":
    """Loss scaling for fp16, whose 5-bit exponent flushes small gradients to zero (bf16 has fp32's range and needs
    none), resumed from a checkpoint's `state`. Disabled, it passes everything through, so the loops call it
    whatever the precision. FSDP2's sharded gradients take the plain scaler (FSDP1 needed its own)."""
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    if state and scaler.is_enabled():  # a disabled scaler saves {}: a run resumed in fp16 from bf16 starts afresh
        scaler.load_state_dict(state)
    return scaler


# ---- sharding across ranks (FSDP) ------------------------------------------------------------------------

def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's transformer blocks: the members of its longest ModuleLists (LlamaLM.layers, HF's model.layers
    or encoder.layer; a seq2seq model's encoder and decoder stacks)."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
    longest = max((len(m) for m in stacks), default=0)
    return [block for m in stacks if len(m) == longest for block in m]


def shard_model(model: torch.nn.Module) -> None:
    """FSDP2 in place: each block, then the rest, sharded over the ranks, so parameters, gradients and AdamW
    state take 1/world of the memory DDP's replicas take (DDP trades that memory for less communication).

    Rank 0's weights are broadcast first, as DDP does at construction, so every rank starts from one model.
    Build the optimizer afterwards: it must hold the sharded parameters."""
    from torch.distributed.fsdp import fully_shard

    with torch.no_grad():
        for p in {id(p): p for p in model.parameters()}.values():  # tied weights once
            torch.distributed.broadcast(p.data, 0)
    for block in transformer_blocks(model):
        fully_shard(block)
    fully_shard(model)


@contextlib.contextmanager
def sharded_generation(model: torch.nn.Module):
    """Around generate(); yields its `synced_gpus`. Sharded by FSDP, every rank must run each forward in step
    (synced_gpus keeps a rank whose sequences ended stepping with the others), and generate() calls parts of the
    model outside its forward (a seq2seq encoder, the embeddings), where FSDP's hooks would not gather their
    parameters: the root's stay gathered meanwhile."""
    from torch.distributed.fsdp import FSDPModule

    root = next((m for m in model.modules() if isinstance(m, FSDPModule)), None) \
        if torch.distributed.is_initialized() else None
    if root is None:
        yield False
        return
    root.unshard()
    try:
        yield True
    finally:
        root.reshard()


def full_state(model: torch.nn.Module, optimizer=None) -> tuple[dict, dict | None]:
    """The unsharded model (and optimizer) state on CPU, on rank 0; empty elsewhere. Every rank must call it.
    The optimizer state is keyed by parameter names (`load_optimizer_state` reads either layout)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=options)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_sd, optim_sd


def load_optimizer_state(model: torch.nn.Module, optimizer, state: dict, sharded: bool) -> None:
    """Load a saved optimizer state in either layout: an unsharded run's (`optimizer.state_dict()`, parameters
    numbered) or a sharded run's (`full_state`, parameters named), so a run may resume with or without FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    params = [p for group in optimizer.param_groups for p in group["params"]]  # the numbering's order
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for p in params]
    by_name = any(isinstance(k, str) for k in state["state"]) or any(
        isinstance(k, str) for g in state["param_groups"] for k in g["params"])
    if sharded:
        if not by_name:
            state = {"state": {order[i]: v for i, v in state["state"].items()},
                     "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, optim_state_dict=state,
                                 options=StateDictOptions(full_state_dict=True))
        return
    if by_name:
        index = {name: i for i, name in enumerate(order)}
        state = {"state": {index[k]: v for k, v in state["state"].items()},
                 "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in state["param_groups"]]}
    optimizer.load_state_dict(state)


# ---- optimisation ---------------------------------------------------------------------------------------

def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.95),
                    device: torch.device | None = None) -> torch.optim.AdamW:
    """AdamW with decay on matrices only (not norms, biases); fused kernel where the device has one."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:  # tied weights appear twice
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:  # fused AdamW is ~5x faster per step on CPU than the for-each default
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas)


def warmup_cosine(warmup: int, total: int, min_ratio: float = 0.1):
    """LR multiplier: linear warmup to 1, then cosine down to `min_ratio` at `total` steps."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


# ---- metrics --------------------------------------------------------------------------------------------

class MetricsLog:
    """Appends one JSON object per line to DIR/metrics.jsonl; `summary` writes DIR/metrics.json."""

    def __init__(self, out_dir: str | Path, enabled: bool = True):
        self.dir = Path(out_dir)
        self.enabled = enabled
        self.path = self.dir / "metrics.jsonl"

    def log(self, **row) -> None:
        if not self.enabled:
            return
        row = json_ready({"time": round(time.time(), 3), **row})
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")  # Chinese labels and samples, readable

    def rows(self) -> list[dict]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill or a full disk: the log is a record, not state
                continue
        return [r for r in rows if isinstance(r, dict)]

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the log reads as one clean run."""
        if not self.enabled or not self.path.exists():
            return
        keep = [r for r in self.rows() if r.get("step", 0) <= step]
        write_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in keep))

    def summary(self, data: dict) -> None:
        if self.enabled:
            write_atomic(self.dir / "metrics.json", json.dumps(json_ready(data), indent=2, ensure_ascii=False) + "\n")

    def plot(self, name: str = "loss.png") -> Path | None:
        """Training and validation loss against step, for people who would rather look than read."""
        if not self.enabled:
            return None
        rows = self.rows()
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
        if not train and not val:
            return None
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if val:
            ax.plot(*zip(*val), "o-", label="validation loss", lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.dir / name
        tmp = out.with_name(".tmp-" + name)
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, out)
        return out


def json_ready(obj):
    """`obj` with NaN and infinities as None: metrics such as Pearson on a constant set are undefined, and
    json.dumps would write a bare NaN that strict JSON readers (jq, JavaScript, pandas' engine) refuse."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj


def check_output_file(path: str | Path, option: str) -> None:
    """Fail before any work, not after it, when `path` cannot be written (a folder, or no such folder)."""
    path = Path(path)
    if path.is_dir():
        raise LmforgeError(f"{option} {path}: this is a folder; give a file name")
    if not path.parent.is_dir():
        raise LmforgeError(f"{option} {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise LmforgeError(f"{option} {path}: the folder {path.parent} is not writable")


def check_out_dir(out: str | Path, option: str = "--out") -> None:
    """Fail before any work, naming it, when `out` cannot become a folder: a file in its place or above it, or
    a folder that is not writable. Nothing is created yet (a run that stops on bad data leaves no --out)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise LmforgeError(f"{option} {out}: this is a file; give a folder")
    above = out
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise LmforgeError(f"{option} {out}: {above} is a file, so no folder can be made under it")
    if not os.access(above, os.W_OK | os.X_OK):
        raise LmforgeError(f"{option} {out}: {above} is not writable")


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def format_duration(seconds: float) -> str:
    if seconds < 60:  # a short run reads "4.2s", not "0m04s" (or "0m00s" under a second)
        return f"{seconds:.1f}s"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"
