"""What the emitted torchtitan job leaves behind: llmc's metrics.jsonl, the checkpoints and the validations.

One tiny torchtitan job on CPU (``llmc build`` of a 20-step spec, checkpoints every 6 steps, keep_latest 2,
validation every 8 steps), run as ``llmc launch`` runs it (``llmc.runtime.titan_launch.torchtitan_command``, the
CPU shim): SIGTERMed after step 14, so it saves the step it is at (a preemption save), then run again from the
interval checkpoint at step 12 (the preemption save set aside: a job killed before it could save), which trains
steps 13-20 a second time and ends with torchtitan's last-step save. Checked against torchtitan's own log lines
and the lock, not against the job's code:

* metrics.jsonl in the stage's run folder holds every step once (the first run's records of steps 13-14 went
  when the second run started at 12), with the loss torchtitan logged for it, the learning rate of the lock's
  schedule (its formula written out here), the lock's tokens per step, and ``llmc report`` / ``llmc calibrate``
  read it;
* the checkpoint folder holds the newest ``keep_latest`` checkpoints after the preemption save and after the
  last one (torchtitan 0.3.0 purges only after an interval save);
* the job validates at the steps the lock counts (every ``every_steps`` and the last step), not at step 1.

And, without torchtitan: ``llmc report`` shows the lock's predicted step time and throughput of every stage.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SPEC = """
name: titan-outputs
model: tiny
hardware: {gpu: cpu, count: 1}
data:
  sources:
    - {name: python-docs, format: builtin}
  tokenizer: {train: true, vocab_size: 2048}
  seq_len: 64
  tokens: 10240
training:
  backend: torchtitan
  precision: fp32
  global_batch_tokens: 512
  optimizer: {lr: 3.0e-3}
  checkpoint: {interval_steps: 6, keep_latest: 2}
  log_every: 1
eval:
  validation: {fraction: 0.1, every_steps: 8, max_batches: 1}
