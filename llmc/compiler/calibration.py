"""Calibration: a small set of named factors fitted by least squares to measured runs, and applied.

Pure functions (no files, no torch). The factors, per (backend, GPU):

* ``compute_scale`` -- multiplies the achieved compute efficiency (the predicted compute and
  memory-bound elementwise time is divided by it);
* ``comm_scale`` -- multiplies every exposed communication time (TP, EP, CP, PP, FSDP/ZeRO, DP);
* ``mem_scale`` -- multiplies the predicted allocator-reserved bytes;
* ``mem_overhead_bytes`` -- added to the reserved bytes.

Time model for the fit: a measured step T_i is explained as ``a * C_i + b * M_i + F_i`` where C_i is
llmc's compute part (compute, elementwise, recompute and the compute share of the pipeline bubble),
M_i its communication part (the rest of the bubble and every ``*_comm`` / ``pp_p2p`` term) and F_i the
optimizer update (HBM-bound, not scaled); a = 1 / compute_scale, b = comm_scale. The fit minimises the
squared *relative* error sum(((a C_i + b M_i + F_i) / T_i - 1)^2), so every run weighs the same
whatever its size (the normal equations of a 2-parameter linear least-squares problem; Bjorck,
"Numerical Methods for Least Squares Problems", 1996, ch. 1). Both factors are fitted only when there
are at least :data:`MIN_POINTS_TWO_FACTORS` runs and their communication shares differ; otherwise only
compute_scale is fitted (comm_scale = 1). Memory likewise: measured reserved ~ s R_i + o.

The expected error band is the leave-one-out error (each run predicted by factors fitted on the
others), the standard estimate of out-of-sample error for a small sample (Hastie, Tibshirani, Friedman,
"The Elements of Statistical Learning", 2nd ed., sec. 7.10).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

MIN_POINTS_TWO_FACTORS = 4  # below this only one factor per quantity is fitted
# Uncalibrated, two layouts whose predicted step times differ by less than this are treated as equal and the
# simpler one is chosen: the spread of llmc's errors *within* one published sweep (same model and cluster,
# one knob varied), which is what a layout comparison is exposed to -- benchmarks/RESULTS.md, "within-sweep
# error spread". A calibration replaces it with its own leave-one-out band.
RANKING_BAND_UNCALIBRATED = 0.06  # 6.0 % in benchmarks/RESULTS.md (2026-12), rounded
FACTOR_BOUNDS = {"compute_scale": (0.2, 5.0), "comm_scale": (0.05, 20.0), "mem_scale": (0.5, 2.0)}
COMM_KEYS = ("tp_comm", "ep_comm", "cp_comm", "pp_p2p", "fsdp_comm", "dp_comm")
COMPUTE_KEYS = ("compute", "elementwise", "recompute")
FIXED_KEYS = ("optimizer",)


@dataclass(frozen=True)
class Factors:
    """The named calibration factors (1, 1, 1, 0 = uncalibrated)."""

    compute_scale: float = 1.0
    comm_scale: float = 1.0
    mem_scale: float = 1.0
    mem_overhead_bytes: float = 0.0

    def describe(self) -> str:
        return (f"compute_scale={self.compute_scale:.3f} comm_scale={self.comm_scale:.3f} "
                f"mem_scale={self.mem_scale:.3f} mem_overhead={self.mem_overhead_bytes / 2**30:+.2f} GiB")


IDENTITY = Factors()


@dataclass(frozen=True)
class TimePoint:
    """One measured run for the time fit: llmc's (uncalibrated) split of the step and the measurement."""

    label: str
    compute_s: float
    comm_s: float
    fixed_s: float
    measured_s: float


@dataclass(frozen=True)
class MemPoint:
    """One measured run for the memory fit: llmc's uncalibrated reserved bytes and the measurement."""

    label: str
    predicted_bytes: float
    measured_bytes: float


def split_breakdown(breakdown: dict[str, float]) -> tuple[float, float, float]:
    """(compute, communication, fixed) seconds of a ``TimeNumbers.breakdown``; the pipeline bubble is
    shared between compute and communication in proportion to the micro-batch's own split."""
    c = sum(breakdown.get(k, 0.0) for k in COMPUTE_KEYS)
    m = sum(breakdown.get(k, 0.0) for k in COMM_KEYS)
    # the bubble is (p-1)/v x t_micro; t_micro excludes the per-step dp_comm
    micro_m = m - breakdown.get("dp_comm", 0.0)
    bubble = breakdown.get("pp_bubble", 0.0)
    share = c / (c + micro_m) if c + micro_m > 0 else 1.0
    f = sum(breakdown.get(k, 0.0) for k in FIXED_KEYS)
    return c + bubble * share, m + bubble * (1.0 - share), f


