"""RunLogger (llmc.runtime.observe): TensorBoard events read back by TensorBoard's own reader, W&B offline
files, wandb-less fallback, moving-average ETA, metrics.jsonl pass-through."""

from __future__ import annotations

import builtins
import json
import math
import sys
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("tensorboard")

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from llmc.runtime.metrics import MetricsLogger  # noqa: E402
from llmc.runtime.observe import RunLogger, format_duration, scalars_of  # noqa: E402


def records(n: int = 12) -> list[dict]:
    return [{"step": s, "loss": 7.0 * math.exp(-0.2 * s) + 0.125, "lr": 1e-3 * s / n, "grad_norm": 1.5 / s,
             "tokens_per_s": 1000.0 + 10 * s, "mfu": None if s % 2 else 0.25 + s / 1000,
             "peak_mem_bytes": 2**30 + s, "note": "text is skipped", "skipped": False}
            for s in range(1, n + 1)]


class FakeClock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def test_tensorboard_scalars_read_back_equal(tmp_path, capsys):
    recs = records()
    with RunLogger(tmp_path, total_steps=12, wandb=False, config={"name": "t"}) as log:
        for r in recs:
            log.log(r)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu",
                    "train/peak_mem_bytes"}
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"):
        got = [(e.step, e.value) for e in acc.Scalars("train/" + key)]
        want = [(r["step"], r[key]) for r in recs]
        assert [s for s, _ in got] == [s for s, _ in want]
        for (_, a), (_, b) in zip(got, want, strict=True):
            assert a == pytest.approx(b, rel=1e-6)  # stored as float32
    assert [e.step for e in acc.Scalars("train/mfu")] == [r["step"] for r in recs if r["mfu"] is not None]
    assert "ETA" in capsys.readouterr().out


def test_eta_is_remaining_steps_times_moving_average(tmp_path):
    # log at steps 0, 10, 20, 30, 40 at times 0, 5, 15, 20, 30 -> per-step 0.5, 1.0, 0.5, 1.0
    clock = FakeClock([100.0, 105.0, 115.0, 120.0, 130.0])
    log = RunLogger(tmp_path, total_steps=100, tokens_per_step=4096, tensorboard=False, wandb=False,
                    echo=False, window=3, clock=clock)
    assert log.progress().eta_s is None
    for s in (0, 10, 20, 30, 40):
        log.log({"step": s, "loss": 1.0})
    p = log.progress()
    avg = (1.0 + 0.5 + 1.0) / 3  # the last 3 intervals only
    assert p.avg_step_s == pytest.approx(avg)
    assert p.eta_s == pytest.approx(60 * avg)
    assert p.tokens_per_s == pytest.approx(4096 / avg)
    assert p.line().startswith("[40/100  40.0%]") and "ETA 0:00:50" in p.line()
    assert format_duration(3725.2) == "1:02:05" and format_duration(2 * 86400 + 3) == "2d 00:00:03"
    assert format_duration(None) == "?"


def test_metrics_jsonl_pass_through_and_disabled_rank(tmp_path):
    m = MetricsLogger(tmp_path / "metrics.jsonl", echo=False)
    log = RunLogger(tmp_path, total_steps=3, tensorboard=False, wandb=False, metrics=m, echo=False)
    for r in records(3):
        log.log(r)
    log.event("checkpoint", step=3)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x.get("step") for x in lines] == [1, 2, 3, 3] and lines[-1]["event"] == "checkpoint"
    off = RunLogger(tmp_path / "rank1", total_steps=3, enabled=False)
    off.log(records(1)[0])
    off.close()
    assert not (tmp_path / "rank1").exists()
    assert scalars_of({"step": 1, "a": 2, "b": None, "c": True, "d": "x"}) == {"a": 2.0}


