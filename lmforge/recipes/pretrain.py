"""Stage 1: pretrain a Llama-style LM from scratch (or continue an existing one) on unlabelled text.

    lmforge pretrain --data shakespeare --out runs/shakespeare --size small --max-minutes 10

Pipeline: sources -> tokenizer (trained unless given) -> cached token shards -> model -> training loop
-> checkpoints (HF format + lmforge_state/) -> DIR/final.
The batch for step s is drawn from an RNG seeded by (seed, s, micro-step, rank), so the data position is
just the step number: a resumed run sees exactly the batches an uninterrupted run would have seen.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

from lmforge import config as C
from lmforge.config import opt
from lmforge.errors import LmforgeError, closest


# Options whose default means "work it out"; the worked-out value is saved in config.yaml (see C.resume_base).
RESOLVED = ("max_steps", "lr", "warmup_steps", "context", "eval_interval")


@dataclass
class PretrainConfig:
    data: list[str] = opt([], "text files, folders of .txt/.jsonl, or built-in corpora (shakespeare, peoples_daily)")
    out: str = opt("", "output folder (checkpoints, final model, metrics)")
    text_field: str = opt("text", "JSON field holding the text in .jsonl files")
    tokenizer: str | None = opt(None, "reuse this tokenizer folder instead of training one")
    vocab_size: int = opt(8192, "vocabulary size when training a tokenizer", ge=1)
    size: str = opt("small", "model preset", choices=["tiny", "small", "base"])
    n_layer: int = opt(0, "override the preset's layer count", ge=0)
    n_head: int = opt(0, "override the preset's attention heads", ge=0)
    n_embd: int = opt(0, "override the preset's width", ge=0)
    context: int = opt(0, "override the preset's context length (tokens)", ge=0)
    init_from: str | None = opt(None, "continue training this causal LM (folder, hub id, or smollm2-135m)")
    max_steps: int = opt(0, "optimizer steps to train (0: 1000, or as many as --max-minutes allows)", ge=0)
    max_minutes: float = opt(0.0, "train for about this long; sets the step count from measured speed", ge=0,
                             lt=1e6)
    batch_size: int = opt(16, "sequences per micro-batch", ge=1)
    grad_accum: int = opt(1, "micro-batches per optimizer step", ge=1)
    lr: float = opt(0.0, "peak learning rate (0: 2e-3 from scratch, 1e-4 with --init-from)", ge=0)
    min_lr_ratio: float = opt(0.1, "final LR as a fraction of the peak (cosine decay)", ge=0, le=1)
    warmup_steps: int = opt(-1, "linear warmup steps (-1: 5% of the run, at most 200)", ge=-1)
    weight_decay: float = opt(0.1, "AdamW weight decay on weight matrices", ge=0)
    grad_clip: float = opt(1.0, "clip the gradient norm to this (0: off)", ge=0)
    precision: str = opt("auto", "numeric precision (auto: bf16 where the hardware runs it faster)",
                         choices=["auto", "bf16", "fp16", "fp32"])
    device: str = opt("auto", "cpu, cuda, mps or auto")
    fsdp: bool = opt(False, "under torchrun, shard parameters, gradients and optimizer state over the processes "
                            "(FSDP) instead of replicating them (DDP): for models too big to hold once per GPU")
    compile: str = opt("auto", "torch.compile the model: ~15 s up front, ~15% faster steps (auto: on for runs "
                               "of 2+ minutes or 500+ steps when a C compiler is present)", choices=["auto", "on", "off"])
    val_fraction: float = opt(0.05, "fraction of tokens held out for validation (the tail of the corpus)", gt=0, lt=1)
    eval_interval: int = opt(0, "evaluate every N steps (0: 10 times per run, fewer where that would take "
                                "over 8% of a --max-minutes budget)", ge=0)
    eval_tokens: int = opt(65536, "validation tokens scored at each evaluation (0: all)", ge=0)
    sample_tokens: int = opt(48, "tokens of sample text generated at each evaluation (0: none)", ge=0)
    save_interval: int = opt(0, "checkpoint every N steps (0: at each evaluation, or 10 times "
                                "per run where --max-minutes evaluates less often)", ge=0)
    keep_checkpoints: int = opt(2, "how many recent checkpoints to keep", ge=1)
    log_interval: int = opt(10, "log training loss every N steps", ge=1)
    seed: int = opt(1337, "random seed for initialisation and data order", ge=0, lt=2 ** 32)
    resume: bool = opt(False, "continue from the latest checkpoint in --out")
    stop_after_steps: int = opt(0, "stop (with a checkpoint) after this many steps of this invocation", ge=0)
    progress: bool = opt(True, "show a progress bar")


def model_config(cfg: PretrainConfig, vocab_size: int, tokenizer):
    from lmforge.model.llama import PRESETS, ModelConfig

    if cfg.size not in PRESETS:
        raise LmforgeError(f"unknown preset '{cfg.size}'{closest(cfg.size, PRESETS)} (presets: {', '.join(PRESETS)})")
    p = dict(PRESETS[cfg.size])
    for key, field in (("n_layer", "n_layer"), ("n_head", "n_head"), ("n_embd", "n_embd"), ("max_seq_len", "context")):
        if getattr(cfg, field):
            p[key] = getattr(cfg, field)
    if cfg.n_head:
        p["n_kv_head"] = cfg.n_head
    if p["n_embd"] % p["n_head"] or (p["n_embd"] // p["n_head"]) % 2:
        raise LmforgeError(f"--n-embd {p['n_embd']} must split into {p['n_head']} heads of even width")
    return ModelConfig(vocab_size=vocab_size, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **p)


def prepare_tokenizer(cfg: PretrainConfig, out: Path, sources):
    import json

    from lmforge.data.corpus import fingerprint, iter_documents
    from lmforge.tokenizer.bpe import load_tokenizer, train_bpe

    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer)
    # What the tokenizer in DIR/tokenizer was trained from: an earlier run in DIR (interrupted before its first
    # checkpoint, say) with the same data and vocabulary size has it already; any other run trains its own.
    # The files' size and mtime too: a run that stopped on "corpus too small; add text" must not, once the
    # text is added, reuse the tokenizer trained on the few lines there were.
    spec = json.dumps({"vocab_size": cfg.vocab_size, "text_field": cfg.text_field,
                       "data": fingerprint(sources)}, sort_keys=True)
    stamp = out / "tokenizer.spec.json"
    if (out / "tokenizer" / "tokenizer.json").exists() and stamp.is_file() and stamp.read_text() == spec:
        return load_tokenizer(out / "tokenizer")
    print(f"training a byte-level BPE tokenizer (vocab {cfg.vocab_size}) ...", flush=True)
    tokenizer = train_bpe(iter_documents(sources, cfg.text_field), cfg.vocab_size, out / "tokenizer")
    stamp.write_text(spec)
    return tokenizer


def get_batch(data: np.ndarray, batch: int, context: int, seed: int, step: int, micro: int, rank: int):
    """Random windows: x (B, T) and y (B, T) = x shifted by one; reproducible from (seed, step, micro, rank)."""
    rng = np.random.default_rng([seed, step, micro, rank])
    starts = rng.integers(0, len(data) - context - 1, size=batch)
    w = np.stack([np.asarray(data[s:s + context + 1], dtype=np.int64) for s in starts])  # (B, T+1)
    w = torch.from_numpy(w)
    return w[:, :-1], w[:, 1:]


def run(cfg: PretrainConfig) -> dict:
    from lmforge.data.corpus import resolve_sources
    from lmforge.data.shards import tokenize_corpus
    from lmforge.evaluate.lm import evaluate_tokens
    from lmforge.generate.sampling import generate_text
    from lmforge.model.causal import load_causal_lm
    from lmforge.model.hub import resolve_model
    from lmforge.model.llama import LlamaLM
    from lmforge.tokenizer.bpe import load_tokenizer, mean_token_bytes, token_byte_lengths
    from lmforge.train import checkpoint as ckpt
    from lmforge.train.common import (MetricsLog, StopOnSignal, autocast, build_optimizer, format_duration,
                                      full_state, grad_scaler, load_optimizer_state, resolve_precision,
                                      setup_runtime, shard_model, warmup_cosine, write_atomic)

    if not cfg.out:
        raise LmforgeError("--out is required (the folder for checkpoints and the final model)")
    out = Path(cfg.out)
    rt = setup_runtime(cfg.device)
    precision = resolve_precision(cfg.precision, rt.device)
    torch.manual_seed(cfg.seed + rt.rank)

    ckpt.prepare_run_dir(out, "pretrain", cfg.resume, rt)
    if cfg.resume and (out / "final" / "config.json").exists():
        # DIR/final is written last: the run is done. Resuming from its last checkpoint would train past the
        # --max-minutes stop (which saves none) without a budget and replace DIR/final and metrics.json.
        print(f"{out} is a finished run (its model is {out / 'final'}): nothing to resume. To train further, "
              f"start a new run with --init-from {out / 'final'}", flush=True)
        return {"finished": str(out / "final")}
    resume_from = ckpt.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ckpt.nothing_to_resume(out, "pretrain")
    saved: dict = ckpt.load_trainer_state(resume_from) if resume_from is not None else {}

    # ---- data and tokenizer -------------------------------------------------------------------------------
    sources = resolve_sources(cfg.data)
    with rt.main_first():  # rank 0 converts models, trains the tokenizer and fills the token cache first
        # resumed, model and tokenizer come from the checkpoint: the --init-from model need not be at hand any more
        init_path = resolve_model(cfg.init_from, head="causal LM") if cfg.init_from and resume_from is None else None
        if resume_from is not None:
            tokenizer = load_tokenizer(resume_from)
        elif init_path is not None:
            tokenizer = load_tokenizer(init_path)
        else:
            tokenizer = prepare_tokenizer(cfg, out, sources)
        if tokenizer.eos_token_id is None:
            raise LmforgeError("the tokenizer has no EOS token: documents could not be separated")
        data = tokenize_corpus(sources, tokenizer, text_field=cfg.text_field, val_fraction=cfg.val_fraction,
                               show_progress=cfg.progress and rt.is_main)
    token_bytes = token_byte_lengths(tokenizer)
    bytes_per_token = mean_token_bytes(tokenizer, data.val) if token_bytes is None else None

    # ---- model ---------------------------------------------------------------------------------------------
    if resume_from is not None:
        model = ckpt.load_checked(resume_from, load_causal_lm)
    elif init_path is not None:
        # loaded with its own context window, which DIR/final keeps: --context is the training window only
        model = load_causal_lm(init_path)
    else:
        model = LlamaLM(model_config(cfg, len(tokenizer), tokenizer))
    # from scratch, the preset's context; a pretrained model's full range (SmolLM2: 8,192) would make a step
    # of 16 x 8,192 tokens, tens of GB of logits: 1,024 at most unless --context asks for more
    from_scratch = isinstance(model, LlamaLM) and not cfg.init_from
    if cfg.context and cfg.context > model.max_seq_len:  # from scratch, the model is built with --context
        raise LmforgeError(f"--context {cfg.context}: {cfg.init_from or 'the model'} reads at most "
                           f"{model.max_seq_len} tokens (max_position_embeddings in its config.json); use "
                           f"--context {model.max_seq_len} or less")
    context = cfg.context or (model.max_seq_len if from_scratch else min(1024, model.max_seq_len))
    for name, split in (("training", data.train), ("validation", data.val)):
        if len(split) < context + 2:
            raise LmforgeError(f"corpus too small: the {name} split has {len(split)} tokens, fewer than the "
                               f"context length {context} + 2; add text or lower --context")
    model.to(rt.device)
    n_params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    if isinstance(model, LlamaLM):
        flops_per_token = model.cfg.flops_per_token(context)
    else:
        flops_per_token = 6 * n_params

    lr = cfg.lr or (1e-4 if cfg.init_from else 2e-3)
    sharded = cfg.fsdp and rt.distributed
    if cfg.fsdp and not rt.distributed:
        print("--fsdp: one process has nothing to shard with; training unsharded (start it with torchrun)", flush=True)
    if sharded:
        shard_model(model)  # before the optimizer, which must hold the shards
    optimizer = build_optimizer(model, lr, cfg.weight_decay, device=rt.device)
    train_model = model
    if rt.distributed and not sharded:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)
    # resumed, "auto" keeps the run's choice: on a resume cfg.max_steps is the fitted count, which could
    # switch compilation on, and compiled steps round differently from the eager ones being continued
    use_compile = cfg.compile == "on" or (cfg.compile == "auto" and (
        saved.get("compiled", False) if resume_from is not None else compile_pays_off(cfg, rt.device)))
    if use_compile:
        train_model = torch.compile(train_model)

    tokens_per_step = cfg.batch_size * cfg.grad_accum * context * rt.world_size
    scaler = grad_scaler(precision, rt.device)  # the --max-minutes probe's; the run's is made below

    def micro_loss(x, y):
        with autocast(precision, rt.device):
            logits = train_model(x)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten())

    def train_step(step: int) -> float:
        total = 0.0
        for micro in range(cfg.grad_accum):
            x, y = get_batch(data.train, cfg.batch_size, context, cfg.seed, step, micro, rt.rank)
            x, y = x.to(rt.device), y.to(rt.device)
            loss = micro_loss(x, y) / cfg.grad_accum
            scaler.scale(loss).backward()
            total += loss.item()
        scaler.unscale_(optimizer)  # clip the true gradients
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        scaler.step(optimizer)  # skipped where fp16 overflowed, and the scale backs off
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return total

    # ---- the step budget -------------------------------------------------------------------------------------
    start_step, max_steps, per_step = 0, cfg.max_steps, None
    tokens_before = 0  # trained on by earlier invocations (a resumed run may have had other processes)
    if resume_from is not None:
        start_step = saved["step"]
        max_steps = saved["max_steps"]
        world = saved.get("world_size", rt.world_size)
        tokens_before = saved.get("tokens_seen", start_step * tokens_per_step // rt.world_size * world)
        if world != rt.world_size:  # the schedule is in steps; a step's tokens scale with the processes
            print(f"note: the run was trained by {world} process(es), this is {rt.world_size}: each remaining step "
                  f"sees {rt.world_size}/{world} of the tokens a step saw before", flush=True)
    elif not max_steps and cfg.max_minutes > 0:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)  # constant LR for the probe
        per_step = measure_step_seconds(train_step, model, optimizer)  # the steps are fitted after evaluation 0
    elif not max_steps:
        max_steps = 1000

    def tokens_seen(step: int) -> int:
        return tokens_before + (step - start_step) * tokens_per_step

    scaler = grad_scaler(precision, rt.device, saved.get("grad_scaler"))  # as saved; nor does the probe's carry over

    log = MetricsLog(out, enabled=rt.is_main)
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        if resume_from is not None:
            log.truncate_after(start_step)
        elif log.path.exists():
            log.path.unlink()  # a fresh run in an old folder: start the log over
    print(f"data: {data.meta['train_tokens']:,} training / {data.meta['val_tokens']:,} validation tokens "
          f"(cache {data.path})", flush=True)
    if resume_from is not None:
        print(f"resuming from {resume_from} at step {start_step}", flush=True)

    val_tokens = data.val
    sample_prompt_ids = np.asarray(data.val[:8]).tolist()

    def evaluate(step: int) -> dict:
        res = evaluate_tokens(model, val_tokens, context, token_bytes, bytes_per_token, batch_size=cfg.batch_size,
                              max_tokens=cfg.eval_tokens or None, precision=precision, device=rt.device)
        row = {"step": step, "val_loss": res["loss"], "val_ppl": res["perplexity"], "val_bpb": res["bits_per_byte"]}
        if not math.isfinite(res["loss"]):  # the last update diverged (its own loss was still finite)
            raise LmforgeError(f"the validation loss became {res['loss']} at step {step}: lower --lr or use "
                               f"--precision fp32")
        msg = (f"step {step}: val loss {res['loss']:.4f} | ppl {res['perplexity']:.2f} | "
               f"bits/byte {res['bits_per_byte']:.4f}")
        if cfg.sample_tokens and (rt.is_main or sharded):  # sharded, every rank takes part in each forward
            prompt = tokenizer.decode(sample_prompt_ids)
            text = generate_text(model, tokenizer, prompt, max_new_tokens=cfg.sample_tokens, temperature=0.8,
                                 top_k=50, seed=cfg.seed)
            row["sample"] = prompt + text
            msg += "\n  sample: " + (prompt + text).replace("\n", " / ")[:400]
        if rt.is_main:
            print(msg, flush=True)
            log.log(**row)
        return row

    last_save: list = [None, None]  # (step, folder) of the latest checkpoint written

    def save(step: int) -> Path | None:
        # Sharded, every rank hands its shards to rank 0, which writes the same files as an unsharded run.
        model_state, optim_state = full_state(model, optimizer) if sharded else (None, None)
        rngs = rt.all_ranks(ckpt.rng_state())
        last_save[:] = [step, None]  # on every rank, so that all of them skip (or take part in) a second save
        if not rt.is_main:
            return None
        state = {"optimizer": optim_state if sharded else optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                 "rng": rngs, "step": step, "max_steps": max_steps, "world_size": rt.world_size,
                 "tokens_seen": tokens_seen(step),
                 "grad_scaler": scaler.state_dict(), "compiled": use_compile,
                 "data_position": {"step": step, "seed": cfg.seed}}
        def write(folder: Path):
            model.save_hf(folder, model_state)
            tokenizer.save_pretrained(folder)
        last_save[1] = ckpt.save_checkpoint(out, step, write, state, config_yaml, keep=cfg.keep_checkpoints)
        return last_save[1]

    stop, bar = StopOnSignal().install(), None  # the handler before the first evaluation, which can take a while
    try:
        first_eval = None
        if start_step == 0:
            t_eval = time.time()
            first_eval = evaluate(0)
            eval_seconds = time.time() - t_eval
        else:
            # Recover the step-0 numbers for the summary from the log of the interrupted run.
            first_eval = next((r for r in log.rows() if r.get("step") == 0 and "val_loss" in r), None)

        n_evals = 10  # evaluations after step 0 (the last one at the end)
        if per_step is not None:
            max_steps, n_evals = fit_steps(cfg.max_minutes * 60, per_step, eval_seconds, bool(cfg.eval_interval))
            max_steps, n_evals = (int(v) for v in rt.agree([max_steps, n_evals], "min"))  # one schedule for all
            times = "" if cfg.eval_interval else f", evaluated {n_evals} time{'s' * (n_evals != 1)}"
            print(f"measured {per_step:.3f} s/step and {eval_seconds:.1f} s/evaluation: {cfg.max_minutes:g} minutes "
                  f"is about {max_steps} steps{times}", flush=True)
        warmup = cfg.warmup_steps if cfg.warmup_steps >= 0 else min(200, max(1, max_steps // 20))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, max_steps, cfg.min_lr_ratio))
        if resume_from is not None:
            load_optimizer_state(model, optimizer, saved["optimizer"], sharded)
            scheduler.load_state_dict(saved["scheduler"])
            ckpt.set_rng_state(saved["rng"], rt.rank)
        eval_interval = cfg.eval_interval or max(1, math.ceil(max_steps / n_evals))
        # 10 times per run even where --max-minutes evaluates less often: a killed run keeps its work
        # (on --resume, cfg.eval_interval is the saved, worked-out one: not a cadence the user asked for)
        save_interval = cfg.save_interval or (resume_from is None and cfg.eval_interval) or max(1, math.ceil(
            max_steps / 10))
        resolved = dict(C.to_dict(cfg), max_steps=max_steps, lr=lr, warmup_steps=warmup, context=context,
                        precision=precision, eval_interval=eval_interval, save_interval=save_interval)
        config_yaml = yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)
        if rt.is_main:
            write_atomic(out / "config.yaml", config_yaml)  # --resume reads it: never half a file
        print(f"model: {n_params / 1e6:.2f}M parameters | context {context} | {tokens_per_step:,} tokens/step | "
              f"{max_steps} steps | precision {precision}{' | compiled' if use_compile else ''} | device {rt.device}"
              + (f" | world {rt.world_size}{' (FSDP)' if sharded else ''}" if rt.distributed else ""), flush=True)
        from tqdm import tqdm
        bar = tqdm(total=max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
                   disable=not (cfg.progress and rt.is_main))
        model.train()
        t_start = time.time()
        window_t, window_tokens = time.time(), 0
        step = start_step
        last_eval, stopped_early = None, False
        while step < max_steps:
            # the mean over ranks (each holds the loss of its own batches): logged, and checked on every rank
            # alike, so that a NaN on one of them stops them all instead of leaving the others waiting
            loss = rt.agree([train_step(step)], "sum")[0] / rt.world_size
            step += 1
            window_tokens += tokens_per_step
            if not math.isfinite(loss):
                raise LmforgeError(f"loss became {loss} at step {step}: lower --lr or use --precision fp32")
            if step % cfg.log_interval == 0 or step == max_steps:
                dt = time.time() - window_t
                tps = window_tokens / max(dt, 1e-9)
                mfu_flops = tps * flops_per_token
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tps:,.0f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
                log.log(step=step, loss=loss, lr=scheduler.get_last_lr()[0], tokens_per_s=tps,
                        gflops=mfu_flops / 1e9, elapsed_s=time.time() - t_start)
                window_t, window_tokens = time.time(), 0
            bar.update(1)
            if step % eval_interval == 0 or step == max_steps:
                bar.clear()
                t_eval = time.time()
                last_eval = evaluate(step)
                # Evaluation time is not training throughput. The window keeps the steps it has counted since
                # the last log line, so it must lose the evaluation's time, not restart (which made the quickstart
                # on a slow CPU report 17,927 tokens/s for steps that ran at about 2,500).
                window_t += time.time() - t_eval
            if step % save_interval == 0 and step < max_steps:
                t_save = time.time()
                save(step)
                window_t += time.time() - t_save  # nor is writing a checkpoint
            ran = step - start_step
            # One rank's signal or clock decides for all of them (see Runtime.agree). Past the budget the run
            # stops with its cosine schedule unfinished; re-fitting the step count to the pace instead (as
            # finetune does) ended 11 s closer to the budget but 0.05 bits/byte worse in bench/max_minutes.sh:
            # squeezing the decay into the last steps cost more than a short run gains from annealing.
            signalled, over_budget = rt.agree([stop.requested, bool(
                cfg.max_minutes and not cfg.max_steps and resume_from is None
                and (time.time() - t_start) > cfg.max_minutes * 60 * 1.05)])
            if step < max_steps and (signalled or (cfg.stop_after_steps and ran >= cfg.stop_after_steps)):
                stopped_early = True
                break
            if over_budget:
                print("time budget reached", flush=True)
                break
    finally:
        if bar is not None:
            bar.close()
        stop.restore()  # also when the first evaluation fails: no handler outlives the run

    train_seconds = time.time() - t_start
    if stopped_early:
        # a stop on a save step has its checkpoint already (writing it again doubled the wait, and a kill
        # between the two renames of the rewrite left no checkpoint of that step)
        path = last_save[1] if last_save[0] == step else save(step)
        print(f"stopped at step {step}; checkpoint {path}. "
              f"Continue with: {rt.command('pretrain')} --out {out} --resume",
              flush=True)
        return {"stopped_at": step, "checkpoint": str(path), "exit_code": stop.exit_code() if signalled else 0}

    if last_eval is None or last_eval["step"] != step:
        last_eval = evaluate(step)
    summary = {}
    model_state = full_state(model)[0] if sharded else None
    if rt.is_main:
        final = out / "final"
        def write_final(folder: Path):
            model.save_hf(folder, model_state)
            tokenizer.save_pretrained(folder)
            (folder / "lmforge_config.yaml").write_text(config_yaml, encoding="utf-8")
        rows = [r for r in log.rows() if "tokens_per_s" in r]
        tps = [r["tokens_per_s"] for r in rows[1:]] or [r["tokens_per_s"] for r in rows]
        summary = {
            "steps": step, "parameters": n_params, "context": context, "tokens_per_step": tokens_per_step,
            "tokens_seen": tokens_seen(step), "precision": precision,
            "train_seconds_this_invocation": round(train_seconds, 1),
            "median_tokens_per_s": float(np.median(tps)) if tps else None,
            "final_train_loss": next((r["loss"] for r in reversed(rows)), None),
            "val_loss": last_eval["val_loss"], "val_perplexity": last_eval["val_ppl"],
            "val_bits_per_byte": last_eval["val_bpb"],
            "initial_val_loss": first_eval["val_loss"] if first_eval else None,
            "initial_val_perplexity": first_eval["val_ppl"] if first_eval else None,
            "initial_val_bits_per_byte": first_eval["val_bpb"] if first_eval else None,
            "sample": last_eval.get("sample"), "final_model": str(final),
        }
        log.summary(summary)
        plot = log.plot()
        # DIR/final last: --resume takes a run that has it for finished, so a kill just after it was written (a
        # SIGTERM here meets the default handler) left a run without metrics.json that no --resume completed
        ckpt.write_folder_atomic(final, write_final)
        print(f"done in {format_duration(train_seconds)}: val bits/byte {summary['val_bits_per_byte']:.4f}, "
              f"perplexity {summary['val_perplexity']:.2f}"
              + (f" (before: {summary['initial_val_perplexity']:.2f})" if cfg.init_from and first_eval else ""),
              flush=True)
        print(f"model: {final}\nmetrics: {out / 'metrics.json'}" + (f"\nloss curve: {plot}" if plot else ""), flush=True)
    return summary


def compile_pays_off(cfg: PretrainConfig, device) -> bool:
    """torch.compile costs ~15 s (CPU, measured) and saves ~15% per step: worth it on runs of a few minutes.
    Inductor needs a C compiler on CPU; without one we stay eager rather than fail."""
    import shutil

    long_run = cfg.max_minutes >= 2 or cfg.max_steps >= 500 or (not cfg.max_steps and not cfg.max_minutes)
    if not long_run or device.type not in ("cpu", "cuda"):
        return False
    return device.type == "cuda" or bool(shutil.which("cc") or shutil.which("gcc"))


def fit_steps(budget_s: float, step_s: float, eval_s: float, interval_given: bool) -> tuple[int, int]:
    """(steps, evaluations after step 0) that fill a --max-minutes budget of `budget_s` seconds.

    About 8 % of the budget is left for evaluations and checkpoints, which is ten evaluations where they are
    cheap. Where one costs more (a slow CPU in fp32: the `small` preset's 65k validation tokens took 11 s
    against 1.6 s per step on a 2-core AVX2 machine, so ten of them were 60 % of a 3-minute run, and the run
    hit its budget at 60 % of its steps), the run evaluates less often, down to once at the end, and the
    steps make room for what is left."""
    if interval_given:  # the user's cadence: the old 8 % rule
        return max(10, int(0.92 * budget_s / step_s)), 10
    n_evals = max(1, min(10, int(0.08 * budget_s / max(eval_s, 1e-9))))
    overhead = max(0.08 * budget_s, n_evals * eval_s)
    return max(10, int((budget_s - overhead) / step_s)), n_evals


def measure_step_seconds(train_step, model, optimizer, n_steps: int = 6) -> float:
    """Seconds per optimizer step, timed on the real model and data, then the state is put back.

    The run's step count must be fixed before training so the cosine schedule (and an exact resume) is
    defined; --max-minutes turns into steps through this measurement.
    """
    import copy

    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(optimizer.state_dict())
    saved_rng = torch.get_rng_state()
    train_step(0)  # warm-up: allocator, kernels, lazy optimizer state (and torch.compile's first compile)
    times = []
    for i in range(n_steps):
        t = time.time()
        train_step(1 + i)
        times.append(time.time() - t)
    # The median: one stalled step (a late recompile, a busy neighbour on a shared CPU) must not shrink the
    # whole run; a steady slowdown still shows.
    seconds = float(np.median(times))
    model.load_state_dict(saved_model)
    optimizer.load_state_dict(saved_opt)
    torch.set_rng_state(saved_rng)
    return seconds


def base_config(args) -> dict:
    """--resume: the run's saved config is the base."""
    return C.resume_base(args, PretrainConfig, RESOLVED)
