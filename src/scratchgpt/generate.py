"""Text generation: greedy, temperature, top-k and top-p sampling, end-of-text stops.

`generate` keeps the seed's signature and meaning; `generate_stream` yields
the new tokens one step at a time (for the command line). Both use a KV cache
while the text fits in the context window and fall back to the seed's
"re-run the last `context_size` tokens" once it outgrows it, so cached and
uncached generation pick the same tokens.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from .kernels import decoder
from .model import KVCache, check_token_ids


def _check_options(max_new_tokens: int, context_size: int, temperature: float,
                   top_k: int | None, top_p: float | None) -> None:
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if context_size < 1:
        raise ValueError(f"context_size must be >= 1, got {context_size}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None), got {top_k}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] (or None), got {top_p}")


def filter_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Set all but exactly `top_k` highest logits of each row to -inf (ties broken by index)."""
    top_k = min(top_k, logits.shape[-1])
    keep = torch.topk(logits, top_k, dim=-1).indices
    filtered = torch.full_like(logits, float("-inf"))
    return filtered.scatter(-1, keep, logits.gather(-1, keep))


def filter_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= `top_p`."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p, float("-inf"))  # first always stays
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row from last-position logits [B, V]; returns [B, 1]."""
    logits = logits.float()  # sample in fp32 even when the model runs in bf16
    if temperature == 0.0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None:
        logits = filter_top_k(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = filter_top_p(logits, top_p)
    probs = torch.softmax(logits, dim=-1)  # subtracts the max: stable for any scale
    return torch.multinomial(probs, num_samples=1, generator=generator)


def generate_stream(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int,
                    temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
                    top_p: float | None = None, seed: int | None = None,
                    generator: torch.Generator | None = None, use_cache: bool = True,
                    compile: bool = False) -> Iterator[torch.Tensor]:
    """Yield the next tokens [B, 1] one step at a time (see `generate` for the options).

    A row that produced `eos_id` yields `eos_id` from then on; the stream ends
    when every row has produced it (that last step is not yielded, as in the
    seed) or after `max_new_tokens` steps.
    """
    _check_options(max_new_tokens, context_size, temperature, top_k, top_p)
    if idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"idx must be an integer tensor of token ids, got dtype {idx.dtype}")
    if idx.dim() != 2 or idx.shape[1] == 0:
        raise ValueError(f"idx must have shape [batch, tokens] with at least one token, got {tuple(idx.shape)}")
    check_token_ids(idx, model.cfg.vocab_size)
    limit = model.cfg.context_length
    if context_size > limit:
        raise ValueError(f"context_size={context_size} exceeds the model's context_length={limit}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=idx.device).manual_seed(seed)

    finished = torch.zeros(idx.shape[0], 1, dtype=torch.bool, device=idx.device)
    window = idx[:, -context_size:]  # the tokens the model sees, at positions 0..len-1
    cache_len = min(context_size, window.shape[1] + max_new_tokens)
    # no cache when the prompt already fills the window: every step would re-run it anyway
    cache = (KVCache(model, idx.shape[0], cache_len)
             if use_cache and max_new_tokens > 0 and window.shape[1] < context_size else None)
    new_input = window  # what the cache has not seen yet
    step = decoder(model, compile) if cache is not None else None
    with torch.no_grad():
        for _ in range(max_new_tokens):
            if cache is not None and cache.length + new_input.shape[1] <= cache.max_len:
                logits = step(new_input, cache)
            else:  # the window slid: positions changed, so re-run it whole as the seed does
                cache = None
                logits = model(window, logits_from=-1)
            token = next_token(logits[:, -1, :], temperature, top_k, top_p, generator)  # [B, 1]
            if eos_id is not None:
                token = token.masked_fill(finished, eos_id)
                finished |= token == eos_id
                if bool(finished.all()):
                    return
            yield token
            window = torch.cat([window, token], dim=1)[:, -context_size:]
            new_input = token


def generate(model: nn.Module, idx: torch.Tensor, max_new_tokens: int, context_size: int,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             top_p: float | None = None, seed: int | None = None,
             generator: torch.Generator | None = None, use_cache: bool = True,
             compile: bool = False) -> torch.Tensor:
    """Append up to `max_new_tokens` tokens to `idx` [B, T] and return it.

    temperature 0 is greedy; otherwise logits are divided by `temperature`, cut
    to the `top_k` best (exactly k, even with ties) and to the nucleus of mass
    `top_p`, and sampled, reproducibly from `seed` or `generator`. With `eos_id`
    each row stops on its own and is padded with `eos_id` until all rows stop.
    The model sees at most the last `context_size` tokens. `compile` runs the one-token
    steps through a compiled graph (`kernels.CompiledDecoder`): the same tokens, faster
    per step, after a compilation of about a minute per model on a small CPU.
    """
    new = list(generate_stream(model, idx, max_new_tokens, context_size, temperature, top_k,
                               eos_id, top_p, seed, generator, use_cache, compile))
    return torch.cat([idx, *new], dim=1)
