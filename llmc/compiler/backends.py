"""Training backends as data: what each one allocates and what it overlaps.

A plan is timed and sized for the backend that will run it (``training.backend``; ``auto`` lets
:func:`resolve_backend` pick one and say why). Every value below names the code or document it comes
from; the few that are *fitted* (efficiency levels, the allocator's reserved/allocated ratio) say so
and are fitted in one place (``llmc/compiler/calibration.py`` for user calibrations; the defaults here
from the ``use: fit`` rows of ``benchmarks/``, see benchmarks/README.md).

Model states per parameter, mixed-precision AdamW, as (replicated bytes, bytes sharded over the ZeRO /
FSDP group) for weights, gradients and optimizer states:

* torchtitan / llmc native, FSDP2 (``fully_shard`` with ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)``): the sharded parameter keeps its original fp32 dtype, its gradient is fp32, and
  AdamW keeps exp_avg / exp_avg_sq in fp32, so 4 + 4 + 8 = 16 B sharded; there is no separate master
  copy. bf16 exists only in the all-gathered (unsharded) parameters of the units being computed
  (https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html, MixedPrecisionPolicy;
  torchtitan ``config/job_config.py``: ``mixed_precision_param = "bfloat16"``,
  ``mixed_precision_reduce = "float32"``). DDP (``dp_shard == 1``): fp32 parameters, gradients and
  states replicated, 16 B (torchtitan runs the forward under ``torch.autocast`` when FSDP is off).
* DeepSpeed (bf16 with ZeRO), as llmc's ds_config runs it: bf16 parameters, fp32 master weights, momentum and
  variance, and gradients reduced and accumulated in fp32 (``communication_data_type`` and, ZeRO >= 1,
  ``data_types.grad_accum_dtype``: :func:`ds_fp32_grad_accum`, llmc/emit/deepspeed.py). DeepSpeed's own estimators
  (``deepspeed/runtime/zero/stage_1_and_2.py::estimate_zero2_model_states_mem_needs``: "2 = params_16bit,
  18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit";
  ``stage3.py::estimate_zero3_model_states_mem_needs``: 18 B/param / N + 4 B x the largest layer) assume its default,
  bf16 accumulation. With fp32 accumulation (DeepSpeed 0.19.8): ZeRO-0 cannot (it refuses an fp32 grad_accum_dtype
  without ZeRO): bf16 gradients in ``.grad`` + the fp32 copies its optimizer makes, 2 + 2 + 4 + 12; ZeRO-1 runs
  ``BF16_Optimizer`` (engine._do_optimizer_sanity_check), whose gradient is a replicated fp32 buffer of the whole
  model beside the bf16 ``.grad`` (bf16_optimizer.py ``fp32_groups_gradients_flat``), 2 + 2 + 4 replicated + 12/N;
  ZeRO-2 accumulates into an fp32 partition (stage_1_and_2.py ``_build_compact_grad_partition_buffer``, the step
  reads it as it is) and keeps bf16 gradients only in its reduce buckets (buffers), 2 + 16/N; ZeRO-3 its fp32
  ``grad_partitions_flat_buffer`` (stage3.py), 18/N (+ the gathered largest layer in fp32-equivalent bytes, counted
  as a buffer). The ``megatron`` reference profile keeps the estimators' layout (``_ZERO_ESTIMATOR_STATES``).
* ``generic``: the ZeRO paper's 2 + 2 + 12 = 16 B (Rajbhandari et al. 2020, sec. 3.1), kept for callers
  that give no backend.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmc import TARGET_VERSIONS
from llmc.compiler.units import GiB, MiB
from llmc.spec.families import FUSED_HF_MODEL_TYPES, family_of


@dataclass(frozen=True)
class StateBytes:
    """Bytes per parameter of one ZeRO stage: (replicated, sharded) for weights, grads, optimizer."""

    weights: tuple[float, float]
    grads: tuple[float, float]
    optimizer: tuple[float, float]


@dataclass(frozen=True)
class EagerCast:
    """The fp8 casts of one converted linear run eagerly (no torch.compile), in HBM bytes per element of the tensor
    they cast, by its role, and the kernels one cast launches (``EAGER_FLOAT8`` derives torchao's)."""

    input: float  # per element of the linear's input (its forward cast, its backward cast, their layouts)
    grad_output: float  # per element of the gradient of its output
    weight: float  # per weight element, per micro-batch
    kernels: int  # kernels one cast runs (amax, scale, upcast, scale multiply, clamp, fp8 conversion...)


@dataclass(frozen=True)
class Backend:
    """What one training backend allocates and overlaps. ``sources`` maps each field to its source."""

    name: str
    runnable: bool  # llmc can build and launch it (megatron is a reference profile for benchmarks only)
    states: dict[int, StateBytes]  # by ZeRO stage (0 = DDP replicas)
    # --- compute
    base_efficiency: float  # fraction of dense bf16 peak for large GEMMs + flash attention (fitted)
    fp8_linear_speedup: float  # speed-up of the linears in fp8 vs bf16, tensorwise scaling (see sources)
    fp8_rowwise_speedup: float  # the same with rowwise scaling (finer scales, more cast work)
    fp8_default_recipe: str  # the recipe llmc's job for this backend uses
    fp8_cast_bytes: dict[str, float]  # HBM bytes per cast element (bf16 read + fp8 write...) by recipe
    attn_relative_efficiency: float  # attention kernels' efficiency relative to the GEMMs' (see sources)
    compile_default: bool  # torch.compile on unless the spec says otherwise
    eager_elementwise: float  # HBM traffic of unfused elementwise ops relative to the fused estimate
    # --- overlap
    fsdp_overlap: float  # share of FSDP/ZeRO traffic hidden behind compute (prefetch)
    tp_overlap: float  # share of TP collectives hidden (0 = exposed; async TP / comm-GEMM overlap)
    async_tp_overlap: float  # share hidden with async TP on (torchtitan: needs compile)
    ep_overlap: float  # share of MoE all-to-all hidden behind expert compute
    ep_node_dedup: bool  # dispatch sends a token once per remote node, then over NVLink (DeepEP / hierarchical)
    cp_overlap: float  # share of the ring-attention K/V exchange hidden behind attention
    # --- memory
    logits_fp32: bool  # the loss upcasts logits to fp32 (12 B per token per vocab entry at the peak)
    compiles_loss: bool  # torch.compile also covers the loss (fused upcast + log_softmax + nll: 4 B at the peak)
    compile_act_saving: float  # fraction of (non-AC) activation bytes torch.compile avoids saving
    reserved_over_allocated: float  # allocator reserved / allocated at the peak (fragmentation; fitted)
    cuda_context_bytes: float  # CUDA context + kernels, outside the caching allocator
    nccl_bytes_per_peer_group: float  # NCCL buffers per communicator (outside the allocator)
    supports: frozenset[str] = frozenset()  # parallel dimensions the runner implements (+ "offload": CPU offload)
    sources: dict[str, str] = field(default_factory=dict)
    # HBM bytes per cast element when the cast cannot be fused into the producing kernel (its input comes out
    # of a collective, or eager mode), by recipe; missing = fp8_cast_bytes
    fp8_cast_bytes_unfused: dict[str, float] = field(default_factory=dict)
    fp8_weight_cast_bytes: dict[str, float] = field(default_factory=dict)  # per weight element per micro-batch
    # the casts of an fp8 run without torch.compile, by recipe, where the runner's eager path differs from the
    # compiled one (torchao float8: each step of a cast its own kernel, EAGER_FLOAT8); missing = the unfused bytes
    # (recipes whose casts are the same kernels compiled or not: torchao's mxfp8 / nvfp4 / fp8 grouped-GEMM casts)
    fp8_eager_casts: dict[str, EagerCast] = field(default_factory=dict)
    fp8_tp_gather_recipes: frozenset[str] = frozenset()  # recipes whose TP all-gathers run in fp8 (cast on the shard)
    fp8_shape_stretch: bool = False  # fp8 GEMMs need fp8-speedup x larger shapes for the same efficiency (timing)
    fp8_cast_blocks_async_tp: bool = False  # an fp8 cast between a TP all-gather and its GEMM stops async TP fusing them
    sac_regathers_tp: bool = False  # selective AC does not save the TP all-gathers' outputs: the backward re-gathers
    fp8_recipes: frozenset[str] = frozenset()  # fp8 recipes the runner executes (empty: it trains fp8 specs in bf16)
    # the parts of the model (flops.LINEAR_PARTS) whose linears the runner converts to fp8 in an fp8 run; the
    # time model speeds up those FLOPs only (fp8_converted_parts). Default: every block linear, the routed
    # experts' grouped GEMMs included; the output head and the MoE router stay bf16
    fp8_parts: frozenset[str] = frozenset({"attention", "mlp", "experts"})
    # the parts whose linears the runner converts to NVFP4 in an nvfp4 run (nvfp4_converted_parts), in the blocks
    # before the bf16 tail (training.nvfp4_bf16_tail); empty: the runner does not train nvfp4 (the plan refuses it,
    # T015). The output head and the MoE router stay bf16; the routed experts too (no NVFP4 grouped GEMM converter)
    nvfp4_parts: frozenset[str] = frozenset()
    # speed-up of the NVFP4 linears vs bf16, capped at the fp4/bf16 dense peak ratio (linear_speedup); inf = the
    # cap: FP4 GEMMs as efficient against the FP4 peak as bf16 ones against the bf16 peak (no NVFP4 row to fit)
    nvfp4_linear_speedup: float = math.inf
    can_compile: bool = True  # the runner applies training.compile (torch.compile of the blocks)
    # training options the runner applies ("z_loss": the log-sum-exp penalty, "loss_spike": rewind and skip)
    applies: frozenset[str] = frozenset({"z_loss", "loss_spike"})
    # what activation_checkpointing "selective" recomputes: "per_op" = torchtitan's per-op SAC (every other matmul
    # and the elementwise ops; flops.recompute_flops_per_token); "attention_core" = Korthikanti et al. 2022's
    # selective recomputation of the attention core only (RoPE + softmax(QK^T)V), which keeps nearly every
    # activation (memory.layer_activation_bytes_per_token "selective_core")
    selective_ac: str = "per_op"
    # the job computes the output head and the loss over this many equal slices of each rank's micro-batch sequence,
    # each slice's backward run at once (1: the whole micro-batch's logits at the peak; memory.loss_logits_bytes)
    loss_chunks: int = 1
    # the runner can compute the output head and the loss in slices of memory.loss_slice_tokens tokens, each slice's
    # head recomputed in the backward (ParallelPlan.loss_chunk_tokens): the search slices the loss of a candidate whose
    # whole logits do not fit (search._Search.fitting_plan)
    slices_loss: bool = False
    # tensor parallelism with sequence parallelism (Korthikanti et al. 2022 sec. 4.2.2: the norms and the block's
    # inputs split over tp as well); False: they are replicated on every TP rank (memory._stage_values adds them)
    sequence_parallel: bool = True
    # the runner can pipeline a model whose output head shares the embedding's weight (False: the search keeps such a
    # model on one pipeline stage, pp = 1)
    tied_pp: bool = True
    # how ZeRO-1/2 runs (memory._static_runs, timing._Layout._split). "fsdp2": FSDP2 with reshard_after_forward=False
    # (llmc's torchtitan job and native trainer): the parameters are all-gathered before each micro-batch's forward
    # (resharded after its backward) and its gradient reduce-scattered after it, holding one unit's unsharded fp32
    # gradient; under PP gradient sync waits for the last micro-batch (once per step, the stage's whole fp32 gradient
    # held). "deepspeed": two reduce buckets of ds_reduce_bucket_elems; ZeRO-2 reduces into the gradient partitions
    # every micro-batch, ZeRO-1 at the accumulation boundary; parameters all-gathered once per step. "reference":
    # gradients reduced and parameters gathered once per step, reduce + all-gather buckets of DeepSpeed's default
    # size (5e8 elements)
    zero12: str = "reference"


_SLICED_LOSS = ("llmc/runtime/model.py token_losses(chunk=loss_chunk_tokens): the head and cross-entropy of each slice "
                "under torch.utils.checkpoint, recomputed in the backward (the job's plan.loss_chunk_tokens)")

# llmc's torchtitan job maps ZeRO-1/2 to FSDP2 with reshard_after_forward = "never" (render_torchtitan.py):
# the fp32 shards stay sharded and the all-gathered bf16 parameters are kept from forward to backward
# (fully_shard docs: reshard_after_forward=False keeps the unsharded parameters after forward). FSDP2 has no ZeRO-1:
# a sharded module's gradients are always reduce-scattered to the shards (torchtitan docs/fsdp.md: 1D mesh +
# reshard_after_forward=False is FSDP1's SHARD_GRAD_OP, ZeRO-2; https://pytorch.org/docs/stable/fsdp.html
# ShardingStrategy.SHARD_GRAD_OP: "Gradients and optimizer states are sharded during computation"), so a ZeRO-1 pin
# runs, and is sized, as ZeRO-2 (checks.check_zero_pin says so: P021)
_FSDP2_ZERO2 = StateBytes(weights=(2, 4), grads=(0, 4), optimizer=(0, 8))
_FSDP2_STATES = {
    0: StateBytes(weights=(4, 0), grads=(4, 0), optimizer=(8, 0)),
    1: _FSDP2_ZERO2,  # what runs: ZeRO-2
    2: _FSDP2_ZERO2,
    3: StateBytes(weights=(0, 4), grads=(0, 4), optimizer=(0, 8)),
}
# DeepSpeed's estimators' layout (bf16 gradient accumulation, DeepSpeed's default): the megatron reference profile
_ZERO_ESTIMATOR_STATES = {
    0: StateBytes(weights=(2, 0), grads=(2 + 4, 0), optimizer=(12, 0)),
    1: StateBytes(weights=(2, 0), grads=(2, 4), optimizer=(0, 12)),
    2: StateBytes(weights=(2, 0), grads=(0, 6), optimizer=(0, 12)),
    3: StateBytes(weights=(0, 2), grads=(0, 4), optimizer=(0, 12)),
}
# llmc's ds_config (fp32 gradient reduction and accumulation, see the module docstring; DeepSpeed 0.19.8)
_DS_STATES = {
    0: StateBytes(weights=(2, 0), grads=(2 + 4, 0), optimizer=(12, 0)),  # no fp32 accumulation without ZeRO
    # BF16_Optimizer: bf16 .grad + fp32_groups_gradients_flat (zeros_like(bf16_groups_flat, dtype=grad_acc_dtype)),
    # both the whole model on every rank; fp32 master partition + moments sharded (bf16_optimizer.py)
    1: StateBytes(weights=(2, 0), grads=(2 + 4, 0), optimizer=(0, 12)),
    # the fp32 gradient partition (stage_1_and_2.py averaged_gradients = _build_compact_grad_partition_buffer,
    # gradient_accumulation_dtype); the bf16 gradients live in the reduce buckets (memory._static_runs)
    2: StateBytes(weights=(2, 0), grads=(0, 4), optimizer=(0, 12)),
    # grad_partitions_flat_buffer in gradient_accumulation_dtype (stage3.py)
    3: StateBytes(weights=(0, 2), grads=(0, 4), optimizer=(0, 12)),
}
_GENERIC_STATES = {
    0: StateBytes(weights=(2, 0), grads=(2, 0), optimizer=(12, 0)),
    1: StateBytes(weights=(2, 0), grads=(2, 0), optimizer=(0, 12)),
    2: StateBytes(weights=(2, 0), grads=(0, 2), optimizer=(0, 12)),
    3: StateBytes(weights=(0, 2), grads=(0, 2), optimizer=(0, 12)),
}

# MXFP8 (OCP Microscaling, https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf:
# one E8M0 scale per 32 consecutive elements along the GEMM's reduction dimension). The forward GEMM needs the
# operand scaled along its rows, the backward GEMMs along its columns, and "rowwise and columnwise MXFP8 tensors
# are numerically different -- one cannot derive one from the other. Both must be quantized independently from the
# full-precision data" (Transformer Engine docs, features/low_precision_training/mxfp8: Handling transposes), where
# Blackwell's per-tensor fp8 serves both usages with one copy (fp8_current_scaling: "On Blackwell ... rowwise and
# columnwise tensors share the same physical memory layout"). torchao's MX roofline counts the two casts as two
# kernels (https://github.com/pytorch/ao/blob/main/torchao/testing/training/roofline_utils.py,
# get_tensor_memory_traffic_ovhd_s, mxfp8_cublas: x_bf16 -> x_mxfp8_dim0, x_bf16 -> x_mxfp8_dim1; dim0 fused with
# the producer writes 1 B, otherwise reads 2 + writes 1; dim1 always reads 2 + writes 1) and measures them well below
# the bandwidth its roofline assumes for casts (92 % of 8 TB/s on B200): "up to 5.5 TB/s for the dim0 cast (with
# torch.compile), and up to 3.9 TB/s for the dim1 cast" (torchao/prototype/mx_formats/README.md, "to_mx cast
# across dim0 and dim1"). llmc charges cast bytes at the HBM bandwidth as the roofline's 92 % kernels, so an MX
# cast's bytes count x (0.92 x 8.0 / measured TB/s): its time at the measured rate.
MX_BLOCK = 32  # elements per E8M0 scale (OCP MX v1.0)
MX_ROOFLINE_HBM_TBPS = 8.0 * 0.92  # torchao roofline_utils: B200 8.0 TB/s x pct_achievable_mem_bw 0.92
MX_DIM0_CAST_TBPS = 5.5  # torchao mx_formats README: dim0 (rowwise) to_mx cast, torch.compile, B200
MX_DIM1_CAST_TBPS = 3.9  # torchao mx_formats README: dim1 (columnwise) to_mx cast, triton kernel, B200
_MX_W0 = MX_ROOFLINE_HBM_TBPS / MX_DIM0_CAST_TBPS
_MX_W1 = MX_ROOFLINE_HBM_TBPS / MX_DIM1_CAST_TBPS
_SCALE = 1.0 / MX_BLOCK  # E8M0 scale bytes per fp8 byte written
# bytes-equivalent per cast element: (dim0 cast) + (dim1 cast); fp8 writes carry 1/32 B of scales each
MX_CAST_FUSED = (1 + _SCALE) * _MX_W0 + (2 + 1 + _SCALE) * _MX_W1
MX_CAST_UNFUSED = (2 + 1 + _SCALE) * _MX_W0 + (2 + 1 + _SCALE) * _MX_W1
# NVFP4 (training.precision nvfp4; NVIDIA, "Pretraining Large Language Models with NVFP4", arXiv:2509.25149): E2M1
# elements (0.5 B) with one E4M3 scale per 16 (NVFP4_BLOCK) and a per-tensor fp32 scale. torchao's nvfp4_training
# kernels, which torchtitan's NVFP4Linear calls (torchao/prototype/moe_training/nvfp4_training/nvfp4_linear.py,
# nvfp4_mm_triton), quantize each input and grad_output with two Triton kernels: triton_rht_amax (the tensor's
# row- and column-wise amax after the random Hadamard transform: reads the bf16 tensor) and
# triton_rht_quantize_row_col (reads it again, writes the row-wise and the column-wise NVFP4 copies with their
# scales; the Hadamard transform is computed in registers, no HBM traffic of its own); the weight, once per
# micro-batch in the forward (the column-wise copy is saved for the backward), with a global amax (a read) and
# triton_weight_quantize_2d (16x16 2-D scaling: reads it, writes both copies). Per element, as torchao's roofline
# counts the nvfp4 cast (torchao/testing/training/roofline_utils.py, get_inference_tensor_memory_traffic_ovhd_s,
# case "nvfp4": kernel 1 reads bf16 for the amax, kernel 3 reads bf16 and writes fp4 + one scale byte per 16), with
# the two copies the training kernels write: 2 + 2 + 2 x (0.5 + 1/16) = 5.125 B. The kernels are opaque to
# torch.compile, so nothing fuses into the producing op (the same bytes fused or not).
NVFP4 = "nvfp4"  # the key of precision nvfp4 in the per-recipe cast tables
NVFP4_BLOCK = 16  # elements per E4M3 scale
NVFP4_ELEM_BYTES = 0.5  # an E2M1 element
NVFP4_CAST = 2 * 2.0 + 2 * (NVFP4_ELEM_BYTES + 1 / NVFP4_BLOCK)
NVFP4_CAST_SRC = ("torchao nvfp4_training kernels (nvfp4_linear.py nvfp4_mm_triton: triton_rht_amax + "
                  "triton_rht_quantize_row_col per input / grad_output, a global amax + triton_weight_quantize_2d per "
                  "weight per micro-batch) counted as torchao's roofline counts an nvfp4 cast (roofline_utils.py "
                  "get_inference_tensor_memory_traffic_ovhd_s 'nvfp4': bf16 read for the amax, bf16 read + fp4 write "
                  "+ 1 scale byte per 16 for the quantization) with both the row- and column-wise copies written: "
                  "2 + 2 + 2 x (0.5 + 1/16) = 5.125 B per element, fused or not (Triton kernels, opaque to compile)")
# torchao float8 without torch.compile (torchao 0.18, the Float8Linear torchtitan's Float8LinearConverter swaps in;
# https://github.com/pytorch/ao/tree/main/torchao/float8). float8_linear.py matmul_with_hp_or_float8_args saves the
# bf16 input and weight (ctx.save_for_backward(input_hp, weight_hp_t)) and casts with hp_tensor_to_float8_dynamic
# (float8_scaling_utils.py) in the forward the input (axiswise dim -1 under rowwise) and the weight (dim 0), in the
# backward the grad_output twice (dim -1 for grad_input, dim 0 for grad_weight), the weight again (dim -1) and the
# input again (dim 0): six casts, none reused across passes (the tensorwise recipe too: its _for_grad_* cast configs
# default to the forward ones, cast anew). Each cast, op by op in eager, HBM bytes per element (read + write):
#   tensor_to_amax (float8_utils.py): torch.abs(x)  bf16 -> bf16   2 + 2
#                                     max / amax    bf16 -> one per tensor / row   2
#   amax_to_scale: to(float64), clamp, reciprocal + mul (finfo.max / amax), to(float32), and under rowwise
#     (round_scales_to_power_of_2) log2, floor, exp2: one element per tensor / row, ~0 B per element
#   _ToFloat8ConstrFunc.forward (float8_training_tensor.py, hp_tensor_and_scale_to_float8):
#                                     tensor.to(torch.float32)   bf16 -> fp32   2 + 4
#                                     * scale                    fp32 -> fp32   4 + 4
#   to_fp8_saturated (float8_utils.py): x.clamp(-max, max)       fp32 -> fp32   4 + 4
#                                     x.to(float8_dtype)         fp32 -> fp8    4 + 1
#   = 33 B per element per cast, in 11 kernels (tensorwise) / 14 (rowwise), where torch.compile fuses the chain
#   into the producer (torchao's roofline: 4 / 6 B per element for both casts of a tensor, fp8_cast_bytes).
# float8_ops.py preprocess_addmm wants _scaled_mm's first operand row-major and its second column-major: the
# forward's are (the weight cast of weight.t() keeps its strides); in the backward the weight's dim -1 cast,
# transposed for grad_input, is copied (b_data.t().contiguous().t()), and so are the grad_output's dim 0 cast
# (transposed, .contiguous()) and the input's dim 0 cast for grad_weight: 1 + 1 B per element each.
# addmm_float8_unwrapped, rowwise only: the backward GEMMs (gemm_config_grad_input / grad_weight, use_fast_accum
# False) run the tensorwise kernel and rescale the bf16 output in eager: a_inverse_scale * b_inverse_scale writes an
# (M, N) fp32 tensor (4 B), output *= it reads 2 + 4 and writes 2: 12 B per element of grad_input (the input's size)
# and of grad_weight (the weight's).
# Per element: input 2 x 33 + 2 (+ 12 rowwise), grad_output 2 x 33 + 2, weight 2 x 33 + 2 (+ 12 rowwise) per
# micro-batch (tests/test_fp8_eager.py traces the ops torchao dispatches for a Float8Linear on CPU and recounts
# them). The routed experts' fp8 grouped GEMM (torchao prototype/moe_training/fp8_grouped_mm.py), mxfp8
# (MXFP8Linear: Triton dim0, CUDA dim1 cast kernels) and nvfp4 (Triton) cast with their own kernels, compiled or not.
F8_EAGER_AMAX = (2 + 2) + 2  # abs, amax
F8_EAGER_SCALE_CAST = (2 + 4) + (4 + 4) + (4 + 4) + (4 + 1)  # upcast, scale, clamp, fp8 conversion
F8_EAGER_CAST = F8_EAGER_AMAX + F8_EAGER_SCALE_CAST  # 33 B per element per cast
F8_EAGER_COPY = 1 + 1  # an fp8 operand copied into the layout _scaled_mm wants
F8_EAGER_RESCALE = 4 + (2 + 4 + 2)  # rowwise backward GEMM output rescaled in eager
F8_EAGER_ROLE = 2 * F8_EAGER_CAST + F8_EAGER_COPY  # two casts + one copy, every role
EAGER_FLOAT8 = {
    "tensorwise": EagerCast(input=F8_EAGER_ROLE, grad_output=F8_EAGER_ROLE, weight=F8_EAGER_ROLE, kernels=11),
    "rowwise": EagerCast(input=F8_EAGER_ROLE + F8_EAGER_RESCALE, grad_output=F8_EAGER_ROLE,
                         weight=F8_EAGER_ROLE + F8_EAGER_RESCALE, kernels=14),
}
EAGER_FLOAT8_SRC = ("torchao 0.18 float8 in eager (float8_linear.py matmul_with_hp_or_float8_args, "
                    "float8_scaling_utils.py hp_tensor_to_float8_dynamic, float8_utils.py tensor_to_amax / "
                    "amax_to_scale / to_fp8_saturated, float8_training_tensor.py _ToFloat8ConstrFunc, float8_ops.py "
                    "preprocess_addmm / addmm_float8_unwrapped): six casts per linear (input, weight, grad_output "
                    "twice each: the eager backward casts anew), each op its own kernel: abs 2 + 2, amax 2, to(fp32) "
                    "2 + 4, x scale 4 + 4, clamp 4 + 4, to(fp8) 4 + 1 = 33 B per element in 11 (tensorwise) / 14 "
                    "(rowwise) kernels; the backward GEMMs' operands copied to _scaled_mm's layouts (1 + 1 B); "
                    "rowwise: the backward GEMMs' outputs rescaled in eager (fp32 scale outer product 4 B + 2 + 4 + "
                    "2 B). Input 68 (rowwise 80), grad_output 68, weight 68 (rowwise 80) B per element (per weight "
                    "element per micro-batch); the routed experts' casts (fp8_grouped_mm Triton kernels) and mxfp8 "
                    "(Triton / CUDA cast kernels) are the same eager: fp8_cast_bytes_unfused")
# torchao's NVFP4 Triton GEMM path requires every local GEMM dimension (tokens M, in K, out N) to be a multiple of
# this (nvfp4_mm_triton: "requires M, K, N all divisible by 128"; torchtitan nvfp4.py _NVFP4_BLOCK)
NVFP4_GEMM_ALIGN = 128
_TT = "https://github.com/pytorch/torchtitan"
# Source of Backend.zero12 = "fsdp2" (llmc's torchtitan job and native trainer)
_FSDP2_ZERO12 = ("llmc maps ZeRO-1/2 to FSDP2 reshard_after_forward=False (torchtitan job: fsdp_reshard_after_forward "
                 "'never'; native: llmc/runtime/distributed.py apply_fsdp); FSDP2 reshards after backward by default "
                 "(FSDPModule.set_reshard_after_backward) and torchtitan 0.3.0 leaves gradient sync on during "
                 "accumulation, so every micro-batch all-gathers and reduce-scatters; torch/distributed/pipelining/"
                 "stage.py turns sync and the post-backward reshard off until the last micro-batch")
# Slices of torchtitan's chunked loss (ChunkedLossWrapper.Config.num_chunks default): the emitted job sets it
TITAN_LOSS_CHUNKS = 8
# how the torchtitan fp8 speed-ups are fitted (tests/test_timing.py reproduces the ratios,
# tests/test_fp8_parts.py reruns the fit)
_FP8_FIT = ("given the cast-byte, fp8 shape and GEMM roofline models, the roofline penalty 1.0 on these "
            "shapes, and only the linears of fp8_parts in fp8, the output head bf16 as in those runs: least "
            "squares of the relative error of llmc's fp8 / bf16 step-time ratio, on a 0.01 grid")
_FP8_SRC = ("torchtitan docs/float8.md and benchmarks/llama3_h100_202412_torchtitan.md Table 1/3: compile + "
            "Float8 vs compile bf16 = 8532/6667 = 1.28x and 8380/6514 = 1.29x end to end for Llama 3.1 8B")

BACKENDS: dict[str, Backend] = {
    "torchtitan": Backend(
        name="torchtitan", runnable=True, states=_FSDP2_STATES,
        base_efficiency=0.68, fp8_linear_speedup=2.0, fp8_rowwise_speedup=1.51, fp8_default_recipe="rowwise",
        fp8_cast_bytes={"tensorwise": 4.0, "rowwise": 6.0, "mxfp8": MX_CAST_FUSED, NVFP4: NVFP4_CAST},
        attn_relative_efficiency=0.6, compile_default=True, eager_elementwise=3.0,
        fp8_cast_bytes_unfused={"tensorwise": 6.0, "rowwise": 8.0, "mxfp8": MX_CAST_UNFUSED, NVFP4: NVFP4_CAST},
        fp8_weight_cast_bytes={"tensorwise": 8.0, "rowwise": 10.0, "mxfp8": MX_CAST_UNFUSED, NVFP4: NVFP4_CAST},
        fp8_eager_casts=EAGER_FLOAT8,
        nvfp4_parts=frozenset({"attention", "mlp"}),
        fp8_tp_gather_recipes=frozenset({"tensorwise"}), fp8_shape_stretch=True, fp8_cast_blocks_async_tp=True,
        sac_regathers_tp=True, fp8_recipes=frozenset({"rowwise", "mxfp8"}), loss_chunks=TITAN_LOSS_CHUNKS,
        zero12="fsdp2", tied_pp=False,
        fsdp_overlap=0.85, tp_overlap=0.0, async_tp_overlap=0.5, ep_overlap=0.0, ep_node_dedup=False, cp_overlap=0.0,
        logits_fp32=True, compiles_loss=True, compile_act_saving=0.08, reserved_over_allocated=1.08,
        cuda_context_bytes=0.6 * GiB, nccl_bytes_per_peer_group=64 * MiB,
        applies=frozenset(),
        supports=frozenset({"dp", "fsdp", "hsdp", "tp", "pp", "cp", "ep"}),
        sources={
            "applies": "torchtitan 0.3.0 has no z-loss and no rewind-and-skip on loss spikes (its train.py loss: cross-entropy only)",
            "tied_pp": "torchtitan 0.3.0 Decoder.Config.update_from_config refuses weight tying with pipeline "
            "parallelism (llmc's emitter: X303)",
            "states": "FSDP2 fully_shard MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32); " + _TT
            + "/blob/main/torchtitan/config/job_config.py (mixed_precision_param / mixed_precision_reduce)",
            "base_efficiency": "fitted: benchmarks/ torchtitan H100 Dec 2024 rows (use: fit)",
            "fp8_linear_speedup": "fitted (" + _FP8_FIT + ") on the use: fit rows: " + _FP8_SRC
            + "; the optimum lies at the cap min(speedup, fp8/bf16 peak ratio), 2.0 on H100: fp8 GEMMs as "
            "efficient as bf16 ones before the fp8 shape penalty and the casts",
            "fsdp_overlap": "FSDP2 prefetches the next unit's all-gather during the current unit's compute "
            "(https://pytorch.org/docs/stable/distributed.fsdp.fully_shard.html); share hidden is an estimate",
            "tp_overlap": "without async TP, torchtitan's DTensor TP collectives are issued on the compute stream "
            "between the GEMMs (exposed)",
            "ep_overlap": "torchtitan's expert-parallel all-to-all is synchronous around the grouped GEMMs (exposed)",
            "nccl_bytes_per_peer_group": "NCCL_BUFFSIZE 4 MiB per channel, up to 16 channels per communicator "
            "on NVLink (https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html); estimate",
            "fp8_rowwise_speedup": "fitted (" + _FP8_FIT + ") to the rowwise/bf16 ratio of "
            + _TT + "/commit/7a04053a742af65bc76826bbcc57b7bede7be62c (Llama 3 8B, 8 H100, "
            "compile: bf16 5,760 tok/s, rowwise float8 6,424 (1.12x), tensorwise + fp8 all-gather 7,186 (1.25x))",
            "fp8_cast_bytes": "torchao float8 roofline model (https://github.com/pytorch/ao/blob/main/torchao/"
            "testing/float8/roofline_utils.py, get_tensor_memory_traffic_ovhd_s), input / grad_output casts fused "
            "with the previous op (fuse_with_prev): tensorwise = fp8 written row- and column-major (2 x 1 B) + bf16 "
            "read = 4 B per element; rowwise = 1 + 2 B (dim0 fp8 + bf16 transpose) + 2 + 1 B (dim1 cast) = 6 B; mxfp8 = "
            "torchao's MX roofline (torchao/testing/training/roofline_utils.py, mxfp8_cublas: a dim0 and a dim1 cast "
            "kernel, 1 + 3 B fused, 3 + 3 B unfused, + 1/32 B of E8M0 scale per fp8 byte) at torchao's measured B200 "
            "cast rates (dim0 5.5, dim1 3.9 TB/s against the roofline's 0.92 x 8 TB/s; torchao/prototype/mx_formats/"
            "README.md): MX_CAST_FUSED = 7.1, MX_CAST_UNFUSED = 9.8 bytes-equivalent per element (weights: unfused); "
            "nvfp4 (NVFP4_CAST, also unfused and per weight element): " + NVFP4_CAST_SRC,
            "fp8_cast_bytes_unfused": "the same roofline without fusion: + the 2 B bf16 read (tensorwise amax "
            "pass / rowwise first read): 6 B and 8 B. Used for the casts whose input is the output of a TP "
            "all-gather (a collective cannot be fused with the cast), and in eager mode for the recipes and parts "
            "without an fp8_eager_casts entry (mxfp8, the routed experts: their cast kernels are the same eager)",
            "fp8_eager_casts": EAGER_FLOAT8_SRC,
            "fp8_weight_cast_bytes": "the same roofline, weight role (never fused): tensorwise 2 (amax) + 3 (fwd "
            "cast) + 3 (bwd cast) = 8 B; rowwise 3 + 4 (bf16 transpose) + 3 = 10 B per weight element per micro-batch",
            "fp8_shape_stretch": "llmc's GEMM shape penalty (timing._efficiency) comes from per-tile costs that do "
            "not speed up with the tensor cores; fp8 math at fp8_linear_speedup x the bf16 rate needs that much larger "
            "shapes to amortise them (https://github.com/pytorch/ao/blob/main/torchao/float8/README.md, Derivation: "
            "the fp8 gemm speed-up approaches 2x as M, K, N increase and falls below 1 for small shapes on H100 + "
            "cuBLAS)",
            "fp8_cast_blocks_async_tp": "torch/_inductor/fx_passes/micro_pipeline_tp.py fuses an all-gather only "
            "with matmuls that consume its result; a float8 cast in between (rowwise forward inputs, backward "
            "grad_outputs) leaves that all-gather exposed",
            "sac_regathers_tp": _TT + "/blob/820504e20d1149fbf0b98c567af24c4b0433b22d/torchtitan/models/llama3/"
            "parallelize_llama.py (_save_list / _custom_policy, the per-op SAC of selective_ac_option = 'op', as in "
            "9dec370's parallelize_llama.py): MUST_SAVE only for mm (every other one), SDPA, "
            "_c10d_functional.reduce_scatter_tensor and max; every other op, the TP all-gathers included, is "
            "PREFER_RECOMPUTE, so the backward re-runs the attention and MLP input all-gathers (2 per block) to "
            "rebuild the gathered activations its weight gradients need (torchtitan's later activation_checkpoint.py "
            "says of its saved collectives: \"Communication ops whose outputs should be saved to avoid "
            "re-communication\"; all_gather is not among them)",
            "fp8_tp_gather_recipes": _TT + "/blob/main/torchtitan/models/llama3/infra/parallelize.py: \"float8 "
            "all-gather with TP is only supported for tensorwise float8 scaling recipes. For rowwise recipes, we use "
            "regular TP and all-gather happens in high precision\" (enable_float8_tensorwise_tp -> torchao "
            "Float8ColwiseParallel / PrepareFloat8ModuleInput: the input is cast on the shard, then all-gathered in fp8)",
            "fp8_default_recipe": "llmc's torchtitan job: quantize.linear.float8 recipe_name = rowwise "
            "(render_torchtitan.py)",
            "nvfp4_parts": "torchtitan 0.3.0 components/quantization/nvfp4.py: NVFP4LinearConverter swaps the "
            "Linear.Config entries whose FQN contains one of its fqns for NVFP4Linear; llmc's job passes the attention, "
            "feed_forward and shared_experts of the blocks before the bf16 tail (not lm_head, not router.gate; the "
            "routed experts are GroupedExperts, which it does not touch), as torchtitan's own "
            "llama3_8b_first_85_pct_layers_nvfp4 config does with nvfp4_bf16_tail_fqns",
            "nvfp4_linear_speedup": "the cap (fp4 / bf16 dense peak): torchtitan's fp8 fit lands on its cap too "
            "(fp8_linear_speedup); no NVFP4 torchtitan throughput row to fit",
            "fp8_recipes": "torchtitan 0.3.0 components/quantization: Float8LinearConverter.Config.recipe_name is "
            "Literal['rowwise', 'rowwise_with_gw_hp'] (no tensorwise); MXFP8LinearConverter runs mxfp8",
            "fp8_parts": "llmc's torchtitan job (torchtitan 0.3.0 components/quantization): "
            "Float8LinearConverter (filter_fqns lm_head, router.gate) or MXFP8LinearConverter (fqns "
            "attention, feed_forward, shared_experts) converts the attention, dense FFN and shared-expert "
            "nn.Linear modules; the routed experts are GroupedExperts 3-D parameters, which only "
            "Float8GroupedExpertsConverter / MXFP8GroupedExpertsConverter convert (the pair torchtitan's own "
            "deepseek_v3_671b_float8 config uses), and the job emits them (fp8_converted_parts). The output "
            "head stays bf16 in the job and in every published torchtitan float8 row: torchtitan 9dec370 "
            "torchtitan/float8.py (module_filter_fn=lambda mod, fqn: fqn != 'output'), 820504e / e7c0cae "
            "models/llama3/train_configs/llama3_{8b,70b}.toml ([float8] filter_fqns = ['output'])",
            "attn_relative_efficiency": "FlashAttention-2 reaches 35 % of H100 peak, FlashAttention-3 75 % "
            "(Shah et al. 2024, arXiv 2407.08608, sec. 1 and 4.1); PyTorch SDPA's flash/cuDNN kernels sit between: "
            "0.6 of the GEMM efficiency (fitted on the Table 2 sequence-length sweep)",
            "eager_elementwise": "fitted: Table 1/3 eager vs compiled (5762 vs 6667, 5605 vs 6514 tok/s)",
            "async_tp_overlap": _TT + "/blob/main/docs/async_tp.md (micro-pipelined all-gather/reduce-scatter "
            "matmuls; Table 4: 829 -> 876 tok/s)",
            "cp_overlap": _TT + " experimental context_parallel (ring attention via SDPA; the K/V rotation "
            "is issued per attention call and waited on before the next block, taken as exposed)",
            "logits_fp32": _TT + "/blob/main/torchtitan/components/loss.py (cross_entropy(pred.float(), ...))",
            "zero12": _FSDP2_ZERO12,
            "loss_chunks": "torchtitan 0.3.0 components/loss.py ChunkedLossWrapper (Config.num_chunks default 8; "
            "added April 2026, after every torchtitan row of benchmarks/): the model's forward skips the output head; "
            "the final hidden states are split into num_chunks slices along the rank's sequence, and each slice runs "
            "the head, the loss and their backward in turn, into an fp32 gradient buffer of the hidden states "
            "(GradAccumulator). llmc's torchtitan job on GPUs uses it with num_chunks = loss_chunks",
            "compiles_loss": _TT + "/blob/main/torchtitan/components/loss.py build_cross_entropy_loss: torch.compile"
            "(loss_fn) when compile covers the loss (llmc's job: compile.components = [model, loss]); Inductor "
            "fuses the fp32 upcast, log_softmax and nll, keeping the bf16 logits and their bf16 gradient",
            "reserved_over_allocated": "fitted: torchtitan logs print max_reserved (train.py); "
            "https://pytorch.org/docs/stable/notes/cuda.html#memory-management",
            "compile_act_saving": "fitted: Table 1/3 memory eager vs compiled (82.4 -> 77.0, 67.0 -> 62.0 GiB)",
            "cuda_context_bytes": "https://pytorch.org/docs/stable/notes/cuda.html (CUDA context is outside "
            "the caching allocator; ~0.5-0.7 GiB on H100 with lazy module loading)",
        }),
    "native": Backend(
        name="native", runnable=True, states=_FSDP2_STATES,
        base_efficiency=0.52, fp8_linear_speedup=1.0, fp8_rowwise_speedup=1.0, fp8_default_recipe="tensorwise",
        fp8_parts=frozenset(),
        fp8_cast_bytes={}, attn_relative_efficiency=0.6, compile_default=False, eager_elementwise=3.0,
        fsdp_overlap=0.85, tp_overlap=0.0, async_tp_overlap=0.0, ep_overlap=0.0, ep_node_dedup=False, cp_overlap=0.0,
        logits_fp32=True, compiles_loss=False, compile_act_saving=0.0, reserved_over_allocated=1.08,
        cuda_context_bytes=0.6 * GiB, nccl_bytes_per_peer_group=64 * MiB,
        supports=frozenset({"dp", "fsdp", "hsdp", "tp"}), selective_ac="attention_core", zero12="fsdp2",
        slices_loss=True, sequence_parallel=False,
        sources={
            "states": "llmc/runtime/distributed.py: fully_shard per block with MixedPrecisionPolicy"
            "(bf16, fp32); DDP otherwise",
            "fp8_linear_speedup": "llmc's native trainer runs fp8 specs in bf16 (llmc/runtime/train.py)",
            "fp8_parts": "none: llmc's native trainer runs fp8 specs in bf16 (llmc/runtime/train.py)",
            "selective_ac": "llmc/runtime/model.py Transformer.set_ac('selective'): torch.utils.checkpoint around each attention core (RoPE + SDPA), Korthikanti et al. 2022 (arXiv 2205.05198) sec. 4.1 selective activation recomputation",
            "zero12": _FSDP2_ZERO12,
            "base_efficiency": "as torchtitan (same PyTorch kernels, no compile)",
            "slices_loss": _SLICED_LOSS,
            "sequence_parallel": "llmc/runtime/distributed.py apply_tp: ColwiseParallel / RowwiseParallel only, no "
                                 "SequenceParallel: each TP rank keeps the whole sequence's norm inputs and outputs",
        }),
    "deepspeed": Backend(
        name="deepspeed", runnable=True, states=_DS_STATES,
        base_efficiency=0.52, fp8_linear_speedup=1.0, fp8_rowwise_speedup=1.0, fp8_default_recipe="tensorwise",
        fp8_parts=frozenset(),
        fp8_cast_bytes={}, attn_relative_efficiency=0.6, compile_default=False, eager_elementwise=3.0,
        fsdp_overlap=0.85, tp_overlap=0.0, async_tp_overlap=0.0, ep_overlap=0.0, ep_node_dedup=False, cp_overlap=0.0,
        logits_fp32=True, compiles_loss=False, compile_act_saving=0.0, reserved_over_allocated=1.08,
        cuda_context_bytes=0.6 * GiB, nccl_bytes_per_peer_group=64 * MiB,
        can_compile=False, applies=frozenset({"z_loss"}),
        supports=frozenset({"dp", "zero", "offload"}), selective_ac="attention_core", zero12="deepspeed",
        slices_loss=True,
        sources={
            "states": "deepspeed/runtime/zero/stage_1_and_2.py estimate_zero2_model_states_mem_needs; "
            "stage3.py estimate_zero3_model_states_mem_needs (DeepSpeed 0.19.8), with the gradients llmc's ds_config "
            "reduces and accumulates in fp32 (communication_data_type, data_types.grad_accum_dtype): ZeRO-1 "
            "BF16_Optimizer's replicated fp32 gradient (bf16_optimizer.py fp32_groups_gradients_flat), ZeRO-2's fp32 "
            "gradient partition (stage_1_and_2.py _build_compact_grad_partition_buffer), ZeRO-3's fp32 "
            "grad_partitions_flat_buffer (stage3.py); ZeRO-0 accumulates in bf16 (DeepSpeed refuses fp32 without ZeRO: "
            "engine._do_optimizer_sanity_check)",
            "fsdp_overlap": "ds_config overlap_comm=true (llmc's DeepSpeed config)",
            "can_compile": "llmc/runtime/ds_train.py wraps the model in deepspeed.initialize without torch.compile",
            "applies": "llmc/runtime/ds_train.py: z-loss in its loss (mean_token_loss); no loss-spike rewind",
            "slices_loss": _SLICED_LOSS,
            "zero12": "deepspeed/runtime/zero/stage_1_and_2.py (DeepSpeed 0.19.8): reduce_ready_partitions_and_remove_grads "
            "reduces every backward when gradients are partitioned (ZeRO-2), else at the accumulation boundary; "
            "setup_buckets: with "
            "contiguous_gradients one reduce bucket of reduce_bucket_size elements, a second with overlap_comm, in "
            "_gradient_reduction_buffer_dtype (ZeRO-2: the model's dtype, since it keeps no grad_accum attribute; "
            "ZeRO-1 under optimizer offload: grad_accum_dtype), each cast to communication_data_type for its reduction "
            "(gradient_reduction_w_predivide: tensor.to(communication_data_type)); bf16 ZeRO-1 without offload runs "
            "BF16_Optimizer instead, whose fp32 gradient the engine all-reduces in buckets of "
            "MEMORY_OPT_ALLREDUCE_SIZE = 5e8 elements, flattened into a copy (engine.py allreduce_no_retain, "
            "allreduce_bucket); llmc's ds_config sets reduce_bucket_size = d_model^2 (ds_reduce_bucket_elems)",
            "fp8_linear_speedup": "llmc's DeepSpeed runner trains fp8 specs in bf16 (render.py X106)",
            "fp8_parts": "none: llmc's DeepSpeed runner trains fp8 specs in bf16 (render.py X106)",
            "selective_ac": "llmc's DeepSpeed runner builds llmc's model and applies its set_ac (llmc/runtime/ds_train.py; model.py Transformer.set_ac('selective')): torch.utils.checkpoint around each attention core (RoPE + SDPA), Korthikanti et al. 2022 (arXiv 2205.05198) sec. 4.1 selective activation recomputation",
        }),
    # Reference profile: Megatron-Core / Megatron-Bridge. llmc does not build Megatron jobs; the profile
    # exists so that published Megatron measurements can be compared with the same model.
    "megatron": Backend(
        name="megatron", runnable=False, states=_ZERO_ESTIMATOR_STATES,
        base_efficiency=0.70, fp8_linear_speedup=1.8, fp8_rowwise_speedup=1.8, fp8_default_recipe="tensorwise",
        fp8_cast_bytes={"tensorwise": 1.0, "rowwise": 1.0, "mxfp8": 2 * (1 + _SCALE),
                        NVFP4: 2 * (NVFP4_ELEM_BYTES + 1 / NVFP4_BLOCK)},
        nvfp4_parts=frozenset({"attention", "mlp"}),
        attn_relative_efficiency=1.0, compile_default=False, eager_elementwise=1.0,
        fsdp_overlap=0.9, tp_overlap=0.8, async_tp_overlap=0.8, ep_overlap=0.7, ep_node_dedup=True, cp_overlap=0.5,
        logits_fp32=True, compiles_loss=False, compile_act_saving=0.0, reserved_over_allocated=1.08,
        cuda_context_bytes=0.6 * GiB, nccl_bytes_per_peer_group=64 * MiB,
        supports=frozenset({"dp", "zero", "tp", "pp", "cp", "ep"}),
        sources={
            "base_efficiency": "set with the Megatron-Bridge performance summary in view (benchmarks/: FP8 "
            "Llama 3 at 719-827 model TFLOP/s per H100); those rows are therefore not an independent check",
            "attn_relative_efficiency": "Transformer Engine cuDNN fused attention (FlashAttention-3 class, "
            "Shah et al. 2024: 75 % of H100 peak, on a par with GEMMs)",
            "fp8_cast_bytes": "Transformer Engine fuses the fp8 cast into the producing norm / activation kernel "
            "(LayerNormLinear, fused cast-transpose): about one extra fp8 byte per element (estimate). On Blackwell "
            "per-tensor fp8 (current scaling) writes one copy that serves the rowwise and columnwise usages; MXFP8 "
            "writes both, each with one E8M0 byte per 32 elements (TE docs low_precision_training/mxfp8 and "
            "fp8_current_scaling, Handling transposes; the fused single-kernel case of performance_considerations): "
            "2 x (1 + 1/32) B; NVFP4 likewise writes both usages, each 0.5 B of E2M1 per element and one E4M3 "
            "scale byte per 16 elements (TE docs low_precision_training/nvfp4: 1D 1x16 blocks for activations and "
            "gradients, 16x16 2D blocks for weights, the random Hadamard transform applied inside the quantization "
            "of the wgrad inputs): 2 x (0.5 + 1/16) B",
            "nvfp4_parts": "Transformer Engine's autocast with the NVFP4BlockScaling recipe converts the TE attention "
            "and MLP linears, as for fp8 (fp8_parts); the routed experts are left bf16 in llmc's profile (no MoE "
            "NVFP4 row in benchmarks/); the output layer and router are outside TE",
            "eager_elementwise": "Transformer Engine fuses norm+linear, bias+activation, RoPE (TE docs)",
            "tp_overlap": "Megatron-Core tp_comm_overlap (userbuffers comm-GEMM overlap), "
            "https://docs.nvidia.com/megatron-core/developer-guide/latest/api-guide/tensor_parallel.html",
            "ep_overlap": "Megatron-Core MoE: overlap_moe_expert_parallel_comm (A2A overlap with 1F1B), "
            "https://docs.nvidia.com/megatron-core/developer-guide/latest/api-guide/moe.html",
            "ep_node_dedup": "Megatron-Core flex token dispatcher with DeepEP (https://github.com/deepseek-ai/DeepEP: "
            "tokens forwarded once per node over RDMA, then NVLink), as Megatron-Bridge's DeepSeek-V3 recipes use",
            "cp_overlap": "Megatron-Core context parallel: P2P K/V exchange overlapped with attention "
            "(Transformer Engine), https://docs.nvidia.com/megatron-core/developer-guide/latest/"
            "api-guide/context_parallel.html",
            "fp8_parts": "Transformer Engine's fp8_autocast converts TE modules only: the attention and MLP "
            "linears (TELayerNormColumnParallelLinear, TERowParallelLinear) and the routed experts "
            "(TEGroupedMLP); the output layer is Megatron-Core's own tensor_parallel.ColumnParallelLinear "
            "(megatron/core/models/gpt/gpt_model.py) and the MoE gate router_gating_linear "
            "(megatron/core/transformer/moe/router.py), both outside TE, so bf16",
            "fp8_linear_speedup": "Transformer Engine FP8 GEMMs on Hopper/Blackwell (2x the bf16 tensor peak), set "
            "with the Megatron-Bridge rows in view (not independent)",
            "selective_ac": "per_op, although Megatron-Core's recompute_granularity='selective' recomputes only "
            "recompute_modules (default ['core_attn']): the Megatron-Bridge rows do not publish their recompute "
            "setting, and their recipes (scripts/performance/configs) mix features llmc does not model "
            "(recompute_num_layers, cpu_offloading_num_layers); with attention_core llmc picks full AC for "
            "them instead and its uncalibrated tokens/s error on the Megatron-Bridge rows rises (chosen by that error: those rows are not an independent check of this mode)",
        }),
    "generic": Backend(
        name="generic", runnable=False, states=_GENERIC_STATES,
        base_efficiency=0.65, fp8_linear_speedup=1.4, fp8_rowwise_speedup=1.4, fp8_default_recipe="tensorwise",
        nvfp4_parts=frozenset({"attention", "mlp"}),
        fp8_cast_bytes={}, attn_relative_efficiency=1.0, compile_default=False, eager_elementwise=1.0,
        fsdp_overlap=0.85, tp_overlap=0.0, async_tp_overlap=0.0, ep_overlap=0.0, ep_node_dedup=False, cp_overlap=0.5,
        logits_fp32=True, compiles_loss=False, compile_act_saving=0.0, reserved_over_allocated=1.0,
        cuda_context_bytes=1.0 * GiB, nccl_bytes_per_peer_group=0.0,
        supports=frozenset({"dp", "fsdp", "hsdp", "zero", "tp", "pp", "cp", "ep", "offload"}),
        sources={"states": "Rajbhandari et al. 2020, ZeRO, arXiv 1910.02054 sec. 3.1 (2 + 2 + 12 B/param)"}),
}

RUNNABLE = tuple(k for k, b in BACKENDS.items() if b.runnable)


def ds_fp32_grad_accum(zero_stage: int) -> bool:
    """Whether llmc's ds_config has DeepSpeed 0.19.8 accumulate a bf16 run's gradients in fp32
    (``data_types.grad_accum_dtype``) at ZeRO stage ``zero_stage``: every stage but 0, where DeepSpeed refuses it
    (engine._do_optimizer_sanity_check: NotImplementedError "unsupported mix of model_dtype=torch.bfloat16 and
    grad_accum_dtype=torch.float32"). Every stage reduces in fp32 (``communication_data_type``)."""
    return zero_stage >= 1


# DeepSpeed's engine all-reduces a gradient it does not bucket itself (ZeRO-0, BF16_Optimizer) in flattened buckets of
# this many elements (deepspeed/runtime/engine.py MEMORY_OPT_ALLREDUCE_SIZE, allreduce_gradients' bucket_size)
DS_ALLREDUCE_ELEMS = 500_000_000


def ds_reduce_buffer_bytes(d_model: int, zero_stage: int, bf16: bool, offload_optimizer: bool,
                           local_params: float, largest: float, dp: int) -> float:
    """Bytes of DeepSpeed 0.19.8's ZeRO-1/2 gradient-reduction buffers under llmc's ds_config, data parallel over
    ``dp`` ranks (``largest``: the elements of the largest parameter tensor,
    :func:`llmc.compiler.params.largest_tensor`):

    * ZeRO-2, and ZeRO-1 in fp32 or under optimizer offload (DeepSpeedZeroOptimizer): two reduce buckets of
      ``ds_reduce_bucket_elems`` (contiguous_gradients + overlap_comm, setup_buckets) in
      ``_gradient_reduction_buffer_dtype`` -- the model's dtype at ZeRO-2 (2 B bf16), the fp32 grad_accum_dtype at
      ZeRO-1 -- and, for bf16, the fp32 copy each makes for its reduction (``tensor.to(communication_data_type)``,
      stage_1_and_2.py gradient_reduction_w_predivide): 2 x d^2 x (2 + 4) at ZeRO-2, 2 x d^2 x 4 at ZeRO-1;
    * at ZeRO-2 a gradient larger than the bucket bypasses it (stage_1_and_2.py
      reduce_independent_p_g_buckets_and_remove_grads: ``extra_large_param_to_reduce``): it stays in its own tensor
      in the model's dtype until the next gradient's hook reduces it, a slice per gradient partition (at most the
      rank's share of the parameters, local / dp) at a time, each through its fp32 copy in bf16 (reduce_ipg_grads
      -> average_tensor -> allreduce_no_retain -> allreduce_bucket: ``tensor.to(communication_data_type)``). The
      output head's is made first in the backward, with the activations at their peak: the largest such gradient
      and its largest slice's copy, largest x 2 + min(largest, local / dp) x 4 in bf16 (largest x 4 in fp32), in
      place of the buckets' copies when larger;
    * bf16 ZeRO-1 without offload (BF16_Optimizer, :func:`ds_fp32_grad_accum`): no buckets of its own; the engine
      all-reduces its fp32 gradient in buckets of DS_ALLREDUCE_ELEMS elements, flattened into a copy
      (engine.py allreduce_no_retain / allreduce_bucket): 4 B x min(5e8, the rank's parameters), an upper bound."""
    bucket = ds_reduce_bucket_elems(d_model)
    big = largest if zero_stage == 2 and largest > bucket else 0.0  # (a gradient reduced outside the buckets)
    if not bf16:
        return 2 * bucket * 4.0 + big * 4.0
    if zero_stage == 1 and ds_fp32_grad_accum(1) and not offload_optimizer:
        return 4.0 * min(DS_ALLREDUCE_ELEMS, local_params)
    if zero_stage == 2:  # bf16 buckets; a bucket's or the largest gradient's fp32 copy for its reduction
        return 2 * bucket * 2.0 + max(2 * bucket * 4.0, big * 2.0 + min(big, local_params / max(1, dp)) * 4.0)
    return 2 * bucket * 4.0  # ZeRO-1 under offload: fp32 (grad_accum_dtype) buckets, reduced as they are


def ds_zero3_buffer_bytes(d_model: int, largest: float, compute_bytes: float) -> float:
    """Bytes of DeepSpeed 0.19.8's ZeRO-3 gather and reduction buffers under llmc's ds_config (fp32
    communication_data_type; ``largest``: the elements of the largest parameter tensor,
    :func:`llmc.compiler.params.largest_tensor`; ``compute_bytes``: 2 in bf16, 4 in fp32): the reduce bucket,
    allocated once in the communication dtype (stage3.py: ``torch.empty(reduce_bucket_size, dtype)`` for each
    ipg bucket), 4 x d^2; the prefetch, ``stage3_prefetch_bucket_size`` = 0.9 d^2 elements gathered ahead
    (partitioned_param_coordinator); and, in the backward of the largest tensor (the output head first): it
    gathered, its whole gradient in the compute dtype, and the fp32 copy each gradient is reduce-scattered through
    (``__avg_scatter_grads``: ``g.to(communication_data_type)``; none in fp32)."""
    cast = 4.0 if compute_bytes != 4.0 else 0.0
    return (4.0 * ds_reduce_bucket_elems(d_model) + ds_prefetch_bucket_elems(d_model) * compute_bytes
            + largest * (2 * compute_bytes + cast))


def ds_reduce_bucket_elems(d_model: int) -> int:
    """DeepSpeed ``reduce_bucket_size`` in llmc's ds_config: d_model^2 elements, the value the Hugging Face Trainer's
    DeepSpeed integration fills in for "auto" (transformers/integrations/deepspeed.py)."""
    return d_model * d_model


def ds_prefetch_bucket_elems(d_model: int) -> int:
    """DeepSpeed ``stage3_prefetch_bucket_size`` in llmc's ds_config: 0.9 d_model^2 elements, the Hugging Face
    Trainer's "auto" value (transformers/integrations/deepspeed.py)."""
    return (9 * d_model * d_model) // 10


def get_backend(name: str | None) -> Backend:
    """The profile of ``name``; ``None`` gives the backend-neutral ``generic`` profile."""
    return BACKENDS["generic" if name is None else name]


#: share of the GPU's memory a plan may fill under the backend-neutral ``generic`` profile: a margin for allocator
#: fragmentation, which that profile's bytes (the tensors alone) do not count
GENERIC_HEADROOM = 0.92
#: share of the GPU's memory a plan may fill under a backend profile, whose bytes already are the allocator's reserved
#: peak plus the CUDA context and NCCL: the margin is the memory model's own measured error, not the allocator's.
#: llmc's fidelity benchmark (benchmarks/RESULTS.md, torchtitan's published H100 peaks, reserved memory) puts the
#: uncalibrated prediction at 3.4% mean |error|, 1.7% low on average (max 12%; in-sample: 18 of its 20 rows are
#: the `use: fit` rows the memory factors were fitted on, the 2 held-out H200 rows are 3.1% off): a predicted peak up to 95% of the
#: device's total leaves more than that mean error before an out-of-memory (not the worst row's: a plan near the
#: margin should be calibrated, ``llmc calibrate``). Not fitted to any row.
PROFILE_HEADROOM = 0.95


def fit_headroom(name: str | None) -> float:
    """Share of the GPU's capacity a plan's per-GPU peak may reach on backend ``name`` (the fit check,
    ``memory.fits``): :data:`PROFILE_HEADROOM` on a backend profile, whose per-GPU bytes already are the allocator's
    reserved memory (``reserved_over_allocated``, fitted on measured peaks) plus the CUDA context and NCCL buffers
    outside it, against the capacity the device reports (``hardware.GPU.hbm_bytes``: torch's ``total_memory``, e.g.
    79.11 GiB on an H100 "80GB"): the margin left is the memory model's measured error; :data:`GENERIC_HEADROOM` on
    ``generic`` (None), whose bytes are the tensors alone. What the plan's messages call "usable"
    (``search.usable_bytes``)."""
    return GENERIC_HEADROOM if get_backend(name).name == "generic" else PROFILE_HEADROOM


@dataclass(frozen=True)
class ModelGap:
    """A part of the model (or of the weights it starts from) that torchtitan cannot run: the diagnostic the
    torchtitan emitter reports for it (code, spec path, message, hint)."""

    code: str
    path: str
    message: str
    hint: str


def torchtitan_reads_hf(arch) -> bool:
    """Does torchtitan's state-dict adapter for ``arch``'s family convert every weight of an HF checkpoint of it?
    Not where the family has none that keeps every weight (``Family.torchtitan_hf``: Mixtral's HF names are not the
    Qwen3 adapter's) or the model has q/k/v biases (torchtitan 0.3.0's Llama3 / Qwen3 adapters have no bias keys:
    ``to_hf`` skips them, so a load would leave them at zero)."""
    return not arch.qkv_bias and family_of(arch).torchtitan_hf


def torchtitan_rope_gaps(rs, fam, path: str = "model.rope_scaling") -> list[ModelGap]:
    """What torchtitan 0.3.0's RoPE cannot compute of a ``rope_scaling`` (the model's, or a continued-training stage's
    at ``path``): another rule than its 'llama' / 'yarn', no 'llama' on its cos/sin RoPE (X301). (A YaRN's attention
    factor, which its pure rotation lacks, the emitted job's TemperedRoPE applies: llmc.emit.torchtitan._rope.)"""
    v = TARGET_VERSIONS["torchtitan"]
    out: list[ModelGap] = []
    if rs is not None and rs.type == "llama3" and fam.torchtitan_rope == "cossin":
        out.append(ModelGap("X301", f"{path}.type",
                            f"torchtitan {v}'s cos/sin RoPE (the rotate_half layout of its Qwen3 models and their "
                            "Hugging Face adapter) has no llama3 scaling", "use type: yarn, or another backend"))
    elif rs is not None and rs.type not in ("llama3", "yarn"):
        out.append(ModelGap("X301", f"{path}.type",
                            f"torchtitan {v} RoPE supports scaling 'none', 'llama' and 'yarn', not {rs.type!r}",
                            "use type: llama3 or yarn, or build with another backend"))
    return out


def torchtitan_keep_latest_gap(keep_latest: int) -> ModelGap | None:
    """X321: torchtitan 0.3.0's checkpoint config refuses ``keep_latest_k`` 1 ("We need to maintain at least 2
    checkpoint replicas, as the last one may be in the process of being saved": torchtitan/components/checkpointer/
    base.py, CheckpointManager.Config.__post_init__), so a job emitted with ``training.checkpoint.keep_latest: 1`` would
    fail as torchtitan loads it. The plan reports it for a torchtitan plan (checks.check_backend_options), the emitter
    for the job it then leaves out."""
    if keep_latest != 1:
        return None
    return ModelGap("X321", "training.checkpoint.keep_latest",
                    f"torchtitan {TARGET_VERSIONS['torchtitan']} keeps at least 2 checkpoints (its checkpoint config "
                    "refuses keep_latest_k 1: the last may still be being written)",
                    "keep_latest: 2 or more, or training.backend native or deepspeed (which keep 1)")


def torchtitan_model_gaps(arch, init_hf: str | None = None, init_hf_path: str = "training.init_hf",
                          hf_model_type: str | None = None, seq_len: int | None = None) -> list[ModelGap]:
    """What torchtitan's model code cannot express about ``arch`` whatever the layout (empty when it can run it):
    RoPE variants (llama3 scaling on its cos/sin RoPE, other scalings, partial rotary), MLA with q/k/v biases, a router
    bias, expert groups scored by their best expert (DeepSeek-V2's ``group_score: max``: torchtitan's
    ``TokenChoiceTopKRouter`` in torchtitan/models/common/moe.py scores a group by the sum of its top-2 experts only),
    muP multipliers, a sliding window shorter than the job's ``seq_len`` (None: any), layers without RoPE,
    OLMo 2's block, gpt-oss's block; with ``init_hf`` (the spec
    path the pre-training weights come from) a family or checkpoint its state-dict adapters cannot read
    (``hf_model_type``: the checkpoint's config.json model_type, gathered before compiling). The torchtitan emitter
    reports these as its X301 / X302 / X309 / X310 / X314 / X315 / X316 / X317 / X318 / X319 / X320 errors; ``training.backend: auto`` picks another
    backend for such a model (:func:`resolve_backend`)."""
    v = TARGET_VERSIONS["torchtitan"]
    fam = family_of(arch)
    out: list[ModelGap] = []
    out += torchtitan_rope_gaps(arch.rope_scaling, fam)
    if arch.mla is None and arch.partial_rotary:
        out.append(ModelGap("X301", "model.rotary_dim",
                            f"torchtitan {v}'s Llama / Qwen3 attention rotates whole heads (rotary_dim "
                            f"{arch.rotary_dim} of head_dim {arch.hd})", "build with training.backend native or deepspeed"))
    if arch.qkv_bias and arch.mla is not None:
        out.append(ModelGap("X302", "model.qkv_bias", f"torchtitan {v} deepseek_v3 MLA attention has no q/k/v bias",
                            "set qkv_bias: false or use another backend"))
    if arch.multipliers is not None:
        out.append(ModelGap("X314", "model.multipliers",
                            f"torchtitan {v}'s Llama model has no muP multipliers (Granite's embedding, residual, "
                            "attention and logits scalars)", "build with training.backend native or deepspeed"))
    if arch.sliding_window is not None and (seq_len is None or seq_len > arch.sliding_window):
        # (sequences no longer than the window: full causal attention is the windowed model, torchtitan runs it)
        out.append(ModelGap("X315", "model.sliding_window",
                            f"torchtitan {v}'s Llama / Qwen3 attention is full causal, with no sliding window "
                            f"({arch.sliding_window} tokens{f', shorter than seq_len {seq_len}' if seq_len else ''})",
                            "build with training.backend native or deepspeed (llmc's model applies the window), or "
                            f"train sequences of at most {arch.sliding_window} tokens"))
    if arch.nope_layers:
        out.append(ModelGap("X316", "model.nope_layers",
                            f"torchtitan {v}'s Llama attention applies RoPE in every layer (this model has none in "
                            f"{len(arch.nope_layers)} of its {arch.n_layers} layers: NoPE)",
                            "build with training.backend native or deepspeed: llmc's model skips RoPE there"))
    if arch.attn_sinks:  # gpt-oss's block (the spec admits its parts together only)
        out.append(ModelGap("X320", "model.attn_sinks",
                            f"llmc's torchtitan {v} job has no gpt-oss block (attention sinks, q/k/v and o_proj biases, "
                            "biased clamped-SwiGLU experts, YaRN in windowed layers): torchtitan's own "
                            "torchtitan/models/gpt_oss is not emitted", "build with training.backend native or deepspeed "
                            "(llmc's model runs gpt-oss)"))
    if arch.norm_placement == "sandwich" or arch.norm_unit_offset or arch.activation == "gelu_tanh" or arch.embedding_scale:
        out.append(ModelGap("X318", "model.norm_placement",
                            f"torchtitan {v} has no Gemma block (norms before and after attention and MLP scaling "
                            "by 1 + weight, GeGLU, embeddings x sqrt(d_model); Gemma 2's logit soft-capping)",
                            "build with training.backend native or deepspeed"))
    if arch.norm_placement == "post" or arch.qk_norm_scope == "projection":
        what = ("no OLMo 2 block (norms on the attention / MLP outputs, q / k norms over the whole projections)"
                if arch.norm_placement == "post" else "no q / k norms over the whole projections (OLMoE's block)")
        out.append(ModelGap("X317", "model.norm_placement" if arch.norm_placement == "post" else "model.qk_norm_scope",
                            f"torchtitan {v} has {what}", "build with training.backend native or deepspeed"))
    if arch.moe is not None and arch.moe.router_bias:
        out.append(ModelGap("X309", "model.moe.router_bias",
                            "a bias on the router gate linear is not emitted by llmc's torchtitan target",
                            "set router_bias: false or use the native backend"))
    m = arch.moe
    # (with every group kept there is no limit: both scorings route alike)
    if m is not None and m.group_score != "top2_sum" and (m.n_limited_groups or 0) < (m.n_expert_groups or 0):
        out.append(ModelGap("X319", "model.moe.group_score",
                            f"torchtitan {v}'s router scores an expert group by the sum of its 2 best experts "
                            f"(DeepSeek-V3); this model keeps the {m.n_limited_groups} of {m.n_expert_groups} groups "
                            "with the best single expert (DeepSeek-V2's group_limited_greedy)",
                            "build with training.backend native or deepspeed (llmc's model routes by the best expert)"))
    if init_hf and not torchtitan_reads_hf(arch):
        why = ("its q/k/v biases are not in torchtitan's Llama3/Qwen3 state-dict adapters (they would stay zero)"
               if arch.qkv_bias else f"torchtitan {v} has no state-dict adapter for the {fam.name} family that keeps "
               "every weight")
        out.append(ModelGap("X310", init_hf_path, f"the torchtitan job cannot start from a Hugging Face checkpoint: {why}",
                            "run this stage with `llmc launch --backend native` or deepspeed (llmc.runtime.hf_io "
                            "loads every weight)"))
    elif init_hf and hf_model_type == "kimi_k25":
        out.append(ModelGap("X310", init_hf_path,
                            f"the torchtitan job cannot start from {init_hf}: a Kimi K2.5 image-text checkpoint, which "
                            "torchtitan's DeepSeek-V3 adapter does not read",
                            "start from a text-only bf16 Kimi K2 / DeepSeek-V3 checkpoint"))
    elif init_hf and hf_model_type in FUSED_HF_MODEL_TYPES:
        out.append(ModelGap("X310", init_hf_path,
                            f"the torchtitan job cannot start from {init_hf}: a {hf_model_type} checkpoint (fused "
                            "qkv_proj / gate_up_proj), which torchtitan's Llama adapter does not read",
                            "run it on the native or deepspeed backend, or start from llmc's export of it"))
    # a block torchtitan has no model for (OLMo 2 / 3, Gemma, gpt-oss) first: the reason `auto` gives is the first gap's, and the
    # block is why, more than its window or RoPE
    return sorted(out, key=lambda g: g.code not in ("X317", "X318", "X320"))


def torchtitan_seq_gaps(arch, seq_len: int, gpu: bool) -> list[ModelGap]:
    """What keeps torchtitan's job from training ``seq_len``-token sequences on any layout: a length past the model's
    ``max_seq_len`` (X305: the job's RoPE cache is that long, torchtitan rejects longer sequences) and, on GPUs, one
    the chunked loss cannot cut (X313 at cp 1: :func:`torchtitan_layout_seq_problem`; a larger cp only divides it
    further). ``auto`` then runs the model on another backend (:func:`resolve_backend`)."""
    out: list[ModelGap] = []
    if seq_len > arch.max_seq_len:
        out.append(ModelGap("X305", "data.seq_len",
                            f"seq_len {seq_len} exceeds the model's max_seq_len {arch.max_seq_len}; torchtitan rejects "
                            "it (RoPE cache length)", "raise model.max_seq_len"))
    problem = torchtitan_layout_problem(arch, seq_len, 1, 1, 1, gpu)
    if problem is not None:
        out.append(problem)
    return out


def torchtitan_layout_problem(arch, seq_len: int, tp: int, cp: int, pp: int, gpu: bool, ep: int = 1,
                              expert_align: int = 0) -> ModelGap | None:
    """Why torchtitan 0.3.0's job cannot run ``arch`` on a layout of ``tp`` x ``cp`` x ``pp`` (the first reason),
    else None: tied embeddings with pipeline parallelism (X303; ``Decoder.Config.update_from_config``); sequence
    parallelism shards the sequence over the TP ranks and the job's FlexAttention context parallelism shards its mask
    in whole 128-token blocks per CP rank, so seq_len must be a multiple of :func:`titan_seq_multiple` (X306;
    torchtitan distributed/tensor_parallel.py, distributed/context_parallel/api.py ``cp_shard``); on GPUs the job's chunked loss cuts each rank's seq_len / cp tokens into
    :attr:`Backend.loss_chunks` equal slices and refuses a length they do not divide (X313; components/loss.py
    ``_chunk_local``; the CPU job computes the loss whole); the routed experts' fp8 grouped GEMMs (``expert_align``:
    :func:`fp8_expert_align`, 0 = none) need each rank's expert width aligned, and without EP torchtitan shards
    every expert's width over the TP ranks (models/common/moe_sharding.py: EP disabled, TP > 1), so
    expert_d_ff / tp must be a multiple of it (X311; torchao's grouped GEMM asserts it). The search rejects such
    layouts for a torchtitan plan and the torchtitan emitter reports them."""
    if expert_align and ep == 1 and tp > 1 and arch.moe is not None:
        from llmc.compiler.params import expert_d_ff

        if expert_d_ff(arch) % (tp * expert_align):
            ff = expert_d_ff(arch)
            return ModelGap("X311", "parallelism.tp", f"fp8 routed experts without EP are split over tp {tp}: "
                            f"{ff} / {tp} = {ff / tp:g} columns per rank, not a multiple of the grouped GEMM's "
                            f"{expert_align} (torchao)", "use expert parallelism (ep > 1) or a smaller tp")
    if arch.tied_embeddings and pp > 1:
        return ModelGap("X303", "model.tied_embeddings", "torchtitan does not support weight tying with pipeline "
                        "parallelism (Decoder.Config.update_from_config)", "untie the embeddings or pin parallelism.pp: 1")
    sp = titan_seq_multiple(tp, cp)
    if seq_len % sp:
        why = (f"cp x lcm({FLEX_BLOCK_TOKENS}, tp) = {sp}: its FlexAttention context parallel shards the attention mask "
               f"in {FLEX_BLOCK_TOKENS}-token blocks evenly over the cp ranks, and sequence parallelism splits each "
               "rank's share over the tp ranks" if cp > 1 else f"tp = {sp} (sequence parallel)")
        return ModelGap("X306", "data.seq_len", f"torchtitan needs seq_len divisible by {why}, got {seq_len}",
                        f"use a seq_len that is a multiple of {sp}")
    chunks = get_backend("torchtitan").loss_chunks
    if gpu and (seq_len // cp) % chunks:
        local = seq_len // cp
        return ModelGap("X313", "data.seq_len", f"torchtitan's chunked loss splits each rank's {local}-token sequence "
                        f"(seq_len / cp) into {chunks} equal chunks; {local} is not a multiple of {chunks}",
                        f"use a seq_len that is a multiple of {chunks * cp}")
    return None


#: FlexAttention's BlockMask block (torchtitan 0.3.0 ``FlexAttention.Config.block_size`` = torch's
#: ``_DEFAULT_SPARSE_BLOCK_SIZE``, 128 tokens): torch shards the mask of a context-parallel flex attention in whole blocks
#: (torch/distributed/tensor/experimental/_context_parallel/_attention.py ``_create_cp_block_mask``: "Q_LEN is not
#: divisible by CP mesh world size * BLOCK_SIZE"), whichever load balancer torchtitan's ``cp_shard`` uses, and the
#: PTRR balancer deals those blocks out to the ranks
FLEX_BLOCK_TOKENS = 128


def titan_seq_multiple(tp: int, cp: int) -> int:
    """What the torchtitan job's seq_len must be a multiple of at ``tp`` x ``cp``: with CP (the job's FlexAttention
    context parallel) whole :data:`FLEX_BLOCK_TOKENS` blocks per CP rank, each rank's seq_len / cp split over the tp
    ranks (sequence parallel: torchtitan distributed/tensor_parallel.py): cp x lcm(128, tp); without CP, tp."""
    t = tp if tp > 1 else 1
    if cp <= 1:
        return t
    return cp * math.lcm(FLEX_BLOCK_TOKENS, t)


def resolve_backend(requested: str, *, tp: int | None = None, pp: int | None = None, cp: int | None = None,
                    ep: int | None = None, zero_stage: int | None = None,
                    offload: bool = False, cpu: bool = False, model_gaps: tuple[str, ...] = (),
                    titan_work: bool = True) -> tuple[str, str]:
    """(backend, reason). ``auto``: the native trainer on CPU; DeepSpeed when the spec asks for a
    DeepSpeed-only feature (``offload``: optimizer or parameter offload); the native trainer when torchtitan
    cannot run the model (``model_gaps``: :func:`torchtitan_model_gaps` messages) or a pipeline has nothing a
    torchtitan job would run (``titan_work`` False: post-training stages only, which llmc's trainers run on every
    backend); otherwise torchtitan (it runs every
    dimension the search may choose: TP, PP, CP, EP, FSDP; llmc's native trainer does DDP/FSDP/TP only and
    DeepSpeed's runner data parallelism only). A pinned ZeRO-1/2 (``zero_stage``) does not move the choice: the
    search itself plans ZeRO-1 on torchtitan and the native trainer, which run it as FSDP2 keeping the gathered
    parameters (``reshard_after_forward=False``, :attr:`Backend.zero12`), so pinning the stage a plan printed keeps
    its backend, layout and numbers."""
    if requested != "auto":
        return requested, f"training.backend pins {requested}"
    if offload:  # also on CPU: llmc's DeepSpeed runner runs there on DeepSpeed's CPU accelerator
        return "deepspeed", "auto: optimizer offload is a DeepSpeed feature (ZeRO-Offload)"
    if cpu:
        return "native", "auto: llmc's native trainer (a CPU run; torchtitan and DeepSpeed need GPUs)"
    if model_gaps:
        return "native", (f"auto: llmc's native trainer (DDP / FSDP2 / TP), since torchtitan cannot run this model: "
                          f"{model_gaps[0]}")
    if not titan_work:
        return "native", ("auto: llmc's native trainer (every stage is post-training, which llmc's trainers run on any "
                          "backend)")
    dims = [n for n, v in (("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)) if v and v > 1]
    dims += [f"ZeRO-{zero_stage} (as FSDP2 reshard_after_forward=False)"] if zero_stage in (1, 2) else []
    why = f"it runs the pinned {'/'.join(dims)}" if dims else "it runs every dimension the search may choose"
    return "torchtitan", f"auto: torchtitan ({why}: FSDP2, TP, PP, CP, EP; compiled, fp8 via torchao)"


FITTED = ("base_efficiency", "attn_relative_efficiency", "eager_elementwise", "compile_act_saving",
          "reserved_over_allocated", "fp8_linear_speedup", "fp8_rowwise_speedup")


def describe(name: str) -> list[tuple[str, object, str]]:
    """(field, value, source) for every numeric/boolean field of a profile, for ``llmc backends`` style
    listings; fields listed in :data:`FITTED` whose source says "fitted" were fitted on benchmarks/ rows."""
    import dataclasses

    be = get_backend(name)
    out = []
    for f in dataclasses.fields(be):
        if f.name in ("name", "sources", "states", "supports"):
            continue
        out.append((f.name, getattr(be, f.name), be.sources.get(f.name, "")))
    return out


def compile_on(backend: Backend, requested: bool | None) -> bool:
    """torch.compile for this run: the spec's ``training.compile`` or the backend's default; never on a backend
    whose runner does not compile (the plan times what runs: T013 says so when the spec asks for it)."""
    return backend.can_compile and (backend.compile_default if requested is None else bool(requested))


def fp8_recipe_on(backend: Backend, requested: str | None) -> str:
    """The fp8 scaling recipe for this run: the spec's ``training.fp8_recipe`` or the backend's default."""
    return requested or backend.fp8_default_recipe


# K and N of an fp8 grouped GEMM must be multiples of this, by recipe: torchao's float8 rowwise grouped GEMM
# asserts "A must have a last dim divisible by 16" and "B must have last 2 dims divisible by 16"
# (torchao/prototype/moe_training/fp8_grouped_mm.py); MX scales blocks of 32 elements along K (torchao MXFP8
# block size, torchao/prototype/mx_formats/README.md). The fp8 tensor cores need 16-byte aligned dimensions.
FP8_GROUPED_GEMM_ALIGN = {"tensorwise": 16, "rowwise": 16, "mxfp8": 32}


def fp8_converted_parts(backend: Backend, arch, recipe: str) -> frozenset[str]:
    """The parts of ``arch`` (``flops.LINEAR_PARTS``) whose linears an fp8 run on ``backend`` with ``recipe``
    runs in fp8: the backend's :attr:`Backend.fp8_parts`, the routed experts only when the model has them and
    their d_model and expert width meet the grouped GEMM's alignment (:data:`FP8_GROUPED_GEMM_ALIGN`). The
    time model speeds up and casts exactly these parts (timing.step_model), and llmc's torchtitan job emits
    the grouped-experts fp8 converter exactly when ``experts`` is among them (emit/torchtitan.py)."""
    from llmc.compiler.params import expert_d_ff

    parts = set(backend.fp8_parts)
    if "experts" in parts:
        align = FP8_GROUPED_GEMM_ALIGN.get(recipe, 16)
        if arch.moe is None or arch.d_model % align or expert_d_ff(arch) % align:
            parts.discard("experts")
    return frozenset(parts)


def fp8_expert_align(backend: Backend, arch, precision: str, recipe: str | None) -> int:
    """The alignment an fp8 run's routed-expert grouped GEMMs need of each rank's expert width
    (:data:`FP8_GROUPED_GEMM_ALIGN`), where the run converts the experts (:func:`fp8_converted_parts`); 0 where it
    does not (bf16 runs, dense models, unaligned experts)."""
    if precision != "fp8":
        return 0
    recipe = fp8_recipe_on(backend, recipe)
    return FP8_GROUPED_GEMM_ALIGN.get(recipe, 16) if "experts" in fp8_converted_parts(backend, arch, recipe) else 0


def nvfp4_converted_layers(n_layers: int, bf16_tail: float) -> int:
    """Leading decoder blocks an nvfp4 run converts: all but the last ceil(n_layers x bf16_tail), exactly as
    torchtitan 0.3.0's ``nvfp4_bf16_tail_fqns(num_layers, bf16_tail_fraction)`` counts them
    (components/quantization/nvfp4.py), floating-point rounding of the product included."""
    return n_layers - math.ceil(n_layers * bf16_tail)


def lowp_recipe(backend: Backend, precision: str, fp8_recipe: str | None) -> str:
    """The key of a low-precision run in the backend's per-recipe tables (cast bytes): the fp8 recipe
    (:func:`fp8_recipe_on`) for fp8, :data:`NVFP4` for nvfp4, the backend's fp8 default otherwise (unused)."""
    return NVFP4 if precision == NVFP4 else fp8_recipe_on(backend, fp8_recipe)


def converted_parts(backend: Backend, arch, precision: str, fp8_recipe: str | None = None) -> frozenset[str]:
    """The parts (``flops.LINEAR_PARTS``) whose linears a low-precision run converts, in its converted blocks: fp8
    (:func:`fp8_converted_parts`, every block) or nvfp4 (:attr:`Backend.nvfp4_parts`, the blocks before the bf16
    tail: :func:`nvfp4_converted_layers`); empty for bf16 / fp32 runs. ``mlp`` only where the model has a dense FFN
    or shared experts."""
    if precision == "fp8":
        return fp8_converted_parts(backend, arch, fp8_recipe_on(backend, fp8_recipe))
    if precision != NVFP4:
        return frozenset()
    return frozenset(backend.nvfp4_parts) - {"experts", "router", "head"}


def lowp_dtype(precision: str) -> str:
    """The hardware-table precision whose peak a low-precision run's converted linears run at."""
    return "nvfp4" if precision == NVFP4 else "fp8"


def linear_speedup(backend: Backend, precision: str, recipe: str, peak_ratio: float) -> float:
    """Speed-up of a low-precision run's converted linears over bf16: fp8 the backend's per recipe
    (:attr:`Backend.fp8_rowwise_speedup` for rowwise, else :attr:`Backend.fp8_linear_speedup`), nvfp4
    :attr:`Backend.nvfp4_linear_speedup`; never above ``peak_ratio`` (the precision's dense peak / bf16's)."""
    if precision == NVFP4:
        s = backend.nvfp4_linear_speedup
    else:
        s = backend.fp8_rowwise_speedup if recipe == "rowwise" else backend.fp8_linear_speedup
    return min(s, peak_ratio)


def nvfp4_linear_dims(arch, parts) -> list[tuple[str, int, int, str]]:
    """(name, in_features, out_features, TP style) of each linear of one block that an nvfp4 run converts
    (``parts``), as torchtitan 0.3.0 builds and shards them: a GQA block's fused wqkv (d -> (h + 2 kv) x head_dim) and
    wo, column- and row-parallel (models/common/decoder_sharding.py); an MLA block's wq or wq_a / wq_b, wkv_a,
    wkv_b and wo (models/deepseek_v3: wq_a and wkv_a replicated over TP, the others colwise / rowwise); the FFN's
    w1, w3 (colwise) and w2 (rowwise), d_ff the dense FFN's or, in an MoE block, num_shared_experts x the expert
    width (the shared experts)."""
    d = arch.d_model
    out: list[tuple[str, int, int, str]] = []
    if "attention" in parts:
        if arch.mla is not None:
            m, h = arch.mla, arch.n_heads
            qk = m.qk_nope_head_dim + m.qk_rope_head_dim
            if m.q_lora_rank:
                out += [("attention.wq_a", d, m.q_lora_rank, "replicate"),
                        ("attention.wq_b", m.q_lora_rank, h * qk, "colwise")]
            else:
                out.append(("attention.wq", d, h * qk, "colwise"))
            out += [("attention.wkv_a", d, m.kv_lora_rank + m.qk_rope_head_dim, "replicate"),
                    ("attention.wkv_b", m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim), "colwise"),
                    ("attention.wo", h * m.v_head_dim, d, "rowwise")]
        else:
            q, kv = arch.n_heads * arch.hd, arch.kv_heads * arch.hd
            out += [("attention.qkv_linear.wqkv", d, q + 2 * kv, "colwise"), ("attention.wo", q, d, "rowwise")]
    if "mlp" in parts:
        if arch.moe is None:
            out += [("feed_forward.w1", d, arch.d_ff, "colwise"), ("feed_forward.w3", d, arch.d_ff, "colwise"),
                    ("feed_forward.w2", arch.d_ff, d, "rowwise")]
        else:
            from llmc.compiler.params import expert_d_ff

            if arch.moe.dense_layers:
                out += [("feed_forward.w1", d, arch.d_ff, "colwise"), ("feed_forward.w3", d, arch.d_ff, "colwise"),
                        ("feed_forward.w2", arch.d_ff, d, "rowwise")]
            sf = arch.moe.num_shared_experts * expert_d_ff(arch)
            if sf:
                out += [("moe.shared_experts.w1", d, sf, "colwise"), ("moe.shared_experts.w3", d, sf, "colwise"),
                        ("moe.shared_experts.w2", sf, d, "rowwise")]
    return out


def nvfp4_misaligned(arch, parts, tp: int) -> tuple[str, int, int, str, int] | None:
    """The first converted linear (:func:`nvfp4_linear_dims`) whose local GEMM dimension on a TP rank is not a
    multiple of :data:`NVFP4_GEMM_ALIGN`: (name, in, out, style, the offending local dim), else None. Column-parallel
    linears split out_features over ``tp``, row-parallel ones in_features; replicated ones keep both."""
    for name, k, n, style in nvfp4_linear_dims(arch, parts):
        k_loc = k / tp if style == "rowwise" else k
        n_loc = n / tp if style == "colwise" else n
        for dim in (k_loc, n_loc):
            if dim != int(dim) or int(dim) % NVFP4_GEMM_ALIGN:
                return name, k, n, style, dim
    return None


def deepspeed_zero_stage(par, plan, *, searched: bool, backend: str | None) -> int:
    """The ZeRO stage of the run's ds_config, which llmc's DeepSpeed runner trains pre-training and every LM stage
    with (the emitter writes it, the stage checkpoint model sizes its saves by it): a pinned ``parallelism.zero_stage``
    (``par``); else the plan's when it was ``searched`` for DeepSpeed (``backend``) and runs as planned (data
    parallel only: its stage is the one sized and timed, e.g. ZeRO-3 for parameter offload on one GPU); else 3 when
    the plan shards (dp_shard > 1, or the DS runner folds tp/pp/cp into data parallelism) or offloads the
    parameters, 2 for optimizer offload on replicas (ZeRO-Offload), 0 otherwise (pure replicas). ``plan`` None (no
    plan DeepSpeed can run): 3."""
    if par.zero_stage is not None:
        return int(par.zero_stage)
    if plan is None:
        return 3
    if backend == "deepspeed" and searched and plan.tp == plan.pp == plan.cp == plan.ep == 1:
        return int(plan.zero_stage)
    if plan.dp_shard > 1 or plan.tp > 1 or plan.pp > 1 or plan.cp > 1 or par.offload_params:
        return 3
    return 2 if par.offload_optimizer else 0


def deepspeed_split(gbs: int, dp: int, micro_cap: int) -> tuple[int, int]:
    """(micro, accum) with micro x accum x dp = gbs: the largest micro-batch <= micro_cap dividing gbs / dp (dp must
    divide gbs)."""
    per_rank = gbs // dp
    micro = max(m for m in range(1, min(max(1, micro_cap), per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def deepspeed_folds(plan) -> bool:
    """Does llmc's DeepSpeed runner (data parallel + ZeRO only, llmc.runtime.ds_train) fold ``plan`` into data
    parallelism over every GPU (a plan with tp / pp / cp / ep)?"""
    return plan.tp > 1 or plan.pp > 1 or plan.cp > 1 or plan.ep > 1


def deepspeed_run_plan(plan, world: int, gbs: int, stage: int):
    """The layout llmc's DeepSpeed runner trains pre-training's ``plan`` with (what deepspeed/ds_config.json says):
    the plan's batch split over its data-parallel ranks, or, when it folds tp / pp / cp / ep (:func:`deepspeed_folds`),
    all ``world`` GPUs as data-parallel ranks with the largest micro-batch up to the plan's that divides the batch per
    rank (:func:`deepspeed_split`); ZeRO-``stage`` over every rank (no replicate dimension), the plan's AC and loss
    slices, whole sequences. None when the global batch ``gbs`` does not split over the folded ranks (no DeepSpeed run:
    X104)."""
    from llmc.compiler.plan import ParallelPlan

    if deepspeed_folds(plan):
        if gbs % world:
            return None
        dp = world
        micro, accum = deepspeed_split(gbs, dp, plan.micro_batch)
    else:
        dp, micro, accum = plan.dp, plan.micro_batch, plan.grad_accum
    return ParallelPlan(dp_shard=dp, micro_batch=micro, grad_accum=accum, zero_stage=stage,
                        activation_checkpointing=plan.activation_checkpointing, ac_layers=plan.ac_layers,
                        loss_chunk_tokens=plan.loss_chunk_tokens)


def activation_mode(ac: str, backend: Backend) -> str:
    """The recompute model of activation-checkpointing mode ``ac`` on ``backend``: ``selective`` is the backend's
    own kind (:attr:`Backend.selective_ac`), ``selective_core`` where only the attention core is recomputed
    (memory.layer_activation_bytes_per_token, flops.recompute_flops_per_token)."""
    return "selective_core" if ac == "selective" and backend.selective_ac == "attention_core" else ac


__all__ = ["deepspeed_zero_stage", "deepspeed_split", "deepspeed_folds", "deepspeed_run_plan", "fit_headroom", "GENERIC_HEADROOM", "Backend", "StateBytes", "BACKENDS", "RUNNABLE", "FITTED", "ModelGap", "get_backend", "resolve_backend",
           "torchtitan_model_gaps", "torchtitan_reads_hf", "compile_on",
           "fp8_recipe_on", "fp8_converted_parts", "activation_mode", "describe", "converted_parts", "linear_speedup",
           "lowp_recipe", "lowp_dtype", "nvfp4_converted_layers", "nvfp4_linear_dims", "nvfp4_misaligned"]
