"""TrainJob.from_lock: the compiler's real lockfile, stages (long_context RoPE changes, init_from chains)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from test_build_fakes import lock_for  # noqa: E402

from llmc.runtime.job import TrainJob  # noqa: E402

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
    lock = lock_for(_spec([{"name": "pre", "kind": "pretrain"},
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


def test_continued_training_runs_its_stage_layout_not_the_pipeline_plan(monkeypatch):
    """Pre-training searched (here pinned) a layout with model parallelism; the midtrain and long_context stages ran
    on llmc's native trainer with it ("plan has pp=4" with a pipeline), so such a pipeline stopped at its first
    continued-training stage while its plan reported every stage as fitting. On llmc's trainers they run the layout
    their stage plan sized and timed: FSDP2 over every rank, no TP / PP / CP, the stage's own batch split."""
    import torch

    from llmc.runtime.distributed import DistInfo
    from llmc.runtime.train import _check_layout

    spec = {"name": "t", "model": "llama3-70b", "hardware": {"gpu": "h100-sxm", "count": 64},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl"}], "seq_len": 8192, "tokens": "1T"},
            "training": {"precision": "bf16", "global_batch_tokens": 8_388_608},
            "parallelism": {"pp": 4, "tp": 8},
            "stages": [{"name": "pre", "kind": "pretrain"},
                       {"name": "mid", "kind": "midtrain", "init_from": "pre", "steps": 10},
                       {"name": "long", "kind": "long_context", "init_from": "mid", "seq_len": 16384, "steps": 5,
                        "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position": 8192}}]}
    import yaml

    from llmc.spec.load import loads_spec

    # on torchtitan (the backend such a plan picks) each continued stage runs as its own torchtitan job on its own
    # searched layout, which llmc's trainers refuse (test_continued_stages_on_torchtitan_run_their_own_layout); here the
    # run pins the native trainer for its stages: llmc's own layout
    spec["training"]["backend"] = "native"
    spec["parallelism"] = {"tp": 8}
    lock = lock_for(loads_spec(yaml.safe_dump(spec), file="spec.yaml")[0])
    assert lock["plan"]["tp"] == 8 and all(not s.get("layout") for s in lock["stages"])
    monkeypatch.setenv("WORLD_SIZE", "64")
    for name in ("mid", "long"):
        entry = next(s for s in lock["stages"] if s["name"] == name)
        job = TrainJob.from_lock(lock, name)
        assert entry["memory"]["shard_degree"] == 64 and entry["memory"]["cp"] == 1
        assert (job.dp_replicate, job.dp_shard, job.tp, job.pp, job.cp, job.ep) == (1, 64, 1, 1, 1, 1)
        assert (job.micro_batch, job.grad_accum) == (entry["micro_batch"], entry["grad_accum"])
        assert job.global_batch_seqs == entry["global_batch_seqs"]
        _check_layout(job, DistInfo(0, 64, 0, torch.device("cpu")))
    monkeypatch.setenv("WORLD_SIZE", "8")  # built for 64 GPUs: the stage's batch split does not hold on 8
    with pytest.raises(ValueError, match="8 process"):
        TrainJob.from_lock(lock, "mid")


def test_stages_run_the_loss_slices_and_sampling_batch_their_plan_sized(monkeypatch):
    """examples/pipeline_llama3_8b.yaml: its 32K long-context stage does not fit with the whole logits, so its plan
    slices the loss (512 tokens) and the job computes it so (other stages where their plan chose it); GRPO samples as many
    groups at once as its plan sized the KV cache for. Both are read from each stage's memory in the lock."""
    from test_build_fakes import ROOT

    from llmc.spec.load import load_spec

    run = load_spec(ROOT / "examples" / "pipeline_llama3_8b.yaml")[0]
    # (on its default backend, torchtitan, the continued stages run as their own torchtitan jobs with CP instead)
    lock = lock_for(run.model_copy(update={"training": run.training.model_copy(update={"backend": "native"})}))
    monkeypatch.setenv("WORLD_SIZE", "8")
    for entry in lock["stages"]:
        job = TrainJob.from_lock(lock, entry["name"])
        mem = entry["memory"]
        assert job.loss_chunk == mem["loss_chunk_tokens"] in (0, 512)
        assert job.loss_chunk == 512 or entry["kind"] != "long_context"
        assert job.sampling_groups == mem["sampling_groups"] == (8 if entry["kind"] == "grpo" else None)


