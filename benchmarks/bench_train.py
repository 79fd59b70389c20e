"""Training step throughput (forward + loss + backward + AdamW) and peak memory:
scratchgpt against Hugging Face GPT2LMHeadModel and the seed-style code, same weights.

Shapes: the seed's GPT_CONFIG_124M (12 layers, 768 wide, dropout 0.1) at batch
2x256, and a small model (6 layers, 384 wide) at batch 8x256; fp32 and bf16
autocast. Prints tokens/s, ratios against the baselines measured in the same run,
model FLOPs utilisation against the matmul peak measured in the same run, minor
page faults per step, and the peak resident memory of a 124M step measured for
each contender in a fresh subprocess.

scratchgpt's step is the trainer's: `calc_loss_batch` and `make_optimizer` (fused
AdamW, decay on 2-D weights). HF and the seed code get `torch.optim.AdamW`, as
their users write it, and the same `F.cross_entropy` over the logits.

    .venv/bin/python benchmarks/bench_train.py            # full run, ~5 minutes
    .venv/bin/python benchmarks/bench_train.py --quick    # fewer repeats, 124M fp32 only
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from common import (hf_model_from_gpt, interleaved, machine_line, matmul_peak_gflops, median,
                    seed_model_from_gpt, setup_threads)
from scratchgpt import GPT_CONFIG_124M, GPTModel
from scratchgpt.train import calc_loss_batch, make_optimizer

SHAPES = {
    "124M": (dict(GPT_CONFIG_124M), 2, 256),
    "small": ({**GPT_CONFIG_124M, "emb_dim": 384, "n_layers": 6, "n_heads": 6}, 8, 256),
}
CONTENDERS = ("scratchgpt", "hf", "seed")
LR, WD = 4e-4, 0.1  # the seed's AdamW settings


def build(name: str, cfg: dict):
    """The contender's model (train mode) and a function running one training step on (x, y)."""
    torch.manual_seed(0)
    ours = GPTModel(cfg)
    if name == "scratchgpt":
        model = ours
        opt = make_optimizer(model, lr=LR, weight_decay=WD, betas=(0.9, 0.999), device=torch.device("cpu"))

        def loss_of(x, y):
            return calc_loss_batch(x, y, model, "cpu")
    else:
        model = hf_model_from_gpt(ours, attn_implementation="sdpa") if name == "hf" else seed_model_from_gpt(ours)
        del ours
        opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
        if name == "hf":
            def loss_of(x, y):
                return F.cross_entropy(model(x).logits.flatten(0, 1), y.flatten())
        else:
            def loss_of(x, y):
                return F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    model.train()

    def step(x, y, amp: torch.dtype | None):
        with torch.autocast("cpu", dtype=amp) if amp is not None else nullcontext():
            loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, step


def flops_per_token(cfg: dict, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul weights (all but the embeddings) + attention (PaLM's 12 L T E)."""
    e, layers, v = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    matmul_params = layers * (4 * e * e + 8 * e * e) + e * v
    return 6 * matmul_params + 12 * layers * seq_len * e


def batch_for(cfg: dict, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), generator=g)
    return data[:, :-1], data[:, 1:]


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def throughput(shape: str, dtypes: list[str], repeats: int, peaks: dict[str, float]) -> None:
    cfg, b, t = SHAPES[shape]
    x, y = batch_for(cfg, b, t)
    fpt = flops_per_token(cfg, t)
    print(f"\n## training step, {shape} shape ({cfg['n_layers']} layers, {cfg['emb_dim']} wide, "
          f"drop {cfg['drop_rate']}), batch {b}x{t}")
    print(f"{'contender':<14}{'dtype':<7}{'tokens/s':>10}{'s/step':>8}{'vs HF':>8}{'vs fp32':>9}"
          f"{'MFU':>7}{'faults/step':>13}")
    steps = {name: build(name, cfg)[1] for name in CONTENDERS}
    results: dict[tuple[str, str], float] = {}
    faults: dict[tuple[str, str], float] = {}
    for dt in dtypes:
        amp = None if dt == "fp32" else torch.bfloat16
        calls: dict[str, list[int]] = {name: [] for name in CONTENDERS}

        def timed(name):
            def run():
                before = minflt()
                steps[name](x, y, amp)
                calls[name].append(minflt() - before)
            return run

        times = interleaved({name: timed(name) for name in CONTENDERS}, repeats=repeats, warmup=2)
        for name in CONTENDERS:
            results[name, dt] = b * t / median(times[name])
            faults[name, dt] = median(calls[name][2:])  # timed calls only
    for dt in dtypes:
        for name in CONTENDERS:
            tps = results[name, dt]
            vs_fp32 = f"{tps / results[name, 'fp32']:.2f}x" if "fp32" in dtypes else "-"
            mfu = tps * fpt / (peaks[dt] * 1e9)
            print(f"{name:<14}{dt:<7}{tps:>10.0f}{b * t / tps:>8.2f}{tps / results['hf', dt]:>7.2f}x"
                  f"{vs_fp32:>9}{mfu:>7.0%}{faults[name, dt]:>13.0f}")
    print(f"(MFU: {fpt / 1e6:.0f} MFLOP per token against the measured matmul peak of its dtype)")


CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from common import setup_threads
import bench_train

def hwm_kib():  # peak RSS of this process (VmHWM starts afresh at exec, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])

setup_threads(int(sys.argv[3]))
name = sys.argv[2]
cfg, b, t = bench_train.SHAPES["124M"]
x, y = bench_train.batch_for(cfg, b, t)
model, step = bench_train.build(name, cfg)
after_build = hwm_kib()
times, faults = [], []
for i in range(5):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    step(x, y, None)
    if i >= 2:  # the first steps create the optimizer state
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"build_kib": after_build, "peak_kib": hwm_kib(),
                  "step_s": sorted(times)[1], "faults": sorted(faults)[1]}))
