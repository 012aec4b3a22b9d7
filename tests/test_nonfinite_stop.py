"""A non-finite loss or gradient stops the run on every trainer, before the step is taken or saved.

The reviewer's case (a learning rate of 1e4 on the tiny model; checkpoints every 2 steps, keep_latest 2): llmc's
native trainer used to train on to the end with a NaN loss, exit 0 and let retention delete every finite checkpoint.
Now: exit 1, one ``error[R014]`` line, no checkpoint at or after the first non-finite step, the newest checkpoint's
weights finite (loaded and checked here, not taken from llmc's word), and a metrics.jsonl that a strict JSON parser
reads (RFC 8259 has no NaN: ``json.loads`` with a ``parse_constant`` that refuses NaN / Infinity) ending with a
``failed`` end event. A NaN on one rank only (injected into that rank's backward through a ``sitecustomize`` the
subprocesses import: a test-only fault) stops every rank at that step, on the native trainer, llmc's DeepSpeed
runner and the torchtitan job alike.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_build_fakes import make_compiled, make_run  # noqa: E402
from test_runtime_train import make_lock  # noqa: E402

from llmc.runtime import corpus  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
           "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}

# Imported by every Python process of a subprocess run (PYTHONPATH): on the rank LLMC_TEST_NAN_RANK, the
# LLMC_TEST_NAN_AT-th backward of a scalar loss runs on loss * NaN, so that rank's gradients (not its returned
# loss) are NaN at that step; the other ranks' are finite.
SITECUSTOMIZE = """
import os
if os.environ.get("LLMC_TEST_NAN_AT") and os.environ.get("RANK", "0") == os.environ.get("LLMC_TEST_NAN_RANK", "0"):
    import torch
    _backward, _seen = torch.autograd.backward, [0]
    def _poisoned(tensors, *args, **kwargs):
        if torch.is_tensor(tensors) and tensors.dim() == 0:
            _seen[0] += 1
            if _seen[0] == int(os.environ["LLMC_TEST_NAN_AT"]):
                tensors = tensors * float("nan")
        return _backward(tensors, *args, **kwargs)
    torch.autograd.backward = _poisoned
