"""The training loss, next-token cross-entropy, two ways: from logits, or in chunks from the hidden states.

`logits_cross_entropy` is the plain path and the reference: the head's logits
[B, T, V] for every position, then `F.cross_entropy`. For GPT-2 at 2 x 256 tokens
the logits are 2 x 256 x 50257 floats, 103 MB in fp32, and that path writes and
reads such tensors several times a step (logits, log-softmax, their gradients).

`chunked_head_cross_entropy` gives the same loss and the same gradients without
them. It takes the final hidden states [B, T, E] and the head's weight [V, E], and
for one chunk of rows at a time computes the logits, the log-softmax, the loss and,
at once, the gradient of the mean loss with respect to those rows' hidden states
and the head weight (softmax minus one-hot, times 1/n, times the weight or the
hidden states). It keeps only those two gradients, [N, E] and [V, E]; `backward`
just multiplies them by the incoming gradient. `vocab_head` says where it applies.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.weak import WeakIdKeyDictionary

from .kernels import Linear, matmul_nt
from .model import GPTModel

IGNORE_INDEX = -100  # F.cross_entropy's default: targets to skip (e.g. instruction prompts)

# Heads the chunked loss may apply itself: a product with the weight and nothing else.
# Exact types, so that a subclass overriding `forward` (a LoRA-wrapped head, say) keeps the
# plain path; add a type here when its forward is `F.linear(x, self.weight)`.
CHUNKABLE_HEADS: set[type] = {nn.Linear, Linear}

CHUNK_BYTES = 32 * 2**20  # fp32 logits per chunk (tuned in benchmarks/README.md)


def logits_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of logits [..., V] against targets [...], skipping `ignore_index` targets."""
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), ignore_index=ignore_index)


def vocab_head(model: nn.Module) -> nn.Linear | None:
    """The output head of a GPTModel (unwrapped) if the chunked loss can apply it in its place:
    a Linear of a type in `CHUNKABLE_HEADS`, without bias, onto the model's vocabulary. None for
    anything else (another model, a LoRA-wrapped head, a classification head)."""
    if not isinstance(model, GPTModel):
        return None
    head = model.out_head
    if type(head) in CHUNKABLE_HEADS and head.bias is None and head.out_features == model.cfg.vocab_size:
        return head
    return None


def chunked_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               ignore_index: int = IGNORE_INDEX, chunk_rows: int | None = None) -> torch.Tensor:
    """`logits_cross_entropy(F.linear(hidden, weight), targets)` for hidden [..., E], weight [V, E],
    targets [...], computed `chunk_rows` rows at a time (default: ~CHUNK_BYTES of fp32 logits).

    Under autocast it computes in the autocast dtype, as the head and loss would (the logits in
    that dtype, the softmax in fp32). fp16 takes the plain path: its small per-token gradients
    need the loss scale before they are rounded to fp16, which only the plain backward has.
    """
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype == torch.float16:
            return logits_cross_entropy(F.linear(hidden, weight), targets, ignore_index)
        hidden = hidden.to(dtype)  # a differentiable cast, as autocast's; the weight is cast in the pass
    elif hidden.dtype == torch.float16:
        return logits_cross_entropy(F.linear(hidden, weight), targets, ignore_index)
    elif hidden.dtype != weight.dtype:
        raise TypeError(f"hidden states are {hidden.dtype} but the head weight is {weight.dtype}")
    hidden, targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden states for {targets.shape[0]} targets")
    rows = chunk_rows or _chunk_rows(hidden.shape[0], weight.shape[0])
    with torch.autocast(device, enabled=False):
        if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            return _ChunkedHeadLoss.apply(hidden, weight, targets, ignore_index, rows)
        return _chunked_pass(hidden, weight, targets, ignore_index, rows, False, False)[0]


def _chunk_rows(n: int, vocab: int) -> int:
    """Rows per chunk: about CHUNK_BYTES of fp32 logits, the rows split evenly among the chunks."""
    chunks = math.ceil(n * vocab * 4 / CHUNK_BYTES)
    return max(1, math.ceil(n / max(1, chunks)))


