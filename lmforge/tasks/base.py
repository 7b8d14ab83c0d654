"""What a fine-tuning task provides to the shared loop in `lmforge/recipes/finetune.py`.

One file per task (classify.py, qa.py, sft.py, translate.py), each a `Task` subclass. The loop owns
everything generic: model resolution, LoRA wrapping, length-grouped batches, precision, optimizer,
schedule, progress, checkpoints and resume, best-model tracking, metrics.json and predictions.jsonl.
A task owns what differs: which Auto class, how examples become token features, and how to score.

Feature dicts are plain Python (lists of ints) so they are cheap to sort and batch; every feature has
"input_ids" (its length drives length-grouped batching); `collate` pads a list of them into tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmforge.data.labelled import Loaded
from lmforge.errors import LmforgeError


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # e.g. {"accuracy": 0.84, "macro_f1": 0.84, ...}; values JSON-serialisable
    predictions: list[dict] = field(default_factory=list)  # one JSON row per example, for predictions.jsonl


class Task:
    name = ""
    auto_class = ""  # e.g. "AutoModelForSequenceClassification": what plain transformers loads DIR/final with
    peft_task_type = ""  # peft.TaskType name: SEQ_CLS, QUESTION_ANS, CAUSAL_LM, SEQ_2_SEQ_LM
    metric = ""  # key of EvalResult.metrics that picks the best checkpoint
    greater_is_better = True
    default_max_length = 256
    default_lr = 5e-5  # full fine-tuning; LoRA uses default_lora_lr
    default_lora_lr = 5e-4
    default_batch_size = 16

    def __init__(self, cfg):
        self.cfg = cfg  # the FinetuneConfig (field options, max_length, beams, ...)
        self.max_length = cfg.max_length or self.default_max_length
        self.pad_multiple = 1  # see use_device

    def use_device(self, device) -> None:
        """Shape batches for `device`: padded lengths rounded up to a multiple of 8 on CUDA, where that feeds
        the tensor cores; on a CPU rounding is only wasted tokens (+14 % on short sentences, measured)."""
        self.pad_multiple = 8 if torch.device(device).type == "cuda" else 1

    # ---- data --------------------------------------------------------------------------------------------
    def fields(self) -> dict[str, str | None]:
        """Explicit field names from the config, for lmforge.data.labelled.load_examples."""
        return {}

    def prepare(self, tokenizer, train: Loaded, others: dict[str, Loaded]) -> None:
        """Look at the data once before the model is built (label maps, unseen-label checks, templates)."""
        self.tokenizer = tokenizer

    def load_model(self, path, dtype=None):
        """The pretrained model with the task's head (num_labels, id2label, pad id...)."""
        raise NotImplementedError

    def features(self, loaded: Loaded, train: bool) -> list[dict]:
        """Training features (with labels) for train=True; evaluation may use its own inside `evaluate`."""
        raise NotImplementedError

    def collate(self, feats: list[dict]) -> dict[str, torch.Tensor]:
        """Pad to the longest in the batch (dynamic padding); labels padded with -100."""
        raise NotImplementedError

    # ---- training ----------------------------------------------------------------------------------------
    def loss(self, model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean training loss of one collated batch (the model's own loss unless a task knows better)."""
        return model(**batch).loss

    def loss_items(self, batch: dict[str, torch.Tensor]) -> int:
        """What loss() averages over in `batch`: its examples here, labelled tokens where a task scores tokens.
        An optimizer step weights each micro-batch (and process) by it, as one big batch would."""
        return int(batch["input_ids"].shape[0])

    # ---- scoring -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, loaded: Loaded, autocast_ctx, device, batch_size: int) -> EvalResult:
        """Score `model` on `loaded` (model is in eval mode; call autocast_ctx() around forwards)."""
        raise NotImplementedError

    def attach(self, path, tokenizer, extras: dict):
        """For evaluate/predict on a fine-tuned folder: set up from the saved model, not training data.
        `extras` is the folder's lmforge_config.yaml ({} for a plain HF folder). Returns the model."""
        self.tokenizer = tokenizer
        return self.load_model(path)

    def config_extras(self) -> dict:
        """Extra keys recorded in DIR/final/lmforge_config.yaml (e.g. the prompt template)."""
        return {}


def load_pretrained(auto_cls, path, no_head: str = "", **kw):
    """`auto_cls.from_pretrained(path)` from safetensors only (unpickling a pytorch_model.bin could run code),
    with a folder that does not load (an unknown model_type, truncated weights, a config the weights do not
    fit) named in one line rather than shown as a traceback. `no_head`: what to say for an architecture
    transformers has no such head for."""
    try:
        return auto_cls.from_pretrained(str(path), use_safetensors=True, **kw)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        if isinstance(e, ValueError) and "Unrecognized configuration class" in msg:
            raise LmforgeError(f"{path}: this architecture has no {auto_cls.__name__} head in transformers"
                               + (f"; {no_head}" if no_head else "")) from None
        if isinstance(e, OSError) and ("safetensors" in msg.lower() or "no file named" in msg.lower()):
            msg += " (lmforge loads *.safetensors weights only, never pickles: convert the folder with " \
                   "transformers' save_pretrained(..., safe_serialization=True))"
        raise LmforgeError(f"{path}: cannot load as {auto_cls.__name__} ({type(e).__name__}: {msg})") from None


def dtype_kw(dtype) -> dict:
    """from_pretrained's dtype argument under its name in the installed transformers (`torch_dtype` before 5).
    Training loads in float32 whatever the checkpoint stores (fp16 for OPT or Llama-2): AdamW wants float32
    master weights, and fp16 loss scaling refuses fp16 gradients."""
    import transformers

    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


def pad_batch(feats: list[dict], keys_pad: dict[str, int], multiple: int = 1) -> dict[str, torch.Tensor]:
    """Right-pad each listed key to the batch's longest (rounded up to `multiple`) -> (B, T) LongTensors."""
    longest = max(len(f["input_ids"]) for f in feats)
    T = -(-longest // multiple) * multiple
    out = {}
    for key, pad in keys_pad.items():
        if key not in feats[0]:
            continue
        rows = [list(f[key]) + [pad] * (T - len(f[key])) for f in feats]
        out[key] = torch.tensor(rows, dtype=torch.long)
    return out
