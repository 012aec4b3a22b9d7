"""nvfp4 training (``training.precision: nvfp4``): peaks, time model, plan checks and the torchtitan job.

Expected values are recomputed here from the vendors' spec tables, the published Llama 3 configs and torchtitan
0.3.0's own ``nvfp4_bf16_tail_fqns`` (components/quantization/nvfp4.py), not read back from llmc's code.
"""

from __future__ import annotations

import math
import sys

import pytest
from test_build_fakes import compile_text

from llmc.compiler import flops, timing
from llmc.compiler.backends import get_backend
from llmc.compiler.hardware import clock_factor, get_gpu, peak_flops, supports
from llmc.compiler.plan import ParallelPlan
from llmc.emit.torchtitan import render_torchtitan
from llmc.spec.presets import PRESETS

PETA = 1e15


def _tail_fqns(n_layers: int, fraction: float) -> list[str]:
    """torchtitan 0.3.0's own nvfp4_bf16_tail_fqns (imported where torchtitan is installed, else its formula)."""
    try:
        from torchtitan.components.quantization.nvfp4 import nvfp4_bf16_tail_fqns
    except ImportError:  # pragma: no cover - torchtitan is in the dev environment
        return [f"layers.{i}." for i in range(n_layers - math.ceil(n_layers * fraction))]
    return nvfp4_bf16_tail_fqns(n_layers, fraction)


# ------------------------------------------------------------------------------------------------ peaks

# dense FP4 tensor peak per GPU from the vendors' spec tables
VENDOR_FP4 = {
    "b200": 144 * PETA / 8 / 2,  # HGX B200: 144 PF FP4 sparse for 8 GPUs, halved (https://www.nvidia.com/en-us/data-center/hgx/)
    "gb200": 1440 * PETA / 72 / 2,  # GB200 NVL72: 1,440 PF FP4 sparse for 72 GPUs, halved (.../gb200-nvl72/)
    "b300": 105 * PETA / 8,  # HGX B300: 105 PF FP4 dense for 8 GPUs (.../hgx/, .../dgx-b300/)
    "gb300": 1080 * PETA / 72,  # GB300 NVL72: 1,080 PF FP4 dense for 72 GPUs (.../gb300-nvl72/)
}


@pytest.mark.parametrize("key", sorted(VENDOR_FP4))
def test_fp4_peaks_are_the_vendor_figures(key):
    """Blackwell parts carry their vendor FP4 peak; the parts before Blackwell none (peak_flops refuses)."""
    g = get_gpu(key)
    assert supports(g, "nvfp4")
    assert peak_flops(g, "nvfp4") == pytest.approx(VENDOR_FP4[key], rel=1e-12)
    for older in ("h100-sxm", "h200", "mi300x"):
        assert not supports(get_gpu(older), "nvfp4")
        with pytest.raises(ValueError, match="no nvfp4"):
            peak_flops(get_gpu(older), "nvfp4")


# ------------------------------------------------------------------------------------------------ time model

# Llama 3 8B / 70B (meta-llama config.json): hidden, FFN, layers, heads, KV heads of 128
LLAMA = {"llama3-8b": (4096, 14336, 32, 32, 8), "llama3-70b": (8192, 28672, 80, 64, 8)}


def _block_linear_params(model: str) -> float:
    d, ff, _, h, kv = LLAMA[model]
    return d * (h + 2 * kv) * 128 + h * 128 * d + 3 * d * ff  # wq wk wv, wo, w1 w3 w2


