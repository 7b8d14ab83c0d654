"""Stage 2: fine-tune a pretrained model on labelled data for a task, fully or with LoRA.

    lmforge finetune --task classify --model minilm-l6 --train rotten_tomatoes --out runs/rt
    lmforge finetune --task qa --model minilm-l6 --train lmforge_qa --out runs/qa
    lmforge finetune --task sft --model smollm2-135m --train lmforge_chat --out runs/chat --lora
    lmforge finetune --task translate --model smollm2-135m --train bible_en_es --out runs/en-es --lora

Without --validation a seeded slice of train is held out (built-in sets use their own validation split).
DIR/final is a Hugging Face folder (LoRA merged unless --save-adapter), DIR/metrics.json holds validation
and test metrics, DIR/predictions.jsonl the test (or validation) predictions.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import types
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from lmforge import config as C
from lmforge.config import opt
from lmforge.errors import LmforgeError, closest

TASK_NAMES = ["classify", "qa", "sft", "translate"]


# Options whose default means "work it out"; the worked-out value is saved in config.yaml (see C.resume_base).
RESOLVED = ("lr", "batch_size", "max_steps")


@dataclass
class FinetuneConfig:
    task: str = opt("", "what to fine-tune for", choices=TASK_NAMES)
    model: str = opt("", "pretrained model: folder, lmforge output folder, alias (minilm-l6, smollm2-135m) or hub id")
    train: str = opt("", "training data: .jsonl/.json/.csv/.tsv/.parquet, a datasets save_to_disk folder, a hub "
                         "data set (owner/name[/config]), or built-in (rotten_tomatoes, chinese_reviews, "
                         "bible_en_es, lmforge_qa, lmforge_chat)")
    validation: str | None = opt(None, "validation data (default: the built-in set's or DatasetDict's, or a "
                                       "held-out slice of train)")
    test: str | None = opt(None, "test data (default: the built-in set's or DatasetDict's test split)")
    out: str = opt("", "output folder")
    # ---- how long and how fast
    epochs: float = opt(0.0, "passes over the training data (0: the task's default)", ge=0, lt=1e6)
    max_steps: int = opt(0, "stop after this many optimizer steps (overrides --epochs)", ge=0)
    max_minutes: float = opt(0.0, "train for about this long (the schedule is fitted to the measured speed)", ge=0,
                             lt=1e6)
    batch_size: int = opt(0, "examples per batch (0: the task's default)", ge=0)
    eval_batch_size: int = opt(64, "examples per evaluation batch", ge=1)
    grad_accum: int = opt(1, "batches per optimizer step", ge=1)
    lr: float = opt(0.0, "peak learning rate (0: the task's default, higher with --lora)", ge=0)
    weight_decay: float = opt(0.01, "AdamW weight decay on weight matrices", ge=0)
    warmup_ratio: float = opt(0.06, "fraction of steps spent warming up the LR", ge=0, le=1)
    grad_clip: float = opt(1.0, "clip the gradient norm (0: off)", ge=0)
    max_length: int = opt(0, "truncate inputs to this many tokens (0: the task's default)", ge=0)
    precision: str = opt("auto", "numeric precision (auto: bf16 where supported and faster)",
                         choices=["auto", "bf16", "fp16", "fp32"])
    eval_precision: str = opt("fp32", "precision of validation and test evaluation: fp32 scores the model as "
                                      "`lmforge evaluate` and plain transformers run DIR/final; 'train' reuses "
                                      "--precision (faster, for evaluations that generate)",
                              choices=["fp32", "train"])
    device: str = opt("auto", "cpu, cuda, mps or auto")
    fsdp: bool = opt(False, "under torchrun, shard parameters, gradients and optimizer state over the processes "
                            "(FSDP) instead of replicating them (DDP): for models too big to hold once per GPU")
    attention: str = opt("auto", "attention kernel (auto: eager for bf16 on a CPU up to 1024 tokens, where "
                                 "it trains up to 1.2x faster than SDPA; the model's default elsewhere)",
                         choices=["auto", "eager", "sdpa"])
    gradient_checkpointing: bool = opt(False, "recompute activations in backward: less memory, ~30% slower")
    group_by_length: bool = opt(True, "batch examples of similar length (much less padding)")
    evals_per_epoch: int = opt(1, "evaluations on the validation set per epoch", ge=1)
    keep_checkpoints: int = opt(1, "how many recent checkpoints to keep, besides the best one", ge=1)
    max_train_examples: int = opt(0, "use at most this many training examples (0: all)", ge=0)
    max_eval_examples: int = opt(0, "score at most this many validation/test examples (0: all)", ge=0)
    seed: int = opt(42, "random seed", ge=0, lt=2 ** 32)
    resume: bool = opt(False, "continue from the latest checkpoint in --out (its saved config is reused)")
    stop_after_steps: int = opt(0, "stop (with a checkpoint) after this many steps of this invocation", ge=0)
    progress: bool = opt(True, "show a progress bar")
    skip_bad_rows: bool = opt(False, "skip malformed rows (and report them) instead of stopping")
    # ---- LoRA
    lora: bool = opt(False, "train low-rank adapters (PEFT LoRA) instead of all weights")
    lora_r: int = opt(16, "LoRA rank", ge=1)
    lora_alpha: int = opt(32, "LoRA scaling alpha", gt=0)
    lora_dropout: float = opt(0.05, "dropout on the LoRA path", ge=0, lt=1)
    lora_targets: list[str] = opt([], "module names to adapt (default: per architecture, attention + MLP)")
    save_adapter: bool = opt(False, "save the PEFT adapter in DIR/final instead of merging it into the weights")
    # ---- field names (guessed from common names when not given)
    text_field: str | None = opt(None, "classify: the text field")
    text_pair_field: str | None = opt(None, "classify: the second text of a pair")
    label_field: str | None = opt(None, "classify: the label field (strings, ints, or floats for regression)")
    question_field: str | None = opt(None, "qa: the question field")
    context_field: str | None = opt(None, "qa: the context field")
    answers_field: str | None = opt(None, "qa: the answers field (SQuAD format)")
    answer_start_field: str | None = opt(None, "qa: the answer_start field when answers are plain strings")
    id_field: str | None = opt(None, "qa: the example id field")
    prompt_field: str | None = opt(None, "sft: the prompt (or instruction) field")
    response_field: str | None = opt(None, "sft: the response (or output) field")
    messages_field: str | None = opt(None, "sft: the chat messages field")
    input_field: str | None = opt(None, "sft: the Alpaca-style input field appended to the instruction")
    source_field: str | None = opt(None, "translate: the source-language field (e.g. en)")
    target_field: str | None = opt(None, "translate: the target-language field (e.g. es)")
    source_lang: str | None = opt(None, "translate: the source language when the fields don't say it, or a "
                                        "multilingual model's code for it (NLLB eng_Latn, mBART-50 en_XX, M2M100 en)")
    target_lang: str | None = opt(None, "translate: the target language, as --source-lang (e.g. spa_Latn)")
    # ---- task details
    doc_stride: int = opt(128, "qa: overlap between windows of a long context (tokens; at most half the room "
                                   "a window leaves for the context)", ge=1)
    max_answer_length: int = opt(30, "qa: longest answer span considered (tokens)", ge=1)
    n_best: int = opt(20, "qa: start/end candidates considered per window", ge=1)
    num_beams: int = opt(1, "translate/sft evaluation: beam search width (1: greedy)", ge=1)
    max_new_tokens: int = opt(128, "translate/sft: tokens generated at most per example", ge=1)
    prompt_template: str | None = opt(None, "translate with a decoder-only model: prompt with {source}, "
                                            "{source_lang}, {target_lang}")
    eval_samples: int = opt(3, "sft: sample generations shown after each evaluation", ge=0)


# Default LoRA targets per architecture: attention and MLP projections (what the LoRA and QLoRA papers adapt).
LORA_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "bert": ["query", "key", "value", "dense"],
    "roberta": ["query", "key", "value", "dense"],
    "distilbert": ["q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"],
    "t5": ["q", "k", "v", "o", "wi", "wo", "wi_0", "wi_1"],
    "marian": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "mbart": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "m2m_100": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],  # NLLB and M2M100
}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int, epoch: int, group: bool) -> list[list[int]]:
    """Batches for one epoch, reproducible from (seed, epoch) so a resumed run sees the same order.

    Grouping: shuffle, cut into mega-batches of 64 batches, sort each by length, slice into batches, then
    shuffle the batch order; padding almost vanishes while every epoch still differs.
    """
    import numpy as np

    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)).tolist()
    if group:
        mega = batch_size * 64
        order = [i for s in range(0, len(order), mega)
                 for i in sorted(order[s:s + mega], key=lambda i: -lengths[i])]
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    if group:
        rng.shuffle(batches)
    return batches


def fit_steps(budget_s: float, wall_s: float, step: int, s_per_step: float, s_per_eval: float | None,
              eval_every: int, cap: int) -> int:
    """The step count that ends a --max-minutes run near `budget_s` seconds of wall time, evaluations included.

    What is left of the budget is shared between the remaining steps and the evaluations they bring (one per
    `eval_every` steps, plus the final one); before any evaluation has been timed, 10 % is kept for them.
    Re-fitted as the run goes, so a machine that slows down (a shared CPU) shortens the run instead of
    overrunning it; never fewer than one more step, never more than `cap`.
    """
    left = budget_s - wall_s
    if s_per_eval is None:
        more = 0.9 * left / s_per_step
    else:
        more = (left - s_per_eval) / (s_per_step + s_per_eval / eval_every)
    return max(step + 1, min(cap, step + int(more)))


def _attention(choice: str, precision: str, device, max_length: int) -> str | None:
    """The attention kernel to train with (None: the model's own default).

    On a CPU in bf16, PyTorch's SDPA kernels are slower to train through than eager attention (matmul + softmax):
    eager trains MiniLM 1.02x faster at 16 tokens up to 1.18x at 512, and SmolLM2-135M 1.12-1.20x (dropout on,
    bench/attention.py). In fp32 the two are level; on GPUs SDPA's fused kernels win.
    """
    if choice != "auto":
        return choice
    return "eager" if device.type == "cpu" and precision == "bf16" and max_length <= 1024 else None


@contextlib.contextmanager
def _own_kernel(model, kernel: str | None):
    """Evaluate with the attention kernel the saved model will load with, not the one chosen for training speed.

    Eager attention under bf16 autocast rounds the attention scores to bf16 before the softmax; SDPA keeps them
    in fp32. The rounding is harmless to training but flips borderline predictions, so metrics.json disagreed
    with `lmforge evaluate` and plain transformers on DIR/final (MiniLM, rotten_tomatoes test: 83.40 % against
    83.49 %, one sentence in 1,066).
    """
    training_kernel = getattr(model.config, "_attn_implementation", None)
    if kernel is None or kernel == training_kernel:
        yield
        return
    model.set_attn_implementation(kernel)
    try:
        yield
    finally:
        model.set_attn_implementation(training_kernel)


# learned positions that start after the padding index: RoBERTa's 514 positions hold 512 tokens
_POSITION_OFFSET = {"roberta": 2, "xlm-roberta": 2, "camembert": 2, "longformer": 2, "data2vec-text": 2}


def model_context(path) -> int | None:
    """How many tokens the model in folder `path` reads (max_position_embeddings; GPT-2's n_positions), or
    None where its config does not say (T5's relative positions, a hub id not downloaded)."""
    f = Path(str(path)) / "config.json"
    try:
        config = json.loads(f.read_text())
    except (OSError, ValueError):
        return None
    n = config.get("max_position_embeddings")
    if n is None and config.get("model_type") == "gpt2":
        n = config.get("n_positions")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        return None
    return n - _POSITION_OFFSET.get(config.get("model_type"), 0)


def fit_max_length(cfg: FinetuneConfig, task, path) -> int:
    """--max-length, or the task's default cut to the model's context window (a 128-token model trained on
    512-token chats would be trained on prompts that generate, chat and serve then refuse or cut)."""
    context = model_context(path)
    if cfg.max_length:
        if context is not None and cfg.max_length > context:
            raise LmforgeError(f"--max-length {cfg.max_length}: the model reads at most {context} tokens "
                               f"(max_position_embeddings in {Path(str(path)) / 'config.json'})")
        return cfg.max_length
    if context is not None and context < task.default_max_length:
        print(f"max length {context} tokens: the model's context window (the {cfg.task} default is "
              f"{task.default_max_length})", flush=True)
        return context
    return task.default_max_length


def _load_data(cfg: FinetuneConfig, task):
    """(train, {"validation": ..., "test": ...}) as Loaded sets, holding out a slice when needed."""
    from lmforge.data.labelled import Loaded, build_label_map, data_splits, holdout, load_examples, skipped_report

    def load(spec, split, prefer=None):
        data = load_examples(spec, cfg.task, task.fields(), split=split, skip_bad_rows=cfg.skip_bad_rows,
                             prefer=prefer)
        if data.skipped:
            print(skipped_report(data.source, data.skipped), flush=True)
        if not data.rows:
            raise LmforgeError(f"{data.source}: no usable examples")
        return data

    def subset(data: Loaded, idx: list[int], name: str) -> Loaded:
        return Loaded([data.rows[i] for i in idx], name, [data.line_numbers[i] for i in idx], [], data.fields,
                      data.by_row)

    train = load(cfg.train, "train")
    # the other splits read the columns training read where they have them: a validation file that happens to
    # list es before en must still be scored en -> es
    prefer = train.fields
    splits = data_splits(cfg.train)  # a built-in set's, or a datasets DatasetDict's own validation and test
    others = {}
    if cfg.validation:
        others["validation"] = load(cfg.validation, "validation", prefer)
    elif "validation" in splits:
        others["validation"] = load(splits["validation"], "validation", prefer)
    else:
        labels = [r.get("label") for r in train.rows] if cfg.task == "classify" else None
        if labels and build_label_map(labels)[1]:
            labels = None  # regression: scores, not classes
        tr, va = holdout(train.rows, train.line_numbers, fraction=0.1, seed=cfg.seed,
                         labels=[str(x) for x in labels] if labels else None)
        others["validation"] = subset(train, va, f"{train.source} (held-out slice)")
        train = subset(train, tr, train.source)
        print(f"no --validation: holding out {len(va)} of {len(tr) + len(va)} training examples", flush=True)
    if cfg.test:
        others["test"] = load(cfg.test, "test", prefer)
    elif "test" in splits:
        others["test"] = load(splits["test"], "test", prefer)
    if cfg.max_train_examples and len(train) > cfg.max_train_examples:
        import numpy as np
        idx = sorted(np.random.default_rng(cfg.seed).choice(len(train), cfg.max_train_examples, replace=False))
        train = subset(train, idx, train.source)
    if cfg.max_eval_examples:
        others = {k: subset(v, list(range(min(len(v), cfg.max_eval_examples))), v.source) for k, v in others.items()}
    return train, others


def _wrap_lora(cfg: FinetuneConfig, model, task):
    from peft import LoraConfig, TaskType, get_peft_model

    mtype = getattr(model.config, "model_type", "")
    targets = cfg.lora_targets or LORA_TARGETS.get(mtype)
    if not targets:
        raise LmforgeError(f"no default LoRA targets for model type '{mtype}'; name them with --lora-targets "
                           f"(module names such as q_proj v_proj)")
    names = [n for n, _ in model.named_modules()]

    def present(t: str) -> bool:  # PEFT's own rule: a module's last name, or a dotted suffix of its full name
        return any(n == t or n.endswith("." + t) for n in names)
    if cfg.lora_targets:  # named by the user: a typo must not quietly train fewer layers
        missing = [t for t in targets if not present(t)]
        if missing:
            last = sorted({n.rsplit(".", 1)[-1] for n in names if n})
            raise LmforgeError(f"--lora-targets: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not a "
                               f"module of this {mtype} model{closest(missing[0], last)}")
    targets = [t for t in targets if present(t)]  # the defaults cover variants (T5's wi, or wi_0 and wi_1)
    if not targets:
        raise LmforgeError(f"--lora-targets: none of {LORA_TARGETS.get(mtype)} are modules of this {mtype} model")
    tied = [t for t in targets if t in ("lm_head", "embed_tokens", "wte")]
    if tied and getattr(model.config, "tie_word_embeddings", False):
        # merged, an adapted lm_head moves the input embeddings too (they are one matrix), so DIR/final would
        # not be the model that was trained; PEFT's ensure_weight_tying cannot be deep-copied for merging
        raise LmforgeError(f"--lora-targets {' '.join(tied)}: this model ties its input and output embeddings, "
                           f"which a merged adapter would change together; adapt the other modules")
    lcfg = LoraConfig(task_type=getattr(TaskType, task.peft_task_type), r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout, target_modules=targets)
    import warnings
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing: not the user's
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        peft_model = get_peft_model(model, lcfg)
    if task.peft_task_type == "QUESTION_ANS":
        # PEFT's QA wrapper drops token_type_ids (peft 0.21): BERT would train and be scored with every
        # segment id 0, while DIR/final, merged or as an adapter, reads them. Its LoRA layers sit in the base
        # model, so calling that is the same model with every input passed on.
        peft_model.forward = types.MethodType(lambda self, *a, **kw: self.base_model(*a, **kw), peft_model)
    return peft_model


def _trainable_state(model) -> dict:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def _save_model(model, tokenizer, folder: Path, merge: bool, extras: dict) -> None:
    """HF folder: full weights (LoRA merged into a copy) or the PEFT adapter; tokenizer; lmforge config."""
    import copy

    is_peft = hasattr(model, "peft_config")
    if is_peft and merge:
        merged = copy.deepcopy(model).merge_and_unload()
        merged.save_pretrained(folder, safe_serialization=True)
    else:
        model.save_pretrained(folder, safe_serialization=True)
        if is_peft:  # what adapter_config.json lacks to rebuild the model: its head (num_labels, id2label...)
            from lmforge.model.hub import ADAPTER_MODEL_CONFIG

            inner = model.get_base_model()
            (folder / ADAPTER_MODEL_CONFIG).write_text(inner.config.to_json_string(), encoding="utf-8")
            if getattr(inner, "generation_config", None) is not None and inner.can_generate():
                inner.generation_config.save_pretrained(folder)  # the end-of-turn ids sft set
    tokenizer.save_pretrained(folder)
    (folder / "lmforge_config.yaml").write_text(yaml.safe_dump(extras, sort_keys=False, allow_unicode=True),
                                                encoding="utf-8")


def _load_weights(model, folder: Path, sharded: bool = False) -> None:
    """Put a checkpoint's trained weights into `model` (same architecture, LoRA or not; sharded: every rank
    reads the file and keeps its own shards)."""
    from safetensors.torch import load_file

    state = load_file(str(folder / "lmforge_state" / "trainable.safetensors"))
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise LmforgeError(f"{folder}: checkpoint does not fit this model (e.g. {missing[0]}); was it made with "
                           f"another --model or --lora setting?")
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
        return
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)


def run(cfg: FinetuneConfig) -> dict:
    import math
    import time

    from tqdm import tqdm

    from lmforge.model.hub import resolve_model
    from lmforge.tasks import get_task
    from lmforge.tokenizer.bpe import load_tokenizer
    from lmforge.train import checkpoint as ckpt
    from lmforge.train.common import (MetricsLog, StopOnSignal, autocast, build_optimizer, format_duration,
                                      full_state, grad_scaler, load_optimizer_state, resolve_precision,
                                      setup_runtime, shard_model, write_atomic)

    for name in ("task", "model", "train", "out"):
        if not getattr(cfg, name):
            raise LmforgeError(f"--{name} is required (see 'lmforge finetune --help')")
    out = Path(cfg.out)
    rt = setup_runtime(cfg.device)
    precision = resolve_precision(cfg.precision, rt.device)
    torch.manual_seed(cfg.seed)
    ckpt.prepare_run_dir(out, "finetune", cfg.resume, rt)
    if cfg.resume and (out / "final").is_dir() and (out / "metrics.json").exists():
        # written last: the run is done, and resuming would only evaluate (for sft and translate, generate) again
        print(f"{out} is a finished run (its model is {out / 'final'}): nothing to resume. To train further, "
              f"start a new run with --model {out / 'final'}", flush=True)
        return {"finished": str(out / "final")}
    resume_from = ckpt.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ckpt.nothing_to_resume(out, "finetune")

    # ---- model, tokenizer and data ----------------------------------------------------------------------------
    task = get_task(cfg.task)(cfg)
    task.use_device(rt.device)
    with rt.main_first():  # a packaged model is converted once, by rank 0
        path = resolve_model(cfg.model)
    task.max_length = fit_max_length(cfg, task, path)
    tokenizer = load_tokenizer(path)
    train, others = _load_data(cfg, task)
    task.prepare(tokenizer, train, others)
    model = task.load_model(path)
    own_kernel = getattr(model.config, "_attn_implementation", None)
    hf_model = model  # the transformers model under any LoRA wrapper: evaluation switches its kernel back
    attention = _attention(cfg.attention, precision, rt.device, task.max_length)
    if attention and getattr(model.config, "_attn_implementation", None) != attention:
        try:
            model.set_attn_implementation(attention)
        except (ValueError, ImportError) as e:  # an architecture without that kernel keeps its own
            if cfg.attention != "auto":
                raise LmforgeError(f"--attention {cfg.attention}: {e}") from None
    kernel = getattr(model.config, "_attn_implementation", None) or "default"
    if cfg.lora:
        model = _wrap_lora(cfg, model, task)
    if cfg.gradient_checkpointing:
        # transformers 5.x renamed it (the old name is deprecated); older 5.x releases only have the old one
        (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
        if cfg.lora:
            model.enable_input_require_grads()
    model.to(rt.device)
    sharded = cfg.fsdp and rt.distributed
    if cfg.fsdp and not rt.distributed:
        print("--fsdp: one process has nothing to shard with; training unsharded (start it with torchrun)", flush=True)
    if resume_from is not None:
        ckpt.load_checked(resume_from, lambda f: _load_weights(model, f))  # before sharding: whole tensors
    if sharded:
        # The transformers model is the root even under LoRA: generate() runs its forward, not PEFT's wrapper's.
        shard_model(hf_model)
    train_model = model
    if rt.distributed and not sharded:  # gradients averaged across processes; the wrapped module stays `model`
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    n_total = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    feats = task.features(train, train=True)
    if not feats:
        raise LmforgeError(f"{train.source}: no training examples left after tokenization")
    for loaded in others.values():
        # Evaluation builds its features when it runs; a split that cannot be (nothing within --max-length) must
        # fail now, before anything is written to --out, not after training.
        task.features(loaded, train=False)
    lengths = [len(f["input_ids"]) for f in feats]
    # what a checkpoint's data position refers to: the feature count and lengths (cheap to hash, and changed by
    # nearly any edit of the data) of the training set it was made on
    train_data = {"features": len(feats),
                  "lengths_sha1": hashlib.sha1(",".join(map(str, lengths)).encode()).hexdigest()[:16]}
    batch_size = cfg.batch_size or task.default_batch_size
    # An optimizer step takes world_size x grad_accum batches of the epoch's seeded order (under torchrun each
    # rank every world_size-th one); the epoch's last step may take fewer (see the loop), none is dropped.
    n_batches = math.ceil(len(feats) / batch_size)
    if n_batches < rt.world_size:
        raise LmforgeError(f"{len(feats)} training examples make fewer batches than processes ({rt.world_size})")
    per_step = rt.world_size * cfg.grad_accum
    steps_per_epoch = math.ceil(n_batches / per_step)
    epochs = cfg.epochs or 3.0
    max_steps = cfg.max_steps or max(1, round(epochs * steps_per_epoch))
    lr = cfg.lr or (task.default_lora_lr if cfg.lora else task.default_lr)
    optimizer = build_optimizer(model, lr, cfg.weight_decay, betas=(0.9, 0.999), device=rt.device)
    # The schedule reads `plan` so --max-minutes can shorten the run once the speed is known.
    plan = {"max_steps": max_steps}

    def lr_lambda(step: int) -> float:
        total = plan["max_steps"]
        warm = max(1, int(cfg.warmup_ratio * total))
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    resolved = dict(C.to_dict(cfg), lr=lr, batch_size=batch_size, max_steps=max_steps, precision=precision,
                    max_length=task.max_length, attention=kernel if kernel in ("eager", "sdpa") else cfg.attention)
    extras = {"task": cfg.task, "base_model": str(path), "lora": cfg.lora, **task.config_extras(),
              # the fields read from the training data, guessed or named: predict --input looks for them first;
              # a translator's languages too, so evaluate refuses a file in another one as validation does
              "data_fields": {k: v for k, v in train.fields.items()
                              if k in task.fields() or k in ("source_lang", "target_lang")},
              "finetune": resolved}
    config_yaml = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
    log = MetricsLog(out, enabled=rt.is_main)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / "config.yaml", config_yaml)

    step, best = 0, {"value": None, "step": None, "checkpoint": None}
    zero_shot = None  # the validation metrics before training (sft, translate)
    before = {"train_seconds": 0.0, "samples": 0}  # training time and samples of the invocations before a resume
    window = [0.0, 0]  # training loss summed since the last log line, and its step count
    scaler = grad_scaler(precision, rt.device)
    history: list[dict] = []
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        world = state.get("world_size", rt.world_size)
        if world != rt.world_size:  # a step is world x batch examples, and each rank has its slice of every epoch
            again = "lmforge" if world == 1 else f"torchrun --nproc-per-node {world} -m lmforge"
            raise LmforgeError(f"--resume: {resume_from} was trained by {world} process(es); it continues exactly "
                               f"only with as many (this is {rt.world_size}): {again} finetune --out {out} --resume")
        was = state.get("train_data")
        if was is not None and was != train_data:
            # its epoch/batch position indexes another data set's order: continuing would repeat or skip examples
            raise LmforgeError(f"--resume: the training data ({train.source}: {len(feats):,} features) is not what "
                               f"{resume_from} was trained on ({was['features']:,} features"
                               f"{', other lengths' if was['features'] == len(feats) else ''}); a run resumes only "
                               f"on its own data. To go on training on this data, start a new run from that "
                               f"checkpoint: lmforge finetune --model {resume_from} --out NEW_DIR ...")
        load_optimizer_state(model, optimizer, state["optimizer"], sharded)
        plan["max_steps"] = state["max_steps"]
        scheduler.load_state_dict(state["scheduler"])
        scaler = grad_scaler(precision, rt.device, state.get("grad_scaler"))
        ckpt.set_rng_state(state["rng"], rt.rank)
        step, best, history = state["step"], state["best"], state["history"]
        window = list(state["loss_window"])
        zero_shot = state.get("zero_shot")
        before = state.get("progress", before)
        log.truncate_after(step)
        print(f"resuming from {resume_from} at step {step}", flush=True)
    elif log.path.exists():
        log.path.unlink()

    # bf16 autocast rounds every matmul input, which flips borderline predictions: scored that way, metrics.json
    # (and the best checkpoint picked by it) would describe a model DIR/final is not once loaded in fp32, as
    # `lmforge evaluate` and plain transformers load it (MiniLM, rotten_tomatoes validation: 81.43 % fp32 against
    # 81.52 % under bf16 autocast, one sentence in 1,066).
    eval_precision = precision if cfg.eval_precision == "train" else "fp32"
    # a packaged model's folder is called model, an lmforge output's final: neither says which model it is
    shown = path if path.name == "model" else f"{path.parent.name}/{path.name}" if path.name == "final" else path.name
    print(f"task {cfg.task} | model {shown} | "
          f"{n_total / 1e6:.2f}M parameters, {n_train / 1e6:.2f}M trained{' (LoRA)' if cfg.lora else ''} | "
          f"{len(feats):,} training features, batch {batch_size}x{cfg.grad_accum} | {plan['max_steps']} steps | "
          f"lr {lr:g} | precision {precision}" + (f" ({eval_precision} to evaluate)" if eval_precision != precision
                                                  else "") + f", {kernel} attention | device {rt.device}"
          + (f" | world {rt.world_size}{' (FSDP)' if sharded else ''}" if rt.distributed else ""), flush=True)
    print("data: " + ", ".join(f"{k} {len(v):,} ({v.source})" for k, v in {"train": train, **others}.items()),
          flush=True)

    def amp():
        return autocast(precision, rt.device)

    def evaluate(split: str):
        model.eval()
        with _own_kernel(hf_model, own_kernel):
            res = task.evaluate(model, others[split], lambda: autocast(eval_precision, rt.device), rt.device,
                                cfg.eval_batch_size)
        model.train()
        return res

    def short(metrics: dict) -> str:
        keys = [k for k in ("accuracy", "macro_f1", "pearson", "spearman", "mse", "exact_match", "f1", "bleu",
                            "chrf", "loss", "perplexity") if k in metrics]
        return " | ".join(f"{k} {metrics[k]:.4f}" for k in keys)

    whole = {}  # sharded: rank 0's unsharded CPU copy of the model, which checkpoints and DIR/final are written from

    def unsharded(model_state: dict | None = None):
        """`model` itself, or (sharded) the copy on rank 0 with every rank's shards gathered into it (or with
        `model_state`, gathered already). Every rank must call it; other ranks get None."""
        if not sharded:
            return model
        if model_state is None:
            model_state = full_state(model)[0]
        if not rt.is_main:
            return None
        if "model" not in whole:
            with torch.random.fork_rng(devices=[]):  # a new head's random init must not move training's RNG
                copy = task.load_model(path)
                whole["model"] = _wrap_lora(cfg, copy, task) if cfg.lora else copy
        whole["model"].load_state_dict(model_state)
        return whole["model"]

    last_save: list = [None, None]  # (step, folder) of the latest checkpoint written

    def save(step: int) -> Path | None:
        """A checkpoint (rank 0 writes; sharded, every rank must call it)."""
        rngs = rt.all_ranks(ckpt.rng_state())  # each rank's own dropout stream resumes where it was
        model_state, optim_state = full_state(model, optimizer) if sharded else (None, None)
        source = unsharded(model_state)
        last_save[:] = [step, None]  # on every rank, so that all of them skip (or take part in) a second save
        if not rt.is_main:
            return None
        state = {"optimizer": optim_state if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rngs, "step": step, "max_steps": plan["max_steps"], "world_size": rt.world_size,
                 "train_data": train_data,
                 "best": best, "history": history, "grad_scaler": scaler.state_dict(),
                 "loss_window": list(window), "zero_shot": zero_shot,
                 "progress": {"train_seconds": before["train_seconds"] + elapsed, "samples": before["samples"] + seen},
                 "data_position": {"epoch": step // steps_per_epoch,
                                   "batch": step % steps_per_epoch * cfg.grad_accum, "seed": cfg.seed}}
        from safetensors.torch import save_file

        def write(folder: Path):
            _save_model(source, tokenizer, folder, merge=False, extras=extras)
            (folder / "lmforge_state").mkdir(exist_ok=True)
            save_file({n: t.contiguous().cpu() for n, t in _trainable_state(source).items()},
                      str(folder / "lmforge_state" / "trainable.safetensors"))
        protect = (best["checkpoint"],) if best["checkpoint"] else ()
        last_save[1] = ckpt.save_checkpoint(out, step, write, state, config_yaml, keep=cfg.keep_checkpoints,
                                            protect=protect)
        return last_save[1]

    wall0, eval_seconds = time.time(), []  # the --max-minutes budget counts evaluations too, this one included
    # the handler before the zero-shot evaluation, which takes minutes with a real model: a SIGTERM there saves a
    # step-0 checkpoint that --resume continues from, the baseline kept, rather than killing the run unsaved
    stop = StopOnSignal().install()
    try:
        if zero_shot is None and step == 0 and cfg.task in ("translate", "sft"):  # the baseline to beat
            zero_shot = evaluate("validation").metrics
            eval_seconds.append(time.time() - wall0)
            print(f"zero-shot validation: {short(zero_shot)}", flush=True)
            log.log(step=0, **{f"val_{k}": v for k, v in zero_shot.items() if isinstance(v, (int, float))})
    except BaseException:  # a failed evaluation, or a second Ctrl-C: no handler outlives the run
        stop.restore()
        raise

    # ---- the loop ------------------------------------------------------------------------------------------
    eval_every = max(1, steps_per_epoch // max(1, cfg.evals_per_epoch))
    bar = tqdm(total=plan["max_steps"], initial=step, desc=f"finetune {cfg.task}", unit="step",
               dynamic_ncols=True, disable=not (cfg.progress and rt.is_main))
    model.train()
    t0, seen, timed_steps, elapsed, shown = time.time(), 0, 0, 0.0, 0
    cap = plan["max_steps"] if cfg.max_steps or cfg.epochs else 10 ** 9
    refit = cfg.max_minutes > 0 and resume_from is None  # a resumed run keeps the plan it was saved with
    last_eval = None  # (step, EvalResult) of the latest validation pass
    signalled = rt.agree([stop.requested])[0]  # during the zero-shot evaluation: a step-0 checkpoint
    start_step, stopped = step, signalled
    try:
        while not stopped and step < plan["max_steps"]:
            # Epochs count optimizer steps of world_size x grad_accum batches. Where the epoch's last step has
            # fewer, the empty places are filled with batches from its start at weight 0: every rank has to run
            # as many backward passes (DDP reduces in each), and each example counts once per epoch.
            epoch = step // steps_per_epoch
            order = length_grouped_batches(lengths, batch_size, cfg.seed, epoch, cfg.group_by_length)
            weight = [1] * len(order) + [0] * (steps_per_epoch * per_step - len(order))
            order = [order[i % len(order)] for i in range(len(weight))]
            order, weight = order[rt.rank::rt.world_size], weight[rt.rank::rt.world_size]
            first = step % steps_per_epoch * cfg.grad_accum
            for b0 in range(first, steps_per_epoch * cfg.grad_accum, cfg.grad_accum):
                loss_sum = 0.0
                idxs, ws = order[b0:b0 + cfg.grad_accum], weight[b0:b0 + cfg.grad_accum]
                micro = [task.collate([feats[i] for i in idx]) for idx in idxs]
                items = [task.loss_items(b) * w for b, w in zip(micro, ws)]
                examples = sum(len(idx) * w for idx, w in zip(idxs, ws))
                # The step's loss is the mean over all its examples (sft, translate: labelled tokens) on every
                # rank, as one big batch's would be; a mean of per-batch means would weight a token of a short
                # reply above one of a long reply. DDP averages the ranks' gradients: hence x world_size.
                total, examples = rt.agree([sum(items), examples], "sum")
                for batch, n in zip(micro, items):
                    batch = {k: v.to(rt.device) for k, v in batch.items()}
                    with amp():
                        loss = task.loss(train_model, batch) * (n / max(total, 1))
                    scaler.scale(loss * rt.world_size).backward()
                    loss_sum += loss.item()
                seen += int(examples)
                scaler.unscale_(optimizer)  # clip the true gradients
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], cfg.grad_clip)
                scaler.step(optimizer)  # skipped where fp16 overflowed, and the scale backs off
                scaler.update()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                timed_steps += 1
                if not rt.agree([math.isfinite(loss_sum)], "min")[0]:  # on any rank: all of them stop
                    raise LmforgeError(f"the loss became infinite or NaN at step {step}: lower --lr or use "
                                       f"--precision fp32")
                window[0] += loss_sum
                window[1] += 1
                elapsed = time.time() - t0
                if refit and timed_steps == 3:
                    t_warm = elapsed  # the first steps pay for allocator and kernel warm-up: not the pace
                if refit and timed_steps >= 5 and timed_steps % 10 == 5:
                    # Fit the schedule to the time budget at the pace measured so far (from two steps after the
                    # warm-up on: a short budget must not wait for more), and again every 10 steps (the LR
                    # schedule follows); every rank takes the smallest fit so they stop together.
                    fit = int(rt.agree([fit_steps(cfg.max_minutes * 60, time.time() - wall0, step,
                                                  (elapsed - t_warm) / (timed_steps - 3),
                                                  sum(eval_seconds) / len(eval_seconds) if eval_seconds else None,
                                                  eval_every, cap)], "min")[0])
                    if timed_steps == 5 or abs(fit - plan["max_steps"]) > max(2, 0.02 * plan["max_steps"]):
                        plan["max_steps"] = bar.total = fit
                        if timed_steps == 5 or abs(fit - shown) > 0.1 * shown:  # say so when it matters
                            how = "about" if timed_steps == 5 else "the pace changed: now"
                            print(f"\n--max-minutes {cfg.max_minutes:g}: {how} {fit} steps "
                                  f"({fit / steps_per_epoch:.2f} epochs)", flush=True)
                            shown = fit
                bar.update(1)
                if step % 10 == 0 or step == plan["max_steps"]:
                    mean_loss = rt.agree([window[0]], "sum")[0] / window[1]  # each rank holds its share
                    bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{seen / elapsed:.1f}")
                    log.log(step=step, epoch=round(step / steps_per_epoch, 3), loss=mean_loss,
                            lr=scheduler.get_last_lr()[0], samples_per_s=seen / elapsed)
                    window = [0.0, 0]
                if step % eval_every == 0 or step == plan["max_steps"]:
                    bar.clear()
                    t_eval = time.time()
                    res = evaluate("validation")
                    last_eval = (step, res)
                    value = res.metrics.get(task.metric)
                    if value is not None and not math.isfinite(value):
                        value = None  # undefined (Pearson on a constant set): every comparison with NaN is False
                    # a tie goes to the later, longer-trained checkpoint: with BLEU 0 at every evaluation
                    # (short references, no 4-gram yet) the untrained first one was kept as DIR/final
                    improved = value is not None and (best["value"] is None or (
                        value >= best["value"] if task.greater_is_better else value <= best["value"]))
                    row = {"step": step, "epoch": round(step / steps_per_epoch, 3),
                           **{f"val_{k}": v for k, v in res.metrics.items() if isinstance(v, (int, float))}}
                    history.append(row)
                    log.log(**row)
                    print(f"step {step} (epoch {row['epoch']:.2f}): validation {short(res.metrics)}"
                          + (" (best)" if improved else ""), flush=True)
                    for p in res.predictions[:cfg.eval_samples] if cfg.task == "sft" else []:
                        print(f"  sample: {str(p.get('generated', ''))[:200]!r}", flush=True)
                    if improved:
                        best.update(value=value, step=step, checkpoint=f"step-{step:06d}")
                    save(step)
                    eval_seconds.append(time.time() - t_eval)
                    t0 += eval_seconds[-1]  # evaluation time is not training throughput
                signalled = rt.agree([stop.requested])[0]  # Ctrl-C/SIGTERM on any rank stops them all at this step
                if step < plan["max_steps"] and (signalled or (cfg.stop_after_steps
                                                               and step - start_step >= cfg.stop_after_steps)):
                    stopped = True
                    break
                if step >= plan["max_steps"]:
                    break
            if stopped:
                break
    finally:
        bar.close()
        stop.restore()
    if stopped:
        # a stop right after an evaluation has its checkpoint already (see pretrain: no second write)
        path = last_save[1] if last_save[0] == step else save(step)
        print(f"stopped at step {step}; checkpoint {path}. "
              f"Continue with: {rt.command('finetune')} --out {out} --resume",
              flush=True)
        return {"stopped_at": step, "checkpoint": str(path), "exit_code": stop.exit_code() if signalled else 0}
    # over every invocation of a resumed run, as an uninterrupted run would report them
    train_seconds = before["train_seconds"] + time.time() - t0
    seen += before["samples"]

    # ---- best model -> DIR/final, metrics, predictions ---------------------------------------------------------
    if best["checkpoint"] and (out / "checkpoints" / best["checkpoint"]).exists():
        ckpt.load_checked(out / "checkpoints" / best["checkpoint"], lambda f: _load_weights(model, f, sharded))
    model.eval()
    results = {"task": cfg.task, "model": str(path), "lora": cfg.lora, "steps": step,
               "epochs": round(step / steps_per_epoch, 3), "best_step": best["step"],
               "train_samples_per_s": round(seen / max(train_seconds, 1e-9), 2),
               "train_seconds": round(train_seconds, 1), "parameters": n_total, "trained_parameters": n_train}
    if zero_shot is not None:
        results["zero_shot_validation"] = zero_shot
    pred_rows = []
    for split in ("validation", "test"):
        if split in others:
            # The best model is often the last one evaluated: reuse that evaluation (generation is slow).
            reuse = split == "validation" and last_eval is not None and last_eval[0] == best["step"]
            res = last_eval[1] if reuse else evaluate(split)
            results[split] = res.metrics
            pred_rows = res.predictions  # test wins when there is one
            print(f"{split}: {short(res.metrics)}", flush=True)
    source = unsharded()
    if rt.is_main:
        final = out / "final"
        ckpt.write_folder_atomic(final, lambda f: _save_model(source, tokenizer, f, merge=not cfg.save_adapter,
                                                                 extras=extras))
        write_atomic(out / "predictions.jsonl",
                     "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pred_rows))
        results["final_model"] = str(final)
        log.summary(results)
        log.plot()
        print(f"done in {format_duration(train_seconds)}: model {final} "
              f"({'PEFT adapter' if cfg.lora and cfg.save_adapter else task.auto_class}); "
              f"metrics {out / 'metrics.json'}; predictions {out / 'predictions.jsonl'}", flush=True)
    return results


def base_config(args) -> dict:
    """--resume: the run's saved config is the base."""
    return C.resume_base(args, FinetuneConfig, RESOLVED)
