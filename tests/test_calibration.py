"""Calibration: fitting named factors by least squares, leave-one-out bands, and compile applying them."""

from __future__ import annotations

import dataclasses
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from llmc.compiler import calibration as cal
from llmc.compiler import memory, timing
from llmc.compiler.calibration import Factors, MemPoint, TimePoint, split_breakdown
from llmc.compiler.compile import compile_spec
from llmc.compiler.hardware import GPUS
from llmc.compiler.plan import ParallelPlan
from llmc.spec.load import loads_spec
from llmc.spec.presets import PRESETS

GiB = 2**30
H100 = GPUS["h100-sxm"]

# layouts with very different communication shares (FSDP-only, TP, PP, CP, HSDP)
PLANS = [
    ("llama3-8b", 8192, ParallelPlan(dp_shard=8, micro_batch=2, grad_accum=1, activation_checkpointing="selective")),
    ("llama3-8b", 8192, ParallelPlan(dp_shard=128, micro_batch=1, grad_accum=2, activation_checkpointing="none")),
    ("llama3-70b", 8192, ParallelPlan(dp_shard=32, tp=8, micro_batch=4, grad_accum=1,
                                      activation_checkpointing="full")),
    ("llama3-70b", 8192, ParallelPlan(dp_shard=8, tp=4, pp=4, micro_batch=1, grad_accum=16,
                                      activation_checkpointing="selective")),
    ("llama3-8b", 65536, ParallelPlan(dp_shard=4, cp=8, micro_batch=1, grad_accum=1, activation_checkpointing="full")),
    ("llama3-8b", 8192, ParallelPlan(dp_replicate=16, dp_shard=8, micro_batch=1, grad_accum=2,
                                     activation_checkpointing="selective")),
]


def _timing(factors=None):
    out = []
    for name, seq, plan in PLANS:
        sm = timing.step_model(PRESETS[name], seq, "bf16", H100, "torchtitan", factors=factors)
        out.append(timing.step_time(sm, plan))
    return out


def test_split_breakdown_adds_up_and_puts_comm_on_the_comm_side():
    for step, _, br in _timing():
        c, m, f = split_breakdown(br)
        assert c + m + f == pytest.approx(step, rel=1e-9)
        assert m >= sum(br[k] for k in ("tp_comm", "ep_comm", "cp_comm", "pp_p2p", "fsdp_comm", "dp_comm")) - 1e-12


def test_fit_recovers_factors_used_to_generate_the_measurements():
    """'Measured' step times from llmc's own model with compute_scale 0.8 and comm_scale 1.6 (the full
    nonlinear model, overlap included); the fit on the uncalibrated predictions finds both factors."""
    truth = Factors(compute_scale=0.8, comm_scale=1.6)
    measured = [s for s, _, _ in _timing(truth)]
    points = []
    for (_step, _, br), t_meas, (name, _, _) in zip(_timing(), measured, PLANS, strict=True):
        c, m, f = split_breakdown(br)
        points.append(TimePoint(name, c, m, f, t_meas, d_model=PRESETS[name].d_model))
    cs, ms, g = cal.fit_time(points, comm_prior=0.0)
    assert g == 0.0  # two hidden sizes only: no size term
    assert cs == pytest.approx(0.8, rel=0.03)
    assert ms == pytest.approx(1.6, rel=0.10)
    # and the calibrated predictions match the measurements within a few percent
    f = Factors(compute_scale=cs, comm_scale=ms)
    for p in points:
        assert cal.predict_step(p, f) == pytest.approx(p.measured_s, rel=0.03)


