"""Sliding-window perplexity: equal to Hugging Face's on the same weights, every token scored
once with the most context the schedule allows, bits per byte, errors and the `eval` verb."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import sharp_model
from hf_reference import hf_guide_loss, hf_model_from_gpt

from scratchgpt import evaluate_perplexity, save_checkpoint
from scratchgpt.evaluate import sliding_windows

C = 32  # the small models' context length


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread is as fast, and a second one spinning on a busy 2-core
    machine made each forward pass 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in ("assert", "if", "while", "with"))


@pytest.fixture(scope="module")
def gpt2_vocab_model():
    """A tiny GPTModel with GPT-2's vocabulary, so that real text tokenizes into it."""
    return sharp_model(seed=1, vocab_size=50257)


@pytest.fixture(scope="module")
def small_model():
    return sharp_model(seed=2)  # vocab 384, context 32


def random_ids(n: int, seed: int = 0, vocab: int = 384) -> torch.Tensor:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- against Hugging Face

@pytest.mark.parametrize("stride", [12, 16])
def test_equals_hf_perplexity_guide_on_the_same_weights(tokenizer, pydoc_text, gpt2_vocab_model, stride):
    ids = torch.tensor(tokenizer.encode(pydoc_text)[:600])
    hf = hf_model_from_gpt(gpt2_vocab_model)
    want, hf_scored = hf_guide_loss(hf, ids, C, stride)
    got = evaluate_perplexity(gpt2_vocab_model, ids, C, stride, batch_size=8)
    assert got["tokens"] == hf_scored == len(ids) - 1
    assert abs(got["loss"] - want) / want <= 1e-4, (got["loss"], want)
    assert got["perplexity"] == pytest.approx(math.exp(want), rel=1e-4)


def test_hf_guide_loses_a_token_per_window_at_stride_equal_context_and_we_do_not(small_model):
    ids = random_ids(200)
    hf_scored = sum(max(0, min(b + C, 200) - b - 1) for b in range(0, 200, C))  # labels HF scores there
    assert hf_scored < 199
    assert evaluate_perplexity(small_model, ids, C, C)["tokens"] == 199


# --------------------------------------------------------------------------- the window schedule

