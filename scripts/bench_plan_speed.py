#!/usr/bin/env python
"""Speed of `llmc plan`: CLI cold start and parallelism search time, wall and CPU.

    python scripts/bench_plan_speed.py                  # both tables
    python scripts/bench_plan_speed.py --cold --repeat 7
    python scripts/bench_plan_speed.py --search --worlds 8 4096 997920
    python scripts/bench_plan_speed.py --calibrate --runs 16 64 256

Cold start: a fresh `python -c "from llmc.cli import main; main()" plan <spec>` process per run, the
best of --repeat runs, wall clock and CPU (user + system of the child); "bytecode" runs with a warm
``__pycache__`` (a normal install), "no bytecode" with PYTHONDONTWRITEBYTECODE and no cache (every
llmc module compiled from source, as in a read-only checkout).

Search: one fresh process per (model, world); the spec's hardware.count is overridden and, where
the spec's batch cannot be split over that many GPUs, its global batch is raised to the smallest
multiple of the batch the P005 hint names (``checks.min_batch_seqs``). Times are the first
compile in that process (no warm caches): the whole ``compile_spec`` and ``search.search`` alone.
Calibrate: ``llmc.compiler.calibration.calibrate`` (what `llmc calibrate` does after reading its inputs: the
fit, the nested leave-one-out band and each run's outlier scale) on N synthetic runs of four hidden sizes and
varied communication shares (a seeded sweep; the size term and both factors are fitted).
Nothing is asserted; the machine's load shows in wall time, CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLD_SPECS = ["examples/tiny_cpu.yaml", "examples/llama3_8b_h100x8.yaml", "examples/llama3_70b_h100x64.yaml"]
MODELS = {
    "llama3-8b": "examples/llama3_8b_h100x8.yaml",
    "llama3-70b": "examples/llama3_70b_h100x64.yaml",
    "llama3.1-405b": "examples/llama3_405b_h100x16384.yaml",
    "deepseek-v3": "examples/deepseek_v3.yaml",
}
WORLDS = [8, 64, 1024, 16384, 131072, 997920]


def _child_env(extra: dict | None = None) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.update(extra or {})
    return env


def _timed(cmd: list[str], env: dict) -> tuple[float, float, int, str]:
    """(wall s, CPU s of the child, exit code, stdout) of one process."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return wall, cpu, r.returncode, r.stdout


def cold_start(repeat: int) -> None:
    cli = [sys.executable, "-c", "from llmc.cli import main; main()", "plan"]
    print(f"cold start: `llmc plan <spec>` (text report), best of {repeat} fresh processes")
    print(f"{'spec':40s} {'bytecode wall':>14s} {'cpu':>8s} {'no bytecode wall':>17s} {'cpu':>8s}")
    baseline = min(_timed([sys.executable, "-c", "pass"], _child_env())[:2] for _ in range(repeat))
    with tempfile.TemporaryDirectory() as cache:
        warm = _child_env({"PYTHONPYCACHEPREFIX": cache})
        warm.pop("PYTHONDONTWRITEBYTECODE", None)
        cold = _child_env({"PYTHONDONTWRITEBYTECODE": "1"})
        cold.pop("PYTHONPYCACHEPREFIX", None)
        for spec in COLD_SPECS:
            _timed(cli + [spec], warm)  # fills the bytecode cache
            runs = {}
            for name, env in (("warm", warm), ("cold", cold)):
                best = None
                for _ in range(repeat):
                    wall, cpu, rc, _ = _timed(cli + [spec], env)
                    if rc != 0:
                        raise SystemExit(f"{spec}: exit {rc}")
                    best = (wall, cpu) if best is None else (min(best[0], wall), min(best[1], cpu))
                runs[name] = best
            print(f"{spec:40s} {runs['warm'][0]:13.3f}s {runs['warm'][1]:7.3f}s {runs['cold'][0]:16.3f}s "
                  f"{runs['cold'][1]:7.3f}s")
    print(f"{'(python -c pass)':40s} {baseline[0]:13.3f}s {baseline[1]:7.3f}s")


