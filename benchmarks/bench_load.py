"""How fast and how lean is loading OpenAI GPT-2 124M from its TensorFlow checkpoint?

Writes a checkpoint of the full 124M shape (random weights, with the project's
own writer) into a temporary folder, then, in fresh processes so that peak RSS
means something, times `load_gpt2_params_from_tf_ckpt` + `load_weights_into_gpt`
into a GPTModel and reports peak RSS against the fp32 weight bytes.
Targets (2-core laptop-class CPU): under 1.5 s, peak RSS under 2x the weight bytes.

    python benchmarks/bench_load.py [--repeats 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
import torch
from scratchgpt.gpt2.load import (gpt2_config_from_hparams, load_gpt2_params_from_tf_ckpt, load_weights_into_gpt,
                                  read_hparams)
from scratchgpt.model import empty_model
torch.set_num_threads(int(sys.argv[2]))
folder = sys.argv[1]
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
start = time.perf_counter()
settings = read_hparams(folder)
params = load_gpt2_params_from_tf_ckpt(folder, settings)
read = time.perf_counter()
model = empty_model(gpt2_config_from_hparams(settings))
built = time.perf_counter()
load_weights_into_gpt(model, params)
done = time.perf_counter()
weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(json.dumps({"read": read - start, "build": built - read, "copy": done - built, "total": done - start,
                  "rss_before": rss_before, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "weight_bytes": weight_bytes}))
"""


def write_checkpoint(folder: Path) -> None:
    """Run in its own process: the children's ru_maxrss starts from this process's RSS at fork."""
    import numpy as np

    from scratchgpt.gpt2.load import tf_tensor_names
    from scratchgpt.gpt2.tf_checkpoint import write_tf_checkpoint

    settings = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
    e, rng = settings["n_embd"], np.random.default_rng(0)
    shapes = {"attn/c_attn/b": [3 * e], "attn/c_attn/w": [1, e, 3 * e], "attn/c_proj/b": [e],
              "attn/c_proj/w": [1, e, e], "mlp/c_fc/b": [4 * e], "mlp/c_fc/w": [1, e, 4 * e], "mlp/c_proj/b": [e],
              "mlp/c_proj/w": [1, 4 * e, e], "wte": [settings["n_vocab"], e], "wpe": [settings["n_ctx"], e]}
    tensors = {}
    for name in tf_tensor_names(settings["n_layer"]):
        leaf = name.split("/", 2)[-1] if name.startswith("model/h") else name.split("/", 1)[1]
        tensors[name] = (0.02 * rng.standard_normal(shapes.get(leaf, [e]), dtype=np.float32))
    write_tf_checkpoint(folder / "model.ckpt", tensors)
    (folder / "hparams.json").write_text(json.dumps(settings, indent=2))


def main() -> None:
    if sys.argv[1:2] == ["--write"]:
        write_checkpoint(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="fresh-process runs (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--keep", type=Path, default=None, help="write the checkpoint here and keep it")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "model.ckpt.index").is_file():
            subprocess.run([sys.executable, __file__, "--write", str(folder)], check=True)
        data_bytes = (folder / "model.ckpt.data-00000-of-00001").stat().st_size
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(args.threads)],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout))
    mb = 1e6
    weight = runs[0]["weight_bytes"]
    print(f"GPT-2 124M checkpoint: {data_bytes / mb:.1f} MB of data; model fp32 weights {weight / mb:.1f} MB; "
          f"{args.threads} torch threads; {args.repeats} fresh processes (page cache warm)")
    for key in ("read", "build", "copy", "total"):
        times = [r[key] for r in runs]
        print(f"  {key:5s}  median {statistics.median(times):.3f} s   (runs: {', '.join(f'{t:.3f}' for t in times)})")
    total = statistics.median(r["total"] for r in runs)
    peak = max(r["peak_rss"] for r in runs)
    base = statistics.median(r["rss_before"] for r in runs)
    print(f"  load time {total:.3f} s (target < 1.5 s: {'ok' if total < 1.5 else 'MISSED'})")
    print(f"  peak RSS {peak / mb:.0f} MB = {peak / weight:.2f}x weight bytes (target < 2x: "
          f"{'ok' if peak < 2 * weight else 'MISSED'}); of it {base / mb:.0f} MB is Python + torch before loading")


if __name__ == "__main__":
    main()
