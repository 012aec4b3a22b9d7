#!/usr/bin/env python
"""Benchmark `llmc plan`: in-process compile time per example and CLI cold start.

    python scripts/bench_plan.py                # all default examples
    python scripts/bench_plan.py examples/deepseek_v3.yaml --repeat 3

Reports, per spec: load time, compile time (min / median over --repeat warm runs; the search is
most of it), memory evaluations, and the chosen plan; then the wall time of a fresh
`llmc plan <spec> --format json` process (imports included). Timings are wall clock on this
machine; nothing is asserted (tests stay timing-free).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = ["examples/llama3_405b_h100x16384.yaml", "examples/deepseek_v3.yaml", "examples/llama3_8b_h100x8.yaml",
           "examples/tiny_cpu.yaml"]


def bench_inprocess(path: str, repeat: int) -> None:
    from llmc.compiler.compile import compile_spec
    from llmc.compiler.search import describe
    from llmc.spec.load import load_spec

    t0 = time.perf_counter()
    run, lines = load_spec(path)
    t_load = time.perf_counter() - t0
    times = []
    c = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        c = compile_spec(run, path, lines)
        times.append(time.perf_counter() - t0)
    plan = describe(c.plan) if c.plan else "no plan"
    mfu = f"{100 * c.time.mfu:.1f}% MFU, {c.time.days:.1f} days" if c.time else ""
    print(f"{path}\n  load {t_load * 1e3:.0f} ms; compile min {min(times) * 1e3:.0f} ms, median "
          f"{statistics.median(times) * 1e3:.0f} ms over {repeat} warm runs (first {times[0] * 1e3:.0f} ms); "
          f"{c.search.get('memory_evaluations', 0)} memory evaluations\n  plan: {plan} ({mfu})")


def bench_cold(path: str) -> None:
    cmd = [sys.executable, "-c", "from llmc.cli import main; main()", "plan", path, "--format", "json"]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    print(f"  cold `llmc plan {path} --format json`: {dt:.2f} s (exit {r.returncode})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=DEFAULT)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    for path in args.specs:
        bench_inprocess(path, args.repeat)
        bench_cold(path)


if __name__ == "__main__":
    main()