def test_exact_linear_data_gives_exact_factors_and_zero_loo_error():
    rng = random.Random(0)
    pts = []
    for i in range(8):
        c, m, f = rng.uniform(1, 5), rng.uniform(0.1, 3), rng.uniform(0, 0.2)
        pts.append(TimePoint(f"r{i}", c, m, f, c / 1.25 + 0.5 * m + f))
    cs, ms, _ = cal.fit_time(pts, comm_prior=0.0)
    assert cs == pytest.approx(1.25, rel=1e-9) and ms == pytest.approx(0.5, rel=1e-9)
    assert max(abs(e) for e in cal.loo_time_errors(pts, comm_prior=0.0)) < 1e-6
    # the ridge prior pulls comm_scale from 0.5 toward 1: the augmented least-squares problem solved by numpy
    cs_p, ms_p, _ = cal.fit_time(pts, comm_prior=cal.COMM_PRIOR_WEIGHT)
    w = cal.COMM_PRIOR_WEIGHT ** 0.5
    a_mat = np.array([[p.compute_s / p.measured_s, p.comm_s / p.measured_s] for p in pts] + [[0.0, w]])
    y = np.array([1 - p.fixed_s / p.measured_s for p in pts] + [w])
    (a, b), *_ = np.linalg.lstsq(a_mat, y, rcond=None)
    assert 0.5 < ms_p < 1.0 and ms_p == pytest.approx(b, rel=1e-9) and cs_p == pytest.approx(1 / a, rel=1e-9)
    # noise makes the leave-one-out band positive, and larger than the in-sample residual
    noisy = [dataclasses.replace(p, measured_s=p.measured_s * (1 + rng.uniform(-0.05, 0.05))) for p in pts]
    c2 = cal.calibrate("torchtitan", "h100-sxm", noisy, [])
    ins = [abs(r["calibrated_err_pct"]) for r in c2.residuals]
    assert 0 < sum(ins) / len(ins) < c2.time_band["mean_abs_pct"] < 10


def test_few_points_fit_only_the_compute_factor():
    pts = [TimePoint("a", 2.0, 1.0, 0.0, 4.0), TimePoint("b", 3.0, 0.2, 0.0, 5.0)]
    cs, ms, g = cal.fit_time(pts)
    assert ms == 1.0 and g == 0.0
    # one factor: least squares of (C/T) a = 1 - M/T
    x = [(2 / 4, 1 - 1 / 4), (3 / 5, 1 - 0.2 / 5)]
    a = sum(u * v for u, v in x) / sum(u * u for u, _ in x)
    assert cs == pytest.approx(1 / a)


def test_memory_fit_recovers_scale_and_overhead_from_llmc_predictions():
    arch = PRESETS["llama3-8b"]
    pts = []
    for mb in (1, 2, 4):
        for ac in ("none", "selective", "full"):
            plan = ParallelPlan(dp_shard=8, micro_batch=mb, activation_checkpointing=ac)
            m = memory.memory_per_gpu(arch, plan, 8192, "bf16", H100.hbm_bytes, backend="torchtitan")
            pts.append(MemPoint(f"{mb}-{ac}", m.reserved_bytes, 1.07 * m.reserved_bytes + 1.5 * GiB))
    s, o = cal.fit_memory(pts)
    assert s == pytest.approx(1.07, rel=1e-6) and o == pytest.approx(1.5 * GiB, rel=1e-4)
    # applied through memory_per_gpu, the factors give the 'measured' reserved bytes
    plan = ParallelPlan(dp_shard=8, micro_batch=2, activation_checkpointing="selective")
    m0 = memory.memory_per_gpu(arch, plan, 8192, "bf16", H100.hbm_bytes, backend="torchtitan")
    m1 = memory.memory_per_gpu(arch, plan, 8192, "bf16", H100.hbm_bytes, backend="torchtitan",
                               factors=Factors(mem_scale=s, mem_overhead_bytes=o))
    assert m1.reserved_bytes == pytest.approx(1.07 * m0.reserved_bytes + 1.5 * GiB, rel=1e-6)
    assert m1.per_gpu_bytes - m1.reserved_bytes == pytest.approx(m0.per_gpu_bytes - m0.reserved_bytes, abs=2)


def test_json_round_trip():
    pts = [TimePoint(f"r{i}", 1.0 + i, 0.5, 0.0, 2.0 + i) for i in range(5)]
    c = cal.calibrate("torchtitan", "h100-sxm", pts, [], provenance={"inputs": [{"path": "x", "sha256": "0" * 64}]})
    back = cal.Calibration.from_json(c.to_json())
    assert back == c
    with pytest.raises(ValueError):
        cal.Calibration.from_json({"kind": "something-else"})


@pytest.mark.parametrize("edit,field", [
    (lambda d: d["factors"].update(compute_scale="fast"), "factors.compute_scale"),
    (lambda d: d["factors"].update(comm_scale=float("nan")), "factors.comm_scale"),
    (lambda d: d["factors"].update(mem_scale=0), "factors.mem_scale"),
    (lambda d: d["factors"].update(warp_speed=2.0), "factors"),
    (lambda d: d.update(factors=[1.0]), "factors"),
    (lambda d: d.update(gpu=7), "gpu"),
    (lambda d: d.update(time_band={"mean_abs_pct": "low"}), "time_band"),
    (lambda d: d.update(residuals="none"), "residuals")])
