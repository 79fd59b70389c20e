"""Saving and loading checkpoints: atomic writes, and loading that never runs code.

A checkpoint is a `torch.save` dict in the seed's layout: `model_state_dict`,
optionally `optimizer_state_dict`, plus `config` (the model's seed-style dict)
and whatever extra entries the caller passes. It is written to a temporary
file, fsynced and renamed, so a crash never leaves a half-written file under
the final name; it is read with `torch.load(weights_only=True)`, which refuses
anything but tensors and plain containers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import GPTConfig
from .fileio import atomic_write
from .kernels import check_quantization
from .model import GPTModel, empty_model
from .tasks.classify import replace_head


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside `torch.compile` and DistributedDataParallel wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """`torch.save` to `path` atomically (temporary file, fsync, rename)."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu", mmap: bool = False) -> Any:
    """`torch.load` that only accepts tensors and plain containers; errors name the file.
    `mmap` maps the tensors instead of reading them (for a look at the other entries)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise ValueError(f"{path}: not a loadable checkpoint (refused or corrupt): {first_line}") from None


def save_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, **extra: Any) -> None:
    """Save model (and optimizer) state plus `extra` entries atomically to `path`."""
    model = unwrap_model(model)
    state: dict[str, Any] = {"model_state_dict": model.state_dict()}
    if optimizer is not None:
        state["optimizer_state_dict"] = optimizer.state_dict()
    if isinstance(getattr(model, "cfg", None), GPTConfig):
        state["config"] = model.cfg.to_dict()
    state.update(extra)
    atomic_save(state, path)


def config_beside(path: str | os.PathLike) -> Path:
    """Where `save_model` puts the config of a bare state dict: same name, `.json` (model.pth -> model.json)."""
    return Path(path).with_suffix(".json")


def save_model(path: str | os.PathLike, model: nn.Module, task: dict[str, Any] | None = None) -> None:
    """The seed's `model.pth`: the bare state dict, written atomically, and the model's
    seed-style config beside it (`config_beside`) so that the file can be loaded on its own;
    a fine-tuned model's `task` entry (e.g. a classifier's labels) goes into that file too."""
    if config_beside(path) == Path(path):
        raise ValueError(f"{path}: a .json name would be overwritten by the config; use e.g. model.pth")
    model = unwrap_model(model)
    atomic_save(model.state_dict(), path)
    if isinstance(getattr(model, "cfg", None), GPTConfig):
        beside = {**model.cfg.to_dict(), **({"task": task} if task else {})}
        with atomic_write(config_beside(path)) as f:
            f.write(json.dumps(beside, indent=2).encode() + b"\n")


def check_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise one error listing every missing, unexpected or differently shaped tensor."""
    check_quantization(model, state_dict, source)  # float vs int8: one clear line instead of every key
    expected = model.state_dict()
    problems = [  # shapes first: they say most about how the configs differ
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    problems += [f"missing {k}" for k in expected if k not in state_dict]
    problems += [f"unexpected {k}" for k in state_dict if k not in expected]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise ValueError(f"{source} does not fit this model: {shown}")


def _is_state_dict(state: Any) -> bool:
    """Whether a loaded file is a bare state dict, as the seed's `torch.save(model.state_dict(), "model.pth")`."""
    return isinstance(state, dict) and bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _model_state(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The model weights of a trainer/seed checkpoint or of a bare seed `model.pth` state dict."""
    if isinstance(state, dict) and "model_state_dict" in state:
        return state["model_state_dict"]
    if _is_state_dict(state):
        return state
    from .lora import is_adapter  # lora.py builds on this module

    if is_adapter(state):
        raise ValueError(f"{path}: is a LoRA adapter, not a model: load its base ({state['base']['source']}) "
                         f"and apply it (--lora), or merge it into one (convert --merge-lora)")
    raise ValueError(f"{path}: holds neither a state dict nor a 'model_state_dict' entry")


def load_checkpoint(path: str | os.PathLike, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """Load weights (and optimizer state) from `path` into `model`; return the other entries."""
    path = Path(path)
    state = safe_load(path)
    model = unwrap_model(model)
    weights = _model_state(state, path)
    check_state_dict(model, weights, str(path))
    model.load_state_dict(weights)
    if optimizer is not None:
        if "optimizer_state_dict" not in state:
            raise ValueError(f"{path}: has no optimizer_state_dict to resume the optimizer from")
        optimizer.load_state_dict(state["optimizer_state_dict"])
    if weights is state:
        return {}
    return {k: v for k, v in state.items() if k not in ("model_state_dict", "optimizer_state_dict")}


def _config_beside(path: Path) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(config, task) from the JSON `save_model` wrote beside a bare state dict; None if absent."""
    beside = config_beside(path)
    if not beside.is_file():
        return None
    try:
        cfg = json.loads(beside.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{beside}: not a JSON model config ({exc})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{beside}: not a JSON model config (not an object)")
    task = cfg.pop("task", {})
    return cfg, task if isinstance(task, dict) else {}


def shape_for_task(model: GPTModel, task: dict[str, Any]) -> GPTModel:
    """Give a freshly built model the shape its fine-tuning `task` (a checkpoint's `task` entry)
    left it in, so that the tuned weights fit: a classifier's head. Returns the model."""
    if task.get("kind") == "classify":
        replace_head(model, len(task["labels"]))
    return model


def load_model_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu",
                               config: dict[str, Any] | None = None) -> GPTModel:
    """Build a GPTModel from `config`, else the checkpoint's stored config, else the JSON
    config `save_model` wrote beside a bare state dict, give it the shape its fine-tuning
    task left it in (`shape_for_task`), and load its weights."""
    path = Path(path)
    state = safe_load(path)
    weights = _model_state(state, path)
    stored, task = (None, {}) if weights is state else (state.get("config"), state.get("task", {}))
    source = str(path)
    beside = _config_beside(path) if stored is None else None
    if beside is not None:
        stored, task = beside
        source = f"{path} (with the config in {config_beside(path).name})"
    cfg = config if config is not None else stored
    if cfg is None:
        raise ValueError(f"{path}: stores no model config and has no {config_beside(path).name} beside it; "
                         f"pass the config the model was built with")
    model = shape_for_task(empty_model(cfg, device), task)  # every parameter is loaded below: no random init
    check_state_dict(model, weights, source)
    model.load_state_dict(weights)
    return model


def checkpoint_task(path: str | os.PathLike) -> dict[str, Any]:
    """The `task` entry a fine-tuning run stored in its checkpoints and adapters: what using the
    model needs (e.g. {"kind": "instruct", "prompt_style": "alpaca"}, or the label names of a
    classifier); {} for a language model or a file without one. A bare state dict's is in the
    JSON beside it. The weights are only mapped, not read."""
    path = Path(path)
    state = safe_load(path, mmap=True)
    if _is_state_dict(state):
        beside = _config_beside(path)
        return beside[1] if beside is not None else {}
    task = state.get("task", {}) if isinstance(state, dict) else {}
    return task if isinstance(task, dict) else {}
