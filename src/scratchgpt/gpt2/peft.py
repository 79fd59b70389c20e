"""LoRA adapters <-> Hugging Face PEFT adapter folders for GPT-2.

A PEFT folder holds `adapter_config.json` and `adapter_model.safetensors` with
tensors named `base_model.model.transformer.h.0.attn.c_attn.lora_A.weight`.
PEFT's `lora_A` and `lora_B` are `nn.Linear` weights, [rank, in] and [out, rank]
(our A and B transposed), whatever the base layer's layout; `fan_in_fan_out: true`
only tells PEFT that GPT-2's `Conv1D` stores its own weight as [in, out], which
matters when PEFT merges.

GPT-2 computes query, key and value in one layer, `c_attn` ([E] -> [3E]), where
scratchgpt has three (`W_query`, `W_key`, `W_value`). Separate adapters on them
are one adapter on `c_attn` whose A stacks theirs ([rq + rk + rv, E]) and whose
B is block-diagonal ([3E, rq + rk + rv]: query's B in the first E rows and its
own columns, and so on; zeros where a part has no adapter). Importing reverses
it: each part keeps the rank components its rows of B use.

Only LoRA on the attention and MLP layers maps: an adapter on `out_head` (GPT-2's
`lm_head`, tied to the token embedding, which PEFT then saves whole) or one that
trains parameters in full is refused with the reason.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from ..checkpoint import atomic_save
from ..fileio import atomic_write
from ..lora import ADAPTER_FORMAT, read_adapter

ADAPTER_FORMATS = ("peft", "lora")  # `convert --to`: a PEFT folder, or a scratchgpt adapter file
PREFIX = "base_model.model."  # PEFT's name for the model it wraps
# scratchgpt layer (inside trf_blocks.i) -> GPT-2 module (inside transformer.h.i), and the part of c_attn
HF_LAYERS = {"att.W_query": ("attn.c_attn", 0), "att.W_key": ("attn.c_attn", 1), "att.W_value": ("attn.c_attn", 2),
             "att.out_proj": ("attn.c_proj", None), "ff.layers.0": ("mlp.c_fc", None),
             "ff.layers.2": ("mlp.c_proj", None)}
QKV = ("att.W_query", "att.W_key", "att.W_value")
OURS = {hf: ours for ours, (hf, part) in HF_LAYERS.items() if part is None}
HUB_NAMES = {"124M": "openai-community/gpt2", "355M": "openai-community/gpt2-medium",
             "774M": "openai-community/gpt2-large", "1558M": "openai-community/gpt2-xl"}
PEFT_KEY = re.compile(r"(?:transformer\.)?h\.(\d+)\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.lora_([AB])\.weight")


def _hf_module(name: str) -> tuple[str, int | None]:
    """The GPT-2 module (and c_attn part) of a scratchgpt layer name; refuses what has none."""
    match = re.fullmatch(r"trf_blocks\.(\d+)\.(.+)", name)
    if not match or match[2] not in HF_LAYERS:
        raise ValueError(f"a LoRA adapter on {name} has no PEFT GPT-2 counterpart: PEFT export covers the attention "
                         f"and MLP layers (query, key, value, out_proj, ff_in, ff_out)")
    kind, part = HF_LAYERS[match[2]]
    return f"transformer.h.{match[1]}.{kind}", part


def peft_adapter(adapter: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A scratchgpt adapter (from `lora.read_adapter`) as PEFT's config and tensors."""
    if adapter["trained_in_full"]:
        raise ValueError(f"the adapter trains {adapter['trained_in_full']} in full, which PEFT's GPT-2 has no "
                         f"module for: only LoRA layers export")
    state = adapter["adapter_state_dict"]
    modules: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    for name, spec in adapter["layers"].items():
        hf, part = _hf_module(name)
        a, b = state[f"{name}.lora.A"].float(), state[f"{name}.lora.B"].float()  # [in, r], [r, out]
        modules.setdefault(hf, []).append((part or 0, a, b, spec["alpha"] / spec["rank"]))
    tensors, shapes = {}, {}
    for hf, parts in modules.items():
        parts.sort(key=lambda p: p[0])
        scaling = parts[0][3]  # PEFT has one scaling per module: the others' ratio goes into their B
        lora_a = torch.cat([a.T for _, a, _, _ in parts])  # [R, in]
        if hf.endswith("c_attn"):
            width = parts[0][2].shape[1]
            lora_b = torch.zeros(3 * width, lora_a.shape[0])
            col = 0
            for part, a, b, s in parts:  # block-diagonal: part p's rows, its own rank's columns
                lora_b[part * width:(part + 1) * width, col:col + a.shape[1]] = b.T * (s / scaling)
                col += a.shape[1]
        else:
            lora_b = parts[0][2].T
        tensors[f"{PREFIX}{hf}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PREFIX}{hf}.lora_B.weight"] = lora_b.contiguous()
        shapes[hf] = (lora_a.shape[0], scaling * lora_a.shape[0])  # PEFT's rank and alpha: scaling = alpha / r
    (rank, alpha), _ = Counter(shapes.values()).most_common(1)[0]
    dropouts = Counter(spec["dropout"] for spec in adapter["layers"].values())
    source = adapter["base"].get("source") or ""
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "base_model_name_or_path": HUB_NAMES.get(source.removeprefix("gpt2:")) if source.startswith("gpt2:") else None,
        "r": rank, "lora_alpha": _plain(alpha), "lora_dropout": dropouts.most_common(1)[0][0],
        "target_modules": sorted(modules),
        "rank_pattern": {hf: r for hf, (r, a) in shapes.items() if r != rank},
        "alpha_pattern": {hf: _plain(a) for hf, (r, a) in shapes.items() if a != alpha},
        "fan_in_fan_out": True,  # GPT-2's Conv1D layers store their weight as [in, out]
        "bias": "none", "use_rslora": False, "use_dora": False, "modules_to_save": None, "inference_mode": True,
    }
    return config, tensors


