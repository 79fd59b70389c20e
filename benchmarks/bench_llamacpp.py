"""scratchgpt beside llama.cpp, the engine people pick for CPU inference, on the same random weights.

One random GPT-2 124M (GPT-2's layout: qkv biases, head tied to the token table) goes
through scratchgpt's Hugging Face export and llama.cpp's own converter into GGUF f32,
bf16 and q8_0. Then, round by round in the same run, llama.cpp's `llama-bench` (batch 1)
and `llama-batched-bench` (8 sequences) and scratchgpt's decode steps measure decode
tokens/s for each format against its counterpart: fp32 vs f32, bf16 vs bf16, int8
weights (bf16 activations) vs q8_0. Prompts of 16 tokens; only the new tokens are timed.

llama.cpp is a benchmark-only dependency, built from the sources that the
`llama-cpp-python` source package on PyPI bundles (benchmarks/README.md says how):

    .venv/bin/python benchmarks/bench_llamacpp.py --llama-cpp PATH/TO/llama.cpp
    LLAMA_CPP_DIR=PATH/TO/llama.cpp .venv/bin/python benchmarks/bench_llamacpp.py --quick

PATH/TO/llama.cpp holds convert_hf_to_gguf.py, gguf-py/ and build/bin/llama-bench and
llama-batched-bench. Without it the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import machine_line, median, setup_threads
from scratchgpt import GPTModel, KVCache, gpt2_config, quantize_model, save_hf_gpt2
from scratchgpt.kernels import decoder
from scratchgpt.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, vocab_source

FORMATS = {  # ours -> llama.cpp's GGUF type
    "fp32": "f32",
    "bf16": "bf16",
    "int8 (bf16 activations)": "q8_0",
}
PROMPT = 16


def find_llama_cpp(path: str | None) -> Path | None:
    """The llama.cpp folder with its converter and both benchmark tools built, or None."""
    if not path:
        return None
    root = Path(path).expanduser()
    needed = [root / "convert_hf_to_gguf.py", root / "gguf-py", *(tool(root, name) for name in
                                                                   ("llama-bench", "llama-batched-bench"))]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        print(f"bench_llamacpp: skipped: {root} lacks {', '.join(missing)}")
        return None
    return root


def tool(root: Path, name: str) -> Path:
    return root / "build" / "bin" / name


# --------------------------------------------------------------------------- the GGUF files

def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes, as its vocab.json and merges.txt write them."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in keep]
    return {b: chr(b) for b in keep} | {b: chr(256 + i) for i, b in enumerate(extra)}


def read_ranks(path: Path) -> dict[bytes, int]:
    """Token bytes -> rank from a gpt2.tiktoken file (base64 token, rank per line)."""
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return ranks


def merges_of(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The BPE merges behind `ranks`, in rank order: each token of two or more bytes is the
    merge of the two parts that byte-pair encoding with only the lower ranks leaves it in."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = [bytes([b]) for b in token]
        while len(parts) > 2:
            i = min(range(len(parts) - 1), key=lambda j: ranks.get(parts[j] + parts[j + 1], len(ranks)))
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        merges.append((parts[0], parts[1]))
    return merges


def write_tokenizer(folder: Path) -> None:
    """vocab.json and merges.txt, which the converter reads, from the project's own GPT-2 vocabulary."""
    source = vocab_source()
    if source is not None and source.is_dir():  # encoder.json + vocab.bpe: GPT-2's own files
        (folder / "vocab.json").write_bytes((source / "encoder.json").read_bytes())
        (folder / "merges.txt").write_bytes((source / "vocab.bpe").read_bytes())
        return
    if source is None:
        raise SystemExit("bench_llamacpp: no GPT-2 vocabulary: run `scratchgpt vocab` first")
    ranks = read_ranks(source)
    text = byte_to_unicode()

    def spell(token: bytes) -> str:
        return "".join(text[b] for b in token)

    vocab = {spell(token): rank for token, rank in ranks.items()} | {ENDOFTEXT: ENDOFTEXT_ID}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{spell(a)} {spell(b)}\n"
                                                                   for a, b in merges_of(ranks)))


# llama.cpp's converter, run with two fixes for a folder written by transformers 5 / scratchgpt:
# its BPE pre-tokenizer check does not know every GPT-2 tokenizer's hash, and it is GPT-2's.
CONVERT = """
import runpy, sys
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
script = sys.argv[1]
sys.argv = [script, *sys.argv[2:]]
runpy.run_path(script, run_name="__main__")
"""


