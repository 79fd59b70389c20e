"""Where the time of one training step goes: a 124M step (the identical-settings shape of
bench_train.py: tied head, qkv biases, dropout 0, batch 2x256, fused AdamW) under
torch.profiler, fp32 and bf16 autocast, with the trainer's loss (`--loss chunked`: the chunked
head + cross-entropy of `calc_loss_batch`) or the plain one (`--loss plain`: logits + F.cross_entropy).

Prints, per dtype: the wall time and minor page faults of each phase (the blocks'
forward, head + loss, backward, optimizer step; medians of `--steps` steps), then the
profiler's self CPU time summed by kind of operator, and the top operators.

    .venv/bin/python benchmarks/profile_train.py [--dtypes fp32,bf16] [--loss chunked|plain]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections import defaultdict
from contextlib import nullcontext

import torch
from torch.profiler import ProfilerActivity, profile

from bench_train import SHAPES, batch_for, fused_adamw, ours
from common import machine_line, median, setup_threads
from scratchgpt.losses import chunked_head_cross_entropy, logits_cross_entropy

KINDS = [  # (kind, substrings of operator names), first match wins
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("attention", ("scaled_dot_product", "flash_attention")),
    ("softmax + loss", ("softmax", "nll_loss", "cross_entropy", "logsumexp", "gather", "scatter", "aten::exp")),
    ("layer norm", ("layer_norm",)),
    ("GELU", ("gelu",)),
    ("optimizer", ("adam",)),
    ("embedding", ("embedding", "index_select", "index_add")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::to", "aten::clone", "aten::contiguous")),
    ("fills", ("aten::fill_", "aten::zero_", "aten::zeros", "aten::empty")),
    ("element-wise", ("aten::add", "aten::mul", "aten::sum", "aten::div", "aten::where", "aten::sub")),
]


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def kind_of(name: str) -> str:
    for kind, keys in KINDS:
        if any(k in name for k in keys):
            return kind
    return "other"


def run(dt: str, loss_path: str, steps: int, top: int) -> None:
    cfg, b, t = SHAPES["124M"]
    model = ours(cfg)
    opt = fused_adamw(model)
    x, y = batch_for(cfg, b, t)
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dt == "bf16" else nullcontext()

    def step(phases: dict[str, list[float]] | None) -> None:
        marks = [(time.perf_counter(), minflt())]
        with amp:
            hidden = model(x, return_hidden=True)
            marks.append((time.perf_counter(), minflt()))
            if loss_path == "chunked":
                loss = chunked_head_cross_entropy(hidden, model.out_head.weight, y)
            else:
                loss = logits_cross_entropy(model.out_head(hidden), y)
        marks.append((time.perf_counter(), minflt()))
        loss.backward()
        marks.append((time.perf_counter(), minflt()))
        opt.step()
        opt.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), minflt()))
        if phases is not None:
            for name, (t0, f0), (t1, f1) in zip(("forward (blocks)", "head + loss", "backward", "optimizer"),
                                                marks, marks[1:]):
                phases[name + " s"].append(t1 - t0)
                phases[name + " faults"].append(f1 - f0)

    for _ in range(2):
        step(None)
    phases: dict[str, list[float]] = defaultdict(list)
    for _ in range(steps):
        step(phases)
    total = sum(median(v) for k, v in phases.items() if k.endswith(" s"))
    print(f"\n## 124M step, {dt}, {loss_path} loss: {total:.2f} s (sum of the phase medians)")
    for name in ("forward (blocks)", "head + loss", "backward", "optimizer"):
        s = median(phases[name + " s"])
        print(f"  {name:<18}{s:>7.3f} s {s / total:>5.0%}   {median(phases[name + ' faults']):>8.0f} faults")

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(None)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    spent = sum(e.self_cpu_time_total for e in events)
    by_kind: dict[str, float] = defaultdict(float)
    for e in events:
        by_kind[kind_of(e.key)] += e.self_cpu_time_total
    print(f"  profiler, self CPU time of one step: {spent / 1e6:.2f} s")
    for kind, us in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"    {kind:<18}{us / 1e6:>7.3f} s {us / spent:>5.0%}")
    print(f"  top {top} operators by self CPU time:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"    {e.key:<58}{e.self_cpu_time_total / 1e3:>9.1f} ms {e.count:>5} calls")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--loss", choices=("chunked", "plain"), default="chunked",
                    help="chunked: the trainer's calc_loss_batch path; plain: logits + F.cross_entropy")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    setup_threads(args.threads)
    print(f"# profile_train: {machine_line()}")
    for dt in args.dtypes.split(","):
        run(dt, args.loss, args.steps, args.top)


if __name__ == "__main__":
    main()