def test_a_damaged_calibration_is_one_located_line_naming_the_field(tmp_path, edit, field):
    """A hand-edited calibration reached the time model (a string scale was an INTERNAL TypeError at plan time);
    now `llmc plan --calibration` names the field in one K007 line and exits 1."""
    from typer.testing import CliRunner

    from llmc.cli import app

    pts = [TimePoint(f"r{i}", 1.0 + i, 0.5, 0.0, 2.0 + i) for i in range(5)]
    d = cal.calibrate("torchtitan", "h100-sxm", pts, []).to_json()
    edit(d)
    f = tmp_path / "cal.json"
    f.write_text(json.dumps(d))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    r = CliRunner().invoke(app, ["plan", str(spec), "--calibration", str(f)])
    assert r.exit_code == 1, r.output
    err = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(err) == 1 and "error[K007]" in err[0] and field in err[0] and "INTERNAL" not in err[0], err


SPEC = """\
name: t
model: llama3-8b
hardware: {gpu: h100-sxm, count: 64}
data: {seq_len: 8192, tokens: 1T}
training: {backend: torchtitan, global_batch_tokens: 4194304}
"""


def _compile(text=SPEC, **kw):
    run, lines = loads_spec(text, file="spec.yaml")
    return compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode(), **kw)


def test_compile_applies_a_matching_calibration_and_reports_its_band():
    base = _compile()
    assert base.calibration.calibrated is False and base.backend.name == "torchtitan"
    c = cal.Calibration(backend="torchtitan", gpu="h100-sxm", factors=Factors(compute_scale=0.5),
                        time_band={"n": 5, "mean_abs_pct": 3.0, "max_abs_pct": 6.0, "rms_pct": 3.5},
                        memory_band=None)
    got = _compile(calibration=c)
    assert got.calibration.calibrated is True and got.calibration.error_band_pct == 3.0
    # halving the compute efficiency slows the step (by less than 2x: communication is unchanged)
    assert base.time.step_seconds < got.time.step_seconds < 2.05 * base.time.step_seconds
    assert "calibrated for torchtitan/h100-sxm" in got.calibration.reason
    other = dataclasses.replace(c, backend="deepspeed")
    skipped = _compile(calibration=other)
    assert skipped.calibration.calibrated is False
    assert skipped.time.step_seconds == pytest.approx(base.time.step_seconds)


SIZE_PLANS = [  # three hidden sizes (4096, 8192, 16384), layouts with different communication shares
    ("llama3-8b", ParallelPlan(dp_shard=8, micro_batch=2, grad_accum=1, activation_checkpointing="selective")),
    ("llama3-8b", ParallelPlan(dp_shard=64, tp=2, micro_batch=1, grad_accum=2, activation_checkpointing="none")),
    ("llama3-70b", ParallelPlan(dp_shard=32, tp=8, micro_batch=4, grad_accum=1, activation_checkpointing="full")),
    ("llama3-70b", ParallelPlan(dp_shard=8, tp=4, pp=4, micro_batch=1, grad_accum=16,
                                activation_checkpointing="selective")),
    ("llama3.1-405b", ParallelPlan(dp_shard=16, tp=8, pp=8, micro_batch=1, grad_accum=16,
                                   activation_checkpointing="full")),
    ("llama3.1-405b", ParallelPlan(dp_shard=64, tp=8, micro_batch=1, grad_accum=1, activation_checkpointing="full")),
]


def _size_points(truth):
    pts = []
    for name, plan in SIZE_PLANS:
        arch = PRESETS[name]
        base = timing.step_time(timing.step_model(arch, 8192, "bf16", H100, "torchtitan"), plan)
        meas = timing.step_time(timing.step_model(arch, 8192, "bf16", H100, "torchtitan", factors=truth), plan)[0]
        c, m, f = split_breakdown(base[2])
        pts.append(TimePoint(name, c, m, f, meas, d_model=arch.d_model))
    return pts


