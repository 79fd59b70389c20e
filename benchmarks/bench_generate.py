"""Batch-1 generation and the no-grad forward pass: scratchgpt against Hugging Face
GPT2LMHeadModel and the seed-style code, all holding the same random weights.

Default shape: GPT-2 124M (context 1024, qkv biases, untied head), a 16-token
prompt, 256 new tokens, greedy, fp32, 2 threads. Prints tokens/s, ratios against
the baselines measured in the same run, and the memory-bandwidth limit:
weight bytes read per token / copy bandwidth measured in the same run.

    .venv/bin/python benchmarks/bench_generate.py            # full run, ~4 minutes
    .venv/bin/python benchmarks/bench_generate.py --quick    # fewer tokens and repeats
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from common import (copy_probe, hf_model_from_gpt, interleaved, machine_line, median,
                    seed_model_from_gpt, setup_threads)
import seed_reference
from scratchgpt import GPTModel, generate, gpt2_config


def weight_bytes_per_token(model: GPTModel) -> int:
    """Bytes of weights one decoding step reads: every parameter except the two embedding
    tables, of which it reads one row each (the KV cache reads are not counted)."""
    skip = {id(model.tok_emb.weight), id(model.pos_emb.weight)}
    total = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in skip)
    if model.out_head.weight is model.tok_emb.weight:  # tied: the head still reads the whole table
        total += model.out_head.weight.numel() * model.out_head.weight.element_size()
    return total + 2 * model.cfg.emb_dim * model.tok_emb.weight.element_size()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="124M")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each cached contender")
    ap.add_argument("--seed-repeats", type=int, default=1, help="timed runs of the uncached seed loop")
    ap.add_argument("--forward-repeats", type=int, default=5)
    ap.add_argument("--no-seed", action="store_true", help="skip the (slow) uncached seed loop")
    ap.add_argument("--no-bf16", action="store_true", help="skip the bf16 inference mode")
    ap.add_argument("--quick", action="store_true", help="64 new tokens, 2 repeats, seed loop once")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.repeats, args.forward_repeats = 64, 2, 3
    setup_threads(args.threads)
    print(f"# bench_generate: {machine_line()}")

    torch.manual_seed(0)
    cfg = gpt2_config(args.size)
    model = GPTModel(cfg).eval()
    hf = hf_model_from_gpt(model, attn_implementation="sdpa")
    hf.generation_config.eos_token_id = None  # random weights: never stop early
    hf.generation_config.pad_token_id = 0
    seed = seed_model_from_gpt(model).eval()
    ctx = model.cfg.context_length
    prompt = torch.randint(0, cfg["vocab_size"], (1, args.prompt_tokens),
                           generator=torch.Generator().manual_seed(1))
    n = args.new_tokens
    print(f"shape {args.size}: context {ctx}, prompt {args.prompt_tokens}, {n} new tokens, "
          f"greedy, batch 1, fp32")

    outputs: dict[str, torch.Tensor] = {}

    def ours():
        outputs["scratchgpt"] = generate(model, prompt, n, context_size=ctx)

    def theirs():
        with torch.no_grad():
            outputs["hf"] = hf.generate(prompt, max_new_tokens=n, do_sample=False, use_cache=True)

    def seed_loop():
        outputs["seed"] = seed_reference.generate(seed, prompt, n, context_size=ctx)

    # ---------------------------------------------------------------- generation
    copy_run, copy_bytes = copy_probe()  # the bandwidth, sampled in every round beside the contenders
    cached = {"scratchgpt": ours, "hf": theirs, "copy": copy_run}
    times = interleaved(cached, repeats=args.repeats)
    if not args.no_seed:
        # the seed loop is slow: time it between extra cached runs so it sees the same machine
        times["seed"] = interleaved({"seed": seed_loop}, repeats=args.seed_repeats, warmup=0)["seed"]
        more = interleaved(cached, repeats=1, warmup=0)
        for k, v in more.items():
            times[k] += v
    samples = sorted(copy_bytes / t / 1e9 for t in times.pop("copy"))
    tps = {k: n / median(v) for k, v in times.items()}

    bandwidth = median(samples)
    wbytes = weight_bytes_per_token(model)
    limit = bandwidth * 1e9 / wbytes
    same = all(torch.equal(outputs["scratchgpt"], o) for o in outputs.values())

    print("\n## generation (tokens/s, median)")
    print(f"{'contender':<34}{'tokens/s':>10}{'vs HF':>8}{'vs seed':>9}{'of limit':>10}")
    rows = [("scratchgpt generate (KV cache)", "scratchgpt"),
            ("HF generate(use_cache=True)", "hf"),
            ("seed-style loop (no cache)", "seed")]
    for label, key in rows:
        if key not in tps:
            continue
        vs_seed = f"{tps[key] / tps['seed']:.2f}x" if "seed" in tps else "-"
        print(f"{label:<34}{tps[key]:>10.2f}{tps[key] / tps['hf']:>7.2f}x{vs_seed:>9}"
              f"{tps[key] / limit:>9.0%}")
    print(f"bandwidth limit: {wbytes / 1e6:.0f} MB of weights per token / {bandwidth:.1f} GB/s copy "
          f"bandwidth = {limit:.1f} tokens/s (copy bandwidth: median of {len(samples)} samples taken "
          f"between the runs, range {samples[0]:.1f}..{samples[-1]:.1f} GB/s)")
    print(f"greedy tokens identical across contenders: {'yes' if same else 'NO'}")

    # ---------------------------------------------------------------- forward pass
    batch = torch.randint(0, cfg["vocab_size"], (8, 256), generator=torch.Generator().manual_seed(2))

    def fwd_ours():
        with torch.no_grad():
            return model(batch)

    def fwd_hf():
        with torch.no_grad():
            return hf(batch).logits

    def fwd_seed():
        with torch.no_grad():
            return seed(batch)

    ft = interleaved({"scratchgpt": fwd_ours, "hf": fwd_hf, "seed": fwd_seed},
                     repeats=args.forward_repeats)
    tokens = batch.numel()
    print("\n## forward pass, no grad, batch 8x256 (tokens/s, median)")
    print(f"{'contender':<34}{'tokens/s':>10}{'ms':>9}{'vs HF':>8}")
    for key in ("scratchgpt", "hf", "seed"):
        t = median(ft[key])
        print(f"{key:<34}{tokens / t:>10.0f}{t * 1e3:>9.0f}{median(ft['hf']) / t:>7.2f}x")

    # ---------------------------------------------------------------- bf16 weights
    if not args.no_bf16:
        model_bf16 = copy.deepcopy(model).to(torch.bfloat16)

        def ours_bf16():
            outputs["bf16"] = generate(model_bf16, prompt, n, context_size=ctx)

        bt = interleaved({"fp32": ours, "bf16": ours_bf16}, repeats=args.repeats)
        probe = batch[:1]
        with torch.no_grad():
            ref = model(probe)
            low = model_bf16(probe).float()
        drift = (low - ref).abs().max().item()
        agree = (outputs["bf16"] == outputs["scratchgpt"]).all(dim=0)[args.prompt_tokens:]
        first_diff = int((~agree).nonzero()[0]) if not bool(agree.all()) else n
        bf_limit = bandwidth * 1e9 / weight_bytes_per_token(model_bf16)
        print("\n## bf16 inference mode (weights in bf16, model.to(torch.bfloat16))")
        print(f"{'mode':<34}{'tokens/s':>10}{'vs fp32':>9}{'of limit':>10}")
        for key in ("fp32", "bf16"):
            lim = limit if key == "fp32" else bf_limit
            print(f"{key:<34}{n / median(bt[key]):>10.2f}{median(bt['fp32']) / median(bt[key]):>8.2f}x"
                  f"{n / median(bt[key]) / lim:>9.0%}")
        print(f"bf16 limit {bf_limit:.1f} tokens/s; max |logit change| vs fp32 over 256 positions: "
              f"{drift:.3f} (logits span {ref.min().item():.1f}..{ref.max().item():.1f}); "
              f"greedy tokens equal to fp32 for the first {first_diff} of {n}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n(bench_generate took {time.perf_counter() - t0:.0f} s)")
