"""Fine-tuning tasks: one file per task, looked up lazily by name."""
from __future__ import annotations

import importlib

TASKS = {
    "classify": ("lmforge.tasks.classify", "ClassifyTask"),
    "qa": ("lmforge.tasks.qa", "QATask"),
    "sft": ("lmforge.tasks.sft", "SFTTask"),
    "translate": ("lmforge.tasks.translate", "TranslateTask"),
}


def get_task(name: str):
    module, cls = TASKS[name]
    return getattr(importlib.import_module(module), cls)
