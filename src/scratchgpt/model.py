"""The GPT-2 model, in one file.

Names follow the seed design (GPTModel, TransformerBlock, MultiHeadAttention,
FeedForward, LayerNorm, GELU) and so do the parameter names, so a `state_dict`
written by seed-style code loads here unchanged and the other way round.
Shapes: B batch, T tokens, E emb_dim, H heads, D = E // H, V vocab_size.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .config import ConfigLike, GPTConfig, as_config
from .kernels import Linear, cached_attention, qkv_projection  # fast paths beside the model; plain PyTorch is their reference


class LayerNorm(nn.Module):
    """Layer normalisation with learnable `scale` and `shift` (biased variance, eps 1e-5, as GPT-2)."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class GELU(nn.Module):
    """GPT-2's GELU: the tanh approximation, not the exact erf form."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """Position-wise MLP: E -> 4E -> GELU -> E."""

    def __init__(self, cfg: ConfigLike):
        super().__init__()
        cfg = as_config(cfg)
        self.layers = nn.Sequential(
            Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class KVCache:
    """Keys and values of the positions a model has already seen, one pair per layer.

    With it, each new token costs one position of attention instead of a re-run
    of the whole context. Buffers [B, H, max_len, D] are allocated once.

    Each row (sequence) has its own length: a forward pass appends each row's new
    tokens after that row's own cached positions, at its own position ids, so
    sequences of different lengths decode together in one pass (a ragged batch,
    as a server's continuous batching needs). `rows(i, j)` is a view of rows
    i..j-1 sharing the buffers and lengths, e.g. to prefill one new sequence.
    """

    def __init__(self, model: "GPTModel", batch_size: int, max_len: int):
        cfg = model.cfg
        if max_len > cfg.context_length:
            raise ValueError(
                f"KV cache of {max_len} positions exceeds context_length={cfg.context_length}"
            )
        weight = model.tok_emb.weight
        shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)
        # Zeros, not empty: a ragged batch's shorter rows still read the positions they have not
        # written (with attention weight 0), and 0 x NaN from uninitialised memory is NaN.
        self.keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(cfg.n_layers)]
        self.values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(cfg.n_layers)]
        self._lengths = [0] * batch_size  # host-side: shapes and masks need no device sync
        self._first, self.batch_size, self.max_len = 0, batch_size, max_len
        self.layers = [LayerKV(self, i) for i in range(cfg.n_layers)]
        self._step: _Step | None = None

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of rows start..stop-1: same buffers, same lengths (writes go through)."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows {start}..{stop} outside a cache of {self.batch_size} rows")
        view = object.__new__(KVCache)
        first = self._first + start
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view._lengths, view._first = self._lengths, first
        view.batch_size, view.max_len = stop - start, self.max_len
        view.layers = [LayerKV(view, i) for i in range(len(view.keys))]
        view._step = None
        return view

    @property
    def lengths(self) -> list[int]:
        """Cached positions of each row."""
        return self._lengths[self._first:self._first + self.batch_size]

    def set_length(self, row: int, length: int) -> None:
        """Forget row `row`'s positions past `length` (0: the row is free for a new sequence)."""
        if not 0 <= length <= self.max_len:
            raise ValueError(f"length {length} outside 0..{self.max_len}")
        self._lengths[self._first + row] = length

    @property
    def length(self) -> int:
        """Positions cached so far, where every row has the same number."""
        lengths = set(self.lengths)
        if len(lengths) != 1:
            raise ValueError(f"rows hold different numbers of positions: {self.lengths}")
        return lengths.pop()

    def begin(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        """Prepare a forward pass of `num_tokens` new tokens per row; return their position ids.

        Shape [T] when every row has the same length, else [B, T].
        """
        starts = self.lengths
        if max(starts) + num_tokens > self.max_len:
            raise ValueError(f"{max(starts)} cached + {num_tokens} new tokens exceed the "
                             f"KV cache's {self.max_len} positions")
        self._step = _Step(starts, num_tokens, device)
        return self._step.positions

    def end(self) -> None:
        """Count the new tokens as cached."""
        for row in range(self.batch_size):
            self._lengths[self._first + row] += self._step.num_tokens
        self._step = None


class _Step:
    """Where one forward pass writes into a KVCache and what its tokens may attend to."""

    def __init__(self, starts: list[int], num_tokens: int, device: torch.device):
        self.num_tokens = num_tokens
        self.kv_len = max(starts) + num_tokens  # keys [.., :kv_len] cover every row's positions
        self.start = starts[0] if len(set(starts)) == 1 else None  # None: a ragged batch
        new = torch.arange(num_tokens, device=device)
        if self.start is not None:
            self.positions = new + self.start  # [T]
            self.mask = None if self.start == 0 or num_tokens == 1 else (
                torch.arange(self.kv_len, device=device) <= self.positions[:, None])  # [T, kv_len]
        else:
            self.positions = torch.tensor(starts, device=device)[:, None] + new  # [B, T]
            self.rows = torch.arange(len(starts), device=device)[:, None].expand_as(self.positions)
            # each row attends to its own cached positions and its new tokens up to itself
            allowed = torch.arange(self.kv_len, device=device) <= self.positions[:, :, None]  # [B, T, kv_len]
            self.mask = allowed.unsqueeze(1)  # [B, 1, T, kv_len]: the same for every head


class LayerKV:
    """One layer's slice of a KVCache."""

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    def append(self, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, bool]:
        """Store k, v [B, H, T, D] at each row's next positions.

        Returns the keys and values to attend to [B, H, kv_len, D], the attention mask
        (True = may attend; None = no mask needed) and whether plain causal masking applies.
        """
        step = self.cache._step
        keys, values = self.cache.keys[self.index], self.cache.values[self.index]
        if step.start is not None:
            keys[:, :, step.start:step.kv_len] = k
            values[:, :, step.start:step.kv_len] = v
        else:  # ragged: row b's token t goes to position positions[b, t]
            keys[step.rows, :, step.positions] = k.transpose(1, 2)  # indexed as [B, T, H, D]
            values[step.rows, :, step.positions] = v.transpose(1, 2)
        causal = step.start == 0 and step.num_tokens > 1
        return keys[:, :, :step.kv_len], values[:, :, :step.kv_len], step.mask, causal


class MultiHeadAttention(nn.Module):
    """Causal multi-head self-attention through `scaled_dot_product_attention`.

    On CUDA this dispatches to flash / memory-efficient kernels; everywhere it
    computes the same softmax(q k^T / sqrt(D) + causal mask) v as the seed.
    """

    def __init__(self, d_in: int, d_out: int, context_length: int, dropout: float,
                 num_heads: int, qkv_bias: bool = False):
        super().__init__()
        if d_out % num_heads != 0:
            raise ValueError(f"d_out={d_out} must be divisible by num_heads={num_heads}")
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.dropout = dropout
        self.W_query = Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = Linear(d_out, d_out)
        # True above the diagonal = "may not attend". Unused here (attention masks
        # causally itself); kept as a buffer, as in the seed, so seed state_dicts load unchanged.
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1)
        )

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        # W_query(x), W_key(x), W_value(x): [B, T, E] each (in training, one stacked product)
        q, k, v = qkv_projection(x, self.W_query, self.W_key, self.W_value)
        # [B, T, E] -> [B, H, T, D]
        q = q.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        else:  # attend to the cached positions too: [B, H, kv_len, D]
            k, v, allowed, causal = cache.append(k, v)
            y = cached_attention(q, k, v, allowed, causal, dropout_p)

        y = y.transpose(1, 2).reshape(b, num_tokens, self.d_out)  # [B, H, T, D] -> [B, T, E]
        return self.out_proj(y)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm1(x)), then x + feed-forward(norm2(x))."""

    def __init__(self, cfg: ConfigLike):
        super().__init__()
        cfg = as_config(cfg)
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            dropout=cfg.drop_rate,
            num_heads=cfg.n_heads,
            qkv_bias=cfg.qkv_bias,
        )
        self.ff = FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), cache))
        x = x + self.drop_shortcut(self.ff(self.norm2(x)))
        return x


class GPTModel(nn.Module):
    """GPT-2: token + position embeddings, n_layers TransformerBlocks, final LayerNorm, output head."""

    def __init__(self, cfg: ConfigLike):
        super().__init__()
        self.cfg: GPTConfig = as_config(cfg)
        cfg = self.cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(*[TransformerBlock(cfg) for _ in range(cfg.n_layers)])
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_weights:
            self.out_head.weight = self.tok_emb.weight
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by
        # 1/sqrt(2 * n_layers), since each layer adds two of them.
        residual_std = 0.02 / math.sqrt(2 * cfg.n_layers)
        for block in self.trf_blocks:
            nn.init.normal_(block.att.out_proj.weight, mean=0.0, std=residual_std)
            nn.init.normal_(block.ff.layers[2].weight, mean=0.0, std=residual_std)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, in_idx: torch.Tensor, cache: KVCache | None = None,
                logits_from: int = 0, return_hidden: bool = False) -> torch.Tensor:
        """Logits [B, T, V] for token ids [B, T].

        `logits_from` computes them only for positions `logits_from:` (Python slice
        semantics, so -1 is the last position): the output head is the costliest
        layer, and sampling needs only the last position, evaluation only the scored ones.
        `return_hidden` stops before the head and returns the normalised hidden
        states [B, T', E] (for a loss that applies the head itself, in pieces).

        With a `cache`, `in_idx` holds only the new tokens of each of the cache's rows:
        they are placed after that row's cached positions, attend to them, and are
        appended to the cache.
        """
        if in_idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor, got dtype {in_idx.dtype}")
        if in_idx.dim() != 2:
            raise ValueError(f"token ids must have shape [batch, tokens], got {tuple(in_idx.shape)}")
        batch, seq_len = in_idx.shape
        if cache is None:
            if seq_len > self.cfg.context_length:
                raise ValueError(f"sequence of {seq_len} tokens exceeds context_length={self.cfg.context_length}")
            positions = torch.arange(seq_len, device=in_idx.device)  # [T]
        else:
            if batch != cache.batch_size:
                raise ValueError(f"{batch} rows of tokens for a KV cache of {cache.batch_size} rows")
            positions = cache.begin(seq_len, in_idx.device)  # [T], or [B, T] for a ragged batch
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))  # [B, T, E]
        for i, block in enumerate(self.trf_blocks):
            x = block(x, None if cache is None else cache.layers[i])
        if cache is not None:
            cache.end()
        x = x[:, logits_from:, :]  # [B, T', E]: only the positions whose logits are needed
        x = self.final_norm(x)
        if return_hidden:
            return x
        return self.out_head(x)  # [B, T', V]


class _SkipRandomInit(TorchFunctionMode):
    """Skip the random initialisation of weights that are about to be overwritten anyway."""

    SKIPPED = {nn.init.normal_, nn.init.uniform_, nn.init.trunc_normal_, nn.init.kaiming_uniform_,
               nn.init.kaiming_normal_, nn.init.xavier_uniform_, nn.init.xavier_normal_,
               torch.Tensor.normal_, torch.Tensor.uniform_}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.SKIPPED:
            return args[0] if args else kwargs["tensor"]  # the tensor, left as allocated
        return func(*args, **(kwargs or {}))


def empty_model(cfg: ConfigLike, device: str | torch.device = "cpu") -> GPTModel:
    """A GPTModel on `device` in eval mode, its parameters allocated but not randomly initialised.

    For loaders that then write every parameter (and check that they did): drawing
    the random values is wasted work, seconds for the larger GPT-2 sizes on a CPU.
    """
    with torch.device(device), _SkipRandomInit():
        return GPTModel(cfg).eval()


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Raise a ValueError naming an id outside [0, vocab_size): the embedding lookup it would
    reach fails with an IndexError that names neither the id nor the vocabulary."""
    if ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        bad = high if high >= vocab_size else low
        raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab_size}")


def count_parameters(model: GPTModel) -> dict[str, int]:
    """Parameter counts as GPT-2 reports them ("tied": the output head shares the
    token embedding) and as the seed's untied model holds them ("untied")."""
    unique = sum(p.numel() for p in model.parameters())  # a shared tensor counts once
    head = model.out_head.weight.numel()
    tied = model.out_head.weight is model.tok_emb.weight
    untied_count = unique + head if tied else unique
    return {"untied": untied_count, "tied": untied_count - head}
