"""Load any causal LM folder behind one small interface used by training, evaluation and generation:

    logits = model(idx, cache)            idx (B, T) -> (B, T, vocab); cache is optional
    cache = model.new_cache(batch, max_len)
    model.save_hf(folder)

Llama-architecture folders (lmforge's own, SmolLM2, Llama 2/3.x, Mistral without sliding window, Qwen2/Qwen2.5)
load into the native `LlamaLM` (fused projections, preallocated KV cache: faster on CPU, batched serving);
anything else (GPT-2, yarn or linear RoPE scaling, sliding windows...) is wrapped from
`transformers.AutoModelForCausalLM`.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn

from safetensors import SafetensorError

from lmforge.errors import LmforgeError
from lmforge.model.llama import LlamaLM, config_from_hf


class HFCausalLM(nn.Module):
    """A transformers causal LM with the native model's interface."""

    def __init__(self, hf_model):
        super().__init__()
        self.hf = hf_model
        self.max_seq_len = getattr(hf_model.config, "max_position_embeddings", None) or 2048
        # transformers 5.x renamed forward's past_key_values to cache (the old name goes in 5.40): ask the model
        import inspect
        self.cache_arg = "cache" if "cache" in inspect.signature(hf_model.forward).parameters else "past_key_values"

    def forward(self, idx: torch.Tensor, cache=None) -> torch.Tensor:
        out = self.hf(input_ids=idx, use_cache=cache is not None, **{self.cache_arg: cache})
        return out.logits

    def new_cache(self, batch: int, max_len: int, dtype=None):
        from transformers import DynamicCache

        return DynamicCache()

    def save_hf(self, folder, state: dict[str, torch.Tensor] | None = None) -> None:
        """`state`: this module's state dict to write instead of the live parameters (FSDP gathers one)."""
        if state is not None:
            state = {k.removeprefix("hf."): v for k, v in state.items()}
        self.hf.save_pretrained(folder, safe_serialization=True, state_dict=state)


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.exists():
        raise LmforgeError(f"{folder}: not a model folder (no config.json)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LmforgeError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None


# task heads (architecture name endings) that no other task can use
TASK_HEADS = {"ForSequenceClassification": "classify", "ForQuestionAnswering": "qa",
              "ForTokenClassification": "token classification", "ForMultipleChoice": "multiple choice"}


def check_head(folder: str | Path, task: str, config: dict | None = None) -> None:
    """Refuse a folder saved with another task's head (a classifier given to `generate`, or to `predict --task
    qa`): transformers would give it a new, random head, and report that only in a load message lmforge keeps
    quiet, so every output would be noise. Folders that record no such head (a base encoder, a hub id) pass.
    `config`: the folder's config.json where the caller has read it already."""
    try:
        if config is None:
            config = json.loads((Path(folder) / "config.json").read_text())
        archs = config.get("architectures") or []
    except (OSError, ValueError, AttributeError):
        return
    heads = [next((t for s, t in TASK_HEADS.items() if a.endswith(s)), None) for a in archs]
    if archs and all(h is not None and h != task for h in heads):
        raise LmforgeError(f"{folder}: a {archs[0]} (a {heads[0]} model), not a {task} model: its {task} head "
                           f"would be random")
    if archs and task in TASK_HEADS.values() and task not in heads:
        # a base encoder or a causal LM asked to predict labels or spans: the head would be new and random, and
        # its confident-looking output would change from run to run
        raise LmforgeError(f"{folder}: a {archs[0]}, with no {task} head; fine-tune one first: lmforge finetune "
                           f"--task {task} --model {folder} --train DATA --out DIR")


def load_causal_lm(folder: str | Path, native: bool = True) -> nn.Module:
    folder = Path(folder)
    hf = read_config(folder)
    check_head(folder, "causal LM", hf)
    if not list(folder.glob("*.safetensors")):
        raise LmforgeError(f"{folder}: no *.safetensors weights (lmforge loads safetensors only, never pickles)")
    if native:
        try:
            config_from_hf(hf)
            return LlamaLM.from_hf(folder)
        except (ValueError, KeyError, OSError, RuntimeError, SafetensorError):
            pass  # not a plain Llama (or broken): transformers loads it, or says what is wrong with it
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, dtype=torch.float32)
    except Exception as e:
        raise LmforgeError(f"{folder}: cannot load as a causal LM ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return HFCausalLM(model)
