"""The fast paths the model may take, chosen in one place, beside `model.py`.

`model.py` is the readable model; everything here computes the same numbers
faster on some hardware, and each is tested against the plain PyTorch path.
Today: oneDNN's matmul for CPU inference (fp32, and bf16 with weights packed
into oneDNN's blocked layout).
"""

from __future__ import annotations

import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary


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