def _one(spec: str, world: int) -> dict:
    """In a fresh process: time compile_spec and search.search for ``spec`` at ``world`` GPUs."""
    sys.path.insert(0, str(ROOT))
    from llmc.compiler import search as search_mod
    from llmc.compiler.checks import min_batch_seqs
    from llmc.compiler.compile import compile_spec
    from llmc.compiler.hardware import get_gpu
    from llmc.compiler.search import describe
    from llmc.overrides import load_with_overrides, parse_override

    sets = [f"hardware.count={world}"]
    run, _, _ = load_with_overrides(Path(spec), [parse_override(s) for s in sets])
    seq_len = run.data.seq_len
    seqs = round(run.training.global_batch_tokens / seq_len)
    q = min_batch_seqs(run.model, world, get_gpu(run.hardware.gpu).gpus_per_node)
    if seqs % q:
        seqs = -(-max(seqs, q) // q) * q
        sets.append(f"training.global_batch_tokens={seqs * seq_len}")
    run, lines, _ = load_with_overrides(Path(spec), [parse_override(s) for s in sets])
    timed = {"wall": 0.0, "cpu": 0.0}
    inner = search_mod.search

    def search(*a, **k):
        w0, c0 = time.perf_counter(), time.process_time()
        try:
            return inner(*a, **k)
        finally:
            timed["wall"] += time.perf_counter() - w0
            timed["cpu"] += time.process_time() - c0

    search_mod.search = search
    w0, c0 = time.perf_counter(), time.process_time()
    c = compile_spec(run, spec, lines)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return {"seqs": seqs, "compile_wall": wall, "compile_cpu": cpu, "search_wall": timed["wall"],
            "search_cpu": timed["cpu"], "evaluations": c.search.get("memory_evaluations", 0),
            "plan": describe(c.plan) if c.plan else "no plan"}


def search_times(worlds: list[int], models: list[str]) -> None:
    print("search: first compile in a fresh process (seconds; CPU = process time)")
    print(f"{'model':14s} {'GPUs':>8s} {'batch seqs':>10s} {'search wall':>11s} {'cpu':>7s} {'compile cpu':>11s} "
          f"{'mem evals':>9s}  plan")
    for name in models:
        for w in worlds:
            cmd = [sys.executable, __file__, "--one", MODELS[name], str(w)]
            r = subprocess.run(cmd, cwd=ROOT, env=_child_env(), capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{name:14s} {w:8d} failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            d = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"{name:14s} {w:8d} {d['seqs']:10d} {d['search_wall']:10.3f}s {d['search_cpu']:6.3f}s "
                  f"{d['compile_cpu']:10.3f}s {d['evaluations']:9d}  {d['plan']}", flush=True)


def calibrate_times(sizes: list[int]) -> None:
    import random

    from llmc.compiler.calibration import TimePoint, calibrate

    print("calibrate: fit + leave-one-out band + outlier scales on N measured runs (seconds)")
    print(f"{'runs':>6s} {'wall':>8s} {'cpu':>8s}  factors")
    for n in sizes:
        rng = random.Random(n)
        pts = []
        for i in range(n):
            c, m, f = rng.uniform(1, 10), rng.uniform(0.1, 3), rng.uniform(0, 0.2)
            d = rng.choice([2048, 4096, 8192, 16384])
            t = (c / (1.2 * (d / 8192) ** 0.1) + 1.3 * m + f) * rng.uniform(0.95, 1.05)
            pts.append(TimePoint(f"run{i}", c, m, f, t, d))
        w0, c0 = time.perf_counter(), time.process_time()
        cal = calibrate("torchtitan", "h100-sxm", pts, [])
        print(f"{n:6d} {time.perf_counter() - w0:7.2f}s {time.process_time() - c0:7.2f}s  {cal.factors.describe()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cold", action="store_true", help="only the cold-start table")
    ap.add_argument("--search", action="store_true", help="only the search table")
    ap.add_argument("--calibrate", action="store_true", help="only the calibration table")
    ap.add_argument("--runs", type=int, nargs="*", default=[16, 32, 64, 128], help="calibration sizes")
    ap.add_argument("--repeat", type=int, default=5, help="cold-start runs per spec (the best is shown)")
    ap.add_argument("--worlds", type=int, nargs="*", default=WORLDS)
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--one", nargs=2, metavar=("SPEC", "WORLD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one[0], int(args.one[1]))))
        return
    if args.calibrate:
        calibrate_times(args.runs)
        return
    both = not (args.cold or args.search)
    if args.cold or both:
        cold_start(args.repeat)
    if args.search or both:
        if args.cold or both:
            print()
        search_times(args.worlds, args.models)


if __name__ == "__main__":
    main()