@pytest.mark.parametrize("model", sorted(LLAMA))
def test_converted_gemms_run_at_the_fp4_peak(model):
    """Llama 3 on GB200, torchtitan: the converted linears (the attention and FFN of the blocks torchtitan's
    nvfp4_bf16_tail_fqns converts at the default 0.15 tail: 27 of 32, 68 of 80) take their training FLOPs / (fp4
    peak x the backend's bf16 GEMM efficiency); the rest (the tail, the head, attention) is timed as in bf16, so the
    saving over bf16 is that share x (1 - bf16 peak / fp4 peak), the GB200 peaks 2.5 and 10 PF."""
    arch = PRESETS[model]
    g = get_gpu("gb200")
    be = get_backend("torchtitan")
    d, ff, layers, _, _ = LLAMA[model]
    converted = len(_tail_fqns(layers, 0.15))
    assert converted == {"llama3-8b": 27, "llama3-70b": 68}[model]
    share = 6 * converted * _block_linear_params(model) / flops.train_flops_per_token(arch, 8192)
    eff = be.base_efficiency * clock_factor(g)
    sm = {p: timing.step_model(arch, 8192, p, g, be, compile=True) for p in ("bf16", "nvfp4")}
    assert sm["nvfp4"].fp8_linear_sec_per_flop == pytest.approx(share / (10000e12 * eff), rel=1e-9)
    saving = (sm["bf16"].sec_per_flop - sm["nvfp4"].sec_per_flop) * 2500e12 * eff
    assert saving == pytest.approx(share * (1 - 2500 / 10000), rel=1e-9)
    # MFU is quoted against the bf16 peak, as for fp8
    assert sm["nvfp4"].peak == 2500e12


def test_nvfp4_casts_follow_torchaos_kernels():
    """Llama 3 8B on B200: each converted weight is quantized once per micro-batch by a global amax (2 B read) and
    the 2-D quantization kernel (2 B read, row- and column-wise E2M1 copies of 0.5 B + one scale byte per 16):
    5.125 B per element of the 27 converted blocks, per block on average."""
    arch = PRESETS["llama3-8b"]
    sm = timing.step_model(arch, 8192, "nvfp4", get_gpu("b200"), "torchtitan", compile=True)
    per_elem = 2 + 2 + 2 * (0.5 + 1 / 16)
    assert sm.fp8_weight_cast == pytest.approx(per_elem * _block_linear_params("llama3-8b") * 27 / 32, rel=1e-9)
    assert sm.fp8_in_bytes == pytest.approx(0.5 * (1 + 1 / 16))


def test_a_plan_is_faster_in_nvfp4_than_in_bf16_and_the_tail_costs_time():
    arch = PRESETS["llama3-8b"]
    g = get_gpu("gb200")
    plan = ParallelPlan(dp_shard=8, micro_batch=2, grad_accum=4, activation_checkpointing="selective")
    step = {tail: timing.step_time(timing.step_model(arch, 8192, "nvfp4", g, "torchtitan", nvfp4_bf16_tail=tail),
                                   plan)[0] for tail in (0.0, 0.15, 0.5)}
    bf16 = timing.step_time(timing.step_model(arch, 8192, "bf16", g, "torchtitan"), plan)[0]
    assert step[0.0] < step[0.15] < step[0.5] < bf16


# ------------------------------------------------------------------------------------------------ checks

def _spec(gpu="gb200", count=8, model="llama3-8b", training="", parallelism="", seq=8192) -> str:
    return (f"name: fp4\nmodel: {model}\nhardware:\n  gpu: {gpu}\n  count: {count}\n"
            f"data:\n  sources:\n    - {{name: web, path: /data/web/*.parquet, format: parquet, tokens: 3T}}\n"
            f"  seq_len: {seq}\n  tokens: 100B\n"
            f"training:\n  precision: nvfp4\n  global_batch_tokens: 4194304\n  optimizer: {{lr: 3.0e-4}}\n{training}"
            + (f"parallelism:\n{parallelism}" if parallelism else ""))


def _errors(text):
    c = compile_text(text)
    return c, [d for d in c.diagnostics if d.severity == "error"]


def _line(text: str, key: str) -> int:
    return next(i for i, ln in enumerate(text.splitlines(), 1) if ln.strip().startswith(key))


def test_a_valid_nvfp4_spec_plans_without_errors():
    text = _spec()
    c, errs = _errors(text)
    assert errs == [] and c.plan is not None
    assert not [d for d in c.diagnostics if d.code in ("T014", "T015", "T016", "T017", "T018")]
    assert "NVFP4" in c.backend.fp8


def test_nvfp4_on_hopper_is_an_error():
    text = _spec(gpu="h100-sxm")
    _, errs = _errors(text)
    (d,) = [e for e in errs if e.code == "T014"]
    assert d.path == "training.precision" and d.line == _line(text, "precision:")
    assert "FP4" in d.message and "gb200" in d.hint