"""
VALIDATE = re.compile(r"validate step:\s+(\d+)\s+loss:\s+([-+0-9.eEnaif]+)")


def _steps(folder: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in folder.iterdir() if re.fullmatch(r"step-\d+", p.name))


@pytest.fixture(scope="module")
def titan_run(tmp_path_factory):
    """(build dir, lock, first run's log, second run's log, the step the first run was preempted at, the
    checkpoints after the first run, the first run's metrics.jsonl lines)."""
    pytest.importorskip("torch")
    pytest.importorskip("torchtitan")
    from test_torchtitan import OFFLINE, _preempt_after, make_assets, run_logged  # tests/ is on sys.path
    from typer.testing import CliRunner

    from llmc.cli import app
    from llmc.runtime.titan_launch import torchtitan_command

    tmp = tmp_path_factory.mktemp("titan_outputs")
    (tmp / "spec.yaml").write_text(SPEC)
    b = tmp / "b"
    r = CliRunner().invoke(app, ["build", str(tmp / "spec.yaml"), "-o", str(b)])
    assert r.exit_code == 0, r.output
    lock = json.loads((b / "plan.lock.json").read_text())
    # what llmc launch's prepare step writes, offline: assets/tokenizer.json, data/<builtin source>.jsonl
    make_assets(b, lock["spec"]["resolved"]["data"]["tokenizer"]["vocab_size"], n_docs=600, names=["python-docs"])
    argv, env = torchtitan_command(b / "torchtitan" / "llmc_job.py", 1, True, [], run_dir=b)
    env = {**env, **OFFLINE}
    rc, log1 = _preempt_after(argv, env, b, step=14)
    m = re.search(r"preempted \(signal 15\): saved step (\d+); rerun", log1)
    assert m and rc != 0, log1[-3000:]
    cut = int(m.group(1))
    assert 14 <= cut < 20, log1[-3000:]
    ckpts = b / "outputs" / "torchtitan" / "checkpoints"
    after_preemption = _steps(ckpts)
    metrics = b / "run" / "pretrain" / "metrics.jsonl"
    first_lines = metrics.read_text().splitlines() if metrics.is_file() else []  # (the tests say what is missing)
    # as if the job had been killed before its preemption save: the rerun starts at the interval checkpoint 12
    # and trains the steps the first run logged after it again
    shutil.rmtree(ckpts / f"step-{cut}")
    rc, log2, _ = run_logged(argv, env, b)
    assert rc == 0, log2[-3000:]
    return b, lock, log1, log2, cut, after_preemption, first_lines


def _records(b: Path) -> list[dict]:
    return [json.loads(ln) for ln in (b / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()]


def _logged(log: str) -> dict[int, float]:
    from test_torchtitan import losses

    return losses("\n".join(ln for ln in log.splitlines() if "validate step" not in ln))


def _schedule_lr(stage: dict, step: int) -> float:
    """The lock's cosine schedule at 1-based step ``step``: linear warmup to ``lr`` over ``warmup_steps``, then
    cosine from ``lr`` to ``min_lr`` over the remaining steps (Loshchilov & Hutter 2017, SGDR, eq. 5)."""
    s, w, n = step - 1, stage["warmup_steps"], stage["steps"]
    assert stage["schedule"] == "cosine"
    if s < w:
        return stage["lr"] * (s + 1) / w
    p = (s - w) / (n - w)
    return stage["min_lr"] + (stage["lr"] - stage["min_lr"]) * 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.slow
def test_metrics_jsonl_has_every_step_once_with_torchtitans_numbers(titan_run):
    b, lock, log1, log2, cut, _, first_lines = titan_run
    stage = lock["stages"][0]
    n = stage["steps"]
    first = [json.loads(ln) for ln in first_lines]
    assert sorted(r["step"] for r in first if "loss" in r) == list(range(1, cut + 1))
    recs = _records(b)
    train = [r for r in recs if "loss" in r and "event" not in r]
    assert [r["step"] for r in train] == list(range(1, n + 1))  # each step once, in order, after the resume
    resumed_at = (cut - 1) // stage["checkpoint_interval"] * stage["checkpoint_interval"]  # the newest one left
    assert f"Training starts at step {resumed_at + 1}" in log2
    l1, l2 = _logged(log1), _logged(log2)
    for r in train:
        logged = l1[r["step"]] if r["step"] <= resumed_at else l2[r["step"]]
        assert r["loss"] == pytest.approx(logged, abs=6e-5), r  # torchtitan prints 5 decimals, losses() keeps 4
        assert r["lr"] == pytest.approx(_schedule_lr(stage, r["step"]), rel=1e-9), r
        assert r["tokens"] == r["step"] * stage["global_batch_tokens"]
        assert r["tokens_per_s"] * r["step_s"] == pytest.approx(stage["global_batch_tokens"], rel=2e-3)
        assert r["grad_norm"] > 0 and r["peak_mem_device"] == "cpu" and r["peak_mem_bytes"] > 0
        # MFU against the peak the plan quotes its MFU against: the lock's hardware row, fp32 for an fp32 run
        assert r["mfu"] == pytest.approx(r["flops_per_s"] / (lock["hardware"]["fp32_tflops"] * 1e12), rel=1e-9)
    assert any((b / "run" / "pretrain" / "tensorboard").rglob("events.out.tfevents.*"))
    events = [r["event"] for r in recs if "event" in r]
    assert events == ["start", "resume", "end"], events  # the preemption at step > 12 went with its steps
    assert [r for r in recs if r.get("event") == "resume"][0]["step"] == resumed_at


@pytest.mark.slow
def test_validations_are_the_locks(titan_run):
    b, lock, log1, log2, cut, _, _ = titan_run
    v, n = lock["evaluation"]["validation"], lock["stages"][0]["steps"]
    due = [s for s in range(1, n + 1) if s % v["every_steps"] == 0 or s == n]  # every N steps and the last one
    assert len(due) == v["evals"]
    resumed_at = (cut - 1) // lock["stages"][0]["checkpoint_interval"] * lock["stages"][0]["checkpoint_interval"]
    ran = sorted({int(s) for s, _ in VALIDATE.findall(log1) if int(s) <= resumed_at}
                 | {int(s) for s, _ in VALIDATE.findall(log2)})
    assert ran == due, (VALIDATE.findall(log1), VALIDATE.findall(log2))
    val = [r for r in _records(b) if "val_loss" in r]
    assert [r["step"] for r in val] == due
    logged = {int(s): float(x) for s, x in VALIDATE.findall(log1) + VALIDATE.findall(log2)}
    for r in val:
        assert r["val_loss"] == pytest.approx(logged[r["step"]], abs=6e-5)
        assert r["val_ppl"] == pytest.approx(math.exp(r["val_loss"]))
        assert r["val_tokens"] == v["tokens_per_eval"]  # the tokens the plan counts per pass, as llmc's trainers log


@pytest.mark.slow
def test_tensorboard_has_llmcs_tags(titan_run):
    """llmc's scalars under the native trainer's tags, in torchtitan's event files under the stage's tensorboard/."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    b = titan_run[0]
    tags = set()
    for d in {p.parent for p in (b / "run" / "pretrain" / "tensorboard").rglob("events.out.tfevents.*")}:
        acc = EventAccumulator(str(d))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_s", "train/step_s", "val/loss", "val/tokens"} <= tags, sorted(tags)
    assert "loss_metrics/global_avg_loss" in tags  # torchtitan's own, beside them


@pytest.mark.slow
def test_checkpoints_left_are_the_newest_keep_latest(titan_run):
    b, lock, _, _, cut, after_preemption, _ = titan_run
    interval, n = lock["stages"][0]["checkpoint_interval"], lock["stages"][0]["steps"]
    keep = lock["spec"]["resolved"]["training"]["checkpoint"]["keep_latest"]
    saved_first = sorted({s for s in range(interval, cut + 1, interval)} | {cut})  # intervals, then the preemption
    assert after_preemption == saved_first[-keep:]
    saved = sorted({s for s in range(interval, n + 1, interval)} | {n})  # the second run's, the last step's
    assert _steps(b / "outputs" / "torchtitan" / "checkpoints") == saved[-keep:]


@pytest.mark.slow
def test_report_and_calibrate_read_the_run(titan_run, tmp_path):
    from typer.testing import CliRunner

    from llmc.cli import app
    from llmc.runreport import read_metrics, table

    b, lock, *_ = titan_run
    r = CliRunner().invoke(app, ["report", str(b), "-o", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "report" / "report.html").is_file() and "pretrain-loss.png" in r.output
    assert re.search(r"pretrain: validation loss [0-9.]+ -> [0-9.]+ .*steps 8 -> 20", r.output), r.output
    sm = read_metrics(b / "run" / "pretrain" / "metrics.jsonl", "pretrain")
    assert sm.steps == list(range(1, 21))
    rows = {row.quantity: row for row in table([sm], lock)}
    assert rows["step time"].measured > 0 and rows["step time"].predicted == lock["time"]["step_seconds"]
    out = tmp_path / "cal.json"
    r = CliRunner().invoke(app, ["calibrate", str(b / "run" / "pretrain"), "-o", str(out)])
    # a CPU run of a tiny model is far slower than llmc's compute model of the CPU (Python overhead per step), and
    # slower still on a loaded machine: when it is more than 1 / 0.2 = 5x slower, compute_scale would sit at its
    # bound and the fit is refused (K008), which is the right answer for those measurements, not a reading failure
    speed = rows["step time"].predicted / rows["step time"].measured  # ~ the compute_scale the fit finds
    from llmc.compiler import calibration

    lo = calibration.FACTOR_BOUNDS["compute_scale"][0]
    if speed < 0.75 * lo or (r.exit_code and speed < 1.25 * lo):
        assert r.exit_code == 1 and "error[K008] compute_scale" in r.output and "bound" in r.output, (speed, r.output)
        return
    assert r.exit_code == 0, (speed, r.output)
    cal = json.loads(out.read_text())
    assert cal["kind"] == "llmc-calibration" and cal["backend"] == "torchtitan" and cal["gpu"] == "cpu"


def test_report_shows_every_stages_predicted_step_time(tmp_path):
    """A post-training stage's prediction is its own (``stages[i].time``), not only the pre-training's."""
    from typer.testing import CliRunner

    from llmc.cli import app

    b = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", str(ROOT / "examples" / "pipeline_tiny.yaml"), "-o", str(b)])
    assert r.exit_code == 0, r.output
    lock = json.loads((b / "plan.lock.json").read_text())
    stages = [s for s in lock["stages"] if s["kind"] != "pretrain"]
    assert {s["kind"] for s in stages} >= {"sft", "dpo", "grpo"}
    for s in [*lock["stages"]]:
        d = b / "run" / s["name"]
        d.mkdir(parents=True)
        d.joinpath("metrics.jsonl").write_text("".join(
            json.dumps({"step": i, "loss": 2.0, "tokens_per_s": 1000.0, "step_s": 0.5}) + "\n" for i in (1, 2, 3)))
    r = CliRunner().invoke(app, ["report", str(b), "-o", str(tmp_path / "report")])
    assert r.exit_code == 0, r.output
    page = (tmp_path / "report" / "report.html").read_text()
    for s in stages:
        t = s["time"]
        for quantity, unit, value in (("step time", "s", t["step_seconds"]),
                                      ("throughput", "tokens/s", t["tokens_per_second"])):
            shown = f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
            assert (f"<tr><td>{s['name']}</td><td>{quantity}</td><td>{unit}</td><td>{shown}</td>") in page, \
                (s["name"], quantity)
