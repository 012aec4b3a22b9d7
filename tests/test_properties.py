"""Hypothesis properties of the planner over random small models and clusters.

Every plan the search returns (best and alternatives) must satisfy the invariants that the
backends assert at start-up (torchtitan's world-size check, DeepSpeed's batch identity) and fit.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from llmc.compiler import timing
from llmc.compiler.compile import compile_spec
from llmc.compiler.hardware import get_gpu
from llmc.compiler.memory import fits, memory_per_gpu
from llmc.compiler.search import search
from llmc.diagnostics import SpecError
from llmc.spec.load import load_spec, loads_spec
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
# found by this test: a pinned cp with TP left free made P005's widest layout tp 8 x cp 2 on 8 GPUs (division by 0)
@example(tp=None, pp=None, cp=2, ep=None, dp_shard=None, dp_replicate=None, mb=3, sched=None, zero=None,
         model="llama3-8b", count=8)
# a ZeRO-1 pin on an FSDP2 backend is planned as the ZeRO-2 it runs (found by this test)
@example(tp=None, pp=None, cp=None, ep=None, dp_shard=None, dp_replicate=None, mb=None, sched=None, zero=1,
         model="tiny", count=1)
def test_compile_never_raises_on_any_pins(tp, pp, cp, ep, dp_shard, dp_replicate, mb, sched, zero, model, count):
    """Whatever the pins, compile_spec returns diagnostics (errors exit 1 in the CLI), never an exception."""
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
        from llmc.compiler.backends import get_backend

        fsdp2 = get_backend(c.backend.name).zero12 == "fsdp2"
        for k, v in pins.items():
            # (the one exception: FSDP2 has no ZeRO-1, so a ZeRO-1 pin there plans the ZeRO-2 it runs, P021 says so)
            want = 2 if (k, v) == ("zero_stage", 1) and fsdp2 else v
            assert getattr(c.plan, k) == want, (k, v, c.backend.name)


# ----------------------------------------------------------------------------- one number, one place


def _assert_stage_numbers_agree(c) -> None:
    """Every number in both ``hyper`` and the pretrain stage agrees; other stages' steps x batch cover
    exactly their tokens (steps = ceil(tokens / batch), or tokens = steps x batch when steps are pinned)."""
    h = c.hyper
    for s in c.stages:
        if s.kind == "pretrain":
            for key in ("seq_len", "global_batch_tokens", "global_batch_seqs", "steps", "lr", "min_lr",
                        "warmup_steps", "schedule", "checkpoint_interval"):
                assert getattr(s, key) == getattr(h, key), key
            assert s.global_batch_tokens == s.global_batch_seqs * s.seq_len
            if c.plan is not None:
                assert (s.micro_batch, s.grad_accum) == (c.plan.micro_batch, c.plan.grad_accum)
                assert s.micro_batch * s.grad_accum * c.plan.dp == s.global_batch_seqs
            if "steps" in h.defaults:
                assert s.tokens == c.compute.tokens
        elif s.steps is not None:
            assert s.tokens is not None and s.global_batch_tokens
            if "steps" in s.defaults:
                assert (s.steps - 1) * s.global_batch_tokens < s.tokens <= s.steps * s.global_batch_tokens
            else:
                assert s.tokens == s.steps * s.global_batch_tokens
        if s.steps is not None:
            assert s.warmup_steps <= s.steps and s.min_lr <= s.lr
        if s.kind == "grpo":  # every rank samples whole groups (ceil(P / GPUs) of them), each in equal slices
            G, P = s.hyper["group_size"], s.hyper["prompts_per_step"]
            assert G % s.micro_batch == 0
            assert s.micro_batch * s.grad_accum == -(-P // c.spec.hardware.count) * G
        elif s.layout is not None:  # its own torchtitan job: its searched layout's batch identity, as pre-training's
            assert s.layout.global_batch_seqs == s.global_batch_seqs and s.layout.world == c.spec.hardware.count
            assert (s.micro_batch, s.grad_accum) == (s.layout.micro_batch, s.layout.grad_accum)
            assert s.memory.per_gpu_bytes <= s.memory.capacity_bytes and s.time.backend == "torchtitan"
        elif s.kind != "pretrain":  # the split covers the batch with the fewest micro-steps
            # every stage but pre-training runs data parallel over every GPU (llmc.runtime.posttrain, TrainJob.from_lock)
            dp = c.spec.hardware.count
            assert s.micro_batch * (s.grad_accum - 1) * dp < s.global_batch_seqs <= s.micro_batch * s.grad_accum * dp


EXAMPLES = sorted(Path(__file__).resolve().parents[1].glob("examples/*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_examples_hyper_and_stage_plans_agree(path):
    run, lines = load_spec(path)
    c = compile_spec(run, str(path), lines, spec_bytes=path.read_bytes())
    assert c.stages
    _assert_stage_numbers_agree(c)
    j = c.to_json()
    pre = [s for s in j["stages"] if s["kind"] == "pretrain"]
    for s in pre:  # the lock's two views of the pre-training run are the same numbers
        assert {k: s[k] for k in ("steps", "global_batch_tokens", "lr")} == {
            k: j["hyper"][k] for k in ("steps", "global_batch_tokens", "lr")}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=st.sampled_from(["tiny", "llama3-8b", "llama3-70b", "mixtral-8x7b"]),
       count=st.sampled_from([1, 8, 64]), seq=st.sampled_from([512, 2048, 8192]),
       tokens=st.sampled_from(["1e6", "3.3e9", "1T"]), batch=st.sampled_from([None, 64, 1024]),
       steps=st.sampled_from([None, 500]), lr=st.sampled_from([None, 2e-4]),
       stage_set=st.sampled_from(["none", "pretrain", "post", "all"]), sft_tokens=st.sampled_from([None, "1e7"]))
def test_hyper_and_stage_plans_agree(model, count, seq, tokens, batch, steps, lr, stage_set, sft_tokens):
    training = []
    if batch:
        training.append(f"  global_batch_tokens: {batch * seq}")
    if steps:
        training.append(f"  steps: {steps}")
    if lr:
        training.append(f"  optimizer: {{lr: {lr}}}")
    sft_data = f", data: {{seq_len: {seq}, tokens: {sft_tokens}}}" if sft_tokens else ""
    stages = {
        "none": "",
        "pretrain": "stages:\n  - {name: base, kind: pretrain}\n",
        "post": f"stages:\n  - {{name: sft, kind: sft{sft_data}}}\n  - {{name: dpo, kind: dpo, init_from: sft}}\n",
        "all": ("stages:\n  - {name: base, kind: pretrain}\n  - {name: mid, kind: midtrain, init_from: base}\n"
                f"  - {{name: sft, kind: sft, init_from: mid{sft_data}}}\n"
                "  - {name: rl, kind: grpo, init_from: sft, steps: 20}\n"),
    }[stage_set]
    gpu = "cpu" if model == "tiny" else "h100-sxm"
    text = (f"name: p\nmodel: {model}\nhardware: {{gpu: {gpu}, count: {1 if model == 'tiny' else count}}}\n"
            f"data:\n  seq_len: {seq}\n  tokens: {tokens}\n  tokenizer: {{train: true}}\n"
            + ("training:\n" + "\n".join(training) + "\n" if training else "") + stages)
    try:
        run, lines = loads_spec(text, file="p.yaml")
    except SpecError:
        return
    c = compile_spec(run, "p.yaml", lines, spec_bytes=text.encode())
    _assert_stage_numbers_agree(c)
