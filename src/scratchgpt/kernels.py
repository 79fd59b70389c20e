"""The fast paths the model may take, chosen in one place, beside `model.py`.

`model.py` is the readable model; everything here computes the same numbers
faster on some hardware, and each is tested against the plain PyTorch path:

- `Linear`: for CPU inference of up to 8 rows (decoding: one token per sequence), our
  own AVX-512 kernel (`csrc/decode.cpp`), which streams fp32 and bf16 weights from
  memory as they are; for more rows oneDNN's matmul (where our kernel is not built,
  oneDNN decodes too, bf16 weights packed into its blocked layout, fp32 too for up to
  32 rows); and for fp32 training, oneDNN with its gradients (`qkv_projection` stacks
  query, key and value);
- `cached_attention`: one new token per sequence attending to its KV cache, through the
  same kernel file (PyTorch's CPU attention is built for long queries);
- `Int8Linear` and `quantize_model`: int8 weights with one fp32 scale per output
  channel, multiplied by the decode kernel for a few rows and by PyTorch's int8 weight
  kernel for more;
- `decoder`: how a model's one-token decode steps are taken (`generate` and the server ask
  it once per generation): for a plain GPT-2 on a CPU, the whole step in one native call
  (`NativeDecoder`, `csrc/decode_step.cpp`: the same kernels, no Python between the layers);
  elsewhere, on request, one `torch.compile` graph of the forward (`CompiledDecoder`,
  `generate(..., compile=True)`); else the model's forward.

The decode kernels are compiled for the machine on first use (`decode_ops`); where that
cannot be done (no C++ compiler, or a CPU without AVX-512) PyTorch's kernels serve.
One switch turns every fast path off, so that the model runs plain PyTorch (the
reference): `SCRATCHGPT_KERNELS=0` in the environment, or `set_enabled(False)`.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import threading
import warnings
import weakref
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary


_enabled = os.environ.get("SCRATCHGPT_KERNELS", "1").strip().lower() not in ("0", "false", "off", "no")


def set_enabled(enabled: bool) -> bool:
    """Turn every fast path in this module on or off (off: plain PyTorch); return the previous setting.

    The environment variable `SCRATCHGPT_KERNELS=0` turns them off from the start.
    """
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def enabled() -> bool:
    """Whether the fast paths are on (see `set_enabled`)."""
    return _enabled


# oneDNN's matmul (PyTorch's internal `mkldnn::_linear_pointwise` op) on x86 CPUs.
_ONEDNN_LINEAR = (platform.machine().lower() in ("x86_64", "amd64")
                  and torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise")
                  and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, same `state_dict`) that multiplies through the decode kernel
    (a few rows) or oneDNN on x86 CPUs: inference in fp32 and bf16, and fp32 training
    (`_OneDNNLinearFunction`).

    Decoding one token multiplies a vector by every weight matrix, so its speed is
    how fast the weights stream from memory. For fp32 PyTorch calls MKL, which
    streams 13-26 GB/s on the AMD CPUs we measured; oneDNN's matmul streams more, but
    bf16 weights only once reordered into oneDNN's blocked layout, and fp32 ones for
    several rows only packed for them too. The decode kernel reads either format as it
    is, for 1 to 8 rows (sequences) at about the cost of one, with no copy; oneDNN takes
    longer inputs (prompts, training). Where the decode kernels cannot be built, oneDNN
    decodes too, with packed copies kept beside the weights (see `_packed`).
    Measured in benchmarks/README.md.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)

    def _apply(self, fn, recurse=True):
        _PACKED.pop(self.weight, None)  # .to(), .float(), .cuda() ...: a packed copy is stale
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight_int8" in state_dict:
            raise ValueError(f"{prefix}weight_int8: the state dict holds int8-quantized weights, which a float "
                             f"model cannot load; quantize the model first (quantize_model(model, 'int8'))")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through the fastest path that computes it here (see `Linear`)."""
    if _decode_serves(x, weight) and x.dtype == weight.dtype:
        return decode_ops().decode_matmul(x, weight, None, bias)
    if _onednn_serves(x, weight):
        if torch.compiler.is_compiling():
            return onednn_linear(x, weight, bias)  # one opaque op in the graph
        return _onednn_linear(x, weight, bias)  # eager: no trip through the dispatcher
    if _onednn_trains(x, weight):
        return _OneDNNLinearFunction.apply(x, weight, bias)
    return F.linear(x, weight, bias)


