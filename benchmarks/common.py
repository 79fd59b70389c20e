"""Shared pieces of the benchmarks: thread setup, timing, machine limits, and the
Hugging Face / seed-style contenders built with the same weights as a GPTModel.

The machines these run on are small and noisy, so every benchmark interleaves
its contenders (A B C A B C ...), repeats, and reports medians and ratios
measured in the same run, never absolute numbers from another run.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # seed_reference, when run as a script

import seed_reference  # noqa: E402


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def machine_line() -> str:
    cpu = "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
            f"{os.cpu_count()} cores visible")


def interleaved(contenders: dict[str, Callable[[], object]], repeats: int,
                warmup: int = 1) -> dict[str, list[float]]:
    """Time each contender `repeats` times, round-robin, after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in contenders.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def copy_bandwidth_gbs(mib: int = 512, repeats: int = 7) -> float:
    """Memory bandwidth seen by a large tensor copy: (bytes read + bytes written) / time."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = []
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best.append(time.perf_counter() - start)
    return 2 * src.numel() * 4 / median(best) / 1e9


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7) -> float:
    """Measured matmul throughput (2 n^3 flops per n x n product), the MFU denominator."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / median(times) / 1e9


def seed_model_from_gpt(model) -> seed_reference.GPTModel:
    """The seed-style model holding `model`'s weights (the state_dict keys are the same)."""
    cfg = model.cfg.to_dict()
    cfg.pop("tie_weights", None)
    seed = seed_reference.GPTModel(cfg)
    seed.load_state_dict(model.state_dict())
    return seed


def hf_model_from_gpt(model, attn_implementation: str = "sdpa"):
    """transformers.GPT2LMHeadModel computing what `model` computes (its default SDPA attention).

    HF's Conv1D keeps weights as [in, out]; its c_attn is query, key and value
    side by side. A model without qkv biases gets HF's biases set to zero.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    hf_cfg = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim,
        n_layer=cfg.n_layers, n_head=cfg.n_heads, resid_pdrop=cfg.drop_rate,
        embd_pdrop=cfg.drop_rate, attn_pdrop=cfg.drop_rate, layer_norm_epsilon=1e-5,
        activation_function="gelu_new", tie_word_embeddings=cfg.tie_weights,
        bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1,
        attn_implementation=attn_implementation,
    )
    hf = GPT2LMHeadModel(hf_cfg)
    sd = {"transformer.wte.weight": model.tok_emb.weight,
          "transformer.wpe.weight": model.pos_emb.weight,
          "transformer.ln_f.weight": model.final_norm.scale,
          "transformer.ln_f.bias": model.final_norm.shift,
          "lm_head.weight": model.out_head.weight}
    for i, block in enumerate(model.trf_blocks):
        p, att = f"transformer.h.{i}.", block.att
        sd[p + "attn.c_attn.weight"] = torch.cat([att.W_query.weight, att.W_key.weight,
                                                  att.W_value.weight]).T
        if att.W_query.bias is not None:
            sd[p + "attn.c_attn.bias"] = torch.cat([att.W_query.bias, att.W_key.bias, att.W_value.bias])
        else:
            sd[p + "attn.c_attn.bias"] = torch.zeros(3 * cfg.emb_dim)
        sd[p + "attn.c_proj.weight"] = att.out_proj.weight.T
        sd[p + "attn.c_proj.bias"] = att.out_proj.bias
        sd[p + "ln_1.weight"], sd[p + "ln_1.bias"] = block.norm1.scale, block.norm1.shift
        sd[p + "ln_2.weight"], sd[p + "ln_2.bias"] = block.norm2.scale, block.norm2.shift
        sd[p + "mlp.c_fc.weight"] = block.ff.layers[0].weight.T
        sd[p + "mlp.c_fc.bias"] = block.ff.layers[0].bias
        sd[p + "mlp.c_proj.weight"] = block.ff.layers[2].weight.T
        sd[p + "mlp.c_proj.bias"] = block.ff.layers[2].bias
    sd = {k: v.detach().clone().contiguous() for k, v in sd.items()}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert not [k for k in missing if k.endswith(("weight", "bias")) and "attn.bias" not in k], missing
    return hf