def _plain(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def save_peft_adapter(adapter: dict[str, Any], folder: str | os.PathLike) -> Path:
    """Write `adapter` as a PEFT folder that `PeftModel.from_pretrained` loads onto the HF
    export of its base (`save_hf_gpt2`). The base's identity rides along in the safetensors
    metadata, so that importing the folder again still checks the base."""
    config, tensors = peft_adapter(adapter)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "scratchgpt_base": json.dumps(adapter["base"])}
    with atomic_write(folder / "adapter_model.safetensors") as f:
        f.write(save(tensors, metadata=metadata))
    with atomic_write(folder / "adapter_config.json") as f:
        f.write((json.dumps(config, indent=2) + "\n").encode())
    return folder


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_peft_adapter(folder: str | os.PathLike) -> dict[str, Any]:
    """A PEFT LoRA adapter for GPT-2 as a scratchgpt adapter (what `lora.read_adapter` returns)."""
    folder = Path(folder)
    config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (config_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (a PEFT adapter folder holds adapter_config.json and "
                                    f"adapter_model.safetensors)")
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    unsupported = [(cfg.get("peft_type") != "LORA", f"peft_type {cfg.get('peft_type')!r} (only LORA)"),
                   (bool(cfg.get("use_dora")), "use_dora"), (cfg.get("bias", "none") != "none", "trained biases"),
                   (bool(cfg.get("lora_bias")), "lora_bias"), (bool(cfg.get("modules_to_save")), "modules_to_save")]
    for bad, what in unsupported:
        if bad:
            raise ValueError(f"{config_path}: unsupported {what}")
    with safe_open(weights_path, framework="pt") as f:
        tensors = {name: f.get_tensor(name).float() for name in f.keys()}
        metadata = f.metadata() or {}
    modules: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = PEFT_KEY.fullmatch(key.removeprefix(PREFIX))
        if not match:
            raise ValueError(f"{weights_path}: {key} is not a LoRA weight of a GPT-2 attention or MLP layer")
        modules.setdefault((int(match[1]), match[2]), {})[match[3]] = tensor
    layers: dict[str, dict[str, Any]] = {}
    state: dict[str, torch.Tensor] = {}

    def add(name: str, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        rank = a.shape[1]
        layers[name] = {"rank": rank, "alpha": scaling * rank, "dropout": float(cfg.get("lora_dropout", 0.0))}
        state[f"{name}.lora.A"], state[f"{name}.lora.B"] = a.contiguous(), b.contiguous()

    for (i, kind), ab in sorted(modules.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{weights_path}: h.{i}.{kind} has lora_{'B' if 'A' in ab else 'A'} missing")
        lora_a, lora_b = ab["A"], ab["B"]  # [R, in], [out, R]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, f"transformer.h.{i}.{kind}", cfg.get("lora_alpha", 8))
        rank = lora_a.shape[0]
        scaling = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        if kind != "attn.c_attn":
            add(f"trf_blocks.{i}.{OURS[kind]}", lora_a.T, lora_b.T, scaling)
            continue
        width = lora_b.shape[0] // 3
        for part, ours in enumerate(QKV):
            rows = lora_b[part * width:(part + 1) * width]  # [E, R]
            used = rows.abs().sum(0).nonzero().flatten()  # the rank components this part uses
            if len(used):
                add(f"trf_blocks.{i}.{ours}", lora_a[used].T, rows[:, used].T, scaling)
    if not layers:
        raise ValueError(f"{weights_path}: every lora_B is zero (an untrained adapter): nothing to import")
    if "scratchgpt_base" in metadata:  # exported by scratchgpt: the base it was made for
        base = json.loads(metadata["scratchgpt_base"])
    else:
        name = cfg.get("base_model_name_or_path")
        size = next((size for size, hub in HUB_NAMES.items() if name in (hub, hub.split("/")[1])), None)
        base = {"source": f"gpt2:{size}" if size else name, "config": None, "weights": None}
    return {"format": ADAPTER_FORMAT, "layers": layers, "trained_in_full": [], "base": base,
            "adapter_state_dict": state}


def convert_adapter(src: str | os.PathLike, dst: str | os.PathLike, dst_format: str) -> Path:
    """Convert the adapter at `src` (a scratchgpt adapter file, a LoRA run's checkpoint or a PEFT
    folder) to `dst_format`: "peft" (a folder) or "lora" (a scratchgpt adapter file)."""
    if Path(src).resolve() == Path(dst).resolve():
        raise ValueError(f"{dst}: source and destination are the same")
    adapter = read_adapter(src)
    if dst_format == "peft":
        return save_peft_adapter(adapter, dst)
    if dst_format != "lora":
        raise ValueError(f"unknown adapter format {dst_format!r}; choose one of {list(ADAPTER_FORMATS)}")
    kept = ("format", "layers", "trained_in_full", "base", "adapter_state_dict", "task")  # not the training state
    atomic_save({k: v for k, v in adapter.items() if k in kept}, dst)
    return Path(dst)
