"""Training step throughput (forward + loss + backward + optimizer step) and peak memory:
scratchgpt against Hugging Face's GPT2LMHeadModel, nanoGPT and the seed walkthrough's code,
all holding the same weights and training on the same batch.

Two kinds of comparison, each row saying what it runs (model, optimizer, loss path):

- identical settings: every contender gets the same shape, the same optimizer
  (`torch.optim.AdamW(fused=True)` over all parameters, no clipping) and the same
  dtype; only the model code and its loss differ. This measures the model and loss.
- as users get it: each tool's own training set-up. HF: the optimizer its `Trainer`
  builds by default (`create_optimizer()` with the installed transformers' default
  `optim`, adamw_torch_fused since torch 2.8), its `labels=` loss, clipping at its
  `max_grad_norm`. nanoGPT: its `configure_optimizers` (fused only on CUDA) and loss,
  clipping at 1.0, fp32 only (its train.py has no CPU autocast). The seed: its
  `torch.optim.AdamW(model.parameters(), lr=0.0004, weight_decay=0.1)`, no clipping,
  fp32 only. scratchgpt: its Trainer's `make_optimizer` and `calc_loss_batch`, clipping at 1.0.
  This measures what a user of each tool experiences.

Shapes (both kinds): GPT-2 124M (12 layers, 768 wide, tied head, query/key/value
biases, context 256, dropout 0) at batch 2x256, and a small model (6 layers, 384
wide, otherwise the same) at 8x256; fp32 and bf16 autocast. Prints tokens/s, ratios
measured in the same run, the first step's loss (a check that the contenders compute
the same function), minor page faults per step, and model FLOPs utilisation against
the matmul peak measured in the same run. Then each identical-settings contender runs
124M steps in a fresh process, for peak resident memory. Last, the LoRA rows: LoRA
(rank 8 on query and value) against full fine-tuning of the GPT-2 355M shape, fp32 and
bf16, peak RSS and step time from fresh processes (bench_lora.py, which it runs).

    .venv/bin/python benchmarks/bench_train.py            # everything (LoRA rows: bench_lora.py), ~40 minutes
    .venv/bin/python benchmarks/bench_train.py --quick    # 124M, identical settings, fp32, 3 repeats
    .venv/bin/python benchmarks/bench_train.py --kinds same --shapes 124M --no-rss
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common import (hf_model_from_gpt, interleaved, machine_line, matmul_peak_gflops, median,
                    seed_model_from_gpt, setup_threads)
from nanogpt_reference import nanogpt_from_gpt
from scratchgpt import GPT_CONFIG_124M, GPTModel
from scratchgpt.train import TrainConfig, calc_loss_batch, make_optimizer

_GPT2 = {**GPT_CONFIG_124M, "qkv_bias": True, "drop_rate": 0.0, "tie_weights": True}
SHAPES = {  # name: (config, batch, tokens)
    "124M": (_GPT2, 2, 256),
    "small": ({**_GPT2, "emb_dim": 384, "n_layers": 6, "n_heads": 6}, 8, 256),
}
LR, WD = 4e-4, 0.1  # the seed's AdamW settings, used by every contender
LOSS_SCRATCHGPT = "calc_loss_batch: chunked head + cross-entropy (losses.py)"
LOSS_PLAIN = "logits + F.cross_entropy"
CPU = torch.device("cpu")


@dataclass
class Step:
    """One contender's training step: loss, backward, optional clipping, optimizer step."""

    model: nn.Module
    loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    optimizer: torch.optim.Optimizer
    clip: float | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, amp: torch.dtype | None) -> float:
        with torch.autocast("cpu", dtype=amp) if amp is not None else nullcontext():
            loss = self.loss_of(x, y)
        loss.backward()
        if self.clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


@dataclass
class Contender:
    what: str  # the model code, optimizer and loss path, printed above the table
    build: Callable[[dict], Step]
    dtypes: tuple[str, ...] = ("fp32", "bf16")


def ours(cfg: dict) -> GPTModel:
    """The weights every contender starts from."""
    torch.manual_seed(0)
    return GPTModel(cfg).train()


def fused_adamw(model: nn.Module) -> torch.optim.AdamW:
    """The identical-settings optimizer."""
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, fused=True)


def plain_loss(model: nn.Module, hf: bool = False) -> Callable:
    def loss_of(x, y):
        logits = model(x).logits if hf else model(x)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())
    return loss_of


