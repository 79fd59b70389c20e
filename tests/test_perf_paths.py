"""The fast paths stay correct: transposed weight storage and the bf16 inference mode."""

from __future__ import annotations

import copy
import io

import torch
from torch import nn

from helpers import sharp_model, tiny_config
from scratchgpt import GPTModel, generate


def linear_weights(model: nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in model.modules() if isinstance(m, nn.Linear)]


def is_transposed_storage(w: torch.Tensor) -> bool:
    return w.t().is_contiguous() and not w.is_contiguous()


def test_linear_weights_keep_seed_shapes_but_transposed_storage():
    model = GPTModel(tiny_config())
    for module in model.modules():
        if isinstance(module, nn.Linear):
            assert module.weight.shape == (module.out_features, module.in_features)
            assert is_transposed_storage(module.weight)


def test_tied_head_stays_the_embedding_table():
    model = GPTModel(tiny_config(tie_weights=True))
    assert model.out_head.weight is model.tok_emb.weight


def test_storage_survives_loading_copying_and_casting():
    model = sharp_model(seed=3)
    target = GPTModel(tiny_config())
    target.load_state_dict(model.state_dict())
    for m in (target, copy.deepcopy(model), copy.deepcopy(model).to(torch.bfloat16)):
        assert all(is_transposed_storage(w) for w in linear_weights(m))


def test_state_dict_round_trips_into_contiguous_weights():
    model = sharp_model(seed=4)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    plain = GPTModel(tiny_config())
    for module in plain.modules():  # the layout a seed-style model has
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().contiguous())
    plain.load_state_dict(loaded)
    plain.eval()
    idx = torch.randint(0, 384, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (plain(idx) - model(idx)).abs().max().item() <= 1e-5


def test_training_step_gradients_match_contiguous_weights():
    model = sharp_model(seed=5).train()
    plain = copy.deepcopy(model)
    for module in plain.modules():
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(module.weight.detach().contiguous())
    idx = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(1))
    for m in (model, plain):
        torch.nn.functional.cross_entropy(m(idx).flatten(0, 1), idx.flatten()).backward()
    for a, b in zip(linear_weights(model), linear_weights(plain)):
        assert torch.allclose(a.grad, b.grad, atol=1e-5)


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
