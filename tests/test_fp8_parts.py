"""fp8 runs: which linears run in fp8, in the time model and in the emitted torchtitan job, from one source.

The time model speeds up (and casts) only the parts of the model whose linears the backend's job converts
(``backends.fp8_converted_parts``); each part's FLOPs come from ``flops.linear_flops_by_part``. The torchtitan
job converts the attention / FFN / shared-expert linears with Float8LinearConverter (not the output head, not
the router) and the routed experts, which are GroupedExperts 3-D parameters and no Linear, with torchtitan
0.3.0's Float8GroupedExpertsConverter (MXFP8GroupedExpertsConverter for mxfp8). Expected values are recomputed
here from the published model configs (Mixtral 8x7B, Llama 3 8B, DeepSeek-V3 config.json) and the published
runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import pytest
from test_build_fakes import compile_text, make_compiled, make_run

from llmc.compiler import flops, timing
from llmc.compiler.backends import fp8_converted_parts, get_backend
from llmc.compiler.hardware import clock_factor, get_gpu, peak_flops
from llmc.compiler.plan import ParallelPlan
from llmc.emit.torchtitan import render_torchtitan
from llmc.spec.presets import PRESETS

# Mixtral 8x7B (mistralai/Mixtral-8x7B-v0.1 config.json): hidden 4096, intermediate 14336, 32 layers,
# 32 heads, 8 KV heads of 128, 8 experts, top-2, vocabulary 32000, untied head
MIXTRAL = {"n_layers": 32, "d_model": 4096, "n_heads": 32, "n_kv_heads": 8, "d_ff": 14336,
           "vocab_size": 32000, "rope_theta": 1e6, "max_seq_len": 32768,
           "moe": {"num_experts": 8, "top_k": 2}}
TINY_MOE = {"name": "tiny-moe", "n_layers": 2, "d_model": 64, "n_heads": 4, "n_kv_heads": 2, "d_ff": 192,
            "vocab_size": 512, "rope_theta": 500000.0, "max_seq_len": 256,
            "moe": {"num_experts": 4, "top_k": 2, "expert_d_ff": 128}}
TITAN = get_backend("torchtitan")


def _mixtral_per_layer():
    d, ff, h, kv, hd, e, k = 4096, 14336, 32, 8, 128, 8, 2
    attention = d * h * hd + 2 * d * kv * hd + h * hd * d  # wq, wk, wv, wo
    return {"attention": attention, "experts": k * 3 * d * ff, "experts_all": e * 3 * d * ff, "router": d * e}


# --------------------------------------------------------------------------- per-part FLOPs, one place


def test_part_flops_of_mixtral_by_hand():
    """6 FLOPs per active matmul parameter (fwd + bwd) for each part of Mixtral 8x7B; with the norms and the
    attention scores they add up to the convention's training FLOPs per token. The attention projections are
    10.5 % of the linear FLOPs, the head 1.0 %, the routed experts the rest."""
    arch = PRESETS["mixtral-8x7b"]
    per = _mixtral_per_layer()
    by = flops.linear_flops_by_part(arch)
    assert by["attention"] == 6 * 32 * per["attention"]
    assert by["experts"] == 6 * 32 * per["experts"]
    assert by["router"] == 6 * 32 * per["router"]
    assert by["head"] == 6 * 32000 * 4096
    assert by["mlp"] == 0
    assert by["other"] == 6 * (32 * 2 * 4096 + 4096)  # two RMSNorm weights a block + the final norm
    assert sum(by.values()) + flops.attention_flops_per_token(arch, 4096) == pytest.approx(
        flops.train_flops_per_token(arch, 4096), rel=1e-12)
    linear = sum(by[p] for p in flops.LINEAR_PARTS)
    assert by["attention"] / linear == pytest.approx(0.105, abs=0.001)
    assert by["head"] / linear == pytest.approx(0.0103, abs=0.0005)
    assert flops.matmul_params_by_part(arch, active=False)["experts"] == 32 * per["experts_all"]


def test_part_flops_of_llama3_8b_and_deepseek_v3_by_hand():
    """Llama 3 8B (hidden 4096, intermediate 14336, 32 layers, 8 KV heads, vocabulary 128256): the output head
    is 7.0 % of the linear FLOPs. DeepSeek-V3 (hidden 7168; 3 dense layers of 18432, 58 MoE layers of 256
    experts of 2048, top-8, one shared expert; vocabulary 129280): the FFN part holds the dense layers and the
    shared experts, the experts part 8 routed experts a token."""
    llama = flops.linear_flops_by_part(PRESETS["llama3-8b"])
    d, ff = 4096, 14336
    assert llama["mlp"] == 6 * 32 * 3 * d * ff
    assert llama["attention"] == 6 * 32 * (2 * d * d + 2 * d * 1024)
    assert llama["head"] / sum(llama[p] for p in flops.LINEAR_PARTS) == pytest.approx(0.070, abs=0.001)
    ds = flops.linear_flops_by_part(PRESETS["deepseek-v3"])
    d = 7168
    assert ds["mlp"] == 6 * (3 * 3 * d * 18432 + 58 * 3 * d * 2048)
    assert ds["experts"] == 6 * 58 * 8 * 3 * d * 2048
    assert ds["router"] == 6 * 58 * d * 256
    assert ds["head"] == 6 * 129280 * d


# ----------------------------------------------------------------------- the time model speeds up those parts


def _saving(arch, backend, recipe, gpu="h100-sxm", seq=8192):
    """(bf16 - fp8) seconds per FLOP at 100 % shape efficiency, in units of 1 / (bf16 peak x efficiency)."""
    g = get_gpu(gpu)
    be = get_backend(backend) if isinstance(backend, str) else backend
    sm = {p: timing.step_model(arch, seq, p, g, be, compile=True, fp8_recipe=recipe) for p in ("bf16", "fp8")}
    return (sm["bf16"].sec_per_flop - sm["fp8"].sec_per_flop) * peak_flops(g, "bf16") * be.base_efficiency \
        * clock_factor(g)


@pytest.mark.parametrize("backend", ["torchtitan", "megatron", "generic"])
def test_fp8_saves_only_the_converted_linears_of_a_dense_model(backend):
    """Llama 3 8B: an fp8 run saves (1 - 1/speed-up) of the attention and FFN linears' FLOPs, not of the
    output head's (torchtitan's job: filter_fqns lm_head, and every published torchtitan float8 row filtered
    'output'; Megatron-Core's output layer is not a Transformer Engine module)."""
    arch = PRESETS["llama3-8b"]
    be = get_backend(backend)
    g = get_gpu("h100-sxm")
    speedup = min(be.fp8_rowwise_speedup, peak_flops(g, "fp8") / peak_flops(g, "bf16"))
    d, ff, layers = 4096, 14336, 32
    converted = 6 * layers * (2 * d * d + 2 * d * 1024 + 3 * d * ff)
    share = converted / flops.train_flops_per_token(arch, 8192)
    assert _saving(arch, be, "rowwise") == pytest.approx(share * (1 - 1 / speedup), rel=1e-9)


