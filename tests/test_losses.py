"""The chunked head + cross-entropy against the plain path: logits from the model, then F.cross_entropy.

Real batches: the GPT-2 tokens of the Python docs, GPT-2's full vocabulary (so that the
logits are the wide [N, 50257] rows the chunking exists for), some targets -100 as
instruction fine-tuning masks them. Gradients are compared for every parameter.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from scratchgpt import GPTModel
from scratchgpt.data import builtin_corpus
from scratchgpt.losses import chunked_head_cross_entropy, logits_cross_entropy, vocab_head
from scratchgpt.train import calc_loss_batch

VOCAB = 50257


def real_batch(tokenizer, rows: int = 4, tokens: int = 32, masked: bool = True):
    """Inputs and targets [rows, tokens] from the docs; with `masked`, the first tokens of every
    other row are -100 (a prompt, as the instruction collate masks it) and one row is all -100."""
    ids = torch.tensor(tokenizer.encode(builtin_corpus("pydoc")[:20000])[: rows * (tokens + 1)])
    chunk = ids.view(rows, tokens + 1)
    inputs, targets = chunk[:, :-1].clone(), chunk[:, 1:].clone()
    if masked:
        targets[::2, :tokens // 3] = -100
        targets[1] = -100
    return inputs, targets


def model_with_sharp_head(tied: bool, seed: int = 0) -> GPTModel:
    """A small GPTModel over GPT-2's vocabulary whose logits spread over several nats, not a near-uniform guess."""
    torch.manual_seed(seed)
    model = GPTModel({"vocab_size": VOCAB, "context_length": 32, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
                      "drop_rate": 0.0, "qkv_bias": True, "tie_weights": tied})
    with torch.no_grad():
        model.out_head.weight.normal_(0, 0.5)
    return model.train()


def loss_and_grads(model: nn.Module, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def plain_loss(model, inputs, targets):
    return F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())  # ignore_index=-100, the default


