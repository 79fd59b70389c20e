"""int8 weights: the quantization itself, the CPU kernel against dequantize-and-matmul, the quality
of a quantized model against fp32 on a trained model, and quantized state dicts that say what they are."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import byte_text_ids, ops_run, plain_pytorch, sharp_model, tiny_config, trained_model
from scratchgpt import (GPTModel, evaluate_perplexity, generate, load_checkpoint, quantize_model,
                        save_checkpoint)
from scratchgpt.checkpoint import load_model_from_checkpoint
from scratchgpt.kernels import Int8Linear, quantization_of, set_enabled
from scratchgpt.train import train_model_simple

pytestmark = pytest.mark.usefixtures("one_thread")

# int8 logits of the trained test model stay within this fraction of the fp32 logits' spread (max - min);
# measured: 0.4% (per-channel int8 weights, and bf16 activations inside the CPU kernel)
INT8_LOGIT_TOLERANCE = 0.01


@pytest.fixture
def kernels_off():
    with plain_pytorch():
        yield


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return byte_text_ids()[1][:6000]


def spread(logits: torch.Tensor) -> float:
    return (logits.max() - logits.min()).item()


# --------------------------------------------------------------------------- the quantization

def test_every_linear_layer_head_included_becomes_int8_and_the_embeddings_stay_float():
    model = GPTModel(tiny_config(tie_weights=True))
    assert quantize_model(model, "int8") is model and not model.training
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 2 * 6 + 1 and isinstance(model.out_head, Int8Linear)
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert model.tok_emb.weight.dtype == torch.float32  # the lookup stays float...
    assert model.out_head.weight_int8.data_ptr() != model.tok_emb.weight.data_ptr()  # ...the tied head has its copy
    assert quantization_of(model.state_dict()) == "int8"
    with pytest.raises(ValueError, match="already int8-quantized"):
        quantize_model(model, "int8")
    with pytest.raises(ValueError, match="unknown quantization 'int4'"):
        quantize_model(GPTModel(tiny_config()), "int4")


def test_int8_weights_are_symmetric_per_output_channel_within_half_a_step():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight[3] = 0  # an all-zero row stays zero
        linear.weight[5, 7] = 9.0  # an outlier widens only its own row's step
    layer = Int8Linear.from_linear(linear)
    w = linear.weight.detach()
    assert layer.weight_int8.dtype == torch.int8 and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_scale[[0, 5]], w[[0, 5]].abs().amax(dim=1) / 127)
    assert layer.weight_int8.abs().max().item() == 127 and layer.weight_int8.min().item() >= -127
    assert torch.equal(layer.weight_int8[3], torch.zeros(64, dtype=torch.int8))
    error = (layer.dequantized_weight() - w).abs()
    assert (error <= layer.weight_scale[:, None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(layer.bias, linear.bias.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(3, 5, 64), (2, 6, 64), (40, 64)])  # a few rows: test_decode_kernels.py
@pytest.mark.parametrize("bias", [True, False])
def test_cpu_kernel_equals_dequantize_and_matmul(dtype, shape, bias):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(nn.Linear(64, 96, bias=bias)).to(dtype)
    x = torch.randn(shape).to(dtype)
    with torch.no_grad():
        assert "aten::_weight_int8pack_mm" in ops_run(lambda: layer(x))
        got = layer(x)
        weight = layer.dequantized_weight()
        want = F.linear(x.float(), weight, None if layer.bias is None else layer.bias.float())
        size = x.float().abs() @ weight.abs().T + (0 if layer.bias is None else layer.bias.float().abs())
    assert got.dtype == dtype and got.shape == want.shape
    # the kernel works in bf16: activations, product and bias add each round by at most 2^-9 relative
    assert ((got.float() - want).abs() <= 2**-7 * size).all()


def test_widths_the_kernel_cannot_read_and_the_switched_off_kernel_use_the_reference(kernels_off):
    layer = Int8Linear.from_linear(nn.Linear(64, 96))
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert "aten::_weight_int8pack_mm" not in ops_run(lambda: layer(x))
        assert torch.equal(layer(x), F.linear(x, layer.dequantized_weight(), layer.bias))
    set_enabled(True)
    odd = Int8Linear.from_linear(nn.Linear(20, 7))  # the kernel reads 16 columns at a time
    x = torch.randn(12, 20)  # more rows than the decode kernel takes
    with torch.no_grad():
        assert "aten::_weight_int8pack_mm" not in ops_run(lambda: odd(x))
        assert torch.equal(odd(x), F.linear(x, odd.dequantized_weight(), odd.bias))


def test_casting_the_model_keeps_int8_weights_and_fp32_scales():
    model = quantize_model(sharp_model(seed=1)).to(torch.bfloat16)
    layer = model.trf_blocks[0].ff.layers[0]
    assert (layer.weight_int8.dtype, layer.weight_scale.dtype, layer.bias.dtype) == (
        torch.int8, torch.float32, torch.bfloat16)
    idx = torch.randint(0, 384, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert model(idx).dtype == torch.bfloat16
        assert torch.equal(copy.deepcopy(model)(idx), model(idx))


# --------------------------------------------------------------------------- quality on a trained model

def test_int8_logits_and_perplexity_stay_close_to_fp32_and_bf16_closer(held_out):
    fp32, int8, bf16 = trained_model(), quantize_model(trained_model()), trained_model().to(torch.bfloat16)
    windows = held_out[:4 * 64].view(4, 64)
    with torch.no_grad():
        want, got = fp32(windows), int8(windows)
    assert (got - want).abs().max().item() <= INT8_LOGIT_TOLERANCE * spread(want)
    ppl = {name: evaluate_perplexity(model, held_out, 64, 32)["perplexity"]
           for name, model in (("fp32", fp32), ("int8", int8), ("bf16", bf16))}
    assert ppl["fp32"] < 20  # trained: a byte-level model at chance would give 256
    assert ppl["int8"] <= 1.01 * ppl["fp32"], ppl
    assert ppl["bf16"] <= 1.005 * ppl["fp32"], ppl


def test_int8_greedy_tokens_agree_with_fp32(held_out):
    from test_perf_paths import assert_greedy_agrees

    fp32, int8 = trained_model(), quantize_model(trained_model())
    prompts = torch.stack([held_out[i:i + 16] for i in (0, 1500, 3000, 4500)])
    want = generate(fp32, prompts, 32, 64)
    assert_greedy_agrees(generate(int8, prompts, 32, 64), want, fp32, INT8_LOGIT_TOLERANCE)


# --------------------------------------------------------------------------- state dicts and training

def test_quantized_state_dicts_refuse_float_models_and_back(tmp_path):
    float_model = sharp_model(seed=2)
    quantized = quantize_model(sharp_model(seed=2))
    with pytest.raises(ValueError, match="holds int8-quantized weights, which a float model cannot load"):
        float_model.load_state_dict(quantized.state_dict())
    with pytest.raises(ValueError, match="holds float weights, which an int8-quantized model cannot load"):
        quantized.load_state_dict(float_model.state_dict())
    save_checkpoint(tmp_path / "int8.pt", quantized)
    save_checkpoint(tmp_path / "float.pt", float_model)
    with pytest.raises(ValueError, match=r"int8\.pt holds int8 weights but the model is float"):
        load_checkpoint(tmp_path / "int8.pt", sharp_model(seed=3))
    with pytest.raises(ValueError, match=r"int8\.pt holds int8 weights but the model is float"):
        load_model_from_checkpoint(tmp_path / "int8.pt")
    with pytest.raises(ValueError, match=r"float\.pt holds float weights but the model is int8"):
        load_checkpoint(tmp_path / "float.pt", quantize_model(sharp_model(seed=3)))
    twin = quantize_model(sharp_model(seed=3))  # int8 into int8 loads
    load_checkpoint(tmp_path / "int8.pt", twin)
    idx = torch.randint(0, 384, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(twin(idx), quantized(idx))


def test_training_a_quantized_model_is_refused():
    model = quantize_model(sharp_model(seed=2))
    batch = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(0))
    loader = [(batch[:, :-1], batch[:, 1:])]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(RuntimeError, match="int8-quantized layers are for inference only"):
        train_model_simple(model, loader, loader, optimizer, "cpu", num_epochs=1, eval_freq=1, eval_iter=1,
                           start_context="", tokenizer=None)


# --------------------------------------------------------------------------- the command line

def test_generate_and_eval_quantize_int8(tmp_path, tokenizer, capsys):
    from scratchgpt import cli

    model = sharp_model(seed=1, vocab_size=50257)
    save_checkpoint(tmp_path / "m.pt", model)
    prompt = "The with statement"
    assert cli.main(["generate", "--checkpoint", str(tmp_path / "m.pt"), "--quantize", "int8",
                     "--max-new-tokens", "12", prompt]) == 0
    printed = capsys.readouterr().out
    idx = torch.tensor([tokenizer.encode(prompt)])
    want = generate(quantize_model(model), idx, 12, 32)
    assert printed == tokenizer.decode(want[0].tolist()) + "\n"

    text = tmp_path / "t.txt"
    text.write_text("The with statement is used to wrap the execution of a block. " * 8)
    results = {}
    for extra in ([], ["--quantize", "int8"]):
        assert cli.main(["eval", "--checkpoint", str(tmp_path / "m.pt"), "--data", str(text), "--json",
                         *extra]) == 0
        results[bool(extra)] = json.loads(capsys.readouterr().out)
    assert results[True]["tokens"] == results[False]["tokens"]
    assert results[True]["loss"] == pytest.approx(results[False]["loss"], rel=0.01)
    assert results[True]["loss"] != results[False]["loss"]  # it did run the int8 model
