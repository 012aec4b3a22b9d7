"""Measure what each backend really does on one GPU: train llama3.2-1b a few dozen bf16 steps with native,
torchtitan and DeepSpeed (``llmc build`` + ``llmc launch --backend B``, offline data), and write step time,
tokens/s/GPU and peak memory (allocated and reserved) as a measurements YAML in the benchmarks schema
(benchmarks/README.md, "Schema": throughput rows) to ``--out``.

    python scripts/gpu_check.py --out DIR                 # on a GPU machine (see scripts/gpu_check.sh)
    python scripts/gpu_check.py --out DIR --cpu-smoke     # the same pipeline, tiny model, 2 steps, CPU

Throughput is measured between logged steps (the loss read-back at a log step synchronises with the GPU):
tokens between the first logged step after warm-up and the last one, over the wall time between them
(native / DeepSpeed ``metrics.jsonl``), or torchtitan's own per-interval ``tps`` (its console log).
Peak memory comes from every training process at exit (``torch.cuda.max_memory_allocated`` /
``max_memory_reserved``, through a ``sitecustomize`` hook put on PYTHONPATH); torchtitan resets the peak at
every log step, so its figure is the peak of the last log interval (steady state).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("native", "torchtitan", "deepspeed")
# opt-in runs of their own build: DeepSpeed with optimizer and parameter offload to CPU (ZeRO-Infinity), which
# checks llmc's offload time and memory terms (PCIe fetches, CPU Adam, no weights on the GPU); its first run
# JIT-builds DeepSpeed's cpu_adam (about a minute)
VARIANTS = {"deepspeed-offload": ("deepspeed", "parallelism: {offload_optimizer: true, offload_params: true}\n")}

HOOK = '''
import atexit, json, os

def _llmc_gpu_check_dump():
    out = os.environ.get("LLMC_GPU_CHECK_MEM")
    try:
        import resource, sys
        torch = sys.modules.get("torch")
        if not out or torch is None:
            return
        rec = {"pid": os.getpid(), "rank": os.environ.get("RANK"), "argv": sys.argv[:3],
               "rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "allocated": None, "reserved": None}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            dev = torch.cuda.current_device()
            rec.update(allocated=torch.cuda.max_memory_allocated(dev), reserved=torch.cuda.max_memory_reserved(dev))
        with open(os.path.join(out, f"mem-{os.getpid()}.json"), "w") as f:
            json.dump(rec, f)
    except Exception:
        pass

atexit.register(_llmc_gpu_check_dump)
'''


def gpu_name() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def gpu_key(name: str | None) -> str:
    n = (name or "").upper()
    if "H200" in n:
        return "h200"
    if "H100" in n:
        return "h100-pcie" if "PCIE" in n else "h100-sxm"
    if "B200" in n:
        return "b200"
    if "A100" in n:
        return "a100-80g" if "80" in n else "a100-40g"
    return "h100-sxm"


def spec_yaml(cpu: bool, steps: int, key: str, extra: str = "") -> str:
    """The run: llama3.2-1b, 8 x 2048 tokens per step, bf16 (tiny, 4 x 64, fp32 on CPU); offline corpus; ``extra``
    YAML appended (a variant's settings)."""
    model, seq, seqs, prec, log = ("tiny", 64, 4, "fp32", 1) if cpu else ("llama3.2-1b", 2048, 8, "bf16", 5)
    return f"""name: gpu-check
model: {model}
hardware:
  gpu: {"cpu" if cpu else key}
  count: 1
data:
  sources:
    - name: python-docs
      format: builtin
  tokenizer:
    train: true    # byte-level BPE on the corpus, up to the model's vocab_size
  seq_len: {seq}
  tokens: {steps * seq * seqs}
training:
  precision: {prec}
  steps: {steps}
  global_batch_tokens: {seq * seqs}
  log_every: {log}
  checkpoint:
    interval_steps: {steps * 10}
{extra}"""


def run(cmd: list[str], env: dict, log: Path, timeout: float) -> tuple[int, float]:
    t0 = time.time()
    with open(log, "ab") as f:
        f.write(("\n$ " + " ".join(cmd) + "\n").encode())
        f.flush()
        try:
            p = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, cwd=str(ROOT))
            rc = p.returncode
        except subprocess.TimeoutExpired:
            rc = 124
    return rc, time.time() - t0


def _metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [r for r in (json.loads(x) for x in path.read_text().splitlines() if x.strip())
            if "loss" in r and "event" not in r]


def throughput_from_metrics(recs: list[dict], warmup: int) -> tuple[float | None, float | None]:
    """(tokens/s, s/step) between the first logged step after ``warmup`` and the last logged step."""
    recs = sorted(recs, key=lambda r: r["step"])
    after = [r for r in recs if r["step"] > warmup] or recs
    if len(after) >= 2:
        a, b = after[0], after[-1]
        dt_ = b["elapsed_s"] - a["elapsed_s"]
        if dt_ > 0 and b["step"] > a["step"]:
            return (b["tokens"] - a["tokens"]) / dt_, dt_ / (b["step"] - a["step"])
    if recs:
        r = recs[-1]
        return r.get("tokens_per_s"), r.get("step_s")
    return None, None


