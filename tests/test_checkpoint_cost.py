"""Checkpoint save stalls in the predicted run time and cost (llmc/compiler/checkpoint_cost.py), against hand counts
of what each backend writes (torchtitan / llmc DCP: fp32 params + AdamW m, v; DeepSpeed's model and ZeRO files)."""

from __future__ import annotations

import math

import pytest

from llmc.compiler import checkpoint_cost, timing
from llmc.compiler.compile import compile_spec
from llmc.compiler.hardware import get_gpu
from llmc.compiler.plan import ParallelPlan
from llmc.spec.load import loads_spec
from llmc.spec.presets import PRESETS

P_8B = 8_030_261_248  # Meta-Llama-3-8B parameters (its config: 8.03B)
H100 = get_gpu("h100-sxm")
GB = 1e9


def _compile(extra_ckpt: str = "", backend: str = "torchtitan", budget: str = ""):
    text = f"""\
name: ck
model: llama3-8b
hardware: {{gpu: h100-sxm, count: 8, gpus_per_node: 8, usd_per_gpu_hour: 2.5}}
data: {{seq_len: 8192, tokens: 165B}}
training:
  backend: {backend}
  global_batch_tokens: 4_194_304
  checkpoint: {{interval_steps: 50{extra_ckpt}}}
{budget}"""
    run, lines = loads_spec(text, file="spec.yaml")
    return compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())


def _numbers(plan, backend="torchtitan", precision="bf16", steps=1000, interval=50, step_seconds=60.0,
             async_save=False, write_gbps=None, gpu=H100, arch="llama3-8b"):
    a = PRESETS[arch]
    sm = timing.step_model(a, 8192, precision, gpu, backend)
    from llmc.compiler.params import params_total

    return checkpoint_cost.checkpoint_numbers(
        sm, plan, gpu, backend=backend, params_total=params_total(a), precision=precision, steps=steps,
        interval=interval, step_seconds=step_seconds, async_save=async_save, write_gbps=write_gbps)


# ----------------------------------------------------------------------------------------------- bytes per save


@pytest.mark.parametrize("plan", [ParallelPlan(dp_shard=8), ParallelPlan(dp_shard=4, tp=2),
                                  ParallelPlan(dp_shard=2, pp=4, grad_accum=4)], ids=["fsdp8", "fsdp4-tp2", "pp4"])
def test_dcp_one_node_writes_the_whole_fp32_state_once(plan):
    # torchtitan's DCP: fp32 params (4) + AdamW exp_avg (4) + exp_avg_sq (4) per parameter, every shard once;
    # on one node the node writes all of it whatever the layout: 12 x 8,030,261,248 = 96.36 GB
    ck = _numbers(plan)
    assert ck.state_bytes == 12 * P_8B
    assert ck.node_bytes == pytest.approx(12 * P_8B, rel=1e-9)
    assert ck.bytes_per_param == 12


def test_dcp_fsdp_gpu_share_is_a_shard_of_the_state():
    ck = _numbers(ParallelPlan(dp_shard=8))
    assert ck.gpu_bytes == pytest.approx(12 * P_8B / 8, rel=1e-5)  # the final norm is not in a block: 4096 params


def test_dcp_hsdp_replicas_share_the_writing():
    # 2 nodes, HSDP: FSDP over 8 GPUs of a node, 2 replicas. DCP's planner deduplicates the replicated shards,
    # balancing them over both replicas (dedup_save_to_lowest_rank=False): each node writes half the state
    ck = _numbers(ParallelPlan(dp_shard=8, dp_replicate=2))
    assert ck.node_bytes == pytest.approx(12 * P_8B / 2, rel=1e-5)
    assert ck.gpu_bytes == pytest.approx(12 * P_8B / 8, rel=1e-5)  # each GPU still stages its whole shard
    # pure FSDP over both nodes: each node writes its 8 GPUs' 1/16 shards, the same half
    assert _numbers(ParallelPlan(dp_shard=16)).node_bytes == pytest.approx(12 * P_8B / 2, rel=1e-5)


def test_deepspeed_files_per_zero_stage():
    # DeepSpeed 0.19.8 save_checkpoint: rank 0 the bf16 module (2 B/param) unless ZeRO-3; every rank its ZeRO
    # partition of fp32 master + exp_avg + exp_avg_sq (12 B/param / dp); ZeRO-0 bf16: FP16_Optimizer's state
    # (fp32 master 4 + m, v 8) in rank 0's file with the module: 14 B/param
    z3 = _numbers(ParallelPlan(dp_shard=8, zero_stage=3), backend="deepspeed")
    assert z3.node_bytes == pytest.approx(12 * P_8B) and z3.state_bytes == pytest.approx(12 * P_8B)
    z1 = _numbers(ParallelPlan(dp_shard=16, zero_stage=1), backend="deepspeed")  # 2 nodes: node 0 has rank 0
    assert z1.node_bytes == pytest.approx(2 * P_8B + 8 * 12 * P_8B / 16)
    assert z1.state_bytes == pytest.approx(14 * P_8B)
    z0 = _numbers(ParallelPlan(dp_shard=16, zero_stage=0), backend="deepspeed")
    assert z0.node_bytes == pytest.approx(14 * P_8B) and z0.gpu_bytes == pytest.approx(14 * P_8B)
    z0_fp32 = _numbers(ParallelPlan(dp_shard=2, zero_stage=0), backend="deepspeed", precision="fp32")
    assert z0_fp32.node_bytes == pytest.approx(12 * P_8B)  # fp32 module is the master: 4 + 8


