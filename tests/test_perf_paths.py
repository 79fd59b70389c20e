"""The fast paths stay correct: oneDNN inference in `Linear`, the bf16 inference mode, int8 weights,
compiled decode steps and ragged batches, each against the plain PyTorch path (kernels switched off)."""

from __future__ import annotations

import copy
import gc
import io
import os
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import byte_text_ids, ops_run, plain_pytorch, sharp_model, tiny_config, trained_model
from scratchgpt import GPTModel, KVCache, generate, quantize_model
from scratchgpt.kernels import _ONEDNN_LINEAR, Linear, compiled_decoder

pytestmark = pytest.mark.usefixtures("one_thread")

needs_onednn = pytest.mark.skipif(not _ONEDNN_LINEAR, reason="oneDNN linear is used on x86 CPUs only")


@pytest.fixture
def without_decode_kernels():
    """This process as on a machine where the decode kernels cannot be built (no AVX-512, no
    compiler): oneDNN then decodes too, with the packed weight copies these tests follow."""
    from scratchgpt import kernels

    previous, kernels._decode_ops = kernels._decode_ops, False
    yield
    kernels._decode_ops = previous


def test_every_linear_layer_is_the_fast_linear_with_seed_shapes():
    model = GPTModel(tiny_config())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 6 * 2 + 1
    for module in linears:
        assert type(module) is Linear
        assert module.weight.shape == (module.out_features, module.in_features)
        assert module.weight.is_contiguous()


@needs_onednn
@pytest.mark.parametrize("shape", [(3, 5, 64), (40, 64)])  # a few rows go to the decode kernel (test_decode_kernels.py)
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
@pytest.mark.usefixtures("without_decode_kernels")
def test_bf16_inference_uses_packed_weights_that_follow_every_change():
    layer = Linear(64, 96).to(torch.bfloat16)
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

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
@pytest.mark.usefixtures("without_decode_kernels")
def test_fp32_inference_packs_weights_for_a_few_rows_only():
    from scratchgpt.kernels import _PACKED, PACK_ROWS

    layer = Linear(64, 96)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        assert "mkldnn::_reorder_linear_weight" not in ops_run(lambda: layer(torch.randn(1, 1, 64, generator=g)))
        assert "mkldnn::_reorder_linear_weight" not in ops_run(lambda: layer(torch.randn(PACK_ROWS + 1, 64, generator=g)))
        assert layer.weight not in _PACKED
        for rows in (2, 8, PACK_ROWS):  # a batch of decoding sequences: packed once, then reused
            x = torch.randn(rows, 1, 64, generator=g)
            ops = ops_run(lambda: layer(x))
            assert ("mkldnn::_reorder_linear_weight" in ops) == (rows == 2), rows
            got, want = layer(x), F.linear(x, layer.weight, layer.bias)
            assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
        layer.weight.mul_(-1)  # a changed weight is packed again
        x = torch.randn(4, 64, generator=g)
        assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5)


@needs_onednn
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.usefixtures("without_decode_kernels")
def test_packed_weights_follow_optimizer_steps(dtype, fused):
    """Fused AdamW updates weights without bumping their version counters: the packed copies
    must follow it anyway (a stale copy would sample from the untrained model)."""
    layer = Linear(64, 96).to(dtype)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.5, fused=fused)
    x = torch.randn(12, 64, generator=torch.Generator().manual_seed(0)).to(dtype)  # packed (more than DECODE_ROWS)
    for _ in range(3):
        with torch.no_grad():
            got = layer(x).float()  # packs (or reuses) the weight
            want = F.linear(x.float(), layer.weight.float(), layer.bias.float())
        assert (got - want).abs().max().item() <= 0.02 * want.abs().max().item()
        layer(x).float().square().sum().backward()
        optimizer.step()
        optimizer.zero_grad()