def test_fp8_saves_the_experts_only_where_they_are_converted():
    """Mixtral 8x7B: torchtitan's job converts the routed experts (Float8GroupedExpertsConverter), so fp8
    saves on attention + experts; with an expert width the fp8 grouped GEMM cannot take (14344, not a multiple
    of 16: torchao fp8_grouped_mm asserts K and N divisible by 16) the job leaves them bf16 and fp8 saves on
    the attention projections alone. llmc's native trainer runs fp8 specs in bf16: no saving at all."""
    arch = PRESETS["mixtral-8x7b"]
    g = get_gpu("h100-sxm")
    speedup = min(TITAN.fp8_rowwise_speedup, peak_flops(g, "fp8") / peak_flops(g, "bf16"))
    per = _mixtral_per_layer()
    total = flops.train_flops_per_token(arch, 8192)
    both = 6 * 32 * (per["attention"] + per["experts"]) / total
    assert _saving(arch, "torchtitan", "rowwise") == pytest.approx(both * (1 - 1 / speedup), rel=1e-9)
    odd = arch.model_copy(update={"moe": arch.moe.model_copy(update={"expert_d_ff": 14344})})
    assert fp8_converted_parts(TITAN, odd, "rowwise") == {"attention", "mlp"}
    attention = 6 * 32 * per["attention"] / flops.train_flops_per_token(odd, 8192)
    assert _saving(odd, "torchtitan", "rowwise") == pytest.approx(attention * (1 - 1 / speedup), rel=1e-9)
    assert _saving(arch, "native", "rowwise") == 0.0


