"""DistributedDataParallel plumbing: which process this is, and the few collectives training needs.

Under `torchrun` the environment names the rank and world size; NCCL joins GPU
processes and gloo CPU ones. Without it everything here is a no-op for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .devices import resolve_device


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes checkpoints, logs and plots."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_name: str = "auto") -> tuple[DistContext, torch.device]:
    """Join the process group `torchrun` set up (if any) and pick this process's device."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    device = resolve_device(device_name)
    if world_size == 1:
        return DistContext(), device
    ctx = DistContext(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world_size)
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return ctx, device


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The sum of `tensor` over all processes (in place; returned for chaining)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_process(flags: list[bool], ctx: DistContext, device: torch.device) -> list[bool]:
    """Each flag true on every process when it is true on any (so that all stop at the same step)."""
    if not ctx.enabled:
        return flags
    counts = all_reduce_sum(torch.tensor([float(f) for f in flags], device=device), ctx)
    return [bool(c > 0) for c in counts.tolist()]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every process's `obj`, in rank order."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def shutdown_distributed() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()
