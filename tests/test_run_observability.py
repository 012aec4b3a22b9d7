"""What a run logs, and what its report predicts for it (the observability review):

* the logged ``loss`` is the cross-entropy (what ``val_loss`` and torchtitan's job log), the MoE aux and z-loss terms
  apart, the optimized objective (and so every gradient) unchanged;
* ``step_s`` / ``tokens_per_s`` are the mean training time per step since the previous logged record;
* ``elapsed_s`` counts from the ``start`` event; no second FLOPs formula in the runtime (no lock figure: no MFU);
* validation scalars are tagged ``val/<x>``;
* ``llmc report`` predicts a run on a backend other than the plan's for that backend, as ``llmc calibrate`` does.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))


class _Batches:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def next_batch(self, micro):
        return self.x, self.y


def test_logged_loss_is_the_cross_entropy_and_the_objective_is_unchanged():
    from llmc.runtime import train
    from llmc.runtime.distributed import DistInfo  # noqa: F401  (the loop's type)
    from llmc.runtime.metrics import step_record
    from llmc.runtime.model import build_model
    from llmc.spec.presets import PRESETS

    arch = PRESETS["tiny-moe"]
    model = build_model(arch, torch.device("cpu"), seed=0)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, arch.vocab_size, (4, 128), generator=g)
    y = torch.randint(0, arch.vocab_size, (4, 128), generator=g)
    z_coef = 1e-4
    job = SimpleNamespace(grad_accum=1, micro_batch=4, loss_chunk=0, z_loss=z_coef, precision="fp32")
    info = SimpleNamespace(device=torch.device("cpu"))
    parts = train._forward_backward(job, model, _Batches(x, y), info, False, False)
    (ce, aux, z), _, finite = train.step_stats(parts, torch.zeros(()))
    assert finite

    # independently: the logits' cross-entropy (torch's), the model's aux loss, PaLM's z-loss
    logits, ref_aux = ref(x, return_aux=True)
    flat = logits.float().reshape(-1, arch.vocab_size)
    want_ce = F.cross_entropy(flat, y.reshape(-1))
    want_z = z_coef * (torch.logsumexp(flat, -1) ** 2).mean()
    assert ce == pytest.approx(float(want_ce), rel=1e-5)
    assert aux == pytest.approx(float(ref_aux), rel=1e-5) and aux > 0.01  # 4 MoE layers' load-balancing terms
    assert z == pytest.approx(float(want_z), rel=1e-4)
    # the optimizer's objective is still cross-entropy + z-loss + aux: the same gradients
    (want_ce + want_z + ref_aux).backward()
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        if q.grad is None:
            assert p.grad is None or not p.grad.any(), n
            continue
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=n)

    rec = step_record(step=1, loss=ce, lr=1e-3, grad_norm=1.0, tokens=512, tokens_per_step=512, dt=1.0,
                      flops_per_token=None, peak_flops=None, world=1, device=torch.device("cpu"),
                      terms=train.step_terms([ce, aux, z], z_coef, train.has_aux_loss(arch)))
    assert rec["loss"] == pytest.approx(float(want_ce), abs=1e-5)
    assert rec["aux_loss"] == pytest.approx(float(ref_aux), abs=1e-5)
    assert rec["z_loss"] == pytest.approx(float(want_z), abs=1e-5)


def _native_run(tmp_path, monkeypatch, *, log_every=5, steps=10):
    from test_build_fakes import lock_for

    from llmc.runtime import corpus
    from llmc.runtime.entry import run_stage
    from llmc.runtime.metrics import IntervalTimer

    corpus.write_corpus(tmp_path / "docs.jsonl", max_docs=100)
    spec = {"name": "t", "model": dict(n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=80, vocab_size=512,
                                       max_seq_len=32),
            "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "d", "path": str(tmp_path / "docs.jsonl"), "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 16, "tokens": 64 * steps},
            "training": {"precision": "fp32", "global_batch_tokens": 64, "log_every": log_every,
                         "checkpoint": {"interval_steps": 100}}}
    lock = lock_for(spec, plan={"micro_batch": 4}, spec_path=str(tmp_path / "s.yaml"))
    lock["compute"]["flops_per_token"] = None  # a lock without the compiler's figure: no MFU, no second formula
    # a clock under which step k of the run takes k seconds (only the step timer reads it)
    state = {"now": 0.0, "calls": 0}

    def clock():
        state["calls"] += 1
        if state["calls"] % 2 == 0:  # a stop: step calls/2 ends
            state["now"] += state["calls"] // 2
        return state["now"]

    monkeypatch.setattr(IntervalTimer, "clock", staticmethod(clock))
    run_stage(lock, None, tmp_path / "o", tmp_path)
    return [json.loads(x) for x in (tmp_path / "o" / "metrics.jsonl").read_text().splitlines()], lock


def test_step_time_is_the_intervals_mean_and_elapsed_starts_at_the_start_event(tmp_path, monkeypatch):
    recs, lock = _native_run(tmp_path, monkeypatch)
    steps = {r["step"]: r for r in recs if "event" not in r and "loss" in r}
    assert sorted(steps) == [1, 5, 10]
    # step 1 alone (1 s); steps 2..5 (2+3+4+5)/4; steps 6..10 (6+..+10)/5: every step, not the logged one's
    assert [steps[s]["step_s"] for s in (1, 5, 10)] == [1.0, 3.5, 8.0]
    tps = lock["hyper"]["global_batch_tokens"]
    assert [steps[s]["tokens_per_s"] for s in (1, 5, 10)] == [round(tps / d, 1) for d in (1.0, 3.5, 8.0)]
    start = next(r for r in recs if r.get("event") == "start")
    assert start["elapsed_s"] == 0.0  # one origin: the start event (the logger was made before the model's build)
    assert all(steps[s]["mfu"] is None and steps[s]["flops_per_s"] is None for s in steps)


def test_runtime_has_no_flops_formula():
    from llmc.runtime import metrics

    assert not hasattr(metrics, "flops_per_token")  # the lock's compute.flops_per_token, or none


def test_validation_scalars_are_tagged_val(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from llmc.runtime.observe import RunLogger

    with RunLogger(tmp_path, total_steps=4, tensorboard=True, wandb=False, echo=False) as log:
        log.log({"step": 2, "loss": 5.0, "tokens_per_s": 100.0})
        log.log({"step": 2, "val_loss": 4.25, "val_ppl": 70.1, "val_tokens": 16384, "val_format": "llmc-packed"})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/tokens_per_s", "val/loss", "val/ppl", "val/tokens"} <= tags
    assert "train/val_loss" not in tags
    assert acc.Scalars("val/loss")[0].value == 4.25


def _gpu_lock():
    from test_build_fakes import lock_for

    from llmc.spec.presets import PRESETS

    spec = {"name": "g", "model": PRESETS["tiny"].model_dump(), "hardware": {"gpu": "h100-sxm", "count": 1},
            "data": {"sources": [{"name": "d", "path": "d.jsonl", "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 2048}, "seq_len": 256, "tokens": 256 * 64 * 50},
            "training": {"backend": "native", "precision": "bf16", "global_batch_tokens": 256 * 64}}
    return lock_for(spec)


def _run_folder(tmp: Path, lock: dict, backend: str) -> Path:
    (tmp / "plan.lock.json").write_text(json.dumps(lock))
    run = tmp / "run" / "pretrain"
    run.mkdir(parents=True)
    recs = [{"event": "start", "backend": backend, "elapsed_s": 0.0}]
    recs += [{"step": s, "loss": 5.0, "tokens_per_s": 1e5, "step_s": 0.16, "mfu": 0.3, "peak_mem_bytes": 2**30,
              "peak_mem_device": "cuda"} for s in (1, 10, 20, 30)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return run


def test_report_predicts_the_backend_that_ran_as_calibrate_does(tmp_path):
    from llmc import measurements, runreport

    lock = _gpu_lock()
    assert lock["backend"]["name"] == "native" and "torchtitan" in lock["backend_runs"]
    run = _run_folder(tmp_path, lock, "torchtitan")
    m = measurements.read_llmc_run(run)
    t, mem = measurements.predicted(m)  # what llmc calibrate fits the run against
    sm = runreport.read_metrics(run / "metrics.jsonl", "pretrain")
    assert sm.backend == "torchtitan"
    p = runreport.predictions(lock, "pretrain", sm.backend)
    assert p.backend == "torchtitan"
    assert p.tokens_per_s == pytest.approx(t.tokens_per_second) and p.step_seconds == pytest.approx(t.step_seconds)
    assert p.tokens_per_s != pytest.approx(lock["time"]["tokens_per_second"])  # not the native plan's
    # the memory the compiler sized for torchtitan's run (lock backend_runs), not the native plan's
    assert p.per_gpu_bytes == lock["backend_runs"]["torchtitan"]["per_gpu_bytes"]
    assert p.per_gpu_bytes != lock["memory"]["per_gpu_bytes"]
    # read from the lock, never computed again: a build calibrated for torchtitan sizes its run there (L015, plan)
    import copy

    cal = copy.deepcopy(lock)
    cal["backend_runs"]["torchtitan"]["per_gpu_bytes"] = 12_345_678_901
    assert runreport.predictions(cal, "pretrain", "torchtitan").per_gpu_bytes == 12_345_678_901
    rows = runreport.table([sm], lock)
    assert [r.quantity for r in rows][:3] == ["step time [torchtitan]", "throughput [torchtitan]", "MFU [torchtitan]"]
    # the planned backend's run: the lock's own figures, unlabelled
    planned = runreport.predictions(lock, "pretrain", "native")
    assert planned.backend is None and planned.tokens_per_s == lock["time"]["tokens_per_second"]
    page = runreport.make_report(tmp_path / "run", lock, tmp_path / "rep")[-1].read_text()
    assert "pretrain ran on torchtitan" in page
    assert f"after step {measurements.WARMUP_STEPS}" in page and "after the first logged one" not in page


def _stage_run_log(path: Path):
    """A post-training loop's RunLogger writing ``path`` only (no TensorBoard, no W&B, no console line)."""
    from llmc.runtime.metrics import MetricsLogger
    from llmc.runtime.observe import RunLogger

    return RunLogger(path.parent, total_steps=3, tensorboard=False, wandb=False, echo=False,
                     metrics=MetricsLogger(path, echo=False))