def test_expert_casts_are_counted_where_the_experts_are_converted():
    """torchao's fp8 grouped GEMM casts, per routed copy of a token, the w1 / w3 inputs (d each), the w2 input
    (f) and the grad_outputs (f, f, d): 3 (d + f) elements at the rowwise fused 6 B (torchtitan profile), and
    each rank's local experts' weights (E / ep x 3 d f) at the rowwise 10 B per micro-batch. Mixtral, tp 1, ep
    8, no AC: the elementwise time of the converted-experts run exceeds that of a profile leaving them bf16 by
    that."""
    arch = PRESETS["mixtral-8x7b"]
    g = get_gpu("h100-sxm")
    plan = ParallelPlan(dp_shard=8, ep=8, micro_batch=1, grad_accum=1, activation_checkpointing="none")
    no_experts = dataclasses.replace(TITAN, fp8_parts=frozenset({"attention", "mlp"}))
    el = {}
    for name, be in (("with", TITAN), ("without", no_experts)):
        sm = timing.step_model(arch, 4096, "fp8", g, be, compile=True, fp8_recipe="rowwise")
        el[name] = timing.step_time(sm, plan)[2]["elementwise"]
    d, f, tokens = 4096, 14336, 4096
    per_layer = tokens * 2 * 3 * (d + f) * 6.0 + 8 / 8 * 3 * d * f * 10.0
    assert el["with"] - el["without"] == pytest.approx(32 * per_layer / (g.hbm_gbps * 1e9), rel=1e-9)


# --------------------------------------------------------------------------- the reviewer's plans


def _mixtral_spec(precision, moe_extra=None) -> str:
    """The reviewed run as spec text (JSON, a YAML subset): Mixtral 8x7B from its published config on 256 H100."""
    model = {"name": "mixtral-pub", **MIXTRAL, "moe": {**MIXTRAL["moe"], **(moe_extra or {})}}
    return json.dumps({
        "name": f"mixtral-{precision}", "model": model,
        "hardware": {"gpu": "h100-sxm", "count": 256, "gpus_per_node": 8},
        "data": {"sources": [{"name": "web", "path": "/data/web/*.parquet", "format": "parquet", "tokens": "3T"}],
                 "seq_len": 4096, "tokens": "1T"},
        "training": {"precision": precision, "global_batch_tokens": 4194304, "optimizer": {"lr": 3.0e-4}},
        "parallelism": {"tp": 1, "pp": 1, "ep": 8, "dp_shard": 64, "dp_replicate": 4, "micro_batch": 2,
                        "activation_checkpointing": "selective"},
    })


@pytest.mark.parametrize("aligned", [True, False])
def test_mixtral_fp8_plan_matches_the_emitted_converters(aligned):
    """Mixtral 8x7B on 256 H100, seq 4096, 4M-token batch, pinned tp 1 ep 8 dp_shard 64 dp_replicate 4 mb 2,
    selective AC (torchtitan). Published shapes: the job converts the routed experts too
    (Float8GroupedExpertsConverter in converters()), and the plan's fp8 step is faster than bf16 by more than
    converting the attention projections alone could give. With an expert width of 14344 the job emits no
    grouped converter and the plan's gain stays within Amdahl's bound for the attention projections, 10.5 % of
    the linear FLOPs at most twice as fast (the fp8 / bf16 peak ratio): 1 / (1 - 0.105 / 2)."""
    extra = None if aligned else {"expert_d_ff": 14344}
    c = {p: compile_text(_mixtral_spec(p, extra)) for p in ("bf16", "fp8")}
    gain = c["bf16"].time.step_seconds / c["fp8"].time.step_seconds
    src = render_torchtitan(c["fp8"])["torchtitan/llmc_job.py"]
    amdahl = 1 / (1 - 0.105 / 2)
    if aligned:
        assert "Float8GroupedExpertsConverter.Config(" in src
        assert gain > amdahl
    else:
        assert "GroupedExperts" not in src.split("def converters")[1].split("def model_spec")[0]
        assert gain <= amdahl