def _onednn_on(a: torch.Tensor, b: torch.Tensor) -> bool:
    """oneDNN's matmul is here and switched on, and both tensors are on the CPU.
    `set_enabled(False)` or `torch.backends.mkldnn.enabled = False` turns it off."""
    return (_ONEDNN_LINEAR and _enabled and torch.backends.mkldnn.enabled
            and a.device.type == b.device.type == "cpu")


def _onednn_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN computes this product as inference: no grad, fp32 or bf16.

    With grad mode on, fp32 trains through `_OneDNNLinearFunction` and anything else is
    `F.linear`; so is autocast, which casts only the ops it knows.
    """
    return (_onednn_on(x, weight) and not torch.is_grad_enabled()
            and x.dtype == weight.dtype and x.dtype in (torch.float32, torch.bfloat16)
            and not torch.is_autocast_enabled("cpu"))


def _onednn_trains(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether oneDNN computes this product and the backward's input gradient: eager fp32 training on CPU.

    (bf16 autocast needs nothing here: PyTorch's own bf16 matmul already calls oneDNN.)
    """
    return (_onednn_on(x, weight) and torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad)
            and x.dtype == weight.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


class _OneDNNLinearFunction(torch.autograd.Function):
    """`F.linear` for fp32 CPU training, its forward and input gradient multiplied by oneDNN.

    On the AMD CPUs we measured, MKL's fp32 GEMM reaches 100-170 GFLOP/s on GPT-2's shapes
    and oneDNN 160-200, the gap widest for the output head (benchmarks/README.md). The
    weight gradient, where MKL is as fast, stays `torch.mm`.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        # the plain layout: a packed copy would be remade after every optimizer step
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad2d = grad.reshape(-1, weight.shape[0])  # [N, out]
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = matmul_nt(grad2d, weight.t()).view(x.shape)  # [N, out] @ [out, in]
        if ctx.needs_input_grad[1]:
            grad_weight = torch.mm(grad2d.t(), x.reshape(-1, weight.shape[1]))  # [out, N] @ [N, in]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad2d.sum(0)
        return grad_x, grad_weight, grad_bias


def qkv_projection(x: torch.Tensor, query: nn.Module, key: nn.Module, value: nn.Module
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`query(x), key(x), value(x)`, in training as one product of x with the three weights stacked.

    GPT-2 (and Hugging Face's `c_attn`) computes them as one [E, 3E] product; the seed, whose
    parameter names we keep, as three. One product of thrice the width runs closer to the
    matmul's peak on a CPU, and under bf16 autocast casts the input once instead of three
    times. The stacking copies the three weights (a few MB per layer); autograd splits the
    gradient back into them. Inference keeps the three layers (stacking would copy the
    weights on every decoded token), and so does anything but three plain `Linear`s
    (LoRA-wrapped, int8), and the switched-off path.
    """
    layers = (query, key, value)
    if not (_enabled and torch.is_grad_enabled() and all(type(layer) is Linear for layer in layers)
            and len({layer.bias is None for layer in layers}) == 1
            and (x.requires_grad or any(layer.weight.requires_grad for layer in layers))):
        return query(x), key(x), value(x)
    weight = torch.cat([layer.weight for layer in layers])  # [3E, E]
    bias = None if query.bias is None else torch.cat([layer.bias for layer in layers])
    y = linear(x, weight, bias)  # [B, T, 3E]
    return y.split([layer.out_features for layer in layers], dim=-1)