def test_post_training_records_count_elapsed_s_from_their_start_event(tmp_path):
    """The SFT / DPO / GRPO loops' log (posttrain._Log) has `elapsed_s` as the pre-training trainers do: 0 at the
    start event, however long the set-up before it took, then the seconds since it."""
    import time

    from llmc.runtime.posttrain import _Log

    log = _Log(_stage_run_log(tmp_path / "metrics.jsonl"), "sft", every=1)
    time.sleep(0.2)  # the set-up (model, data) before the loop starts
    log.event("start", backend="native")
    time.sleep(0.05)
    log(0, {"loss": 1.0})
    start, step = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert start["event"] == "start" and start["elapsed_s"] == 0
    assert 0.04 <= step["elapsed_s"] < 0.2 and step["step"] == 1


def test_post_training_step_s_leaves_out_checkpoint_saves_and_appends_after_a_torn_line(tmp_path, monkeypatch):
    """The post-training log writes through the pre-training trainers' MetricsLogger: a record half-written by a killed
    run is dropped before the rerun appends (it used to run into the new record, a line no reader parses), and a
    step's `step_s` starts where the loop's state marks the previous step done, after its checkpoint save, as the
    pre-training trainers leave their saves out of `step_s`."""
    import random
    import time

    from llmc.runtime import checkpoint
    from llmc.runtime.metrics_io import read_metrics
    from llmc.runtime.posttrain import _Log
    from llmc.runtime.sft import LoopState

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"stage": "sft", "step": 1, "loss": 2.0}\n{"stage": "sft", "step": 2, "lo')  # killed mid-write
    monkeypatch.setattr(checkpoint, "save_checkpoint", lambda *a, **k: time.sleep(0.3))  # a slow save
    state = LoopState(folder=tmp_path / "ckpt", interval=1)
    log = _Log(_stage_run_log(path), "sft", every=1, state=state)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rng = random.Random(0)
    log.event("start", backend="native")
    for step in state.begin(model, opt, 3, rng):
        time.sleep(0.02)  # the step's training
        log(step, {"loss": 1.0})
        state.end_step(step, model, opt, rng)  # saves after steps 1 and 2 (not after the last)
    got = read_metrics(path)  # every line parses
    assert [r["step"] for r in got.steps] == [1, 2, 3] and [e["event"] for e in got.events] == ["start"]
    new = [r for r in got.steps if r.get("step_s") is not None]
    assert len(new) == 3 and all(0.015 <= r["step_s"] < 0.2 for r in new), new
    assert new[-1]["elapsed_s"] >= 0.6  # two saves of 0.3 s went by, counted in elapsed_s only


def test_the_torchtitan_job_takes_a_checkpoint_save_off_its_throughput_clock(tmp_path, monkeypatch):
    """The job's checkpoint manager hands each save's seconds to its metrics processor, which moves torchtitan's
    throughput clock (``time_last_log``, the start of ``time_delta`` in MetricsProcessor.log) past them: a slow save
    is not training time in the next record's tokens/s and ``step_s``; the trainer wires the two together."""
    import importlib
    import time

    pytest.importorskip("torchtitan")
    from test_torchtitan import compiled_example, write_build
    from torchtitan.components.checkpoint import CheckpointManager

    module = write_build(compiled_example("tiny_cpu"), tmp_path)
    monkeypatch.syspath_prepend(str(module.parent))
    sys.modules.pop(module.stem, None)
    job = importlib.import_module(module.stem)
    monkeypatch.setattr(CheckpointManager, "save", lambda self, step, last_step=False: time.sleep(0.3))
    mp = object.__new__(job.LlmcMetricsProcessor)  # (its clock only: torchtitan's __init__ builds loggers)
    mp.time_last_log = time.perf_counter()
    ck = object.__new__(job.LlmcCheckpointManager)
    ck.on_save_time = mp.exclude
    time.sleep(0.05)  # a step's training
    ck.save(4)
    trained = time.perf_counter() - mp.time_last_log  # torchtitan's time_delta at the next log
    assert 0.04 <= trained < 0.25, trained
    assert "self.checkpointer.on_save_time = self.metrics_processor.exclude" in module.read_text()
    sys.modules.pop(module.stem, None)
