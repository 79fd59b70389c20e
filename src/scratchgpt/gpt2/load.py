"""OpenAI GPT-2 weights <-> GPTModel.

`params` is the nested dict DESIGN.md fixes (OpenAI's variable tree with the
leading `model/` dropped and the size-1 conv axis squeezed):

    {"wte": [V, E], "wpe": [C, E], "g": [E], "b": [E],           # ln_f is g, b
     "blocks": [{"attn": {"c_attn": {"w": [E, 3E], "b": [3E]}, "c_proj": {"w": [E, E], "b": [E]}},
                 "ln_1": {"g", "b"}, "ln_2": {"g", "b"},
                 "mlp": {"c_fc": {"w": [E, 4E], "b": [4E]}, "c_proj": {"w": [4E, E], "b": [E]}}}, ...]}

OpenAI's conv1d weights are [in, out] and compute `x @ w + b`; `nn.Linear`
stores [out, in], hence the transposes. `c_attn` holds query, key and value
side by side along its last axis.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import GPT2_SIZES
from ..fileio import atomic_write
from ..model import GPTModel, empty_model
from ..tokenizer import get_tokenizer
from .download import download_gpt2_files
from .tf_checkpoint import TFCheckpointReader, checkpoint_prefix, release_pages, write_tf_checkpoint

Params = dict[str, Any]
HPARAMS_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")
CONV_WEIGHTS = ("attn/c_attn/w", "attn/c_proj/w", "mlp/c_fc/w", "mlp/c_proj/w")


def gpt2_config_from_hparams(settings: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """The seed-style config of the model an OpenAI `hparams.json` describes (tied head, qkv biases)."""
    missing = [k for k in HPARAMS_KEYS if k not in settings]
    if missing:
        raise ValueError(f"GPT-2 hparams lack {missing} (have {sorted(settings)})")
    cfg = {"vocab_size": settings["n_vocab"], "context_length": settings["n_ctx"], "emb_dim": settings["n_embd"],
           "n_heads": settings["n_head"], "n_layers": settings["n_layer"], "drop_rate": 0.0, "qkv_bias": True,
           "tie_weights": True}
    cfg.update(overrides)
    return cfg


def hparams_from_config(cfg: GPTModel | dict[str, Any]) -> dict[str, int]:
    """OpenAI's `hparams.json` for a model (or a seed-style config)."""
    cfg = cfg.cfg.to_dict() if isinstance(cfg, GPTModel) else cfg
    return {"n_vocab": cfg["vocab_size"], "n_ctx": cfg["context_length"], "n_embd": cfg["emb_dim"],
            "n_head": cfg["n_heads"], "n_layer": cfg["n_layers"]}


def tf_tensor_names(n_layer: int) -> list[str]:
    """The names of the 12 * n_layer + 4 variables of an OpenAI GPT-2 checkpoint."""
    per_layer = ["attn/c_attn/b", "attn/c_attn/w", "attn/c_proj/b", "attn/c_proj/w", "ln_1/b", "ln_1/g",
                 "ln_2/b", "ln_2/g", "mlp/c_fc/b", "mlp/c_fc/w", "mlp/c_proj/b", "mlp/c_proj/w"]
    names = [f"model/h{i}/{leaf}" for i in range(n_layer) for leaf in per_layer]
    return names + ["model/ln_f/b", "model/ln_f/g", "model/wpe", "model/wte"]


def params_from_tf_tensors(tensors: dict[str, np.ndarray], n_layer: int, source: str = "checkpoint") -> Params:
    """Arrange OpenAI's flat `model/...` variables into the nested `params` dict."""
    params: Params = {"blocks": [{} for _ in range(n_layer)]}
    for name in tf_tensor_names(n_layer):
        if name not in tensors:
            raise ValueError(f"{source} has no tensor {name!r} (is n_layer={n_layer} right?)")
        array = tensors[name]
        parts = name.split("/")[1:]  # drop "model"; "h3" picks a block, "ln_f" is dropped as OpenAI's loaders do
        target = params["blocks"][int(parts[0][1:])] if parts[0].startswith("h") else params
        if "/".join(parts[1:]) in CONV_WEIGHTS:
            if array.ndim != 3 or array.shape[0] != 1:
                raise ValueError(f"{source}: tensor {name!r} has shape {list(array.shape)}, expected [1, in, out]")
            array = array[0]
        for key in parts[1:-1]:
            target = target.setdefault(key, {})
        target[parts[-1]] = array
    return params


