"""The native Llama model: same logits as Hugging Face's LlamaForCausalLM, and a correct KV cache."""
from __future__ import annotations

import json

import pytest
import torch

from lmforge.model.causal import load_causal_lm
from lmforge.model.llama import LlamaLM, ModelConfig

ATOL = 1e-4


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def random_ids(vocab: int, shape, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def native(tiny_run):
    model = load_causal_lm(tiny_run.final).eval()
    assert isinstance(model, LlamaLM)
    return model


def test_exported_config_is_plain_llama(tiny_run):
    cfg = json.loads((tiny_run.final / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["model_type"] == "llama"
    assert cfg["tie_word_embeddings"] is True
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 2 and cfg["num_attention_heads"] == 2
    assert cfg["max_position_embeddings"] == 64 and cfg["vocab_size"] == 512
    from safetensors import safe_open

    with safe_open(str(tiny_run.final / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "lm_head.weight" not in keys  # tied: stored once, as the embedding
    assert "model.embed_tokens.weight" in keys and "model.layers.1.self_attn.k_proj.weight" in keys


def test_logits_match_transformers(tiny_run, native):
    hf = hf_model(tiny_run.final)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied in HF too
    x = random_ids(512, (2, 64), seed=1)
    with torch.no_grad():
        ours, theirs = native(x), hf(input_ids=x).logits
    assert ours.shape == theirs.shape == (2, 64, 512)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert ours.std() > 1e-2  # the comparison is not between two near-zero tensors


def test_trained_weights_differ_from_init(tiny_run, native):
    """The saved model is the trained one (a fresh init with the same seed would give other logits)."""
    torch.manual_seed(1337)
    fresh = LlamaLM(native.cfg).eval()
    x = random_ids(512, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(fresh(x), native(x), atol=1e-3)


def _randomized(cfg: ModelConfig, seed: int = 0) -> LlamaLM:
    """A model whose every weight (norms included) is random and large, so any mis-mapped tensor shows."""
    torch.manual_seed(seed)
    model = LlamaLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.15)
    return model


@pytest.mark.parametrize("n_head,n_kv_head,tie", [(4, 2, True), (4, 1, False), (2, 2, False)])
def test_gqa_and_untied_match_transformers(tmp_path, n_head, n_kv_head, tie):
    cfg = ModelConfig(vocab_size=97, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=32, max_seq_len=32,
                      tie_embeddings=tie, rope_theta=500.0, bos_token_id=0, eos_token_id=0)
    model = _randomized(cfg, seed=n_kv_head)
    model.save_hf(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_key_value_heads"] == n_kv_head and saved["tie_word_embeddings"] is tie
    hf = hf_model(tmp_path)
    assert hf.config.num_key_value_heads == n_kv_head
    x = random_ids(97, (3, 32), seed=2)
    with torch.no_grad():
        ours, theirs = model(x), hf(input_ids=x).logits
    assert ours.abs().max() > 0.5
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=1e-5)
    # ... and it reads back into the native model unchanged.
    back = load_causal_lm(tmp_path).eval()
    assert back.cfg.n_kv_head == n_kv_head and back.cfg.tie_embeddings is tie
    with torch.no_grad():
        torch.testing.assert_close(back(x), ours, atol=0, rtol=0)


def test_invalid_gqa_config():
    with pytest.raises(ValueError, match="multiple of n_kv_head"):
        ModelConfig(n_head=4, n_kv_head=3, n_embd=32)


def _cached_logits(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Logits from feeding `ids` through the KV cache in pieces of the given sizes."""
    cache = model.new_cache(ids.shape[0], ids.shape[1])
    out, pos = [], 0
    for n in chunks:
        out.append(model(ids[:, pos:pos + n], cache))
        pos += n
    assert pos == ids.shape[1] and cache.pos == pos
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("chunks", [[1] * 24, [10] + [1] * 14, [5, 7, 1, 1, 10], [24]],
                         ids=["token-by-token", "prefill+decode", "mixed-chunks", "one-shot"])
def test_kv_cache_matches_full_forward(native, chunks):
    ids = random_ids(512, (2, 24), seed=3)
    with torch.no_grad():
        full = native(ids)
        inc = _cached_logits(native, ids, chunks)
    torch.testing.assert_close(inc, full, atol=ATOL, rtol=1e-5)


def test_kv_cache_gqa_matches_full_forward():
    model = _randomized(ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=32))
    ids = random_ids(64, (1, 20), seed=4)
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(_cached_logits(model, ids, [6] + [1] * 10 + [4]), full, atol=ATOL, rtol=1e-5)


def test_greedy_generation_equals_argmax_of_full_forward(native):
    """generate_ids (KV cache) at temperature 0 picks the same tokens as re-running the whole sequence."""
    from lmforge.generate.sampling import generate_ids

    prompt = random_ids(512, (1, 5), seed=5)[0].tolist()
    got = list(generate_ids(native, prompt, max_new_tokens=10, temperature=0.0, stop_ids=()))
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(10):
            seq.append(int(native(torch.tensor([seq]))[0, -1].argmax()))
    assert got == seq[len(prompt):]


def test_repetition_penalty_is_transformers(native, tiny_run):
    """generate_ids' repetition_penalty is transformers': the same logits on random scores, and greedy generation
    token for token equal to generate(repetition_penalty=...), the prompt's tokens penalised too."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from lmforge.generate.sampling import generate_ids, penalize_repeats

    scores, seen = torch.randn(3, 50, generator=torch.Generator().manual_seed(0)), random_ids(50, (3, 12), seed=1)
    for p in (1.3, 0.8):
        torch.testing.assert_close(penalize_repeats(scores, seen, p),
                                   RepetitionPenaltyLogitsProcessor(p)(seen, scores.clone()), atol=0, rtol=0)
    prompt = random_ids(512, (1, 6), seed=7)[0].tolist()
    plain = list(generate_ids(native, prompt, max_new_tokens=24, temperature=0.0))
    got = list(generate_ids(native, prompt, max_new_tokens=24, temperature=0.0, repetition_penalty=3.0))
    with torch.no_grad():
        want = hf_model(tiny_run.final).generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                                 repetition_penalty=3.0, eos_token_id=None,
                                                 pad_token_id=0)[0, len(prompt):].tolist()
    assert got == want and got != plain  # the penalty changed this reply, and as transformers changes it


def test_rope_grows_past_max_seq_len():
    """A window longer than max_seq_len still runs (RoPE tables are extended), matching the cached path."""
    model = _randomized(ModelConfig(vocab_size=50, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, max_seq_len=8))
    ids = random_ids(50, (1, 12), seed=6)
    with torch.no_grad():
        full = model(ids)
        torch.testing.assert_close(_cached_logits(model, ids, [4, 4, 4]), full, atol=ATOL, rtol=1e-5)


def _save_hf(model, folder):
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def test_qwen2_loads_natively_with_its_qkv_biases_and_exports_back(tmp_path):
    # Qwen2/Qwen2.5 = Llama + q/k/v biases: native loading gives them the KV cache and batched serving
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      tie_word_embeddings=True, rope_theta=1e6)).eval()
    with torch.no_grad():  # the biases start at zero: make them matter
        for name, p in hf.named_parameters():
            if name.endswith("proj.bias"):
                p.normal_(0, 0.5)
    native = load_causal_lm(_save_hf(hf, tmp_path / "qwen")).eval()
    assert isinstance(native, LlamaLM) and native.cfg.arch == "qwen2"
    ids = random_ids(96, (2, 12))
    with torch.no_grad():
        expected = hf(ids).logits
        assert torch.allclose(native(ids), expected, atol=ATOL)
        cache = native.new_cache(2, 12)
        steps = [native(ids[:, :5], cache)] + [native(ids[:, t:t + 1], cache) for t in range(5, 12)]
        assert torch.allclose(torch.cat(steps, 1), expected, atol=ATOL)
    (tmp_path / "back").mkdir()
    native.save_hf(tmp_path / "back")
    back = hf_model(tmp_path / "back")
    assert type(back).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, expected, atol=ATOL)


@pytest.mark.parametrize("style", ["rope_parameters", "rope_scaling"])  # transformers 5 / 4 spellings
def test_llama3_scaled_rope_matches_transformers_and_round_trips(tmp_path, style):
    # Llama 3.1/3.2 stretch RoPE's low frequencies: the native model must compute the same positions
    from transformers import LlamaConfig, LlamaForCausalLM

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=96, max_position_embeddings=64,
                                      rope_theta=500000.0, tie_word_embeddings=True, rope_scaling=scaling)).eval()
    folder = _save_hf(hf, tmp_path / "llama3")
    cfg = json.loads((folder / "config.json").read_text())
    if style == "rope_scaling":  # a config.json as transformers 4 wrote it
        cfg.pop("rope_parameters", None)
        cfg.update(rope_scaling=scaling, rope_theta=500000.0)
        (folder / "config.json").write_text(json.dumps(cfg))
    native = load_causal_lm(folder).eval()
    assert isinstance(native, LlamaLM) and native.cfg.rope_scaling["factor"] == 8.0
    ids = random_ids(96, (1, 48))
    with torch.no_grad():
        expected = hf(ids).logits
        assert torch.allclose(native(ids), expected, atol=ATOL)
        plain = LlamaLM(ModelConfig(**{**native.cfg.__dict__, "rope_scaling": None}))
        plain.load_state_dict(native.state_dict())
        assert not torch.allclose(plain(ids), expected, atol=ATOL)  # the scaling matters at these positions
    (tmp_path / "back").mkdir()
    native.save_hf(tmp_path / "back")
    with torch.no_grad():
        assert torch.allclose(hf_model(tmp_path / "back")(ids).logits, expected, atol=ATOL)


@pytest.mark.parametrize("extra", [
    {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32}},  # how transformers 5 saves it
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    {"layer_types": ["sliding_attention", "full_attention"]},
])
def test_other_rope_scaling_or_sliding_windows_fall_back_to_transformers(extra):
    # the native RoPE is plain or Llama 3's: any other would give wrong logits without an error
    from lmforge.model.llama import config_from_hf

    base = {"model_type": "llama", "vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64}
    config_from_hf(base)
    with pytest.raises(ValueError):
        config_from_hf({**base, **extra})
    qwen = {**base, "model_type": "qwen2", "use_sliding_window": False, "sliding_window": 4096}
    assert config_from_hf(qwen).arch == "qwen2"  # Qwen2 keeps a window size it does not use
    with pytest.raises(ValueError):
        config_from_hf({**qwen, "use_sliding_window": True})
