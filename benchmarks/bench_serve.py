"""`scratchgpt serve` under load: a real server process against in-process `generate`.

Default shape: GPT-2 124M (random weights, the `--preset 124M` model), fp32, 2 threads,
a 16-token prompt and 128 new tokens per request, greedy. Measured in one run,
interleaved round by round:

- single-stream tokens/s through HTTP (a streaming /v1/completions request, from
  sending it to `data: [DONE]`) against in-process `generate` with the same prompt;
- aggregate tokens/s with 1, 2, 4 and 8 concurrent streaming clients;
- time to first token, p50 and p95, at 8 clients;
- CPU milliseconds per token (server process + this client, or this process for
  `generate`): on a machine shared with other work the wall-clock rates swing 2x or
  more from run to run, while the CPU each token costs moves far less (run with
  OMP_WAIT_POLICY=passive so that spinning OpenMP workers are not counted as work).

Targets (issue 9): HTTP single stream >= 0.9x in-process, 8 clients >= 4x one client.

    .venv/bin/python benchmarks/bench_serve.py           # ~10 minutes on 2 busy cores
    .venv/bin/python benchmarks/bench_serve.py --quick   # 32 new tokens, 2 rounds
    OMP_WAIT_POLICY=passive .venv/bin/python benchmarks/bench_serve.py   # workers that sleep, not spin
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import torch

from common import machine_line, median, setup_threads
from scratchgpt import GPTModel, generate, get_tokenizer, gpt2_config

SRC = Path(__file__).resolve().parents[1] / "src"


def start_server(size: str, threads: int, max_batch: int) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "scratchgpt.cli", "serve", "--preset", size, "--port", "0",
                             "--max-batch", str(max_batch)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    for line in proc.stdout:
        match = re.search(r"ready at (http://\S+)", line)
        if match:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, match.group(1)
    raise RuntimeError(f"the server exited with {proc.wait()} before it was ready")


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of process `pid` (Linux /proc), or of this process."""
    if pid is None:
        times = os.times()
        return times.user + times.system
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stream(client: httpx.Client, prompt: list[int], max_tokens: int) -> tuple[float, float, int, str]:
    """One streaming completion: (seconds to the first text, seconds to [DONE], tokens, text)."""
    start = time.perf_counter()
    first, text, tokens = None, [], 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            for choice in event["choices"]:
                if choice["text"] and first is None:
                    first = time.perf_counter() - start
                text.append(choice["text"])
    return first, time.perf_counter() - start, tokens, "".join(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="124M")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--clients", default="1,2,4,8", help="concurrent streaming clients to measure")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every measurement")
    ap.add_argument("--quick", action="store_true", help="32 new tokens, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.rounds = 32, 2
    clients = [int(c) for c in args.clients.split(",")]
    setup_threads(args.threads)
    print(f"# bench_serve: {machine_line()}")
    print(f"shape {args.size}, fp32, prompt {args.prompt_tokens} tokens, {args.new_tokens} new tokens per "
          f"request, greedy; server --max-batch {max(clients)}, {args.threads} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")

    torch.manual_seed(0)  # the weights `scratchgpt serve --preset` builds
    model = GPTModel(gpt2_config(args.size)).eval()
    ctx = model.cfg.context_length
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 50000, (args.prompt_tokens,), generator=gen).tolist() for _ in range(max(clients))]
    proc, url = start_server(args.size, args.threads, max(clients))
    n = args.new_tokens
    try:
        http = httpx.Client(base_url=url, timeout=600)
        tokenizer, in_process_text = get_tokenizer(), []

        cpu = {"generate": [], **{k: [] for k in clients}}  # CPU ms per token

        def in_process() -> float:
            start, cpu_start = time.perf_counter(), cpu_seconds()
            out = generate(model, torch.tensor([prompts[0]]), n, ctx, eos_id=50256)
            seconds = time.perf_counter() - start
            cpu["generate"].append((cpu_seconds() - cpu_start) * 1000 / n)
            in_process_text[:] = [tokenizer.decode(out[0, len(prompts[0]):].tolist())]
            return seconds

        def concurrent(k: int) -> tuple[float, int, list[float]]:
            """k clients at once: (wall seconds, tokens, times to first token)."""
            start, cpu_start = time.perf_counter(), cpu_seconds() + cpu_seconds(proc.pid)
            with ThreadPoolExecutor(k) as pool:
                results = list(pool.map(lambda i: stream(http, prompts[i], n), range(k)))
            tokens = sum(r[2] for r in results)
            cpu[k].append((cpu_seconds() + cpu_seconds(proc.pid) - cpu_start) * 1000 / tokens)
            return time.perf_counter() - start, tokens, [r[0] for r in results]

        stream(http, prompts[0], 4)  # warm up both sides
        in_process()
        local, over_http, aggregate, ttft = [], [], {k: [] for k in clients}, []
        for _ in range(args.rounds):  # interleaved: every measurement once per round
            local.append(n / in_process())
            _, seconds, tokens, text = stream(http, prompts[0], n)
            over_http.append(tokens / seconds)
            if text != in_process_text[0]:
                print("warning: the HTTP answer differs from in-process generate")
            for k in clients:
                seconds, tokens, firsts = concurrent(k)
                aggregate[k].append(tokens / seconds)
                if k == max(clients):
                    ttft += firsts
    finally:
        proc.send_signal(2)
        proc.wait(30)

    print(f"\nsingle stream: in-process generate {median(local):.1f} tok/s, HTTP {median(over_http):.1f} tok/s "
          f"-> {median(over_http) / median(local):.2f}x in-process (target >= 0.9x)")
    one = median(aggregate[clients[0]])
    for k in clients:
        print(f"{k} client{'s' if k > 1 else ' '}: {median(aggregate[k]):7.1f} tok/s aggregate "
              f"({median(aggregate[k]) / one:.2f}x {clients[0]} client; range {min(aggregate[k]):.1f}-"
              f"{max(aggregate[k]):.1f})")
    print(f"8 clients / 1 client: {median(aggregate[max(clients)]) / one:.2f}x (target >= 4x)")
    print(f"CPU ms per token: in-process generate {median(cpu['generate']):.1f}; through HTTP "
          + ", ".join(f"{k} client{'s' if k > 1 else ''} {median(cpu[k]):.1f}" for k in clients)
          + f" -> HTTP single stream costs {median(cpu[clients[0]]) / median(cpu['generate']):.2f}x the CPU of "
            f"generate per token, {max(clients)} clients {median(cpu[clients[0]]) / median(cpu[max(clients)]):.2f}x "
            f"fewer CPU ms per token than 1")
    q = statistics.quantiles(ttft, n=20, method="inclusive")
    print(f"time to first token at {max(clients)} clients ({len(ttft)} requests): p50 {median(ttft) * 1000:.0f} ms, "
          f"p95 {q[18] * 1000:.0f} ms")


if __name__ == "__main__":
    main()
