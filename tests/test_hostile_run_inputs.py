"""Hostile inputs to the readers of a build's run files: a calibration JSON, a lock given to ``llmc plan --diff`` or
launched with ``--force``, a run's metrics.jsonl, ``llmc export --stage`` and a measurements table. Each is one
located error line and exit 1 (never a traceback or ``error[INTERNAL]``), or read as it is."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmc.cli import app
from llmc.lockfile import read_lock
from llmc.measurements import MeasurementError, calibrate_main, load_calibration, read_llmc_run

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "benchmarks" / "data" / "torchtitan_llama3_h100_202412.yaml"
BIG = 10**400  # an integer JSON reads, beyond a float's range (sys.float_info.max ~ 1.8e308)


def run(*args: str):
    """``llmc ARGS`` in this process: (exit code, its stdout and stderr lines); a Python exception that escaped the
    command (what ``llmc`` prints as error[INTERNAL]) fails the test."""
    r = CliRunner().invoke(app, list(args))
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise AssertionError(f"llmc {' '.join(args)}: {type(r.exception).__name__}: {r.exception}") from r.exception
    assert "INTERNAL" not in r.output and "Traceback" not in r.output, r.output
    return r.exit_code, [ln for ln in r.output.splitlines() if ln.strip()]


def errors(lines: list[str]) -> list[str]:
    return [ln for ln in lines if "error[" in ln]


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """A tiny CPU build (a lock of a real compile, nothing run)."""
    out = tmp_path_factory.mktemp("hostile") / "b"
    code, lines = run("build", str(ROOT / "examples/tiny_cpu.yaml"), "-o", str(out), "--set", "training.steps=30",
                      "--set", "eval=null")
    assert code == 0, lines
    return out


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> dict:
    """A calibration ``llmc calibrate`` wrote from the published torchtitan runs (both bands, residuals)."""
    out = tmp_path_factory.mktemp("cal") / "good.json"
    assert calibrate_main([str(TABLE)], str(out)) == 0
    return json.loads(out.read_text())


def _set(d: dict, path: str, value) -> dict:
    d = copy.deepcopy(d)
    *heads, leaf = path.split(".")
    o = d
    for k in heads:
        o = o[int(k)] if isinstance(o, list) else o[k]
    o[int(leaf) if isinstance(o, list) else leaf] = value
    return d


# ---------------------------------------------------------------------------------------------- 1. calibration


@pytest.mark.parametrize("key,value,shown", [
    ("factors.comm_scale", BIG, "factors.comm_scale"),
    ("factors.mem_overhead_bytes", -BIG, "factors.mem_overhead_bytes"),
    ("time_band.max_abs_pct", BIG, "time_band.max_abs_pct"),
    ("memory_band.max_abs_pct", BIG, "memory_band.max_abs_pct"),
    ("memory_band.mean_abs_pct", BIG, "memory_band.mean_abs_pct"),
    ("time_band.rms_pct", -BIG, "time_band.rms_pct"),
    ("residuals.0.uncalibrated_err_pct", BIG, "residuals[0].uncalibrated_err_pct"),
    ("residuals.0.calibrated_err_pct", BIG, "residuals[0].calibrated_err_pct"),
], ids=lambda v: "big" if isinstance(v, int) and v > 0 else "-big" if isinstance(v, int) else None)
def test_a_calibration_number_beyond_a_float_is_one_located_line(tmp_path, calibration, key, value, shown):
    """An integer too large for a float (1 and 400 zeros) in a calibration made `llmc plan --calibration` end in
    error[INTERNAL] OverflowError (math.isfinite of the int; a residual's float() once the plan applied the file):
    one K007 line naming the file and the key."""
    p = tmp_path / "big.json"
    p.write_text(json.dumps(_set(calibration, key, value)))
    with pytest.raises(MeasurementError) as e:
        load_calibration(p)
    line = e.value.located()
    assert line.startswith(f"{p}: error[K007]") and f"{shown} must be a finite number" in line, line
    assert "\n" not in line and len(line) < 300, line  # (the 401 digits are not printed)


def test_a_calibration_number_beyond_a_float_in_plan_and_build(tmp_path, calibration):
    p = tmp_path / "big.json"
    p.write_text(json.dumps(_set(calibration, "factors.comm_scale", BIG)))
    for cmd in (["plan"], ["build", "-o", str(tmp_path / "out")]):
        code, lines = run(*cmd[:1], str(ROOT / "examples/llama3_8b_h100x8.yaml"), *cmd[1:], "--calibration", str(p))
        (err,) = errors(lines)
        assert code == 1 and err.startswith(f"{p}: error[K007]") and "factors.comm_scale must be a finite" in err


def test_the_calibration_a_fit_writes_still_reads(tmp_path, calibration):
    """The checks refuse no file llmc calibrate writes (a single run's leave-one-out figures are NaN there)."""
    p = tmp_path / "ok.json"
    d = _set(calibration, "residuals.0.loo_err_pct", float("nan"))
    p.write_text(json.dumps(d))
    cal = load_calibration(p)
    assert cal.factors.comm_scale == calibration["factors"]["comm_scale"]


# ---------------------------------------------------------------------------------------------- 2. plan --diff


@pytest.mark.parametrize("key", ["cost.gpu_hours", "memory.per_gpu_bytes"])
def test_a_diff_lock_number_beyond_a_float_is_one_located_line(tmp_path, build, key):
    """`llmc plan SPEC --diff LOCK` with 10**400 in the lock divided or formatted it (OverflowError, INTERNAL): the
    lock is refused where it is read, naming the key."""
    lock = json.loads((build / "plan.lock.json").read_text())
    p = tmp_path / "plan.lock.json"
    p.write_text(json.dumps(_set(lock, key, BIG)))
    with pytest.raises(ValueError, match=f"malformed lockfile: {key} is an integer of 401 digits"):
        read_lock(p)
    code, lines = run("plan", str(ROOT / "examples/tiny_cpu.yaml"), "--diff", str(p))
    (err,) = errors(lines)
    assert code == 1 and err.startswith(f"{p}: error[X001]") and key in err, lines


def test_the_largest_float_is_a_lock_number(tmp_path, build):
    """The bound is a float's range (sys.float_info.max), not less: that integer itself reads; one more does not."""
    lock = json.loads((build / "plan.lock.json").read_text())
    p = tmp_path / "plan.lock.json"
    top = int(sys.float_info.max)
    p.write_text(json.dumps(_set(lock, "cost.gpu_hours", top)))
    assert read_lock(p)["cost"]["gpu_hours"] == top
    p.write_text(json.dumps(_set(lock, "cost.gpu_hours", -(top + 1))))
    with pytest.raises(ValueError, match="cost.gpu_hours"):
        read_lock(p)


@pytest.mark.parametrize("key,value", [("hyper.steps", float("nan")), ("memory.per_gpu_bytes", float("inf")),
                                       ("time.mfu", "x"), ("diagnostics", "x"), ("serving", [1])])
def test_a_diff_shows_what_an_earlier_lock_holds(tmp_path, build, key, value):
    """A figure that is not a finite number in the earlier lock is shown as written, not computed with (int(nan)
    was a ValueError, read as a malformed lock); diagnostics and serving that are not lists of objects are none."""
    from llmc.emit.lock import diff_lock

    lock = json.loads((build / "plan.lock.json").read_text())
    old = json.loads(json.dumps(_set(lock, key, value)))
    text = diff_lock(old, lock)
    if key in ("hyper.steps", "memory.per_gpu_bytes", "time.mfu"):
        shown = {"hyper.steps": "NaN", "memory.per_gpu_bytes": "Infinity", "time.mfu": "x"}[key]
        assert any(ln.strip().startswith(("steps:", "memory per GPU:", "MFU:")) and ln.split(": ", 1)[1].startswith(
            shown) for ln in text.splitlines()), text
    json.loads(diff_lock(old, lock, fmt="json"))


# ---------------------------------------------------------------------------------------------- 3. launch --force


def _launch_lock(build: Path, lock: dict, tmp_path: Path) -> tuple[int, list[str]]:
    (build / "plan.lock.json").write_text(json.dumps(lock))
    return run("launch", str(build), "--dry-run", "--force")


@pytest.fixture
def copy_build(build, tmp_path) -> Path:
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(build, out)
    return out


@pytest.mark.parametrize("key,value", [("spec.resolved.hardware", "x"), ("spec.resolved.hardware", None),
                                       ("spec.resolved.data.sources", 7), ("spec.resolved.data.sources.0", "x"),
                                       ("spec.resolved.hardware.count", "8"), ("spec.resolved.stages", 3)])
def test_an_edited_lock_launched_with_force_is_one_l001_line(copy_build, tmp_path, key, value):
    """`llmc launch COPY --dry-run --force` of a lock whose spec.resolved.hardware is "x" printed L004, then
    error[INTERNAL] AttributeError; data.sources an integer a TypeError from the runtime's lock_builtin_sources. Now
    L004, then one L001 line naming the key."""
    lock = json.loads((copy_build / "plan.lock.json").read_text())
    code, lines = _launch_lock(copy_build, _set(lock, key, value), tmp_path)
    where = key.replace(".0", "[0]")
    assert code == 1 and [ln for ln in lines if "warning[L004]" in ln], lines
    (err,) = errors(lines)
    assert "error[L001]" in err and f"malformed lockfile: {where} must be" in err, err


def test_no_lock_shape_edit_reaches_internal_in_launch(copy_build, tmp_path):
    """Every top-level section of the lock, of its spec and of spec.resolved (and the fields launch reads in them)
    set to a string, an integer and a list: `llmc launch --dry-run --force` exits 0 or 1 with located lines."""
    lock = json.loads((copy_build / "plan.lock.json").read_text())
    resolved = lock["spec"]["resolved"]
    keys = ([k for k in lock] + [f"spec.{k}" for k in lock["spec"]] + [f"spec.resolved.{k}" for k in resolved]
            + [f"spec.resolved.{s}.{k}" for s in ("hardware", "data", "training") for k in resolved[s]]
            + [f"{s}.{k}" for s in ("hardware", "cluster", "plan", "preemption", "backend") for k in lock[s]])
    assert len(keys) > 80
    for key in keys:
        for value in ("x", 7, [1]):
            code, lines = _launch_lock(copy_build, _set(lock, key, value), tmp_path)
            assert code in (0, 1), (key, value, lines)
            assert code == 0 or errors(lines), (key, value, lines)


# ---------------------------------------------------------------------------------------------- 4. report


def _metrics(build: Path, backend) -> Path:
    m = build / "run" / "pretrain" / "metrics.jsonl"
    m.parent.mkdir(parents=True, exist_ok=True)
    recs = [{"event": "start", "step": 0, "backend": backend}] + [
        {"step": s, "loss": 3.0, "tokens_per_s": 40000.0, "step_s": 0.1} for s in range(1, 30)]
    m.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return m


@pytest.mark.parametrize("backend", ["<s>", "megatron\n", 7, ["native"]])
def test_an_unknown_backend_in_the_start_event_is_one_located_line(copy_build, backend):
    """`llmc report` of a run whose start event names a backend llmc does not know looked it up in BACKENDS
    (KeyError, INTERNAL); `llmc calibrate` predicted it for the lock's backend instead. Both refuse it now: one line
    naming the file, line 1, the key and the known backends."""
    from llmc.compiler.backends import BACKENDS

    m = _metrics(copy_build, backend)
    code, lines = run("report", str(copy_build))
    (err,) = errors(lines)
    assert code == 1 and err.endswith(")") and ":1: error[L012]" in err and "backend" in err, lines
    assert all(name in err for name in BACKENDS), err
    with pytest.raises(MeasurementError) as e:
        read_llmc_run(m)
    assert (e.value.line, e.value.code, e.value.path) == (1, "K001", "backend")
    assert "\n" not in e.value.located() and all(name in e.value.located() for name in BACKENDS)


def test_report_and_calibrate_read_a_metrics_file_the_same_way(copy_build):
    """`llmc report` and `llmc calibrate` read metrics.jsonl through one parser (llmc.runtime.metrics_io): a torn
    last line (a writer killed mid-line) is dropped by both (calibrate refused it as "not a JSON record"), and a
    line nested past Python's recursion limit is one located line in both (report raised RecursionError:
    error[INTERNAL])."""
    from llmc.runreport import read_metrics

    m = _metrics(copy_build, "native")
    good = m.read_text()
    m.write_text(good + '{"step": 30, "loss": 3.0, "tokens_')
    assert read_metrics(m, "pretrain").steps == list(range(1, 30))
    assert read_llmc_run(m).tokens_per_s_per_gpu > 0
    m.write_text(good + "[" * 100_000 + "]" * 100_000 + "\n")
    code, lines = run("report", str(copy_build))
    (err,) = errors(lines)
    assert code == 1 and ":31: error[L012]" in err and "nested too deeply" in err, lines
    with pytest.raises(MeasurementError) as e:
        read_llmc_run(m)
    assert (e.value.line, e.value.code, e.value.path) == (31, "K001", "metrics.jsonl"), e.value.located()


def test_a_known_backend_in_the_start_event_is_read(copy_build):
    from llmc.runreport import read_metrics

    m = _metrics(copy_build, "torchtitan")
    assert read_metrics(m, "pretrain").backend == "torchtitan"
    assert read_llmc_run(m).backend == "torchtitan"


# ---------------------------------------------------------------------------------------------- 5. export


def test_an_export_stage_name_with_a_newline_is_one_line(build, capsys):
    """`llmc export BUILD --stage $'a\\nb'` printed the raw newline: one error on two lines."""
    from llmc.runtime.export import main

    assert main(["--stage=a\nb", "--", str(build)]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and "error[R010] export a\\nb:" in err[0], err


# ---------------------------------------------------------------------------------------------- 6. calibrate


def test_calibrate_reports_every_bad_row_at_once(tmp_path, capsys):
    """Three bad rows in a table: `llmc calibrate` named the first only; now one located line each, in order."""
    text = TABLE.read_text().splitlines()
    edits = {"id: tt24-t1-fsdp,": ("tokens_per_s_per_gpu: 5762", "tokens_per_s_per_gpu: abc"),
             "id: tt24-t2-cp1-32k,": ("micro_batch: 1,", "micro_batch: x,"),
             "id: tt24-t3-fsdp,": ("gpus: 128,", "gpus: 7,")}
    where = []
    for i, ln in enumerate(text):
        for marker, (old, new) in edits.items():
            if marker in ln:
                assert old in ln
                text[i] = ln.replace(old, new)
                where.append(i + 1)
    p = tmp_path / "bad.yaml"
    p.write_text("\n".join(text) + "\n")
    assert calibrate_main([str(p)], str(tmp_path / "out.json")) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert [ln.split(": error[")[0] for ln in err] == [f"{p}:{n}" for n in where], err
    assert [ln.split(": ")[1] for ln in err] == ["error[K004] tokens_per_s_per_gpu", "error[K004] micro_batch",
                                                 "error[K004] gpus"], err
    assert not (tmp_path / "out.json").exists()


def test_calibrate_reports_every_bad_csv_row_and_input(tmp_path, capsys):
    """A CSV's rows with the wrong cell count or a bad cell, and a second input that does not exist: all at once."""
    csv = tmp_path / "runs.csv"
    head = "model,backend,gpu_key,gpus,dp_shard,micro_batch,global_batch,seq_len,tokens_per_s_per_gpu"
    csv.write_text("\n".join([head, "llama3.1-8b,torchtitan,h100-sxm,8,8,1,8,8192,5000",
                              "llama3.1-8b,torchtitan,h100-sxm,8,8,1,8,8192",
                              "llama3.1-8b,torchtitan,h100-sxm,8,8,1,8,8192,-3"]) + "\n")
    missing = tmp_path / "nope.jsonl"
    assert calibrate_main([str(csv), str(missing)], str(tmp_path / "out.json")) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert [ln.split(": error[")[0] for ln in err] == [f"{csv}:3", f"{csv}:4", str(missing)], err