def _solve2(rows: list[tuple[float, float, float]]) -> tuple[float, float] | None:
    """Least squares of y ~ a x1 + b x2 over rows (x1, x2, y); None when singular."""
    s11 = sum(x1 * x1 for x1, _, _ in rows)
    s12 = sum(x1 * x2 for x1, x2, _ in rows)
    s22 = sum(x2 * x2 for _, x2, _ in rows)
    t1 = sum(x1 * y for x1, _, y in rows)
    t2 = sum(x2 * y for _, x2, y in rows)
    det = s11 * s22 - s12 * s12
    if abs(det) <= 1e-12 * max(s11 * s22, 1e-300):
        return None
    return (t1 * s22 - t2 * s12) / det, (s11 * t2 - s12 * t1) / det


def _solve1(rows: list[tuple[float, float]]) -> float | None:
    """Least squares of y ~ a x over rows (x, y)."""
    sxx = sum(x * x for x, _ in rows)
    return None if sxx <= 0 else sum(x * y for x, y in rows) / sxx


def _in(name: str, v: float) -> bool:
    lo, hi = FACTOR_BOUNDS[name]
    return lo <= v <= hi


def fit_time(points: list[TimePoint]) -> tuple[float, float]:
    """(compute_scale, comm_scale) minimising the squared relative step-time error."""
    pts = [p for p in points if p.measured_s > 0 and p.compute_s > 0]
    if not pts:
        return 1.0, 1.0
    shares = [p.comm_s / (p.compute_s + p.comm_s) for p in pts]
    if len(pts) >= MIN_POINTS_TWO_FACTORS and max(shares) - min(shares) > 0.02:
        # relative residual: (a C + b M + F)/T - 1 -> y = 1 - F/T, x1 = C/T, x2 = M/T
        sol = _solve2([(p.compute_s / p.measured_s, p.comm_s / p.measured_s, 1.0 - p.fixed_s / p.measured_s)
                       for p in pts])
        if sol is not None and sol[0] > 0 and _in("compute_scale", 1.0 / sol[0]) and _in("comm_scale", sol[1]):
            return 1.0 / sol[0], sol[1]
    a = _solve1([(p.compute_s / p.measured_s, 1.0 - (p.comm_s + p.fixed_s) / p.measured_s) for p in pts])
    if a is None or a <= 0:
        return 1.0, 1.0
    lo, hi = FACTOR_BOUNDS["compute_scale"]
    return min(max(1.0 / a, lo), hi), 1.0


def fit_memory(points: list[MemPoint]) -> tuple[float, float]:
    """(mem_scale, mem_overhead_bytes) minimising the squared relative memory error."""
    pts = [p for p in points if p.measured_bytes > 0 and p.predicted_bytes > 0]
    if not pts:
        return 1.0, 0.0
    rel = [p.predicted_bytes / p.measured_bytes for p in pts]
    if len(pts) >= MIN_POINTS_TWO_FACTORS and max(rel) - min(rel) > 0.02:
        sol = _solve2([(p.predicted_bytes / p.measured_bytes, 1.0 / p.measured_bytes, 1.0) for p in pts])
        if sol is not None and _in("mem_scale", sol[0]):
            return sol[0], sol[1]
    s = _solve1([(r, 1.0) for r in rel])
    lo, hi = FACTOR_BOUNDS["mem_scale"]
    return (1.0 if s is None else min(max(s, lo), hi)), 0.0


def fit(time_points: list[TimePoint], mem_points: list[MemPoint]) -> Factors:
    """All four factors from the measured runs (see the module docstring)."""
    cs, ms = fit_time(time_points)
    mscale, mo = fit_memory(mem_points)
    return Factors(compute_scale=cs, comm_scale=ms, mem_scale=mscale, mem_overhead_bytes=mo)


def predict_step(p: TimePoint, f: Factors) -> float:
    """The step time of ``p`` under factors ``f`` (linear model of the fit)."""
    return p.compute_s / f.compute_scale + p.comm_s * f.comm_scale + p.fixed_s


