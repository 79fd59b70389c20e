"""Hugging Face GPT-2 folders (`config.json` + `model.safetensors`) <-> GPTModel.

HF's GPT-2 keeps OpenAI's conv1d layout (`Conv1D` weights are [in, out], and
`c_attn` holds query, key and value side by side), so its tensors are exactly
OpenAI's `params` under other names; both directions go through `params` and
reuse the OpenAI mapping. Published checkpoints (gpt2 ... gpt2-xl) name their
tensors `h.0.attn.c_attn.weight`, folders saved by `GPT2LMHeadModel.save_pretrained`
prefix them with `transformer.`; both load. A tied `lm_head` is not stored.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.numpy import save

from ..fileio import atomic_write
from ..model import GPTModel, empty_model
from .load import Params, load_weights_into_gpt, params_from_gpt

# HF GPT-2 module path -> our params path, per layer and at the top.
LAYER_NAMES = {
    "ln_1.weight": ("ln_1", "g"), "ln_1.bias": ("ln_1", "b"),
    "attn.c_attn.weight": ("attn", "c_attn", "w"), "attn.c_attn.bias": ("attn", "c_attn", "b"),
    "attn.c_proj.weight": ("attn", "c_proj", "w"), "attn.c_proj.bias": ("attn", "c_proj", "b"),
    "ln_2.weight": ("ln_2", "g"), "ln_2.bias": ("ln_2", "b"),
    "mlp.c_fc.weight": ("mlp", "c_fc", "w"), "mlp.c_fc.bias": ("mlp", "c_fc", "b"),
    "mlp.c_proj.weight": ("mlp", "c_proj", "w"), "mlp.c_proj.bias": ("mlp", "c_proj", "b"),
}
TOP_NAMES = {"wte.weight": "wte", "wpe.weight": "wpe", "ln_f.weight": "g", "ln_f.bias": "b"}
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """The seed-style config of the model an HF GPT-2 `config.json` describes; refuses what GPTModel cannot run."""
    if hf.get("model_type") != "gpt2":
        raise ValueError(f"{source}: model_type {hf.get('model_type')!r} is not gpt2")
    emb = hf.get("n_embd", 768)
    checks = [
        (hf.get("activation_function", "gelu_new") in TANH_GELUS,
         f"activation_function {hf.get('activation_function')!r} (GPTModel uses GPT-2's tanh GELU)"),
        (hf.get("n_inner") in (None, 4 * emb), f"n_inner {hf.get('n_inner')} (GPTModel uses 4 * n_embd)"),
        (abs(hf.get("layer_norm_epsilon", 1e-5) - 1e-5) < 1e-12,
         f"layer_norm_epsilon {hf.get('layer_norm_epsilon')} (GPTModel uses 1e-5)"),
        (hf.get("scale_attn_weights", True) and not hf.get("scale_attn_by_inverse_layer_idx", False)
         and not hf.get("reorder_and_upcast_attn", False), "non-standard attention scaling"),
    ]
    for ok, what in checks:
        if not ok:
            raise ValueError(f"{source}: unsupported {what}")
    return {"vocab_size": hf.get("vocab_size", 50257), "context_length": hf.get("n_positions", hf.get("n_ctx", 1024)),
            "emb_dim": emb, "n_heads": hf.get("n_head", 12), "n_layers": hf.get("n_layer", 12),
            "drop_rate": 0.0, "qkv_bias": True, "tie_weights": hf.get("tie_word_embeddings", True)}


def hf_config_from_model(model: GPTModel, tied: bool) -> dict[str, Any]:
    """An HF GPT-2 `config.json` for `model`."""
    cfg = model.cfg
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.context_length, "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": None, "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5, "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate, "initializer_range": 0.02, "tie_word_embeddings": tied,
        **({"bos_token_id": 50256, "eos_token_id": 50256} if cfg.vocab_size > 50256 else {}),  # <|endoftext|>
    }


def params_from_hf_tensors(tensors: dict[str, np.ndarray], n_layer: int, source: str) -> Params:
    """OpenAI-style `params` from HF GPT-2 tensors (with or without the `transformer.` prefix)."""
    prefix = "transformer." if any(k.startswith("transformer.") for k in tensors) else ""

    def get(name: str) -> np.ndarray:
        if prefix + name not in tensors:
            raise ValueError(f"{source} has no tensor {prefix + name!r}")
        return tensors[prefix + name]

    params: Params = {key: get(name) for name, key in TOP_NAMES.items()}
    params["blocks"] = []
    for i in range(n_layer):
        block: dict = {}
        for name, path in LAYER_NAMES.items():
            target = block
            for key in path[:-1]:
                target = target.setdefault(key, {})
            target[path[-1]] = get(f"h.{i}.{name}")
        params["blocks"].append(block)
    return params


def load_hf_gpt2(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GPTModel:
    """A GPTModel (eval mode, on `device`) from an HF GPT-2 folder with `config.json` + `model.safetensors`."""
    folder = Path(folder)
    config_path, weights_path = folder / "config.json", folder / "model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (an HF GPT-2 folder holds config.json and model.safetensors)")
    cfg = config_from_hf(json.loads(config_path.read_text(encoding="utf-8")), str(config_path))
    with safe_open(weights_path, framework="pt") as f:  # "pt" reads bf16/fp16 files too; GPTModel is fp32
        tensors = {name: f.get_tensor(name).to(torch.float32).numpy() for name in f.keys()}
    params = params_from_hf_tensors(tensors, cfg["n_layers"], str(weights_path))
    head = tensors.get("lm_head.weight")  # used only when the config unties it, as transformers does
    model = empty_model(cfg, device)
    load_weights_into_gpt(model, params)
    if not cfg["tie_weights"]:
        if head is None:
            raise ValueError(f"{weights_path}: tie_word_embeddings is false but there is no lm_head.weight")
        if tuple(head.shape) != tuple(model.out_head.weight.shape):  # copy_ would broadcast a wrong shape
            raise ValueError(f"{weights_path}: lm_head.weight has shape {tuple(head.shape)}, "
                             f"the model needs {tuple(model.out_head.weight.shape)}")
        with torch.no_grad():
            model.out_head.weight.copy_(torch.from_numpy(head))
    return model


def save_hf_gpt2(model: GPTModel, folder: str | os.PathLike) -> Path:
    """Write `model` as an HF GPT-2 folder that `GPT2LMHeadModel.from_pretrained(folder)` loads.

    A model whose output head is not its token embedding (seed-style, untied)
    is stored with its own `lm_head.weight` and `tie_word_embeddings: false`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tied = bool(torch.equal(model.out_head.weight, model.tok_emb.weight))
    params = params_from_gpt(model)
    tensors = {f"transformer.{name}": params[key] for name, key in TOP_NAMES.items()}
    for i, block in enumerate(params["blocks"]):
        for name, path in LAYER_NAMES.items():
            value = block
            for key in path:
                value = value[key]
            tensors[f"transformer.h.{i}.{name}"] = value
    if not tied:
        tensors["lm_head.weight"] = model.out_head.weight.detach().to("cpu", torch.float32).numpy()
    with atomic_write(folder / "model.safetensors") as f:
        f.write(save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, metadata={"format": "pt"}))
    with atomic_write(folder / "config.json") as f:
        f.write((json.dumps(hf_config_from_model(model, tied), indent=2) + "\n").encode())
    return folder