# Under autocast, the head weight cast to the compute dtype, and its gradient's accumulator in
# that dtype, per weight, kept from one step to the next: made afresh each step, such a tensor
# (77 MB in bf16 for GPT-2 124M) costs more in page faults than the copy itself. Both are used
# only within one `_chunked_pass` (the gradient leaves it cast back to the weight's dtype).
_CAST_BUFFERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _cast_buffers(weight: torch.Tensor, dtype: torch.dtype, need_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`weight` cast to `dtype`, and (if `need_grad`: a frozen head needs none) a buffer of that
    shape and dtype for its gradient."""
    cast, grad = _CAST_BUFFERS.get(weight, (None, None))
    if cast is None or cast.dtype != dtype or cast.shape != weight.shape or cast.device != weight.device:
        cast, grad = torch.empty_like(weight, dtype=dtype), None
    if need_grad and grad is None:
        grad = torch.empty_like(cast)
    _CAST_BUFFERS[weight] = (cast, grad)
    cast.copy_(weight.detach())
    return cast, grad


def _chunked_pass(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                  rows: int, need_hidden: bool, need_weight: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The mean loss and, where asked, its gradients w.r.t. hidden [N, E] and weight [V, E],
    computed in hidden's dtype (a weight of another dtype is cast to it, its gradient back)."""
    master = weight
    if weight.dtype != hidden.dtype:
        weight, weight_grad_buffer = _cast_buffers(master, hidden.dtype, need_weight)
    n, vocab = hidden.shape[0], weight.shape[0]
    valid = targets != ignore_index
    count = valid.sum()
    # F.cross_entropy's conventions: the mean over the valid targets; with none, the loss is
    # nan (0 / 0) and the gradients are zero
    inv_count = torch.where(count > 0, 1.0 / count.clamp(min=1), 0.0)
    safe_targets = targets.masked_fill(~valid, 0)[:, None]  # any id, for the gather; masked below
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None  # the first chunk writes it whole
    if need_weight:
        grad_weight = torch.empty_like(weight) if weight is master else weight_grad_buffer
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    rows = min(rows, n)
    fp32 = hidden.dtype == torch.float32
    logp = None if fp32 else hidden.new_empty(rows, vocab, dtype=torch.float32)  # reused by every chunk
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        h, t, v = hidden[start:stop], safe_targets[start:stop], valid[start:stop]
        chunk_logits = matmul_nt(h, weight)  # [rows, V]
        chunk_logp = chunk_logits if fp32 else logp[:stop - start].copy_(chunk_logits)  # fp32
        torch.log_softmax(chunk_logp, -1, out=chunk_logp)  # in place
        total -= torch.where(v, chunk_logp.gather(1, t).squeeze(1), 0.0).sum()
        if not (need_hidden or need_weight):
            continue
        # d(mean loss)/d(logits) = (softmax - one-hot) / count, zero on ignored rows
        grad = chunk_logp.exp_().scatter_add_(1, t, chunk_logp.new_full(t.shape, -1.0))
        scale = (v * inv_count)[:, None]
        grad = grad.mul_(scale)
        if not fp32:  # back to the compute dtype for the products, as autocast's backward does
            grad = chunk_logits.copy_(grad)
        if need_hidden:
            grad_hidden[start:stop] = matmul_nt(grad, weight.t())  # [rows, V] @ [V, E]
        if need_weight:
            if start == 0:
                torch.mm(grad.t(), h, out=grad_weight)  # [V, rows] @ [rows, E]
            else:
                grad_weight.addmm_(grad.t(), h)
    if grad_weight is not None and weight is not master:
        grad_weight = grad_weight.to(master.dtype)  # as autocast's backward casts it
    return total / count, grad_hidden, grad_weight


class _ChunkedHeadLoss(torch.autograd.Function):
    """Forward computes the loss and its gradients together; backward scales the gradients."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, ignore_index, rows):
        loss, grad_hidden, grad_weight = _chunked_pass(hidden, weight, targets, ignore_index, rows,
                                                       ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        ctx.grads = (grad_hidden, grad_weight)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("backward through chunked_head_cross_entropy a second time: its "
                               "gradients were handed out already (compute the loss again)")
        grad_hidden, grad_weight = ctx.grads
        ctx.grads = None  # scaled in place and handed to autograd: no second copy of [V, E]
        if grad_hidden is not None:
            grad_hidden.mul_(grad_loss)
        if grad_weight is not None:
            grad_weight.mul_(grad_loss)
        return grad_hidden, grad_weight, None, None, None