def test_pretraining_runs_the_loss_slices_its_search_chose(monkeypatch):
    """Llama 3 8B on 8 H100s on DeepSpeed (as in the README's example): the whole micro-step's logits do not fit without
    recomputing blocks, the search slices the loss instead (the runner's option; and recomputes one block, without which
    the plan's 68.4 GiB is within the memory model's 12% error of the usable 75.2 GiB), and the pre-training job computes
    it in those slices; torchtitan's job has its own chunked loss and never gets a slice from the search."""
    import yaml

    from llmc.spec.load import loads_spec

    spec = {"name": "t", "model": "llama3-8b", "hardware": {"gpu": "h100-sxm", "count": 8},
            "data": {"sources": [{"name": "docs", "path": "docs.jsonl"}], "seq_len": 8192, "tokens": "160B"},
            "training": {"precision": "bf16", "global_batch_tokens": 4_194_304, "backend": "deepspeed"}}
    monkeypatch.setenv("WORLD_SIZE", "8")
    lock = lock_for(loads_spec(yaml.safe_dump(spec), file="spec.yaml")[0])
    assert lock["plan"]["loss_chunk_tokens"] == 512 and lock["plan"]["activation_checkpointing"] == "partial"
    assert TrainJob.from_lock(lock).loss_chunk == 512
    spec["training"]["backend"] = "torchtitan"
    assert lock_for(loads_spec(yaml.safe_dump(spec), file="spec.yaml")[0])["plan"]["loss_chunk_tokens"] == 0


def test_lock_without_plan_shards_over_the_started_ranks(monkeypatch):
    # A post-training-only pipeline has no searched layout; under torchrun with N ranks the native
    # trainer must still run (FSDP over all N) instead of refusing "plan needs 1 process".
    lock = lock_for(_spec([{"name": "mid", "kind": "midtrain", "global_batch_tokens": 1024}]))
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
    lock = lock_for(spec, spec_path=str(tmp_path / "spec.yaml"))
    with pytest.raises(ValueError, match="has not finished"):
        run_stage(lock, "mid", None, tmp_path)
    pre = run_stage(lock, "pre", None, tmp_path)
    mid = run_stage(lock, "mid", None, tmp_path)
    assert pre["status"] == mid["status"] == "done"
    first, fresh = ([r for r in map(json.loads, (tmp_path / "run" / s / "metrics.jsonl").read_text().splitlines())
                     if "loss" in r and "event" not in r][0] for s in ("mid", "pre"))
    assert first["loss"] < fresh["loss"] - 0.3  # it starts where pre-training left off, not from scratch


def _sft_spec():
    return _spec([{"name": "pre", "kind": "pretrain"},
                  {"name": "chat", "kind": "sft", "init_from": "pre", "steps": 10}])


def test_stage_numbers_are_read_from_the_lock_entry_not_recomputed():
    # numbers no formula in the runtime would produce: the job must carry them verbatim
    entry = {"name": "chat", "seq_len": 48, "steps": 77, "lr": 1.7e-4, "min_lr": 1.3e-5, "warmup_steps": 7,
             "schedule": "wsd", "decay_fraction": 0.35, "micro_batch": 3, "grad_accum": 5, "global_batch_seqs": 15,
             "checkpoint_interval": 11}
    lock = lock_for(_sft_spec(), stages=[entry])
    job = TrainJob.from_lock(lock, "chat")
    got = {k: getattr(job, k) for k in entry if k not in ("name", "global_batch_seqs")}
    assert got == {k: v for k, v in entry.items() if k not in ("name", "global_batch_seqs")}
    assert job.global_batch_seqs == 15 and job.kind == "sft" and job.init_from == "pre"
    # the one schedule: wsd holds the peak until the last 35% of the 77 steps, then decays to min_lr
    assert job.lr_factor(6) == pytest.approx(1.0) and job.lr_factor(49) == 1.0
    assert job.lr_factor(77) == pytest.approx(1.3e-5 / 1.7e-4)


def test_missing_stage_number_is_one_line_with_a_hint():
    lock = lock_for(_sft_spec())
    del lock["stages"][1]["min_lr"]
    with pytest.raises(ValueError) as e:
        TrainJob.from_lock(lock, "chat")
    assert str(e.value) == "lock: stage 'chat' has no 'min_lr' (rebuild with `llmc build`)"