def test_size_exponent_is_recovered_from_runs_generated_through_the_timing_model():
    """'Measured' steps from llmc's full timing model with a size exponent (applied by step_model through
    Factors.compute_scale_at): the fit on the uncalibrated splits finds the exponent and the scale."""
    truth = Factors(compute_scale=0.9, comm_scale=1.3, compute_size_exponent=0.2)
    # the factor the timing model applies is compute_scale x (d / 8192) ** gamma
    assert truth.compute_scale_at(4096) == pytest.approx(0.9 * 0.5**0.2)
    assert truth.compute_scale_at(8192) == 0.9 and Factors().compute_scale_at(16384) == 1.0
    pts = _size_points(truth)
    cs, ms, g = cal.fit_time(pts, comm_prior=0.0, size_prior=0.0)
    assert g == pytest.approx(0.2, abs=0.021) and cs == pytest.approx(0.9, rel=0.03)
    f = Factors(compute_scale=cs, comm_scale=ms, compute_size_exponent=g)
    for p in pts:
        assert cal.predict_step(p, f) == pytest.approx(p.measured_s, rel=0.02)
    # without the size term the same runs cannot be fitted as well
    cs0, ms0, _ = cal.fit_time(pts, comm_prior=0.0, size_prior=None)
    f0 = Factors(compute_scale=cs0, comm_scale=ms0)
    assert max(abs(cal.predict_step(p, f0) / p.measured_s - 1) for p in pts) > 0.05
    # the default priors shrink gamma toward 0, but keep most of it
    _, _, g_prior = cal.fit_time(pts)
    assert 0.1 <= g_prior <= 0.2


def test_size_term_needs_three_hidden_sizes_and_is_off_without_sizes():
    truth = Factors(compute_scale=0.9, compute_size_exponent=0.2)
    pts = _size_points(truth)
    two = [p for p in pts if p.label != "llama3.1-405b"]
    assert cal.fit_time(two, size_prior=0.0)[2] == 0.0
    unknown = [dataclasses.replace(p, d_model=0.0) for p in pts]
    assert cal.fit_time(unknown, size_prior=0.0)[2] == 0.0


def test_identity_factors_leave_the_timing_model_unchanged():
    for name, plan in SIZE_PLANS:
        sm0 = timing.step_model(PRESETS[name], 8192, "fp8", H100, "torchtitan")
        sm1 = timing.step_model(PRESETS[name], 8192, "fp8", H100, "torchtitan", factors=Factors())
        assert timing.step_time(sm0, plan)[0] == timing.step_time(sm1, plan)[0]


def test_leave_one_group_out_fits_on_the_other_groups_only():
    """Two 'releases' with different true compute scales: holding a release out predicts it with the other
    release's factors, so its tokens/s error is exactly the ratio of the two scales."""
    rng = random.Random(1)
    pts, keys = [], []
    for rel, scale in (("r1", 1.0), ("r2", 1.25)):
        for i in range(5):
            c, m = rng.uniform(1, 5), rng.uniform(0.1, 3)
            pts.append(TimePoint(f"{rel}-{i}", c, m, 0.0, c / scale + m))
            keys.append(rel)
    errs = cal.loo_time_errors(pts, keys, comm_prior=0.0, size_prior=None)
    for p, k, e in zip(pts, keys, errs, strict=True):
        other = 1.25 if k == "r1" else 1.0
        own = 1.0 if k == "r1" else 1.25
        expect = 100 * ((p.compute_s / own + p.comm_s) / (p.compute_s / other + p.comm_s) - 1)
        assert e == pytest.approx(expect, abs=1e-6)
    # one group only: nothing to fit on
    assert all(math.isnan(e) for e in cal.loo_time_errors(pts[:5], keys[:5]))


def test_old_calibration_json_without_the_size_exponent_still_loads():
    d = cal.calibrate("torchtitan", "h100-sxm", [TimePoint(f"r{i}", 1.0 + i, 0.5, 0.0, 2.0 + i) for i in range(5)],
                      []).to_json()
    del d["factors"]["compute_size_exponent"]
    assert cal.Calibration.from_json(d).factors.compute_size_exponent == 0.0


