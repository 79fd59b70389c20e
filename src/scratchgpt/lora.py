"""LoRA: fine-tune a frozen model through small low-rank additions to its linear layers.

A linear layer `y = x W^T + b` gets a trainable side path `(alpha / rank) * x A B`
with A [in, rank] and B [rank, out] (the walkthrough's appendix E names). B starts
at zero, so the wrapped model computes exactly what the base did until training
moves it. Only A and B (and any module the caller keeps training in full, such
as a new classification head) are trained and saved: for GPT-2 124M at rank 8 on
query and value, 1.2 MB instead of 500 MB.

An adapter file records everything needed to use it again without guessing:
the tensors, each layer's rank, alpha and dropout, which parameters were trained
in full, and the identity of its base (where it came from, and a hash of its
weights), so that loading it onto another base is an error instead of noise.
`merge_lora` folds the additions into the weights: a plain `GPTModel` again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import crc32c
import torch
from torch import nn

from .checkpoint import atomic_save, safe_load, unwrap_model

# The layers of a GPTModel LoRA can wrap, by the short names the CLI takes.
LORA_TARGETS: dict[str, str] = {
    "query": "att.W_query",
    "key": "att.W_key",
    "value": "att.W_value",
    "out_proj": "att.out_proj",  # the attention output projection
    "ff_in": "ff.layers.0",  # the MLP's E -> 4E layer
    "ff_out": "ff.layers.2",  # the MLP's 4E -> E layer
    "out_head": "out_head",
}
ADAPTER_FORMAT = "scratchgpt-lora"  # the "format" entry that marks a file as an adapter


def check_lora_hyperparameters(rank: int, alpha: float, dropout: float) -> None:
    """Raise a ValueError naming a rank below 1, an alpha that is not positive or a dropout outside [0, 1)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"LoRA rank must be an integer >= 1, got {rank!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")


class LoRALayer(nn.Module):
    """The low-rank side path: `(alpha / rank) * dropout(x) @ A @ B`.

    The scaling is alpha / rank, not alpha (the walkthrough's code multiplies by
    alpha alone): with it, changing the rank does not change how far a step moves
    the output, and the numbers mean what they mean in PEFT and the LoRA paper.
    A is Kaiming-uniform with the input width as fan-in, as a `Linear(in_dim, rank)`
    would be (PEFT and loralib do the same); B is zero.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        check_lora_hyperparameters(rank, alpha, dropout)
        self.rank, self.alpha, self.scaling = rank, float(alpha), alpha / rank
        self.A = nn.Parameter(torch.empty(in_dim, rank))
        nn.init.kaiming_uniform_(self.A.T, a=math.sqrt(5))  # through [rank, in]: fan-in = in_dim
        self.B = nn.Parameter(torch.zeros(rank, out_dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scaling * (self.dropout(x) @ self.A @ self.B)


class LinearWithLoRA(nn.Module):
    """A frozen `linear` plus a `LoRALayer` beside it: `linear(x) + lora(x)`."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.linear = linear
        weight = linear.weight
        self.lora = LoRALayer(linear.in_features, linear.out_features, rank, alpha, dropout).to(
            device=weight.device, dtype=weight.dtype)
        self.train(linear.training)  # a layer wrapped in an eval-mode model stays in eval mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.lora(x)

    # The wrapped layer's weight and bias, so that code reading a layer's weight (the
    # tied-head check, parameter counts) works the same on a wrapped model.
    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias


def lora_layers(model: nn.Module) -> dict[str, LinearWithLoRA]:
    """The model's LoRA-wrapped layers by module name (empty for a plain model)."""
    return {name: m for name, m in unwrap_model(model).named_modules() if isinstance(m, LinearWithLoRA)}


