"""Hypothesis properties of the planner over random small models and clusters.

Every plan the search returns (best and alternatives) must satisfy the invariants that the
backends assert at start-up (torchtitan's world-size check, DeepSpeed's batch identity) and fit.
"""

from __future__ import annotations

from functools import partial

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmc.compiler import timing
from llmc.compiler.hardware import get_gpu
from llmc.compiler.memory import fits, memory_per_gpu
from llmc.compiler.search import search
from llmc.spec.model import Architecture, MoE
from llmc.spec.run import Parallelism


@st.composite
def architectures(draw):
    kv = draw(st.sampled_from([1, 2, 4, 8]))
    heads = kv * draw(st.sampled_from([1, 2, 4]))
    hd = draw(st.sampled_from([16, 32, 64, 128]))
    d = heads * hd
    moe = None
    if draw(st.booleans()):
        e = draw(st.sampled_from([2, 4, 8, 16]))
        moe = MoE(num_experts=e, top_k=draw(st.integers(1, min(e, 4))), num_shared_experts=draw(st.integers(0, 1)),
                  dense_layers=draw(st.integers(0, 1)))
    return Architecture(n_layers=draw(st.integers(2, 24)), d_model=d, n_heads=heads, n_kv_heads=kv,
                        d_ff=d * draw(st.sampled_from([2, 3, 4])), vocab_size=draw(st.sampled_from([256, 1024, 32000])),
                        moe=moe, tied_embeddings=draw(st.booleans()))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch=architectures(), world=st.sampled_from([1, 2, 4, 8, 12, 16, 24, 32, 64, 96, 128]),
       gpu_key=st.sampled_from(["h100-sxm", "a100-80g", "h200"]), seq=st.sampled_from([256, 2048, 8192]),
       batch_mult=st.sampled_from([1, 2, 3, 8, 16]), ac=st.sampled_from([None, None, "full"]))
def test_every_returned_plan_is_valid(arch, world, gpu_key, seq, batch_mult, ac):
    gpu = get_gpu(gpu_key)
    seqs = world * batch_mult
    sm = timing.step_model(arch, seq, "bf16", gpu)

    def mem(plan):
        return memory_per_gpu(arch, plan, seq, "bf16", gpu.hbm_bytes)

    res = search(arch, sm, world=world, gpu=gpu, seq_len=seq, global_batch_seqs=seqs, precision="bf16",
                 pins=Parallelism(activation_checkpointing=ac), memory_fn=partial(mem))
    cands = ([res.best] if res.best else []) + res.alternatives
    for c in cands:
        p = c.plan
        assert p.world == world
        assert p.micro_batch * p.grad_accum * p.dp == seqs  # DeepSpeed's batch identity
        assert p.tp <= gpu.gpus_per_node and gpu.gpus_per_node % p.tp == 0
        assert arch.n_heads % p.tp == 0 and arch.kv_heads % p.tp == 0
        assert 1 <= p.pp <= arch.n_layers
        if p.pp > 1:
            assert p.grad_accum >= p.pp
        if arch.moe is not None:
            assert arch.moe.num_experts % p.ep == 0 and (p.dp_shard * p.cp) % p.ep == 0
        else:
            assert p.ep == 1
        if ac is not None:
            assert p.activation_checkpointing == ac
        m = mem(p)
        assert fits(m) and m.per_gpu_bytes <= gpu.hbm_bytes
        step, mfu, br = timing.step_time(sm, p)
        assert step == c.step_seconds and 0 < mfu < timing.BASE_EFFICIENCY
        assert abs(sum(br.values()) - step) <= 1e-9 * step
    if res.best is not None:
        assert all(a.step_seconds >= res.best.step_seconds for a in res.alternatives)


@settings(max_examples=40, deadline=None)
@given(arch=architectures(), mb=st.sampled_from([1, 2, 4]), tp=st.sampled_from([1, 2]))
def test_recomputation_never_speeds_up_a_step(arch, mb, tp):
    from llmc.compiler.plan import ParallelPlan

    if arch.n_heads % tp or arch.kv_heads % tp:
        tp = 1
    sm = timing.step_model(arch, 2048, "bf16", get_gpu("h100-sxm"))
    steps = [timing.step_time(sm, ParallelPlan(tp=tp, dp_shard=8 // tp, micro_batch=mb, grad_accum=2,
                                               activation_checkpointing=a))[0] for a in ("none", "selective", "full")]
    assert steps[0] <= steps[1] <= steps[2]
