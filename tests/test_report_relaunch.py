"""`llmc report` and `llmc calibrate` on real-size, relaunched runs: the records since a relaunch under the lock
(llmc.runtime.metrics_io.since_relaunch), set-aside stage folders left out (llmc.fileio.is_set_aside), and a
metrics.jsonl read one line at a time."""

from __future__ import annotations

import json
import statistics
import tracemalloc
from pathlib import Path

import pytest

from llmc import measurements as ms
from llmc.compiler.compile import compile_spec
from llmc.emit.lock import lock_text
from llmc.fileio import is_set_aside, set_aside, set_aside_target
from llmc.runtime import metrics_io
from llmc.spec.load import loads_spec

SPEC = """\
name: t
model: tiny
hardware: {{gpu: cpu, count: {count}}}
data: {{seq_len: 128, tokens: 2.048M}}
training: {{global_batch_tokens: 4096, precision: fp32, steps: 4000}}
"""


def _lock(count: int) -> dict:
    text = SPEC.format(count=count)
    run, lines = loads_spec(text, file="spec.yaml")
    return json.loads(lock_text(compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())))


@pytest.fixture(scope="module")
def locks() -> tuple[dict, dict]:
    """(the 1-process build's lock, the 2-process rebuild's): two specs, two world sizes."""
    one, two = _lock(1), _lock(2)
    assert one["spec"]["sha256"] != two["spec"]["sha256"] and (one["plan"]["dp_shard"], two["plan"]["dp_shard"]) == (1, 2)
    return one, two


def _rec(step: int, tps: float, mem: int) -> dict:
    """A step record as llmc's trainers write it (llmc.runtime.metrics.step_record's fields)."""
    return {"elapsed_s": step * 0.3, "step": step, "loss": 3.0, "lr": 1e-3, "grad_norm": 0.5, "tokens": step * 4096,
            "tokens_per_s": tps, "mfu": 0.01, "peak_mem_bytes": mem, "peak_mem_device": "cuda",
            "step_s": 4096 / tps}


def _start(sha: str, resumed_from: int | None) -> dict:
    """The start event llmc.runtime.observe.open_stage_log writes."""
    return {"elapsed_s": 0.0, "event": "start", "backend": "native", "resumed_from": resumed_from,
            "spec_sha256": sha, "software": {"torch": "2.6.0"}}


