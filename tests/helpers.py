"""Small models for tests: random weights large enough that every parameter matters."""

from __future__ import annotations

import contextlib

import torch

from scratchgpt import GPTModel


def tiny_config(**overrides) -> dict:
    """A seed-style config small enough to run in milliseconds."""
    cfg = {"vocab_size": 384, "context_length": 32, "emb_dim": 48, "n_heads": 4,
           "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}
    cfg.update(overrides)
    return cfg


def sharp_model(seed: int = 0, **overrides) -> GPTModel:
    """A GPTModel whose weights are 10x GPT-2's init scale (as the TF fixtures do), so that
    attention is sharp and greedy decoding does not collapse into one repeated token."""
    torch.manual_seed(seed)
    model = GPTModel(tiny_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.scale", "norm2.scale", "final_norm.scale")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            elif "emb" in name:
                p.copy_(0.02 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model.eval()


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread here. Beside another busy process (a server under test) on 2 cores,
    OpenMP's spinning workers can make a multi-threaded main thread many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
