"""Training metrics: console lines + ``metrics.jsonl`` (one JSON object per logged step), MFU, peak memory.

Each record: step, loss, lr, grad_norm, tokens, tokens_per_s, flops_per_s, mfu, peak_mem_bytes
(``torch.cuda.max_memory_allocated`` on CUDA, process max RSS on CPU), peak_mem_device (``cuda`` / ``cpu``: which of
the two it is; ``llmc calibrate`` fits memory only on the first), step_s, elapsed_s; on a run whose objective has
them, aux_loss (the MoE load-balancing term, summed over the layers) and z_loss (the z-loss term). ``loss`` is the
mean next-token cross-entropy (the quantity ``val_loss`` and torchtitan's job log), not the objective the optimizer
follows (that is loss + aux_loss + z_loss). ``step_s`` is the mean training time of the steps since the previous
logged record (:class:`IntervalTimer`: each step's forward, backward and optimizer step, data loading included;
validation and checkpoint saves excluded), ``tokens_per_s`` the tokens of one step over it. ``elapsed_s``: seconds
since the run's ``start`` event (0 there). Strict JSON (RFC 8259 has no NaN / Infinity): a non-finite number (the
loss of a step that diverged) is written as ``null`` (:func:`json_line`), so ``jq`` and ``JSON.parse`` read every
line. MFU = flops_per_token * tokens_per_s / (peak_flops * world), against the lock's peak (the hardware table's;
on a CPU the table's stand-in peak, so CPU runs log one too), with flops_per_token the compiler's number from the
lock (``compute.flops_per_token``); a lock without it (or without a peak) logs flops_per_s and mfu as None: the
runtime has no second FLOPs formula.
"""
from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch


def step_record(*, step: int, loss: float, lr: float, grad_norm: float | None, tokens: int, tokens_per_step: int,
                dt: float, flops_per_token: float | None, peak_flops: float | None, world: int, device,
                terms: dict[str, float] | None = None) -> dict:
    """One metrics.jsonl record (the fields listed in this module's docstring, less elapsed_s). ``loss``: the
    cross-entropy; ``terms``: the objective's other terms (``aux_loss``, ``z_loss``), logged under their own keys;
    ``dt``: the mean step time of the interval (:meth:`IntervalTimer.take`); ``flops_per_token``: the lock's (None:
    no FLOP/s, no MFU)."""
    tps = tokens_per_step / dt if dt > 0 else 0.0
    flops = flops_per_token * tps if flops_per_token else None
    norm = {} if grad_norm is None else {"grad_norm": round(grad_norm, 6)}  # None: the backend had none
    extra = {k: round(v, 6) for k, v in (terms or {}).items()}
    return {"step": step, "loss": round(loss, 6), **extra, "lr": lr, **norm, "tokens": tokens,
            "tokens_per_s": round(tps, 1), "flops_per_s": flops,
            "mfu": (flops / (peak_flops * world)) if (peak_flops and flops is not None) else None,
            "peak_mem_bytes": peak_memory_bytes(device), "peak_mem_device": device.type, "step_s": round(dt, 4)}


class IntervalTimer:
    """The training time of the steps since the previous logged record: :meth:`start` and :meth:`stop` around each
    step (its data loading, forward, backward and optimizer step; a trainer calls neither around validation and
    checkpoint saves), :meth:`take` their mean at a logged step, which starts the next interval. The one definition of
    ``step_s`` (and so of ``tokens_per_s``) on llmc's trainers: the time the plan's step time predicts, averaged over
    every step of the interval rather than read off the one step that is logged."""

    clock = staticmethod(time.perf_counter)

    def __init__(self) -> None:
        self.seconds, self.steps, self._t0 = 0.0, 0, None

    def start(self) -> None:
        self._t0 = self.clock()

    def stop(self) -> None:
        """The step begun at :meth:`start` is done: its seconds join the interval."""
        if self._t0 is not None:
            self.seconds += self.clock() - self._t0
            self.steps += 1
            self._t0 = None

    def take(self) -> float:
        """Mean seconds per step since the last take (0.0 when no step was timed); resets."""
        mean = self.seconds / self.steps if self.steps else 0.0
        self.seconds, self.steps = 0.0, 0
        return mean

    def reset(self) -> None:
        """Drop the steps timed since the last take (a loss-spike rewind discards them)."""
        self.seconds, self.steps = 0.0, 0


def active_params(model: torch.nn.Module) -> int:
    """Parameters touched per token: all, minus the routed experts not chosen (E - k of E)."""
    arch = model.arch
    total = sum(p.numel() for p in model.parameters())
    if arch.moe is None:
        return total
    E, k = arch.moe.num_experts, arch.moe.top_k
    routed = sum(p.numel() for n, p in model.named_parameters() if ".moe.experts." in n)
    return total - routed + routed * k // E


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss_kb * (1 if sys.platform == "darwin" else 1024))


def strict(value):
    """``value`` with every non-finite float (NaN, +-Infinity) replaced by None, in nested dicts / lists / tuples too:
    what ``json.dumps(..., allow_nan=False)`` accepts (RFC 8259 has no NaN; Python's json writes the bare token
    ``NaN``, which JSON.parse and jq refuse)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict(v) for v in value]
    return value


def json_line(rec: dict) -> str:
    """One metrics.jsonl line: ``rec`` as strict JSON (non-finite numbers as null, :func:`strict`), no newline."""
    return json.dumps(strict(rec), allow_nan=False)


def _drop_partial_line(path: Path) -> None:
    """Truncate a trailing line without a newline (SIGKILL during a write), keeping every full record."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)


class MetricsLogger:
    """Rank-0 logger; other ranks construct it with ``enabled=False``. ``elapsed_s`` counts from the ``start`` event
    (which every trainer logs once it is about to train: its clock restarts there), before it from construction."""

    def __init__(self, path: str | Path | None, enabled: bool = True, echo: bool = True):
        self.enabled, self.echo = enabled, echo
        self.path = Path(path) if path else None
        self.t0 = time.time()
        if self.enabled and self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _drop_partial_line(self.path)  # a killed run may have left half a record

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        if rec.get("event") == "start":  # one origin on every trainer: the run's start event is elapsed_s 0
            self.t0 = time.time()
        rec = {"elapsed_s": round(time.time() - self.t0, 3), **rec}
        if self.path:
            with open(self.path, "a") as f:
                f.write(json_line(rec) + "\n")
        if self.echo and isinstance(rec.get("loss"), float | int) and "event" not in rec:
            mfu = f" mfu {rec['mfu'] * 100:.1f}%" if rec.get("mfu") is not None else ""
            print(f"step {rec['step']:>6}  loss {rec['loss']:.4f}  lr {rec['lr']:.3e}  "
                  f"gnorm {rec.get('grad_norm', float('nan')):.3f}  tok/s {rec.get('tokens_per_s', 0):,.0f}"
                  f"{mfu}  mem {rec.get('peak_mem_bytes', 0) / 2**20:,.0f} MiB", flush=True)
        elif self.echo:
            print(json_line(rec), flush=True)

    def event(self, event_name: str, /, **kw) -> None:
        """Log an event record. ``"resume"`` with ``step=N`` first drops the records the interrupted run
        logged after step N (they are recomputed), so every step appears once in metrics.jsonl."""
        if event_name == "resume" and self.enabled and self.path and isinstance(kw.get("step"), int):
            from llmc.runtime.metrics_io import truncate_after_step

            truncate_after_step(self.path, kw["step"])
        self.log({"event": event_name, **kw})