def lora_settings(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Each LoRA layer's rank, alpha and dropout, by module name (an adapter file's `layers`)."""
    return {name: {"rank": m.lora.rank, "alpha": m.lora.alpha, "dropout": m.lora.dropout.p}
            for name, m in lora_layers(model).items()}


def _matches(name: str, pattern: str) -> bool:
    """Whether module `name` is `pattern` or ends with it (PEFT's target_modules rule)."""
    return name == pattern or name.endswith("." + pattern)


def _target_layers(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Module names of the plain linear layers `targets` select; each target must select one."""
    inner = {f"{name}.linear" for name in lora_layers(model)}  # wrapped already: not again
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name not in inner]
    chosen: list[str] = []
    targets = list(targets)
    if not targets:
        raise ValueError(f"no LoRA targets given; choose from {', '.join(LORA_TARGETS)} or module names")
    for target in targets:
        expanded = list(LORA_TARGETS) if target == "all" else [target]
        for name in expanded:
            pattern = LORA_TARGETS.get(name, name)
            found = [layer for layer in linear if _matches(layer, pattern)]
            if not found:
                raise ValueError(f"LoRA target {name!r} matches no linear layer of this model (targets: "
                                 f"{', '.join(LORA_TARGETS)}, all, or a module name such as "
                                 f"trf_blocks.0.att.W_query; layers already wrapped are not wrapped again)")
            chosen += [layer for layer in found if layer not in chosen]
    return chosen


def replace_linear_with_lora(model: nn.Module, rank: int, alpha: float,
                             targets: Sequence[str] = tuple(LORA_TARGETS), dropout: float = 0.0,
                             modules_to_save: Sequence[str] = ()) -> nn.Module:
    """Wrap the `targets` linear layers of `model` in `LinearWithLoRA`, in place, and freeze the rest.

    `targets` are names from `LORA_TARGETS` (by default all of them, as the
    walkthrough wraps every linear layer), "all", or module names (a name selects
    every layer whose name ends with it, as PEFT's target_modules do). Afterwards
    only the LoRA parameters and those of `modules_to_save` (module or parameter
    names, e.g. a new classification head "out_head") require gradients; those
    are what `save_adapter` writes. Returns `model`.
    """
    names = _target_layers(model, targets)
    params = [name for name, _ in model.named_parameters()]
    for keep in modules_to_save:
        if not any(_matches_param(p, keep) for p in params):
            raise ValueError(f"module to save {keep!r} has no parameters in this model")
        both = [name for name in names if _matches_param(name + ".weight", keep)]
        if both:
            raise ValueError(f"{both[0]} is both a LoRA target and trained in full ({keep!r}): choose one")
    for name in names:
        _set_module(model, name, LinearWithLoRA(model.get_submodule(name), rank, alpha, dropout))
    _freeze_all_but(model, modules_to_save)
    return model


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` in `model` under the dotted `name`, in place of what was there."""
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)  # get_submodule("") is the model itself


def _matches_param(param_name: str, module_or_param: str) -> bool:
    """Whether a parameter belongs to a module (or is the parameter) named `module_or_param`."""
    return param_name == module_or_param or param_name.startswith(module_or_param + ".")


def _lora_parameter_names(model: nn.Module) -> set[str]:
    return {f"{name}.lora.{leaf}" for name in lora_layers(model) for leaf in ("A", "B")}


def _freeze_all_but(model: nn.Module, trained_in_full: Iterable[str]) -> None:
    """requires_grad only for the LoRA parameters and those under `trained_in_full`."""
    keep = list(trained_in_full)
    lora = _lora_parameter_names(model)
    for name, param in model.named_parameters():
        param.requires_grad_(name in lora or any(_matches_param(name, k) for k in keep))


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA layer into its linear weight, in place: W + (alpha / rank) (A B)^T.

    Returns the model with plain linear layers again (for a GPTModel, its
    `state_dict` is the seed layout), every parameter trainable. A new weight
    tensor is made per merged layer, so a weight shared with another module
    (GPT-2's output head is its token embedding) is never written through; a
    merged output head is no longer tied, and the config says so.
    """
    model = unwrap_model(model)
    for name, layer in lora_layers(model).items():
        linear, lora = layer.linear, layer.lora
        delta = (lora.A.detach().float() @ lora.B.detach().float()).T * lora.scaling
        linear.weight = nn.Parameter((linear.weight.detach().float() + delta).to(linear.weight.dtype))
        _set_module(model, name, linear)
    cfg = getattr(model, "cfg", None)
    if cfg is not None and cfg.tie_weights and model.out_head.weight is not model.tok_emb.weight:
        model.cfg = dataclasses.replace(cfg, tie_weights=False)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


# --------------------------------------------------------------------------- adapter files

def base_parameters(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """The base model's parameters under their plain names (`W_query.weight`, not
    `W_query.linear.weight`), without LoRA's and without those named in `exclude`.
    A shared tensor (a tied head) appears once."""
    model = unwrap_model(model)
    wrapped = lora_layers(model)
    renames = {f"{n}.linear.{leaf}": f"{n}.{leaf}" for n in wrapped for leaf in ("weight", "bias")}
    skip = _lora_parameter_names(model) | set(exclude)
    return {renames.get(name, name): p for name, p in model.named_parameters() if name not in skip}


def weights_hash(params: dict[str, torch.Tensor]) -> str:
    """A content hash of named tensors, independent of their device and storage dtype.

    It identifies a base (it is not a security measure): sha256 over each tensor's
    name, shape and the CRC32C of its float32 bytes. Hardware CRC32C reads ~10 GB/s,
    so hashing GPT-2 1558M takes well under a second, where sha256 over the bytes
    would take seconds.
    """
    digest = hashlib.sha256()
    for name in sorted(params):
        tensor = params[name].detach().to("cpu", torch.float32).contiguous()
        crc = crc32c.crc32c(tensor.numpy().view("uint8").data) if tensor.numel() else 0
        digest.update(f"{name} {list(tensor.shape)} {crc:08x}\n".encode())
    return digest.hexdigest()


def base_identity(model: nn.Module, source: str | None = None, exclude: Iterable[str] = ()) -> dict[str, Any]:
    """What an adapter records about its base: `source` (e.g. "gpt2:124M" or a checkpoint
    path, for people and for resuming), the model config, and the hash of the weights the
    adapter does not replace (which is what `load_adapter` checks, so the same GPT-2 loaded
    from an OpenAI folder, an HF export or a converted checkpoint is the same base)."""
    model = unwrap_model(model)
    cfg = getattr(model, "cfg", None)
    return {"source": source, "config": cfg.to_dict() if cfg is not None else None,
            "weights": weights_hash(base_parameters(model, exclude))}


def trained_in_full(model: nn.Module) -> list[str]:
    """Parameters outside LoRA that still train (a new head, say): they belong to the adapter."""
    lora = _lora_parameter_names(model)
    return [name for name, p in unwrap_model(model).named_parameters() if p.requires_grad and name not in lora]


def adapter_checkpoint(model: nn.Module, base: dict[str, Any]) -> dict[str, Any]:
    """The contents of an adapter file for `model` (LoRA-wrapped) on `base` (`base_identity`)."""
    model = unwrap_model(model)
    layers = lora_settings(model)
    if not layers:
        raise ValueError("the model has no LoRA layers: wrap it with replace_linear_with_lora first")
    full = trained_in_full(model)
    params = dict(model.named_parameters())
    keys = sorted(_lora_parameter_names(model)) + full
    return {
        "format": ADAPTER_FORMAT,
        "layers": layers,
        "trained_in_full": full,
        "base": base,
        "adapter_state_dict": {k: params[k].detach().clone() for k in keys},
    }


def save_adapter(path: str | os.PathLike, model: nn.Module, source: str | None = None, **extra: Any) -> None:
    """Write `model`'s adapter (LoRA tensors, parameters trained in full, hyperparameters and
    the base's identity, `source` naming the base) to `path` atomically; `extra` entries go along."""
    model = unwrap_model(model)
    state = adapter_checkpoint(model, base_identity(model, source, exclude=trained_in_full(model)))
    atomic_save({**state, **extra}, path)


def is_adapter(state: Any) -> bool:
    """Whether a loaded file is an adapter (from `save_adapter` or a LoRA run's checkpoint)."""
    return isinstance(state, dict) and state.get("format") == ADAPTER_FORMAT


def read_adapter(path: str | os.PathLike) -> dict[str, Any]:
    """An adapter from a scratchgpt adapter file or a Hugging Face PEFT adapter folder."""
    path = Path(path)
    if path.is_dir():
        from .gpt2.peft import read_peft_adapter  # PEFT's layout is GPT-2's, mapped in gpt2/

        return read_peft_adapter(path)
    state = safe_load(path)
    if not is_adapter(state):
        what = "a model checkpoint" if isinstance(state, dict) and "model_state_dict" in state else "not one"
        raise ValueError(f"{path}: not a LoRA adapter ({what}; adapters come from `train --lora-rank` "
                         f"or `convert --to lora`)")
    return state


def describe_lora(layers: dict[str, dict[str, Any]]) -> str:
    """'rank 8, alpha 16 on 24 layers (query, value)' for an adapter's `layers` entry."""
    if not layers:
        return "no LoRA layers"
    shapes = sorted({(s["rank"], s["alpha"], s["dropout"]) for s in layers.values()})
    kinds = sorted({next((short for short, pattern in LORA_TARGETS.items() if _matches(name, pattern)), name)
                    for name in layers})
    hyper = "; ".join(f"rank {r}, alpha {a:g}" + (f", dropout {d:g}" if d else "") for r, a, d in shapes)
    return f"{hyper} on {len(layers)} layers ({', '.join(kinds)})"


def apply_adapter(model: nn.Module, adapter: dict[str, Any], source: str = "adapter") -> None:
    """Put `adapter` (from `read_adapter`) on `model`, in place: wrap its layers, load its tensors,
    and freeze the rest as in training. Refuses, naming the difference and changing nothing,
    an adapter for another base (other weights, other shapes) and a model already wrapped
    differently (e.g. resuming with other LoRA flags)."""
    model = unwrap_model(model)
    layers, full, state = adapter["layers"], list(adapter["trained_in_full"]), adapter["adapter_state_dict"]
    base = adapter["base"]
    made_for = f" (its base: {base['source']})" if base.get("source") else ""
    ours = lora_settings(model)
    if ours:
        if ours != layers:
            raise ValueError(f"{source}: the adapter has {describe_lora(layers)}, this model "
                             f"{describe_lora(ours)}")
        if sorted(trained_in_full(model)) != sorted(full):
            raise ValueError(f"{source}: the adapter trains {full or 'nothing'} in full, this model "
                             f"{trained_in_full(model) or 'nothing'}")
    expected_keys = {f"{name}.lora.{leaf}" for name in layers for leaf in ("A", "B")} | set(full)
    if set(state) != expected_keys:
        odd = sorted(set(state) ^ expected_keys)
        raise ValueError(f"{source}: damaged adapter: its tensors do not match its layers ({odd[:3]})")
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    for name, spec in layers.items():
        layer = modules.get(name)
        linear = layer.linear if isinstance(layer, LinearWithLoRA) else layer
        if not isinstance(linear, nn.Linear):
            raise ValueError(f"{source}: this model has no linear layer {name}{made_for}")
        a, b = state[f"{name}.lora.A"].shape, state[f"{name}.lora.B"].shape
        expected = ((linear.in_features, spec["rank"]), (spec["rank"], linear.out_features))
        if (tuple(a), tuple(b)) != expected:
            raise ValueError(f"{source}: {name} is {linear.in_features} -> {linear.out_features} in this model, "
                             f"but the adapter's A and B are {list(a)} and {list(b)}{made_for}")
    for name in full:
        if name not in params or tuple(params[name].shape) != tuple(state[name].shape):
            have = list(params[name].shape) if name in params else "nothing"
            raise ValueError(f"{source}: {name} is {list(state[name].shape)} in the adapter, "
                             f"{have} in this model{made_for}")
    if base.get("weights") is not None:
        found = weights_hash(base_parameters(model, exclude=full))
        if found != base["weights"]:
            raise ValueError(f"{source}: the adapter was made for another base{made_for}: weights hash "
                             f"{base['weights'][:12]}, this model's {found[:12]}")
    for name, spec in layers.items():
        if not isinstance(modules[name], LinearWithLoRA):
            _set_module(model, name, LinearWithLoRA(modules[name], spec["rank"], spec["alpha"], spec["dropout"]))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)
    _freeze_all_but(model, full)


def load_adapter(path: str | os.PathLike, model: nn.Module,
                 optimizer: torch.optim.Optimizer | None = None) -> dict[str, Any]:
    """`apply_adapter` from a file (or PEFT folder); with `optimizer`, also its state (to
    resume a LoRA run). Returns the file's other entries (base, task, training state...)."""
    adapter = read_adapter(path)
    apply_adapter(model, adapter, str(path))
    if optimizer is not None:
        if "optimizer_state_dict" not in adapter:
            raise ValueError(f"{path}: has no optimizer_state_dict to resume the optimizer from")
        optimizer.load_state_dict(adapter["optimizer_state_dict"])
    return {k: v for k, v in adapter.items() if k not in ("adapter_state_dict", "optimizer_state_dict")}