def throughput_from_titan(log_text: str, warmup: int) -> tuple[float | None, int]:
    """Median of torchtitan's per-interval tps after ``warmup`` steps; number of training lines. The log is read
    by ``llmc.measurements.parse_torchtitan_log`` (what ``llmc calibrate`` reads: colours stripped, validation lines
    not training steps)."""
    from llmc.measurements import parse_torchtitan_log

    rows = [(s.step, s.tps) for s in parse_torchtitan_log(log_text) if s.tps is not None]
    tps = [t for s, t in rows if s > warmup] or [t for _, t in rows]
    return (statistics.median(tps) if tps else None), len(rows)


def peak_memory(mem_dir: Path) -> tuple[int | None, int | None, int | None]:
    """(allocated, reserved, host RSS) peaks over the processes that imported torch."""
    recs = [json.loads(p.read_text()) for p in mem_dir.glob("mem-*.json")]

    def peak(k):
        vals = [r[k] for r in recs if r.get(k) is not None]
        return max(vals) if vals else None

    return peak("allocated"), peak("reserved"), peak("rss")


def _env(work: Path, mem: Path | None, cpu: bool) -> dict:
    hook = work / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    if mem is not None:
        env["LLMC_GPU_CHECK_MEM"] = str(mem)
    if cpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    return env


def build_once(spec: Path, work: Path, *, cpu: bool, name: str = "build") -> tuple[Path | None, str]:
    """``llmc build`` + ``python -m llmc.runtime.entry prepare`` (tokenizer, data, token cache) once for all
    backends (and once per variant); returns (build dir or None, log path)."""
    build = work / name
    shutil.rmtree(build, ignore_errors=True)
    log = work / f"{name}.log"
    log.write_text("")
    env = _env(work, None, cpu)
    py = sys.executable
    rc, _ = run([py, "-m", "llmc.cli", "build", str(spec), "-o", str(build)], env, log, 300)
    if rc == 0:
        rc, _ = run([py, "-m", "llmc.runtime.entry", "prepare", "--lock", str(build / "plan.lock.json")], env, log, 600)
    return (build if rc == 0 else None), str(log)


def check_backend(backend: str, build: Path, work: Path, *, cpu: bool, timeout: float, warmup: int,
                  label: str | None = None) -> dict:
    """Launch one backend on the shared build (its previous run outputs removed first) and measure it; ``label``
    names a variant's logs and memory records (default: the backend)."""
    label = label or backend
    mem = work / f"mem-{label}"
    for d in (mem, build / "run", build / "outputs"):  # keep assets/, data/, cache/ (prepared once)
        shutil.rmtree(d, ignore_errors=True)
    mem.mkdir(parents=True)
    env = _env(work, mem, cpu)
    log = work / f"{label}.log"
    log.write_text("")
    py = sys.executable
    row: dict = {"backend": backend}
    lock = json.loads((build / "plan.lock.json").read_text())
    plan = lock.get("plan") or {}
    hyper = lock.get("hyper") or {}
    rc, wall = run([py, "-m", "llmc.cli", "launch", str(build), "--backend", backend], env, log, timeout)
    row.update(wall_s=round(wall, 1))
    if rc != 0:
        row["error"] = f"llmc launch exited {rc}" + (" (timeout)" if rc == 124 else "") + f" (see {log})"
    seq = int(hyper.get("seq_len", 0))
    gbs = int(hyper.get("global_batch_seqs", 0))
    if backend == "torchtitan":
        tps, n = throughput_from_titan(log.read_text(errors="replace"), warmup)
        step_s = gbs * seq / tps if tps else None
    else:
        tps, step_s = throughput_from_metrics(_metrics(build / "run" / "pretrain" / "metrics.jsonl"), warmup)
    alloc, reserved, rss = peak_memory(mem)
    flops_tok = (lock.get("compute") or {}).get("flops_per_token")
    peak = (lock.get("hardware") or {}).get("bf16_tflops")
    tflops = flops_tok * tps / 1e12 if flops_tok and tps else None
    row.update({
        "model": lock["spec"]["resolved"]["model"].get("name"), "gpus": 1,
        "dp_replicate": plan.get("dp_replicate", 1), "dp_shard": plan.get("dp_shard", 1), "tp": plan.get("tp", 1),
        "pp": plan.get("pp", 1), "cp": plan.get("cp", 1), "ep": plan.get("ep", 1),
        "local_batch": gbs, "micro_batch": plan.get("micro_batch"), "global_batch": gbs, "seq_len": seq,
        "ac": plan.get("activation_checkpointing", "none"),
        **({"ac_layers": plan.get("ac_layers")} if plan.get("activation_checkpointing") == "partial" else {}),
        "compile": False,
        "precision": lock["spec"]["resolved"]["training"]["precision"], "steps": int(hyper.get("steps", 0)),
        "tokens_per_s_per_gpu": round(tps, 1) if tps else None, "step_s": round(step_s, 4) if step_s else None,
        "tflops_per_gpu": round(tflops, 1) if tflops else None,
        "mfu": round(tflops / peak, 4) if tflops and peak and not cpu else None,
        "mem_gib": round((reserved or rss or 0) / 2**30, 2) or None,
        "mem_kind": "max_reserved" if reserved else ("max_rss" if rss else None),
        "mem_allocated_gib": round(alloc / 2**30, 2) if alloc else None,
        "mem_reserved_gib": round(reserved / 2**30, 2) if reserved else None,
        "host_rss_gib": round(rss / 2**30, 2) if rss else None,
    })
    par = lock["spec"]["resolved"].get("parallelism") or {}
    for k in ("offload_optimizer", "offload_params"):  # the measurements schema reads them (llmc calibrate)
        if par.get(k):
            row[k] = True
    if par.get("offload_optimizer"):
        row["zero_stage"] = plan.get("zero_stage")
    if tps is None and "error" not in row:
        row["error"] = f"no throughput found (see {log})"
    return row


