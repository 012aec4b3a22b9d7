"""Checkpoint safety: a resume never loads what does not fit, and never loses the user's newest complete state.

* A checkpoint of another model shape is refused before anything is loaded, with one line naming the first
  mismatching tensor and both shapes (the shapes below are hand computed from the architectures: a SwiGLU ``w1``
  is ``[d_ff, d_model]``, a LoRA ``A`` ``[rank, in_features]``): native (DCP) resume, full-layout load, init_from,
  post-training (LoRA) resume and DeepSpeed resume (from what DeepSpeed's ``*model_states.pt`` records).
* A save killed midway leaves the newest complete checkpoint as the one resumed; pruning (``keep_latest``) only
  ever deletes checkpoints older than the one just completed, never it nor a good one in favour of a partial or
  later one; DeepSpeed's saves are made atomic (tag ``step-N.tmp``, renamed, then ``latest``).
* A checkpoint written by another stage is refused with one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from test_runtime_train import losses, make_lock, run  # noqa: E402

from llmc.runtime import corpus  # noqa: E402
from llmc.runtime.checkpoint import (  # noqa: E402
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    save_checkpoint,
)

PY = sys.executable
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
       "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("docs")
    corpus.write_corpus(d / "docs.jsonl", max_docs=300)
    return d / "docs.jsonl"


def _one_line(msg: str) -> None:
    assert "\n" not in msg and "Traceback" not in msg, msg


# ----------------------------------------------------------------------------- shapes


def test_native_resume_of_another_model_shape_is_one_line(tmp_path, docs):
    """Resume a d_ff 128 run's sharded (DCP) checkpoint with a d_ff 96 lock: refused before loading (DCP's own
    size check raised a CheckpointException traceback from inside dcp.load), in process and on the command line."""
    lock = make_lock(tmp_path / "a", docs, steps=4, interval=2)
    out = tmp_path / "a" / "o"
    run(lock, out, stop_after=2)
    ck = out / "checkpoints" / "step-00000002"
    other = make_lock(tmp_path / "b", docs, steps=4, interval=2, d_ff=96)
    with pytest.raises(CheckpointError) as e:
        run(other, out)
    msg = str(e.value)
    _one_line(msg)
    assert f"checkpoint {ck}: tensor layers.0.feed_forward.w1.weight has shape [128, 64], this model's is [96, 64]" \
        in msg, msg
    assert "another model" in msg and "aside" in msg
    p = subprocess.run([PY, "-m", "llmc.runtime.entry", "--lock", str(other), "--out", str(out)], env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr[-2000:]
    err = p.stderr.strip().splitlines()
    assert len(err) == 1 and "error[R002]" in err[0] and "[128, 64]" in err[0] and "[96, 64]" in err[0], p.stderr
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [2]  # nothing written over it


def _net(hidden: int, layers: int = 2) -> torch.nn.Module:
    mods = [torch.nn.Linear(8, hidden)] + [torch.nn.Linear(hidden, hidden) for _ in range(layers - 2)]
    return torch.nn.Sequential(*mods, torch.nn.Linear(hidden, 4))


def test_full_checkpoint_and_init_from_of_another_shape_are_one_line(tmp_path):
    """Full layout (model.pt): another width, a missing and an extra tensor, each named with the checkpoint."""
    torch.manual_seed(0)
    model = _net(16)
    opt = torch.optim.AdamW(model.parameters())
    ck = save_checkpoint(tmp_path, 3, model, opt, {"tokens": 3})
    narrow = _net(12)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(ck, narrow, torch.optim.AdamW(narrow.parameters()))
    _one_line(str(e.value))
    assert str(e.value).startswith(f"checkpoint {ck}: tensor 0.weight has shape [16, 8], this model's is [12, 8]")
    deeper = _net(16, layers=3)  # 0: 8 -> 16, 1: 16 -> 16 (the checkpoint's 1 is 16 -> 4), 2: 16 -> 4
    with pytest.raises(CheckpointError, match=r"tensor 1.weight has shape \[4, 16\], this model's is \[16, 16\]"):
        load_model_weights(deeper, ck)  # init_from
    longer = torch.nn.Sequential(*_net(16), torch.nn.Linear(4, 4))  # the checkpoint's two layers, and a third
    with pytest.raises(CheckpointError, match=r"has no tensor 2.weight \(shape \[4, 4\] in this model\)"):
        load_model_weights(longer, ck)
    shallow = torch.nn.Sequential(torch.nn.Linear(8, 16))
    with pytest.raises(CheckpointError, match=r"holds tensor 1.weight \(shape \[4, 16\]\) that this model does not"):
        load_model_weights(shallow, ck)
    # the same model loads, weights equal
    same = _net(16)
    load_checkpoint(ck, same, torch.optim.AdamW(same.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters(), strict=True))


def test_posttrain_lora_resume_with_another_rank_is_one_line(tmp_path):
    """A LoRA sft stage stopped at step 3 (rank 4 adapters), resumed with rank 8: lora_A is [4, 32] in the
    checkpoint (rank x d_model), [8, 32] in the model; torch's load_state_dict raised a multi-line size mismatch."""
    from test_posttrain_resume import ARCH, LORA, TOK, _base, builtin

    from llmc.runtime.job import TrainJob
    from llmc.runtime.posttrain import run_stage
    from llmc.spec.model import Architecture
    from llmc.spec.schema import make_stage

    def job(rank: int) -> TrainJob:
        st = make_stage(name="sft", kind="sft", init_from="base", data=builtin("sft"), lora={**LORA, "rank": rank})
        return TrainJob(arch=Architecture(**ARCH), sources=[], seq_len=96, steps=4, name="p", stage="sft", kind="sft",
                        lr=3e-3, micro_batch=3, init_from="base", stage_spec=st, log_every=1000,
                        checkpoint_interval=2, keep_latest=3)

    _base(tmp_path)
    out = tmp_path / "sft"
    assert run_stage(job(4), out, tokenizer=TOK, stop_after=3)["status"] == "stopped"
    with pytest.raises(CheckpointError) as e:
        run_stage(job(8), out, tokenizer=TOK)
    msg = str(e.value)
    _one_line(msg)
    assert "resume/step-00000003" in msg and "lora_A" in msg and "shape [4, 32], this model's is [8, 32]" in msg, msg


