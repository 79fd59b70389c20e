"""generate(): against HF's greedy search and the seed's own loop; cache on and off; filters."""

from __future__ import annotations

import pytest
import torch

import seed_reference
from helpers import sharp_model
from hf_reference import hf_model_from_gpt
from scratchgpt import generate, generate_stream
from scratchgpt.generate import filter_top_k, filter_top_p
from scratchgpt.model import check_token_ids


seed_generate = seed_reference.generate  # the walkthrough's loop: re-runs the last context_size tokens


def prompt(batch=1, length=6, seed=0):
    return torch.randint(0, 384, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_greedy_equals_hugging_face_greedy_search():
    model = sharp_model(seed=5, context_length=64)
    hf = hf_model_from_gpt(model)
    idx = prompt(length=8, seed=3)
    ours = generate(model, idx, max_new_tokens=30, context_size=64)
    with torch.no_grad():
        theirs = hf.generate(idx, max_new_tokens=30, do_sample=False, use_cache=True,
                             attention_mask=torch.ones_like(idx), pad_token_id=383)
    assert len(set(ours[0, 8:].tolist())) > 5  # a real sequence, not one repeated token
    assert torch.equal(ours, theirs)


def test_greedy_with_cropping_equals_the_seed_loop():
    model = sharp_model(seed=6)
    idx = prompt(batch=2, length=12, seed=4)
    expected = seed_generate(model, idx, 40, context_size=20)  # crops from step 9 on
    assert torch.equal(generate(model, idx, 40, context_size=20), expected)
    assert torch.equal(generate(model, idx, 40, context_size=20, use_cache=False), expected)


@pytest.mark.parametrize("options", [
    dict(), dict(temperature=1.0, seed=11), dict(temperature=0.7, top_k=20, seed=12),
    dict(temperature=1.3, top_p=0.8, seed=13)])
def test_cached_and_uncached_give_identical_tokens_past_the_window(options):
    model = sharp_model(seed=7)
    idx = prompt(batch=2, length=10, seed=5)
    cached = generate(model, idx, 50, context_size=32, **options)  # 60 tokens > 32-token window
    uncached = generate(model, idx, 50, context_size=32, use_cache=False, **options)
    assert cached.shape == (2, 60)
    assert torch.equal(cached, uncached)


def test_sampling_is_reproducible_from_a_seed_or_a_generator():
    model = sharp_model(seed=8)
    idx = prompt(seed=6)
    a = generate(model, idx, 20, 32, temperature=1.0, seed=42)
    b = generate(model, idx, 20, 32, temperature=1.0, generator=torch.Generator().manual_seed(42))
    c = generate(model, idx, 20, 32, temperature=1.0, seed=43)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_stream_yields_the_tokens_generate_appends():
    model = sharp_model(seed=9)
    idx = prompt(seed=7)
    streamed = list(generate_stream(model, idx, 15, 32, temperature=0.9, top_k=5, seed=1))
    assert all(t.shape == (1, 1) for t in streamed)
    assert torch.equal(torch.cat([idx, *streamed], 1), generate(model, idx, 15, 32, temperature=0.9, top_k=5, seed=1))


@pytest.mark.parametrize("rows_that_stop", ["all", "some"])
def test_eos_stops_each_row_on_its_own_and_pads_it(rows_that_stop):
    model = sharp_model(seed=10)
    idx = prompt(batch=3, length=5, seed=8)
    free = generate(model, idx, 25, 32)[:, 5:]
    in_every_row = set(free[0].tolist()) & set(free[1].tolist()) & set(free[2].tolist())
    in_some_row = set(free[0].tolist()) - set(free[2].tolist())
    eos = min(in_every_row if rows_that_stop == "all" else in_some_row)
    firsts = [(row == eos).nonzero()[0, 0].item() if (row == eos).any() else None for row in free]
    assert (None in firsts) == (rows_that_stop == "some")
    out = generate(model, idx, 25, 32, eos_id=eos)[:, 5:]
    # the call returns once every row has stopped; that last step is not appended (the seed's break)
    assert out.shape[1] == (25 if None in firsts else max(firsts))
    for row, first in enumerate(firsts):
        if first is None:
            assert torch.equal(out[row], free[row])
        else:
            assert torch.equal(out[row, :first], free[row, :first])
            assert (out[row, first:] == eos).all()


def test_eos_on_one_row_matches_the_seed_break():
    model = sharp_model(seed=10)
    idx = prompt(length=5, seed=8)
    eos = int(generate(model, idx, 25, 32)[0, 5 + 3])
    assert torch.equal(generate(model, idx, 25, 32, eos_id=eos), seed_generate(model, idx, 25, 32, eos_id=eos))


def test_top_k_keeps_exactly_k_even_with_ties_at_the_cut():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 2.0, 0.5]])
    kept = torch.isfinite(filter_top_k(logits, 3))
    assert kept.sum() == 3 and kept[0, 0] and not kept[0, 1] and not kept[0, 5]
    assert torch.isfinite(filter_top_k(logits, 100)).all()  # clamped to the vocabulary
    assert torch.equal(filter_top_k(logits, 1).argmax(), torch.tensor(0))


