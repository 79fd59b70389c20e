"""scratchgpt: GPT-2 from scratch in PyTorch, with the seed walkthrough's names."""

from .checkpoint import load_checkpoint, load_model_from_checkpoint, save_checkpoint
from .config import GPT_CONFIG_124M, GPTConfig, gpt2_config
from .data import GPTDatasetV1, create_dataloader_v1
from .evaluate import evaluate_perplexity
from .generate import generate, generate_stream
from .gpt2.download import download_gpt2_files
from .gpt2.hf import load_hf_gpt2, save_hf_gpt2
from .gpt2.load import (
    download_and_load_gpt2,
    load_gpt2,
    load_gpt2_params_from_tf_ckpt,
    load_weights_into_gpt,
    save_gpt2_tf,
)
from .gpt2.tf_checkpoint import TFCheckpointReader, write_tf_checkpoint
from .kernels import quantize_model
from .lora import (
    LinearWithLoRA,
    LoRALayer,
    load_adapter,
    merge_lora,
    replace_linear_with_lora,
    save_adapter,
)
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
from .tasks.classify import ClassifyTask, calc_accuracy_loader, classify_review
from .tasks.instruct import InstructionDataset, InstructTask, custom_collate_fn, format_input
from .tokenizer import get_tokenizer, text_to_token_ids, token_ids_to_text
from .train import (
    TrainConfig,
    Trainer,
    calc_loss_batch,
    calc_loss_loader,
    evaluate_model,
    train_model_simple,
)

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
    "GPTDatasetV1",
    "create_dataloader_v1",
    "evaluate_perplexity",
    "calc_loss_batch",
    "calc_loss_loader",
    "evaluate_model",
    "train_model_simple",
    "Trainer",
    "TrainConfig",
    "download_and_load_gpt2",
    "download_gpt2_files",
    "load_gpt2_params_from_tf_ckpt",
    "load_weights_into_gpt",
    "load_gpt2",
    "save_gpt2_tf",
    "load_hf_gpt2",
    "save_hf_gpt2",
    "TFCheckpointReader",
    "write_tf_checkpoint",
    "LoRALayer",
    "LinearWithLoRA",
    "replace_linear_with_lora",
    "merge_lora",
    "save_adapter",
    "load_adapter",
    "quantize_model",
    "format_input",
    "InstructionDataset",
    "custom_collate_fn",
    "InstructTask",
    "calc_accuracy_loader",
    "classify_review",
    "ClassifyTask",
]
