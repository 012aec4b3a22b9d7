"""TrainJob.from_lock: the compiler's real lockfile, stages (long_context RoPE changes, init_from chains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from llmc.runtime.job import TrainJob, minimal_lock  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "build" / "tiny_cpu" / "plan.lock.json"
ARCH = dict(name="micro", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, vocab_size=512,
            max_seq_len=64)


def test_from_compiled_lock_reads_hyper_and_plan():
    lock = json.loads(GOLDEN.read_text())
    job = TrainJob.from_lock(lock)
    h, p = lock["hyper"], lock["plan"]
    assert (job.lr, job.min_lr, job.warmup_steps, job.steps, job.seq_len, job.schedule) == (
        h["lr"], h["min_lr"], h["warmup_steps"], h["steps"], h["seq_len"], h["schedule"])
    assert (job.micro_batch, job.grad_accum, job.dp_shard, job.tp) == (
        p["micro_batch"], p["grad_accum"], p["dp_shard"], p["tp"])
    assert job.global_batch_seqs == h["global_batch_seqs"]
    assert job.checkpoint_interval == h["checkpoint_interval"]
    assert job.arch.name == "tiny" and job.stage == "pretrain"
    assert job.flops_per_token == lock["compute"]["flops_per_token"]
    assert TrainJob.from_lock(lock, "pretrain").steps == job.steps


def _spec(stages):
    return {"name": "t", "model": ARCH, "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl"}], "seq_len": 32, "tokens": 2048,
                     "tokenizer": {"train": True, "vocab_size": 512}},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 1e-3},
                         "checkpoint": {"interval_steps": 100}},
            "stages": stages}


def test_long_context_stage_changes_rope_and_seq_len():
    lock = minimal_lock(_spec([{"name": "pre", "kind": "pretrain"},
                               {"name": "long", "kind": "long_context", "init_from": "pre", "seq_len": 128,
                                "rope_theta": 40000.0, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                                         "original_max_position": 64},
                                "steps": 3, "global_batch_tokens": 512}]))
    job = TrainJob.from_lock(lock, "long")
    assert (job.kind, job.seq_len, job.steps, job.init_from) == ("long_context", 128, 3, "pre")
    assert job.arch.rope_theta == 40000.0 and job.arch.rope_scaling.type == "yarn"
    assert job.arch.max_seq_len == 128 and job.global_batch_seqs * job.seq_len == 512
    with pytest.raises(ValueError, match="no stage named 'nope'"):
        TrainJob.from_lock(lock, "nope")


def test_lock_without_plan_shards_over_the_started_ranks(monkeypatch):
    # A post-training-only pipeline has no searched layout; under torchrun with N ranks the native
    # trainer must still run (FSDP over all N) instead of refusing "plan needs 1 process".
    lock = minimal_lock(_spec([{"name": "mid", "kind": "midtrain", "global_batch_tokens": 1024}]))
    lock["plan"] = None
    monkeypatch.setenv("WORLD_SIZE", "4")
    job = TrainJob.from_lock(lock, "mid")
    assert (job.dp_replicate, job.dp_shard, job.tp) == (1, 4, 1)
    assert job.global_batch_seqs * job.seq_len >= 1024
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert TrainJob.from_lock(lock, "mid").dp_shard == 1


def test_midtrain_starts_from_pretrain_weights(tmp_path):
    from llmc.runtime import corpus
    from llmc.runtime.entry import run_stage

    corpus.write_corpus(tmp_path / "docs.jsonl", max_docs=200)
    spec = _spec([{"name": "pre", "kind": "pretrain", "steps": 6},
                  {"name": "mid", "kind": "midtrain", "init_from": "pre", "steps": 2, "lr": 1e-3}])
    spec["training"]["optimizer"]["lr"] = 3e-3
    lock = minimal_lock(spec, spec_path=str(tmp_path / "spec.yaml"))
    with pytest.raises(ValueError, match="has not finished"):
        run_stage(lock, "mid", None, tmp_path)
    pre = run_stage(lock, "pre", None, tmp_path)
    mid = run_stage(lock, "mid", None, tmp_path)
    assert pre["status"] == mid["status"] == "done"
    first = [json.loads(x) for x in (tmp_path / "run" / "mid" / "metrics.jsonl").read_text().splitlines()][0]
    fresh = [json.loads(x) for x in (tmp_path / "run" / "pre" / "metrics.jsonl").read_text().splitlines()][0]
    assert first["loss"] < fresh["loss"] - 0.3  # it starts where pre-training left off, not from scratch