def test_wandb_missing_is_skipped_cleanly(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_wandb(name, *a, **kw):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    log = RunLogger(tmp_path, total_steps=2, tensorboard=False, echo=False)
    assert log.wandb_run is None and log.wandb_skipped == "wandb is not installed"
    log.log(records(1)[0])
    log.close()
    with pytest.raises(ImportError):
        RunLogger(tmp_path, total_steps=2, tensorboard=False, wandb=True)


def test_wandb_offline_run_written(tmp_path, monkeypatch):
    """An offline W&B run gets every step's scalars, the validation a trainer logs after a step's training figures
    included: W&B ignores data logged to a step it has moved past ("Tried to log to step N that is less than the
    current step N+1"), so a step is committed only when a later one arrives (and at the end)."""
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    recs = records(4)
    log = RunLogger(tmp_path, total_steps=4, tensorboard=False, echo=False, run_name="unit", config={"a": 1})
    for r in recs:
        log.log(r)
        if r["step"] == 2:  # as the trainers do: validation after the step's record, at the same step
            log.log({"step": 2, "val_loss": 4.25})
    run = log.wandb_run
    assert run is not None and run.offline
    assert run.summary["val/loss"] == 4.25  # taken at step 2, not dropped
    assert run.summary["train/loss"] == pytest.approx(recs[-2]["loss"])  # (step 4's: committed at the end)
    log.close()
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    deadline = time.monotonic() + 20  # the W&B service process flushes the offline file asynchronously
    while b"val/loss" not in files[0].read_bytes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert b"train/loss" in files[0].read_bytes() and b"val/loss" in files[0].read_bytes()


def test_wandb_disabled_by_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    log = RunLogger(tmp_path, total_steps=1, tensorboard=False, echo=False)
    assert log.wandb_run is None and log.wandb_skipped == "disabled"
    assert not (tmp_path / "wandb").exists()


# ----------------------------------------------------------------------------- the native trainer's logging


def _scalars(tb_dir, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    events = acc.Scalars(tag)
    assert [e.step for e in events] == sorted({e.step for e in events})  # each step once
    return {e.step: e.value for e in events}


def test_trainer_writes_tensorboard_and_each_step_once_after_resume(tmp_path, monkeypatch, capsys):
    """A tiny native run: TensorBoard's reader sees the same losses as metrics.jsonl; a run interrupted
    after step 6 whose last surviving checkpoint is step 4 resumes there, and both metrics.jsonl and
    TensorBoard then hold each step once, with the losses of an uninterrupted run."""
    import shutil

    from test_runtime_train import losses, make_lock, run

    from llmc.runtime import corpus
    from llmc.runtime.metrics_io import read_metrics

    monkeypatch.setenv("WANDB_MODE", "disabled")
    corpus.write_corpus(tmp_path / "docs.jsonl", max_docs=200)
    lock = make_lock(tmp_path / "a", tmp_path / "docs.jsonl", steps=8, interval=4)
    run(lock, tmp_path / "ref")
    ref = losses(tmp_path / "ref")
    assert sorted(ref) == list(range(1, 9))
    tb = _scalars(tmp_path / "ref" / "tensorboard", "train/loss")
    assert sorted(tb) == list(range(1, 9))
    assert all(tb[s] == pytest.approx(ref[s], rel=1e-6) for s in ref)
    out = capsys.readouterr().out
    assert "[8/8 100.0%]" in out and "ETA" in out  # the progress line

    cut = tmp_path / "cut"
    run(lock, cut, stop_after=6)  # logged steps 1..6, checkpoints at 4 and 6
    shutil.rmtree(cut / "checkpoints" / "step-00000006")  # as if killed before step 6 was saved
    assert sorted(losses(cut)) == list(range(1, 7))
    res = run(lock, cut)
    assert res["status"] == "done"
    steps = [r["step"] for r in read_metrics(cut / "metrics.jsonl").steps]
    raw = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    logged = [r["step"] for r in raw if "event" not in r]
    assert logged == steps == list(range(1, 9))  # each step once, in order, in the file itself
    assert losses(cut) == ref
    tb_cut = _scalars(cut / "tensorboard", "train/loss")
    assert sorted(tb_cut) == list(range(1, 9)) and all(tb_cut[s] == pytest.approx(ref[s], rel=1e-6) for s in ref)


def test_resumed_event_file_sorts_after_the_killed_runs(tmp_path, monkeypatch):
    """TensorBoard reads event files in name order and purges only what earlier files wrote: a writer
    opened in the same second as an existing file must still get a later name (names carry the second,
    then host, pid and a counter compared as strings)."""
    monkeypatch.setenv("WANDB_MODE", "disabled")
    tb_dir = tmp_path / "tensorboard"
    tb_dir.mkdir()
    old = tb_dir / f"events.out.tfevents.{int(time.time()):010d}.~~~~.99999999.9"  # sorts after any same-second name
    old.write_bytes(b"")
    log = RunLogger(tmp_path, total_steps=2, echo=False, purge_step=3)
    log.close()
    names = sorted(f.name for f in tb_dir.glob("events.out.tfevents.*"))
    assert len(names) == 2 and names[0] == old.name


def test_a_wandb_that_cannot_start_never_stops_the_run(tmp_path, monkeypatch, capsys):
    """W&B online without an API key raised UsageError out of the trainer's logger (and with the network down blocked
    ~100 s, then CommError): the stage died before step 1. The real W&B, online without a key: one R018 line and the run
    logs offline; a W&B that cannot start at all: one R018 line and the run goes on without it."""
    wandb = pytest.importorskip("wandb")
    from llmc.runtime.observe import RunLogger

    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # (no ~/.netrc, no W&B settings of this machine's user)
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_CONFIG_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    with pytest.raises(wandb.errors.UsageError):  # (the premise: W&B itself refuses)
        wandb.init(project="p", dir=str(tmp_path), mode="online")
    log = RunLogger(tmp_path / "a", total_steps=2, tensorboard=False, wandb=True, wandb_mode="online", echo=False)
    err = capsys.readouterr().err
    assert log.wandb_run is not None and log.wandb_run.settings.mode == "offline", err
    (line,) = [ln for ln in err.splitlines() if "R018" in ln]
    assert "did not start in online mode" in line and "logging offline instead" in line, line
    log.log({"step": 1, "loss": 3.0})
    log.close()

    class Broken:  # a W&B whose init always fails (a bad setting, a broken install)
        Settings = wandb.Settings

        @staticmethod
        def init(**kw):
            raise RuntimeError("bad setting\nmore")

    monkeypatch.setitem(__import__("sys").modules, "wandb", Broken)
    log = RunLogger(tmp_path / "b", total_steps=2, tensorboard=False, wandb=True, echo=False)
    err = capsys.readouterr().err
    assert log.wandb_run is None
    (line,) = [ln for ln in err.splitlines() if "R018" in ln]
    assert "RuntimeError: bad setting" in line and "training goes on without it" in line, line
    log.log({"step": 1, "loss": 3.0})
    log.close()


# ----------------------------------------------------------------------------- post-training's logging


class _FakeWandb:
    """A W&B module that records what a stage hands it: ``init``'s arguments, each run's logged scalars by step, and
    whether the run was finished."""

    runs: list = []

    class Settings:
        def __init__(self, **kw):
            pass

    class Run:
        def __init__(self, kw):
            self.kw, self.data, self.finished = kw, {}, False

        def log(self, scalars, step, commit=None):
            self.data.setdefault(step, {}).update(scalars)

        def finish(self):
            self.finished = True

    @classmethod
    def init(cls, **kw):
        cls.runs.append(cls.Run(kw))
        return cls.runs[-1]


def _stage_records(out) -> tuple[list[dict], list[dict]]:
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if "event" not in r], [r for r in recs if "event" in r]


def _tb_equals_metrics(out, keys) -> None:
    """Each step's TensorBoard scalar, read back by TensorBoard's reader, is metrics.jsonl's value at that step."""
    steps, _ = _stage_records(out)
    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == {f"train/{k}" for k in keys}  # the stage's name (a string) is no scalar
    for k in keys:
        got = _scalars(out / "tensorboard", f"train/{k}")  # each step once
        assert sorted(got) == [r["step"] for r in steps], k
        for r in steps:
            assert got[r["step"]] == pytest.approx(r[k], rel=1e-6, abs=1e-30), (k, r)  # stored as float32


def test_post_training_logs_to_tensorboard_and_wandb_each_step_once_after_resume(tmp_path, monkeypatch, capsys):
    """An SFT stage logs as pre-training does: TensorBoard's reader sees metrics.jsonl's values at the same steps, a W&B
    run named <name>-<stage> gets them too and is finished; stopped after step 3 and resumed from its step-2
    checkpoint, the rerun logs step 3 again and both metrics.jsonl and TensorBoard hold each step once."""
    import shutil

    from test_posttrain_resume import TOK, _base, job_of

    from llmc.runtime.posttrain import RESUME_FOLDER, run_stage

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb)
    monkeypatch.setattr(_FakeWandb, "runs", [])
    _base(tmp_path)
    out = tmp_path / "sft"
    assert run_stage(job_of("sft"), out, tokenizer=TOK, stop_after=3)["status"] == "stopped"
    shutil.rmtree(out / "checkpoints" / RESUME_FOLDER / "step-00000003")  # killed before step 3's save
    assert run_stage(job_of("sft"), out, tokenizer=TOK)["status"] == "done"
    steps, events = _stage_records(out)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    _tb_equals_metrics(out, ("loss", "lr", "trained_tokens", "step_s"))
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # one file per start
    starts = [e for e in events if e["event"] == "start"]
    assert [e["resumed_from"] for e in starts] == [None, 2]
    assert all(e["stage"] == "sft" and e["backend"] == "native" and "software" in e and "spec_sha256" in e
               for e in starts)
    runs = _FakeWandb.runs
    assert len(runs) == 2 and all(r.finished for r in runs)
    assert all(r.kw["name"] == "p-sft" and r.kw["dir"] == str(out) and r.kw["mode"] == "offline" for r in runs)
    assert sorted(runs[0].data) == [1, 2, 3] and sorted(runs[1].data) == [3, 4]
    last = {r["step"]: r for r in steps}
    assert all(runs[1].data[s]["train/loss"] == last[s]["loss"] for s in (3, 4))
    # one console line per logged step (the stage's, with the ETA): no second progress line
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "step" in ln and ("ETA" in ln or "[" in ln)]
    assert len(lines) == 1 and lines[0].startswith("sft step 1: loss ") and "ETA" in lines[0], lines