# --------------------------------------------------------------------------- the refit


def _fit(rows, recipe: str, field: str, gpu_ratio: float) -> float:
    """Least squares of the relative error of llmc's fp8 / bf16 step-time ratio over ``rows`` on a 0.01 grid
    of the speed-up from 1.00 up to the fp8 / bf16 peak ratio (timing caps the speed-up there)."""
    arch = PRESETS["llama3.1-8b"]
    bf16 = [timing.step_time(timing.step_model(arch, 8192, "bf16", get_gpu(g), TITAN, compile=True), p)[0]
            for p, g, _ in rows]

    def loss(s):
        be = dataclasses.replace(TITAN, **{field: s})
        return sum((b / timing.step_time(timing.step_model(arch, 8192, "fp8", get_gpu(g), be, compile=True,
                                                           fp8_recipe=recipe), p)[0] / pub - 1) ** 2
                   for b, (p, g, pub) in zip(bf16, rows, strict=True))

    grid = [round(1 + i / 100, 2) for i in range(int(round((gpu_ratio - 1) * 100)) + 1)]
    return min(grid, key=loss)


def test_torchtitan_fp8_speedups_are_the_fit_of_their_published_ratios():
    """backends.py: the torchtitan speed-ups are fitted, with only the converted linears in fp8 (the output
    head bf16, as in those runs), to torchtitan's Llama 3.1 8B fp8 / bf16 ratios: tensorwise 8532 / 6667 (8
    GPUs) and 8380 / 6514 (128 GPUs), benchmarks/llama3_h100_202412 Tables 1 and 3; rowwise 6424 / 5760 (8
    H100, commit 7a04053). The tensorwise optimum is the cap, the H100 fp8 / bf16 peak ratio 2.0."""
    sel = dict(grad_accum=1, activation_checkpointing="selective")
    tw = [(ParallelPlan(dp_shard=8, micro_batch=2, **sel), "h100-hbm2e-96g", 8532 / 6667),
          (ParallelPlan(dp_shard=128, micro_batch=2, **sel), "h100-hbm2e-96g", 8380 / 6514)]
    rw = [(ParallelPlan(dp_shard=8, micro_batch=1, **sel), "h100-sxm", 6424 / 5760)]
    assert _fit(tw, "tensorwise", "fp8_linear_speedup", 2.0) == TITAN.fp8_linear_speedup == 2.0
    assert _fit(rw, "rowwise", "fp8_rowwise_speedup", 2.0) == TITAN.fp8_rowwise_speedup


# --------------------------------------------------------------------------- the emitted job


def _job_module(tmp_path, model, recipe, gpu="h100-sxm", plan=None):
    training = {"precision": "fp8", "fp8_recipe": recipe, "optimizer": {"lr": 1e-3}}
    c = make_compiled(make_run(model=model, hardware={"gpu": gpu, "count": 8}, training=training),
                      plan or ParallelPlan(dp_shard=8, ep=2, micro_batch=2, grad_accum=2))
    for rel, text in render_torchtitan(c, strict=True).items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return c, tmp_path / "torchtitan"


def _converted_parts(model_cfg) -> tuple[set[str], set[str]]:
    """(parts with an fp8 module config, parts left in bf16) of a converted torchtitan model config, by FQN:
    ``lm_head`` = head, ``router.gate`` = router, ``attention`` = attention, ``feed_forward`` /
    ``shared_experts`` = mlp, GroupedExperts = experts."""
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts

    fp8, bf16 = set(), set()
    for fqn, cfg, _, _ in model_cfg.traverse(Linear.Config):
        part = ("head" if fqn == "lm_head" else "router" if fqn.endswith("router.gate") else
                "attention" if ".attention." in fqn else "mlp")
        (bf16 if type(cfg) is Linear.Config else fp8).add(part)
    for _, cfg, _, _ in model_cfg.traverse(GroupedExperts.Config):
        (bf16 if type(cfg) is GroupedExperts.Config else fp8).add("experts")
    return fp8, bf16