def test_peak_flops_is_the_dense_bf16_datasheet_figure():
    import dataclasses

    from llmc.compiler.hardware import get_gpu

    lock = json.loads(GOLDEN.read_text())
    lock["hardware"] = dataclasses.asdict(get_gpu("h100-sxm"))
    lock["spec"]["resolved"]["training"]["precision"] = "fp32"  # H100 SXM5 datasheet: 67 TFLOP/s FP32
    assert TrainJob.from_lock(lock).peak_flops == pytest.approx(67e12, rel=0.01)
    lock["spec"]["resolved"]["training"]["precision"] = "bf16"
    # NVIDIA H100 SXM5: 1,979 TFLOP/s BF16 with sparsity -> 989.4 dense (H100 datasheet)
    assert TrainJob.from_lock(lock).peak_flops == pytest.approx(989.4e12, rel=1e-3)
    lock["spec"]["resolved"]["training"]["precision"] = "fp8"  # MFU is quoted against the bf16 peak
    assert TrainJob.from_lock(lock).peak_flops == pytest.approx(989.4e12, rel=1e-3)


def test_each_stage_recomputes_what_its_plan_sized():
    """The compiled pipeline_tiny lock: pre-training runs the searched plan's mode; every later stage runs the mode
    its own memory estimate assumed (the lock's stage ``memory.activation_checkpointing``), not the searched
    plan's (which once left SFT without recomputation while its memory was sized with full)."""
    lock = json.loads((Path(__file__).parent / "golden" / "build" / "pipeline_tiny" / "plan.lock.json").read_text())
    # (the tiny stages fit without recomputation, so their plans chose none: give two of them other modes)
    for st, mode in zip([s for s in lock["stages"] if s["kind"] != "pretrain"], ("full", "selective"), strict=False):
        st["memory"]["activation_checkpointing"] = mode
    want = {st["name"]: st["memory"]["activation_checkpointing"] for st in lock["stages"]}
    assert set(want.values()) >= {"full", "selective"} and lock["plan"]["activation_checkpointing"] == "none"
    for st in lock["stages"]:
        job = TrainJob.from_lock(lock, st["name"])
        expect = lock["plan"]["activation_checkpointing"] if st["kind"] == "pretrain" else want[st["name"]]
        assert (job.activation_checkpointing, job.ac_layers) == (expect, 0), st["name"]
    bad = json.loads(json.dumps(lock))
    next(s for s in bad["stages"] if s["kind"] == "sft")["memory"]["activation_checkpointing"] = "sometimes"
    with pytest.raises(ValueError, match="stage 'sft' memory"):
        TrainJob.from_lock(bad, "sft")


def test_post_training_stages_of_a_multi_gpu_plan_load_on_every_rank(monkeypatch):
    """Llama 3 8B pre-training on 8 H100 (a searched plan with dp 8) followed by SFT, DPO and GRPO: the runtime
    shards post-training over every started rank, so the compiler splits those batches over all 8 GPUs; the
    runtime used to refuse every post-training stage ("micro_batch*grad_accum*dp = 512 != global_batch_seqs 64")."""
    chat = {"sources": [{"name": "c", "path": "c.jsonl", "kind": "chat"}], "seq_len": 4096, "tokens": 1e8}
    spec = {"name": "t", "model": "llama3-8b", "hardware": {"gpu": "h100-sxm", "count": 8},
            "data": {"sources": [{"name": "d", "path": "d.jsonl"}], "seq_len": 4096, "tokens": 1e10,
                     "tokenizer": {"path": "tok"}},
            "stages": [{"name": "pre", "kind": "pretrain"},
                       {"name": "sft", "kind": "sft", "data": chat},
                       {"name": "dpo", "kind": "dpo", "data": {**chat, "sources": [{"name": "p", "path": "p.jsonl",
                                                                                     "kind": "preference"}]}},
                       {"name": "grpo", "kind": "grpo", "steps": 10, "data": {
                           "sources": [{"name": "q", "path": "q.jsonl", "kind": "prompts"}], "seq_len": 1024,
                           "tokens": 1e6}}]}
    import yaml

    from llmc.spec.load import loads_spec

    run, _ = loads_spec(yaml.safe_dump(spec))  # the loader resolves the preset
    lock = lock_for(run)
    assert lock["plan"]["dp_replicate"] * lock["plan"]["dp_shard"] == 8
    monkeypatch.setenv("WORLD_SIZE", "8")
    entries = {e["name"]: e for e in lock["stages"]}
    for name in ("sft", "dpo", "grpo"):
        job = TrainJob.from_lock(lock, name)
        e = entries[name]
        # every rank runs grad_accum forwards of micro_batch; together they cover the stage's batch
        assert job.micro_batch * job.grad_accum * 8 >= e["global_batch_seqs"]
        assert (job.micro_batch - 1) * job.grad_accum * 8 < e["global_batch_seqs"]
    group = entries["grpo"]["hyper"]["group_size"]
    assert group % entries["grpo"]["micro_batch"] == 0  # a group's update splits into equal slices
