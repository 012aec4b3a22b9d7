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


def write_run(run: Path, lock: dict) -> dict:
    """pretrain: 41 steps, the first slow; the other 40 alternate 0.30/0.34 s (median 0.32).
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
            "mfu": t["mfu"] * t["step_seconds"] / dt, "peak_mem_bytes": 900_000_000 + 1000 * s, "step_s": dt}))
    good = lines[5]
    lines[5] = lines[5].replace('"loss": ', '"loss": 99.0, "x": ')  # step 5 logged, then (after a resume)
    lines.insert(6, good)  # logged again: the later record is kept
    text = "\n".join(lines) + '\n{"step": 42, "lo'  # truncated last line (killed mid-write)
    (pre / "metrics.jsonl").write_text(text)
    sft = run / "sft"
    sft.mkdir()
    (sft / "metrics.jsonl").write_text("\n".join(json.dumps({"stage": "sft", "step": s, "loss": 2.0 / s})
                                                 for s in range(1, 9)) + "\n")
    return {"step_s": 0.32, "tokens_per_s": sorted([tokens_per_step / 0.30, tokens_per_step / 0.34]),
            "mem": 900_000_000 + 41_000,
            "mfu": (t["mfu"] * t["step_seconds"] / 0.30 + t["mfu"] * t["step_seconds"] / 0.34) / 2}


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
    mem = rows["pretrain", "peak memory per GPU"]
    assert mem.measured == pytest.approx(exp["mem"] / 2**30)
    assert mem.predicted == pytest.approx(lock["stages"][0]["memory"]["per_gpu_bytes"] / 2**30)
    sft_mem = rows["sft", "peak memory per GPU"]
    assert sft_mem.measured is None
    assert sft_mem.predicted == pytest.approx(next(s for s in lock["stages"] if s["name"] == "sft")["memory"]
                                              ["per_gpu_bytes"] / 2**30)
    assert rows["sft", "step time"].predicted is None  # the lock's time block is the pre-training plan's
    assert f"{lock['time']['step_seconds']:,.3f}" in page and f"{exp['step_s'] / lock['time']['step_seconds']:.2f}" in page


def test_stage_order_single_dir_and_missing(tmp_path, lock):
    write_run(tmp_path / "run", lock)
    assert [n for n, _ in find_stages(tmp_path / "run", lock)] == ["pretrain", "sft"]
    assert [n for n, _ in find_stages(tmp_path / "run" / "sft", lock)] == ["sft"]
    only = make_report(tmp_path / "run" / "pretrain", lock, tmp_path / "r1")
    assert [p.name for p in only][-1] == "report.html" and len(only) == 5
    assert predictions(lock, "dpo").step_seconds is None
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
    assert lines[1] == "pretrain: eval pydoc_mc: acc 0.6250, acc_norm 0.5000 (24 documents)"
    assert len(lines) == 2  # sft has neither
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