def test_deepspeed_run_ends_with_rank_0s_model_pt():
    """llmc's DeepSpeed runner writes the module's weights once more after its last engine save (model.pt, rank 0,
    then hashed by llmc's save_checkpoint): 2 B/param bf16 (4 fp32) at 1 GB/s, hashed at 1 GB/s, once per run; the
    DCP backends end with no such file."""
    for precision, w in (("bf16", 2), ("fp32", 4)):
        ds = _numbers(ParallelPlan(dp_shard=8, zero_stage=3), backend="deepspeed", precision=precision)
        assert ds.final_bytes == pytest.approx(w * P_8B)
        assert ds.final_seconds == pytest.approx(2 * w * P_8B / 1e9)  # written, then re-read and hashed
        assert ds.total_seconds == pytest.approx(20 * 12 * P_8B / 1e9 + 2 * w * P_8B / 1e9)
    assert _numbers(ParallelPlan(dp_shard=8)).final_seconds == 0.0


# ----------------------------------------------------------------------------------------------- stalls


def test_sync_stall_is_node_bytes_over_the_write_bandwidth():
    ck = _numbers(ParallelPlan(dp_shard=8), write_gbps=4.0)
    assert ck.mode == "sync" and ck.write_gbps == 4.0
    assert ck.stall_seconds == pytest.approx(12 * P_8B / 4e9)  # 24.09 s
    # the table's conservative default: 1 GB/s per node
    d = _numbers(ParallelPlan(dp_shard=8))
    assert d.write_gbps == 1.0 and d.stall_seconds == pytest.approx(12 * P_8B / 1e9)  # 96.36 s
    # steps 1000, every 50: 20 saves, each a full write
    assert d.saves == 20 and d.total_seconds == pytest.approx(20 * 12 * P_8B / 1e9)


def test_async_stall_is_staging_the_gpu_share_over_pcie():
    # dcp.async_save stages the GPU's state dict to host memory, then writes in a thread: the loop waits for the
    # copy over the GPU's PCIe link (the table has none for H100 SXM: 32 GB/s per direction, x 0.8 achieved)
    ck = _numbers(ParallelPlan(dp_shard=8), async_save=True, steps=1000, interval=50, step_seconds=60.0)
    staging = (12 * P_8B / 8) / (32e9 * 0.8)  # 0.47 s
    assert ck.mode == "async"
    assert ck.stall_seconds == pytest.approx(staging, rel=1e-5)
    # 20 saves: 19 staged, the last written in full before the job ends
    assert ck.total_seconds == pytest.approx(19 * staging + 12 * P_8B / 1e9, rel=1e-5)


def test_async_save_waits_for_a_write_longer_than_the_interval():
    # 50 steps x 1 s = 50 s between saves, a 96.36 s write: the next save waits 46.36 s for the previous one
    ck = _numbers(ParallelPlan(dp_shard=8), async_save=True, interval=50, step_seconds=1.0)
    staging = (12 * P_8B / 8) / (32e9 * 0.8)
    assert ck.stall_seconds == pytest.approx(staging + 12 * P_8B / 1e9 - 50.0, rel=1e-5)


@pytest.mark.parametrize("backend", ["native", "torchtitan", "deepspeed"])
def test_the_planned_save_mode_is_the_one_the_runtime_uses(backend):
    """The plan's sync / async saves are what runs: llmc's trainer reads the lock's choice (TrainJob.checkpoint_async,
    the torchtitan job the same hyper.checkpoint_async), by default async for a state over 100 GB (Llama 3 70B:
    12 x 70.6e9 B) and sync for 8B (96 GB); llmc's DeepSpeed runner saves synchronously whatever the lock says."""
    pytest.importorskip("torch")
    import json

    from llmc.emit.lock import lock_text
    from llmc.runtime.job import TrainJob

    for model, count, want in (("llama3-8b", 8, False), ("llama3-70b", 64, True)):
        text = (f"name: m\nmodel: {model}\nhardware: {{gpu: h100-sxm, count: {count}}}\n"
                f"data: {{seq_len: 8192, tokens: 1T}}\ntraining: {{backend: {backend}, global_batch_tokens: 4194304}}\n")
        run, lines = loads_spec(text, file="spec.yaml")
        c = compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())
        assert c.time is not None, [d.message for d in c.diagnostics if d.severity == "error"]
        assert c.hyper.checkpoint_async is want
        runs_async = TrainJob.from_lock(json.loads(lock_text(c))).checkpoint_async and backend != "deepspeed"
        assert c.time.checkpoint.mode == ("async" if runs_async else "sync"), (backend, model)
        assert runs_async == (want and backend != "deepspeed")