def test_steps_faster_than_the_communication_alone_are_no_fit():
    """A whole job's tokens/s given as per-GPU makes every measured step shorter than llmc's communication and
    optimizer time: no positive compute scale fits. The fit used to fall back to the identity and write it as a
    calibration (band +-93%); it is an error now (K008 from `llmc calibrate`), while a leave-one-out fold keeps the
    identity."""
    pts = [TimePoint(f"r{i}", compute_s=1.0, comm_s=2.0, fixed_s=0.5, measured_s=0.2 + 0.01 * i) for i in range(4)]
    with pytest.raises(ValueError, match="shorter than llmc's predicted communication"):
        cal.fit(pts, [])
    assert cal.fit_time(pts) == (1.0, 1.0, 0.0)


def test_calibrated_reserved_memory_never_falls_below_allocated():
    """A fitted negative overhead (points measured ~ 1.3 x predicted - 8 GiB) predicted negative reserved memory for
    a small model; the caching allocator holds at least what it hands out."""
    f = Factors(mem_scale=1.295, mem_overhead_bytes=-7.69 * GiB)
    arch = PRESETS["llama3-8b"].model_copy(update={"n_layers": 2})
    plan = ParallelPlan(dp_shard=8, micro_batch=1, grad_accum=1, activation_checkpointing="full")
    m = memory.memory_per_gpu(arch, plan, 1024, "bf16", H100.hbm_bytes, factors=f)
    assert 0 < m.allocated_bytes < 7.69 * GiB / 0.295  # small enough for the overhead to win
    assert m.reserved_bytes == m.allocated_bytes and m.per_gpu_bytes == m.reserved_bytes + m.outside_allocator_bytes
    big = dataclasses.replace(plan, micro_batch=64)
    mb = memory.memory_per_gpu(arch, big, 8192, "bf16", H100.hbm_bytes, factors=f)
    be = memory.get_backend(None)
    assert mb.reserved_bytes == math.ceil(mb.allocated_bytes * be.reserved_over_allocated * 1.295 - 7.69 * GiB)


def test_calibrate_refuses_the_same_measurements_twice_and_says_when_a_band_is_missing(tmp_path):
    """The same file twice (or two copies) counted each run twice: the leave-one-out band narrowed (6.9% -> 5.3%)
    with no warning. One run has no band: the plan says so instead of '+-nan%'."""
    import shutil
    import subprocess
    import sys

    rows = tmp_path / "runs.csv"
    rows.write_text("id,model,gpus,gpu_key,backend,seq_len,global_batch,micro_batch,dp_shard,tp,tokens_per_s_per_gpu\n"
                    "a,llama3-8b,8,h100-sxm,torchtitan,8192,16,2,8,1,5000\n")
    copy = tmp_path / "copy.csv"
    shutil.copy(rows, copy)
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "calibrate", str(rows), str(copy), "-o",
                        str(tmp_path / "c.json")], capture_output=True, text=True)
    assert r.returncode == 1 and "error[K001]" in r.stderr and f"the same measurements as {rows}" in r.stderr, r.stderr
    assert not (tmp_path / "c.json").exists()
    one = cal.Calibration(backend="torchtitan", gpu="h100-sxm", factors=Factors(compute_scale=0.9), time_band=None,
                          memory_band=None)
    got = _compile(calibration=one)
    assert got.calibration.calibrated and "nan" not in got.calibration.reason
    assert "no leave-one-out error band" in got.calibration.reason and got.calibration.ranking_band_pct == 6.0