def to_yaml(doc: dict) -> str:
    import yaml

    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model, 2 steps, on CPU (checks the pipeline)")
    ap.add_argument("--backends", default=",".join(BACKENDS),
                    help=f"comma-separated: {', '.join(BACKENDS)}, and opt-in {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps (default 30; 2 with --cpu-smoke)")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per backend launch (default 150)")
    ap.add_argument("--work", type=Path, default=None, help="scratch dir (default OUT/work; removed unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the builds (checkpoints are several GB on GPU)")
    a = ap.parse_args(argv)
    cpu = a.cpu_smoke
    steps = a.steps or (2 if cpu else 30)
    warmup = 0 if cpu else 10
    out = a.out.resolve()
    work = (a.work or out / "work").resolve()
    work.mkdir(parents=True, exist_ok=True)
    name = None if cpu else gpu_name()
    if not cpu and name is None:
        print("gpu_check: no NVIDIA GPU found (nvidia-smi); use --cpu-smoke to check the pipeline on CPU",
              file=sys.stderr)
        return 1
    key = gpu_key(name)
    spec = work / "spec.yaml"
    spec.write_text(spec_yaml(cpu, steps, key))
    rows = []
    backends = [x.strip() for x in a.backends.split(",") if x.strip()]
    bad = [b for b in backends if b not in BACKENDS and b not in VARIANTS]
    if bad:
        print(f"gpu_check: unknown backend {bad[0]!r} (one of {', '.join(BACKENDS + tuple(VARIANTS))})",
              file=sys.stderr)
        return 1
    t0 = time.time()
    build, build_log = build_once(spec, work, cpu=cpu)
    print(f"build+prepare {time.time() - t0:6.1f}s" + ("" if build else f"  ERROR see {build_log}"), flush=True)
    if build is None:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(build_log, out / "gpu_check.build.log")
        return 2
    for b in backends:
        t0 = time.time()
        where, backend = build, b
        if b in VARIANTS:  # its own spec and build (the data preparation is repeated: a minute at most)
            backend, extra = VARIANTS[b]
            vspec = work / f"spec-{b}.yaml"
            vspec.write_text(spec_yaml(cpu, steps, key, extra))
            where, vlog = build_once(vspec, work, cpu=cpu, name=f"build-{b}")
            if where is None:
                rows.append({"id": f"gpu-check-{'cpu' if cpu else key}-{b}", "backend": backend,
                             "error": f"build failed (see {vlog})"})
                continue
        row = check_backend(backend, where, work, cpu=cpu, timeout=a.timeout, warmup=warmup, label=b)
        row = {"id": f"gpu-check-{'cpu' if cpu else key}-{b}", **row}
        rows.append(row)
        print(f"{b:11s} {time.time() - t0:6.1f}s  tok/s/gpu {row.get('tokens_per_s_per_gpu')}  "
              f"step {row.get('step_s')} s  alloc {row.get('mem_allocated_gib')} GiB  "
              f"reserved {row.get('mem_reserved_gib')} GiB  rss {row.get('host_rss_gib')} GiB" + (f"  ERROR {row['error']}" if "error" in row else ""),
              flush=True)
        if not a.keep:  # checkpoints of a 1B model are several GB
            for d in ("run", "outputs"):
                shutil.rmtree(where / d, ignore_errors=True)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {"source": {"url": None, "commit": commit or None, "date": dt.date.today().isoformat(), "license": None},
           "use": "check", "kind": "throughput", "system": name or "cpu", "gpu_key": None if cpu else key,
           "gpu_key_exact": not cpu, "gpus_per_node": 1,
           "note": "measured by scripts/gpu_check.py (llmc build + llmc launch per backend, one GPU)",
           "rows": rows}
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.yaml").write_text(to_yaml(doc))
    for b in ("build", *BACKENDS, *VARIANTS):
        if (work / f"{b}.log").exists():
            shutil.copyfile(work / f"{b}.log", out / f"gpu_check.{b}.log")
    if not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out / 'gpu_check.yaml'}")
    return 0 if all("error" not in r for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