def scratchgpt_loss(model: nn.Module) -> Callable:
    return lambda x, y: calc_loss_batch(x, y, model, CPU)


# --------------------------------------------------------------------------- the contenders

def same_scratchgpt(cfg: dict) -> Step:
    model = ours(cfg)
    return Step(model, scratchgpt_loss(model), fused_adamw(model))


def same_hf(cfg: dict) -> Step:
    hf = hf_model_from_gpt(ours(cfg), attn_implementation="sdpa").train()
    return Step(hf, plain_loss(hf, hf=True), fused_adamw(hf))


def same_seed(cfg: dict) -> Step:
    seed = seed_model_from_gpt(ours(cfg)).train()
    return Step(seed, plain_loss(seed), fused_adamw(seed))


def users_scratchgpt(cfg: dict) -> Step:
    model = ours(cfg)
    defaults = TrainConfig()
    opt = make_optimizer(model, LR, WD, defaults.betas, CPU)
    return Step(model, scratchgpt_loss(model), opt, clip=defaults.grad_clip)


def hf_trainer_args():
    from transformers import TrainingArguments
    return TrainingArguments(output_dir=os.path.join(tempfile.gettempdir(), "bench_train_hf"),
                             report_to="none", use_cpu=True, learning_rate=LR, weight_decay=WD)


def users_hf(cfg: dict) -> Step:
    from transformers import Trainer
    hf = hf_model_from_gpt(ours(cfg), attn_implementation="sdpa").train()
    args = hf_trainer_args()
    opt = Trainer(model=hf, args=args).create_optimizer()
    # HF's loss shifts the labels itself: it scores positions 1..T-1 of the inputs
    return Step(hf, lambda x, y: hf(input_ids=x, labels=x).loss, opt, clip=args.max_grad_norm)


def users_nanogpt(cfg: dict) -> Step:
    gpt = nanogpt_from_gpt(ours(cfg)).train()
    opt = gpt.configure_optimizers(WD, LR, (0.9, 0.95), "cpu")
    return Step(gpt, lambda x, y: gpt(x, y)[1], opt, clip=1.0)


def users_seed(cfg: dict) -> Step:
    seed = seed_model_from_gpt(ours(cfg)).train()
    return Step(seed, plain_loss(seed), torch.optim.AdamW(seed.parameters(), lr=LR, weight_decay=WD))


def kinds() -> dict[str, tuple[str, dict[str, Contender]]]:
    """The two kinds of comparison: title, and contenders with what each runs."""
    same = "torch.optim.AdamW(fused=True), weight decay on all parameters, no clipping"
    users_hf_optim = getattr(hf_trainer_args().optim, "value", hf_trainer_args().optim)
    return {
        "same": ("identical settings", {
            "scratchgpt": Contender(f"scratchgpt GPTModel | {same} | {LOSS_SCRATCHGPT}", same_scratchgpt),
            "hf": Contender(f"HF GPT2LMHeadModel (sdpa) | {same} | {LOSS_PLAIN}", same_hf),
            "seed": Contender(f"seed walkthrough GPTModel | {same} | {LOSS_PLAIN}", same_seed),
        }),
        "users": ("each tool as its users get it", {
            "scratchgpt": Contender("scratchgpt Trainer: make_optimizer (fused AdamW, decay on 2-D) "
                                    f"| clip 1.0 | {LOSS_SCRATCHGPT}", users_scratchgpt),
            "hf": Contender(f"HF Trainer.create_optimizer() (optim={users_hf_optim}, decay except "
                            "bias/LayerNorm) | clip 1.0 | model(labels=) loss (T-1 positions)", users_hf),
            "nanogpt": Contender("nanoGPT configure_optimizers (for-loop AdamW on CPU, decay on 2-D) "
                                 f"| clip 1.0 | {LOSS_PLAIN}; fp32 only on CPU", users_nanogpt, ("fp32",)),
            "seed": Contender("seed walkthrough: torch.optim.AdamW(model.parameters()) (for-loop) "
                              f"| no clipping | {LOSS_PLAIN}; fp32 only", users_seed, ("fp32",)),
        }),
    }


# --------------------------------------------------------------------------- measuring

def flops_per_token(cfg: dict, seq_len: int) -> float:
    """Training FLOPs per token: 6 x matmul weights (all but the embeddings) + attention (PaLM's 12 L T E)."""
    e, layers, v = cfg["emb_dim"], cfg["n_layers"], cfg["vocab_size"]
    matmul_params = layers * (4 * e * e + 8 * e * e) + e * v
    return 6 * matmul_params + 12 * layers * seq_len * e


