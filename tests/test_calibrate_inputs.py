"""``llmc calibrate`` refuses inputs it would otherwise fit wrong factors from: a lock's GPU overrides left out of
the prediction, torchtitan validation lines read as training steps, memory in the wrong units, unknown columns,
layouts ``llmc plan`` refuses, GPU aliases, repeated rows, spreadsheet encodings and separators, out-of-range
calibration files, and a run no factor explains."""

from __future__ import annotations

import csv
import json

import pytest

from llmc import measurements as ms
from llmc.compiler.calibration import FACTOR_BOUNDS, Calibration, Factors
from llmc.compiler.compile import compile_spec
from llmc.emit.lock import lock_text
from llmc.spec.load import loads_spec

GiB = 2**30

# ----------------------------------------------------------------------------------- a lock's own GPU

_SPEC = """\
name: m
model: llama3-8b
hardware: {gpu: %s, count: 16, gpus_per_node: 8%s}
data: {seq_len: 8192, tokens: 10B}
training: {backend: torchtitan, global_batch_tokens: 1048576}
parallelism: {dp_replicate: 2, dp_shard: 8, tp: 1, pp: 1, micro_batch: 1, activation_checkpointing: none}
"""


def _built(tmp_path, gpu: str, overrides: str = ""):
    """A build of the spec and a run of it measured exactly at the lock's own prediction: the whole job's tokens/s
    and the allocated peak the plan predicts, on the GPU."""
    return _built_text(tmp_path, _SPEC % (gpu, f", gpu_overrides: {{{overrides}}}" if overrides else ""))


def _built_text(tmp_path, text: str):
    """:func:`_built` for any spec text."""
    run, lines = loads_spec(text, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())
    assert c.plan is not None, [d.message for d in c.diagnostics]
    b = tmp_path / "build"
    (b / "run" / "pretrain").mkdir(parents=True)
    (b / "plan.lock.json").write_text(lock_text(c))
    recs = [{"step": s, "loss": 3.0, "tokens_per_s": c.time.tokens_per_second,
             "peak_mem_bytes": float(c.memory.allocated_bytes), "peak_mem_device": "cuda"} for s in range(1, 30)]
    (b / "run" / "pretrain" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return b, run, lines, text


def test_a_run_at_the_plans_prediction_fits_identity_factors_with_gpu_overrides(tmp_path, capsys):
    """A spec that doubles the H100's bf16 peak (989 -> 1978 TFLOP/s); its run measured at exactly the lock's
    prediction is what llmc already predicts: every factor 1, no residual, no warning (both errors are 0 %). The
    table's plain H100 predicted it ~45 % slower, fitting compute_scale ~1.84 on top of the override."""
    b, *_ = _built(tmp_path, "h100-sxm", "bf16_tflops: 1978")
    out = tmp_path / "cal.json"
    assert ms.calibrate_main([str(b)], str(out)) == 0
    cal = Calibration.from_json(json.loads(out.read_text()))
    assert cal.gpu == "h100-sxm"
    assert cal.factors.compute_scale == pytest.approx(1.0, abs=1e-6)
    assert cal.factors.mem_scale == pytest.approx(1.0, abs=1e-6)
    assert all(abs(r["uncalibrated_err_pct"]) < 1e-6 for r in cal.residuals), cal.residuals
    assert capsys.readouterr().err == ""


def test_a_custom_gpu_calibrates_under_its_own_name_and_the_plan_applies_it(tmp_path):
    """``gpu: my-h100`` defined by ``gpu_overrides.base: h100-sxm`` (not a table key): calibrate fits it under that
    name, with identity factors for a run at the lock's prediction, and ``llmc plan`` on the same spec applies it."""
    b, run, lines, text = _built(tmp_path, "my-h100", "base: h100-sxm, bf16_tflops: 1978")
    out = tmp_path / "cal.json"
    assert ms.calibrate_main([str(b)], str(out)) == 0
    cal = ms.load_calibration(out)
    assert cal.gpu == "my-h100" and cal.factors.compute_scale == pytest.approx(1.0, abs=1e-6)
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode(), calibration=cal)
    assert c.calibration.calibrated, c.calibration.reason


def test_no_better_warning_is_silent_when_both_errors_are_nil():
    from llmc.compiler.calibration import MemPoint, TimePoint, calibrate

    cal = calibrate("native", "cpu", [TimePoint("a", 1.0, 0.0, 0.0, 1.0, 64.0)], [MemPoint("a", 5e9, 5e9)])
    assert ms.no_better_warning(cal) is None


# ----------------------------------------------------------------------------------- torchtitan validation lines