def tf_tensors_from_params(params: Params) -> dict[str, np.ndarray]:
    """The inverse of `params_from_tf_tensors`: OpenAI's flat variables, conv weights as [1, in, out]."""
    tensors = {"model/wte": params["wte"], "model/wpe": params["wpe"],
               "model/ln_f/g": params["g"], "model/ln_f/b": params["b"]}

    def walk(tree: dict, path: str) -> None:
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, f"{path}/{key}")
            else:
                name = f"{path}/{key}"
                tensors[name] = value[None] if name.split("/", 2)[2] in CONV_WEIGHTS else value

    for i, block in enumerate(params["blocks"]):
        walk(block, f"model/h{i}")
    return tensors


def load_gpt2_params_from_tf_ckpt(ckpt_path: str | os.PathLike, settings: dict[str, Any]) -> Params:
    """The `params` of an OpenAI GPT-2 TensorFlow checkpoint, read without TensorFlow.

    `ckpt_path` is the checkpoint prefix (e.g. `gpt2/124M/model.ckpt`), its
    `.index` file, or the model folder. The arrays are read-only, CRC-checked
    views of the memory-mapped data file: nothing is copied until the weights
    are loaded into a model.
    """
    reader = TFCheckpointReader(ckpt_path)
    names = tf_tensor_names(settings["n_layer"])
    tensors = {name: reader[name] for name in names if name in reader}
    return params_from_tf_tensors(tensors, settings["n_layer"], str(reader.index_path))


def _assign(param: torch.Tensor, array: np.ndarray, what: str, transpose: bool = False) -> None:
    """Copy `array` (or its transpose) into `param` in place; refuse any shape mismatch."""
    source = torch.from_numpy(np.asarray(array))
    if transpose:
        source = source.T
    if tuple(source.shape) != tuple(param.shape):
        shown = f"{list(array.shape)} (transposed {list(source.shape)})" if transpose else f"{list(array.shape)}"
        raise ValueError(f"GPT-2 weights {what} have shape {shown}, the model expects {list(param.shape)}")
    param.copy_(source)