def test_top_p_keeps_the_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_top_p(logits, 0.5)).tolist() == [[True, False, False, False, False]]
    assert torch.isfinite(filter_top_p(logits, 0.71)).tolist() == [[True, True, True, False, False]]
    assert torch.isfinite(filter_top_p(logits, 1.0)).all()
    tied = torch.zeros(1, 4)  # four equal tokens: a nucleus of 0.5 holds exactly two
    assert torch.isfinite(filter_top_p(tied, 0.5)).sum() == 2


def test_sampling_never_leaves_the_filtered_set():
    model = sharp_model(seed=11)
    idx = prompt(seed=9)
    with torch.no_grad():
        allowed = set(torch.topk(model(idx)[0, -1], 3).indices.tolist())
    firsts = {int(generate(model, idx, 1, 32, temperature=5.0, top_k=3, seed=s)[0, -1]) for s in range(60)}
    assert firsts <= allowed and len(firsts) > 1


def test_large_logits_do_not_overflow():
    model = sharp_model(seed=12)
    with torch.no_grad():
        model.out_head.weight.mul_(1e4)  # logits of order 1e5: a naive exp overflows
    out = generate(model, prompt(seed=10), 5, 32, temperature=0.5, seed=0)
    assert out.shape == (1, 11)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), r"temperature must be >= 0 .* got -0.1"),
    (dict(top_k=0), r"top_k must be >= 1 .* got 0"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\] .* got 0.0"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\] .* got 1.5"),
    (dict(max_new_tokens=-1), r"max_new_tokens must be >= 0, got -1"),
    (dict(context_size=64), r"context_size=64 exceeds the model's context_length=32"),
])
def test_bad_options_raise_naming_value_and_limit(kwargs, message):
    args = dict(max_new_tokens=3, context_size=32)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        generate(sharp_model(), prompt(), **args)


def test_float_ids_are_a_type_error():
    with pytest.raises(TypeError, match="dtype torch.float32"):
        generate(sharp_model(), prompt().float(), 3, 32)


@pytest.mark.parametrize("bad", [384, -1])
def test_ids_outside_the_vocabulary_are_named(bad):
    idx = prompt()
    idx[0, 2] = bad
    with pytest.raises(ValueError, match=f"token id {bad} is outside the model's vocabulary of 384"):
        generate(sharp_model(), idx, 3, 32)


def test_check_token_ids_accepts_an_empty_batch():
    check_token_ids(torch.zeros(0, 5, dtype=torch.long), 384)


def test_zero_new_tokens_returns_the_prompt():
    idx = prompt()
    assert torch.equal(generate(sharp_model(), idx, 0, 32), idx)