STRIDES = [1, 2, 7, C // 2, C - 1, C]  # 7 does not divide 32; C - 1 and C both mean back-to-back


def expected_context(i: int, n: int, context_size: int, stride: int) -> int:
    """The rule in words, by brute force: windows of `context_size` tokens (cut at the end of the
    text) start at multiples of the step; a window can score token i if it holds i and at least one
    token before it; the token goes to the window giving it the most left context (i - start).
    The step is the stride, but at most context_size - 1, since a window scores at most that many."""
    step = min(stride, context_size - 1)
    contexts = [i - start for start in range(0, n, step) if start < i < min(start + context_size, n)]
    return max(contexts)


@pytest.mark.parametrize("n", [2, 3, C - 1, C, C + 1, 100, 257])
@pytest.mark.parametrize("stride", STRIDES)
def test_schedule_scores_each_token_once_with_the_most_context(n, stride):
    windows = sliding_windows(n, C, stride)
    scored = [i for w in windows for i in range(w.first_scored, w.end)]
    assert scored == list(range(1, n)), "every token after the first, once, in order"
    for w in windows:
        assert 0 <= w.begin < w.first_scored < w.end <= min(w.begin + C, n)
        for i in range(w.first_scored, w.end):
            assert i - w.begin == expected_context(i, n, C, stride)
    assert all(w.end - w.begin == C for w in windows[:-1])
    if stride < C:
        assert [w.begin for w in windows] == list(range(0, stride * len(windows), stride))


@pytest.mark.parametrize("stride", STRIDES)
def test_token_losses_equal_a_token_by_token_computation(small_model, stride):
    """Each token's loss, recomputed from scratch from exactly its expected left context."""
    n = 90
    ids = random_ids(n, seed=stride)
    got = evaluate_perplexity(small_model, ids, C, stride, batch_size=3, return_token_losses=True)
    assert got["tokens"] == n - 1 and got["token_losses"].shape == (n - 1,)
    contexts = [expected_context(i, n, C, stride) for i in range(1, n)]
    with torch.no_grad():
        brute = torch.stack([
            torch.nn.functional.cross_entropy(small_model(ids[i - c:i][None])[0, -1], ids[i])
            for i, c in zip(range(1, n), contexts)])
    torch.testing.assert_close(got["token_losses"], brute, rtol=1e-5, atol=1e-5)
    assert got["loss"] == pytest.approx(brute.double().mean().item(), rel=1e-6)


def test_stride_equal_context_is_back_to_back_windows_sharing_one_token(small_model):
    ids = random_ids(100)
    assert sliding_windows(100, C, C) == sliding_windows(100, C, C - 1)
    assert [w.begin for w in sliding_windows(100, C, C)] == [0, 31, 62, 93]
    assert evaluate_perplexity(small_model, ids, C, C)["loss"] == \
        evaluate_perplexity(small_model, ids, C, C - 1)["loss"]


def test_smaller_context_than_the_models_and_text_shorter_than_a_window(small_model):
    ids = random_ids(50, seed=3)
    short = evaluate_perplexity(small_model, ids[:10], C, 8, return_token_losses=True)
    assert short["tokens"] == 9 and short["windows"] == 1
    with torch.no_grad():
        whole = torch.nn.functional.cross_entropy(small_model(ids[None, :10])[0, :-1], ids[1:10])
    assert short["loss"] == pytest.approx(whole.item(), rel=1e-5)
    small = evaluate_perplexity(small_model, ids, 8, 3, return_token_losses=True)
    assert small["tokens"] == 49 and small["context_size"] == 8
    assert evaluate_perplexity(small_model, ids[:2], C, 1)["tokens"] == 1


def test_batch_size_does_not_change_the_result(small_model):
    ids = random_ids(150, seed=4)
    results = [evaluate_perplexity(small_model, ids, C, 10, batch_size=b)["loss"] for b in (1, 4, 64)]
    assert results == pytest.approx([results[0]] * 3, rel=1e-6)


def test_accepts_lists_numpy_and_batch_of_one_and_restores_training_mode(small_model):
    ids = random_ids(60, seed=5)
    base = evaluate_perplexity(small_model, ids, C, 16)["loss"]
    for form in (ids.tolist(), ids.numpy().astype(np.uint16), ids[None], ids.to(torch.int32)):
        assert evaluate_perplexity(small_model, form, C, 16)["loss"] == pytest.approx(base, rel=1e-6)
    model = sharp_model(seed=2, drop_rate=0.5).train()  # dropout must be off while evaluating
    assert evaluate_perplexity(model, ids, C, 16)["loss"] == pytest.approx(base, rel=1e-6)
    assert model.training


def test_any_module_giving_logits_works_and_trimming_the_head_changes_nothing(small_model):
    class Wrapped(torch.nn.Module):  # no cfg, no final_norm/out_head: logits of every position
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, idx):
            return self.inner(idx)

    ids = random_ids(120, seed=8)
    direct = evaluate_perplexity(small_model, ids, C, 10, return_token_losses=True)
    wrapped = evaluate_perplexity(Wrapped(small_model), ids, C, 10, return_token_losses=True)
    torch.testing.assert_close(direct["token_losses"], wrapped["token_losses"], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="give context_size"):
        evaluate_perplexity(Wrapped(small_model), ids)