"""


def _strict(text: str) -> list[dict]:
    """Every line of a metrics.jsonl through a JSON parser that refuses NaN / Infinity (as JSON.parse and jq do)."""
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


def _steps(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name))) \
        if folder.is_dir() else []


def _all_finite(sd: dict) -> bool:
    tensors = [v for v in sd.values() if torch.is_tensor(v) and v.is_floating_point()]
    return bool(tensors) and all(bool(torch.isfinite(v).all()) for v in tensors)


def _poison_env(tmp: Path, at: int, rank: int) -> dict:
    site = tmp / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    old = os.environ.get("PYTHONPATH", "")
    return {"LLMC_TEST_NAN_AT": str(at), "LLMC_TEST_NAN_RANK": str(rank),
            "PYTHONPATH": os.pathsep.join(x for x in (str(site), str(Path(__file__).parent.parent), old) if x)}


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    corpus.write_corpus(d / "docs.jsonl", max_docs=300)
    return d / "docs.jsonl"


# ----------------------------------------------------------------------------- native trainer


def test_native_lr_1e4_stops_at_the_first_nonfinite_step_and_keeps_finite_checkpoints(tmp_path, docs, capsys):
    from llmc.runtime.checkpoint import read_model_state
    from llmc.runtime.entry import main

    lock = make_lock(tmp_path / "b", docs, steps=10, interval=2, lr=1e4)
    out = tmp_path / "o"
    rc = main(["--lock", str(lock), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [ln for ln in err.splitlines() if "error[" in ln]
    assert len(lines) == 1 and "error[R014] pretrain:" in lines[0], err[-3000:]
    recs = _strict((out / "metrics.jsonl").read_text())
    trained = [r for r in recs if "event" not in r and "loss" in r]
    # the first step whose loss or grad norm is not a finite number (null in strict JSON)
    bad = [r["step"] for r in trained if not all(isinstance(r.get(k), float | int) and math.isfinite(r[k])
                                                  for k in ("loss", "grad_norm"))]
    assert bad, trained
    first_bad = bad[0]
    assert trained[-1]["step"] == first_bad and first_bad < 10  # nothing trained after it
    assert f"at step {first_bad} " in lines[0] and "lower training.optimizer.lr" in lines[0]
    end = recs[-1]
    assert end["event"] == "end" and end["status"] == "failed" and end["step"] == first_bad
    assert "non-finite" in end["reason"]
    assert not (out / "DONE.json").exists() and not (out / "hf").exists()
    saved = _steps(out / "checkpoints")
    assert saved and max(saved) < first_bad and len(saved) <= 2, saved
    newest = out / "checkpoints" / f"step-{max(saved):08d}"
    assert str(newest) in lines[0]
    assert _all_finite(read_model_state(newest))


def test_native_nan_on_one_rank_stops_both_ranks_at_that_step(tmp_path, docs):
    """DDP over 2 gloo ranks; rank 1's backward at step 3 is NaN: both ranks stop at step 3 (none waits in a
    collective), step 2's checkpoint (finite) is the newest, torchrun exits non-zero."""
    from llmc.runtime.checkpoint import read_model_state

    lock = make_lock(tmp_path / "b", docs, steps=8, interval=2, plan={"dp_replicate": 2, "micro_batch": 4})
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", "-m", "llmc.runtime.entry", "--lock", str(lock), "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                       env={**os.environ, **OFFLINE, **_poison_env(tmp_path, 3, 1)})
    log = p.stdout + p.stderr
    assert p.returncode != 0, log[-3000:]
    r014 = [ln for ln in log.splitlines() if "error[R014]" in ln]
    assert len(r014) == 1 and "non-finite gradient norm" in r014[0] and "at step 3 " in r014[0], log[-3000:]
    recs = _strict((out / "metrics.jsonl").read_text())
    assert recs[-1]["event"] == "end" and recs[-1]["status"] == "failed" and recs[-1]["step"] == 3
    assert _steps(out / "checkpoints") == [2]
    assert _all_finite(read_model_state(out / "checkpoints" / f"step-{2:08d}"))


def test_native_loss_spike_still_rewinds_a_nonfinite_step(tmp_path, docs, monkeypatch):
    """With training.loss_spike the rewind stays the answer (the step not taken), and giving up is a TrainingError,
    as before; the end event then says failed."""
    import llmc.runtime.train as tr
    from llmc.runtime.entry import run_stage

    calls, real = {"n": 0}, tr.loss_terms

    def once_nan(losses, targets, z=0.0):
        calls["n"] += 1
        ce, zt = real(losses, targets, z)
        return (ce * float("nan") if calls["n"] == 5 else ce), zt

    monkeypatch.setattr(tr, "loss_terms", once_nan)
    spike = {"enabled": True, "threshold": 3.0, "window": 10, "skip_batches": 1, "max_rewinds": 2}
    lock = make_lock(tmp_path / "b", docs, steps=8, interval=2, loss_spike=spike)
    res = run_stage(json.loads(lock.read_text()), None, tmp_path / "o", lock.parent)
    assert res["status"] == "done" and res["rewinds"] == 1
    recs = _strict((tmp_path / "o" / "metrics.jsonl").read_text())
    assert [r["step"] for r in recs if r.get("event") == "loss_spike"] == [5]


def test_weights_check_and_strict_records():
    from llmc.runtime.metrics import MetricsLogger, json_line
    from llmc.runtime.train import weights_finite

    w = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    assert weights_finite(w)
    with torch.no_grad():
        w[1][0, 1] = float("inf")
    assert not weights_finite(w)
    line = json_line({"step": 3, "loss": float("nan"), "grad_norm": float("inf"), "x": [float("-inf"), 1.5]})
    assert _strict(line) == [{"step": 3, "loss": None, "grad_norm": None, "x": [None, 1.5]}]
    assert MetricsLogger  # (the writer every llmc trainer's metrics.jsonl goes through)


