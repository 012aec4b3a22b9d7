"""ZeRO-3 parameter offload to CPU (``parallelism.offload_params``, DeepSpeed ``offload_param``, ZeRO-Infinity).

Checked against: DeepSpeed's own model-state estimator (tests/test_deepspeed.py, also the host bytes), its config
validator (the emitted ``offload_param`` section), and here what the plan does with it: a Llama 3 70B fine-tune
on one 80 GB GPU does not fit with optimizer offload alone (the 16-bit weights are 141 GB) and fits with the
parameters on the host, with the host traffic in the step time.
"""

from __future__ import annotations

import pytest
from test_build_fakes import compile_text

from llmc.compiler import timing
from llmc.compiler.hardware import get_gpu
from llmc.compiler.memory import memory_per_gpu
from llmc.compiler.params import params_total
from llmc.compiler.plan import ParallelPlan
from llmc.spec.presets import PRESETS

SPEC = """name: t
model: llama3-70b
hardware: {gpu: h100-sxm, count: 1}
data: {seq_len: 4096, tokens: 1B}
training: {global_batch_tokens: 65536}
parallelism: PINS
"""


def _compile(pins: str):
    return compile_text(SPEC.replace("PINS", pins))


def _codes(c, severity="error") -> list[str]:
    return [d.code for d in c.diagnostics if d.severity == severity]


def test_70b_on_one_gpu_fits_only_with_the_parameters_on_the_host():
    c = _compile("{offload_optimizer: true}")
    assert c.plan is None and _codes(c) == ["P004"]
    p004 = next(d for d in c.diagnostics if d.code == "P004")
    assert "parallelism.offload_params" in p004.hint
    c = _compile("{offload_optimizer: true, offload_params: true}")
    assert not _codes(c), [d.render() for d in c.diagnostics]
    assert c.backend.name == "deepspeed" and c.plan.zero_stage == 3 and c.plan.world == 1
    assert c.memory.breakdown["weights"] == 0 and c.memory.breakdown["optimizer"] == 0
    # the host holds every parameter's fp32 master weight, AdamW moments, gradient and 16-bit copy: 18 B each
    assert c.memory.host_bytes_per_node == pytest.approx(18 * params_total(c.spec.model), abs=1)


def test_parameter_fetches_are_in_the_step_time():
    """Per micro-batch, the rank's 16-bit partition crosses the host link before the forward and the backward
    gather (2 x 2 B per parameter it owns), hidden behind compute like the ZeRO-3 gathers; the step sends back only
    the gradients (2 B, not 4: the updated parameters stay on the host)."""
    arch, gpu = PRESETS["llama3-8b"], get_gpu("h100-sxm")
    plan = ParallelPlan(dp_shard=1, micro_batch=1, grad_accum=16, activation_checkpointing="full", zero_stage=3)
    sm_opt = timing.step_model(arch, 4096, "bf16", gpu, "deepspeed", offload_optimizer=True)
    sm_inf = timing.step_model(arch, 4096, "bf16", gpu, "deepspeed", offload_optimizer=True, offload_params=True)
    a, b = timing.time_numbers(sm_opt, plan, 1), timing.time_numbers(sm_inf, plan, 1)
    owned = params_total(arch)  # one rank owns every parameter (the time model's count leaves out the final norm's
    # 4,096 gains: rel 1e-5)
    fetch = 2 * 2 * owned / sm_inf.host_Bps  # per micro-batch
    timer = timing.LayoutTimer(sm_inf, 1, 1, 1, 1, 1, 1, 3)
    compute = timer._micro(1, "full")[0]  # one micro-batch's compute, what the fetches hide behind
    assert a.breakdown["fsdp_comm"] == 0 and b.breakdown["fsdp_comm"] > 0
    assert b.breakdown["fsdp_comm"] == pytest.approx(16 * timing._exposed(fetch, compute, sm_inf.fsdp_overlap),
                                                        rel=1e-5)
    # optimizer: 2 B per parameter over PCIe instead of 4, the same CPU update
    assert a.breakdown["optimizer"] - b.breakdown["optimizer"] == pytest.approx(2 * owned / sm_inf.host_Bps, rel=1e-5)
    # memory: the 16-bit weights leave the GPU, nothing else changes
    m_opt = memory_per_gpu(arch, plan, 4096, "bf16", gpu.hbm_bytes, backend="deepspeed", offload_optimizer=True)
    m_inf = memory_per_gpu(arch, plan, 4096, "bf16", gpu.hbm_bytes, backend="deepspeed", offload_optimizer=True,
                           offload_params=True)
    assert m_opt.breakdown["weights"] == pytest.approx(2 * owned)
    assert m_inf.breakdown["weights"] == 0
    assert {k: v for k, v in m_inf.breakdown.items() if k != "weights"} == \
        {k: v for k, v in m_opt.breakdown.items() if k != "weights"}


@pytest.mark.parametrize("pins, says", [
    ("{offload_params: true}", "without offload_optimizer"),
    ("{offload_optimizer: true, offload_params: true, zero_stage: 2}", "only ZeRO-3 partitions the parameters"),
])  # fmt: skip
def test_parameter_offload_without_its_requirements_is_one_located_error(pins, says):
    c = _compile(pins)
    errs = [d for d in c.diagnostics if d.severity == "error"]
    assert [(d.code, d.path) for d in errs] == [("P015", "parallelism.offload_params")], errs
    assert says in errs[0].message and errs[0].hint