def matmul_nt(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b.T for a [N, K] and b [M, K], outside autograd: oneDNN's matmul for fp32 and bf16
    on x86 CPUs (b may be a transposed view), `torch.mm` elsewhere and with the fast paths off."""
    if _onednn_on(a, b) and a.dtype == b.dtype and a.dtype in (torch.float32, torch.bfloat16):
        return torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    return torch.mm(a, b.t())


# Where the decode kernels are not built, fp32 products of 2..PACK_ROWS rows (a batch of decoding
# sequences, a short prompt) multiply with weights packed for them: oneDNN then reads the weights
# once for all rows, at about the cost of one row, where with the plain layout 8 rows cost 2-3x one
# (benchmarks/README.md).
PACK_ROWS = 32


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias through oneDNN.

    Where the decode kernels run, the weights stay as they are: what oneDNN gets then is a
    prompt, which a packed copy would speed up by 0-25% once, at the cost of doubling the
    weights' memory (benchmarks/README.md). Elsewhere oneDNN decodes too, and bf16 weights
    stream well only packed (always), fp32 ones for several rows (see `_packed`); one fp32
    row streams as fast from the plain layout.
    """
    if decode_ops() is None and (x.dtype == torch.bfloat16 or 1 < x.numel() // x.shape[-1] <= PACK_ROWS):
        weight = _packed(weight)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("scratchgpt::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`_onednn_linear` as a custom operator, so that `torch.compile` keeps it as one opaque
    call: inductor's own lowering of the oneDNN op accepts only weights it packed itself
    (frozen graphs), and without it compiled graphs would multiply through MKL at half the speed."""
    return _onednn_linear(x, weight, bias)


@onednn_linear.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


# weight -> ((_version, storage address, optimizer steps), weak ref to that storage, packed copy)
_PACKED: WeakIdKeyDictionary = WeakIdKeyDictionary()
_optimizer_steps = 0  # every optimizer step anywhere: fused optimizers do not bump version counters


def _count_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


register_optimizer_step_post_hook(_count_optimizer_step)


def _packed(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in oneDNN's blocked layout, made once and remade when the weight changes.

    Used where the decode kernels are not built, for oneDNN to decode with: bf16 weights
    stream well only in it (tuned for one row); fp32 weights are packed for 8 rows, which
    batched decoding needs. Kept outside the module (keyed weakly by the
    weight) so that copying, saving and `state_dict` never see the opaque tensor, and it
    goes when the weight goes. It doubles the memory of the weights it is made for while
    they are used for inference (fp32: only once products of several rows are asked for).
    A change is seen through the version counter (bumped by in-place ops: `load_state_dict`,
    `copy_`, for-loop and foreach optimizers), a new storage (`weight.data = ...`) or any
    `torch.optim` optimizer's step (fused AdamW updates weights without bumping their version
    counters); other in-place writes through `weight.data` bypass all three and are not seen.
    Weights made under `torch.inference_mode()` have no version counter: they are
    used unpacked, at the plain layout's speed.
    """
    if torch.is_inference(weight):
        return weight
    storage = StorageWeakRef(weight.untyped_storage())
    stamp = (weight._version, storage.cdata, _optimizer_steps)
    cached = _PACKED.get(weight)
    if cached is None or cached[0] != stamp:
        rows = 1 if weight.dtype == torch.bfloat16 else 8  # the rows the layout is tuned for
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        # the weak ref is kept so that no later storage can be given this one's address
        cached = (stamp, storage, packed)
        _PACKED[weight] = cached
    return cached[2]


# ------------------------------------------------------------------------------- decoding's kernels

# A decode step's products (a few rows times a weight, in fp32, bf16 or int8, read at the memory's
# speed) and its attention (one query per sequence), by our own AVX-512 kernels (csrc/decode.cpp),
# compiled for this machine on first use.
DECODE_ROWS = 8
_DECODE_DIR = Path(__file__).with_name("csrc")
_DECODE_SOURCES = sorted(_DECODE_DIR.glob("*.cpp"))  # built together; they share decode_kernels.h
_DECODE_CFLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mfma", "-fopenmp"]
_decode_ops = None  # torch.ops.scratchgpt_cpu once loaded; False where it cannot be
_decode_lock = threading.Lock()


def _decode_on(t: torch.Tensor) -> bool:
    """Whether the decode kernels may take `t`: inference (no grad, no autocast) on the CPU, fp32 or
    bf16, with the fast paths on and the kernels built for this machine."""
    return (_enabled and not torch.is_grad_enabled() and t.device.type == "cpu"
            and t.dtype in (torch.float32, torch.bfloat16) and not torch.is_autocast_enabled("cpu")
            and decode_ops() is not None)


def _decode_serves(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the decode kernel computes this product: at most DECODE_ROWS rows of x, a contiguous
    weight on the CPU, and `_decode_on(x)`."""
    return (x.numel() <= DECODE_ROWS * x.shape[-1] and weight.device.type == "cpu" and weight.is_contiguous()
            and _decode_on(x))


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                     is_causal: bool, dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention` of q [B, H, T, D] to a KV cache's k, v [B, H, L, D].

    One new token per sequence (T = 1, decoding) at inference on the CPU goes to the decode
    kernel: PyTorch's CPU attention, built for long queries, takes 0.1-2 ms a layer for it.
    """
    if (q.shape[2] == 1 and dropout_p == 0.0 and not is_causal and q.dtype == k.dtype == v.dtype
            and k.stride(-1) == v.stride(-1) == 1 and _decode_on(q)):
        return decode_ops().decode_attention(q, k, v, attn_mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


def decode_ops():
    """`torch.ops.scratchgpt_cpu` (decode_matmul, decode_attention), built on first use; None where
    they cannot be (not x86 with AVX-512, no compiler)."""
    global _decode_ops
    if _decode_ops is None:
        with _decode_lock:
            if _decode_ops is None:
                _decode_ops = _load_decode_ops() or False
    return _decode_ops or None


def _load_decode_ops():
    """Load the decode kernels from scratchgpt's cache, compiling them there first if needed (~20 s).

    They run on x86 CPUs with AVX-512, and need a C++ compiler and ninja the first time.
    Where they cannot be built, one warning says why, and PyTorch's kernels do the work.
    """
    if not (platform.machine().lower() in ("x86_64", "amd64")
            and torch.backends.cpu.get_cpu_capability() == "AVX512"):
        return None
    library = decode_library()
    directory, name = library.parent, library.stem
    try:
        built = library.exists() and not (directory / "lock").exists()  # built, and no build under way
        if built:
            try:
                torch.ops.load_library(str(library))
            except OSError:  # a build cut short (the process killed while linking): build it again
                library.unlink()
                built = False
        if not built:
            from torch.utils.cpp_extension import load
            _put_ninja_on_path()
            directory.mkdir(parents=True, exist_ok=True)
            print(f"scratchgpt: compiling the decode kernels for this CPU into {directory} "
                  f"(once, about 30 s)", file=sys.stderr, flush=True)
            load(name, [str(source) for source in _DECODE_SOURCES], extra_cflags=_DECODE_CFLAGS,
                 build_directory=str(directory),
                 is_python_module=False)
    except Exception as error:  # no compiler, no ninja, a read-only cache ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"scratchgpt: the decode kernels could not be built ({reason}); decoding on this CPU "
                      f"uses PyTorch's kernels (slower). Install a C++ compiler and ninja to get them.")
        return None
    torch.library.register_fake("scratchgpt_cpu::decode_matmul")(_decode_matmul_shape)
    torch.library.register_fake("scratchgpt_cpu::decode_attention")(_decode_attention_shape)
    return torch.ops.scratchgpt_cpu


def _put_ninja_on_path() -> None:
    """torch's builder runs `ninja` from PATH; the `ninja` package (a dependency) installs it beside
    this Python, which is not on PATH when the environment is used without being activated."""
    import shutil

    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return  # the build then fails, saying that ninja is needed
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def decode_library() -> Path:
    """Where the decode kernels' library is (or will be) built: one folder per source, flags, torch
    and Python version, under `$SCRATCHGPT_CACHE/kernels` (default ~/.cache/scratchgpt/kernels)."""
    build = repr((_DECODE_CFLAGS, torch.__version__, sys.version_info[:2])).encode()
    code = b"".join(path.read_bytes() for path in [*_DECODE_SOURCES, *sorted(_DECODE_DIR.glob("*.h"))])
    name = "scratchgpt_decode_" + hashlib.sha256(code + build).hexdigest()[:12]
    cache = Path(os.environ.get("SCRATCHGPT_CACHE") or Path.home() / ".cache" / "scratchgpt")
    return cache / "kernels" / name / f"{name}.so"


def _decode_matmul_shape(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None,
                         bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def _decode_attention_shape(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# ------------------------------------------------------------------------------- int8 weights

QUANTIZATIONS = ("int8",)


class Int8Linear(nn.Module):
    """A linear layer for inference whose weight is int8 with one fp32 scale per output channel.

    Symmetric per-output-channel quantization: row n of the weight is stored as
    `weight_int8[n] = round(weight[n] / weight_scale[n])` with `weight_scale[n] =
    max|weight[n]| / 127`, a quarter of fp32's bytes. Activations stay in the model's
    float format (fp32 or bf16), and so does the bias.

    The product is `x @ (weight_int8 * weight_scale[:, None]).T + bias`: on CPUs the
    decode kernel for up to DECODE_ROWS rows (it reads the int8 weights at the memory's
    speed) and PyTorch's int8 weight kernel for more (`aten._weight_int8pack_mm`, fed bf16
    activations: with fp32 ones it runs about 15x slower); elsewhere (CUDA, MPS) and with
    the fast paths off the weight is dequantized for each product (`dequantized_weight`),
    which is the reference the kernels are tested against. The scales stay fp32 when the model is
    cast (`.to(torch.bfloat16)` casts the activations' format, not the stored weights).
    Inference only: a layer in training mode refuses to run.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self._kernel_scale: tuple[tuple[int, int], torch.Tensor] | None = None
        self.eval()  # inference only

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """The int8 form of `linear` (its weight is read, not kept)."""
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight_int8.copy_(_quantize_rows(weight))
            layer.weight_scale.copy_(_row_scales(weight))
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the int8 values stand for, [out, in] in `dtype` (computed in fp32)."""
        return (self.weight_int8.float() * self.weight_scale[:, None]).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("int8-quantized layers are for inference only (model.eval()); train the float "
                               "model and quantize it afterwards")
        if _decode_serves(x, self.weight_int8):
            return decode_ops().decode_matmul(x, self.weight_int8, self.weight_scale, self.bias)
        if _int8_kernel_serves(x, self.weight_int8):
            if torch.compiler.is_compiling():  # one opaque op in the graph, which computes the bf16 scales
                return int8_linear(x, self.weight_int8, self.weight_scale.to(torch.bfloat16), self.bias)
            return _int8_linear(x, self.weight_int8, self._bf16_scale(), self.bias)
        return F.linear(x, self.dequantized_weight(x.dtype), self.bias)

    def _bf16_scale(self) -> torch.Tensor:
        """The scales in bf16, as the kernel takes them, made once and remade when they change."""
        stamp = (self.weight_scale._version, self.weight_scale.data_ptr())
        if self._kernel_scale is None or self._kernel_scale[0] != stamp:
            self._kernel_scale = (stamp, self.weight_scale.to(torch.bfloat16))
        return self._kernel_scale[1]

    def _apply(self, fn, recurse=True):
        scale = self._buffers.pop("weight_scale")  # keep the scales fp32 whatever the model is cast to
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["weight_scale"] = scale.to(self.weight_int8.device)
        self._kernel_scale = None
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "weight" in state_dict and prefix + "weight_int8" not in state_dict:
            raise ValueError(f"{prefix}weight: the state dict holds float weights, which an int8-quantized model "
                             f"cannot load; load them into a float model and quantize it (quantize_model)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def _row_scales(weight: torch.Tensor) -> torch.Tensor:
    """fp32 scale per output row: max |w| / 127 (1 for an all-zero row, which then stays zero)."""
    amax = weight.detach().abs().amax(dim=1).float()
    return torch.where(amax > 0, amax / 127, torch.ones_like(amax))


def _quantize_rows(weight: torch.Tensor) -> torch.Tensor:
    """round(w / scale) per row, in [-127, 127], as int8."""
    return torch.round(weight.detach().float() / _row_scales(weight)[:, None]).clamp_(-127, 127).to(torch.int8)


def _int8_kernel_serves(x: torch.Tensor, weight_int8: torch.Tensor) -> bool:
    """Whether PyTorch's int8 CPU kernel computes this product.

    It has no backward, so it serves only when no gradient is wanted for `x`; it reads K in
    blocks of 16 (other widths read past the row: wrong results or a crash); autocast
    keeps the reference path, which it knows how to cast.
    """
    return (_enabled and x.device.type == weight_int8.device.type == "cpu"
            and x.dtype in (torch.float32, torch.bfloat16) and weight_int8.shape[1] % 16 == 0
            and not (torch.is_grad_enabled() and x.requires_grad)
            and not torch.is_autocast_enabled("cpu"))


def _int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale_bf16: torch.Tensor,
                 bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (weight_int8 * scale).T + bias through PyTorch's int8 CPU kernel, in bf16, returned in x's dtype."""
    out_features, in_features = weight_int8.shape
    y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, in_features).to(torch.bfloat16).contiguous(),
                                           weight_int8, scale_bf16).to(x.dtype)
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], out_features)


@torch.library.custom_op("scratchgpt::int8_linear", mutates_args=())
def int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale_bf16: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """`_int8_linear` as a custom operator for `torch.compile` (inductor's lowering of the int8
    kernel fails on inputs it computed itself, such as the bf16 activations)."""
    return _int8_linear(x, weight_int8, scale_bf16, bias)


@int8_linear.register_fake
def _(x: torch.Tensor, weight_int8: torch.Tensor, scale_bf16: torch.Tensor,
      bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight_int8.shape[0])


def quantize_model(model: nn.Module, quantization: str = "int8") -> nn.Module:
    """Replace every linear layer of `model`, the output head included, by its int8 form, in place.

    Returns `model`, in eval mode: a quantized model is for inference only. A head tied
    to the token embedding gets its own int8 copy; the embedding lookups stay in the
    model's float format, as do layer norms and biases. Takes seconds for GPT-2 124M.
    """
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {quantization!r}: choose from {', '.join(QUANTIZATIONS)}")
    linears = [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        done = any(isinstance(m, Int8Linear) for m in model.modules())
        raise ValueError(f"nothing to quantize: the model {'is already int8-quantized' if done else 'has no Linear'}")
    for name, linear in linears:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name), attr, Int8Linear.from_linear(linear))
    return model.eval()


def quantization_of(state_dict: dict[str, torch.Tensor]) -> str | None:
    """"int8" when a state dict (or a model's) holds int8-quantized layers, None when it is all float."""
    return "int8" if any(key.endswith(".weight_int8") for key in state_dict) else None


def check_quantization(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise a clear error when `state_dict` and `model` differ in quantization (float vs int8)."""
    have, want = quantization_of(state_dict), quantization_of(model.state_dict())
    if have != want:
        raise ValueError(f"{source} holds {have or 'float'} weights but the model is {want or 'float'}: "
                         + ("quantize the model with quantize_model(model, 'int8') before loading"
                            if have else "load the float weights into a float model, then quantize it"))


# ------------------------------------------------------------------------------- compiled decoding

class CompiledDecoder:
    """Decode steps, one new token per row of a KVCache, through one compiled graph.

    `decoder(tokens, cache)` with tokens [B, 1] returns what `model(tokens, cache=cache,
    logits_from=-1)` returns, the logits [B, 1, V], and appends to the cache the same way.
    `torch.compile` fuses the layer norms, GELUs, adds and cache writes and drops the
    Python work between the matrix products. The graph sees no Python number that
    changes from step to step: the rows' positions are a tensor and the attended length
    is a dynamic dimension of the attention mask, so it compiles once per model and batch
    size (for GPT-2 124M about a minute on 2 cores), not once per step.

    Prefill (several tokens per row), `set_enabled(False)` and an empty cache run the
    model eagerly. `compiled_decoder(model)` keeps one decoder per model.
    """

    def __init__(self, model: nn.Module):
        self._model = weakref.ref(model)  # `compiled_decoder` keeps decoders as long as their models live
        self._compiled = torch.compile(_decode_step, fullgraph=True)

    def __call__(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        model = self._model()
        lengths = cache.lengths
        kv_len = max(lengths) + 1
        if not _enabled or tokens.shape[1] != 1 or kv_len < 2:
            return model(tokens, cache=cache, logits_from=-1)
        if kv_len > cache.max_len:
            raise ValueError(f"{max(lengths)} cached + 1 new token exceed the KV cache's {cache.max_len} positions")
        positions = torch.tensor(lengths, device=tokens.device)[:, None]  # [B, 1]
        # each row attends to its own positions up to the new one: [B, 1 (heads), 1 (token), kv_len]
        mask = (torch.arange(kv_len, device=tokens.device) <= positions[:, :, None]).unsqueeze(1)
        torch._dynamo.decorators.mark_unbacked(mask, 3)
        logits = self._compiled(model, tokens, _StepCache(cache, positions, mask))
        for row, length in enumerate(lengths):
            cache.set_length(row, length + 1)
        return logits


def _decode_step(model: nn.Module, tokens: torch.Tensor, step: "_StepCache") -> torch.Tensor:
    return model(tokens, cache=step, logits_from=-1)


_DECODERS: "weakref.WeakKeyDictionary[nn.Module, CompiledDecoder]" = weakref.WeakKeyDictionary()


def compiled_decoder(model: nn.Module) -> CompiledDecoder:
    """The CompiledDecoder of `model`, made on first use (so that it compiles once)."""
    decoder = _DECODERS.get(model)
    if decoder is None:
        decoder = _DECODERS[model] = CompiledDecoder(model)
    return decoder


class _StepCache:
    """A KVCache as one compiled decode step sees it.

    The model's forward calls `begin`, each layer's `append` and `end` as on a KVCache;
    here every value that changes between steps is a tensor: the positions to write
    (the writes of KVCache's ragged path) and, through the mask's last dimension, how
    many positions to attend to. The lengths advance outside the graph.
    """

    def __init__(self, cache, positions: torch.Tensor, mask: torch.Tensor):
        self.batch_size = cache.batch_size
        self.keys, self.values = cache.keys, cache.values
        self.positions, self.mask = positions, mask
        self.rows = torch.arange(cache.batch_size, device=positions.device)[:, None]  # [B, 1]
        self.layers = [_StepLayer(self, i) for i in range(len(cache.keys))]

    def begin(self, num_tokens: int, device: torch.device) -> torch.Tensor:
        return self.positions

    def end(self) -> None:
        pass


class _StepLayer:
    def __init__(self, step: _StepCache, index: int):
        self.step, self.index = step, index

    def append(self, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        step = self.step
        keys, values = step.keys[self.index], step.values[self.index]
        keys[step.rows, :, step.positions] = k.transpose(1, 2)  # row b's token goes to positions[b]
        values[step.rows, :, step.positions] = v.transpose(1, 2)
        kv_len = step.mask.shape[-1]
        torch._check(2 <= kv_len)  # what __call__ ensures, told to the compiler, which sees kv_len as a symbol
        torch._check(kv_len <= keys.shape[2])
        return keys[:, :, :kv_len], values[:, :, :kv_len], step.mask, False


# ------------------------------------------------------------------------------- a whole decode step

def decoder(model: nn.Module, compile: bool = False) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    """A function for `model`'s decode steps: `step(tokens, cache)` returns what `model(tokens,
    cache=cache, logits_from=-1)` returns, the logits [B, 1, V] after each row's new `tokens` [B, T]
    (which the cache appends), by the fastest path here for one-token steps.

    - On CPUs with the decode kernels, a plain `GPTModel` at inference (fp32 or bf16, float or int8
      weights, up to DECODE_ROWS rows) runs each step in one call into `csrc/decode_step.cpp`:
      the same kernels and roundings as its forward, without the 4-5 ms of Python, module calls and
      dispatch between them (`NativeDecoder`).
    - Otherwise `compile` runs the steps through a `CompiledDecoder`,
    - and anything else (prompts, LoRA layers, hooks, training mode with dropout) through the
      model's own forward, the reference.

    The model is inspected once, here (about a millisecond): make one decoder per generation, and
    change the model between generations, not during one.
    """
    forward = compiled_decoder(model) if compile else partial(_forward_step, model)
    params = _step_params(model)
    return forward if params is None else NativeDecoder(model, params, forward)


def _forward_step(model: nn.Module, tokens: torch.Tensor, cache) -> torch.Tensor:
    return model(tokens, cache=cache, logits_from=-1)


class NativeDecoder:
    """Decode steps of a plain GPT-2 model, one call into `csrc/decode_step.cpp` each, which reads
    `params` (from `_step_params`), writes the new keys and values into the cache and returns the
    logits; the rows' lengths advance here. Steps it cannot take (several tokens per row, more than
    DECODE_ROWS rows, grad or autocast on, the fast paths off, tokens or a cache the forward would
    refuse) go to `fallback`. Its writes into the cache do not bump the cache tensors' version counters
    (nothing in a decode loop reads them; the forward's indexed writes do)."""

    def __init__(self, model: nn.Module, params: list[torch.Tensor | None],
                 fallback: Callable[[torch.Tensor, Any], torch.Tensor]):
        self.model, self.params, self.fallback = model, params, fallback

    def __call__(self, tokens: torch.Tensor, cache) -> torch.Tensor:
        from .model import KVCache  # model.py imports this module

        model = self.model
        table = model.tok_emb.weight
        if not (tokens.dim() == 2 and tokens.shape[1] == 1 and tokens.shape[0] <= DECODE_ROWS
                and tokens.dtype in (torch.int64, torch.int32) and tokens.device.type == "cpu"
                and type(cache) is KVCache and _decode_on(table) and cache.keys[0].dtype == table.dtype
                and (torch.is_inference_mode_enabled() or not torch.is_inference(cache.keys[0]))):
            return self.fallback(tokens, cache)  # which also says what is wrong with what it cannot take
        lengths = cache.lengths
        if tokens.shape[0] != cache.batch_size:
            raise ValueError(f"{tokens.shape[0]} rows of tokens for a KV cache of {cache.batch_size} rows")
        if max(lengths) + 1 > cache.max_len:
            raise ValueError(f"{max(lengths)} cached + 1 new tokens exceed the KV cache's {cache.max_len} positions")
        ids = tokens.reshape(-1).long().contiguous()  # [B]
        logits = decode_ops().decode_step(ids, lengths, table, model.pos_emb.weight, self.params, cache.keys,
                                          cache.values, model.cfg.n_heads, model.final_norm.eps)
        for row, length in enumerate(lengths):
            cache.set_length(row, length + 1)
        return logits


def _step_params(model: nn.Module) -> list[torch.Tensor | None] | None:
    """The tensors `decode_step.cpp` takes, in its order (per layer: norm1, query, key, value, out_proj,
    norm2, the two feed-forward layers; then the final norm and the head; a layer as weight, int8
    scales, bias), or None where the native step would not compute what the model's forward does:
    anything but model.py's own modules (a LoRA wrapper, a subclass; embeddings with a max_norm), a
    forward hook anywhere the forward would run one, active dropout, int8 layers in training mode, a
    mixed-format model, a model off the CPU, or the kernels off or not built."""
    from .model import GELU, FeedForward, GPTModel, LayerNorm, MultiHeadAttention, TransformerBlock

    if not (type(model) is GPTModel and _enabled and model.tok_emb.weight.device.type == "cpu"
            and model.tok_emb.weight.dtype in (torch.float32, torch.bfloat16) and decode_ops() is not None
            and all(type(table) is nn.Embedding and table.max_norm is None and not _hooked(table)
                    for table in (model.tok_emb, model.pos_emb))
            and _inert(model.drop_emb)
            and not (nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks)):
        return None
    dtype, eps, heads = model.tok_emb.weight.dtype, model.final_norm.eps, model.cfg.n_heads
    params: list[torch.Tensor | None] = []

    def add_norm(norm: nn.Module) -> bool:
        params.extend((norm.scale, norm.shift))
        return type(norm) is LayerNorm and norm.eps == eps and norm.scale.dtype == dtype and not _hooked(norm)

    def add_linear(layer: nn.Module) -> bool:
        if type(layer) is Linear and layer.weight.dtype == dtype and layer.weight.is_contiguous():
            params.extend((layer.weight, None, layer.bias))
        elif type(layer) is Int8Linear and not layer.training:  # in training mode its forward refuses to run
            params.extend((layer.weight_int8, layer.weight_scale, layer.bias))
        else:
            return False
        return (layer.bias is None or layer.bias.dtype == dtype) and not _hooked(layer)

    for block in model.trf_blocks:
        att, ff = block.att, block.ff
        if not (type(block) is TransformerBlock and type(att) is MultiHeadAttention and type(ff) is FeedForward
                and not _hooked(block) and not _hooked(att) and not _hooked(ff)
                and _inert(block.drop_shortcut) and not (att.training and att.dropout > 0)
                and att.num_heads == heads and len(ff.layers) == 3 and type(ff.layers[1]) is GELU
                and not _hooked(ff.layers[1]) and not _hooked(ff.layers)
                and add_norm(block.norm1) and add_linear(att.W_query) and add_linear(att.W_key)
                and add_linear(att.W_value) and add_linear(att.out_proj) and add_norm(block.norm2)
                and add_linear(ff.layers[0]) and add_linear(ff.layers[2])):
            return None
    if not (add_norm(model.final_norm) and add_linear(model.out_head) and not _hooked(model)):
        return None
    return params


def _hooked(module: nn.Module) -> bool:
    """Whether `module` has forward hooks, which its forward would run and the native step would not."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _inert(dropout: nn.Module) -> bool:
    """Whether a dropout layer leaves its input as it is: a plain `nn.Dropout`, without hooks, in eval
    mode or with p = 0."""
    return type(dropout) is nn.Dropout and not _hooked(dropout) and not (dropout.training and dropout.p > 0)