# ----------------------------------------------------------------------------- interrupted saves and pruning


def test_a_save_killed_midway_resumes_from_the_newest_complete_checkpoint(tmp_path, docs, monkeypatch):
    """The save of step 4 dies inside dcp.save (shards half written): the step-4 folder never appears, the rerun
    resumes from step 2 and its losses are those of the uninterrupted run."""
    import torch.distributed.checkpoint as dcp

    lock = make_lock(tmp_path, docs, steps=6, interval=2)
    run(lock, tmp_path / "ref")
    real = dcp.save

    def dies_at_step_4(state, checkpoint_id, **kw):
        if "step-00000004" in str(checkpoint_id):
            Path(checkpoint_id).mkdir(parents=True, exist_ok=True)
            (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"half")
            raise OSError("killed")
        return real(state, checkpoint_id=checkpoint_id, **kw)

    monkeypatch.setattr(dcp, "save", dies_at_step_4)
    with pytest.raises(OSError, match="killed"):
        run(lock, tmp_path / "cut")
    monkeypatch.setattr(dcp, "save", real)
    ck = tmp_path / "cut" / "checkpoints"
    assert latest_checkpoint(ck, log=lambda *_: None).name == "step-00000002"
    assert (ck / "step-00000004.tmp").is_dir()
    res = run(lock, tmp_path / "cut")
    assert res["status"] == "done"
    ev = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ev if r.get("event") == "resume"] == [2]
    ref, cut = losses(tmp_path / "ref"), losses(tmp_path / "cut")
    assert sorted(cut) == list(range(1, 7)) and all(cut[s] == ref[s] for s in ref), (ref, cut)


@pytest.mark.parametrize("sharded", [False, True])
def test_pruning_keeps_the_new_checkpoint_and_never_a_later_one_for_older(tmp_path, sharded):
    """keep_latest 1 with a step-8 folder already there (another run's): saving step 2 keeps step 2 (it was the
    oldest of [2, 8] and went at once), step 4 then prunes step 2 only; step 8 is not this run's to delete."""
    model = _net(16)
    opt = torch.optim.AdamW(model.parameters())
    save_checkpoint(tmp_path, 8, model, opt, {"tokens": 8}, sharded=sharded)
    save_checkpoint(tmp_path, 2, model, opt, {"tokens": 2}, keep_latest=1, sharded=sharded)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 8]
    save_checkpoint(tmp_path, 4, model, opt, {"tokens": 4}, keep_latest=1, sharded=sharded)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8]
    # a second save of step 4 replaces it (complete before the old one goes)
    save_checkpoint(tmp_path, 4, model, opt, {"tokens": 44}, keep_latest=1, sharded=sharded)
    assert json.loads((tmp_path / "step-00000004" / "train.json").read_text())["tokens"] == 44
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000004", "step-00000008"]