@needs_onednn
@pytest.mark.usefixtures("without_decode_kernels")
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
@pytest.mark.usefixtures("without_decode_kernels")
def test_packed_weights_stay_out_of_copies_and_saves_and_go_with_the_model():
    from scratchgpt.kernels import _PACKED

    gc.collect()
    before = len(_PACKED)
    model = sharp_model(seed=7).to(torch.bfloat16).eval()
    idx = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(3))  # more than DECODE_ROWS
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
@pytest.mark.parametrize("shape", [(4, 64), (2, 3, 64)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("trained", ["all", "input only", "weights only"])
def test_fp32_training_goes_through_onednn_with_the_gradients_of_f_linear(shape, bias, trained):
    g = torch.Generator().manual_seed(0)
    layer = Linear(64, 96, bias=bias)
    layer.requires_grad_(trained != "input only")
    x = torch.randn(shape, generator=g, requires_grad=trained != "weights only")
    upstream = torch.randn(*shape[:-1], 96, generator=g)
    params = [t for t in (x, layer.weight, layer.bias) if t is not None and t.requires_grad]

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # autograd warns when it backprops through an op without a backward
        ops = ops_run(lambda: layer(x).backward(upstream))
    assert "mkldnn::_linear_pointwise" in ops
    assert "mkldnn::_reorder_linear_weight" not in ops  # trained weights change every step: never packed
    out = layer(x)
    grads = torch.autograd.grad(out, params, upstream)
    want_out = F.linear(x, layer.weight, layer.bias)
    want_grads = torch.autograd.grad(want_out, params, upstream)
    assert (out - want_out).abs().max().item() <= 1e-5 * want_out.abs().max().item()
    for got, want in zip(grads, want_grads):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()


@needs_onednn
def test_training_under_autocast_or_with_kernels_off_uses_f_linear():
    layer = Linear(64, 96)
    x = torch.randn(4, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "mkldnn::_linear_pointwise" not in ops_run(lambda: layer(x).float().sum().backward())
    with plain_pytorch():
        assert "mkldnn::_linear_pointwise" not in ops_run(lambda: layer(x).sum().backward())


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("tied", [True, False])
def test_a_training_step_equals_the_plain_path(qkv_bias, tied):
    """oneDNN products, the stacked query/key/value product and the chunked loss, together,
    against plain PyTorch: the same loss and the same gradient for every parameter."""
    from scratchgpt.train import calc_loss_batch

    model = sharp_model(seed=5, qkv_bias=qkv_bias, tie_weights=tied).train()
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 384, (3, 17), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = calc_loss_batch(x, y, model, "cpu")
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}

    fast_loss, fast = loss_and_grads()
    assert "aten::cat" in ops_run(lambda: model(x))  # query, key and value stacked into one product
    with plain_pytorch():
        plain_loss, plain = loss_and_grads()
        assert "aten::cat" not in ops_run(lambda: model(x))
    assert fast_loss == pytest.approx(plain_loss, rel=1e-6)
    assert fast.keys() == plain.keys()
    for name in plain:
        scale = plain[name].abs().max().item()
        # + 1e-7: the key bias's true gradient is 0 (softmax ignores it), so both are rounding noise
        assert (fast[name] - plain[name]).abs().max().item() <= 1e-5 * scale + 1e-7, name


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
    # under compile Linear's oneDNN product is one custom op (inductor's lowering wants frozen weights)
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


# --------------------------------------------------------------------------- every fast path against plain eager

# Largest logit difference from the plain path, as a fraction of the plain logits' spread (max - min),
# on the trained test model. bf16 and int8 round differently on the fast path (packed bf16 products
# accumulate in another order; the int8 kernel takes bf16 activations); the rest only reorder fp32 sums.
TOLERANCE = {"fp32": 1e-4, "bf16": 0.01, "int8": 0.01}
FORMATS = {"fp32": lambda m: m, "bf16": lambda m: m.to(torch.bfloat16), "int8": quantize_model}


@pytest.fixture
def kernels_off():
    with plain_pytorch():
        yield


def prompts_of(lengths: list[int]) -> list[torch.Tensor]:
    held_out = byte_text_ids()[1]
    return [held_out[1000 * i:1000 * i + n] for i, n in enumerate(lengths)]


def assert_greedy_agrees(got: torch.Tensor, want: torch.Tensor, reference: torch.nn.Module,
                         tolerance: float) -> None:
    """Greedy continuations `got` equal `want`, the reference model's own, token for token, or part
    only at a near-tie: a step where the reference's top two logits are within 2 x `tolerance` x their
    spread, where a path whose logits are within that tolerance may rightly pick either."""
    with torch.no_grad():
        logits = reference(want[:, :-1]).float()
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[..., 0] - top2[..., 1]) / (logits.amax(-1) - logits.amin(-1))
    for row in range(want.shape[0]):
        differ = (got[row] != want[row]).nonzero()
        if len(differ):
            step = int(differ[0])
            assert margins[row, step - 1] <= 2 * tolerance, (
                f"row {row} parts from the reference at position {step}, where the reference's top two logits "
                f"are {margins[row, step - 1]:.4f} of the spread apart (tolerance {tolerance})")


def logits_along(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).float()


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_fast_paths_agree_with_the_plain_path_on_a_trained_model(fmt):
    model = FORMATS[fmt](trained_model())
    prompts = torch.stack(prompts_of([16] * 4))
    fast = generate(model, prompts, 32, 64)
    with torch.no_grad():
        ops = ops_run(lambda: model(prompts))
    with plain_pytorch():
        plain = generate(model, prompts, 32, 64)
        want = logits_along(model, fast)
        assert ops_run(lambda: logits_along(model, prompts)).isdisjoint(
            {"mkldnn::_linear_pointwise", "aten::_weight_int8pack_mm", "scratchgpt_cpu::decode_matmul"})
        assert_greedy_agrees(fast, plain, model, TOLERANCE[fmt])
    assert ({"fp32": "mkldnn::_linear_pointwise", "bf16": "mkldnn::_linear_pointwise",
             "int8": "aten::_weight_int8pack_mm"}[fmt]) in ops
    got = logits_along(model, fast)
    assert (got - want).abs().max().item() <= TOLERANCE[fmt] * (want.max() - want.min()).item()


def test_the_switch_turns_every_fast_path_off(kernels_off):
    idx = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    for fmt in FORMATS:
        model = FORMATS[fmt](trained_model())
        with torch.no_grad():
            ops = ops_run(lambda: model(idx)) | ops_run(lambda: generate(model, idx, 3, 64))
        assert ops.isdisjoint({"mkldnn::_linear_pointwise", "mkldnn::_reorder_linear_weight",
                               "aten::_weight_int8pack_mm", "scratchgpt_cpu::decode_matmul",
                               "scratchgpt_cpu::decode_attention", "scratchgpt_cpu::decode_step"}), fmt
    code = "from scratchgpt import kernels; print(kernels.enabled())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SCRATCHGPT_KERNELS": "0"}).stdout.strip()
    assert out == "False"