def _apply_converters(job):
    """The job's converters() applied to its model_config() on CPU: the converters' constructors refuse a CPU
    (SM89 / SM100 checks), so the float8 Linear converter is built in emulation and the others without their
    constructor; their convert() is torchtitan's own."""
    from torchtitan.components.quantization import (
        Float8GroupedExpertsConverter,
        Float8LinearConverter,
        MXFP8GroupedExpertsConverter,
        MXFP8LinearConverter,
    )

    cfg = job.model_config()
    for conv in job.converters():
        if isinstance(conv, Float8LinearConverter.Config):
            built = dataclasses.replace(conv, emulate=True, model_compile_enabled=False).build()
        else:
            cls = {Float8GroupedExpertsConverter.Config: Float8GroupedExpertsConverter,
                   MXFP8GroupedExpertsConverter.Config: MXFP8GroupedExpertsConverter,
                   MXFP8LinearConverter.Config: MXFP8LinearConverter}[type(conv)]
            built = object.__new__(cls)
            built.config = conv
        cfg = built.convert(cfg)
    return cfg


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "gpu", "expert_ff", "mla"), [
    ("rowwise", "h100-sxm", 128, False), ("rowwise", "h100-sxm", 120, False),
    ("rowwise", "h100-sxm", 128, True),
    ("mxfp8", "b200", 128, False), ("mxfp8", "b200", 112, False), ("mxfp8", "b200", 128, True)])
def test_the_job_converts_exactly_the_parts_the_plan_timed_in_fp8(tmp_path, recipe, gpu, expert_ff, mla):
    """An fp8 MoE job (4 experts, top 2; d_model 64; ``mla``: DeepSeek-V3's family, MLA attention, a dense
    first layer and a shared expert): applying its converters() to its model config with torchtitan's own
    converters puts in fp8 exactly the parts llmc's time model speeds up (fp8_converted_parts), never the head
    or the router; the experts only when their width suits the grouped GEMM (16 for float8: 128 yes, 120 no;
    32 for MXFP8: 112 no). The job still loads through torchtitan's ConfigManager, and a converted model
    builds on the meta device with the experts' weights wrapped for torchao's fp8 grouped GEMM."""
    pytest.importorskip("torchtitan")
    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.models.common.moe import GroupedExperts
    from torchtitan.models.common.token_dispatcher import TorchAOTokenDispatcher

    model = {**TINY_MOE, "moe": {**TINY_MOE["moe"], "expert_d_ff": expert_ff}}
    if mla:
        model = {**model, "n_kv_heads": 4, "moe": {**model["moe"], "num_shared_experts": 1, "dense_layers": 1,
                                                   "score_func": "sigmoid"},
                 "mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
                         "v_head_dim": 16}}
    c, mod_dir = _job_module(tmp_path, model, recipe, gpu)
    present = {k for k, v in flops.linear_flops_by_part(c.spec.model).items() if v and k != "other"}
    expected = fp8_converted_parts(TITAN, c.spec.model, recipe) & present
    assert ("experts" in expected) == (expert_ff % (32 if recipe == "mxfp8" else 16) == 0)
    sys.path.insert(0, str(mod_dir))
    sys.modules.pop("llmc_job", None)
    try:
        cfg = ConfigManager().parse_args(["--module", "llmc_job", "--config", "job_without_converters"])
        assert cfg.parallelism.expert_parallel_degree == 2
        import llmc_job

        converted = _apply_converters(llmc_job)
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("llmc_job", None)
    fp8, bf16 = _converted_parts(converted)
    assert fp8 == expected
    assert bf16 == present - expected == {"head", "router"} | ({"experts"} - expected)
    if "experts" in expected:
        pad = 16 if recipe == "rowwise" else 128
        for _, _, parent, _ in converted.traverse(GroupedExperts.Config):
            assert isinstance(parent.token_dispatcher, TorchAOTokenDispatcher.Config)
            assert parent.token_dispatcher.pad_multiple == pad
        if recipe == "rowwise":
            with torch.device("meta"):
                built = converted.build()
            experts = [m for m in built.modules() if isinstance(m, GroupedExperts)]
            assert experts and all(type(p).__name__ == "Float8TrainingWeightWrapperTensor"
                                    for m in experts for p in m.parameters())