def test_dpo_stage_tensorboard_equals_its_metrics(tmp_path, monkeypatch):
    from test_posttrain_resume import TOK, _base, job_of

    from llmc.runtime.posttrain import run_stage

    monkeypatch.setenv("WANDB_MODE", "disabled")
    _base(tmp_path)
    out = tmp_path / "dpo"
    assert run_stage(job_of("dpo", steps=3), out, tokenizer=TOK)["status"] == "done"
    _tb_equals_metrics(out, ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "lr",
                             "trained_tokens", "step_s"))
    assert not (out / "wandb").exists()


def test_a_failed_post_training_stage_closes_its_loggers(tmp_path, monkeypatch):
    """A stage whose loop fails still flushes its TensorBoard events and finishes its W&B run."""
    from test_posttrain_resume import TOK, _base, job_of

    from llmc.runtime import posttrain

    def boom(loop):
        loop.log(0, {"loss": 2.5, "lr": 1e-3})
        raise RuntimeError("boom")

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setitem(sys.modules, "wandb", _FakeWandb)
    monkeypatch.setattr(_FakeWandb, "runs", [])
    monkeypatch.setattr(posttrain, "_run_sft", boom)
    _base(tmp_path)
    with pytest.raises(RuntimeError, match="boom"):
        posttrain.run_stage(job_of("sft"), tmp_path / "sft", tokenizer=TOK)
    assert _scalars(tmp_path / "sft" / "tensorboard", "train/loss") == {1: 2.5}  # flushed
    (run,) = _FakeWandb.runs
    assert run.finished and run.data[1]["train/loss"] == 2.5