# torchtitan 0.3.0 components/metrics.py: MetricsProcessor.log (training) and log_validation, as printed (colours)
_TRAIN = ("[rank0]:[titan] 2025-06-13 10:00:{s:02d},123 - root - INFO - \x1b[31mstep: {n:2}  \x1b[32mloss:  7.80000  "
          "\x1b[33mgrad_norm:  1.2345  \x1b[36mmemory: 64.39GiB(81.40%)  \x1b[34mtps: 10,000  \x1b[96mtflops: 579.10  "
          "\x1b[35mmfu: 58.55%\x1b[39m")
_VALIDATE = ("[rank0]:[titan] 2025-06-13 10:00:{s:02d},123 - root - INFO - \x1b[33mvalidate step: {n:2}  "
             "\x1b[32mloss:  6.8000  \x1b[36mmemory: 70.50GiB(89.13%)  \x1b[34mtps: 30,000\x1b[39m")


def test_torchtitan_validation_lines_are_not_training_steps():
    """A run validating every 10 steps: the evaluation's tps (a forward pass only: 30,000) and memory peak are not
    the training step's (10,000 tokens/s, 64.39 GiB)."""
    text = "\n".join(line.format(n=n, s=n % 60) for n in range(10, 110, 10) for line in (_TRAIN, _VALIDATE))
    steps = ms.parse_torchtitan_log(text)
    assert [s.step for s in steps] == list(range(10, 110, 10))
    assert {s.tps for s in steps} == {10000.0} and {s.memory_gib for s in steps} == {64.39}


# ----------------------------------------------------------------------------------- tables

_COLS = ["id", "model", "gpus", "gpus_per_node", "seq_len", "dp_replicate", "dp_shard", "tp", "micro_batch",
         "global_batch", "ac", "backend", "gpu_key"]
_LAYOUTS = [("a", 8, 1, 8, 1, 2, 16, "selective"), ("b", 16, 2, 8, 1, 1, 32, "none"), ("c", 64, 1, 8, 8, 4, 32, "full"),
            ("d", 32, 1, 32, 1, 2, 64, "selective"), ("e", 16, 1, 4, 4, 2, 16, "full")]
_TRUTH = Factors(compute_scale=0.8, mem_scale=1.1)


def _rows(tmp_path, truth: Factors = _TRUTH, gpu: str = "h100-sxm") -> list[dict]:
    """One row per layout, its measurements llmc's own predictions under ``truth`` (tokens/s per GPU, GiB)."""
    base = [dict(zip(_COLS, (i, "llama3-8b", g, 8, 8192, r, s, t, mb, gb, ac, "torchtitan", gpu), strict=True))
            for i, g, r, s, t, mb, gb, ac in _LAYOUTS]
    p = _write(tmp_path / "layouts.csv", base)
    out = []
    for row, m in zip(base, ms.read_table(p), strict=True):
        t, mem = ms.predicted(m, truth)
        out.append({**row, "tokens_per_s_per_gpu": f"{t.tokens_per_second / m.plan.world:.4f}",
                    "mem_gib": f"{mem.reserved_bytes / GiB:.4f}"})
    return out


def _write(path, rows: list[dict], **fmt):
    with open(path, "w", newline="", **({"encoding": fmt.pop("encoding")} if "encoding" in fmt else {})) as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), **fmt)
        w.writeheader()
        w.writerows(rows)
    return path


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0] and "INTERNAL" not in err[0], err
    return err[0]


def _refused(tmp_path, capsys, path) -> str:
    assert ms.calibrate_main([str(path)], str(tmp_path / "cal.json")) == 1
    assert not (tmp_path / "cal.json").exists()
    return _err(capsys)


def test_memory_in_bytes_is_refused_on_its_row(tmp_path, capsys):
    """6.9e10 "GiB" is the bytes of a 64 GiB peak: above any H100's 80 GB, so no measurement of one."""
    rows = _rows(tmp_path)
    rows[2]["mem_gib"] = str(round(float(rows[2]["mem_gib"]) * GiB))
    p = _write(tmp_path / "runs.csv", rows)
    line = _refused(tmp_path, capsys, p)
    assert line.startswith(f"{p}:4: error[K004] mem_gib: ") and "bytes" in line, line


def test_a_factor_pinned_at_its_bound_is_refused(tmp_path, capsys):
    """Runs 10x slower than llmc predicts would need compute_scale ~0.1, below the 0.2 the fit allows: the written
    factor would be the bound, not the fit. Refused, naming the factor."""
    slow = _rows(tmp_path, Factors(compute_scale=0.1))
    assert 0.1 < FACTOR_BOUNDS["compute_scale"][0]
    p = _write(tmp_path / "runs.csv", slow)
    line = _refused(tmp_path, capsys, p)
    assert "error[K008] compute_scale: " in line and f"{FACTOR_BOUNDS['compute_scale'][0]:g}" in line, line


