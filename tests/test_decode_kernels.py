"""The CPU decode kernels (csrc/decode.cpp) against PyTorch: `decode_matmul` against `F.linear` and
`decode_attention` against `F.scaled_dot_product_attention`, computed in float64 from the same
inputs; the layers and the model take them where they should; and a machine that cannot build them
still decodes, with one warning that says why."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import byte_text_ids, ops_run, plain_pytorch, trained_model
from scratchgpt import KVCache, generate, quantize_model
from scratchgpt.kernels import DECODE_ROWS, Int8Linear, Linear, decode_ops

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ops(decode_kernels):
    return decode_kernels


def quantized(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int8 values over the whole range, and fp32 scales of the weight's size per row."""
    return (torch.randint(-127, 128, weight.shape, dtype=torch.int8),
            weight.abs().amax(1) / 127 + 1e-3)


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("in_features, out_features", [(64, 96), (40, 7), (768, 33), (3, 1), (100, 5)])
@pytest.mark.parametrize("weights", ["fp32", "bf16", "bf16 fp32", "int8 fp32", "int8 bf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_decode_matmul_equals_f_linear(ops, rows, in_features, out_features, weights, bias):
    """Every row count, widths that are not multiples of the 16- or 32-wide vectors (masked tails)
    and an output count not a multiple of the blocks; each weight format with its activations.
    bf16 weights with bf16 activations multiply in pairs (AVX-512 BF16) where the CPU can; with
    fp32 activations ("bf16 fp32") they are widened to fp32, as on CPUs without it."""
    g = torch.Generator().manual_seed(rows * 1000 + in_features + out_features)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    b = torch.randn(out_features, generator=g) if bias else None
    if weights.startswith("int8"):
        dtype = torch.bfloat16 if weights.endswith("bf16") else torch.float32
        w8, scale = quantized(w)
        x = x.to(dtype)
        b = None if b is None else b.to(dtype)
        got = ops.decode_matmul(x, w8, scale, b)
        want = F.linear(x.double(), w8.double() * scale.double()[:, None], None if b is None else b.double())
    else:
        dtype = torch.bfloat16 if weights == "bf16" else torch.float32
        x, b = x.to(dtype), None if b is None else b.to(dtype)
        w = w.to(torch.bfloat16 if weights.startswith("bf16") else dtype)
        got = ops.decode_matmul(x, w, None, b)
        want = F.linear(x.double(), w.double(), None if b is None else b.double())
    assert got.dtype == dtype and got.shape == (rows, out_features)
    # fp32 accumulation in another order; a bf16 output is rounded to 8 bits of mantissa
    tolerance = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert (got.double() - want).abs().max().item() <= tolerance * max(want.abs().max().item(), 1.0)


def test_decode_matmul_keeps_the_leading_shape_and_refuses_what_it_cannot_do(ops):
    x, w = torch.randn(2, 3, 16), torch.randn(5, 16)
    assert ops.decode_matmul(x, w, None, None).shape == (2, 3, 5)
    assert torch.allclose(ops.decode_matmul(x, w, None, None), F.linear(x, w), atol=1e-5)
    with pytest.raises(RuntimeError, match=f"at most {DECODE_ROWS} rows"):
        ops.decode_matmul(torch.randn(DECODE_ROWS + 1, 16), w, None, None)
    with pytest.raises(RuntimeError, match="int8 weights, and only they, need their scales"):
        ops.decode_matmul(x, w.to(torch.int8), None, None)
    with pytest.raises(RuntimeError, match="contiguous"):
        ops.decode_matmul(x, torch.randn(16, 5).t(), None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 40])
@pytest.mark.parametrize("lengths", [[1], [17], [100], [5, 33, 1]])
def test_decode_attention_equals_sdpa_over_a_ragged_cache(ops, dtype, head_dim, lengths):
    """One query per row attends to the first `lengths[row]` positions of that row's slice of a
    cache (a strided view, as the model passes it)."""
    g = torch.Generator().manual_seed(head_dim + sum(lengths))
    batch, heads, kv_len = len(lengths), 3, max(lengths)
    keys = torch.randn(batch, heads, kv_len + 9, head_dim, generator=g).to(dtype)
    values = torch.randn(batch, heads, kv_len + 9, head_dim, generator=g).to(dtype)
    k, v = keys[:, :, :kv_len], values[:, :, :kv_len]
    q = torch.randn(batch, 1, heads, head_dim, generator=g).to(dtype).transpose(1, 2)  # [B, H, 1, D], strided
    mask = (torch.arange(kv_len) < torch.tensor(lengths)[:, None])[:, None, None, :]  # [B, 1, 1, L]
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    for attn_mask in (mask, None) if len(set(lengths)) == 1 else (mask,):
        got = ops.decode_attention(q, k, v, attn_mask)
        assert got.dtype == dtype and got.shape == q.shape
        tolerance = 1e-5 if dtype == torch.float32 else 2 ** -7
        assert (got.double() - want).abs().max().item() <= tolerance * want.abs().max().item()


@pytest.mark.parametrize("rows", [1, DECODE_ROWS, DECODE_ROWS + 1])
def test_layers_take_the_decode_kernel_for_a_few_rows_at_inference(ops, rows):
    layer = Linear(64, 96)
    int8 = Int8Linear.from_linear(layer)
    x = torch.randn(rows, 1, 64, generator=torch.Generator().manual_seed(rows))
    with torch.no_grad():
        for module, weight in ((layer, layer.weight), (int8, int8.dequantized_weight())):
            assert ("scratchgpt_cpu::decode_matmul" in ops_run(lambda: module(x))) == (rows <= DECODE_ROWS)
            want = F.linear(x.double(), weight.double(), layer.bias.double())
            assert (module(x).double() - want).abs().max().item() <= 0.01 * want.abs().max().item()
    assert "scratchgpt_cpu::decode_matmul" not in ops_run(lambda: layer(x))  # grad mode: training's path


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_a_decoding_model_uses_both_kernels_and_matches_the_plain_path(ops, fmt):
    model = trained_model()
    model = {"fp32": model, "bf16": model.to(torch.bfloat16), "int8": quantize_model(model)}[fmt]
    held_out = byte_text_ids()[1]
    prompt = held_out[:12][None]
    cache = KVCache(model, 1, 16)
    with torch.no_grad():
        model(prompt, cache=cache, logits_from=-1)
        token = held_out[12:13][None]
        used = ops_run(lambda: model(token, cache=cache.rows(0, 1), logits_from=-1))
    assert {"scratchgpt_cpu::decode_matmul", "scratchgpt_cpu::decode_attention"} <= used
    fast = generate(model, prompt, 20, 64)
    with plain_pytorch():
        plain = generate(model, prompt, 20, 64)
    assert torch.equal(fast, plain)  # the trained model's top logits stand apart


@pytest.mark.parametrize("fmt", ["fp32", "bf16"])
def test_where_the_kernels_run_inference_keeps_no_packed_weight_copies(ops, fmt):
    """A prompt goes through oneDNN with the plain weights and decoding through the kernel: a bf16
    model holds half the bytes of an fp32 one, not the same (the packed copies oneDNN would want)."""
    from scratchgpt.kernels import _PACKED

    model = trained_model()
    model = model.to(torch.bfloat16) if fmt == "bf16" else model
    before = len(_PACKED)
    generate(model, byte_text_ids()[1][:24][None], 8, 64)  # a 24-token prompt, then 8 decode steps
    assert len(_PACKED) == before


def test_a_library_cut_short_is_built_again(ops, tmp_path):
    """A build killed while linking leaves a broken library in the cache: the next process builds
    it again instead of failing on it for good."""
    env = {**os.environ, "SCRATCHGPT_CACHE": str(tmp_path)}
    where = "from scratchgpt.kernels import decode_library; print(decode_library())"
    library = Path(subprocess.run([sys.executable, "-c", where], capture_output=True, text=True, env=env,
                                  check=True).stdout.strip())
    assert library.is_relative_to(tmp_path)
    library.parent.mkdir(parents=True)
    library.write_bytes(b"\x7fELF cut short")
    code = ("import torch\n"
            "from scratchgpt.kernels import decode_ops\n"
            "x, w = torch.randn(2, 32), torch.randn(5, 32)\n"
            "print(torch.allclose(decode_ops().decode_matmul(x, w, None, None), x @ w.T, atol=1e-5))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"
    assert "compiling the decode kernels" in result.stderr
    assert library.stat().st_size > 10_000


def test_a_machine_that_cannot_build_the_kernels_still_decodes_and_says_why(tmp_path):
    """No compiler (CXX points nowhere) and an empty kernel cache: one warning, then PyTorch's kernels."""
    code = ("import warnings, torch\n"
            "from scratchgpt import GPTModel, generate\n"
            "from scratchgpt.kernels import decode_ops\n"
            "torch.manual_seed(0)\n"
            "m = GPTModel({'vocab_size': 64, 'context_length': 16, 'emb_dim': 32, 'n_heads': 2, 'n_layers': 1,"
            " 'drop_rate': 0.0, 'qkv_bias': True}).eval()\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    out = generate(m, torch.zeros(1, 3, dtype=torch.long), 4, 16)\n"
            "print(decode_ops(), tuple(out.shape), len(caught))\n"
            "print(caught[0].message if caught else '')\n")
    env = {**os.environ, "CXX": str(tmp_path / "no-such-compiler"), "SCRATCHGPT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr
    first, message = result.stdout.strip().splitlines()[:2]
    import platform
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert first == "None (1, 7) 1"
        assert "decode kernels could not be built" in message and "uses PyTorch's kernels" in message
    else:  # nothing to build here: no warning either
        assert first == "None (1, 7) 0"