def test_memory_model_refuses_parameter_offload_without_zero3_and_optimizer_offload():
    from llmc.compiler.backends import get_backend
    from llmc.compiler.memory import backend_state_bytes, model_state_bytes

    with pytest.raises(ValueError, match="ZeRO stage 3"):
        backend_state_bytes(1.0, get_backend("deepspeed"), zero_stage=2, offload_optimizer=True, offload_params=True)
    with pytest.raises(ValueError, match="offload_optimizer"):
        model_state_bytes(1.0, zero_stage=3, offload_params=True)


@pytest.mark.parametrize("hardware, code", [
    ("{gpu: h100-sxm, count: 1}", None),  # 1,183 GiB of the reference node's 2,048 GiB
    ("{gpu: h100-sxm, count: 1, host_memory_gib: 1400}", "warning"),  # 85%
    ("{gpu: h100-sxm, count: 1, host_memory_gib: 1024}", "error"),
    ("{gpu: h100-sxm, count: 1, gpus_per_node: 4}", "info"),  # another node than the table's: unknown
    ("{gpu: a100-80g, count: 1}", "info"),  # the table gives no host memory for it
])  # fmt: skip
def test_host_memory_of_the_offload_against_the_node(hardware, code):
    """P016: the host bytes the plan reports per node (18 B per parameter here) against the node's host memory."""
    spec = SPEC.replace("hardware: {gpu: h100-sxm, count: 1}", f"hardware: {hardware}")
    c = compile_text(spec.replace("PINS", "{offload_optimizer: true, offload_params: true}"))
    p016 = [d for d in c.diagnostics if d.code == "P016"]
    if code is None:
        assert not p016 and c.memory.host_bytes_per_node < 2048 * 2**30
        return
    assert [d.severity for d in p016] == [code], p016
    need = f"{c.memory.host_bytes_per_node / 2**30:,.0f} GiB"
    assert need in p016[0].message and p016[0].hint


def test_offload_runs_on_deepspeed_only_and_one_gpu_gets_the_stage_it_was_sized_for():
    """Only llmc's DeepSpeed job offloads: another pinned backend is P017 (the plan would size states its job keeps
    on the GPU). On one GPU, optimizer offload is ZeRO-2 (ZeRO-Offload) and parameter offload ZeRO-3, and the
    emitted ds_config runs the plan's stage (it used to derive 0 from the single rank: X108, no DeepSpeed job)."""
    from llmc.emit.deepspeed import deepspeed_config

    c = compile_text(SPEC.replace("llama3-70b", "llama3-8b").replace("PINS", "{offload_optimizer: true}").replace(
        "training: {", "training: {backend: torchtitan, "))
    assert [(d.code, d.path) for d in c.diagnostics if d.severity == "error"] == \
        [("P017", "parallelism.offload_optimizer")]
    # (70B on one GPU does not fit with optimizer offload alone: 8B there)
    for model, pins, stage in (("llama3-8b", "{offload_optimizer: true}", 2),
                               ("llama3-70b", "{offload_optimizer: true, offload_params: true}", 3)):
        c = compile_text(SPEC.replace("llama3-70b", model).replace("PINS", pins))
        assert c.backend.name == "deepspeed" and c.plan.zero_stage == stage
        cfg, diags = deepspeed_config(c)
        assert cfg["zero_optimization"]["stage"] == stage and not [d for d in diags if d.severity == "error"]


def test_stage_memory_follows_where_the_stage_runs():
    """LM stages (midtrain, long_context) run on llmc's DeepSpeed runner with the run's ds_config, so their memory
    leaves the optimizer (and with parameter offload the weights) on the host; chat stages run on the native
    runtime, which does not offload, and say so."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "examples" / "pipeline_llama3_8b.yaml").read_text()
    assert "\nparallelism:" not in text
    # (offload picks DeepSpeed; the same run without offload on DeepSpeed, not torchtitan, whose continued stages run
    # as their own torchtitan jobs)
    base = {s.name: s for s in compile_text(text.replace("\ntraining:\n", "\ntraining:\n  backend: deepspeed\n")).stages}
    off_c = compile_text(text + "parallelism: {offload_optimizer: true, offload_params: true}\n")
    off = {s.name: s for s in off_c.stages}
    mid0, mid1 = base["midtrain"].memory, off["midtrain"].memory
    shard = mid0.shard_degree
    assert mid1.grads_optimizer_bytes == 0 and mid1.weights_bytes == 0
    # the states leave the GPU (the recomputation each picks may differ: the one with offload has more room)
    def states(m):
        return m.per_gpu_bytes - m.activation_bytes - m.buffer_bytes

    assert states(mid0) - states(mid1) == (mid0.weights_bytes + mid0.grads_optimizer_bytes) // shard
    assert any("offloaded to the host" in n for n in off["midtrain"].notes)
    assert off["sft"].memory.per_gpu_bytes == base["sft"].memory.per_gpu_bytes
    # G013 says each chat stage (sft, dpo, grpo) does not offload; the LM stages do not get it
    chat = [s.name for s in off_c.stages if s.kind in ("sft", "dpo", "grpo")]
    assert len([d for d in off_c.diagnostics if d.code == "G013"]) == len(chat) >= 1
    assert all(any(name in d.message for d in off_c.diagnostics if d.code == "G013") for name in chat)