def test_nvfp4_on_deepspeed_is_an_error():
    text = _spec(training="  backend: deepspeed\n")
    _, errs = _errors(text)
    (d,) = [e for e in errs if e.code == "T015"]
    assert d.path == "training.backend" and d.line == _line(text, "backend:")
    assert "torchtitan" in d.hint


def test_nvfp4_without_compile_is_an_error():
    text = _spec(training="  compile: false\n")
    _, errs = _errors(text)
    (d,) = [e for e in errs if e.code == "T016"]
    assert d.path == "training.compile" and d.line == _line(text, "compile:")


def test_a_tail_that_keeps_every_block_bf16_is_an_error():
    """torchtitan's nvfp4_bf16_tail_fqns raises when ceil(n x fraction) >= n; the plan says so first."""
    text = _spec(training="  nvfp4_bf16_tail: 0.99\n")
    with pytest.raises(ValueError):
        _tail_fqns(32, 0.99)
    _, errs = _errors(text)
    (d,) = [e for e in errs if e.code == "T018"]
    assert d.line == _line(text, "nvfp4_bf16_tail:")


# Qwen2.5-0.5B (Qwen/Qwen2.5-0.5B config.json): hidden 896, FFN 4864, 24 layers, 14 heads, 2 KV heads of 64
QWEN05 = ("{name: qwen05, n_layers: 24, d_model: 896, n_heads: 14, n_kv_heads: 2, d_ff: 4864, vocab_size: 151936, "
          "rope_theta: 1000000.0, max_seq_len: 32768, tied_embeddings: true}")


def test_a_tp_that_unaligns_a_converted_linear_is_an_error():
    """Qwen2.5-0.5B: every dimension is a multiple of 128 unsharded (896 = 7 x 128, fused q/k/v (14 + 2 x 2) x 64
    = 1152 = 9 x 128, 4864 = 38 x 128), but tp 2 splits the fused q/k/v's 1152 outputs into 576, not a multiple of
    torchao's 128; tp 1 is fine."""
    text = _spec(model=QWEN05, count=8, seq=4096, parallelism="  tp: 2\n")
    _, errs = _errors(text)
    (d,) = [e for e in errs if e.code == "T017"]
    assert d.path == "parallelism.tp" and d.line == _line(text, "tp:")
    assert "1152" in d.message and "576" in d.message and "tp 2" in d.message and "tp to 1" in d.hint
    text = _spec(model=QWEN05, count=8, seq=4096, parallelism="  tp: 1\n")
    assert not [e for e in _errors(text)[1] if e.code == "T017"]


# ------------------------------------------------------------------------------------------------ the job

SMALL = dict(name="small", n_layers=4, d_model=128, n_heads=2, n_kv_heads=2, d_ff=256, vocab_size=512,
             rope_theta=500000.0, max_seq_len=256)


def _nvfp4_job(tmp_path=None, tail=None):
    sys.path.insert(0, "tests")
    from test_torchtitan_render import compiled_for

    extra = {} if tail is None else {"nvfp4_bf16_tail": tail}
    c = compiled_for(model=SMALL, precision="nvfp4", gpu="gb200", seq=256, training_extra=extra)
    files = render_torchtitan(c, strict=True)
    if tmp_path is not None:
        for rel, text in files.items():
            p = tmp_path / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(text)
    return files["torchtitan/llmc_job.py"]


def test_the_job_emits_torchtitans_nvfp4_converter_without_the_tail():
    src = _nvfp4_job()
    assert "from torchtitan.components.quantization import NVFP4LinearConverter" in src
    assert f"fqns={_tail_fqns(4, 0.15)!r}" in src  # ['layers.0.', 'layers.1.', 'layers.2.']: block 3 stays bf16
    assert "model_compile_enabled=True" in src and "Float8LinearConverter" not in src
    assert f"fqns={_tail_fqns(4, 0.5)!r}" in _nvfp4_job(tail=0.5)


