"""A Llama-style decoder in one readable file (after nanoGPT's model.py).

RoPE, RMSNorm, SwiGLU, tied embeddings, grouped-query attention and PyTorch SDPA causal attention. The
weights map one to one onto Hugging Face's `LlamaForCausalLM` (q/k/v and gate/up are stored fused here
for speed and split on export), so every checkpoint loads with plain `transformers` and gives the same
logits; `from_hf` reads any Llama-architecture folder back, e.g. SmolLM2 for continued pretraining.
Qwen2 (Qwen2.5, Qwen2-Instruct...) is the same decoder with a bias on q/k/v: `arch="qwen2"` reads and writes
`Qwen2ForCausalLM` folders. Llama 3.1+'s long-context RoPE (`rope_scaling`, type llama3) is supported.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class ModelConfig:
    vocab_size: int = 8192
    n_layer: int = 6
    n_head: int = 8
    n_kv_head: int = 8
    n_embd: int = 256
    intermediate_size: int = 0  # 0: the SwiGLU default, ~8/3 * n_embd rounded up to a multiple of 64
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int = 0  # 0: n_embd // n_head
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None  # a list as instruct models name several (Llama 3: two)
    pad_token_id: int | None = None  # written to config.json: transformers' batched generate pads with it
    arch: str = "llama"  # the Hugging Face architecture written on export: "llama" or "qwen2" (q/k/v biases)
    # Llama 3.1+'s long-context RoPE: {"rope_type": "llama3", "factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"} as in its config.json; None: plain RoPE
    rope_scaling: dict | None = None

    @property
    def qkv_bias(self) -> bool:
        return self.arch == "qwen2"

    def __post_init__(self):
        if self.intermediate_size <= 0:
            self.intermediate_size = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.head_dim <= 0:
            self.head_dim = self.n_embd // self.n_head
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")

    def num_params(self, embeddings: bool = True) -> int:
        d, h = self.n_embd, self.head_dim
        attn = (d + self.qkv_bias) * (self.n_head + 2 * self.n_kv_head) * h + self.n_head * h * d
        mlp = 3 * d * self.intermediate_size
        per_layer = attn + mlp + 2 * d
        n = self.n_layer * per_layer + d
        if embeddings:
            n += self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward = 3x forward), PaLM appendix B style."""
        n = self.num_params(embeddings=False) + self.vocab_size * self.n_embd  # the output head is a matmul
        attn = 12 * self.n_layer * self.n_head * self.head_dim * seq_len / 2  # causal: half the scores
        return 6 * n + attn


# Presets: `tiny` for tests and smoke runs, `small` is the 10-minute CPU Shakespeare model, `base` ~GPT-2 small.
PRESETS: dict[str, dict] = {
    "tiny": dict(n_layer=2, n_head=4, n_kv_head=4, n_embd=64, max_seq_len=128),
    "small": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=256, max_seq_len=256),
    "base": dict(n_layer=12, n_head=12, n_kv_head=12, n_embd=768, max_seq_len=1024),
}


def rope_cache(cfg: ModelConfig, seq_len: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (seq_len, head_dim), the 'rotate half' layout Hugging Face Llama uses."""
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim))
    if cfg.rope_scaling:
        inv_freq = llama3_inv_freq(inv_freq, cfg.rope_scaling)
    freqs = torch.outer(torch.arange(seq_len, device=device).float(), inv_freq)  # (T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hd)
    return emb.cos(), emb.sin()


def llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1's RoPE frequencies for long contexts: wavelengths longer than the pretraining context / low_freq_factor
    are stretched by `factor`, shorter than context / high_freq_factor kept, and those between interpolated."""
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    context = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq  # (hd/2,)
    smooth = ((context / wavelen - low) / (high - low)).clamp(0, 1)  # 0: stretch fully, 1: keep
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); cos/sin: (T, hd)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache:
    """Preallocated keys and values for incremental decoding: one (B, n_kv, max_len, hd) pair per layer."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype, device=None):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.n_layer)]
        self.pos = 0  # tokens already stored
        self.max_len = max_len

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = k.shape[2]
        self.k[layer][:, :, self.pos:self.pos + t] = k
        self.v[layer][:, :, self.pos:self.pos + t] = v
        end = self.pos + t
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def causal_attention_bf16_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention as two bf16 batched matmuls around an fp32 softmax.

    On CPU, PyTorch's flash-attention kernel runs bf16 no faster than fp32, while plain bf16 GEMMs use the
    native bf16 dot-product units: for contexts up to ~1k this is ~2x faster forward + backward (measured,
    bench/pretrain.py). The (T, T) scores are small at these lengths. Softmax in fp32 as HF's eager path does.
    q: (B, H, T, hd); k, v: (B, Hkv, T, hd) -> (B, H, T, hd).
    """
    T = q.shape[-2]
    if k.shape[1] != q.shape[1]:  # grouped-query attention: share each k/v head across its query group
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5)  # (B, H, T, T)
    mask = torch.full((T, T), float("-inf"), device=q.device).triu(1).to(q.dtype)
    return torch.softmax(scores + mask, dim=-1, dtype=torch.float32).to(q.dtype) @ v  # (B, H, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # One matmul for q, k and v: fewer, larger GEMMs are markedly faster on CPU.
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=cfg.qkv_bias)
        self.o = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, cache: KVCache | None = None, layer: int = 0):
        B, T, _ = x.shape
        c = self.cfg
        q, k, v = self.qkv(x).split([c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim], -1)
        q = q.view(B, T, c.n_head, c.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, c.n_kv_head, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, Hkv, past+T, hd)
        gqa = c.n_head != c.n_kv_head
        if past == 0 and q.dtype == torch.bfloat16 and q.device.type == "cpu" and T <= 1024:
            y = causal_attention_bf16_cpu(q, k, v)
        elif past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        elif T == 1:  # one new token sees every cached position: no mask needed
            y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
        else:  # a chunk after a prefix: causal within the chunk, full over the prefix
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        y = y.transpose(1, 2).reshape(B, T, c.n_head * c.head_dim)
        return self.o(y)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.n_embd, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, cache=None, layer=0):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, layer)
        return x + self.mlp(self.mlp_norm(x))


class LlamaLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_cache(cfg, cfg.max_seq_len)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2 style: shrink the residual projections so the residual stream's variance stays flat with depth.
        for name, p in self.named_parameters():
            if name.endswith(("attn.o.weight", "mlp.down.weight")):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab)."""
        T = idx.shape[1]
        start = cache.pos if cache is not None else 0
        if start + T > self.cos.shape[0]:
            self._grow_rope(start + T)
        cos, sin = self.cos[start:start + T], self.sin[start:start + T]
        x = self.embed(idx)  # (B, T, d)
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.pos += T
        return self.lm_head(self.norm(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
        """Mean next-token cross-entropy; targets (B, T) are idx shifted by one (or -100 to ignore)."""
        logits = self(idx)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=ignore_index)

    @property
    def max_seq_len(self) -> int:
        return self.cfg.max_seq_len

    def new_cache(self, batch: int, max_len: int, dtype=None) -> KVCache:
        dtype = dtype or self.embed.weight.dtype
        return KVCache(self.cfg, batch, max_len, dtype, self.embed.weight.device)

    def _grow_rope(self, n: int):
        cos, sin = rope_cache(self.cfg, n, device=self.cos.device)
        self.cos, self.sin = cos, sin

    # ---- Hugging Face format -------------------------------------------------------------------------

    def hf_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Our weights under LlamaForCausalLM's names, fused projections split back apart. `state`: our own
        state dict to convert instead of the live parameters (FSDP gathers one; its parameters are shards)."""
        c = self.cfg
        w = state if state is not None else dict(self.named_parameters(remove_duplicate=False))
        sd = {"model.embed_tokens.weight": w["embed.weight"], "model.norm.weight": w["norm.weight"]}
        if not c.tie_embeddings:
            sd["lm_head.weight"] = w["lm_head.weight"]
        sizes = [c.n_head * c.head_dim, c.n_kv_head * c.head_dim, c.n_kv_head * c.head_dim]
        for i in range(c.n_layer):
            b, p = f"layers.{i}.", f"model.layers.{i}."
            q, k, v = w[b + "attn.qkv.weight"].split(sizes)
            if c.qkv_bias:
                biases = w[b + "attn.qkv.bias"].split(sizes)
                sd.update({p + f"self_attn.{n}_proj.bias": t for n, t in zip("qkv", biases)})
            gate, up = w[b + "mlp.gate_up.weight"].chunk(2)
            sd.update({
                p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                p + "self_attn.v_proj.weight": v, p + "self_attn.o_proj.weight": w[b + "attn.o.weight"],
                p + "mlp.gate_proj.weight": gate, p + "mlp.up_proj.weight": up,
                p + "mlp.down_proj.weight": w[b + "mlp.down.weight"],
                p + "input_layernorm.weight": w[b + "attn_norm.weight"],
                p + "post_attention_layernorm.weight": w[b + "mlp_norm.weight"],
            })
        return {k: v.detach().contiguous() for k, v in sd.items()}

    def hf_config(self) -> dict:
        c = self.cfg
        arch = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": False,
                "sliding_window": None} if c.arch == "qwen2" else {"architectures": ["LlamaForCausalLM"],
                                                                   "model_type": "llama"}
        return {
            **arch,
            "vocab_size": c.vocab_size, "hidden_size": c.n_embd, "intermediate_size": c.intermediate_size,
            "num_hidden_layers": c.n_layer, "num_attention_heads": c.n_head,
            "num_key_value_heads": c.n_kv_head, "head_dim": c.head_dim,
            "max_position_embeddings": c.max_seq_len, "rms_norm_eps": c.norm_eps, "rope_theta": c.rope_theta,
            "rope_scaling": c.rope_scaling, "hidden_act": "silu", "attention_bias": False, "mlp_bias": False,
            "attention_dropout": 0.0, "tie_word_embeddings": c.tie_embeddings, "initializer_range": 0.02,
            "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "pad_token_id": c.pad_token_id,
            "torch_dtype": "float32",
            "use_cache": True,
        }

    def save_hf(self, folder: str | Path, state: dict[str, torch.Tensor] | None = None) -> None:
        """Write config.json + model.safetensors (float32) into an existing folder (`state`: see hf_state_dict)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        (folder / "config.json").write_text(json.dumps(self.hf_config(), indent=2))
        save_file({k: v.float().cpu() for k, v in self.hf_state_dict(state).items()},
                  str(folder / "model.safetensors"), metadata={"format": "pt"})

    @classmethod
    def from_hf(cls, folder: str | Path, max_seq_len: int | None = None) -> "LlamaLM":
        """Load a Llama-architecture Hugging Face folder (safetensors only) into an LlamaLM."""
        from safetensors.torch import load_file

        folder = Path(folder)
        hf = json.loads((folder / "config.json").read_text())
        cfg = config_from_hf(hf)
        if max_seq_len:
            cfg.max_seq_len = max_seq_len
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"{folder}: no *.safetensors weights")
        sd: dict[str, torch.Tensor] = {}
        for f in files:
            sd.update(load_file(str(f)))
        model = cls(cfg)
        model.load_hf_state_dict(sd)
        return model

    @torch.no_grad()
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        c = self.cfg
        get = lambda k: sd[k].float()  # noqa: E731
        self.embed.weight.copy_(get("model.embed_tokens.weight"))
        self.norm.weight.copy_(get("model.norm.weight"))
        if not c.tie_embeddings:
            self.lm_head.weight.copy_(get("lm_head.weight"))
        for i, b in enumerate(self.layers):
            p = f"model.layers.{i}."
            b.attn.qkv.weight.copy_(torch.cat([get(p + f"self_attn.{n}_proj.weight") for n in "qkv"]))
            if c.qkv_bias:
                b.attn.qkv.bias.copy_(torch.cat([get(p + f"self_attn.{n}_proj.bias") for n in "qkv"]))
            b.attn.o.weight.copy_(get(p + "self_attn.o_proj.weight"))
            b.mlp.gate_up.weight.copy_(torch.cat([get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
            b.mlp.down.weight.copy_(get(p + "mlp.down_proj.weight"))
            b.attn_norm.weight.copy_(get(p + "input_layernorm.weight"))
            b.mlp_norm.weight.copy_(get(p + "post_attention_layernorm.weight"))


def config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from a Llama or Qwen2 config.json; raises ValueError for features this model does not have
    (the caller then falls back to transformers, which has them all)."""
    mtype = hf.get("model_type")
    if mtype not in ("llama", "mistral", "qwen2") or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"not a plain Llama architecture (model_type={mtype!r})")
    # transformers 5 writes RoPE scaling (Llama 3's 'llama3', 'yarn', ...) into rope_parameters, older
    # versions into rope_scaling: either one other than plain RoPE changes the positions this model computes.
    rope = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    sliding = hf.get("use_sliding_window", True) if mtype == "qwen2" else True  # qwen2 keeps an unused value
    if rope_type not in ("default", "llama3") or (sliding and hf.get("sliding_window")) or \
            any(t != "full_attention" for t in hf.get("layer_types") or []):
        raise ValueError(f"RoPE type {rope_type!r} / sliding-window attention are not supported by the native model")
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": "llama3", **{k: rope[k] for k in keys}}
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"activation {hf.get('hidden_act')!r} is not SwiGLU")
    rope_theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
    eos = hf.get("eos_token_id")
    return ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=hf["num_attention_heads"],
        n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"], n_embd=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(rope_theta), norm_eps=hf.get("rms_norm_eps", 1e-5),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
        bos_token_id=hf.get("bos_token_id"), eos_token_id=list(eos) if isinstance(eos, list) else eos,
        pad_token_id=hf.get("pad_token_id"), arch="qwen2" if mtype == "qwen2" else "llama", rope_scaling=scaling,
    )


def model_config_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
