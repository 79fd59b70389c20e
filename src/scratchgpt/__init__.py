"""scratchgpt: GPT-2 from scratch in PyTorch, with the seed walkthrough's names."""

from .checkpoint import load_checkpoint, load_model_from_checkpoint, save_checkpoint
from .config import GPT_CONFIG_124M, GPTConfig, gpt2_config
from .generate import generate, generate_stream
from .model import (
    GELU,
    FeedForward,
    GPTModel,
    KVCache,
    LayerNorm,
    MultiHeadAttention,
    TransformerBlock,
    count_parameters,
)
from .tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text

__all__ = [
    "GPT_CONFIG_124M",
    "GPTConfig",
    "gpt2_config",
    "LayerNorm",
    "GELU",
    "FeedForward",
    "MultiHeadAttention",
    "TransformerBlock",
    "GPTModel",
    "KVCache",
    "count_parameters",
    "generate",
    "generate_stream",
    "get_tokenizer",
    "text_to_token_ids",
    "token_ids_to_text",
    "save_checkpoint",
    "load_checkpoint",
    "load_model_from_checkpoint",
]
