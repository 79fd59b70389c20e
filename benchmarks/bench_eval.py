"""How fast is `evaluate_perplexity` against the Hugging Face perplexity guide's loop?

Both evaluate the same weights (a GPTModel and the GPT2LMHeadModel built from it by
tests/hf_reference.py) on the same text (the Python reference topics that ship with
CPython) with the same context and stride, interleaved and repeated in one run;
the script prints tokens scored per second for each, their ratio, and checks that
the two losses agree (the guide's own averaging is corrected as in the tests).

    python benchmarks/bench_eval.py [--tokens 4096] [--context 256] [--stride 128]
                                    [--layers 4] [--emb-dim 256] [--batch-size 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # hf_reference: the hand-written GPTModel -> HF mapping

from hf_reference import hf_guide_loss, hf_model_from_gpt  # noqa: E402

from scratchgpt import GPTModel, evaluate_perplexity, get_tokenizer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--stride", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--emb-dim", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    ids = torch.tensor(get_tokenizer().encode(text)[:args.tokens])
    torch.manual_seed(0)
    model = GPTModel({"vocab_size": 50257, "context_length": args.context, "emb_dim": args.emb_dim,
                      "n_heads": max(1, args.emb_dim // 64), "n_layers": args.layers, "drop_rate": 0.0,
                      "qkv_bias": True}).eval()
    hf = hf_model_from_gpt(model)
    try:
        hf.set_attn_implementation("sdpa")  # what the guide's users get by default
    except (AttributeError, ValueError):
        pass
    model, hf = model.to(args.device), hf.to(args.device)

    contenders = {
        f"scratchgpt batch {args.batch_size}":
            lambda: evaluate_perplexity(model, ids, args.context, args.stride, args.batch_size, progress=False)["loss"],
        "scratchgpt batch 1":
            lambda: evaluate_perplexity(model, ids, args.context, args.stride, 1, progress=False)["loss"],
        "HF guide loop": lambda: hf_guide_loss(hf, ids, args.context, args.stride)[0],
    }
    losses = {name: fn() for name, fn in contenders.items()}  # also the warm-up round
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    scored = len(ids) - 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}; "
          f"{scored:,} tokens scored, context {args.context}, stride {args.stride}, "
          f"{args.layers} layers x {args.emb_dim}, median of {args.repeats}")
    hf_rate = scored / statistics.median(times["HF guide loop"])
    for name in contenders:
        rate = scored / statistics.median(times[name])
        print(f"  {name:<22} {rate:10,.0f} tokens/s  {rate / hf_rate:5.2f}x HF  loss {losses[name]:.6f}")
    ours, theirs = losses[f"scratchgpt batch {args.batch_size}"], losses["HF guide loop"]
    agree = abs(ours - theirs) / theirs
    print(f"losses agree to {agree:.1e} (relative)")
    if agree > 1e-4:
        sys.exit("the two evaluations disagree")


if __name__ == "__main__":
    main()
