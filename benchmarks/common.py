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

# The independent references the tests use: the seed-style model and the hand-written HF mapping.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import seed_reference  # noqa: E402
from hf_reference import hf_model_from_gpt  # noqa: E402,F401  (re-exported for the benchmarks)


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


def copy_probe(mib: int = 512, copies: int = 5) -> tuple[Callable[[], object], int]:
    """A function that copies a `mib` MiB tensor `copies` times, and the bytes it moves
    (read + written). Timed among the contenders by `interleaved`, it samples the copy
    bandwidth the machine offered while they ran: on these shared machines it drifts,
    and now and then reads 1.5x its usual value for a few seconds, so one sample taken
    after the runs can be far off the bandwidth they saw."""
    src = torch.ones(mib * 2**20 // 4)
    dst = torch.empty_like(src)

    def copy() -> None:
        for _ in range(copies):
            dst.copy_(src)

    return copy, 2 * src.numel() * src.element_size() * copies


def matmul_peak_gflops(dtype: torch.dtype = torch.float32, n: int = 2048, repeats: int = 7) -> float:
    """Measured matmul throughput (2 n^3 flops per n x n product), the MFU denominator: the
    faster of `torch.mm` (MKL for fp32 on CPU) and oneDNN's matmul, which on the AMD CPUs
    we use is ~1.4x faster in fp32, so that MFU is not flattered by the slower library."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    products = [lambda: a @ b]
    if hasattr(torch.ops.mkldnn, "_linear_pointwise") and torch.backends.mkldnn.is_available():
        products.append(lambda: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], ""))
    best = 0.0
    for product in products:
        product()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            product()
            times.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / median(times) / 1e9)
    return best


def seed_model_from_gpt(model) -> seed_reference.GPTModel:
    """The seed-style model holding `model`'s weights (the state_dict keys are the same);
    a tied `model` gives a tied seed model (its head assigned the token embedding)."""
    cfg = model.cfg.to_dict()
    tied = cfg.pop("tie_weights", False)
    seed = seed_reference.GPTModel(cfg)
    seed.load_state_dict(model.state_dict())
    if tied:
        seed.out_head.weight = seed.tok_emb.weight
    return seed