def test_defaults_are_the_models_context_and_half_of_it_as_stride(small_model):
    ids = random_ids(80, seed=6)
    got = evaluate_perplexity(small_model, ids)
    assert (got["context_size"], got["stride"]) == (C, C // 2)
    assert got["loss"] == evaluate_perplexity(small_model, ids, C, C // 2)["loss"]


# --------------------------------------------------------------------------- bits per byte

def test_bits_per_byte_is_total_nats_over_ln2_over_utf8_bytes(tokenizer, gpt2_vocab_model):
    text = "Naïve café — “quoted” 東京 and plain ASCII. " * 6
    ids = tokenizer.encode(text)
    num_bytes = len(text.encode("utf-8"))
    assert num_bytes > len(text)  # multi-byte characters are counted as bytes, not characters
    got = evaluate_perplexity(gpt2_vocab_model, ids, C, 8, num_bytes=num_bytes, return_token_losses=True)
    total_nats = got["token_losses"].double().sum().item()
    assert got["bits_per_byte"] == pytest.approx(total_nats / math.log(2) / num_bytes, rel=1e-6)
    assert got["bits_per_byte"] == pytest.approx(got["loss"] * (len(ids) - 1) / math.log(2) / num_bytes, rel=1e-12)
    assert got["bytes"] == num_bytes
    words = evaluate_perplexity(gpt2_vocab_model, ids, C, 8, num_words=len(text.split()))
    # compare logs: exp() turns the fp32 rounding of the summed losses into a ~1e-6 relative error
    assert math.log(words["word_perplexity"]) == pytest.approx(total_nats / len(text.split()), rel=1e-6)
    assert "bits_per_byte" not in evaluate_perplexity(gpt2_vocab_model, ids, C, 8)


# --------------------------------------------------------------------------- number formats

def test_bf16_autocast_and_bf16_weights_stay_close_to_fp32(small_model):
    ids = random_ids(120, seed=7)
    fp32 = evaluate_perplexity(small_model, ids, C, 16)["loss"]
    autocast = evaluate_perplexity(small_model, ids, C, 16, dtype="bf16")["loss"]
    bf16_model = sharp_model(seed=2).to(torch.bfloat16)
    weights = evaluate_perplexity(bf16_model, ids, C, 16)["loss"]
    assert autocast != fp32  # it really ran in bf16
    assert autocast == pytest.approx(fp32, rel=3e-2)
    assert weights == pytest.approx(fp32, rel=3e-2)


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("ids, kwargs, message", [
    ([], {}, "has 0 token"),
    ([5], {}, "has 1 token"),
    (list(range(50)), {"stride": 0}, "stride must be between 1 and context_size=32, got 0"),
    (list(range(50)), {"stride": 33}, "stride must be between 1 and context_size=32, got 33"),
    (list(range(50)), {"context_size": 64}, "context_size 64 exceeds the model's context_length 32"),
    (list(range(50)), {"context_size": 1, "stride": 1}, "context_size must be at least 2"),
    ([1, 2, 384], {}, "token id 384 is outside the model's vocabulary of 384"),
    ([1, -2, 3], {}, "token id -2 is outside"),
    (list(range(50)), {"num_bytes": 0}, "num_bytes must be a positive byte count"),
    (list(range(50)), {"num_words": 0}, "num_words must be a positive word count"),
    (list(range(50)), {"batch_size": 0}, "batch_size must be at least 1"),
    ([[1, 2], [3, 4]], {}, "one sequence"),
])
def test_bad_inputs_are_clear_errors(small_model, ids, kwargs, message):
    with pytest.raises(ValueError, match=message):
        evaluate_perplexity(small_model, ids, **{"context_size": C, "stride": 8, **kwargs})


# --------------------------------------------------------------------------- command line

def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scratchgpt.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=120)


@pytest.fixture(scope="module")
def eval_checkpoint(tmp_path_factory, gpt2_vocab_model):
    path = tmp_path_factory.mktemp("eval") / "model.pt"
    save_checkpoint(path, gpt2_vocab_model)
    return path


def test_cli_eval_json_equals_the_library(tokenizer, eval_checkpoint, gpt2_vocab_model, tmp_path):
    from scratchgpt.tokenizer import ENDOFTEXT

    first, second = "The with statement wraps a block. ", "Café ünïcode text, a second document."
    (tmp_path / "a.txt").write_text(first, encoding="utf-8")
    (tmp_path / "b.txt").write_text(second, encoding="utf-8")
    result = run_cli("eval", "--checkpoint", str(eval_checkpoint), "--device", "cpu",
                     "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.txt"),
                     "--context-size", "16", "--stride", "5", "--batch-size", "3", "--json")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    ids = tokenizer.encode(first + ENDOFTEXT + second, allowed_special={ENDOFTEXT})
    num_bytes = len((first + second).encode("utf-8"))  # the separator is a token, not text
    want = evaluate_perplexity(gpt2_vocab_model, ids, 16, 5, num_bytes=num_bytes)
    assert got["tokens"] == len(ids) - 1 == want["tokens"]
    assert got["bytes"] == num_bytes
    assert got["words"] == len(first.split()) + len(second.split())
    for key in ("loss", "perplexity", "bits_per_byte"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key

    plain = run_cli("eval", "--checkpoint", str(eval_checkpoint), "--device", "cpu",
                    "--data", str(tmp_path / "a.txt"), "--stride", "40")
    assert plain.returncode == 1
    assert plain.stderr.strip() == "scratchgpt eval: error: stride must be between 1 and context_size=32, got 40"


def test_cli_eval_prints_loss_perplexity_bits_per_byte_and_tokens(eval_checkpoint, tmp_path):
    (tmp_path / "t.txt").write_text("Every effort moves you. " * 8, encoding="utf-8")
    result = run_cli("eval", "--checkpoint", str(eval_checkpoint), "--device", "cpu", "--autocast", "bf16",
                     "--data", str(tmp_path / "t.txt"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["tokens", "loss", "perplexity", "bits", "perplexity"]
    assert lines[0] == "tokens scored        40 (context 32, stride 16: 2 windows)"