def ragged_decode(model: torch.nn.Module, prompts: list[torch.Tensor], steps: int, compile: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy decoding of sequences of different lengths together: each prompt is prefilled into its own
    row of one KVCache, then every step appends one token to every row. Returns tokens [B, steps] and the
    logits of each step [B, steps, V]."""
    cache = KVCache(model, len(prompts), max(len(p) for p in prompts) + steps)
    with torch.no_grad():
        last = torch.cat([model(p[None], cache=cache.rows(i, i + 1), logits_from=-1)
                          for i, p in enumerate(prompts)])  # [B, 1, V]
        tokens, logits = [], []
        for _ in range(steps):
            token = last[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
            last = compiled_decoder(model)(token, cache) if compile else model(token, cache=cache, logits_from=-1)
            logits.append(last.float())
    return torch.cat(tokens, 1), torch.cat(logits, 1)


@pytest.mark.parametrize("fmt", ["fp32", "bf16", "int8"])
def test_ragged_batch_decode_equals_each_sequence_alone(fmt):
    model = FORMATS[fmt](trained_model())
    prompts = prompts_of([5, 16, 9, 12])
    tokens, logits = ragged_decode(model, prompts, 12)
    for i, prompt in enumerate(prompts):
        alone_tokens, alone_logits = ragged_decode(model, [prompt], 12)
        assert torch.equal(tokens[i], alone_tokens[0])
        # a batch changes only the order of fp32 sums (and for int8 the kernel's blocking); in bf16
        # that can move a rounded activation by one bf16 step
        tolerance = TOLERANCE["bf16"] if fmt == "bf16" else 1e-4
        assert (logits[i] - alone_logits[0]).abs().max().item() <= tolerance * spread_of(alone_logits)


def spread_of(logits: torch.Tensor) -> float:
    return (logits.max() - logits.min()).item()


def test_compiled_decoding_equals_eager_and_compiles_once():
    import torch._dynamo

    model = trained_model()
    prompts = prompts_of([5, 16, 9])
    eager_tokens, eager_logits = ragged_decode(model, prompts, 10)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    tokens, logits = ragged_decode(model, prompts, 10, compile=True)
    assert torch.equal(tokens, eager_tokens)
    assert (logits - eager_logits).abs().max().item() <= TOLERANCE["fp32"] * spread_of(eager_logits)
    # generate's cache has the same shape (3 rows, 16 + 10 positions): the same graph serves it
    same = torch.stack(prompts_of([16, 16, 16]))
    assert torch.equal(generate(model, same, 10, 64, compile=True), generate(model, same, 10, 64))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1  # not one per step
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None  # the decoder kept for the model does not keep the model


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["bf16", "int8"])
def test_compiled_decoding_equals_eager_in_bf16_and_int8(fmt):
    model = FORMATS[fmt](trained_model())
    prompts = prompts_of([5, 16, 9])
    eager_tokens, eager_logits = ragged_decode(model, prompts, 10)
    tokens, logits = ragged_decode(model, prompts, 10, compile=True)
    assert torch.equal(tokens, eager_tokens)
    assert (logits - eager_logits).abs().max().item() <= TOLERANCE[fmt] * spread_of(eager_logits)
