"""GPTModel against independent references: Hugging Face GPT-2, an explicit attention,
and the seed-style implementation in seed_reference.py (the walkthrough's code)."""

from __future__ import annotations

import math

import pytest
import torch

import seed_reference
from helpers import sharp_model, tiny_config
from hf_reference import hf_model_from_gpt
from scratchgpt import (GPT_CONFIG_124M, GPTConfig, GPTModel, MultiHeadAttention, count_parameters,
                        gpt2_config)


def test_logits_equal_hugging_face_gpt2_at_full_context():
    model = sharp_model(seed=1, context_length=64)
    hf = hf_model_from_gpt(model)
    idx = torch.randint(0, 384, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, theirs = model(idx), hf(idx).logits
    assert ours.shape == (2, 64, 384)
    assert theirs.abs().max() > 1.0  # the comparison is not between near-zero numbers
    assert (ours - theirs).abs().max().item() <= 1e-5


def explicit_attention(mha: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(D) with -inf above the diagonal) v, step by step."""
    b, t, _ = x.shape
    h, d = mha.num_heads, mha.head_dim
    q = mha.W_query(x).view(b, t, h, d).transpose(1, 2)
    k = mha.W_key(x).view(b, t, h, d).transpose(1, 2)
    v = mha.W_value(x).view(b, t, h, d).transpose(1, 2)
    scores = q @ k.transpose(2, 3) / math.sqrt(d)
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    weights = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    return mha.out_proj((weights @ v).transpose(1, 2).reshape(b, t, h * d))


def test_sdpa_attention_equals_explicit_masked_softmax():
    torch.manual_seed(0)
    mha = MultiHeadAttention(d_in=32, d_out=32, context_length=16, dropout=0.0, num_heads=4).eval()
    x = torch.randn(3, 16, 32) * 3
    with torch.no_grad():
        assert torch.allclose(mha(x), explicit_attention(mha, x), atol=1e-6)


def test_cached_forward_equals_full_forward():
    from scratchgpt import KVCache

    model = sharp_model(seed=2)
    idx = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model, batch_size=2, max_len=32)
    with torch.no_grad():
        full = model(idx)
        # a prefill of 7 tokens, one of 5 (several new tokens after cached ones), then one at a time
        pieces = [model(idx[:, :7], cache=cache), model(idx[:, 7:12], cache=cache)]
        pieces += [model(idx[:, i:i + 1], cache=cache) for i in range(12, 20)]
    assert cache.length == 20
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


# --------------------------------------------------------------------------- seed-style model

@pytest.mark.parametrize("qkv_bias", [False, True])
def test_seed_state_dict_loads_unchanged_and_gives_same_logits(qkv_bias):
    cfg = tiny_config(qkv_bias=qkv_bias)
    torch.manual_seed(3)
    seed_model = seed_reference.GPTModel(cfg).eval()
    model = GPTModel(cfg).eval()
    model.load_state_dict(seed_model.state_dict())  # strict: same keys, same shapes
    idx = torch.randint(0, 384, (2, 32))
    with torch.no_grad():
        assert torch.allclose(model(idx), seed_model(idx), atol=1e-5)

    back = seed_reference.GPTModel(cfg).eval()
    back.load_state_dict(sharp_model(seed=4, qkv_bias=qkv_bias).state_dict())  # and the other way round
    assert back.trf_blocks[0].att.mask.dtype == torch.float32
    assert torch.equal(back.trf_blocks[0].att.mask, seed_model.trf_blocks[0].att.mask)


def test_seed_config_dict_is_accepted_as_is():
    model = GPTModel(dict(GPT_CONFIG_124M, n_layers=1))
    assert model.cfg.context_length == 256 and model.cfg.drop_rate == 0.1
    assert model.pos_emb.weight.shape == (256, 768)


def test_parameter_counts_match_gpt2_124m():
    counts = count_parameters(GPTModel(gpt2_config("124M")))
    assert counts == {"untied": 163_037_184, "tied": 124_439_808}  # HF's gpt2 has 124,439,808
    tied = GPTModel(gpt2_config("124M", tie_weights=True))
    assert tied.out_head.weight is tied.tok_emb.weight
    assert count_parameters(tied) == counts


def test_gpt2_initialisation_scales_residual_projections():
    torch.manual_seed(0)
    model = GPTModel(gpt2_config("124M", n_layers=4, vocab_size=1000, context_length=64))
    assert model.tok_emb.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.trf_blocks[0].att.W_query.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * 4)
    assert model.trf_blocks[0].att.out_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.trf_blocks[3].ff.layers[2].weight.std().item() == pytest.approx(residual, rel=0.05)
    assert model.trf_blocks[0].ff.layers[0].bias.abs().max() == 0


@pytest.mark.parametrize("size,layers,width,heads", [
    ("124M", 12, 768, 12), ("355M", 24, 1024, 16), ("774M", 36, 1280, 20), ("1558M", 48, 1600, 25)])
def test_gpt2_presets(size, layers, width, heads):
    cfg = GPTConfig.from_dict(gpt2_config(size))
    assert (cfg.n_layers, cfg.emb_dim, cfg.n_heads, cfg.context_length) == (layers, width, heads, 1024)
    assert cfg.qkv_bias and cfg.vocab_size == 50257


def test_bad_config_and_inputs_name_the_value_and_the_limit():
    with pytest.raises(ValueError, match=r"emb_dim=50 must be divisible by n_heads=4"):
        GPTModel(tiny_config(emb_dim=50))
    with pytest.raises(ValueError, match=r"unknown config keys \['emb_size'\]"):
        GPTModel(dict(tiny_config(), emb_size=3))
    with pytest.raises(ValueError, match="unknown GPT-2 size '2B'"):
        gpt2_config("2B")
    model = sharp_model()
    with pytest.raises(ValueError, match=r"sequence of 33 tokens exceeds context_length=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match=r"integer tensor, got dtype torch.float32"):
        model(torch.zeros(1, 4))


def test_ragged_batch_in_one_cache_equals_each_sequence_alone():
    """Rows of different lengths decode together, each at its own positions (a server's batch)."""
    from scratchgpt import KVCache

    model = sharp_model(seed=3)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 384, (1, n), generator=gen) for n in (3, 9, 1, 6)]
    steps = torch.randint(0, 384, (4, 6), generator=gen)  # the tokens each row is fed next
    cache = KVCache(model, batch_size=4, max_len=32)
    with torch.no_grad():
        for row, prompt in enumerate(prompts):  # prefill each sequence alone into its row
            model(prompt, cache=cache.rows(row, row + 1))
        assert cache.lengths == [3, 9, 1, 6]
        ragged = [model(steps[:, i:i + 1], cache=cache) for i in range(4)]  # 4 decode steps at once
        cache.set_length(2, 0)  # row 2 leaves; a new sequence of 2 tokens takes its place
        model(steps[2:3, :2], cache=cache.rows(2, 3))
        last = model(steps[:, 4:5], cache=cache)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, steps[row:row + 1, :4]], dim=1))
            assert torch.allclose(torch.cat([r[row:row + 1] for r in ragged], dim=1), alone[:, -4:],
                                  atol=1e-5)
        again = model(torch.cat([steps[2:3, :2], steps[2:3, 4:5]], dim=1))
        assert torch.allclose(last[2], again[0, -1:], atol=1e-5)
    assert cache.lengths == [8, 14, 3, 11]
    with pytest.raises(ValueError, match="different numbers of positions"):
        cache.length
    with pytest.raises(ValueError, match="exceed the KV cache's 32 positions"):
        model(torch.zeros(4, 20, dtype=torch.long), cache=cache)


def test_a_ragged_batch_never_reads_uninitialised_memory():
    """Shorter rows attend over the longest row's span with zero weight; garbage there (NaN) would
    still poison them, so a new cache holds zeros."""
    from scratchgpt import KVCache

    model = sharp_model(seed=3)
    for _ in range(20):  # freed small tensors leave their values on the heap for the next allocation
        torch.full((2, 4, 32, 12), float("nan"))
    cache = KVCache(model, batch_size=2, max_len=32)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]), cache=cache.rows(0, 1))
        model(torch.tensor([[4, 5, 6, 7, 8]]), cache=cache.rows(1, 2))
        assert torch.isfinite(model(torch.tensor([[9], [10]]), cache=cache)).all()
    assert not cache.keys[0][0, :, 4:].any() and not cache.values[1][1, :, 6:].any()  # never written: zeros
