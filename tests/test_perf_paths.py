"""The fast paths stay correct: oneDNN inference in `Linear` and the bf16 inference mode."""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import sharp_model, tiny_config
from scratchgpt import GPTModel, generate
from scratchgpt.kernels import _ONEDNN_LINEAR, Linear

needs_onednn = pytest.mark.skipif(not _ONEDNN_LINEAR, reason="oneDNN linear is used on x86 CPUs only")


def ops_run(fn) -> set[str]:
    """Names of the operators `fn()` dispatches, recorded by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def test_every_linear_layer_is_the_fast_linear_with_seed_shapes():
    model = GPTModel(tiny_config())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 * 2 + 1
    for module in linears:
        assert type(module) is Linear
        assert module.weight.shape == (module.out_features, module.in_features)
        assert module.weight.is_contiguous()


@needs_onednn
@pytest.mark.parametrize("shape", [(1, 1, 64), (3, 5, 64), (7, 64)])
@pytest.mark.parametrize("bias", [True, False])
def test_inference_goes_through_onednn_and_equals_f_linear(shape, bias):
    layer = Linear(64, 96, bias=bias)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert "mkldnn::_linear_pointwise" in ops_run(lambda: layer(x))
        got = layer(x)
        want = F.linear(x, layer.weight, layer.bias)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@needs_onednn
def test_bf16_inference_uses_packed_weights_that_follow_every_change():
    layer = Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def check():
        with torch.no_grad():
            got = layer(x).float()
            want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()  # bf16 rounding

    with torch.no_grad():
        assert "mkldnn::_reorder_linear_weight" in ops_run(lambda: layer(x))
        assert "mkldnn::_reorder_linear_weight" not in ops_run(lambda: layer(x))  # packed once
    check()
    layer.load_state_dict({"weight": torch.randn(96, 64), "bias": torch.randn(96)})  # in place
    check()
    with torch.no_grad():
        layer.weight.mul_(-2)
    check()
    for _ in range(20):  # new storage, same Parameter; the freed storage's address comes back
        layer.weight.data = torch.randn(96, 64).to(torch.bfloat16)
        check()
        layer.weight.data = torch.randn(96, 64).to(torch.bfloat16)
        layer.weight.data = torch.randn(96, 64).to(torch.bfloat16)
        check()


@needs_onednn
def test_bf16_weights_made_in_inference_mode_work_unpacked():
    from scratchgpt.kernels import _PACKED

    with torch.inference_mode():
        model = sharp_model(seed=8).to(torch.bfloat16).eval()
        idx = torch.randint(0, 384, (1, 8), generator=torch.Generator().manual_seed(4))
        before = len(_PACKED)
        got = model(idx).float()
        assert len(_PACKED) == before  # inference tensors have no version counter to watch
    with torch.no_grad():
        want = sharp_model(seed=8).to(torch.bfloat16).eval()(idx.clone()).float()
    assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()


@needs_onednn
def test_packed_weights_stay_out_of_copies_and_saves_and_go_with_the_model():
    from scratchgpt.kernels import _PACKED

    gc.collect()
    before = len(_PACKED)
    model = sharp_model(seed=7).to(torch.bfloat16).eval()
    idx = torch.randint(0, 384, (1, 8), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(idx)
    assert len(_PACKED) == before + 2 * 6 + 1  # one per Linear
    twin = copy.deepcopy(model)
    torch.save(model.state_dict(), io.BytesIO())
    with torch.no_grad():
        assert torch.equal(twin(idx), want)
    assert len(_PACKED) == before + 2 * (2 * 6 + 1)
    twin.float()  # leaving bf16 drops the packed copies at once
    assert len(_PACKED) == before + 2 * 6 + 1
    del model, twin
    gc.collect()
    assert len(_PACKED) == before


@needs_onednn
def test_training_uses_f_linear_and_gets_exact_gradients():
    layer = Linear(64, 96)
    x = torch.randn(4, 64, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # autograd warns when it backprops through an op without a backward
        assert "mkldnn::_linear_pointwise" not in ops_run(lambda: layer(x).sum().backward())
    expected = torch.ones(4, 96) @ layer.weight
    assert torch.allclose(x.grad, expected, atol=1e-6)


def test_autocast_still_casts_inference_to_bf16():
    layer = Linear(64, 96)
    x = torch.randn(2, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


@needs_onednn
def test_onednn_can_be_switched_off():
    layer = Linear(64, 96)
    x = torch.randn(2, 64)
    torch.backends.mkldnn.enabled = False
    try:
        with torch.no_grad():
            assert "mkldnn::_linear_pointwise" not in ops_run(lambda: layer(x))
    finally:
        torch.backends.mkldnn.enabled = True


def test_model_logits_without_grad_equal_those_with_grad():
    model = sharp_model(seed=4).eval()
    idx = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fast = model(idx)
    recorded = model(idx).detach()
    assert (fast - recorded).abs().max().item() <= 1e-5 * recorded.abs().max().item()


def test_compiled_model_infers_without_grad():
    # inductor cannot lower the oneDNN op from an unfrozen graph: under compile Linear is F.linear
    model = sharp_model(seed=5).eval()
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = torch.compile(model)(idx), model(idx)
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


def test_tied_head_stays_the_embedding_table():
    model = GPTModel(tiny_config(tie_weights=True))
    assert model.out_head.weight is model.tok_emb.weight


def test_bf16_inference_close_to_fp32():
    model = sharp_model(seed=6, context_length=64)
    low = copy.deepcopy(model).to(torch.bfloat16)
    idx = torch.randint(0, 384, (1, 64), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref, got = model(idx), low(idx).float()
    # bf16 keeps 8 bits of mantissa: logits move by a small fraction of their spread
    assert (got - ref).abs().max().item() <= 0.05 * (ref.max() - ref.min()).item()
    out = generate(low, idx[:, :8], max_new_tokens=10, context_size=64)
    assert out.shape == (1, 18) and out.dtype == idx.dtype