# ----------------------------------------------------------------------------- another stage


def test_resume_from_another_stages_checkpoint_is_refused(tmp_path, docs):
    """A midtrain stage pointed at pretrain's unfinished output folder: refused by name (it resumed pretrain's
    step-2 state as its own before)."""
    from llmc.runtime.entry import prepare_assets
    from llmc.runtime.job import TrainJob
    from llmc.runtime.train import TrainingError, train

    lock = make_lock(tmp_path, docs, steps=4, interval=2)
    out = tmp_path / "o"
    run(lock, out, stop_after=2)
    job = TrainJob.from_lock(json.loads(lock.read_text()))
    assets = prepare_assets(job, tmp_path, log=lambda *_: None)
    with pytest.raises(TrainingError) as e:
        train(job.replace(stage="midtrain", kind="midtrain"), out, assets, echo=False)
    msg = str(e.value)
    _one_line(msg)
    assert "written by stage 'pretrain' (kind pretrain), not by this stage 'midtrain' (kind midtrain)" in msg, msg


def test_native_stage_refuses_another_stages_done_folder(tmp_path, docs):
    """`python -m llmc.runtime.entry` pointed at a folder where another stage finished: refused by name (it
    returned that stage's DONE.json as its own result and trained nothing)."""
    from llmc.runtime.entry import run_stage

    lock = make_lock(tmp_path, docs, steps=4, interval=2)
    out = tmp_path / "o"
    out.mkdir()
    (out / "DONE.json").write_text(json.dumps({"status": "done", "stage": "sft", "step": 4}))
    with pytest.raises(ValueError, match="stage 'sft' finished in this folder, not stage 'pretrain'") as e:
        run_stage(json.loads(lock.read_text()), None, out, tmp_path)
    _one_line(str(e.value))
    assert not (out / "checkpoints").exists()


# ----------------------------------------------------------------------------- DeepSpeed

_DS_KILL = textwrap.dedent("""
    import os, sys
    import deepspeed.runtime.engine as eng
    real = eng.DeepSpeedEngine._save_zero_checkpoint
    def dies(self, save_path, tag):  # the model states of step 8 are written, the optimizer shards not yet
        if "00000008" in str(tag):
            os._exit(9)
        return real(self, save_path, tag)
    eng.DeepSpeedEngine._save_zero_checkpoint = dies
    from llmc.runtime.ds_train import main
    sys.exit(main(sys.argv[1:]))
""")


