"""LoRA against full fine-tuning: peak resident memory and time of a training step.

GPT-2 355M shape (24 layers, 1024 wide, tied head), batch 2x256, fp32 and bf16
autocast. Each contender runs in a fresh process (peak RSS means something only
there: `VmHWM`, which starts afresh at exec) and reports its peak RSS and its
step time, so both numbers come from the same run; contenders are interleaved
(full fp32, LoRA fp32, full bf16, LoRA bf16, then again) and the ratios are
taken within each round.

A step is the trainer's: `calc_loss_batch`, backward, gradient clipping, the
fused AdamW of `make_optimizer` (which holds only parameters that require
gradients), `zero_grad(set_to_none=True)`. LoRA is rank 8, alpha 16, on query
and value (`scratchgpt train --lora-rank 8`). Its frozen weights get no
gradient and no optimizer state, and the backward pass skips their weight
gradients (a third of the matmul work), not only the optimizer step.

    .venv/bin/python benchmarks/bench_lora.py               # 2 rounds, ~20 minutes on a busy 2-core box
    .venv/bin/python benchmarks/bench_lora.py --rounds 1 --steps 2   # shorter and noisier
    .venv/bin/python benchmarks/bench_lora.py --quick       # 124M shape, 1 round: a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn

from common import machine_line, setup_threads
from scratchgpt import GPTModel, gpt2_config, replace_linear_with_lora
from scratchgpt.train import calc_loss_batch, make_optimizer

CONTENDERS = [("full", "fp32"), ("lora", "fp32"), ("full", "bf16"), ("lora", "bf16")]
BATCH, SEQ = 2, 256
RANK, ALPHA, TARGETS = 8, 16, ("query", "value")


def peak_rss_kib() -> int:
    """Peak resident memory of this process (VmHWM; ru_maxrss would survive exec)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(mode: str, dtype: str, shape: str, steps: int, threads: int) -> dict:
    """Build the model, run `steps` training steps, return peak RSS and the timed steps' durations."""
    setup_threads(threads)
    torch.manual_seed(0)
    model = GPTModel(gpt2_config(shape, tie_weights=True))  # as GPT-2 is (and --init gpt2:SIZE loads it)
    if mode == "lora":
        replace_linear_with_lora(model, RANK, ALPHA, targets=TARGETS)
    model.train()
    device = torch.device("cpu")
    opt = make_optimizer(model, lr=1e-4, weight_decay=0.1, betas=(0.9, 0.95), device=device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    data = torch.randint(0, model.cfg.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(3))
    x, y = data[:, :-1], data[:, 1:]
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    after_build = peak_rss_kib()
    times, cpu_times = [], []
    for i in range(steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        with amp:
            loss = calc_loss_batch(x, y, model, device)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i > 0:  # the first step also creates the optimizer state
            times.append(time.perf_counter() - start)
            cpu_times.append(time.process_time() - cpu_start)
    return {"peak_kib": peak_rss_kib(), "build_kib": after_build, "step_s": statistics.median(times),
            "cpu_s": statistics.median(cpu_times), "trainable": trainable, "loss": loss.item()}


def run_child(mode: str, dtype: str, shape: str, steps: int, threads: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", mode, dtype, "--shape", shape, "--steps", str(steps),
                          "--threads", str(threads)], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="355M", help="GPT-2 shape (default 355M)")
    ap.add_argument("--rounds", type=int, default=2, help="fresh processes per contender (default 2)")
    ap.add_argument("--steps", type=int, default=3, help="steps per process; all but the first are timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--quick", action="store_true", help="124M shape, 1 round, 1 timed step")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.shape, args.rounds, args.steps = "124M", 1, 2
    if args.steps < 2:
        ap.error("--steps must be >= 2 (the first step is not timed)")
    if args.child:
        print(json.dumps(child(*args.child, args.shape, args.steps, args.threads)))
        return
    setup_threads(args.threads)
    print(f"# bench_lora: {machine_line()}")
    print(f"GPT-2 {args.shape} shape, batch {BATCH}x{SEQ}; LoRA rank {RANK}, alpha {ALPHA} on {', '.join(TARGETS)}; "
          f"{args.rounds} rounds x {args.steps - 1} timed steps per process")
    dtypes = args.dtypes.split(",")
    contenders = [(mode, dt) for mode, dt in CONTENDERS if dt in dtypes]
    runs: dict[tuple[str, str], list[dict]] = {c: [] for c in contenders}
    for r in range(args.rounds):
        for mode, dt in contenders:
            result = run_child(mode, dt, args.shape, args.steps, args.threads)
            runs[mode, dt].append(result)
            print(f"  round {r + 1}: {mode:<5}{dt:<5} peak {result['peak_kib'] / 1024:7.0f} MiB, "
                  f"{result['step_s']:6.2f} s/step, {result['cpu_s']:6.2f} CPU s/step", flush=True)
    print(f"\n{'contender':<12}{'dtype':<7}{'trainable':>13}{'peak MiB':>10}{'model+opt MiB':>15}"
          f"{'s/step':>8}{'CPU s':>8}{'peak vs full':>14}{'time vs full':>14}{'CPU vs full':>13}")
    for dt in dtypes:
        for mode in ("full", "lora"):
            rs = runs[mode, dt]

            def ratio(key: str) -> float:  # LoRA / full within each round, then the median over rounds
                return statistics.median(a[key] / b[key] for a, b in zip(rs, runs["full", dt]))

            print(f"{mode:<12}{dt:<7}{rs[0]['trainable']:>13,}"
                  f"{statistics.median(r['peak_kib'] for r in rs) / 1024:>10.0f}"
                  f"{statistics.median(r['build_kib'] for r in rs) / 1024:>15.0f}"
                  f"{statistics.median(r['step_s'] for r in rs):>8.2f}{statistics.median(r['cpu_s'] for r in rs):>8.2f}"
                  f"{ratio('peak_kib'):>13.2f}x{ratio('step_s'):>13.2f}x{ratio('cpu_s'):>12.2f}x")
    print("(ratios: median over rounds of LoRA / full fine-tuning in the same round; model+opt: peak RSS after "
          "building the model and optimizer, before the first step; CPU s: the process's CPU time per step, "
          "which other jobs on a shared machine disturb less than the wall-clock time)")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    t0 = time.perf_counter()
    main()
    if "--child" not in sys.argv:
        print(f"\n(bench_lora took {time.perf_counter() - t0:.0f} s)")
