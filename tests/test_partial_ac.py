"""``activation_checkpointing: partial`` in the compiler: the first ``ac_layers`` blocks of every pipeline model
chunk recomputed whole, the rest not at all (Megatron-LM ``--recompute-method block --recompute-num-layers``).

Checked against: what llmc's runtime model really saves (autograd's saved-tensor hooks), the ``full`` code path
(partial over every block must give full's memory and time), a brute-force scan over the block count, and the
spec / plan / lock plumbing."""

from __future__ import annotations

import dataclasses
from functools import partial

import pytest

from llmc.compiler import timing
from llmc.compiler.compile import compile_spec
from llmc.compiler.hardware import get_gpu
from llmc.compiler.memory import (
    fits,
    layer_activation_bytes_per_token,
    max_chunk_layers,
    memory_per_gpu,
    partial_recomputed,
    pipeline_layout,
)
from llmc.compiler.plan import ParallelPlan
from llmc.compiler.search import search
from llmc.spec.load import loads_spec
from llmc.spec.model import Architecture
from llmc.spec.presets import PRESETS
from llmc.spec.schema import Parallelism

# the scenarios below are sized for an H100 of 80e9 B (the datasheet's decimal GB): the search logic, not the table
H100 = dataclasses.replace(get_gpu("h100-sxm"), hbm_bytes=80 * 10**9)