def _ds_build(tmp: Path, docs: Path, d_ff: int = 128) -> Path:
    from test_build_fakes import make_compiled, make_run

    from llmc.compiler.plan import ParallelPlan
    from llmc.emit.deepspeed import deepspeed_config
    from llmc.emit.lock import lock_text

    r = make_run(name="ds", model={"name": "tiny", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2,
                                   "d_ff": d_ff, "vocab_size": 512, "max_seq_len": 64},
                 data={"seq_len": 32, "tokens": 1e5, "sources": [{"name": "docs", "path": str(docs), "format": "jsonl"}],
                       "tokenizer": {"train": True, "vocab_size": 512}},
                 hardware={"gpu": "cpu", "count": 1},
                 training={"precision": "fp32", "optimizer": {"lr": 3e-3}, "log_every": 1,
                           "schedule": {"warmup_steps": 1}, "checkpoint": {"keep_latest": 1}},
                 parallelism={"zero_stage": 1})
    c = make_compiled(r, plan=ParallelPlan(dp_shard=1, micro_batch=4, grad_accum=1), global_batch_seqs=4, steps=12,
                      warmup=1, stages=[{"name": "pretrain", "kind": "pretrain", "init_from": None,
                                         "checkpoint_interval": 4}])
    cfg, _ = deepspeed_config(c)
    (tmp / "deepspeed").mkdir(parents=True, exist_ok=True)
    (tmp / "plan.lock.json").write_text(lock_text(c))
    (tmp / "deepspeed" / "ds_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return tmp


def _ds_args(b: Path, out: Path, *extra: str) -> list[str]:
    """llmc's DeepSpeed runner's arguments for build ``b``, its output in ``out``."""
    return ["--lock", str(b / "plan.lock.json"), "--ds-config", str(b / "deepspeed" / "ds_config.json"), "--out",
            str(out), "--assets", str(b), *extra]


def _ds(b: Path, out: Path, *extra: str, script: Path | None = None) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "llmc.runtime.ds_train"]
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
           "localhost:0", *target, *_ds_args(b, out, *extra)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_deepspeed_killed_save_then_short_run_keeps_a_resumable_checkpoint(tmp_path, docs):
    """DeepSpeed, 1 process, ZeRO-1, checkpoints every 4 steps, keep_latest 1. Run 1 dies inside the step-8 save
    (model states written, optimizer shards not): ``latest`` still names step 4. Run 2 stops at step 6 (``--steps
    6``): its step-6 checkpoint must survive pruning (by name order the partial step-8 folder outranked it, and both
    good checkpoints were deleted, ``latest`` naming a missing step-6). A lock of another d_ff is refused with one
    line before DeepSpeed loads anything; run 3 resumes from step 6 and finishes. Run 1 is a launch of its own (its
    process dies); runs 2 and 3 and the refused one share one launch, each through ds_train's main on its own
    command line, the checkpoint folder recorded after run 2 and after the refusal."""
    pytest.importorskip("deepspeed")
    from test_deepspeed import ds_main_cases, ds_main_result, ds_snapshot

    b = _ds_build(tmp_path / "b", docs)
    out = tmp_path / "o"
    ds = out / "checkpoints" / "deepspeed"
    script = tmp_path / "kill.py"
    script.write_text(_DS_KILL)
    r = _ds(b, out, script=script)
    assert r.returncode != 0 and (ds / "latest").read_text().strip() == "step-00000004", r.stderr[-3000:]

    wide = _ds_build(tmp_path / "wide", docs, d_ff=96)
    cases = tmp_path / "cases"
    runs = ds_main_cases({"run2": (cases / "run2", _ds_args(b, out, "--steps", "6")),
                          "after-run2": (cases / "after-run2", ds),
                          "wide": (cases / "wide", _ds_args(wide, out)),
                          "after-wide": (cases / "after-wide", ds),
                          "run3": (cases / "run3", _ds_args(b, out))}, 1)
    r = ds_main_result(runs["run2"], 1)
    assert r["rc"] == [0] and "at step 4" in r["stdout"], r["stdout"][-2000:] + r["stderr"][-3000:]
    snap = ds_snapshot(runs["after-run2"])
    assert snap["latest"].strip() == "step-00000006"
    assert snap.get("step-00000006/mp_rank_00_model_states.pt") == "file"
    assert "step-00000004" not in snap  # keep_latest 1: the older one goes, after step 6 is complete

    r = ds_main_result(runs["wide"], 1)
    err = r["stderr"].strip().splitlines()
    assert r["rc"] != [0] and any("error[R002]" in x for x in err), r["stderr"][-3000:]
    line = next(x for x in err if "error[R002]" in x)
    assert "tensor layers.0.feed_forward.w1.weight has shape [128, 64], this model's is [96, 64]" in line, line
    assert ds_snapshot(runs["after-wide"])["latest"].strip() == "step-00000006"  # untouched

    r = ds_main_result(runs["run3"], 1)
    assert r["rc"] == [0] and "at step 6" in r["stdout"], r["stdout"][-2000:] + r["stderr"][-3000:]
    done = json.loads((out / "DONE.json").read_text())
    assert done["status"] == "done" and done["step"] == 12
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x["step"] for x in recs if "loss" in x and "event" not in x]
    assert steps == list(range(1, 13)), steps


def test_deepspeed_refuses_another_stages_done_folder(tmp_path, docs):
    """A DeepSpeed pretrain pointed at a folder where another stage finished: refused by name (it returned that
    stage's DONE.json as its own result and trained nothing)."""
    pytest.importorskip("deepspeed")
    from llmc.runtime.ds_train import train

    b = _ds_build(tmp_path / "b", docs)
    out = tmp_path / "o"
    out.mkdir()
    (out / "DONE.json").write_text(json.dumps({"status": "done", "stage": "sft", "step": 4}))
    lock = json.loads((b / "plan.lock.json").read_text())
    cfg = json.loads((b / "deepspeed" / "ds_config.json").read_text())
    with pytest.raises(ValueError, match="stage 'sft' finished in this folder, not stage 'pretrain'"):
        train(lock, cfg, None, out, b)
