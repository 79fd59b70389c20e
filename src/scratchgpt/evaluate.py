"""Perplexity and bits per byte of a model on any text, with a sliding window.

A language model's quality on a text is the mean negative log-likelihood of
every token given the tokens before it: `loss` in nats per token,
`perplexity = exp(loss)`, and `bits_per_byte = total nats / ln 2 / UTF-8 bytes`
(independent of the tokenizer, so models with different vocabularies compare).

A text longer than the context is read in windows of `context_size` tokens.
The schedule, which `sliding_windows` computes and a reader can check by hand:

* Token 0 is never scored (nothing comes before it); every other token is
  scored exactly once, so `tokens == len(token_ids) - 1`.
* Windows start at 0, step, 2*step, ... and span `context_size` tokens (the last
  one is cut short at the end of the text). Inside a window a token can only be
  scored if the window holds at least one token before it, so a window scores
  at most `context_size - 1` tokens, each with up to `context_size - 1` tokens of
  left context.
* `step = stride`, except that `stride == context_size` (back-to-back windows)
  uses `step = context_size - 1`: consecutive windows then share exactly one
  token, the left context of the next window's first scored token. (The Hugging
  Face perplexity guide uses a step of `context_size` there and silently drops
  the first token of every window.)
* Each token is scored in the first window that gives it the most left context.
  Earlier windows give more context, so this is the earliest window that still
  holds the token at a position other than its first: window k scores the
  tokens from where window k-1 ended up to its own end.

For `stride < context_size` this is exactly the Hugging Face perplexity guide's
schedule (labels masked outside the scored span), so the two give the same
number; the guide's own averaging weights each window by one token too many,
which this module does not copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import unwrap_model
from .devices import resolve_dtype
from .model import GPTModel, check_token_ids

IGNORE = -100  # target of a position whose prediction is not scored

# Show a progress bar when a text needs more batches than this (and stderr is a terminal).
PROGRESS_MIN_BATCHES = 16


@dataclass(frozen=True)
class Window:
    """Tokens `[begin, end)` go through the model; tokens `[first_scored, end)` are scored.

    Token i in the window is predicted from the logits at window position
    `i - begin - 1`, with `i - begin` tokens of left context.
    """

    begin: int
    end: int
    first_scored: int

    @property
    def scored(self) -> int:
        return self.end - self.first_scored


def check_schedule(n_tokens: int, context_size: int, stride: int) -> None:
    """Raise a ValueError naming the problem when these cannot make a sliding-window evaluation."""
    if context_size < 2:
        raise ValueError(f"context_size must be at least 2 (a token needs one token before it), got {context_size}")
    if not 1 <= stride <= context_size:
        raise ValueError(f"stride must be between 1 and context_size={context_size}, got {stride}")
    if n_tokens < 2:
        raise ValueError(f"the text has {n_tokens} token(s): at least 2 are needed to score one token "
                         "from the one before it")


def sliding_windows(n_tokens: int, context_size: int, stride: int) -> list[Window]:
    """The windows that score every token after the first exactly once (see the module docstring)."""
    check_schedule(n_tokens, context_size, stride)
    step = min(stride, context_size - 1)  # a window scores at most context_size - 1 tokens
    windows = []
    begin, scored_until = 0, 1  # tokens before `scored_until` are done (token 0 is never scored)
    while scored_until < n_tokens:
        end = min(begin + context_size, n_tokens)
        # begin < scored_until (step <= context_size - 1) and scored_until < end: every window
        # gives each token it scores at least one token of context, and scores at least one token.
        windows.append(Window(begin, end, scored_until))
        scored_until = end
        begin += step
    return windows


def _as_token_tensor(token_ids) -> torch.Tensor:
    """Token ids as a 1-D int64 CPU tensor (accepts lists, numpy arrays and [T] or [1, T] tensors)."""
    if isinstance(token_ids, torch.Tensor):
        ids = token_ids.detach().to("cpu")
    else:
        ids = torch.as_tensor(np.asarray(token_ids))
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"token_ids must be one sequence ([T] or [1, T]), got shape {tuple(ids.shape)}")
    if ids.numel() and (ids.dtype.is_floating_point or ids.dtype == torch.bool):
        raise TypeError(f"token ids must be integers, got dtype {ids.dtype}")
    return ids.to(torch.int64)


def _autocast_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        dtype = resolve_dtype(dtype)
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be fp32, bf16 or fp16, got {dtype}")
    return None if dtype == torch.float32 else dtype


def _exp(x: float) -> float:
    return math.exp(x) if x < 709 else math.inf  # math.exp raises OverflowError past ~709.78


@torch.inference_mode()
def evaluate_perplexity(model: torch.nn.Module, token_ids: torch.Tensor | Sequence[int] | np.ndarray,
                        context_size: int | None = None, stride: int | None = None, batch_size: int = 8, *,
                        num_bytes: int | None = None, num_words: int | None = None, dtype: torch.dtype | str | None = None,
                        progress: bool | None = None, return_token_losses: bool = False) -> dict:
    """Mean loss, perplexity (and bits per byte) of `model` on one token sequence.

    model: maps token ids [B, T] to logits [B, T, V] (a GPTModel); it runs on
        its own device and is put in eval mode for the call (its mode is restored).
    token_ids: the text's token ids, [T] or [1, T] (list, numpy array or tensor).
    context_size: tokens per window (default: the model's context length).
    stride: tokens between window starts, 1..context_size (default context_size // 2).
        Smaller strides give each token more context and cost more windows.
    batch_size: windows per forward pass.
    num_bytes: the UTF-8 byte count of the text; adds `bits_per_byte`.
    num_words: the text's word count; adds `word_perplexity = exp(total nats / words)`, the
        per-word measure of the GPT-2 paper's WikiText and PTB tables.
    dtype: "bf16"/"fp16" (or a torch dtype) runs the model under autocast; the
        default runs it in its own dtype. Losses are always computed in fp32.
    progress: show a tqdm bar (default: when there are many batches and stderr is a terminal).
    return_token_losses: add `token_losses`, a float32 CPU tensor of T-1 losses,
        the one at index i-1 being token i's.

    Returns a dict: loss (mean nats per scored token), perplexity, tokens (scored:
    T-1), windows, context_size, stride; with num_bytes: bytes, bits_per_byte; with
    num_words: words, word_perplexity.
    """
    ids = _as_token_tensor(token_ids)
    cfg = getattr(model, "cfg", None)
    if context_size is None:
        if cfg is None:
            raise ValueError("give context_size: the model has no cfg.context_length to default to")
        context_size = cfg.context_length
    if cfg is not None and context_size > cfg.context_length:
        raise ValueError(f"context_size {context_size} exceeds the model's context_length {cfg.context_length}")
    if stride is None:
        stride = max(1, context_size // 2)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if num_bytes is not None and num_bytes < 1:
        raise ValueError(f"num_bytes must be a positive byte count, got {num_bytes}")
    if num_words is not None and num_words < 1:
        raise ValueError(f"num_words must be a positive word count, got {num_words}")
    windows = sliding_windows(len(ids), context_size, stride)  # validates length, context and stride
    if cfg is not None:
        check_token_ids(ids, cfg.vocab_size)

    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    autocast = _autocast_dtype(dtype)
    # All windows but possibly the last are context_size long. The last is padded on the right to the
    # same length so that every batch has one shape: attention is causal, so positions before the
    # padding never see it, and padded positions are not scored.
    length = windows[0].end - windows[0].begin
    # Windows after the first all score their last context_size - step positions: batched apart from the
    # first, they let the output head skip the positions that score nothing (GPTModel's `logits_from`).
    groups = [windows[:1], windows[1:]]
    batches = [group[i:i + batch_size] for group in groups for i in range(0, len(group), batch_size)]
    if progress is None:  # tqdm's disable=None: shown only when stderr is a terminal
        disable = None if len(batches) > PROGRESS_MIN_BATCHES else True
    else:
        disable = not progress
    total_nats = 0.0
    token_losses = [] if return_token_losses else None
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc="eval", unit="batch", disable=disable,
                          leave=False, dynamic_ncols=True):
            inputs = torch.zeros(len(batch), length, dtype=torch.int64)
            # targets[b, j]: the token the logits at position j of window b predict, where it is scored
            targets = torch.full((len(batch), length), IGNORE, dtype=torch.int64)
            for b, w in enumerate(batch):
                inputs[b, :w.end - w.begin] = ids[w.begin:w.end]
                targets[b, w.first_scored - w.begin - 1:w.end - w.begin - 1] = ids[w.first_scored:w.end]
            start = min(w.first_scored - w.begin - 1 for w in batch)  # positions before predict nothing scored
            with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
                if isinstance(unwrap_model(model), GPTModel):
                    logits = model(inputs.to(device), logits_from=start)  # [B, length - start, V]
                else:
                    logits = model(inputs.to(device))[:, start:]
            targets = targets[:, start:].to(device)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE,
                                     reduction="none")
            losses = losses[targets.flatten() != IGNORE]  # window by window, each in token order
            total_nats += losses.sum().item()
            if token_losses is not None:
                token_losses.append(losses.cpu())
    finally:
        model.train(was_training)

    tokens = len(ids) - 1
    assert sum(w.scored for w in windows) == tokens
    loss = total_nats / tokens
    result = {"loss": loss, "perplexity": _exp(loss), "tokens": tokens, "windows": len(windows),
              "context_size": context_size, "stride": stride}
    if num_bytes is not None:
        result["bytes"] = num_bytes
        result["bits_per_byte"] = total_nats / math.log(2) / num_bytes
    if num_words is not None:
        result["words"] = num_words
        result["word_perplexity"] = _exp(total_nats / num_words)
    if token_losses is not None:
        result["token_losses"] = torch.cat(token_losses)
    return result