@pytest.mark.slow
def test_the_nvfp4_job_loads_and_converts_the_planned_linears(tmp_path):
    """The emitted job loads through torchtitan's ConfigManager with compile on; its converters() are torchtitan's
    NVFP4LinearConverter.Config with torchtitan's own tail FQNs, and applying it (its constructor refuses a CPU:
    convert() is called on an instance built without it) swaps exactly the attention and FFN linears of blocks 0-2
    for NVFP4Linear, leaving block 3 and lm_head bf16."""
    pytest.importorskip("torchtitan")
    from torchtitan.components.quantization import NVFP4LinearConverter
    from torchtitan.components.quantization.nvfp4 import NVFP4Linear
    from torchtitan.config import ConfigManager
    from torchtitan.models.common.linear import Linear

    _nvfp4_job(tmp_path)
    mod_dir = tmp_path / "torchtitan"
    sys.path.insert(0, str(mod_dir))
    sys.modules.pop("llmc_job", None)
    try:
        cfg = ConfigManager().parse_args(["--module", "llmc_job", "--config", "job_without_converters"])
        assert cfg.compile.enable and "model" in cfg.compile.components
        import llmc_job

        (conv,) = llmc_job.converters()
        assert isinstance(conv, NVFP4LinearConverter.Config)
        assert conv.fqns == _tail_fqns(4, 0.15) and conv.model_compile_enabled
        if NVFP4Linear is None:
            pytest.skip("torchao without the nvfp4_training prototype")
        built = object.__new__(NVFP4LinearConverter)
        built.config = conv
        model = built.convert(llmc_job.model_config())
    finally:
        sys.path.remove(str(mod_dir))
        sys.modules.pop("llmc_job", None)
    fp4 = {fqn for fqn, c, _, _ in model.traverse(Linear.Config) if type(c) is not Linear.Config}
    bf16 = {fqn for fqn, c, _, _ in model.traverse(Linear.Config) if type(c) is Linear.Config}
    assert {f.split(".")[1] for f in fp4} == {"0", "1", "2"}
    assert {f for f in fp4 if f.startswith("layers.0.")} == {"layers.0.attention.qkv_linear.wqkv", "layers.0.attention.wo",
                                                             "layers.0.feed_forward.w1", "layers.0.feed_forward.w2",
                                                             "layers.0.feed_forward.w3"}
    assert "lm_head" in bf16 and all(f.startswith("layers.3.") or f == "lm_head" for f in bf16)


def test_llmc_trainers_run_an_nvfp4_runs_stages_in_bf16(tmp_path):
    """The torchtitan job trains the pre-training in NVFP4; the post-training stages run on llmc's trainers, which
    convert no linears: they train in bf16 (autocast), report MFU against the bf16 peak (the lock's GPU row), and
    a DeepSpeed config enables bf16 (a KeyError on the nvfp4 peak field stopped every such stage at its start)."""
    import json

    import torch

    from llmc.emit.deepspeed import DeepSpeedEmitter
    from llmc.emit.lock import lock_text
    from llmc.runtime.job import TrainJob
    from llmc.runtime.train import _autocast

    text = _spec(training="  backend: torchtitan\n") + (
        "stages:\n  - name: sft\n    kind: sft\n    lr: 2.0e-5\n    data:\n"
        "      sources:\n        - {name: chat, path: /data/chat.jsonl, format: jsonl, kind: chat}\n"
        "      seq_len: 4096\n      tokens: 10M\n")
    c, errs = _errors(text)
    assert not errs, [e.render() for e in errs]
    lock = json.loads(lock_text(c))
    job = TrainJob.from_lock(lock, "sft")
    assert job.precision == "nvfp4"
    assert job.peak_flops == pytest.approx(get_gpu("gb200").bf16_tflops * 1e12 * clock_factor(get_gpu("gb200")))
    assert isinstance(_autocast(job, torch.device("cpu"), cpu_bf16=True), torch.autocast)
    files = DeepSpeedEmitter().files(c, {})
    ds = [v for k, v in files.items() if k.endswith("ds_config.json")]
    assert ds and json.loads(ds[0])["bf16"]["enabled"] is True