def batch_for(cfg: dict, batch: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    data = torch.randint(0, cfg["vocab_size"], (batch, seq + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()  # as the training loops stack them


def minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def shape_line(shape: str) -> str:
    cfg, b, t = SHAPES[shape]
    params = sum(p.numel() for p in ours(cfg).parameters())
    return (f"{shape} shape: {cfg['n_layers']} layers x {cfg['emb_dim']}, "
            f"{'tied' if cfg['tie_weights'] else 'untied'} head, qkv biases {cfg['qkv_bias']}, "
            f"{params / 1e6:.1f}M parameters, dropout {cfg['drop_rate']}, batch {b}x{t}")


def compare(kind: str, shape: str, dtypes: list[str], repeats: int, peaks: dict[str, float]) -> dict:
    """Interleave the contenders of one kind of comparison on one shape; print and return the table."""
    title, contenders = kinds()[kind]
    cfg, b, t = SHAPES[shape]
    x, y = batch_for(cfg, b, t)
    fpt = flops_per_token(cfg, t)
    print(f"\n## {title}: {shape_line(shape)}")
    for name, c in contenders.items():
        print(f"  {name:<11} {c.what}")
    steps = {name: c.build(cfg) for name, c in contenders.items()}
    gc.collect()
    results: dict[tuple[str, str], dict] = {}
    for dt in dtypes:
        amp = None if dt == "fp32" else torch.bfloat16
        names = [n for n, c in contenders.items() if dt in c.dtypes]
        faults: dict[str, list[int]] = {n: [] for n in names}
        first: dict[str, float] = {}

        def timed(name):
            def run():
                before = minflt()
                loss = steps[name](x, y, amp)
                faults[name].append(minflt() - before)
                first.setdefault(name, loss)
            return run

        times = interleaved({n: timed(n) for n in names}, repeats=repeats, warmup=2)
        for n in names:
            results[n, dt] = {"tokens_s": b * t / median(times[n]), "faults": median(faults[n][2:]),
                              "loss0": first[n], "range": (b * t / max(times[n]), b * t / min(times[n]))}
    print(f"{'contender':<12}{'dtype':<6}{'tokens/s':>9}{'range':>12}{'s/step':>8}{'vs HF':>7}"
          f"{'vs fp32':>8}{'MFU':>6}{'faults/step':>12}{'first loss':>12}")
    for dt in dtypes:
        for name in contenders:
            if (name, dt) not in results:
                continue
            r = results[name, dt]
            tps = r["tokens_s"]
            vs_hf = f"{tps / results['hf', dt]['tokens_s']:.2f}x" if ("hf", dt) in results else "-"
            vs_fp32 = f"{tps / results[name, 'fp32']['tokens_s']:.2f}x" if (name, "fp32") in results else "-"
            lo, hi = r["range"]
            print(f"{name:<12}{dt:<6}{tps:>9.0f}{f'{lo:.0f}-{hi:.0f}':>12}{b * t / tps:>8.2f}{vs_hf:>7}"
                  f"{vs_fp32:>8}{tps * fpt / (peaks[dt] * 1e9):>6.0%}{r['faults']:>12.0f}{r['loss0']:>12.5f}")
    print(f"(MFU: {fpt / 1e6:.0f} MFLOP per token against the measured matmul peak of its dtype; "
          f"medians of {repeats} interleaved steps after 2 untimed ones)")
    del steps
    gc.collect()
    return results


CHILD = r"""
import gc, json, resource, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from common import setup_threads
import bench_train

def hwm_kib():  # peak RSS of this process (VmHWM: reset below through clear_refs, unlike ru_maxrss)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1])

setup_threads(int(sys.argv[3]))
name, amp = sys.argv[2], (None if sys.argv[4] == "fp32" else torch.bfloat16)
cfg, b, t = bench_train.SHAPES["124M"]
x, y = bench_train.batch_for(cfg, b, t)
step = bench_train.kinds()["same"][1][name].build(cfg)
gc.collect()
build_peak = hwm_kib()
with open("/proc/self/clear_refs", "w") as f:  # "5": start the peak afresh, so it is the steps' own
    f.write("5")
times, faults = [], []
for i in range(5):
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    step(x, y, amp)
    if i >= 2:  # the first steps create the optimizer state
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(json.dumps({"build_kib": build_peak, "peak_kib": hwm_kib(),
                  "step_s": sorted(times)[1], "faults": sorted(faults)[1]}))
"""

# THP_MEM_ALLOC_ENABLE=1 makes PyTorch's CPU allocator place buffers of 2 MB and more on
# transparent huge pages (madvise), so the activation buffers that glibc hands back to the
# kernel after each step cost one page fault per 2 MB instead of one per 4 KB when they
# come back. PyTorch reads it once, at import, so it is compared in fresh processes.
ENVS = {"default": {}, "THP": {"THP_MEM_ALLOC_ENABLE": "1"}}


def fresh_processes(threads: int, rounds: int, dtypes: list[str]) -> None:
    """Peak RSS of the identical-settings 124M step, each contender alone in a fresh process."""
    here = str(Path(__file__).resolve().parent)
    names = list(kinds()["same"][1])
    runs: dict[tuple[str, str, str], list[dict]] = {}
    for _ in range(rounds):
        for dt in dtypes:
            for env_name, extra in ENVS.items():
                for name in names:
                    out = subprocess.run([sys.executable, "-c", CHILD, here, name, str(threads), dt],
                                         check=True, capture_output=True, text=True,
                                         env={**os.environ, **extra}).stdout
                    runs.setdefault((name, env_name, dt), []).append(json.loads(out.strip().splitlines()[-1]))
    print(f"\n## peak resident memory of a training step, identical settings, {shape_line('124M')}, "
          "one fresh process each")
    print(f"{'contender':<12}{'dtype':<6}{'env':<9}{'step peak MiB':>14}{'vs HF':>7}{'build peak MiB':>16}"
          f"{'s/step':>8}{'faults/step':>12}")
    for dt in dtypes:
        for env_name in ENVS:
            hf_peak = median([r["peak_kib"] for r in runs["hf", env_name, dt]])
            for name in names:
                rs = runs[name, env_name, dt]
                peak = median([r["peak_kib"] for r in rs])
                print(f"{name:<12}{dt:<6}{env_name:<9}{peak / 1024:>14.0f}{peak / hf_peak:>6.2f}x"
                      f"{median([r['build_kib'] for r in rs]) / 1024:>16.0f}"
                      f"{median([r['step_s'] for r in rs]):>8.2f}{median([r['faults'] for r in rs]):>12.0f}")
    print("(step peak: VmHWM over 5 steps, reset after building; build peak: while converting the "
          "weights; THP: THP_MEM_ALLOC_ENABLE=1; s/step is one process at a time, noisier than above)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--kinds", default="same,users,lora",
                    help="same (identical settings), users (as users get it), lora (LoRA against full "
                         "fine-tuning of the 355M shape, fresh processes: bench_lora.py)")
    ap.add_argument("--shapes", default="124M,small")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--rss-rounds", type=int, default=1)
    ap.add_argument("--rss-dtypes", default="fp32")
    ap.add_argument("--no-rss", action="store_true")
    ap.add_argument("--quick", action="store_true", help="124M, identical settings, fp32, 3 repeats")
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.kinds, args.shapes, args.dtypes = 3, "same", "124M", "fp32"
    setup_threads(args.threads)
    print(f"# bench_train: {machine_line()}; load average {os.getloadavg()[0]:.1f} at the start")
    dtypes = args.dtypes.split(",")
    peaks = {"fp32": matmul_peak_gflops(torch.float32)}
    if "bf16" in dtypes:
        peaks["bf16"] = matmul_peak_gflops(torch.bfloat16)
    print("measured matmul peak (2048^3): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in peaks.items()))
    kinds_wanted = list(filter(None, args.kinds.split(",")))
    for kind in (k for k in kinds_wanted if k != "lora"):
        for shape in filter(None, args.shapes.split(",")):
            compare(kind, shape, dtypes, args.repeats, peaks)
    if not args.no_rss:
        fresh_processes(args.threads, args.rss_rounds, args.rss_dtypes.split(","))
    if "lora" in kinds_wanted:  # its rows need a fresh process per contender: bench_lora.py runs them
        print("\n## LoRA against full fine-tuning (bench_lora.py)", flush=True)
        subprocess.run([sys.executable, str(Path(__file__).with_name("bench_lora.py")), "--threads",
                        str(args.threads), "--dtypes", args.dtypes], check=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n(bench_train took {time.perf_counter() - t0:.0f} s)")
