"""Batch-1 generation and the no-grad forward pass: scratchgpt against Hugging Face
GPT2LMHeadModel and the seed-style code, all holding the same random weights; then
scratchgpt's number formats (fp32, bf16, int8 weights) against their bandwidth caps, each
decoded by the native step (what `generate` uses) and by the model's forward, a decode step
of 8 ragged sequences against a step of one, and where a step's time goes.

Default shape: GPT-2 124M (context 1024, qkv biases, untied head), a 16-token
prompt, 256 new tokens, greedy, fp32, 2 threads. Prints tokens/s, ratios against
the baselines measured in the same run, and the memory-bandwidth limit (the cap):
weight bytes read per token / copy bandwidth measured in the same run.

    .venv/bin/python benchmarks/bench_generate.py            # full run, ~6 minutes
    .venv/bin/python benchmarks/bench_generate.py --quick    # fewer tokens and repeats
    .venv/bin/python benchmarks/bench_generate.py --no-seed --compile --profile   # + compiled steps, profile
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Callable

import torch
from torch import nn

from common import (copy_probe, hf_model_from_gpt, interleaved, machine_line, median,
                    seed_model_from_gpt, setup_threads)
import seed_reference
from scratchgpt import GPTModel, KVCache, generate, gpt2_config, quantize_model
from scratchgpt.kernels import compiled_decoder, decoder


def weight_bytes_per_token(model: GPTModel) -> int:
    """Bytes of weights one decoding step reads: every parameter and buffer outside the two
    embedding tables (int8 weights, their scales, biases, norms; a head tied to the token table
    reads it whole), and one row of each table. The KV cache reads are not counted, nor the
    attention modules' unused causal-mask buffers."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            continue
        tensors = list(module.parameters(recurse=False))
        tensors += [b for name, b in module.named_buffers(recurse=False) if name != "mask"]
        for t in tensors:
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
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
    ap.add_argument("--no-formats", action="store_true", help="skip the fp32 / bf16 / int8 comparison")
    ap.add_argument("--no-batch", action="store_true", help="skip the batch-8 ragged decode step")
    ap.add_argument("--compile", action="store_true",
                    help="add compiled decode steps (CompiledDecoder) to the format comparison (minutes of "
                         "compilation)")
    ap.add_argument("--profile", action="store_true", help="print where a decode step's time goes")
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

    # ---------------------------------------------------------------- number formats
    if not args.no_formats:
        formats = number_formats(model, args.compile)
        runs: dict[str, Callable[[], object]] = {}
        for name, (fmt_model, path) in formats.items():
            def run(fmt_model=fmt_model, path=path, name=name):
                outputs[name] = greedy(fmt_model, prompt, n, STEPS[path](fmt_model))
            runs[name] = run
        runs["copy"] = copy_run
        if args.compile:
            print("\n(compiling the decode steps...)", flush=True)
        ft = interleaved(runs, repeats=args.repeats)
        samples = sorted(copy_bytes / t / 1e9 for t in ft.pop("copy"))
        bandwidth = median(samples)
        probe = batch[:1]
        with torch.no_grad():
            ref = model(probe)
        print(f"\n## number formats, batch 1, {n} new tokens (tokens/s, median of {args.repeats}; "
              f"cap = weight bytes per token / {bandwidth:.1f} GB/s copy bandwidth measured between the runs; "
              f"each format by the native step, which generate uses, and by the model's forward)")
        print(f"{'format':<34}{'tokens/s':>10}{'vs fp32':>9}{'MB/token':>10}{'cap':>8}{'of cap':>8}"
              f"{'max |dlogit|':>14}{'same tokens':>13}")
        base_tps = n / median(ft["fp32"])
        for name, (fmt_model, _) in formats.items():
            tps = n / median(ft[name])
            wbytes = weight_bytes_per_token(fmt_model)
            cap = bandwidth * 1e9 / wbytes
            with torch.no_grad():
                drift = (fmt_model(probe).float() - ref).abs().max().item()
            agree = (outputs[name] == outputs["fp32"]).all(dim=0)[args.prompt_tokens:]
            same = n if bool(agree.all()) else int((~agree).nonzero()[0])
            print(f"{name:<34}{tps:>10.2f}{tps / base_tps:>8.2f}x{wbytes / 1e6:>10.0f}{cap:>8.1f}{tps / cap:>7.0%}"
                  f"{drift:>14.3f}{same:>9}/{n}")
        print(f"logits over 256 positions span {ref.min().item():.1f}..{ref.max().item():.1f}; random weights "
              "give near-ties, so lossy formats part from fp32's greedy tokens early ('same tokens': how many "
              "agree before the first difference)")

    # ---------------------------------------------------------------- batched ragged decode
    if not args.no_batch:
        batch_step_rows(model, args.repeats)

    # ---------------------------------------------------------------- profile
    if args.profile:
        profile_step(model, "fp32")
        profile_step(copy.deepcopy(model).to(torch.bfloat16), "bf16")
        profile_step(quantize_model(copy.deepcopy(model).to(torch.bfloat16)), "int8 weights, bf16 activations")


