"""Small models for tests: random weights large enough that every parameter matters."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


def ops_run(fn) -> set[str]:
    """Names of the operators `fn()` dispatches, recorded by the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


@contextlib.contextmanager
def plain_pytorch():
    """Every fast path off inside the block (`kernels.set_enabled(False)`): the reference path."""
    from scratchgpt.kernels import set_enabled

    previous = set_enabled(False)
    try:
        yield
    finally:
        set_enabled(previous)


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


TRAINED_CONFIG = {"vocab_size": 256, "context_length": 64, "emb_dim": 64, "n_heads": 4,
                  "n_layers": 2, "drop_rate": 0.0, "qkv_bias": True}


def byte_text_ids() -> tuple[torch.Tensor, torch.Tensor]:
    """The pydoc corpus as UTF-8 byte ids: the first 90% to train on, the rest held out."""
    from scratchgpt.data import builtin_corpus

    ids = torch.frombuffer(bytearray(builtin_corpus("pydoc").encode()), dtype=torch.uint8).long()
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


@functools.lru_cache(maxsize=1)
def _trained_state() -> tuple[tuple[str, torch.Tensor], ...]:
    torch.manual_seed(0)
    model = GPTModel(TRAINED_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    train, _ = byte_text_ids()
    context, batch = TRAINED_CONFIG["context_length"], 16
    generator = torch.Generator().manual_seed(0)
    for _ in range(TRAINED_STEPS):
        starts = torch.randint(0, len(train) - context - 1, (batch,), generator=generator)
        windows = torch.stack([train[s:s + context + 1] for s in starts.tolist()])
        logits = model(windows[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return tuple((k, v.detach().clone()) for k, v in model.state_dict().items())


TRAINED_STEPS = 300


def trained_model() -> GPTModel:
    """A small byte-level GPTModel (vocab 256, 2 layers, 64 wide) trained for a few seconds on the
    pydoc corpus, in eval mode: a fresh copy each call. Trained, its top logits stand apart, so a
    fast path that changes them slightly still picks the same greedy tokens; random weights give
    near-ties that any rounding decides."""
    model = GPTModel(TRAINED_CONFIG)
    model.load_state_dict(dict(_trained_state()))
    return model.eval()


# --------------------------------------------------------------------------- `scratchgpt train` as a process

TRAIN_ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}


class TrainCLI:
    """`scratchgpt train` with fixed arguments, run as a real process (resume, kill and LoRA tests)."""

    def __init__(self, *args: str):
        self.args = args

    def command(self, out_dir: Path, *extra: str) -> list[str]:
        return [sys.executable, "-m", "scratchgpt.cli", "train", *self.args, "--out-dir", str(out_dir), *extra]

    def run(self, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        result = subprocess.run(self.command(out_dir, *extra), capture_output=True, text=True, env=TRAIN_ENV,
                                timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        return result

    def start_and_wait_for(self, out_dir: Path, line_start: str, *extra: str) -> subprocess.Popen:
        """Start a training process and return once it printed a line beginning with `line_start`."""
        proc = subprocess.Popen(self.command(out_dir, *extra), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=TRAIN_ENV)
        for line in proc.stdout:
            if line.startswith(line_start):
                return proc
        proc.wait()
        pytest.fail(f"training ended (status {proc.returncode}) before printing {line_start!r}")


def train_metrics(out_dir: Path) -> list[dict]:
    """A run's metrics.jsonl without its timing column (the one thing that differs between runs)."""
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in records]
