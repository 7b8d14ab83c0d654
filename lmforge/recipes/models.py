"""List the packaged model aliases (they work offline) and where each resolves.

    lmforge models              # table
    lmforge models --prepare    # convert/cache the packaged models now (SmolLM2 GGUF -> safetensors)
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from lmforge.config import opt


@dataclass
class ModelsConfig:
    prepare: bool = opt(False, "convert and cache every installed packaged model now")
    json: bool = opt(False, "print JSON instead of a table")


def run(cfg: ModelsConfig) -> int:
    from lmforge.model.hub import alias_table, resolve_model

    if cfg.prepare:
        for row in alias_table():
            if row["source"]:
                resolve_model(row["alias"])
    rows = alias_table()
    if cfg.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        where = r["resolves_to"] or f"not installed ({r['install']})"
        print(f"{r['alias']:<14} {where}")
    print("Any local Hugging Face folder, lmforge output folder, or hub id (with network) works too.")
    return 0