def assert_grads_close(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for name in want:
        diff = (got[name] - want[name]).abs().max().item()
        assert diff <= atol, f"{name}: gradients differ by {diff:.3g}"


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_calc_loss_batch_equals_logits_and_cross_entropy(tokenizer, tied):
    model = model_with_sharp_head(tied)
    inputs, targets = real_batch(tokenizer)
    assert vocab_head(model) is model.out_head  # the chunked path is the one under test
    want_loss, want = loss_and_grads(model, lambda: plain_loss(model, inputs, targets))
    got_loss, got = loss_and_grads(model, lambda: calc_loss_batch(inputs, targets, model, "cpu"))
    assert abs(got_loss.item() - want_loss.item()) <= 1e-5
    assert 2.0 < want_loss.item() < 30.0  # a real spread of logits, not ln(V) everywhere
    assert_grads_close(got, want, atol=1e-5)
    with torch.no_grad():  # evaluation takes the loss-only path
        assert abs(calc_loss_batch(inputs, targets, model, "cpu").item() - want_loss.item()) <= 1e-5


@pytest.mark.parametrize("chunk_rows", [1, 5, 64, 1000])
def test_every_chunking_gives_the_plain_loss_and_gradients(tokenizer, chunk_rows):
    model = model_with_sharp_head(tied=False)
    inputs, targets = real_batch(tokenizer)
    with torch.no_grad():
        hidden0 = model(inputs, return_hidden=True)
    weight0 = model.out_head.weight.detach()

    def run(fn):
        hidden, weight = hidden0.clone().requires_grad_(), weight0.clone().requires_grad_()
        loss = fn(hidden, weight)
        return (loss.detach(), *torch.autograd.grad(loss, (hidden, weight)))

    want = run(lambda h, w: logits_cross_entropy(F.linear(h, w), targets))
    got = run(lambda h, w: chunked_head_cross_entropy(h, w, targets, chunk_rows=chunk_rows))
    for name, g, w in zip(("loss", "hidden", "weight"), got, want):
        assert (g - w).abs().max().item() <= 1e-5, name


def test_no_target_left_gives_nan_and_zero_gradients_like_cross_entropy():
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    targets = torch.full((6,), -100)
    want = logits_cross_entropy(F.linear(hidden, weight), targets)
    want_grads = torch.autograd.grad(want, (hidden, weight))
    got = chunked_head_cross_entropy(hidden, weight, targets, chunk_rows=4)
    got_grads = torch.autograd.grad(got, (hidden, weight))
    assert torch.isnan(want) and torch.isnan(got)
    for g, w in zip(got_grads, want_grads):
        assert torch.equal(g, w) and not g.any()


def test_bf16_autocast_is_as_close_to_fp32_as_the_plain_bf16_path(tokenizer):
    """The stated bf16 bound: under bf16 autocast the chunked loss is within 0.02 nats of the
    fp32 loss, and each of its gradients is no further from fp32's than the plain bf16 path's
    is (within a factor 2; the head weight's gradient is summed chunk by chunk in bf16)."""
    model = model_with_sharp_head(tied=True)
    inputs, targets = real_batch(tokenizer)
    ref_loss, ref = loss_and_grads(model, lambda: plain_loss(model, inputs, targets))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain_bf16_loss, plain_bf16 = loss_and_grads(model, lambda: plain_loss(model, inputs, targets))
        got_loss, got = loss_and_grads(model, lambda: calc_loss_batch(inputs, targets, model, "cpu"))
    assert abs(got_loss.item() - ref_loss.item()) <= 0.02
    assert abs(got_loss.item() - plain_bf16_loss.item()) <= 0.02
    for name in ref:
        scale = ref[name].abs().max().item()
        err = (got[name] - ref[name]).abs().max().item()
        plain_err = (plain_bf16[name] - ref[name]).abs().max().item()
        assert err <= 2 * plain_err + 1e-3 * scale, f"{name}: {err:.3g} against the plain bf16 {plain_err:.3g}"


def test_bf16_losses_of_two_batches_before_one_backward_get_both_gradients(tokenizer):
    """Under autocast the pass keeps its bf16 copy of the head weight from call to call: a
    second loss computed before the first's backward must not disturb the first's gradients."""
    model = model_with_sharp_head(tied=True)
    (a_in, a_tg), (b_in, b_tg) = real_batch(tokenizer), real_batch(tokenizer, rows=3, tokens=24, masked=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, a = loss_and_grads(model, lambda: calc_loss_batch(a_in, a_tg, model, "cpu"))
        _, b = loss_and_grads(model, lambda: calc_loss_batch(b_in, b_tg, model, "cpu"))
        _, both = loss_and_grads(model, lambda: calc_loss_batch(a_in, a_tg, model, "cpu")
                                 + calc_loss_batch(b_in, b_tg, model, "cpu"))
    for name in both:  # bf16 rounds sums taken in another order differently: 2% of the largest entry
        want = a[name] + b[name]
        assert (both[name] - want).abs().max().item() <= 0.02 * want.abs().max().item() + 1e-6, name
    head = "tok_emb.weight"  # the weight the pass casts: a clobbered copy would miss a batch's whole share
    assert (both[head] - a[head]).abs().max().item() > 0.2 * b[head].abs().max().item()


class LoRAHead(nn.Linear):
    """A head whose forward is not F.linear(x, weight): the chunked loss must not apply it itself."""

    def __init__(self, linear: nn.Linear):
        super().__init__(linear.in_features, linear.out_features, bias=False)
        self.weight = linear.weight
        self.A = nn.Parameter(torch.randn(linear.in_features, 2))
        self.B = nn.Parameter(torch.randn(2, linear.out_features) * 0.1)

    def forward(self, x):
        return super().forward(x) + x @ self.A @ self.B


@pytest.mark.parametrize("head", ["lora", "classifier"])
def test_other_heads_take_the_plain_path(tokenizer, head):
    model = model_with_sharp_head(tied=False)
    inputs, targets = real_batch(tokenizer)
    if head == "lora":
        model.out_head = LoRAHead(model.out_head)
    else:  # the classification fine-tuning swaps the head for one over its classes
        model.out_head = nn.Linear(32, 2)
        targets = torch.where(targets == -100, -100, targets % 2)
    assert vocab_head(model) is None
    want_loss, want = loss_and_grads(model, lambda: plain_loss(model, inputs, targets))
    got_loss, got = loss_and_grads(model, lambda: calc_loss_batch(inputs, targets, model, "cpu"))
    assert torch.equal(got_loss, want_loss)
    assert_grads_close(got, want, atol=0.0)


def test_a_second_backward_fails_clearly():
    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(30, 8, requires_grad=True)
    loss = chunked_head_cross_entropy(hidden, weight, torch.arange(4))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="second time"):
        loss.backward()