"""

# THP_MEM_ALLOC_ENABLE=1 makes PyTorch's CPU allocator place buffers of 2 MB and more on
# transparent huge pages (madvise), so the activation buffers that glibc hands back to the
# kernel after each step cost one page fault per 2 MB instead of one per 4 KB when they
# come back. PyTorch reads it once, at import, so it is compared in fresh processes.
ENVS = {"default": {}, "THP": {"THP_MEM_ALLOC_ENABLE": "1"}}


def fresh_processes(threads: int, rounds: int) -> None:
    here = str(Path(__file__).resolve().parent)
    runs: dict[tuple[str, str], list[dict]] = {}
    for _ in range(rounds):
        for env_name, extra in ENVS.items():
            for name in CONTENDERS:
                out = subprocess.run([sys.executable, "-c", CHILD, here, name, str(threads)],
                                     check=True, capture_output=True, text=True,
                                     env={**os.environ, **extra}).stdout
                runs.setdefault((name, env_name), []).append(json.loads(out.strip().splitlines()[-1]))
    print("\n## 124M fp32 training step in a fresh process: peak resident memory and page faults")
    print(f"{'contender':<14}{'env':<9}{'peak MiB':>10}{'vs HF':>8}{'model+opt MiB':>15}"
          f"{'s/step':>8}{'faults/step':>13}")
    hf_peak = median([r["peak_kib"] for r in runs["hf", "default"]])
    for env_name in ENVS:
        for name in CONTENDERS:
            rs = runs[name, env_name]
            peak = median([r["peak_kib"] for r in rs])
            print(f"{name:<14}{env_name:<9}{peak / 1024:>10.0f}{peak / hf_peak:>7.2f}x"
                  f"{median([r['build_kib'] for r in rs]) / 1024:>15.0f}"
                  f"{median([r['step_s'] for r in rs]):>8.2f}{median([r['faults'] for r in rs]):>13.0f}")
    print("(THP: THP_MEM_ALLOC_ENABLE=1 in the environment; s/step here is one process at a time, "
          "noisier than the interleaved table above)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", default="124M,small")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rss-rounds", type=int, default=1)
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--quick", action="store_true", help="124M fp32 only, 3 repeats")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.shapes, args.dtypes = 3, "124M", "fp32"
    setup_threads(args.threads)
    print(f"# bench_train: {machine_line()}")
    dtypes = args.dtypes.split(",")
    peaks = {"fp32": matmul_peak_gflops(torch.float32)}
    if "bf16" in dtypes:
        peaks["bf16"] = matmul_peak_gflops(torch.bfloat16)
    print("measured matmul peak (2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    for shape in filter(None, args.shapes.split(",")):
        throughput(shape, dtypes, args.repeats, peaks)
    if not args.no_rss:
        fresh_processes(args.threads, args.rss_rounds)


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n(bench_train took {time.perf_counter() - t0:.0f} s)")
