"""Moving a GPT-2 between the three places it can live.

- `openai`: an OpenAI model folder (`hparams.json` + TensorFlow checkpoint), as downloaded;
- `hf`: a Hugging Face folder (`config.json` + `model.safetensors`);
- `checkpoint`: a scratchgpt checkpoint file (`save_checkpoint`).

A LoRA adapter can be merged into the model on the way (`lora`). What a model was
fine-tuned for (a checkpoint's or adapter's `task`: a classifier's labels, a prompt
style) goes along into a checkpoint; a classifier has no OpenAI or HF GPT-2 layout.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from ..checkpoint import checkpoint_task, load_model_from_checkpoint, save_checkpoint, shape_for_task
from ..lora import apply_adapter, merge_lora, read_adapter
from ..model import GPTModel
from .hf import load_hf_gpt2, save_hf_gpt2
from .load import load_gpt2_from_folder, save_gpt2_tf

FORMATS = ("openai", "hf", "checkpoint")
VOCAB_FILES = ("encoder.json", "vocab.bpe")


def detect_format(path: str | os.PathLike) -> str:
    """The format of an existing model at `path`, judged by the files it holds."""
    path = Path(path)
    if path.is_file():
        return "checkpoint"
    if (path / "hparams.json").is_file():
        return "openai"
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return "hf"
    raise ValueError(f"{path}: neither a checkpoint file, an OpenAI folder (hparams.json) nor an HF folder "
                     "(config.json + model.safetensors)")


def load_model(fmt: str, path: str | os.PathLike, device: str | torch.device = "cpu") -> GPTModel:
    """A GPTModel (eval mode, on `device`) from a model stored in format `fmt`."""
    loaders = {"openai": load_gpt2_from_folder, "hf": load_hf_gpt2, "checkpoint": load_model_from_checkpoint}
    if fmt not in loaders:
        raise ValueError(f"unknown model format {fmt!r}; choose one of {list(FORMATS)}")
    return loaders[fmt](path, device)


def save_model(fmt: str, model: GPTModel, path: str | os.PathLike, task: dict | None = None) -> Path:
    """Store `model` at `path` in format `fmt`, with the `task` it was fine-tuned for (checkpoints only)."""
    if fmt in ("openai", "hf") and (task or {}).get("kind") == "classify":
        raise ValueError(f"a classifier (labels {task['labels']}) has no {fmt} GPT-2 layout: use --to checkpoint")
    if fmt == "openai":
        return save_gpt2_tf(model, path)
    if fmt == "hf":
        return save_hf_gpt2(model, path)
    if fmt == "checkpoint":
        save_checkpoint(path, model, **({"task": task} if task else {}))
        return Path(path)
    raise ValueError(f"unknown model format {fmt!r}; choose one of {list(FORMATS)}")


def convert(src: str | os.PathLike, dst: str | os.PathLike, dst_format: str, src_format: str | None = None,
            lora: str | os.PathLike | None = None) -> Path:
    """Load the model at `src` (format detected unless given) and store it at `dst` as `dst_format`;
    with `lora`, an adapter for that model (file or PEFT folder), merged into its weights.

    A source folder's tokenizer files (`encoder.json` + `vocab.bpe`) go along
    into a destination folder, so `load_gpt2` and `--hf` find the vocabulary there.
    """
    src, dst = Path(src), Path(dst)
    src_format = src_format or detect_format(src)
    if src.resolve() == dst.resolve():
        raise ValueError(f"{dst}: source and destination are the same")
    model = load_model(src_format, src)
    task = checkpoint_task(src) if src_format == "checkpoint" else {}
    if lora is not None:
        adapter = read_adapter(lora)
        task = adapter.get("task", {})
        apply_adapter(shape_for_task(model, task), adapter, str(lora))  # a classifier adapter brings its head
        model = merge_lora(model)
    out = save_model(dst_format, model, dst, task)
    if dst_format != "checkpoint" and all((src / name).is_file() for name in VOCAB_FILES):
        for name in VOCAB_FILES:
            shutil.copyfile(src / name, out / name)
    return out
