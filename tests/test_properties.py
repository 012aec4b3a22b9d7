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
from llmc.spec.schema import Parallelism


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
        # ties within 0.1 % go to less memory / the simpler plan
        assert all(a.step_seconds >= res.best.step_seconds / 1.001 for a in res.alternatives)


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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tp=st.sampled_from([None, 1, 2, 3, 8, 16]), pp=st.sampled_from([None, 1, 2, 5, 40]),
       cp=st.sampled_from([None, 1, 2]), ep=st.sampled_from([None, 1, 2, 3]),
       dp_shard=st.sampled_from([None, 1, 4, 7]), dp_replicate=st.sampled_from([None, 1, 2]),
       mb=st.sampled_from([None, 1, 3]), sched=st.sampled_from([None, "1F1B", "Interleaved1F1B", "GPipe",
                                                                 "ZBVZeroBubble"]),
       zero=st.sampled_from([None, 0, 1, 2, 3]), model=st.sampled_from(["llama3-8b", "mixtral-8x7b", "tiny"]),
       count=st.sampled_from([1, 8, 16, 24]))
def test_compile_never_raises_on_any_pins(tp, pp, cp, ep, dp_shard, dp_replicate, mb, sched, zero, model, count):
    """Whatever the pins, compile_spec returns diagnostics (errors exit 1 in the CLI), never an exception."""
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    pins = {k: v for k, v in dict(tp=tp, pp=pp, cp=cp, ep=ep, dp_shard=dp_shard, dp_replicate=dp_replicate,
                                  micro_batch=mb, pp_schedule=sched, zero_stage=zero).items() if v is not None}
    par = "parallelism: {" + ", ".join(f"{k}: {v}" for k, v in pins.items()) + "}\n" if pins else ""
    text = (f"name: f\nmodel: {model}\nhardware: {{gpu: h100-sxm, count: {count}}}\n"
            f"data: {{seq_len: 2048, tokens: 10B}}\n{par}")
    run, lines = loads_spec(text)
    c = compile_spec(run, "f.yaml", lines, spec_bytes=text.encode())
    if c.plan is None:
        assert any(d.severity == "error" for d in c.diagnostics)
    else:
        assert c.plan.world == count
        for k, v in pins.items():
            assert getattr(c.plan, k) == v