@pytest.mark.parametrize("old,new,close", [("ac", "activation_checkpointing", "ac"), ("mem_gib", "mem_GiB", "mem_gib"),
                                           ("tokens_per_s_per_gpu", "tokens_per_sec_per_gpu", "tokens_per_s_per_gpu"),
                                           ("gpus_per_node", "gpu_per_node", "gpus_per_node")])
def test_an_unknown_column_is_refused_naming_the_closest(tmp_path, capsys, old, new, close):
    rows = [{(new if k == old else k): v for k, v in r.items()} for r in _rows(tmp_path)]
    p = _write(tmp_path / "runs.csv", rows)
    line = _refused(tmp_path, capsys, p)
    assert line.startswith(f"{p}:1: error[K004] {new}: unknown column") and f"did you mean {close!r}" in line, line


def test_informational_and_own_columns_are_allowed(tmp_path):
    rows = [{**r, "notes": "cluster A", "x_job_id": "123"} for r in _rows(tmp_path)]
    assert len(ms.read_table(_write(tmp_path / "runs.csv", rows))) == len(_LAYOUTS)


def test_a_yaml_rows_unknown_key_is_refused_on_its_line(tmp_path, capsys):
    p = tmp_path / "runs.yaml"
    p.write_text("backend: torchtitan\ngpu_key: h100-sxm\nrows:\n"
                 "  - {id: a, model: llama3-8b, gpus: 8, seq_len: 8192, dp_shard: 8, micro_batch: 2, global_batch: 16}\n"
                 "  - {id: b, model: llama3-8b, gpus: 8, seq_len: 8192, dp_shard: 8, micro_batch: 2, global_batch: 16,"
                 " zero: 2}\n")
    line = _refused(tmp_path, capsys, p)
    assert line.startswith(f"{p}:5: error[K004] zero: ") and "'zero_stage'" in line, line


def test_a_row_with_an_extra_cell_is_refused(tmp_path, capsys):
    p = _write(tmp_path / "runs.csv", _rows(tmp_path))
    lines = p.read_text().splitlines()
    lines[3] += ",7"
    p.write_text("\n".join(lines) + "\n")
    assert _refused(tmp_path, capsys, p).startswith(f"{p}:4: error[K004] row: ")


@pytest.mark.parametrize("gpus,dp_shard,tp", [(24, 8, 3), (16, 1, 16)])
def test_a_layout_llmc_plan_refuses_is_refused_with_the_plans_message(tmp_path, capsys, gpus, dp_shard, tp):
    """tp 3 (does not divide the 8-GPU node) and tp 16 (beyond the node): the same P002 ``llmc plan`` gives for the
    layout pinned in a spec, on the row."""
    rows = _rows(tmp_path)
    rows[1].update(gpus=str(gpus), dp_replicate="1", dp_shard=str(dp_shard), tp=str(tp), micro_batch="1",
                   global_batch=str(4 * dp_shard))
    p = _write(tmp_path / "runs.csv", rows)
    line = _refused(tmp_path, capsys, p)
    spec = _SPEC.replace("count: 16", f"count: {gpus}") % ("h100-sxm", "")
    spec = spec.replace("dp_replicate: 2, dp_shard: 8, tp: 1", f"dp_replicate: 1, dp_shard: {dp_shard}, tp: {tp}")
    run, lns = loads_spec(spec, file="spec.yaml")
    plan_errs = [d for d in compile_spec(run, "spec.yaml", lns).diagnostics if d.code == "P002"]
    assert plan_errs and line.startswith(f"{p}:3: error[K004] tp: ") and plan_errs[0].message in line, line


def test_a_gpu_alias_is_stored_under_its_canonical_key(tmp_path, capsys):
    """``h100-sxm5`` is ``h100-sxm`` (llmc gpus' alias): a table mixing the two is one (backend, GPU) pair, stored
    under the key ``gpu: h100-sxm`` or ``gpu: H100`` plans look it up by."""
    rows = _rows(tmp_path)
    rows[0]["gpu_key"] = rows[3]["gpu_key"] = "h100-sxm5"
    out = tmp_path / "cal.json"
    assert ms.calibrate_main([str(_write(tmp_path / "runs.csv", rows))], str(out)) == 0
    assert json.loads(out.read_text())["gpu"] == "h100-sxm"
    assert ms.calibrate_main([str(tmp_path / "runs.csv")], str(out), gpu="H100") == 0