# How a decode step is taken: the native step where it serves (what `generate` and the server use),
# the model's forward (one module call per layer), or a compiled graph of that forward.
STEPS: dict[str, Callable[[GPTModel], Callable]] = {
    "native": decoder,
    "forward": lambda model: (lambda tokens, cache: model(tokens, cache=cache, logits_from=-1)),
    "compiled": compiled_decoder,
}


def number_formats(model: GPTModel, compiled: bool) -> dict[str, tuple[GPTModel, str]]:
    """The formats to compare, each a (model holding `model`'s weights, step path) pair."""
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    models = {
        "fp32": model,
        "bf16": bf16,
        "int8 weights, fp32 activations": quantize_model(copy.deepcopy(model)),
        "int8 weights, bf16 activations": quantize_model(copy.deepcopy(bf16)),
    }
    formats = {name: (m, "native") for name, m in models.items()}
    for path in ("forward", "compiled") if compiled else ("forward",):
        formats.update({f"{name}, {path}": (m, path) for name, m in models.items()})
    return formats


def greedy(model: GPTModel, prompt: torch.Tensor, n: int, step: Callable) -> torch.Tensor:
    """`generate(model, prompt, n, ...)` greedily, the prompt prefilled by the forward and every
    further token by `step(tokens, cache)`."""
    cache = KVCache(model, prompt.shape[0], prompt.shape[1] + n)
    tokens = [prompt]
    with torch.no_grad():
        logits = model(prompt, cache=cache, logits_from=-1)
        for i in range(n):
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            if i + 1 < n:
                logits = step(tokens[-1], cache)
    return torch.cat(tokens, dim=1)


def ragged_cache(model: GPTModel, lengths: list[int], extra: int) -> KVCache:
    """A KVCache whose rows hold random prompts of the given lengths, each prefilled on its own."""
    cache = KVCache(model, len(lengths), max(lengths) + extra)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for row, length in enumerate(lengths):
            ids = torch.randint(0, model.cfg.vocab_size, (1, length), generator=generator)
            model(ids, cache=cache.rows(row, row + 1), logits_from=-1)
    return cache