def load_weights_into_gpt(gpt: GPTModel, params: Params) -> None:
    """Copy OpenAI GPT-2 `params` into `gpt` in place.

    `gpt` must be built for them: `context_length = n_ctx`, `qkv_bias = True`
    (see `gpt2_config_from_hparams`). Every parameter is written (the output
    head from `wte`, as GPT-2 ties them); any shape mismatch raises a
    ValueError naming the tensor and both shapes instead of broadcasting.
    """
    blocks = params["blocks"]
    if len(blocks) != len(gpt.trf_blocks):
        raise ValueError(f"GPT-2 weights have {len(blocks)} layers, the model has {len(gpt.trf_blocks)}")
    if gpt.trf_blocks[0].att.W_query.bias is None:
        raise ValueError("GPT-2 has query/key/value biases: build the model with qkv_bias=True")
    written: set[int] = set()

    def put(param: torch.Tensor, array: np.ndarray, what: str, transpose: bool = False) -> None:
        _assign(param, array, what, transpose)
        written.add(id(param))

    with torch.no_grad(), warnings.catch_warnings():
        # read-only memory-mapped arrays: torch warns it may not write to them, and it never does
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        put(gpt.pos_emb.weight, params["wpe"], "wpe")
        put(gpt.tok_emb.weight, params["wte"], "wte")
        if gpt.out_head.weight is not gpt.tok_emb.weight:
            put(gpt.out_head.weight, params["wte"], "wte (as out_head)")
        release_pages(params["wpe"])
        release_pages(params["wte"])
        for i, (block, p) in enumerate(zip(gpt.trf_blocks, blocks)):
            c_attn_w, c_attn_b = p["attn"]["c_attn"]["w"], p["attn"]["c_attn"]["b"]
            if c_attn_w.ndim != 2 or c_attn_w.shape[-1] % 3 or c_attn_b.shape[-1] % 3:
                raise ValueError(f"GPT-2 weights h{i}/attn/c_attn have shapes {list(c_attn_w.shape)} and "
                                 f"{list(c_attn_b.shape)}: not query, key and value side by side")
            qkv = zip(("query", "key", "value"), (block.att.W_query, block.att.W_key, block.att.W_value),
                      np.split(c_attn_w, 3, axis=-1), np.split(c_attn_b, 3, axis=-1))
            for name, linear, w, b in qkv:
                put(linear.weight, w, f"h{i}/attn/c_attn/w ({name})", transpose=True)
                put(linear.bias, b, f"h{i}/attn/c_attn/b ({name})")
            layers = [(block.att.out_proj, p["attn"]["c_proj"], "attn/c_proj"),
                      (block.ff.layers[0], p["mlp"]["c_fc"], "mlp/c_fc"),
                      (block.ff.layers[2], p["mlp"]["c_proj"], "mlp/c_proj")]
            for linear, conv, name in layers:
                put(linear.weight, conv["w"], f"h{i}/{name}/w", transpose=True)
                put(linear.bias, conv["b"], f"h{i}/{name}/b")
            for norm, ln, name in [(block.norm1, p["ln_1"], "ln_1"), (block.norm2, p["ln_2"], "ln_2")]:
                put(norm.scale, ln["g"], f"h{i}/{name}/g")
                put(norm.shift, ln["b"], f"h{i}/{name}/b")
            for array in [c_attn_w, c_attn_b, *(conv[k] for _, conv, _ in layers for k in "wb"),
                          *(ln[k] for ln in (p["ln_1"], p["ln_2"]) for k in "gb")]:
                release_pages(array)  # keep at most one layer of the file resident beside the model
        put(gpt.final_norm.scale, params["g"], "ln_f/g")
        put(gpt.final_norm.shift, params["b"], "ln_f/b")
    unwritten = [name for name, param in gpt.named_parameters() if id(param) not in written]
    if unwritten:
        raise ValueError(f"GPT-2 weights have nothing for model parameters {unwritten}")


def params_from_gpt(gpt: GPTModel) -> Params:
    """A GPTModel's weights as OpenAI GPT-2 `params` (float32 numpy arrays): the inverse of loading.

    `wte` is the token embedding; the output head is not part of `params`
    (GPT-2 ties it to `wte`). A model built without query/key/value biases gets zero biases.
    """
    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu", torch.float32).numpy()

    def conv(linear: torch.nn.Linear) -> dict[str, np.ndarray]:  # nn.Linear [out, in] -> conv1d [in, out]
        bias = linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
        return {"w": np.ascontiguousarray(arr(linear.weight).T), "b": arr(bias)}

    blocks = []
    for block in gpt.trf_blocks:
        qkv = [conv(m) for m in (block.att.W_query, block.att.W_key, block.att.W_value)]
        blocks.append({
            "attn": {"c_attn": {"w": np.concatenate([c["w"] for c in qkv], axis=1),
                                "b": np.concatenate([c["b"] for c in qkv])},
                     "c_proj": conv(block.att.out_proj)},
            "ln_1": {"g": arr(block.norm1.scale), "b": arr(block.norm1.shift)},
            "ln_2": {"g": arr(block.norm2.scale), "b": arr(block.norm2.shift)},
            "mlp": {"c_fc": conv(block.ff.layers[0]), "c_proj": conv(block.ff.layers[2])},
        })
    return {"wte": arr(gpt.tok_emb.weight), "wpe": arr(gpt.pos_emb.weight), "g": arr(gpt.final_norm.scale),
            "b": arr(gpt.final_norm.shift), "blocks": blocks}