def test_a_mistyped_gpu_is_refused_on_its_row(tmp_path, capsys):
    rows = _rows(tmp_path)
    rows[2]["gpu_key"] = "h100-sxn"
    p = _write(tmp_path / "runs.csv", rows)
    line = _refused(tmp_path, capsys, p)
    assert line.startswith(f"{p}:4: error[K005] gpu_key: unknown llmc GPU key 'h100-sxn'"), line


def test_a_repeated_row_or_id_is_refused_but_a_repeat_measurement_is_not(tmp_path, capsys):
    rows = _rows(tmp_path)
    p = _write(tmp_path / "dup.csv", [*rows, rows[1]])
    assert _refused(tmp_path, capsys, p).startswith(f"{p}:7: error[K004] rows: the same row as line 3")
    p = _write(tmp_path / "dupid.csv", [*rows, {**rows[1], "tokens_per_s_per_gpu": "5000"}])
    assert _refused(tmp_path, capsys, p).startswith(f"{p}:7: error[K004] id: id 'b' is also the id of line 3")
    again = {**rows[1], "id": "b2", "tokens_per_s_per_gpu": f"{float(rows[1]['tokens_per_s_per_gpu']) * 1.01:.4f}"}
    assert len(ms.read_table(_write(tmp_path / "repeat.csv", [*rows, again]))) == len(rows) + 1


@pytest.mark.parametrize("how", ["bom", "cr", "crlf", "utf16", "semicolon", "tab", "decimal-comma"])
def test_spreadsheet_exports_read_as_the_plain_csv(tmp_path, how):
    rows = _rows(tmp_path)
    plain = ms.read_table(_write(tmp_path / "plain.csv", rows))
    fmt = {"bom": {"encoding": "utf-8-sig"}, "cr": {"lineterminator": "\r"}, "crlf": {"lineterminator": "\r\n"},
           "utf16": {"encoding": "utf-16"}, "semicolon": {"delimiter": ";"}, "tab": {"delimiter": "\t"},
           "decimal-comma": {"delimiter": ";"}}[how]
    if how == "decimal-comma":  # a German / French spreadsheet's export: ";" between cells, "," in numbers
        rows = [{k: v.replace(".", ",") if k in ("tokens_per_s_per_gpu", "mem_gib") else v for k, v in r.items()}
                for r in rows]
        assert "," in rows[0]["tokens_per_s_per_gpu"]
    got = ms.read_table(_write(tmp_path / f"{how}.csv", rows, **fmt))
    strip = [(m.label, m.plan, m.gpu, m.tokens_per_s_per_gpu, m.reserved_bytes) for m in plain]
    assert [(m.label, m.plan, m.gpu, m.tokens_per_s_per_gpu, m.reserved_bytes) for m in got] == strip


# ----------------------------------------------------------------------------------- calibration files

def _cal_file(tmp_path, **edit) -> str:
    import llmc
    from llmc.compiler.calibration import MemPoint, TimePoint, calibrate

    cal = calibrate("torchtitan", "h100-sxm", [TimePoint("a", 1.0, 0.1, 0.0, 1.2, 4096.0),
                                               TimePoint("b", 2.0, 0.3, 0.0, 2.5, 4096.0)],
                    [MemPoint("a", 40e9, 42e9), MemPoint("b", 50e9, 52e9)],
                    provenance={"llmc_version": llmc.__version__})
    d = cal.to_json()
    for k, v in edit.items():
        where, _, name = k.partition("__")
        (d[where] if name else d).__setitem__(name or where, v)
    p = tmp_path / "cal.json"
    p.write_text(json.dumps(d))
    return str(p)


@pytest.mark.parametrize("edit,field", [
    ({"factors__compute_scale": 125.0}, "factors.compute_scale"),
    ({"factors__comm_scale": 0.001}, "factors.comm_scale"),
    ({"factors__compute_size_exponent": 50.0}, "factors.compute_size_exponent"),
    ({"factors__mem_overhead_bytes": -1e12}, "factors.mem_overhead_bytes"),
    ({"time_band__mean_abs_pct": -5.0}, "time_band.mean_abs_pct")])
def test_an_out_of_range_calibration_is_refused_naming_the_field(tmp_path, edit, field):
    with pytest.raises(ms.MeasurementError) as e:
        ms.load_calibration(_cal_file(tmp_path, **edit))
    assert e.value.code == "K007" and e.value.path == field, e.value.located()