def batch_step_rows(model: GPTModel, repeats: int, steps: int = 32) -> None:
    """Decode steps of 8 sequences of ragged lengths (64..190 cached positions) against steps of one
    sequence of the median length, interleaved; fp32, by the native step and by the model's forward."""
    lengths = [64 + 18 * i for i in range(8)]
    single = [lengths[len(lengths) // 2]]

    def stepper(rows: list[int], path: str) -> Callable[[], None]:
        def run() -> None:
            cache = ragged_cache(model, rows, steps)
            token = torch.zeros(len(rows), 1, dtype=torch.long)
            step = STEPS[path](model)
            with torch.no_grad():
                start = time.perf_counter()
                for _ in range(steps):
                    step(token, cache)
                step_times[path, len(rows)].append((time.perf_counter() - start) / steps)
        return run

    paths = ("native", "forward")
    step_times: dict[tuple[str, int], list[float]] = {(path, rows): [] for path in paths for rows in (1, 8)}
    interleaved({f"{path} {len(rows)}": stepper(rows, path) for path in paths for rows in (single, lengths)},
                repeats=repeats)
    print(f"\n## decode step, 8 sequences of ragged lengths ({lengths[0]}..{lengths[-1]} cached) vs 1 "
          f"({single[0]} cached), fp32, median of {repeats} x {steps} steps")
    print(f"{'step':<10}{'batch':<7}{'ms/step':>10}{'tokens/s':>10}{'vs batch 1':>12}")
    for path in paths:
        one = median(step_times[path, 1])
        for rows in (1, 8):
            t = median(step_times[path, rows])
            print(f"{path:<10}{rows:<7}{t * 1e3:>10.2f}{rows / t:>10.1f}{t / one:>11.2f}x")


def profile_step(model: GPTModel, label: str, steps: int = 32) -> None:
    """Where a batch-1 decode step's time goes: through the model's forward, operator self times
    grouped by kind and the rest of the wall time (Python, module calls, dispatch) as what no
    operator accounts for; through the native step, its one operator and the rest."""
    token = torch.zeros(1, 1, dtype=torch.long)

    def profiled(step: Callable) -> tuple[torch.profiler.profile, float]:
        cache = ragged_cache(model, [128], steps + 8)
        with torch.no_grad():
            for _ in range(4):
                step(token, cache)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for _ in range(steps):
                    step(token, cache)
                wall = (time.perf_counter() - start) / steps
        return prof, wall

    prof, wall = profiled(STEPS["forward"](model))
    kinds = {"matrix products": ("scratchgpt_cpu::decode_matmul", "mkldnn::_linear_pointwise",
                                 "aten::_weight_int8pack_mm", "aten::addmm", "aten::mm", "aten::linear"),
             "attention": ("scratchgpt_cpu::decode_attention", "aten::scaled_dot_product_attention",
                           "aten::_scaled_dot_product_flash_attention_for_cpu",
                           "aten::_scaled_dot_product_attention_math"),
             "layer norms": ("aten::layer_norm", "aten::native_layer_norm"), "GELU": ("aten::gelu",),
             "copies (KV cache writes, casts)": ("aten::copy_", "aten::_to_copy", "aten::to", "aten::index_put_",
                                                 "aten::_index_put_impl_"),
             "adds": ("aten::add", "aten::add_")}
    spent: dict[str, float] = {k: 0.0 for k in kinds}
    spent["other operators"] = 0.0
    for event in prof.key_averages():
        kind = next((k for k, names in kinds.items() if event.key in names), "other operators")
        spent[kind] += event.self_cpu_time_total / 1e6 / steps
    ops = sum(spent.values())
    spent["Python, module calls, dispatch"] = max(wall - ops, 0.0)
    print(f"\n## where a decode step goes: {label}, batch 1, 128 cached positions "
          f"(the model's forward: {wall * 1e3:.2f} ms/step under the profiler)")
    for kind, t in spent.items():
        print(f"{kind:<34}{t * 1e3:>8.2f} ms{t / wall:>7.0%}")
    prof, wall = profiled(STEPS["native"](model))
    native = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "scratchgpt_cpu::decode_step")
    native /= 1e6 * steps
    print(f"the native step: {wall * 1e3:.2f} ms/step, of which its one operator {native * 1e3:.2f} ms "
          f"({native / wall:.0%}) and the rest (Python, the other operators) {(wall - native) * 1e3:.2f} ms")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n(bench_generate took {time.perf_counter() - t0:.0f} s)")
