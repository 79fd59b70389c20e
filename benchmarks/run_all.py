"""Run every benchmark in this folder (bench_*.py), one after another, in fresh processes.

    .venv/bin/python benchmarks/run_all.py                 # all of them (`make bench`)
    .venv/bin/python benchmarks/run_all.py generate train  # only bench_generate.py and bench_train.py
    .venv/bin/python benchmarks/run_all.py --quick         # pass --quick to those that take it

Exits non-zero if any benchmark failed; the others still run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    quick = "--quick" in argv
    wanted = [a for a in argv if not a.startswith("-")]
    scripts = sorted(HERE.glob("bench_*.py"))
    if wanted:
        scripts = [s for s in scripts if s.stem.removeprefix("bench_") in wanted or s.stem in wanted]
    else:  # bench_train.py runs bench_lora.py for its LoRA rows: not twice
        scripts = [s for s in scripts if s.stem != "bench_lora"]
    failed = []
    for script in scripts:
        print(f"\n===== {script.name} =====", flush=True)
        args = [sys.executable, str(script)]
        if quick and "--quick" in script.read_text():
            args.append("--quick")
        start = time.perf_counter()
        code = subprocess.call(args, cwd=HERE)
        print(f"===== {script.name}: {'ok' if code == 0 else f'FAILED (exit {code})'} "
              f"in {time.perf_counter() - start:.0f} s =====", flush=True)
        if code != 0:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