def _write(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _relaunched(build: Path, locks) -> tuple[list[dict], list[dict]]:
    """``build``: the 2-process rebuild, whose run trained 240 records (steps 10..2400, 7,000 tokens/s, 1.8x the
    planned memory) under the 1-process spec, then was resumed under this lock at step 2400: 160 records at 13,000
    tokens/s, 1.2x (a wobble in each, so a median of the wrong records would show). Returns (before, after)."""
    one, two = locks
    build.mkdir(parents=True, exist_ok=True)
    (build / "plan.lock.json").write_text(json.dumps(two))
    planned = two["memory"]["allocated_bytes"]
    before = [_rec(s, 7000.0 + s % 3, int(1.8 * planned)) for s in range(10, 2401, 10)]
    after = [_rec(s, 13000.0 + s % 7, int(1.2 * planned) + s) for s in range(2410, 4001, 10)]
    _write(build / "run/pretrain/metrics.jsonl", [_start(one["spec"]["sha256"], None), *before,
                                                 _start(two["spec"]["sha256"], 2400), *after])
    return before, after


NOTE = ("measured 1,600 steps since the relaunch under this lock at step 2,400; 2,400 earlier steps were trained "
        "under another spec (sha256 {sha}) and are not compared")


def test_calibrate_fits_only_the_records_since_the_relaunch(tmp_path, locks, capsys):
    one, two = locks
    _, after = _relaunched(tmp_path / "b6", locks)
    m = ms.read_llmc_run(tmp_path / "b6")
    # independently: the median of the post-relaunch records' tokens/s (all past the warm-up), over the 2 processes
    assert m.tokens_per_s_per_gpu == pytest.approx(statistics.median(r["tokens_per_s"] for r in after) / 2)
    assert m.allocated_bytes == max(r["peak_mem_bytes"] for r in after)  # not the 1-process layout's
    # the fit equals the one from a file holding only the post-relaunch records (no start events at all) ...
    before = [r for r in (json.loads(x) for x in (tmp_path / "b6/run/pretrain/metrics.jsonl").read_text().splitlines())
              if "event" not in r and r["step"] <= 2400]
    for name, recs in (("alone", after), ("mixed", before + after)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "plan.lock.json").write_text(json.dumps(two))
        _write(tmp_path / name / "run/pretrain/metrics.jsonl", recs)
        assert ms.calibrate_main([str(tmp_path / name)], str(tmp_path / f"{name}.json")) == 0
    assert ms.calibrate_main([str(tmp_path / "b6")], str(tmp_path / "cal6.json")) == 0
    out = capsys.readouterr().out
    assert f"metrics.jsonl: note: {NOTE.format(sha=one['spec']['sha256'][:12])}\n" in out
    got, alone, mixed = (json.loads((tmp_path / f).read_text())["factors"]
                         for f in ("cal6.json", "alone.json", "mixed.json"))
    assert (got["compute_scale"], got["mem_scale"]) == pytest.approx((alone["compute_scale"], alone["mem_scale"]),
                                                                     rel=1e-9)
    # ... not the one of every record (the two layouts' steps mixed: the 1-process run's 7,000 tokens/s, its memory)
    assert mixed["compute_scale"] < 0.7 * got["compute_scale"] and mixed["mem_scale"] > 1.4 * got["mem_scale"]


def test_report_measures_the_records_since_the_relaunch(tmp_path, locks):
    from llmc.runreport import make_report, read_metrics, summary_lines, table

    one, two = locks
    before, after = _relaunched(tmp_path / "b6", locks)
    run = tmp_path / "b6/run"
    note = NOTE.format(sha=one["spec"]["sha256"][:12])
    assert f"pretrain: {note}" in summary_lines(run, two)
    sm = read_metrics(run / "pretrain/metrics.jsonl", "pretrain", two["spec"]["sha256"])
    rows = {r.quantity: r for r in table([sm], two)}
    assert rows["throughput"].measured == statistics.median(r["tokens_per_s"] for r in after)
    assert rows["throughput"].predicted == pytest.approx(two["time"]["tokens_per_second"])
    assert rows["step time"].measured == statistics.median(r["step_s"] for r in after)
    assert rows["peak memory per GPU, allocated"].measured == max(r["peak_mem_bytes"] for r in after) / 2**30
    # the loss curve still has every step; only the comparison is cut
    assert sm.series("loss")[0] == [r["step"] for r in before + after]
    page = make_report(run, two, tmp_path / "rep")[-1].read_text()
    assert f"<p>pretrain: {note}.</p>" in page
    # read without the lock's hash (or with a file whose starts name no spec): every record, as before
    assert read_metrics(run / "pretrain/metrics.jsonl").note() is None
    assert statistics.median(read_metrics(run / "pretrain/metrics.jsonl").steady("tokens_per_s")) < 8000


def test_since_relaunch_rule():
    a, b = "a" * 64, "b" * 64

    def ev(*starts):
        return [(i, {"event": "start", **s}) for i, s in starts]

    assert metrics_io.since_relaunch([], b) is None  # an older run: no start events
    assert metrics_io.since_relaunch(ev((1, {}), (9, {"resumed_from": 4})), b) is None  # starts naming no spec
    assert metrics_io.since_relaunch(ev((1, {"spec_sha256": b})), b) is None  # one lock throughout
    assert metrics_io.since_relaunch(ev((1, {"spec_sha256": a})), None) is None  # no lock hash to compare
    # two relaunches under the lock after the other spec's: measured from the first
    r = metrics_io.since_relaunch(ev((1, {"spec_sha256": a}), (50, {"spec_sha256": b, "resumed_from": 40}),
                                     (90, {"spec_sha256": b, "resumed_from": 80})), b)
    assert (r.line, r.step, r.other_line, r.other_sha256) == (50, 40, 1, a)
    assert not r.measured(50) and r.measured(51)
    # the lock's spec, then another's, then the lock's again: only the last stretch
    r = metrics_io.since_relaunch(ev((1, {"spec_sha256": b}), (20, {"spec_sha256": a, "resumed_from": 10}),
                                     (30, {"spec_sha256": b, "resumed_from": 20})), b)
    assert (r.line, r.step) == (30, 20)
    # rebuilt but not relaunched: nothing was trained under this lock
    r = metrics_io.since_relaunch(ev((1, {"spec_sha256": b}), (20, {"spec_sha256": a})), b)
    assert r.line is None and not r.measured(10**6)
    assert r.note(None, 300).startswith("measured no steps under this lock")


def test_not_relaunched_under_the_lock(tmp_path, locks, capsys):
    """The lock rebuilt under a run that has not been launched since: calibrate refuses it (K001, one line at the
    other spec's start event), the report compares nothing."""
    from llmc.runreport import read_metrics, summary_lines, table

    one, two = locks
    (tmp_path / "plan.lock.json").write_text(json.dumps(two))
    _write(tmp_path / "run/pretrain/metrics.jsonl", [_start(one["spec"]["sha256"], None),
                                                      *[_rec(s, 7000.0, two["memory"]["allocated_bytes"])
                                                        for s in range(10, 201, 10)]])
    assert ms.calibrate_main([str(tmp_path)], str(tmp_path / "cal.json")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ":1: error[K001] metrics.jsonl: measured no steps under this lock" in err[0]
    assert "its 200 steps are not compared" in err[0] and not (tmp_path / "cal.json").exists()
    sm = read_metrics(tmp_path / "run/pretrain/metrics.jsonl", "pretrain", two["spec"]["sha256"])
    assert {r.quantity: r.measured for r in table([sm], two)}["throughput"] is None
    assert any("measured no steps under this lock" in line for line in summary_lines(tmp_path / "run", two))


def test_fresh_start_under_the_lock_after_another_spec(tmp_path, locks):
    """A relaunch from step 0 appends to the old file (no checkpoint to resume): the old run's records of the steps
    not trained again stay in it, and are not compared."""
    from llmc.runreport import read_metrics, table

    one, two = locks
    (tmp_path / "plan.lock.json").write_text(json.dumps(two))
    new = [_rec(s, 13000.0, 2**30) for s in range(10, 301, 10)]
    _write(tmp_path / "run/pretrain/metrics.jsonl", [_start(one["spec"]["sha256"], None),
                                                      *[_rec(s, 7000.0, 2**30) for s in range(10, 1001, 10)],
                                                      _start(two["spec"]["sha256"], None), *new])
    assert ms.read_llmc_run(tmp_path).tokens_per_s_per_gpu == 13000.0 / 2
    sm = read_metrics(tmp_path / "run/pretrain/metrics.jsonl", "pretrain", two["spec"]["sha256"])
    assert {r.quantity: r.measured for r in table([sm], two)}["throughput"] == 13000.0
    assert sm.note().startswith("measured 300 steps since the relaunch under this lock (a fresh start")


# ---------------------------------------------------------------- set-aside stage folders


def test_is_set_aside_matches_what_set_aside_names(tmp_path):
    d = tmp_path / "pretrain"
    for _ in range(3):
        d.mkdir()
        (d / "f").write_text("x")
        moved = set_aside(d)
        assert is_set_aside(moved.name)
    (tmp_path / "pretrain.set-aside-3").mkdir(exist_ok=True)
    d.mkdir()
    (d / "f").write_text("x")
    assert set_aside_target(d).name == "pretrain.set-aside-4" and is_set_aside("pretrain.set-aside-4")
    for name in ("pretrain", "pretrain.set-aside-", "pretrain.set-aside-x", ".set-aside-1", "set-aside-1",
                 "pretrain.set-aside-1b", "pretrain.set-aside-\u00b2"):
        assert not is_set_aside(name), name


def test_report_leaves_set_aside_runs_out(tmp_path, locks):
    from llmc.runreport import find_stages, read_checkpoint_evals, read_evals, summary_lines

    _, lock = locks
    run = tmp_path / "run"
    summary = {"tasks": {"mc": {"acc": 0.5}}, "samples": {"mc": 24}}
    for name in ["pretrain", "old", *(f"pretrain.set-aside-{n}" for n in range(1, 13))]:
        _write(run / name / "metrics.jsonl", [{"step": s, "loss": 3.0, "val_loss": 3.5, "val_ppl": 33.0}
                                              for s in (100, 200)])
        _write(run / name / "eval/summary.json", [])
        (run / name / "eval/summary.json").write_text(json.dumps(summary))
        (run / name / "eval/step-100").mkdir()
        (run / name / "eval/step-100/summary.json").write_text(json.dumps(summary))
    # the lock's stage first, then a stage folder the lock no longer has (by name); no set-aside run
    assert [n for n, _ in find_stages(run, lock)] == ["pretrain", "old"]
    assert [e.stage for e in read_evals(run, lock)] == ["pretrain", "old"]
    assert list(read_checkpoint_evals(run, lock)) == ["pretrain", "old"]
    lines = summary_lines(run, lock)
    assert [line.split(":")[0] for line in lines if "validation loss" in line] == ["pretrain", "old"]
    # a stage the lock names is reported whatever its name
    odd = {"stages": [{"name": "pretrain.set-aside-1", "order": 0, "kind": "pretrain"}]}
    assert [n for n, _ in find_stages(run, odd)] == ["pretrain.set-aside-1", "old", "pretrain"]


# ---------------------------------------------------------------- reading a long metrics.jsonl


def _long(path: Path, n: int) -> Path:
    return _write(path, [_rec(s, 13000.0 + s % 13, 2**30 + s) for s in range(1, n + 1)])


def _peak_per_line(fn, small: Path, large: Path, extra: int) -> float:
    """Bytes of traced peak memory ``fn`` needs per line of ``large`` beyond ``small`` (``extra`` more lines)."""
    peaks = []
    for p in (small, large):
        fn(p)  # (imports and caches first)
        tracemalloc.start()
        try:
            fn(p)
            peaks.append(tracemalloc.get_traced_memory()[1])
        finally:
            tracemalloc.stop()
    return (peaks[1] - peaks[0]) / extra


def test_long_metrics_are_read_a_line_at_a_time(tmp_path, locks, monkeypatch):
    """A record held as json builds it costs ~1.5 KB, its line's bytes and text ~0.6 KB more: a month's metrics
    (400k lines) took over 1 GB. The reader streams; the report keeps a dozen fields of each step under shared keys,
    calibrate two figures; truncating keeps nothing."""
    import llmc.lockfile
    from llmc.runreport import read_metrics

    _, lock = locks
    small, large = (_long(tmp_path / f"{n}/run/pretrain/metrics.jsonl", n) for n in (4000, 12000))
    for p in (small, large):
        (p.parents[2] / "plan.lock.json").write_text(json.dumps(lock))
    line = large.stat().st_size / 12000
    # (the file readers' buffer is sized to their limit up front: small limits, so the peak is the parse's)
    monkeypatch.setattr(ms, "MAX_INPUT_BYTES", 4 * 2**20)
    monkeypatch.setattr(llmc.lockfile, "MAX_LOCK_BYTES", 2**20)
    assert _peak_per_line(lambda p: read_metrics(p), small, large, 8000) < 900
    assert _peak_per_line(lambda p: ms.read_llmc_run(p), small, large, 8000) < line + 500
    assert _peak_per_line(lambda p: sum(1 for _ in metrics_io.iter_records(p)), small, large, 8000) < 5
    assert _peak_per_line(lambda p: metrics_io.truncate_after_step(p, 10**6 - 1), small, large, 8000) < 5


def test_truncate_keeps_the_lines_byte_for_byte(tmp_path):
    """(A guard on the streamed rewrite.) The lines a resume keeps are written back as they were, escapes, spacing
    and line ends included, and a last record without its newline gets one; a torn last line goes."""
    path = tmp_path / "metrics.jsonl"
    keep = b'{"event": "start", "note": "caf\\u00e9 \xc3\xa9"}\r\n{"step":1,  "loss": 2.0}\n'
    path.write_bytes(keep + b'{"step": 2, "loss": 1.0}\n{"step": 3, "loss": 0.5}\n{"step": 4, "lo')
    assert metrics_io.truncate_after_step(path, 1) == 2
    assert path.read_bytes() == keep
    path.write_bytes(keep.rstrip(b"\n"))
    assert metrics_io.truncate_after_step(path, 0) == 1
    assert path.read_bytes() == keep.split(b"\n")[0] + b"\n"
