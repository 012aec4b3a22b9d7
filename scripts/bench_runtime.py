"""Measure the native runtime's peak memory and step time for a few small configs and compare them with
the compiler's predictions (``llmc.compiler.memory.memory_per_gpu``, ``llmc.compiler.timing.step_time``)
for the same plan, so the memory and time models can be calibrated.

    .venv/bin/python scripts/bench_runtime.py [--steps 4] [--write docs/bench/runtime-cpu.md]

Each config runs in a fresh subprocess (so max-RSS is its own). Measured memory:
CUDA ``max_memory_allocated``; CPU = max RSS during training minus the RSS before the model was
built (torch's own ~0.3-0.5 GB of libraries is not training state). Step time = median over the
steps after the first (warm-up). Inputs are random tokens (the data pipeline is not timed).
Predictions use precision fp32 (4 B weights, 4 B grads, 8 B AdamW m+v: no fp32 master copy) on the
device the lock would name (``cpu`` pseudo-device here, ``h100-sxm`` on CUDA).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = [
    {"name": "tiny s128 mb8", "preset": "tiny", "seq_len": 128, "micro_batch": 8, "ac": "none"},
    {"name": "tiny s128 mb32", "preset": "tiny", "seq_len": 128, "micro_batch": 32, "ac": "none"},
    {"name": "tiny s128 mb32 full-AC", "preset": "tiny", "seq_len": 128, "micro_batch": 32, "ac": "full"},
    {"name": "tiny s256 mb16", "preset": "tiny", "seq_len": 256, "micro_batch": 16, "ac": "none"},
    {"name": "tiny-moe s128 mb16", "preset": "tiny-moe", "seq_len": 128, "micro_batch": 16, "ac": "none"},
]


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(cfg: dict, steps: int) -> dict:
    import resource

    import torch

    from llmc.runtime.job import TrainJob
    from llmc.runtime.metrics import peak_memory_bytes
    from llmc.runtime.model import build_model, lm_loss
    from llmc.runtime.train import build_optimizer
    from llmc.spec.presets import PRESETS

    arch = PRESETS[cfg["preset"]]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    base = _rss_bytes()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    model = build_model(arch, dev, seed=0)
    model.set_ac(cfg["ac"])
    job = TrainJob(arch=arch, sources=[], seq_len=cfg["seq_len"], steps=steps)
    opt = build_optimizer(model, job, dev)
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(steps):
        x = torch.randint(0, arch.vocab_size, (cfg["micro_batch"], cfg["seq_len"] + 1), generator=g).to(dev)
        t0 = time.perf_counter()
        logits, aux = model(x[:, :-1], return_aux=True)
        loss = lm_loss(logits, x[:, 1:]) + aux
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        del logits, loss
    if dev.type == "cuda":
        peak = peak_memory_bytes(dev) - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"peak_bytes": int(peak), "step_s": statistics.median(times[1:] or times),
            "params": model.num_params(), "device": dev.type, "threads": torch.get_num_threads()}


def predict(cfg: dict, device: str) -> dict:
    try:
        from llmc.compiler.hardware import get_gpu
        from llmc.compiler.memory import memory_per_gpu
        from llmc.compiler.plan import ParallelPlan
        from llmc.compiler.timing import step_model, step_time
        from llmc.spec.presets import PRESETS
    except ImportError as e:  # compiler pieces not there yet
        return {"error": str(e)}
    arch = PRESETS[cfg["preset"]]
    gpu = get_gpu("cpu" if device == "cpu" else "h100-sxm")
    plan = ParallelPlan(micro_batch=cfg["micro_batch"], activation_checkpointing=cfg["ac"], zero_stage=0)
    out: dict = {}
    try:
        mem = memory_per_gpu(arch, plan, cfg["seq_len"], "fp32", gpu.hbm_bytes, optimizer_bytes_per_param=8,
                             grad_bytes_per_param=4)
        out["peak_bytes"] = mem.per_gpu_bytes
        out["mem_breakdown"] = {k: int(v) for k, v in mem.breakdown.items()}
    except Exception as e:  # noqa: BLE001 - report, keep benchmarking
        out["mem_error"] = f"{type(e).__name__}: {e}"
    try:
        sec, mfu, _ = step_time(step_model(arch, cfg["seq_len"], "fp32", gpu), plan)
        out["step_s"] = sec
    except Exception as e:  # noqa: BLE001
        out["time_error"] = f"{type(e).__name__}: {e}"
    return out


def _no_buffers(pr: dict) -> float:
    """Predicted weights + grads + optimizer + activations (the fixed 'buffers' term models CUDA context
    and workspaces, which a CPU process does not have)."""
    return float(sum(v for k, v in pr.get("mem_breakdown", {}).items() if k != "buffers"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--only", default=None, help="substring of a config name")
    ap.add_argument("--write", type=Path, default=None, help="also write a markdown table here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(measure(json.loads(a.one), a.steps)))
        return 0
    rows = []
    for cfg in CONFIGS:
        if a.only and a.only not in cfg["name"]:
            continue
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(cfg), "--steps", str(a.steps)],
                           capture_output=True, text=True)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{cfg['name']}: failed\n{p.stderr[-2000:]}")
            continue
        m = json.loads(line[7:])
        pr = predict(cfg, m["device"])
        rows.append((cfg, m, pr))
        mem_r = pr.get("peak_bytes", 0) / m["peak_bytes"] if m["peak_bytes"] > 0 and pr.get("peak_bytes") else None
        t_r = pr.get("step_s", 0) / m["step_s"] if pr.get("step_s") else None
        nb = _no_buffers(pr)
        print(f"{cfg['name']:<24} params {m['params']:>9,}  mem measured {m['peak_bytes'] / 2**20:8.1f} MiB  "
              f"predicted {pr.get('peak_bytes', 0) / 2**20:8.1f} MiB (w/o buffers {nb / 2**20:6.1f})  "
              f"ratio {mem_r or float('nan'):.2f}  |  "
              f"step measured {m['step_s']:.3f} s  predicted {pr.get('step_s', float('nan')):.3f} s  "
              f"ratio {t_r or float('nan'):.2f}", flush=True)
        for k in ("mem_error", "time_error", "error"):
            if k in pr:
                print(f"    {k}: {pr[k]}")
    if a.write and rows:
        a.write.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# Native runtime: measured vs predicted (CPU)", "",
                 f"`{' '.join(['python', 'scripts/bench_runtime.py'] + sys.argv[1:])}` on "
                 f"{rows[0][1]['device']} ({rows[0][1]['threads']} torch threads), {time.strftime('%Y-%m-%d')}. "
                 "fp32, AdamW, random tokens; memory = max RSS minus RSS before the model was built; "
                 "step = median after warm-up. Ratio = predicted / measured. The machine is shared, "
                 "so step times are noisy upper bounds.", "",
                 "| config | params | measured MiB | predicted MiB | predicted w/o buffers | mem ratio | measured s/step | predicted s/step | time ratio |",
                 "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for cfg, m, pr in rows:
            pm, ps = pr.get("peak_bytes"), pr.get("step_s")
            lines.append(f"| {cfg['name']} | {m['params']:,} | {m['peak_bytes'] / 2**20:.1f} | "
                         f"{pm / 2**20 if pm else float('nan'):.1f} | {_no_buffers(pr) / 2**20:.1f} | "
                         f"{pm / m['peak_bytes'] if pm else float('nan'):.2f} | "
                         f"{m['step_s']:.3f} | {ps if ps else float('nan'):.3f} | "
                         f"{ps / m['step_s'] if ps else float('nan'):.2f} |")
        a.write.write_text("\n".join(lines) + "\n")
        print(f"wrote {a.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
