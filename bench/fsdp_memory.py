"""What `--fsdp` saves: training state held by each process, DDP against FSDP, measured on 2 CPU processes.

    .venv/bin/python bench/fsdp_memory.py                  # `base` preset (12 x 768, ~100 M parameters), ~1 minute
    .venv/bin/python bench/fsdp_memory.py --size small --json out.json

Starts itself under `torchrun --nproc-per-node 2` (gloo). For each mode it builds the same model the way
`lmforge pretrain` does (`shard_model` for FSDP, DistributedDataParallel otherwise), runs one training step
(forward, backward, fused AdamW) and counts the bytes of the tensors each process holds: its parameters
(the local shard under FSDP), their gradients, and the AdamW moments. Activations and the transient all-gathered
blocks are not counted: they depend on batch size and are the same in both modes.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def measure(size: str, fsdp: bool) -> dict:
    import torch

    from lmforge.model.llama import PRESETS, LlamaLM, ModelConfig
    from lmforge.train.common import build_optimizer, shard_model

    torch.manual_seed(0)
    model = LlamaLM(ModelConfig(vocab_size=8192, **PRESETS[size]))
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if fsdp:
        shard_model(model)
        train_model = model
    else:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = build_optimizer(model, 1e-3, 0.1)
    x = torch.randint(0, 8192, (2, 64))
    loss = torch.nn.functional.cross_entropy(train_model(x).flatten(0, 1).float(), x.flatten())
    loss.backward()
    params = list({id(p): p for p in model.parameters()}.values())
    grads = local_bytes(p.grad for p in params)
    optimizer.step()
    moments = local_bytes(v for s in optimizer.state.values() for k, v in s.items() if k != "step")
    return {"parameters": n_params, "param_bytes": local_bytes(params), "grad_bytes": grads,
            "adam_bytes": moments, "total_bytes": local_bytes(params) + grads + moments}


def worker(args) -> None:
    import torch

    torch.distributed.init_process_group("gloo")
    rank = torch.distributed.get_rank()
    rows = {mode: measure(args.size, mode == "fsdp") for mode in ("ddp", "fsdp")}
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, rows)
    if rank == 0:
        print(json.dumps(gathered))
    torch.distributed.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="base", choices=["tiny", "small", "base"])
    ap.add_argument("--json", default="")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__,
           "--worker", "--size", args.size]
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [line for line in res.stdout.splitlines() if line.startswith("[")]
    if res.returncode != 0 or not lines:
        sys.exit(f"torchrun failed:\n{res.stderr[-3000:]}")
    per_rank = json.loads(lines[-1])
    mib = 2 ** 20
    print(f"`{args.size}` preset, {per_rank[0]['ddp']['parameters'] / 1e6:.1f} M parameters, 2 processes; "
          "MiB held by each process:")
    print(f"{'mode':<6}{'rank':>5}{'parameters':>12}{'gradients':>11}{'AdamW':>9}{'total':>9}")
    for mode in ("ddp", "fsdp"):
        for rank, rows in enumerate(per_rank):
            r = rows[mode]
            print(f"{mode:<6}{rank:>5}{r['param_bytes'] / mib:>12.1f}{r['grad_bytes'] / mib:>11.1f}"
                  f"{r['adam_bytes'] / mib:>9.1f}{r['total_bytes'] / mib:>9.1f}")
    ratio = max(r["fsdp"]["total_bytes"] for r in per_rank) / per_rank[0]["ddp"]["total_bytes"]
    print(f"FSDP / DDP, the larger rank: {ratio:.3f} (1/2 would be a perfect split)")
    if args.json:
        Path(args.json).write_text(json.dumps({"size": args.size, "world": 2, "per_rank": per_rank,
                                               "fsdp_over_ddp": ratio}, indent=2))


if __name__ == "__main__":
    main()