def read_hparams(folder: str | os.PathLike) -> dict[str, Any]:
    """The `hparams.json` of an OpenAI model folder."""
    path = Path(folder) / "hparams.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (not an OpenAI GPT-2 model folder?)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def download_and_load_gpt2(model_size: str, models_dir: str | os.PathLike,
                           base_url: str | None = None, **download_options: Any) -> tuple[dict[str, Any], Params]:
    """Fetch OpenAI's GPT-2 `model_size` into `models_dir/model_size` (unless present) and read it.

    Returns `(settings, params)`: the `hparams.json` dict and the weights (see module doc).
    `download_options` go to `download_gpt2_files` (retries, backoff, progress, ...).
    """
    folder = download_gpt2_files(model_size, models_dir, base_url=base_url, **download_options)
    settings = read_hparams(folder)
    return settings, load_gpt2_params_from_tf_ckpt(checkpoint_prefix(folder), settings)


def load_gpt2_from_folder(folder: str | os.PathLike, device: str | torch.device = "cpu") -> GPTModel:
    """A ready GPTModel (eval mode, on `device`) from an OpenAI GPT-2 model folder."""
    settings = read_hparams(folder)
    params = load_gpt2_params_from_tf_ckpt(checkpoint_prefix(folder), settings)
    model = empty_model(gpt2_config_from_hparams(settings), device)
    load_weights_into_gpt(model, params)
    return model


def load_gpt2(size_or_folder: str | os.PathLike, models_dir: str | os.PathLike = "gpt2",
              device: str | torch.device = "cpu", base_url: str | None = None,
              **download_options: Any):
    """One call to a usable GPT-2: `(model, tokenizer)`.

    `size_or_folder` is one of OpenAI's sizes ("124M", "355M", "774M", "1558M"),
    downloaded into `models_dir/<size>` unless already there, or the path of an
    OpenAI model folder. The tokenizer comes from the folder's `encoder.json` +
    `vocab.bpe` when it has them, else from the usual offline lookup (`get_tokenizer()`).
    """
    if str(size_or_folder) in GPT2_SIZES:
        folder = download_gpt2_files(str(size_or_folder), models_dir, base_url=base_url, **download_options)
    else:
        folder = Path(size_or_folder)
        if not folder.is_dir():
            raise ValueError(f"{size_or_folder!r} is neither a GPT-2 size {list(GPT2_SIZES)} nor a model folder")
    return load_gpt2_from_folder(folder, device), tokenizer_for_folder(folder)


def tokenizer_for_folder(folder: str | os.PathLike):
    """The GPT-2 tokenizer from a model folder's `encoder.json` + `vocab.bpe`, else from `get_tokenizer()`."""
    folder = Path(folder)
    has_vocab = (folder / "encoder.json").is_file() and (folder / "vocab.bpe").is_file()
    return get_tokenizer(folder if has_vocab else None)


def save_gpt2_tf(model: GPTModel, folder: str | os.PathLike) -> Path:
    """Write `model` as an OpenAI GPT-2 folder: `hparams.json`, `checkpoint`, `model.ckpt.{index,data-*,meta}`.

    TensorFlow and `load_gpt2` read the result. `model.ckpt.meta` is written
    empty (a valid, empty MetaGraphDef): no reader of weights needs it.
    """
    if not torch.equal(model.out_head.weight, model.tok_emb.weight):
        raise ValueError("OpenAI's GPT-2 layout ties the output head to wte, but this model's out_head differs")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tf_checkpoint(folder / "model.ckpt", tf_tensors_from_params(params_from_gpt(model)))
    with atomic_write(folder / "model.ckpt.meta") as f:
        f.write(b"")
    with atomic_write(folder / "hparams.json") as f:
        f.write(json.dumps(hparams_from_config(model), indent=2).encode())
    return folder