def make_ggufs(model: GPTModel, root: Path, work: Path) -> dict[str, Path]:
    """GGUF files of `model` in each of llama.cpp's formats (reused when already in `work`)."""
    hf = work / "hf"
    files = {kind: work / f"gpt2-124m-random-{kind}.gguf" for kind in FORMATS.values()}
    if all(f.exists() for f in files.values()):
        return files
    save_hf_gpt2(model, hf)
    config = json.loads((hf / "config.json").read_text())
    config["n_ctx"] = config["n_positions"]  # the converter reads n_ctx, which transformers 5 no longer writes
    (hf / "config.json").write_text(json.dumps(config, indent=2))
    write_tokenizer(hf)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "gguf-py"), str(root)])}
    for kind, out in files.items():
        print(f"converting to {kind} with llama.cpp's convert_hf_to_gguf.py ...", flush=True)
        done = subprocess.run([sys.executable, "-c", CONVERT, str(root / "convert_hf_to_gguf.py"), str(hf),
                               "--outtype", kind, "--outfile", str(out)], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench_llamacpp: conversion to {kind} failed:\n{done.stderr[-3000:]}")
    return files


# --------------------------------------------------------------------------- the two engines

def llama_tokens_per_s(root: Path, gguf: Path, batch: int, new: int, threads: int) -> float:
    """llama.cpp's decode tokens/s (all sequences together) for `batch` sequences."""
    if batch == 1:
        cmd = [tool(root, "llama-bench"), "-m", gguf, "-p", "0", "-n", str(new), "-t", str(threads),
               "-r", "1", "-o", "json"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return float(json.loads(out)[0]["avg_ts"])
    cmd = [tool(root, "llama-batched-bench"), "-m", gguf, "-c", str(batch * (PROMPT + new) + 64), "-b", "2048",
           "-ub", "512", "-npp", str(PROMPT), "-ntg", str(new), "-npl", str(batch), "-t", str(threads),
           "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(json.loads(out.strip().splitlines()[-1])["speed_tg"])


def our_tokens_per_s(model: GPTModel, batch: int, new: int) -> float:
    """scratchgpt's decode tokens/s (all sequences together): 16-token prompts prefilled, then
    `new` greedy steps of one token per sequence, the steps timed."""
    prompt = torch.randint(0, model.cfg.vocab_size, (batch, PROMPT), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model, batch, PROMPT + new)
    with torch.no_grad():
        logits = model(prompt, cache=cache, logits_from=-1)
        step = decoder(model)  # the native step, as `generate` and the server take it
        start = time.perf_counter()
        for _ in range(new):
            logits = step(logits[:, -1].argmax(-1, keepdim=True), cache)
        return batch * new / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-cpp", default=os.environ.get("LLAMA_CPP_DIR"),
                    help="the llama.cpp folder (default $LLAMA_CPP_DIR)")
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "scratchgpt-bench-llamacpp"),
                    help="where the HF export and GGUF files go (reused by later runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 32, 2
    root = find_llama_cpp(args.llama_cpp)
    if root is None:
        if not args.llama_cpp:
            print("bench_llamacpp: skipped: no llama.cpp given (--llama-cpp PATH or LLAMA_CPP_DIR); "
                  "benchmarks/README.md says how to build it")
        return
    setup_threads(args.threads)
    print(f"# bench_llamacpp: {machine_line()}; llama.cpp from {root}")

    torch.manual_seed(0)
    model = GPTModel({**gpt2_config("124M"), "tie_weights": True}).eval()
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    ggufs = make_ggufs(model, root, work)
    ours = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    ours["int8 (bf16 activations)"] = quantize_model(copy.deepcopy(ours["bf16"]))

    new = args.new_tokens
    results: dict[tuple[str, int, str], list[float]] = {}
    for r in range(args.rounds + 1):  # round 0 warms both up and is not counted
        for fmt, kind in FORMATS.items():
            for batch in (1, 8):
                llama = llama_tokens_per_s(root, ggufs[kind], batch, new, args.threads)
                mine = our_tokens_per_s(ours[fmt], batch, new)
                if r:
                    results.setdefault((fmt, batch, "llama"), []).append(llama)
                    results.setdefault((fmt, batch, "ours"), []).append(mine)
        print(f"round {r} done", flush=True)

    print(f"\n## decode tokens/s (all sequences together), {PROMPT}-token prompts, {new} new tokens, "
          f"{args.threads} threads, median of {args.rounds} interleaved rounds")
    print(f"{'scratchgpt':<26}{'llama.cpp':<11}{'batch':>6}{'llama.cpp':>11}{'scratchgpt':>12}{'ours / theirs':>15}")
    for fmt, kind in FORMATS.items():
        for batch in (1, 8):
            theirs, mine = median(results[(fmt, batch, "llama")]), median(results[(fmt, batch, "ours")])
            print(f"{fmt:<26}{kind:<11}{batch:>6}{theirs:>11.1f}{mine:>12.1f}{mine / theirs:>14.2f}x")
    for fmt in FORMATS:
        one, eight = median(results[(fmt, 1, "ours")]), median(results[(fmt, 8, "ours")])
        llama_one, llama_eight = median(results[(fmt, 1, "llama")]), median(results[(fmt, 8, "llama")])
        print(f"{fmt}: a step of 8 sequences costs {8 * one / eight:.2f}x a step of one for scratchgpt, "
              f"{8 * llama_one / llama_eight:.2f}x for llama.cpp")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"\n(bench_llamacpp took {time.perf_counter() - t0:.0f} s)")
