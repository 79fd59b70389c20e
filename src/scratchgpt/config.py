"""Model configuration: the seed's dict form, a typed dataclass, and GPT-2 presets.

Every function that takes a config accepts either form; `GPTConfig.from_dict`
is the one place that checks a config, so a bad value fails with one clear
message wherever it enters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Union

# The seed's configuration: GPT-2 124M with a shorter context, untied output head.
GPT_CONFIG_124M: dict[str, Any] = {
    "vocab_size": 50257,  # GPT-2 BPE vocabulary
    "context_length": 256,  # the seed trains on short windows
    "emb_dim": 768,
    "n_heads": 12,
    "n_layers": 12,
    "drop_rate": 0.1,
    "qkv_bias": False,
}

# OpenAI's released sizes; the name is the one their download bucket uses.
GPT2_SIZES: dict[str, dict[str, int]] = {
    "124M": {"emb_dim": 768, "n_layers": 12, "n_heads": 12},
    "355M": {"emb_dim": 1024, "n_layers": 24, "n_heads": 16},
    "774M": {"emb_dim": 1280, "n_layers": 36, "n_heads": 20},
    "1558M": {"emb_dim": 1600, "n_layers": 48, "n_heads": 25},
}


@dataclass(frozen=True)
class GPTConfig:
    """Hyper-parameters of a GPTModel; field names are the seed's dict keys."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = False
    tie_weights: bool = False  # share tok_emb.weight with out_head.weight (GPT-2 does; the seed does not)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config {name} must be a positive integer, got {value!r}")
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"config emb_dim={self.emb_dim} must be divisible by n_heads={self.n_heads}"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"config drop_rate must be in [0, 1), got {self.drop_rate!r}")

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "GPTConfig":
        """Build from a seed-style dict; unknown keys are an error, not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**dict(cfg))

    def to_dict(self) -> dict[str, Any]:
        """The seed-style dict (plus `tie_weights`)."""
        return asdict(self)

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads


ConfigLike = Union[GPTConfig, Mapping[str, Any]]


def as_config(cfg: ConfigLike) -> GPTConfig:
    """Accept a GPTConfig or a seed-style dict."""
    return cfg if isinstance(cfg, GPTConfig) else GPTConfig.from_dict(cfg)


def gpt2_config(size: str, **overrides: Any) -> dict[str, Any]:
    """The seed-style config of an OpenAI GPT-2 size ("124M", "355M", "774M", "1558M").

    Context 1024, biases on the query/key/value projections and no dropout, as
    OpenAI trained them; `overrides` change any key (e.g. `context_length=256`).
    """
    if size not in GPT2_SIZES:
        raise ValueError(f"unknown GPT-2 size {size!r}; choose one of {list(GPT2_SIZES)}")
    cfg = {**GPT_CONFIG_124M, "context_length": 1024, "drop_rate": 0.0, "qkv_bias": True}
    cfg.update(GPT2_SIZES[size])
    cfg.update(overrides)
    return GPTConfig.from_dict(cfg).to_dict()
