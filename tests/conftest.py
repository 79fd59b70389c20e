"""Shared fixtures. Tests never reach the network: tiktoken's download is disabled here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ["SCRATCHGPT_OFFLINE"] = "1"
torch.set_num_threads(min(2, torch.get_num_threads()))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"
TESTS = Path(__file__).resolve().parent
MINI = TESTS / "fixtures" / "gpt2-mini-tf"  # the small TF fixture, copied here so it works without ../shared


def shared_path(*parts: str) -> Path:
    """A path under ../shared/fixtures, or skip the test saying why."""
    path = FIXTURES.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (../shared is beside the checkout in CI, not on a fresh clone)")
    return path


def gpt2_fixture(name: str) -> Path:
    """A TensorFlow fixture folder: the copy in tests/ for gpt2-mini-tf, ../shared for the others."""
    return MINI if name == "gpt2-mini-tf" else shared_path(name)


@pytest.fixture(scope="session")
def tokenizer():
    """The GPT-2 tokenizer; skips with the fix when no vocabulary is provisioned."""
    from scratchgpt.tokenizer import VocabularyNotFound, get_tokenizer

    try:
        return get_tokenizer()
    except VocabularyNotFound as exc:
        if os.environ.get("CI"):  # CI provisions the vocabulary: its absence there is a failure
            pytest.fail(str(exc))
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def one_thread():
    """Small models run as fast on one thread, and a second thread waiting for a busy core at every
    operator made forward passes up to 100x slower on the shared 2-core machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def decode_kernels():
    """torch.ops.scratchgpt_cpu (csrc/), built (or loaded from the cache) once; skips where it cannot be."""
    import platform

    from scratchgpt.kernels import decode_ops

    if platform.machine().lower() not in ("x86_64", "amd64") or torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip(f"the decode kernels need an x86 CPU with AVX-512 (this one: {platform.machine()}, "
                    f"{torch.backends.cpu.get_cpu_capability()})")
    loaded = decode_ops()
    if loaded is None:
        pytest.skip("the decode kernels could not be built here (no C++ compiler or ninja): see the warning")
    return loaded