def test_save_count_matches_the_trainers_save_steps():
    # every interval-th step before the last, and the last
    assert checkpoint_cost.save_count(39_340, 50) == 787
    assert checkpoint_cost.save_count(100, 50) == 2
    assert checkpoint_cost.save_count(101, 50) == 3
    assert checkpoint_cost.save_count(10, 50) == 1


# ----------------------------------------------------------------------------------------------- the plan


def test_run_days_and_cost_include_the_saves():
    c = _compile(", async_mode: false")
    tm, ck = c.time, c.time.checkpoint
    steps = math.ceil(165e9 / 4_194_304)  # 39,340
    saves = math.ceil(steps / 50)  # 787
    assert (tm.steps, ck.saves, ck.interval) == (steps, saves, 50)
    stall = 12 * P_8B / 1e9  # one node writes the whole 96.36 GB at 1 GB/s
    assert ck.stall_seconds == pytest.approx(stall, rel=1e-9)
    total = steps * tm.step_seconds + saves * stall
    assert tm.days == pytest.approx(total / 86400, rel=1e-12)
    assert c.cost.gpu_hours == pytest.approx(total / 3600 * 8, rel=1e-12)
    assert c.cost.usd == pytest.approx(total / 3600 * 8 * 2.5, rel=1e-12)
    # step time and MFU are per training step: MFU = tokens/step x FLOPs/token / (step x GPUs x peak)
    assert tm.mfu == pytest.approx(4_194_304 * c.compute.flops_per_token / (tm.step_seconds * 8 * 989.4e12), rel=1e-9)


def test_spec_write_bandwidth_and_async_reach_the_plan():
    c = _compile(", async_mode: false, write_gbps: 4")
    ck = c.time.checkpoint
    assert ck.write_gbps == 4.0 and ck.write_source == "training.checkpoint.write_gbps"
    assert ck.stall_seconds == pytest.approx(12 * P_8B / 4e9, rel=1e-9)
    a = _compile(", async_mode: true").time.checkpoint
    assert a.mode == "async"
    assert a.total_seconds == pytest.approx(786 * a.gpu_bytes / 25.6e9 + 12 * P_8B / 1e9, rel=1e-9)
    ds = _compile(", async_mode: true", backend="deepspeed").time.checkpoint
    assert ds.mode == "sync"  # the DeepSpeed runner ignores async_mode


def test_budget_checks_use_the_days_with_the_saves():
    c = _compile(", async_mode: false")
    train_days = c.time.steps * c.time.step_seconds / 86400
    limit = (train_days + c.time.days) / 2  # the training steps fit, the saves do not
    tight = _compile(", async_mode: false", budget=f"budget: {{max_days: {limit:.4f}}}\n")
    b001 = [d for d in tight.diagnostics if d.code == "B001"]
    assert b001 and "checkpoint saves" in b001[0].message


def test_llmcs_trainer_stalls_to_hash_what_it_wrote():
    """llmc's trainer re-reads and sha256-hashes every file a rank wrote before a checkpoint counts
    (runtime/checkpoint.py _finalize): Llama 3 8B on 8 GPUs of one node, each rank 12 P / 8 bytes at 1 GB/s, after a
    synchronous write of 12 P at 1 GB/s, or after an asynchronous save's staging; torchtitan writes no hashes."""
    plan = ParallelPlan(dp_shard=8)
    hashing = 12 * P_8B / 8 / 1e9
    native = _numbers(plan, backend="native")
    titan = _numbers(plan, backend="torchtitan")
    assert native.hash_seconds == pytest.approx(hashing, rel=1e-6) and titan.hash_seconds == 0.0
    assert native.stall_seconds == pytest.approx(12 * P_8B / 1e9 + hashing, rel=1e-6)
    assert titan.stall_seconds == pytest.approx(12 * P_8B / 1e9, rel=1e-6)
    assert native.total_seconds == pytest.approx(native.saves * (12 * P_8B / 1e9 + hashing), rel=1e-6)
    # async, with a long interval: staging over PCIe (32 GB/s x 0.8), then the hashing at the next save
    a = _numbers(plan, backend="native", async_save=True, interval=50, step_seconds=60.0)
    assert a.stall_seconds == pytest.approx((12 * P_8B / 8) / (32e9 * 0.8) + hashing, rel=1e-5)
