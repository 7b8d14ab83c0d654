"""User-facing errors: caught by the CLI and printed as one line, never a traceback."""
from __future__ import annotations

import difflib


class LmforgeError(Exception):
    """An error caused by the user's input (files, options, data). The message is the whole story."""


# What the Hugging Face Trainer (run_glue/run_clm), LitGPT and Axolotl call lmforge's options. Suggested by
# meaning, since no spelling distance leads from 'learning_rate' to 'lr'; never accepted silently.
SYNONYMS = {
    "learning_rate": "lr", "num_train_epochs": "epochs", "num_epochs": "epochs",
    "per_device_train_batch_size": "batch_size", "train_batch_size": "batch_size", "micro_batch_size": "batch_size",
    "per_device_eval_batch_size": "eval_batch_size", "gradient_accumulation_steps": "grad_accum",
    "max_grad_norm": "grad_clip", "max_seq_length": "max_length", "sequence_len": "max_length",
    "output_dir": "out", "model_name_or_path": "model", "base_model": "model", "train_file": "train",
    "validation_file": "validation", "test_file": "test", "lora_rank": "lora_r",
    "lora_target_modules": "lora_targets", "bf16": "precision", "fp16": "precision",
    "resume_from_checkpoint": "resume",
}


def closest(word: str, choices) -> str:
    """' (did you mean X?)' for another tool's name of an option, or a close spelling, else ''. `word` and
    `choices` are both option flags ('--learning-rate') or both config keys ('learning_rate')."""
    choices = list(choices)
    synonym = SYNONYMS.get(word.lstrip("-").replace("-", "_"))
    if synonym is not None:
        flag = "--" + synonym.replace("_", "-")
        for candidate in (flag if word.startswith("--") else synonym, synonym, flag):
            if candidate in choices:
                return f" (did you mean '{candidate}'?)"
    match = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else ""