def test_the_plan_and_the_lock_record_which_calibration_file_they_were_made_with(tmp_path):
    """The lock records the calibration's factors and provenance, and the file they were read from (as the spec
    names it) with its sha256, so a committed build says which calibration made it; a --calibration path
    is kept as its file name (a lock names no machine paths)."""
    import hashlib

    from typer.testing import CliRunner

    from llmc.cli import app

    pts = [TimePoint(f"r{i}", 1.0 + i, 0.5 + 0.2 * i, 0.0, 2.0 + 1.1 * i) for i in range(5)]
    f = tmp_path / "cals" / "h100.json"
    f.parent.mkdir()
    f.write_text(json.dumps(cal.calibrate("torchtitan", "h100-sxm", pts, []).to_json()))
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC + "calibration: cals/h100.json\n")
    r = CliRunner().invoke(app, ["build", str(spec), "-o", str(tmp_path / "b1")])
    assert r.exit_code == 0, r.output
    lock = json.loads((tmp_path / "b1" / "plan.lock.json").read_text())
    want = {"path": "cals/h100.json", "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    assert lock["calibration"]["calibrated"] and lock["calibration"]["file"] == want
    r = CliRunner().invoke(app, ["plan", str(spec), "--calibration", str(f), "--format", "json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["calibration"]["file"] == {"path": "h100.json", "sha256": want["sha256"]}
    # the build README's rebuild command names what the spec does not: a calibration given on the command line
    assert "--calibration" not in (tmp_path / "b1" / "README.md").read_text().split("## Rebuild")[1].split("##")[0]
    plain = tmp_path / "plain.yaml"
    plain.write_text(SPEC)
    r = CliRunner().invoke(app, ["build", str(plain), "-o", str(tmp_path / "b2"), "--calibration", str(f)])
    assert r.exit_code == 0, r.output
    rebuild = (tmp_path / "b2" / "README.md").read_text().split("## Rebuild")[1].split("\n## ")[0]
    assert " --calibration h100.json\n" in rebuild and want["sha256"] in rebuild


def test_the_comm_prior_yields_to_runs_that_show_slower_communication():
    """A cluster whose communication takes twice llmc's prediction (compute exact), over six layouts whose
    communication share spans 2-26 %: the ridge prior toward comm_scale 1 held the fit at ~1.14 (leave-one-out
    error ~9 %); the runs show it clearly (the fit without the prior predicts each left-out run exactly), so the
    fit drops the prior and finds the factors numpy's unregularised least squares finds. Runs that agree with
    llmc's communication up to noise keep the prior."""
    rng = random.Random(1)
    pts = []
    for i, share in enumerate((0.02, 0.06, 0.1, 0.15, 0.2, 0.26)):
        c = rng.uniform(2.0, 6.0)
        m, f = c * share / (1 - share), 0.05 * c
        pts.append(TimePoint(f"r{i}", c, m, f, c + 2.0 * m + f))
    a_mat = np.array([[p.compute_s / p.measured_s, p.comm_s / p.measured_s] for p in pts])
    y = np.array([1 - p.fixed_s / p.measured_s for p in pts])
    (a, b), *_ = np.linalg.lstsq(a_mat, y, rcond=None)
    assert cal.choose_comm_prior(pts) == 0.0
    cs, ms, _ = cal.fit_time(pts)
    assert cs == pytest.approx(1 / a, rel=1e-6) == pytest.approx(1.0, rel=1e-6)
    assert ms == pytest.approx(b, rel=1e-6) == pytest.approx(2.0, rel=1e-6)
    c = cal.calibrate("torchtitan", "h100-sxm", pts, [])
    assert c.fit == {"comm_prior": 0.0} and c.time_band["max_abs_pct"] < 1e-6
    assert cal.Calibration.from_json(json.loads(json.dumps(c.to_json()))).fit == {"comm_prior": 0.0}
    # the same layouts measured with llmc's communication and 3 % noise: the prior stays
    noisy = [dataclasses.replace(p, measured_s=(p.compute_s + p.comm_s + p.fixed_s) * (1 + rng.uniform(-.03, .03)))
             for p in pts]
    assert cal.choose_comm_prior(noisy) == cal.COMM_PRIOR_WEIGHT
    assert cal.calibrate("torchtitan", "h100-sxm", noisy, []).fit == {"comm_prior": cal.COMM_PRIOR_WEIGHT}


def _ref_fit(pts, comm_prior, size_prior):
    """An independent time fit (the module docstring's definition): numpy least squares on each subset's own
    design matrix, the ridge prior as an extra row, residuals summed directly, the gamma grid searched in the same
    order (ties to the smaller |gamma|); None when no positive compute scale fits."""
    pts = [p for p in pts if p.measured_s > 0 and p.compute_s > 0]
    if not pts:
        return 1.0, 1.0, 0.0
    sizes = [p.d_model for p in pts]
    shares = [p.comm_s / (p.compute_s + p.comm_s) for p in pts]
    sized = (size_prior is not None and len(pts) >= 4 and min(sizes) > 0 and len(set(sizes)) >= 3
             and max(sizes) >= 1.2 * min(sizes))
    grid = sorted(cal.SIZE_EXPONENT_GRID, key=abs) if sized else [0.0]
    lo_c, hi_c = cal.FACTOR_BOUNDS["compute_scale"]
    lo_m, hi_m = cal.FACTOR_BOUNDS["comm_scale"]
    best = None
    for g in grid:
        x1 = np.array([p.compute_s * ((p.d_model / cal.SIZE_REF_D_MODEL) ** -g if g and p.d_model > 0 else 1.0)
                       / p.measured_s for p in pts])
        x2 = np.array([p.comm_s / p.measured_s for p in pts])
        y = np.array([1 - p.fixed_s / p.measured_s for p in pts])
        sol = None
        if len(pts) >= 4 and max(shares) - min(shares) > 0.02:
            w = math.sqrt(comm_prior)
            a_mat = np.vstack([np.column_stack([x1, x2]), [[0.0, w]]])
            (a, b), *_ = np.linalg.lstsq(a_mat, np.append(y, w), rcond=None)
            if a > 0 and lo_c <= 1 / a <= hi_c and lo_m <= b <= hi_m:
                sol = a, b, float(np.sum((a * x1 + b * x2 - y) ** 2) + comm_prior * (b - 1) ** 2)
        if sol is None:
            a = float(x1 @ (y - x2) / (x1 @ x1))
            if a <= 0:
                continue
            a = 1 / min(max(1 / a, lo_c), hi_c)
            sol = a, 1.0, float(np.sum((a * x1 + x2 - y) ** 2))
        obj = sol[2] + (size_prior or 0.0) * g * g
        if best is None or obj < best[0] - 1e-12:
            best = (obj, sol[0], sol[1], g)
    return None if best is None else (1 / best[1], best[2], best[3])


def _ref_loo(pts, comm_prior, size_prior=cal.SIZE_PRIOR_WEIGHT, groups=None):
    """Leave-one(-group)-out tokens/s errors by refitting from scratch, the comm prior chosen again on each fold's
    runs when ``comm_prior`` is None (the nested choice)."""
    keys = groups or [str(i) for i in range(len(pts))]
    out = []
    for i, p in enumerate(pts):
        rest = [q for q, k in zip(pts, keys, strict=True) if k != keys[i]]
        w = comm_prior
        if w is None:
            if len(rest) < cal.MIN_POINTS_PRIOR_CHOICE:
                w = cal.COMM_PRIOR_WEIGHT
            else:
                free, held = (np.mean(np.abs(_ref_loo(rest, v, size_prior))) for v in (0.0, cal.COMM_PRIOR_WEIGHT))
                w = 0.0 if free < cal.COMM_PRIOR_RELEASE * held else cal.COMM_PRIOR_WEIGHT
        cs, ms, g = _ref_fit(rest, w, size_prior) or (1.0, 1.0, 0.0)
        step = p.compute_s / (cs * ((p.d_model / cal.SIZE_REF_D_MODEL) ** g if g and p.d_model > 0 else 1.0))
        out.append(100 * (p.measured_s / (step + p.comm_s * ms + p.fixed_s) - 1))
    return out


def _sweep(n, seed, comm_truth=1.3):
    rng = random.Random(seed)
    pts = []
    for i in range(n):
        c, m, f = rng.uniform(1, 10), rng.uniform(0.1, 3), rng.uniform(0, 0.2)
        d = rng.choice([2048, 4096, 8192, 16384])
        t = (c / (1.2 * (d / 8192) ** 0.1) + comm_truth * m + f) * rng.uniform(0.95, 1.05)
        pts.append(TimePoint(f"r{i}", c, m, f, t, d))
    return pts


@pytest.mark.parametrize("n, seed, comm_truth", [(9, 0, 1.3), (12, 3, 1.3), (10, 5, 4.0), (6, 7, 1.0)])
def test_fits_from_sufficient_statistics_equal_refitting_each_subset(n, seed, comm_truth):
    """fit_time / loo_time_errors / loo_others_spread downdate one set of normal-equation sums per size exponent
    instead of refitting every subset; on sweeps with a size term, a comm prior that stays and one that the runs
    release (communication 4x llmc's), they give what refitting each subset with numpy's least squares gives."""
    pts = _sweep(n, seed, comm_truth)
    for w in (0.0, cal.COMM_PRIOR_WEIGHT):
        assert cal.fit_time(pts, comm_prior=w) == pytest.approx(_ref_fit(pts, w, cal.SIZE_PRIOR_WEIGHT), rel=1e-9)
        assert cal.fit_time(pts, comm_prior=w, size_prior=None) == pytest.approx(_ref_fit(pts, w, None), rel=1e-9)
        assert cal.loo_time_errors(pts, comm_prior=w) == pytest.approx(_ref_loo(pts, w), rel=1e-7, abs=1e-9)
    assert cal.loo_time_errors(pts) == pytest.approx(_ref_loo(pts, None), rel=1e-7, abs=1e-9)  # nested choice
    keys = [str(i % 3) for i in range(n)]  # leave a whole group out
    assert cal.loo_time_errors(pts, keys) == pytest.approx(_ref_loo(pts, None, groups=keys), rel=1e-7, abs=1e-9)
    w = cal.choose_comm_prior(pts)
    assert (w == 0.0) == (comm_truth == 4.0)
    spread = []
    for i in range(n):
        cs, ms, g = _ref_fit(pts[:i] + pts[i + 1:], w, cal.SIZE_PRIOR_WEIGHT)
        f = Factors(compute_scale=cs, comm_scale=ms, compute_size_exponent=g)
        spread.append(float(np.median([abs(100 * (q.measured_s / cal.predict_step(q, f) - 1))
                                       for q in pts[:i] + pts[i + 1:]])))
    assert cal.loo_others_spread(pts) == pytest.approx(spread, rel=1e-7)


def test_the_sums_fit_skips_unusable_runs_and_falls_back_as_the_refit_does():
    """Runs without a measurement or a compute part are in no fit but are still scored; equal communication shares
    fall back to the compute-only fit; a subset left with no runs is the identity."""
    pts = _sweep(8, 11)
    pts[2] = dataclasses.replace(pts[2], measured_s=0.0)
    pts[5] = dataclasses.replace(pts[5], compute_s=0.0)
    assert cal.fit_time(pts, comm_prior=0.3) == pytest.approx(_ref_fit(pts, 0.3, cal.SIZE_PRIOR_WEIGHT), rel=1e-9)
    assert cal.loo_time_errors(pts, comm_prior=0.3) == pytest.approx(_ref_loo(pts, 0.3), rel=1e-7, abs=1e-9)
    flat = [dataclasses.replace(p, comm_s=p.compute_s * 0.1) for p in _sweep(7, 2)]
    assert cal.fit_time(flat, comm_prior=0.3)[1] == 1.0
    assert cal.fit_time(flat, comm_prior=0.3) == pytest.approx(_ref_fit(flat, 0.3, cal.SIZE_PRIOR_WEIGHT), rel=1e-9)
    assert cal.loo_time_errors(flat) == pytest.approx(_ref_loo(flat, None), rel=1e-7, abs=1e-9)
    assert cal.loo_time_errors(pts[:2], ["a", "a"]) == [pytest.approx(math.nan, nan_ok=True)] * 2


def test_the_recorded_calibration_hash_is_of_the_bytes_whose_factors_were_applied(tmp_path, monkeypatch):
    """The plan reads the calibration file once: a file replaced right after it was read (a re-fit writing it while a
    build runs) cannot pair the first file's factors with the second file's sha256 in the lock."""
    import hashlib

    from typer.testing import CliRunner

    from llmc import measurements
    from llmc.cli import app

    pts = [TimePoint(f"r{i}", 1.0 + i, 0.5 + 0.2 * i, 0.0, 2.0 + 1.1 * i) for i in range(5)]
    f = tmp_path / "h100.json"
    first = json.dumps(cal.calibrate("torchtitan", "h100-sxm", pts, []).to_json()).encode()
    f.write_bytes(first)
    second = json.dumps(cal.calibrate("torchtitan", "h100-sxm", pts[:4], []).to_json()).encode()
    read = measurements.read_regular_file

    def read_then_replace(path, *a, **k):
        data = read(path, *a, **k)
        if Path(path).name == "h100.json":
            f.write_bytes(second)
        return data

    monkeypatch.setattr(measurements, "read_regular_file", read_then_replace)
    spec = tmp_path / "spec.yaml"
    spec.write_text(SPEC)
    r = CliRunner().invoke(app, ["plan", str(spec), "--calibration", str(f), "--format", "json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)["calibration"]
    assert got["file"]["sha256"] == hashlib.sha256(first).hexdigest() != hashlib.sha256(second).hexdigest()
    assert got["factors"] == json.loads(first)["factors"]