def test_partial_keeps_what_the_runtime_model_saves(monkeypatch):
    """Recomputing k blocks whole saves k x (no-AC bytes - the block input) per token: measured on llmc's runtime
    model (what native / DeepSpeed runs) with autograd's saved-tensor hooks, against the formula's per-layer
    values (memory.layer_activation_bytes_per_token, Korthikanti et al. 2022 Table 2 "full" keeps 2sbh).

    ``F.rms_norm`` is replaced by a function that saves what CUDA's fused kernel saves (input, weight, fp32 rstd):
    on CPU the composite kernel saves fp32 copies instead (test_memory's Llama block test does the same)."""
    torch = pytest.importorskip("torch")
    from llmc.runtime.model import build_model

    class FusedRMS(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, w, eps):
            rstd = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
            ctx.save_for_backward(x, w, rstd)
            return ((x.float() * rstd) * w.float()).to(x.dtype)

        @staticmethod
        def backward(ctx, g):  # not exercised
            raise NotImplementedError

    monkeypatch.setattr(torch.nn.functional, "rms_norm",
                        lambda x, shape, weight=None, eps=1e-6: FusedRMS.apply(x, weight, eps))

    # MHA: with GQA, SDPA off the CUDA flash kernel expands K/V first (see test_memory's selective test)
    arch = Architecture(n_layers=4, d_model=256, n_heads=8, n_kv_heads=8, d_ff=768, vocab_size=100,
                        max_seq_len=128)
    model = build_model(arch, "cpu", seed=0).to(torch.bfloat16).train()
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), model.rope]}
    B, S = 2, 128
    tok = torch.randint(0, arch.vocab_size, (B, S), generator=torch.Generator().manual_seed(0))

    def saved(mode: str, k: int = 0) -> int:
        model.set_ac(mode, k)
        got: dict[int, int] = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in skip and not t.is_complex():
                got[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(tok).float().sum()
        return sum(got.values())

    none = saved("none")
    # every block without recomputation keeps exactly the formula's bytes (the rest of the model is the same
    # with every AC mode: full keeps each block's input only)
    assert none - saved("full") == arch.n_layers * B * S * (
        layer_activation_bytes_per_token(arch, 0, "none") - layer_activation_bytes_per_token(arch, 0, "full"))
    per_block = layer_activation_bytes_per_token(arch, 0, "none") - layer_activation_bytes_per_token(arch, 0, "full")
    for k in (1, 2, 3):
        assert none - saved("partial", k) == k * per_block * B * S
    assert saved("partial", 4) == saved("full")


LAYOUTS = [  # (model, plan fields)
    ("llama3-8b", dict(dp_shard=8)),
    ("llama3-70b", dict(tp=4, pp=4, pp_schedule="Interleaved1F1B", pp_virtual_stages=5, dp_shard=2,
                        zero_stage=1, grad_accum=8)),
    ("llama3.1-405b", dict(tp=8, pp=8, pp_schedule="Interleaved1F1B", pp_virtual_stages=2, dp_shard=4,
                           zero_stage=1, grad_accum=16)),
    ("mixtral-8x7b", dict(tp=2, pp=2, ep=4, dp_shard=4, zero_stage=1, grad_accum=4)),
    ("deepseek-v3", dict(pp=16, pp_schedule="ZBVZeroBubble", pp_virtual_stages=2, ep=8, dp_shard=8, zero_stage=1,
                         grad_accum=32)),
]


@pytest.mark.parametrize("model,fields", LAYOUTS)
@pytest.mark.parametrize("backend", ["torchtitan", "native", "megatron"])
def test_partial_over_every_block_is_full(model, fields, backend):
    """partial with ac_layers >= the largest chunk recomputes every block: the per-layer partial path (memory) and
    the per-block mix (time) must land exactly on full's numbers, which come from full's own code path."""
    arch = PRESETS[model]
    full = ParallelPlan(activation_checkpointing="full", **fields)
    top = max_chunk_layers(arch.n_layers, full.pp, full.pp_schedule, full.pp_virtual_stages)
    sm = timing.step_model(arch, 8192, "bf16", H100, backend)
    for k in (top, top + 3):
        part = dataclasses.replace(full, activation_checkpointing="partial", ac_layers=k)
        for per_stage in (True, False):
            mf = memory_per_gpu(arch, full, 8192, "bf16", H100.hbm_bytes, backend=backend, per_stage=per_stage)
            mp = memory_per_gpu(arch, part, 8192, "bf16", H100.hbm_bytes, backend=backend, per_stage=per_stage)
            assert mp.per_stage_bytes == mf.per_stage_bytes and mp.per_gpu_bytes == mf.per_gpu_bytes
        (tp, mp_, bp), (tf, mf_, bf) = timing.step_time(sm, part), timing.step_time(sm, full)
        assert (tp, mp_) == pytest.approx((tf, mf_), rel=1e-12) and bp == pytest.approx(bf, rel=1e-12)


@pytest.mark.parametrize("model,fields", LAYOUTS)
def test_partial_time_and_memory_between_none_and_full(model, fields):
    """Every block recomputed adds its forward once more (time) and frees its activations (memory): step time
    rises and memory falls with the count, and the recompute term is full's x (blocks recomputed on the slowest
    pipeline rank) / (its blocks), counted here from the chunks directly."""
    arch = PRESETS[model]
    base = ParallelPlan(**fields)
    sm = timing.step_model(arch, 8192, "bf16", H100, "torchtitan")
    top = max_chunk_layers(arch.n_layers, base.pp, base.pp_schedule, base.pp_virtual_stages)
    t_none, _, br_none = timing.step_time(sm, base)
    t_full, _, br_full = timing.step_time(sm, dataclasses.replace(base, activation_checkpointing="full"))
    layout = pipeline_layout(arch.n_layers, base.pp, base.pp_schedule, base.pp_virtual_stages)
    slow_blocks = max(len(layers) for layers, _, _ in layout)  # dense models: the rank with the most blocks
    prev_t, prev_m = t_none, memory_per_gpu(arch, base, 8192, "bf16", H100.hbm_bytes).per_gpu_bytes
    for k in range(1, top):
        plan = dataclasses.replace(base, activation_checkpointing="partial", ac_layers=k)
        t, _, br = timing.step_time(sm, plan)
        m = memory_per_gpu(arch, plan, 8192, "bf16", H100.hbm_bytes).per_gpu_bytes
        assert prev_t < t < t_full and m <= prev_m
        if slow_blocks == len(layout[0][0]):  # rank 0 has the most blocks and no head: it is the slowest rank
            rec = partial_recomputed(arch.n_layers, base.pp, base.pp_schedule, base.pp_virtual_stages, k)
            n = len(rec[[len(layers) for layers, _, _ in layout].index(slow_blocks)])
            assert br["recompute"] == pytest.approx(br_full["recompute"] * n / slow_blocks, rel=1e-9)
        prev_t, prev_m = t, m
    assert br_none["recompute"] == 0.0


def test_partial_recomputes_the_first_blocks_of_every_chunk():
    # 10 blocks, pp 2, 2 chunks per rank (torchtitan's split: 1 | 3 | 3 | 3 with the embedding and head weighed as
    # one block each); rank 0 holds chunks 0 and 2, rank 1 chunks 1 and 3
    assert pipeline_layout(10, 2, "Interleaved1F1B", 2)[0][0] == (0, 1, 5, 6, 7)
    assert partial_recomputed(10, 2, "Interleaved1F1B", 2, 1) == ((0, 5), (2, 8))
    assert partial_recomputed(10, 2, "Interleaved1F1B", 2, 2) == ((0, 1, 5, 6), (2, 3, 8, 9))
    assert partial_recomputed(8, 1, "1F1B", 1, 3) == ((0, 1, 2),)


def _search(arch, world, seqs, seq_len, pins=None):
    sm = timing.step_model(arch, seq_len, "bf16", H100)
    mem = partial(memory_per_gpu, arch, seq_len=seq_len, precision="bf16", capacity_bytes=H100.hbm_bytes)
    return search(arch, sm, world=world, gpu=H100, seq_len=seq_len, global_batch_seqs=seqs, precision="bf16",
                  pins=pins or Parallelism(), memory_fn=lambda p: mem(plan=p))


def test_search_takes_the_fewest_blocks_that_fit():
    """On 16 H100 an 8B model at 4K fits with no recomputation only on layouts that need TP or a smaller
    micro-batch; recomputing a few blocks whole is faster. The pick is the fewest blocks that fit (one fewer
    does not), and faster than every other AC mode of its layout that fits."""
    arch = PRESETS["llama3-8b"]
    res = _search(arch, 16, 256, 4096)
    best = res.best.plan
    assert best.activation_checkpointing == "partial" and best.ac_layers >= 1
    mem = lambda p: memory_per_gpu(arch, p, 4096, "bf16", H100.hbm_bytes)  # noqa: E731
    assert fits(mem(best))
    fewer = dataclasses.replace(best, ac_layers=best.ac_layers - 1,
                                activation_checkpointing="partial" if best.ac_layers > 1 else "none")
    assert not fits(mem(fewer))
    sm = timing.step_model(arch, 4096, "bf16", H100)
    for ac in ("none", "selective", "full"):
        other = dataclasses.replace(best, activation_checkpointing=ac, ac_layers=0)
        if fits(mem(other)):
            assert timing.step_time(sm, other)[0] > res.best.step_seconds
    assert "activation checkpointing partial(" in " ".join(res.reasons)


def test_pinned_partial_with_and_without_a_count():
    arch = PRESETS["llama3-8b"]
    pins = dict(tp=1, pp=1, dp_shard=8, dp_replicate=2, micro_batch=2)
    free = _search(arch, 16, 256, 4096, Parallelism(activation_checkpointing="partial", **pins)).best.plan
    assert free.activation_checkpointing == "partial"
    fixed = _search(arch, 16, 256, 4096, Parallelism(activation_checkpointing="partial", ac_layers=20, **pins))
    assert (fixed.best.plan.activation_checkpointing, fixed.best.plan.ac_layers) == ("partial", 20)
    assert fixed.best.step_seconds > _search(arch, 16, 256, 4096, Parallelism(
        activation_checkpointing="partial", **pins)).best.step_seconds
    # a count too small to fit is reported as the closest candidate, with its memory
    assert free.ac_layers > 1
    tight = _search(arch, 16, 256, 4096, Parallelism(activation_checkpointing="partial", ac_layers=1, **pins))
    assert tight.best is None and tight.closest.plan.ac_label == "partial(1)"
    # where not even full recomputation fits, the pinned count is still what is reported, with its own memory
    pins4 = {**pins, "micro_batch": 4, "zero_stage": 1}
    assert _search(arch, 16, 256, 4096, Parallelism(activation_checkpointing="full", **pins4)).best is None
    worse = _search(arch, 16, 256, 4096, Parallelism(activation_checkpointing="partial", ac_layers=1, **pins4))
    c = worse.closest
    assert worse.best is None and c.plan.ac_label == "partial(1)" and "partial(1) recomputation" in c.reason
    assert c.per_gpu_bytes == memory_per_gpu(arch, c.plan, 4096, "bf16", H100.hbm_bytes).per_gpu_bytes


SPEC = """name: t
model: llama3-8b
hardware: {gpu: h100-sxm, count: 16}
data: {seq_len: 4096, tokens: 20B}
training: {global_batch_tokens: 1048576}
parallelism: PINS
"""


def test_ac_layers_without_partial_is_one_located_error():
    run, lines = loads_spec(SPEC.replace("PINS", "{activation_checkpointing: full, ac_layers: 4}"), file="s.yaml")
    c = compile_spec(run, "s.yaml", lines, spec_bytes=b"")
    errs = [d for d in c.diagnostics if d.severity == "error"]
    assert [d.code for d in errs] == ["P012"] and errs[0].path == "parallelism.ac_layers"


def test_partial_plan_reaches_the_lock():
    from llmc.emit.lock import lock_dict

    run, lines = loads_spec(SPEC.replace("PINS", "{activation_checkpointing: partial, ac_layers: 6}"), file="s.yaml")
    c = compile_spec(run, "s.yaml", lines, spec_bytes=b"")
    assert not [d for d in c.diagnostics if d.severity == "error"]
    assert c.plan.ac_label == "partial(6)"
    lock = lock_dict(c)
    assert lock["plan"]["activation_checkpointing"] == "partial" and lock["plan"]["ac_layers"] == 6


def test_ac_layers_covering_every_block_warns_that_it_is_full():
    run, lines = loads_spec(SPEC.replace("PINS", "{activation_checkpointing: partial, ac_layers: 32, pp: 1}"),
                            file="s.yaml")
    c = compile_spec(run, "s.yaml", lines, spec_bytes=b"")
    p013 = [d for d in c.diagnostics if d.code == "P013"]
    assert len(p013) == 1 and p013[0].severity == "warning" and "every block of the model" in p013[0].message
    run, lines = loads_spec(SPEC.replace("PINS", "{activation_checkpointing: partial, ac_layers: 31, pp: 1}"),
                            file="s.yaml")
    assert not [d for d in compile_spec(run, "s.yaml", lines, spec_bytes=b"").diagnostics if d.code == "P013"]