def test_readers_take_null_where_a_number_was(tmp_path):
    from llmc.runreport import read_metrics as report_metrics
    from llmc.runtime.metrics import MetricsLogger
    from llmc.runtime.metrics_io import read_metrics

    path = tmp_path / "run" / "metrics.jsonl"
    log = MetricsLogger(path, echo=True)
    log.log({"step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 100.0, "step_s": 0.5})
    log.log({"step": 2, "loss": float("nan"), "lr": 1e-3, "grad_norm": float("nan"), "tokens_per_s": 100.0,
             "step_s": 0.5})
    log.event("end", status="failed", step=2, final_loss=float("nan"))
    recs = _strict(path.read_text())
    assert recs[1]["loss"] is None and recs[2]["final_loss"] is None
    assert [s["loss"] for s in read_metrics(path).steps] == [2.5, None]
    sm = report_metrics(path)
    assert sm.steps == [1, 2] and sm.columns["loss"] == [2.5, None]


# ----------------------------------------------------------------------------- DeepSpeed


def test_deepspeed_nan_on_one_rank_stops_both_ranks(tmp_path):
    """llmc's DeepSpeed runner, ZeRO-1 over 2 gloo ranks (fp32): rank 1's gradients are NaN at step 5 (DeepSpeed
    0.19.8 skips that step and reports the norm as inf, then would go on); both ranks stop there, the DeepSpeed
    checkpoints of steps 2 and 4 are what is left, no llmc checkpoint or DONE.json is written."""
    pytest.importorskip("deepspeed")
    from llmc.compiler.plan import ParallelPlan
    from llmc.emit import render_artifacts

    run = make_run(
        name="dsnan",
        model={"name": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 128,
               "vocab_size": 512, "max_seq_len": 64},
        data={"seq_len": 32, "tokens": 1e5, "sources": [{"name": "python-docs", "format": "builtin"}],
              "tokenizer": {"train": True, "vocab_size": 512}},
        hardware={"gpu": "cpu", "count": 2},
        training={"precision": "fp32", "optimizer": {"lr": 3e-3}, "log_every": 1, "schedule": {"warmup_steps": 1},
                  "checkpoint": {"interval_steps": 2, "keep_latest": 2}},
        parallelism={"zero_stage": 1},
    )
    c = make_compiled(run, plan=ParallelPlan(dp_shard=2, micro_batch=4, grad_accum=1), global_batch_seqs=8, steps=8,
                      warmup=1)
    b = tmp_path / "b"
    for name, text in render_artifacts(c).items():
        if name in ("plan.lock.json", "deepspeed/ds_config.json"):
            (b / name).parent.mkdir(parents=True, exist_ok=True)
            # checkpoints every 2 steps (the test compiler's fixed numbers say 50)
            (b / name).write_text(text.replace('"checkpoint_interval": 50', '"checkpoint_interval": 2'))
    assets = tmp_path / "assets_root"
    assets.mkdir()
    out = b / "run" / "pretrain"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--rdzv_backend", "c10d",
           "--rdzv_endpoint", "localhost:0", "-m", "llmc.runtime.ds_train", "--lock", str(b / "plan.lock.json"),
           "--ds-config", str(b / "deepspeed" / "ds_config.json"), "--out", str(out), "--assets", str(assets)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=480,
                       env={**os.environ, **OFFLINE, **_poison_env(tmp_path, 5, 1)})
    log = p.stdout + p.stderr
    assert p.returncode != 0, log[-3000:]
    r014 = [ln for ln in log.splitlines() if "error[R014]" in ln]
    assert len(r014) == 1 and "non-finite gradient norm at step 5 " in r014[0], log[-3000:]
    recs = _strict((out / "metrics.jsonl").read_text())
    assert recs[-1]["event"] == "end" and recs[-1]["status"] == "failed" and recs[-1]["step"] == 5
    assert recs[-1]["checkpoint"] == "checkpoints/deepspeed/step-00000004"
    assert _steps(out / "checkpoints" / "deepspeed") == [2, 4]
    assert (out / "checkpoints" / "deepspeed" / "latest").read_text().strip() == "step-00000004"
    assert not (out / "DONE.json").exists() and _steps(out / "checkpoints") == []


# ----------------------------------------------------------------------------- torchtitan

TITAN_SPEC = """
name: titan-nan
model: tiny
hardware: {gpu: cpu, count: 1}
data:
  sources:
    - {name: python-docs, format: builtin}
  tokenizer: {train: true, vocab_size: 2048}
  seq_len: 64
  tokens: 5120
training:
  backend: torchtitan
  precision: fp32
  global_batch_tokens: 512
  optimizer: {lr: 3.0e-3}
  checkpoint: {interval_steps: 2, keep_latest: 2}
  log_every: 5
"""


def test_torchtitan_job_stops_before_saving_a_nonfinite_step(tmp_path):
    """The emitted torchtitan job on CPU (the CPU shim, one process): NaN gradients at step 5, a step torchtitan
    0.3.0 does not check (it checks the loss on logged steps only: log_every 5 logs steps 1, 5, 10, and after the
    optimizer step): the job stops at step 5 with exit 1 and the R014 line; the checkpoints of steps 2 and 4 are
    left (step 4's weights finite: read through DCP), none of step 5 or later."""
    pytest.importorskip("torchtitan")
    from test_torchtitan import make_assets, run_logged
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from typer.testing import CliRunner

    from llmc.cli import app
    from llmc.runtime.titan_launch import torchtitan_command

    (tmp_path / "spec.yaml").write_text(TITAN_SPEC)
    b = tmp_path / "b"
    r = CliRunner().invoke(app, ["build", str(tmp_path / "spec.yaml"), "-o", str(b)])
    assert r.exit_code == 0, r.output
    lock = json.loads((b / "plan.lock.json").read_text())
    make_assets(b, lock["spec"]["resolved"]["data"]["tokenizer"]["vocab_size"], n_docs=300, names=["python-docs"])
    argv, env = torchtitan_command(b / "torchtitan" / "llmc_job.py", 1, True, [], run_dir=b)
    poison = _poison_env(tmp_path, 5, 0)
    poison["PYTHONPATH"] = os.pathsep.join([poison["PYTHONPATH"], env.get("PYTHONPATH", "")])
    rc, log, _ = run_logged(argv, {**env, **OFFLINE, **poison}, b)
    assert rc != 0, log[-3000:]
    r014 = [ln for ln in log.splitlines() if "error[R014]" in ln]
    assert len(r014) == 1 and "non-finite gradients at step 5;" in r014[0], log[-3000:]
    ckpts = b / "outputs" / "torchtitan" / "checkpoints"
    assert _steps(ckpts) == [2, 4], log[-3000:]
    recs = _strict((b / "run" / "pretrain" / "metrics.jsonl").read_text())
    assert recs[-1]["event"] == "end" and recs[-1]["status"] == "failed" and recs[-1]["step"] == 5
    assert max(r["step"] for r in recs if "event" not in r) < 5  # the step-5 record is never written
    # the whole checkpoint (weights and optimizer state) as one torch.save file, by torch's own converter
    dcp_to_torch_save(str(ckpts / "step-4"), str(tmp_path / "step-4.pt"))
    flat = {}

    def walk(x, key=""):
        if torch.is_tensor(x):
            flat[key] = x
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{key}/{k}")
        elif isinstance(x, list | tuple):
            for i, v in enumerate(x):
                walk(v, f"{key}/{i}")

    walk(torch.load(tmp_path / "step-4.pt", weights_only=False))
    assert any("weight" in k for k in flat) and _all_finite(flat)