def test_a_calibration_of_another_llmc_version_is_a_warning(tmp_path, capsys):
    p = _cal_file(tmp_path)
    d = json.loads(open(p).read())
    d["provenance"]["llmc_version"] = "0.0.1"
    open(p, "w").write(json.dumps(d))
    assert ms.load_calibration(p).backend == "torchtitan"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ") and "0.0.1" in err[0], err


# ----------------------------------------------------------------------------------- a run no factor explains

def test_a_ten_times_typo_is_located_on_its_row(tmp_path, capsys):
    """One row's tokens/s typed 10x too high: its step is shorter than llmc's communication and optimizer time
    alone; the error names that row (its line), not every run."""
    rows = _rows(tmp_path)
    rows[2]["tokens_per_s_per_gpu"] = str(float(rows[2]["tokens_per_s_per_gpu"]) * 10)
    p = _write(tmp_path / "runs.csv", rows)
    line = _refused(tmp_path, capsys, p)
    assert line.startswith(f"{p}:4: error[K008] tokens_per_s_per_gpu: c: "), line


def test_a_run_the_others_do_not_explain_is_named_but_the_fit_stands(tmp_path, capsys):
    """One row's tokens/s 1.6x what the others' factors give (a typo, a run on other software): nothing is
    impossible, so the calibration is written, but the row is named in one warning with its leave-one-out error,
    recomputed here from factors fitted without it; a clean table names no run."""
    from llmc.compiler.calibration import fit_time, predict_step

    rows = _rows(tmp_path)
    assert ms.calibrate_main([str(_write(tmp_path / "clean.csv", rows))], str(tmp_path / "c0.json")) == 0
    assert "warning: run" not in capsys.readouterr().err
    rows[3]["tokens_per_s_per_gpu"] = str(float(rows[3]["tokens_per_s_per_gpu"]) * 1.6)
    p = _write(tmp_path / "runs.csv", rows)
    assert ms.calibrate_main([str(p)], str(tmp_path / "cal.json")) == 0
    warned = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning: run")]
    assert len(warned) == 1 and f"run {rows[3]['id']}:" in warned[0] and "tokens/s" in warned[0], warned
    tps, _ = ms.fit_points(ms.read_table(p))
    held = tps[3]
    cs, cm, g = fit_time(tps[:3] + tps[4:])
    err = 100 * (held.measured_s / predict_step(held, Factors(compute_scale=cs, comm_scale=cm,
                                                               compute_size_exponent=g)) - 1)
    # the others are llmc's own predictions under one set of factors, so the fit without the row recovers them and
    # the row's error is its typo alone: 1/1.6 - 1 in tokens/s
    assert err == pytest.approx(100 * (1 / 1.6 - 1), abs=0.01) and f"{err:+.1f}% off" in warned[0], (err, warned)


def test_an_nvfp4_run_is_predicted_with_its_own_bf16_tail(tmp_path):
    """An nvfp4 run that keeps 30% of its blocks in bf16 (training.nvfp4_bf16_tail 0.3), measured exactly at its
    lock's prediction: calibrate fits identity factors (it predicted the run with the default tail, 15%, and fitted
    compute_scale 0.93); a table row says its tail in the `nvfp4_bf16_tail` column, checked as the spec checks it."""
    text = ("name: n\nmodel: llama3-8b\nhardware: {gpu: gb200, count: 8}\ndata: {seq_len: 8192, tokens: 10B}\n"
            "training: {backend: torchtitan, precision: nvfp4, nvfp4_bf16_tail: 0.3, global_batch_tokens: 1048576}\n"
            "parallelism: {dp_shard: 8, tp: 1, pp: 1, micro_batch: 1, activation_checkpointing: none}\n")
    b, *_ = _built_text(tmp_path, text)
    out = tmp_path / "cal.json"
    assert ms.calibrate_main([str(b)], str(out)) == 0
    cal = Calibration.from_json(json.loads(out.read_text()))
    assert cal.factors.compute_scale == pytest.approx(1.0, abs=1e-6), cal.factors
    row = {"id": "r", "model": "llama3-8b", "gpus": 8, "seq_len": 8192, "dp_shard": 8, "micro_batch": 1,
           "global_batch": 128, "backend": "torchtitan", "gpu_key": "gb200", "precision": "nvfp4",
           "tokens_per_s_per_gpu": 1000}
    for tail, ok in (("0.3", True), ("1.5", False), ("none", False)):
        p = _write(tmp_path / f"t{tail}.csv", [{**row, "nvfp4_bf16_tail": tail}])
        if ok:
            (m,) = ms.read_table(p)
            assert m.nvfp4_bf16_tail == 0.3
        else:
            with pytest.raises(ms.MeasurementError, match="nvfp4_bf16_tail"):
                ms.read_table(p)