def predict_memory(p: MemPoint, f: Factors) -> float:
    return p.predicted_bytes * f.mem_scale + f.mem_overhead_bytes


def _pct(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def loo_time_errors(points: list[TimePoint]) -> list[float]:
    """% error in throughput (measured/predicted step - 1, i.e. tokens/s) of each run with factors fitted
    on the other runs."""
    out = []
    for i, p in enumerate(points):
        cs, ms = fit_time(points[:i] + points[i + 1:])
        step = predict_step(p, Factors(compute_scale=cs, comm_scale=ms))
        out.append(_pct(p.measured_s / step, 1.0))  # tokens/s error = T_meas / T_pred - 1
    return out


def loo_memory_errors(points: list[MemPoint]) -> list[float]:
    out = []
    for i, p in enumerate(points):
        s, o = fit_memory(points[:i] + points[i + 1:])
        out.append(_pct(predict_memory(p, Factors(mem_scale=s, mem_overhead_bytes=o)), p.measured_bytes))
    return out


def _band(errs: list[float]) -> dict | None:
    if not errs:
        return None
    a = [abs(e) for e in errs]
    return {"n": len(a), "mean_abs_pct": sum(a) / len(a), "max_abs_pct": max(a),
            "rms_pct": math.sqrt(sum(e * e for e in errs) / len(errs))}


@dataclass(frozen=True)
class Calibration:
    """A fitted calibration: what compile applies, what it was fitted on and how good it is."""

    backend: str
    gpu: str
    factors: Factors
    time_band: dict | None  # leave-one-out tokens/s error {n, mean_abs_pct, max_abs_pct, rms_pct}
    memory_band: dict | None  # leave-one-out reserved-memory error
    residuals: list[dict] = field(default_factory=list)  # per run: label, measured, uncalibrated, calibrated
    provenance: dict = field(default_factory=dict)  # inputs [{path, sha256}], llmc_version

    def error_band_pct(self) -> float | None:
        """The expected tokens/s error (LOO mean |error|, %); None without time measurements."""
        return None if self.time_band is None else self.time_band["mean_abs_pct"]

    def to_json(self) -> dict:
        return {"kind": "llmc-calibration", "backend": self.backend, "gpu": self.gpu,
                "factors": asdict(self.factors), "time_band": self.time_band, "memory_band": self.memory_band,
                "residuals": list(self.residuals), "provenance": dict(self.provenance)}

    @staticmethod
    def from_json(d: dict) -> Calibration:
        if d.get("kind") != "llmc-calibration":
            raise ValueError("not an llmc calibration (missing kind: llmc-calibration)")
        return Calibration(backend=d["backend"], gpu=d["gpu"], factors=Factors(**d["factors"]),
                           time_band=d.get("time_band"), memory_band=d.get("memory_band"),
                           residuals=list(d.get("residuals", [])), provenance=dict(d.get("provenance", {})))


def calibrate(backend: str, gpu: str, time_points: list[TimePoint], mem_points: list[MemPoint],
              provenance: dict | None = None) -> Calibration:
    """Fit the factors on every run, with leave-one-out error bands and per-run residuals."""
    f = fit(time_points, mem_points)
    res = []
    for p in time_points:
        res.append({"label": p.label, "quantity": "tokens_per_s (relative)",
                    "uncalibrated_err_pct": _pct(p.measured_s / predict_step(p, IDENTITY), 1.0),
                    "calibrated_err_pct": _pct(p.measured_s / predict_step(p, f), 1.0)})
    for p in mem_points:
        res.append({"label": p.label, "quantity": "reserved_bytes",
                    "uncalibrated_err_pct": _pct(p.predicted_bytes, p.measured_bytes),
                    "calibrated_err_pct": _pct(predict_memory(p, f), p.measured_bytes)})
    return Calibration(backend=backend, gpu=gpu, factors=f,
                       time_band=_band(loo_time_errors(time_points)) if len(time_points) >= 2 else None,
                       memory_band=_band(loo_memory_errors(mem_points)) if len(mem_points) >= 2 else None,
                       residuals=res, provenance=dict(provenance or {}))


__all__ = ["RANKING_BAND_UNCALIBRATED", "Factors", "IDENTITY", "TimePoint", "MemPoint", "Calibration", "split_breakdown", "fit", "fit_time",
           "fit_memory", "predict_step", "predict_memory", "loo_time_errors", "loo_memory_errors", "calibrate"]
