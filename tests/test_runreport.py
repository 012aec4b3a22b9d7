"""Run report (llmc.runreport): synthetic metrics.jsonl against a real built lock -> PNGs + one
self-contained HTML page with predicted-vs-measured numbers."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from llmc.runreport import find_stages, make_report, predictions, read_metrics, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RED = (0xD6, 0x27, 0x28)  # matplotlib "C3", the prediction line colour


@pytest.fixture(scope="module")
def lock(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("build")
    subprocess.run([sys.executable, "-m", "llmc.cli", "build", str(ROOT / "examples/pipeline_tiny.yaml"), "-o",
                    str(out)], check=True, cwd=ROOT, capture_output=True)
    return json.loads((out / "plan.lock.json").read_text())


def write_run(run: Path, lock: dict, device: str = "cuda") -> dict:
    """pretrain: 41 steps, the first slow; the other 40 alternate 0.30/0.34 s (median 0.32), memory measured on
    ``device`` (the lock is for the CPU pseudo-device; "cuda": records as a GPU run of the plan writes them).
    sft: post-training records (loss only). Returns the independent expectations."""
    t = lock["time"]
    pre = run / "pretrain"
    pre.mkdir(parents=True)
    tokens_per_step = lock["hyper"]["global_batch_tokens"]
    lines = [json.dumps({"event": "start", "step": 0})]
    for s in range(1, 42):
        dt = 2.0 if s == 1 else (0.30 if s % 2 else 0.34)
        lines.append(json.dumps({
            "elapsed_s": s, "step": s, "loss": 7.5 * s ** -0.3, "lr": 1e-3, "grad_norm": 1.0,
            "tokens": s * tokens_per_step, "tokens_per_s": round(tokens_per_step / dt, 3),
            "mfu": t["mfu"] * t["step_seconds"] / dt, "peak_mem_bytes": 900_000_000 + 1000 * s,
            "peak_mem_device": device, "step_s": dt}))
    good = lines[5]
    lines[5] = lines[5].replace('"loss": ', '"loss": 99.0, "x": ')  # step 5 logged, then (after a resume)
    lines.insert(6, good)  # logged again: the later record is kept
    text = "\n".join(lines) + '\n{"step": 42, "lo'  # truncated last line (killed mid-write)
    (pre / "metrics.jsonl").write_text(text)
    sft = run / "sft"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text("\n".join(json.dumps({"stage": "sft", "step": s, "loss": 2.0 / s})
                                                 for s in range(1, 9)) + "\n")
    # steady state: the steps after llmc.measurements.WARMUP_STEPS (10), as llmc calibrate takes them: 11..41,
    # 16 odd steps at 0.30 s and 15 even ones at 0.34 s, so every median is the 0.30 s one
    return {"step_s": 0.30, "tokens_per_s": [tokens_per_step / 0.30] * 2, "mem": 900_000_000 + 41_000,
            "mfu": t["mfu"] * t["step_seconds"] / 0.30}


def red_pixels(png: Path) -> int:
    from PIL import Image

    raw = Image.open(png).convert("RGB").tobytes()
    return sum(1 for i in range(0, len(raw), 3) if all(abs(raw[i + k] - RED[k]) <= 12 for k in range(3)))


def test_report_pngs_html_and_table(tmp_path, lock):
    exp = write_run(tmp_path / "run", lock)
    paths = make_report(tmp_path / "run", lock, tmp_path / "report")
    names = [p.name for p in paths]
    assert names == ["pretrain-loss.png", "pretrain-throughput.png", "pretrain-memory.png", "pretrain-mfu.png",
                     "sft-loss.png", "report.html"]
    for p in paths[:-1]:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # predictions are drawn (dashed red) on throughput/memory/MFU; loss has none to draw
    assert red_pixels(paths[1]) > 50 and red_pixels(paths[2]) > 50 and red_pixels(paths[3]) > 50
    assert red_pixels(paths[0]) == 0

    page = paths[-1].read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(b) for b in embedded] == [p.read_bytes() for p in paths[:-1]]
    assert "<script" not in page and "http" not in page.split("<body>")[1]  # self-contained

    sm = read_metrics(tmp_path / "run/pretrain/metrics.jsonl")
    assert sm.steps == list(range(1, 42))
    assert 99.0 not in sm.columns["loss"]
    rows = {(r.stage, r.quantity): r for r in table([sm, read_metrics(tmp_path / "run/sft/metrics.jsonl")], lock)}
    st = rows["pretrain", "step time"]
    assert st.predicted == lock["time"]["step_seconds"] and st.measured == pytest.approx(exp["step_s"])
    assert st.ratio == pytest.approx(exp["step_s"] / lock["time"]["step_seconds"])
    tps = rows["pretrain", "throughput"]
    assert tps.predicted == lock["time"]["tokens_per_second"]
    assert tps.measured == pytest.approx(sum(exp["tokens_per_s"]) / 2, rel=1e-6)  # median of an even count
    assert rows["pretrain", "MFU"].measured == pytest.approx(exp["mfu"] * 100, rel=1e-6)
    # the allocated peak (what peak_mem_bytes measures) against the allocated prediction, not the must-fit figure
    # with the allocator's reserve and the CUDA context (a run matching the plan read 0.91x)
    mem = rows["pretrain", "peak memory per GPU, allocated"]
    assert mem.measured == pytest.approx(exp["mem"] / 2**30)
    assert mem.predicted == pytest.approx(lock["memory"]["allocated_bytes"] / 2**30)
    assert lock["memory"]["allocated_bytes"] < lock["memory"]["per_gpu_bytes"]
    sft_mem = rows["sft", "peak memory per GPU, must-fit"]
    assert sft_mem.measured is None
    assert sft_mem.predicted == pytest.approx(next(s for s in lock["stages"] if s["name"] == "sft")["memory"]
                                              ["per_gpu_bytes"] / 2**30)
    sft_time = next(s for s in lock["stages"] if s["name"] == "sft").get("time") or {}
    # a stage's own predicted step (the lock's stages[i].time), not pre-training's
    assert rows["sft", "step time"].predicted == sft_time.get("step_seconds")
    assert f"{lock['time']['step_seconds']:,.3f}" in page and f"{exp['step_s'] / lock['time']['step_seconds']:.2f}" in page


def test_a_cpu_runs_rss_is_shown_not_compared_with_the_gpu_prediction(tmp_path, lock):
    """On a CPU, peak_mem_bytes is the process's peak RSS: the table shows it without a prediction or a ratio and
    the memory plot draws no prediction line; throughput is still compared."""
    exp = write_run(tmp_path / "run", lock, device="cpu")
    paths = make_report(tmp_path / "run", lock, tmp_path / "report")
    rows = {(r.stage, r.quantity): r for r in table([read_metrics(tmp_path / "run/pretrain/metrics.jsonl")], lock)}
    rss = rows["pretrain", "peak process RSS (CPU run, not GPU memory)"]
    assert rss.measured == pytest.approx(exp["mem"] / 2**30) and rss.predicted is None and rss.ratio is None
    assert not any(q.startswith("peak memory per GPU") for _, q in rows)
    assert rows["pretrain", "throughput"].ratio is not None
    assert red_pixels(next(p for p in paths if p.name == "pretrain-memory.png")) == 0
    # records written before peak_mem_device: the lock's hardware (the CPU) says what was measured
    pre = tmp_path / "run/pretrain/metrics.jsonl"
    pre.write_text(pre.read_text().replace(', "peak_mem_device": "cpu"', ""))
    assert read_metrics(pre).mem_device is None and read_metrics(pre).host_memory(lock)


def test_stage_order_single_dir_and_missing(tmp_path, lock):
    write_run(tmp_path / "run", lock)
    assert [n for n, _ in find_stages(tmp_path / "run", lock)] == ["pretrain", "sft"]
    assert [n for n, _ in find_stages(tmp_path / "run" / "sft", lock)] == ["sft"]
    only = make_report(tmp_path / "run" / "pretrain", lock, tmp_path / "r1")
    assert [p.name for p in only][-1] == "report.html" and len(only) == 5
    dpo = next((s for s in lock["stages"] if s["name"] == "dpo"), None)
    assert predictions(lock, "dpo").step_seconds == ((dpo or {}).get("time") or {}).get("step_seconds")
    with pytest.raises(FileNotFoundError):
        make_report(tmp_path / "empty", lock, tmp_path / "r2")


ORANGE = (0xFF, 0x7F, 0x0E)  # matplotlib "C1", the validation line colour


def test_validation_loss_and_eval_results_in_the_report_and_summary(tmp_path, lock):
    """Validation records every 10 steps (merged into the step records) and an eval summary.json, as the
    runtime writes them, show up in the loss plot, the HTML tables and ``summary_lines``."""
    import math

    from llmc.runreport import read_evals, summary_lines

    write_run(tmp_path / "run", lock)
    pre = tmp_path / "run" / "pretrain"
    val = {s: 6.0 - 0.05 * s for s in (10, 20, 30, 40)}
    text = (pre / "metrics.jsonl").read_text()
    text = text[: text.rindex("\n") + 1]  # without the torn last line
    (pre / "metrics.jsonl").write_text(text)
    with (pre / "metrics.jsonl").open("a") as f:  # validation records after the step records
        f.write("".join(json.dumps({"step": s, "val_loss": v, "val_ppl": math.exp(v), "val_tokens": 512}) + "\n"
                               for s, v in val.items()))
    (pre / "eval").mkdir()
    (pre / "eval" / "summary.json").write_text(json.dumps({
        "tasks": {"pydoc_mc": {"acc": 0.625, "acc_stderr": 0.1, "acc_norm": 0.5, "sample_len": 24.0}}, "samples": {"pydoc_mc": 24}}))
    sm = read_metrics(pre / "metrics.jsonl")
    steps, vals = sm.series("val_loss")
    assert steps == [10, 20, 30, 40] and vals == [val[s] for s in steps]
    assert sm.series("loss")[0] == list(range(1, 42))  # the training records are kept at those steps

    lines = summary_lines(tmp_path / "run", lock)
    assert lines[0] == (f"pretrain: validation loss {val[10]:.4f} -> {val[40]:.4f} "
                        f"(ppl {math.exp(val[10]):.1f} -> {math.exp(val[40]):.1f}), steps 10 -> 40")
    assert lines[1] == "pretrain: eval pydoc_mc: acc 0.6250 ± 0.1000, acc_norm 0.5000 (24 documents)"
    assert len(lines) == 2  # sft has neither
    # a summary that records how the prompts were made (lm_eval's n-shot, the chat template) says so, as the eval
    # step's own line does
    (pre / "eval" / "summary.json").write_text(json.dumps({
        "tasks": {"pydoc_mc": {"acc": 0.625, "acc_norm": 0.5}}, "samples": {"pydoc_mc": 24},
        "n_shot": {"pydoc_mc": 0}, "apply_chat_template": True}))
    assert summary_lines(tmp_path / "run", lock)[1] == \
        "pretrain: eval pydoc_mc: acc 0.6250, acc_norm 0.5000 (24 documents, 0-shot, chat template)"
    assert read_evals(tmp_path / "run" / "pretrain", lock)[0].tasks["pydoc_mc"]["acc"] == 0.625

    paths = make_report(tmp_path / "run", lock, tmp_path / "report")
    page = paths[-1].read_text()
    assert "<h2>Validation</h2>" in page and f"{val[10]:.4f} &rarr; {val[40]:.4f}" in page
    assert "<td>pydoc_mc</td><td>acc</td><td>0.6250</td><td>24</td>" in page and "acc_stderr" not in page

    from PIL import Image

    def orange(png):
        raw = Image.open(png).convert("RGB").tobytes()
        return sum(1 for i in range(0, len(raw), 3) if all(abs(raw[i + k] - ORANGE[k]) <= 12 for k in range(3)))

    assert orange(tmp_path / "report" / "pretrain-loss.png") > 50  # the validation curve
    assert orange(tmp_path / "report" / "sft-loss.png") == 0


def test_validation_losses_of_different_formats_are_labelled_not_compared(tmp_path, lock):
    """native / DeepSpeed validate on llmc's EOS-joined windows ("llmc-packed"), torchtitan's job on its own BOS +
    document windows ("torchtitan-documents"): a model scores differently in the two, so the summary and the HTML
    name each stage's format and say the losses do not compare when the stages' formats differ."""
    from llmc.runreport import summary_lines

    write_run(tmp_path / "run", lock)
    for stage, fmt, v in (("pretrain", "torchtitan-documents", 4.5), ("sft", "llmc-packed", 3.9)):
        m = tmp_path / "run" / stage / "metrics.jsonl"
        text = m.read_text()
        m.write_text(text[: text.rindex("\n") + 1]  # (without a torn last line)
                     + json.dumps({"step": 2, "val_loss": v, "val_tokens": 512, "val_format": fmt}) + "\n")
    lines = summary_lines(tmp_path / "run", lock)
    assert [ln for ln in lines if ln.startswith("pretrain: validation loss")][0].endswith("[torchtitan-documents]")
    assert [ln for ln in lines if ln.startswith("sft: validation loss")][0].endswith("[llmc-packed]")
    (note,) = [ln for ln in lines if ln.startswith("note:")]
    assert "pretrain: torchtitan-documents" in note and "sft: llmc-packed" in note and "not across them" in note
    page = make_report(tmp_path / "run", lock, tmp_path / "report")[-1].read_text()
    assert "measured in different formats" in page and "<td>torchtitan-documents</td>" in page
    # one format: labelled, no note
    (tmp_path / "run" / "sft" / "metrics.jsonl").write_text(
        (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().replace("llmc-packed", "torchtitan-documents"))
    assert not [ln for ln in summary_lines(tmp_path / "run", lock) if ln.startswith("note:")]


def test_checkpoint_evals_table_plot_and_summary(tmp_path, lock):
    """Checkpoint evals (``eval/step-N/summary.json`` as the eval step writes them) beside the final export's
    summary: one column per step then the final one (at the stage's last step from the lock), a plot, and a
    summary line per metric; unreadable files and stderr entries are left out."""
    from llmc.runreport import read_checkpoint_evals, summary_lines

    write_run(tmp_path / "run", lock)
    pre = tmp_path / "run" / "pretrain"
    acc = {20: 0.25, 10: 0.125, 30: 0.5}  # written out of order; read back by step
    for n, a in acc.items():
        (pre / f"eval/step-{n}").mkdir(parents=True)
        (pre / f"eval/step-{n}/summary.json").write_text(json.dumps(
            {"step": n, "tasks": {"mc": {"acc": a, "acc_stderr": 0.1}}, "samples": {"mc": 8}}))
    (pre / "eval/step-40").mkdir()
    (pre / "eval/step-40/summary.json").write_text("{not json")
    (pre / "eval/summary.json").write_text(json.dumps({"tasks": {"mc": {"acc": 0.75}}, "samples": {"mc": 8}}))
    last = next(s["steps"] for s in lock["stages"] if s["name"] == "pretrain")

    ck = read_checkpoint_evals(tmp_path / "run", lock)
    assert list(ck) == ["pretrain"] and [e.step for e in ck["pretrain"]] == [10, 20, 30]
    assert read_checkpoint_evals(pre, lock)["pretrain"][1].tasks["mc"]["acc"] == 0.25  # a stage dir alone
    assert (f"pretrain: eval mc acc by step: 10 0.1250, 20 0.2500, 30 0.5000, final ({last}) 0.7500"
            in summary_lines(tmp_path / "run", lock))
    paths = make_report(tmp_path / "run", lock, tmp_path / "report")
    assert [p.name for p in paths][-2:] == ["pretrain-evals.png", "report.html"]
    page = paths[-1].read_text()
    assert f"<th>10</th><th>20</th><th>30</th><th>final ({last})</th>" in page
    assert "<td>mc</td><td>acc</td><td>0.125</td><td>0.250</td><td>0.500</td><td>0.750</td>" in page
    from PIL import Image

    img = Image.open(tmp_path / "report" / "pretrain-evals.png").convert("RGB")
    blue = (0x1F, 0x77, 0xB4)  # matplotlib "C0": the one metric's line
    raw = img.tobytes()
    assert sum(1 for i in range(0, len(raw), 3) if all(abs(raw[i + k] - blue[k]) <= 12 for k in range(3))) > 50


@pytest.mark.parametrize("damage", ["[1, 2]", "{not json"])
def test_a_damaged_metrics_line_is_one_located_error(tmp_path, damage):
    """A line in the middle of metrics.jsonl that is not a JSON object (a torn last line is dropped, see
    write_run) made `llmc report` end in an INTERNAL error; it is one L012 line naming the file and line."""
    b = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "build", str(ROOT / "examples/tiny_cpu.yaml"), "-o", str(b)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = b / "run" / "pretrain" / "metrics.jsonl"
    m.parent.mkdir(parents=True)
    m.write_text('{"step": 1, "loss": 3.0}\n' + damage + '\n{"step": 2, "loss": 2.9}\n')
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "report", str(b)], cwd=tmp_path, capture_output=True,
                       text=True)
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(err) == 1, r.stderr
    assert err[0].startswith("b/run/pretrain/metrics.jsonl:2: error[L012] metrics record not a JSON"), err


@pytest.mark.parametrize("summary,why", [
    ('{"tasks": [1, 2]}', "its 'tasks' is not an object (task -> metrics)"),
    ('{"tasks": "x"}', "its 'tasks' is not an object (task -> metrics)"),
    ('{"tasks": {"a": {"acc": 1}}, "samples": [1]}', "its 'samples' is not an object (task -> documents)"),
    ("[1]", "it is not a JSON object"),
    ("{not json", "it is not valid JSON"),
])
def test_a_malformed_eval_summary_is_left_out_with_one_warning(tmp_path, lock, summary, why):
    """An eval summary.json whose tasks or samples are not objects was an AttributeError (error[INTERNAL] in
    `llmc report`); it is left out of the report, like an unreadable one, and summary_lines says so in one
    warning line (in ``skipped`` when the caller passes a list, for stderr)."""
    from llmc.runreport import read_evals, summary_lines

    write_run(tmp_path / "run", lock)
    s = tmp_path / "run" / "pretrain" / "eval" / "summary.json"
    s.parent.mkdir()
    s.write_text(summary)
    want = f"{s}: warning[L013] eval summary left out of the report: {why} (restore it, or delete it and rerun the eval)"
    assert read_evals(tmp_path / "run", lock) == []
    assert summary_lines(tmp_path / "run", lock) == [want]
    skipped: list[str] = []
    assert summary_lines(tmp_path / "run", lock, skipped) == [] and skipped == [want]
    assert make_report(tmp_path / "run", lock, tmp_path / "report")[-1].name == "report.html"


def test_values_beyond_a_float_or_an_axis_are_left_out(tmp_path, lock):
    """A metric of 400 digits was an OverflowError; values near 1e308 made matplotlib print RuntimeWarnings and
    then fail ("arange: cannot compute length"). Such values, NaN and infinities are left out like missing ones:
    no warning, no error, the other values kept."""
    import warnings

    from llmc.runreport import predictions, read_evals, summary_lines

    pre = tmp_path / "run" / "pretrain"
    pre.mkdir(parents=True)
    (pre / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 1e308, "tokens_per_s": 1.7e308, "mfu": Infinity}\n'
        '{"step": 2, "loss": -1e308, "tokens_per_s": 5.0, "mfu": NaN}\n'
        '{"step": 3, "loss": 2.0, "peak_mem_bytes": 1' + "0" * 400 + "}\n"
        '{"step": 1' + "0" * 400 + ', "loss": 1.0}\n')
    for step, acc in ((5, "1e308"), (7, "0.25")):
        (pre / f"eval/step-{step}").mkdir(parents=True)
        (pre / f"eval/step-{step}/summary.json").write_text('{"tasks": {"a": {"acc": ' + acc + "}}}")
    (pre / "eval/summary.json").write_text(
        '{"tasks": {"a": {"acc": -1e308, "b": 1' + "0" * 400 + ', "c": 0.5}}, "samples": {"a": 1' + "0" * 400 + "}}")
    edited = {**lock, "time": {**lock["time"], "mfu": 1e300}}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        paths = make_report(tmp_path / "run", edited, tmp_path / "report")
        lines = summary_lines(tmp_path / "run", edited)
    assert [p.name for p in paths] == ["pretrain-loss.png", "pretrain-throughput.png", "pretrain-evals.png",
                                       "report.html"]
    sm = read_metrics(pre / "metrics.jsonl")
    assert sm.steps == [1, 2, 3] and sm.series("loss") == ([3], [2.0]) and sm.series("tokens_per_s") == ([2], [5.0])
    assert "mfu" not in sm.columns and "peak_mem_bytes" not in sm.columns
    ev = read_evals(tmp_path / "run", lock)[0]
    assert ev.tasks == {"a": {"c": 0.5}} and ev.samples == {}
    assert predictions(edited, "pretrain").mfu is None
    last = next(s["steps"] for s in lock["stages"] if s["name"] == "pretrain")
    assert lines == ["pretrain: eval a: c 0.5000", "pretrain: eval a acc by step: 7 0.2500",
                     f"pretrain: eval a c by step: final ({last}) 0.5000"]


def test_cli_report_on_a_malformed_summary_says_so_without_a_traceback(tmp_path):
    """`llmc report` on a build whose summary.json has ``tasks: [1, 2]`` ended in error[INTERNAL]: the report is
    written, the summary named in a warning line, exit 0."""
    b = tmp_path / "b"
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "build", str(ROOT / "examples/tiny_cpu.yaml"), "-o", str(b)],
                       cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    pre = b / "run" / "pretrain"
    (pre / "eval").mkdir(parents=True)
    (pre / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.9}\n')
    (pre / "eval" / "summary.json").write_text('{"tasks": [1, 2]}')
    r = subprocess.run([sys.executable, "-m", "llmc.cli", "report", str(b)], cwd=tmp_path, capture_output=True,
                       text=True)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "INTERNAL" not in r.stderr, r.stderr
    assert f"{pre.resolve() / 'eval' / 'summary.json'}: warning[L013] eval summary left out" in r.stdout + r.stderr


def test_the_eval_steps_line_gives_each_score_with_its_standard_error_and_the_documents():
    """lm-evaluation-harness reports a score, its ``<score>_stderr`` and ``sample_len`` (the documents evaluated): the
    eval step's log line pairs each score with its standard error and counts the documents instead of printing
    sample_len and the errors as scores of their own."""
    from llmc.runtime.metrics_io import score_line

    m = {"acc": 0.625, "acc_stderr": 0.1, "acc_norm": 0.5, "acc_norm_stderr": 0.125, "sample_len": 24.0,
         "bits_per_byte": 1.5}
    assert score_line(m, 24) == "acc 0.6250 ± 0.1000, acc_norm 0.5000 ± 0.1250, bits_per_byte 1.5000 (24 documents)"
    assert score_line({"acc": 1.0}) == "acc 1.0000"
    # how the documents were prompted, where the eval step knows it (its summary.json's n_shot, apply_chat_template)
    assert score_line({"acc": 0.875}, 24, 0, True) == "acc 0.8750 (24 documents, 0-shot, chat template)"
    assert score_line({"acc": 0.875}, 24, 5) == "acc 0.8750 (24 documents, 5-shot)"