def _budget_spec(model: str, days: float) -> str:
    return (f"name: b\nmodel: {model}\nhardware: {{gpu: gb300, count: 256}}\ndata:\n  sources:\n"
            f"    - {{name: web, path: /data/web/*.parquet, format: parquet, tokens: 30T}}\n  seq_len: 8192\n"
            f"  tokens: 1T\ntraining: {{precision: nvfp4, backend: torchtitan, global_batch_tokens: 16777216}}\n"
            f"budget: {{max_days: {days}}}\n")


def test_the_budget_floor_of_an_nvfp4_run_is_at_the_fp4_peak():
    """B003 refuses a budget no plan can meet; its floor is the training FLOPs at 60 % of the precision's own peak
    (fp4's: 15 PFLOPS a GB300), computed here from 6 N D + attention: an nvfp4 plan that meets its budget at more
    than 60 % of the bf16 peak was refused as impossible when the floor used bf16's."""
    from llmc.compiler.checks import MAX_PLAUSIBLE_MFU

    c, errs = _errors(_budget_spec("llama3-70b", 12))
    assert not errs, [e.render() for e in errs]
    assert c.time.days <= 12 and c.time.mfu > MAX_PLAUSIBLE_MFU  # (against bf16's peak)
    flops = c.compute.training_flops
    want = flops / (256 * VENDOR_FP4["gb300"] * MAX_PLAUSIBLE_MFU) / 86400
    assert c.budget_floor.days == pytest.approx(want, rel=1e-9) and "nvfp4 peak" in c.budget_floor.basis
    _, errs = _errors(_budget_spec("llama3-70b", round(0.9 * want, 3)))
    assert [e.code for e in errs] == ["B003"] and f"{want:.1f} days" in errs[0].message, [e.render() for e in errs]


def test_an_moe_whose_experts_stay_bf16_is_warned_that_fp8_converts_more():
    """Mixtral's FFN is all routed experts, which torchtitan converts to fp8 (grouped GEMMs) but not to NVFP4: nvfp4
    converts its attention linears only (T019, with both shares); Llama's dense FFN converts in both (no T019)."""
    from llmc.compiler import flops as fl

    c = compile_text(_budget_spec("mixtral-8x7b", 200))
    warned = [d for d in c.diagnostics if d.code == "T019"]
    arch = PRESETS["mixtral-8x7b"]
    by = fl.linear_flops_by_part(arch)
    total = fl.train_flops_per_token(arch, 8192)
    nv = by["attention"] / total * (32 - math.ceil(32 * 0.15)) / 32
    f8 = (by["attention"] + by["experts"]) / total
    assert len(warned) == 1 and f"{100 * nv:.0f}%" in warned[0].message and f"{100 * f8:.0f}%" in warned[0].message
    assert not [d for d in compile_text(_budget_spec("llama3-70b", 200)).diagnostics if d.code == "T019"]


def test_the_search_keeps_to_tps_that_align_nvfp4s_gemms():
    """Qwen2.5-72B's FFN width 29,568 = 128 x 231: no power-of-two tp above 1 leaves its column-parallel w1 / w3
    128-aligned, so the search rejects tp > 1 for nvfp4 (naming the linear) instead of choosing tp 2 and refusing it
    afterwards (T017). On 8 B200s tp 1 does not fit: P004, the closest layout tp 1."""
    c, errs = _errors(_spec(gpu="b200", count=8, model="qwen2.5-72b", training="  backend: torchtitan\n"))
    assert [e.code for e in errs] == ["P004"], [e.render() for e in errs]
    assert 29568 % 128 == 0 and all((29568 // t) % 128 for t in (2, 4, 8))
    c, errs = _errors(_spec(gpu="gb200", count=64, model="qwen2.5-72b", training="  backend: torchtitan\n"))
    assert not errs and c.plan.tp == 1, [e.render() for e in errs]


def test_t015_says_why_the_plan_would_not_run_on_torchtitan():
    """backend auto with a seq_len torchtitan's chunked loss cannot split (8100 = 8 x 1012.5) resolves to the native
    trainer, which trains no NVFP4: T015 names that reason, not only "set training.backend: torchtitan" (which then
    fails on the same seq_len)."""
    _, errs = _errors(_spec(seq=8100))
    t015 = [e for e in errs if e.code == "T015"]
    assert len(t015) == 1 and "8100" in t015[0].message and "chunked loss" in t015[0].message, [e.render() for e in errs]
