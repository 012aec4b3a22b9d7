"""fp8 without torch.compile: torchao's float8 casts run op by op (backends.EAGER_FLOAT8), the step model charges them,
and T021 says so with the step compiled and in bf16 (checks.check_fp8_eager).

Sanity check, not a fit (pytorch/ao#685, "[FP8] performance degradation in speed and memory without compile": an
FFN, bs 32 x seq 512 = 16,384 tokens, dim 4096, on an H100; FP16 43.16 ms and 3.9 GB, torchao FP8 eager 49.25 ms
and 6.1 GB, compiled 26.20 ms and 4.1 GB). Taking the FFN as dim -> 4 dim -> dim and the tensorwise recipe (torchao's
default then), EAGER_FLOAT8 counts per token (d + 4d) input and (4d + d) grad_output elements at 68 B = 45.6 GB per
step, + 2 x 4d^2 weight elements at 68 B = 9.1 GB, against 2.7 + 1.1 GB compiled (fp8_cast_bytes / fp8_weight_cast_
bytes 4 and 8 B): 51 GB more, 15 ms at the H100 SXM's 3.35 TB/s (25 ms at the PCIe card's 2.0 TB/s), so eager
~41-52 ms against the measured 49.25 ms: eager no faster than 16-bit, as measured. Its extra memory is transient,
not saved for the backward (matmul_with_hp_or_float8_args saves the bf16 input and weight, as F.linear does): one cast
holds its fp32 scaled tensor, its fp32 clamped copy and the fp8 output, 9 B per element, 2.4 GB for the 16,384 x
16,384 hidden tensor, against the 2.0-2.2 GB more measured; llmc's memory model does not add it (see the report).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmc.compiler import backends, checks, timing
from llmc.compiler.backends import EAGER_FLOAT8, get_backend
from llmc.compiler.checks import Sink
from llmc.compiler.compile import compile_spec
from llmc.overrides import load_with_overrides, parse_override

ROOT = Path(__file__).resolve().parent.parent
L8B = ROOT / "examples" / "llama3_8b_h100x8.yaml"


def _compile(*sets: str):
    run, lines, raw = load_with_overrides(L8B, [parse_override(s) for s in sets])
    return compile_spec(run, str(L8B), lines, spec_bytes=raw)


def _sm(c, precision: str, compile: bool):
    return timing.step_model(c.spec.model, c.spec.data.seq_len, precision, c.gpu, c.backend.name, compile=compile,
                             fp8_recipe=c.spec.training.fp8_recipe)


# ------------------------------------------------------------------------------------------- the eager cast bytes


def _trace_float8_linear(recipe: str, M: int, K: int, N: int):
    """The ops torchao dispatches for one Float8Linear (in K, out N) forward + backward on M tokens, run on CPU under a
    TorchDispatchMode: (op name, {tensor numel: bytes read + written by the tensors of that size}) for every op that
    is not a view; the fp8 GEMMs (_scaled_mm) are recorded, not run (their traffic is the GEMM model's)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("torchao.float8")
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear import Float8Linear
    from torchao.float8.float8_training_tensor import Float8TrainingTensor

    class Trace(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            if any(isinstance(a, Float8TrainingTensor) for a in ins):
                return NotImplemented  # the subclass unwraps it; its plain-tensor ops come back here
            name = func.overloadpacket.__name__
            if name == "_scaled_mm":
                self.ops.append((name, {}))
                # _scaled_mm(self, mat2, scale_a, scale_b, bias, scale_result, out_dtype, use_fast_accum)
                dtype = kwargs.get("out_dtype", args[6] if len(args) > 6 else None)
                return torch.zeros(args[0].shape[0], args[1].shape[1], dtype=dtype or torch.bfloat16)
            out = func(*args, **kwargs)
            outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
            # a view (t, view, reshape; contiguous of a contiguous tensor) moves nothing; a copy does, in-place ops too
            aliased = func.is_view and {o.untyped_storage().data_ptr() for o in outs} <= {
                a.untyped_storage().data_ptr() for a in ins}
            if not aliased:
                moved: dict[int, int] = {}
                for t in ins + outs:
                    moved[t.numel()] = moved.get(t.numel(), 0) + t.numel() * t.element_size()
                self.ops.append((name, moved))
            return out

    lin = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
    f8 = Float8Linear.from_float(lin, Float8LinearConfig.from_recipe_name(recipe))
    x = torch.randn(M, K, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(M, N, dtype=torch.bfloat16)
    trace = Trace()
    with trace:
        y = f8(x)
        forward = len(trace.ops)
        y.backward(grad)
    return trace.ops, forward


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_eager_cast_bytes_are_the_ops_torchao_dispatches(recipe):
    # distinct sizes, so that each tensor's role is told by its element count: input M x K, grad_output M x N,
    # weight N x K; the scale-sized tensors (one element per tensor / row) fall outside all three
    M, K, N = 256, 512, 384
    ops, forward = _trace_float8_linear(recipe, M, K, N)
    roles = {"input": M * K, "grad_output": M * N, "weight": N * K}
    per_elem = {role: sum(moved.get(n, 0) for _, moved in ops) / n for role, n in roles.items()}
    want = EAGER_FLOAT8[recipe]
    assert per_elem == {"input": want.input, "grad_output": want.grad_output, "weight": want.weight}
    # three fp8 GEMMs; the forward runs two casts (input, weight), its GEMM and the reciprocals of the GEMM's two
    # scales (addmm_float8_unwrapped)
    assert [name for name, _ in ops].count("_scaled_mm") == 3
    assert forward == 2 * want.kernels + 1 + 2


def test_eager_casts_are_the_dense_linears_only():
    # mxfp8 (Triton / CUDA cast kernels), nvfp4 (Triton) and the routed experts' grouped GEMM keep their bytes in
    # eager; only torchao float8's dense recipes have an eager path of their own
    tt = get_backend("torchtitan")
    assert set(tt.fp8_eager_casts) == {"tensorwise", "rowwise"}
    for name, be in backends.BACKENDS.items():
        if name != "torchtitan":
            assert not be.fp8_eager_casts


# ------------------------------------------------------------------------------------------- the step model


def test_eager_fp8_casts_per_token_follow_the_llama_linears():
    # Llama 3 8B, one GPU's TP-free block: the inputs of wq, wk, wv (d each), wo (n_heads * hd), w1, w3 (d), w2
    # (d_ff); the grad_outputs of wq (n_heads * hd), wk, wv (kv_heads * hd each), wo (d), w1, w3 (d_ff), w2 (d)
    c = _compile("training.precision=fp8")
    a = c.spec.model
    d, f, q, kv = a.d_model, a.d_ff, a.n_heads * a.hd, a.kv_heads * a.hd
    inputs, grads = 3 * d + q + 2 * d + f, q + 2 * kv + d + 2 * f + d
    e = EAGER_FLOAT8["rowwise"]
    sm = _sm(c, "fp8", False)
    assert sm.fp8_cast_tp1 + sm.fp8_cast_sharded == pytest.approx(e.input * inputs + e.grad_output * grads)
    # the weights: every attention and MLP matrix, per micro-batch
    weights = d * q + 2 * d * kv + q * d + 3 * d * f
    assert sm.fp8_weight_cast == pytest.approx(e.weight * weights)
    # compiled: torchao's roofline bytes, unchanged (6 B per element, 10 per weight element, rowwise)
    smc = _sm(c, "fp8", True)
    tt = get_backend("torchtitan")
    assert smc.fp8_cast_tp1 + smc.fp8_cast_sharded == pytest.approx(tt.fp8_cast_bytes["rowwise"] * (inputs + grads))
    assert smc.fp8_weight_cast == pytest.approx(tt.fp8_weight_cast_bytes["rowwise"] * weights)


def test_eager_fp8_is_not_predicted_faster_than_eager_bf16():
    # the reviewer's case: Llama 3 8B on 8 H100s, torchtitan rowwise float8 with compile off; on the plan's layout
    c = _compile("training.precision=fp8", "training.compile=false")
    assert c.backend.name == "torchtitan" and not c.backend.compile
    fp8 = timing.step_time(_sm(c, "fp8", False), c.plan)[0]
    bf16 = timing.step_time(_sm(c, "bf16", False), c.plan)[0]
    assert fp8 > bf16
    # compiled, fp8 still wins (the fitted torchtitan rows are compiled)
    assert timing.step_time(_sm(c, "fp8", True), c.plan)[0] < timing.step_time(_sm(c, "bf16", True), c.plan)[0]


# ------------------------------------------------------------------------------------------- T021


def _t021(c, run=None):
    run = run or c.spec
    be = get_backend(c.backend.name)
    sink = Sink({}, "spec.yaml")

    def step_model(precision, compile):
        return _sm(c, precision, compile)

    applied = checks.check_fp8_eager(run, be, c.plan, _sm(c, run.training.precision, c.backend.compile),
                                     step_model, sink)
    return applied, [d for d in sink.items if d.code == "T021"]


def test_t021_names_the_step_with_and_without_compile_and_in_bf16():
    c = _compile("training.precision=fp8", "training.compile=false")
    applied, ds = _t021(c)
    assert applied and len(ds) == 1
    d = ds[0]
    assert d.severity == "warning" and d.path == "training.compile"
    e = EAGER_FLOAT8["rowwise"]
    step = timing.step_time(_sm(c, "fp8", False), c.plan)[0]
    compiled = timing.step_time(_sm(c, "fp8", True), c.plan)[0]
    bf16 = timing.step_time(_sm(c, "bf16", False), c.plan)[0]
    assert f"{e.kernels} separate kernels per cast" in d.message
    assert f"{e.input:g} B per input element, {e.grad_output:g} per gradient" in d.message
    assert f"predicted {step:.2f} s per step against {compiled:.2f} s with compile" in d.message
    assert f"{bf16:.2f} s in bf16 without compile; not faster than bf16" in d.message
    assert "training.compile: true" in d.hint


@pytest.mark.parametrize("sets", [("training.precision=fp8",),  # compiled
                                  ("training.precision=bf16", "training.compile=false")])
def test_t021_only_for_fp8_without_compile(sets):
    c = _compile(*sets)
    applied, ds = _t021(c)
    assert not applied and not ds


def test_t021_not_for_a_recipe_without_an_eager_path():
    # mxfp8's casts are torchao's Triton / CUDA kernels, the same compiled or not: no T021 (a check on the function,
    # with the 8B plan; the recipe decides)
    c = _compile("training.precision=fp8", "training.compile=false")
    run = c.spec.model_copy(update={"training": c.spec.training.model_copy(update={"fp8_recipe": "mxfp8"})})
    applied, ds = _t021(c, run)
    assert not applied and not ds
