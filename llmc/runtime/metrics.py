"""Training metrics: console lines + ``metrics.jsonl`` (one JSON object per logged step), MFU, peak memory.

Each record: step, loss, lr, grad_norm, tokens, tokens_per_s, flops_per_s, mfu (None when the device
peak is unknown, e.g. CPU), peak_mem_bytes (``torch.cuda.max_memory_allocated`` on CUDA, process
max RSS on CPU), peak_mem_device (``cuda`` / ``cpu``: which of the two it is; ``llmc calibrate`` fits memory
only on the first), step_s, elapsed_s. Strict JSON (RFC 8259 has no NaN / Infinity): a non-finite number (the loss
of a step that diverged) is written as ``null`` (:func:`json_line`), so ``jq`` and ``JSON.parse`` read every line. MFU = flops_per_token * tokens_per_s / peak_flops, where
flops_per_token is the compiler's number when the lock has it, else 6N (Kaplan et al. 2020) plus the
causal attention term 6*L*T*d_attn (PaLM appendix B, halved for causality).
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from pathlib import Path

import torch


def flops_per_token(arch, n_params_active: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N + 6*L*T*(H*hd) (fwd+bwd, causal attention; PaLM App. B / 2)."""
    if arch.mla is not None:
        d_attn = arch.n_heads * (arch.mla.qk_nope_head_dim + arch.mla.qk_rope_head_dim)
    else:
        d_attn = arch.n_heads * arch.hd
    return 6.0 * n_params_active + 6.0 * arch.n_layers * seq_len * d_attn


def step_record(*, step: int, loss: float, lr: float, grad_norm: float | None, tokens: int, tokens_per_step: int,
                dt: float, flops_per_token: float, peak_flops: float | None, world: int, device) -> dict:
    """One metrics.jsonl record (the fields listed in this module's docstring, less elapsed_s)."""
    tps = tokens_per_step / dt if dt > 0 else 0.0
    flops = flops_per_token * tps
    norm = {} if grad_norm is None else {"grad_norm": round(grad_norm, 6)}  # None: the backend had none
    return {"step": step, "loss": round(loss, 6), "lr": lr, **norm, "tokens": tokens, "tokens_per_s": round(tps, 1), "flops_per_s": flops,
            "mfu": (flops / (peak_flops * world)) if peak_flops else None,
            "peak_mem_bytes": peak_memory_bytes(device), "peak_mem_device": device.type, "step_s": round(dt, 4)}


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
    """Rank-0 logger; other ranks construct it with ``enabled=False``."""

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
