"""The GPT-2 model, in one file.

Names follow the seed design (GPTModel, TransformerBlock, MultiHeadAttention,
FeedForward, LayerNorm, GELU) and so do the parameter names, so a `state_dict`
written by seed-style code loads here unchanged and the other way round.
Shapes: B batch, T tokens, E emb_dim, H heads, D = E // H, V vocab_size.
"""

from __future__ import annotations

import math
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .config import ConfigLike, GPTConfig, as_config


class LayerNorm(nn.Module):
    """Layer normalisation with learnable `scale` and `shift` (biased variance, eps 1e-5, as GPT-2)."""

    def __init__(self, emb_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


# oneDNN's matmul (PyTorch's internal `mkldnn::_linear_pointwise` op) on x86 CPUs.
_ONEDNN_LINEAR = (platform.machine().lower() in ("x86_64", "amd64")
                  and torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                  and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same `state_dict`) that infers through oneDNN on x86 CPUs.

    Decoding one token multiplies a vector by every weight matrix, so its speed is
    how fast the weights stream from memory. For fp32 PyTorch calls MKL, which
    streams 13-26 GB/s on the AMD CPUs we measured; oneDNN's matmul streams 28-35,
    close to the copy bandwidth, and is no slower for batches. bf16 weights stream
    well only once reordered into oneDNN's blocked layout, so that copy is kept
    beside them (see `_packed_bf16`). Measured in benchmarks/README.md.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _onednn_serves(x, self.weight):
            weight = self.weight if x.dtype == torch.float32 else _packed_bf16(self.weight)
            return torch.ops.mkldnn._linear_pointwise(x, weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        _PACKED.pop(self.weight, None)  # .to(), .float(), .cuda() ...: a packed bf16 copy is stale
        return super()._apply(fn, recurse)


def _onednn_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN computes this product: CPU inference in fp32 or bf16.

    oneDNN has no backward here, so with grad mode on this is `F.linear` (even for
    frozen weights); so it is under autocast, which casts only the ops it knows,
    and under `torch.compile`, which picks its own kernels.
    `torch.backends.mkldnn.enabled = False` turns it off.
    """
    return (_ONEDNN_LINEAR and not torch.is_grad_enabled()
            and x.device.type == weight.device.type == "cpu"
            and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled("cpu") and torch.backends.mkldnn.enabled
            and not torch.compiler.is_compiling())


# bf16 weight -> ((_version, storage address), weak ref to that storage, packed copy)
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _packed_bf16(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in oneDNN's blocked layout, made once and remade when the weight changes.

    Kept outside the module (keyed weakly by the weight) so that copying, saving
    and `state_dict` never see the opaque tensor, and it goes when the weight goes.
    It doubles the memory of bf16 weights while they are used for inference.
    A change is seen through the version counter (bumped by every in-place op:
    `load_state_dict`, `copy_`, optimizer steps) or a new storage (`weight.data = ...`);
    in-place writes through `weight.data` bypass both and are not seen.
    Weights made under `torch.inference_mode()` have no version counter: they are
    used unpacked, at plain bf16 speed.
    """
    if torch.is_inference(weight):
        return weight
    storage = StorageWeakRef(weight.untyped_storage())
    stamp = (weight._version, storage.cdata)
    cached = _PACKED.get(weight)
    if cached is None or cached[0] != stamp:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)  # 1: tuned for 1-row inputs
        # the weak ref is kept so that no later storage can be given this one's address
        cached = (stamp, storage, packed)
        _PACKED[weight] = cached
    return cached[2]


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
    of the whole context. Buffers are allocated once for `max_len` positions.
    """

    def __init__(self, model: "GPTModel", batch_size: int, max_len: int):
        cfg = model.cfg
        if max_len > cfg.context_length:
            raise ValueError(
                f"KV cache of {max_len} positions exceeds context_length={cfg.context_length}"
            )
        weight = model.tok_emb.weight
        shape = (batch_size, cfg.n_heads, max_len, cfg.head_dim)
        self.layers = [
            LayerKV(torch.empty(shape, dtype=weight.dtype, device=weight.device),
                    torch.empty(shape, dtype=weight.dtype, device=weight.device))
            for _ in range(cfg.n_layers)
        ]

    @property
    def length(self) -> int:
        """Number of positions cached so far."""
        return self.layers[0].length

    @property
    def max_len(self) -> int:
        return self.layers[0].keys.shape[2]


class LayerKV:
    """One layer's slice of a KVCache."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        self.keys, self.values, self.length = keys, values, 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, H, T, D] after the cached positions; return all of them [B, H, length, D]."""
        end = self.length + k.shape[2]
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


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
        # True above the diagonal = "may not attend". Kept as a buffer (as in the
        # seed) so seed state_dicts load unchanged; used when cached decoding feeds
        # several new tokens at once.
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length, dtype=torch.bool), 1)
        )

    def forward(self, x: torch.Tensor, cache: LayerKV | None = None) -> torch.Tensor:
        b, num_tokens, _ = x.shape
        # [B, T, E] -> [B, H, T, D]
        q = self.W_query(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)

        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.append(k, v)  # [B, H, past + T, D]

        dropout_p = self.dropout if self.training else 0.0
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        elif num_tokens == 1:  # one new token may attend to every cached position
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        else:  # new rows past..past+T of the causal mask
            allowed = ~self.mask[past:past + num_tokens, :past + num_tokens]
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)

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
                logits_from: int = 0) -> torch.Tensor:
        """Logits [B, T, V] for token ids [B, T].

        `logits_from` computes them only for positions `logits_from:` (Python slice
        semantics, so -1 is the last position): the output head is the costliest
        layer, and sampling needs only the last position, evaluation only the scored ones.

        With a `cache`, `in_idx` holds only the new tokens: they are placed after
        the cached positions, attend to them, and are appended to the cache.
        """
        if in_idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token ids must be an integer tensor, got dtype {in_idx.dtype}")
        if in_idx.dim() != 2:
            raise ValueError(f"token ids must have shape [batch, tokens], got {tuple(in_idx.shape)}")
        _, seq_len = in_idx.shape
        past = 0 if cache is None else cache.length
        limit = self.cfg.context_length if cache is None else cache.max_len
        if past + seq_len > limit:
            raise ValueError(
                f"sequence of {past + seq_len} tokens exceeds context_length={limit}"
                + ("" if cache is None else f" of the KV cache ({past} cached + {seq_len} new)")
            )
        positions = torch.arange(past, past + seq_len, device=in_idx.device)
        x = self.drop_emb(self.tok_emb(in_idx) + self.pos_emb(positions))  # [B, T, E]
        for i, block in enumerate(self.trf_blocks):
            x = block(x, None if cache is None else cache.layers[i])
        x = x[:, logits_from:, :]  # [B, T', E]: only the positions whose logits are needed
        x = self.final_norm(x)
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
