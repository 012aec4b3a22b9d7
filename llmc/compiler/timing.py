"""Step-time model for one parallelism plan: compute, communication, pipeline bubble, optimizer.

This module owns the *time* side of the planner; memory lives in ``memory.py``, FLOP counts in
``flops.py``. Everything is closed-form arithmetic so that the search can call it tens of
thousands of times (``StepModel`` precomputes the per-architecture constants once).

The model, per optimizer step (m = grad_accum micro-batches, p = pp, v = virtual stages):

    step = m * t_micro + bubble + exposed per-step comm + optimizer update

* ``t_micro`` is the time of the slowest pipeline stage on one micro-batch:
  compute + TP collectives + EP all-to-all + exposed CP ring traffic + PP point-to-point
  + exposed FSDP (ZeRO-3) traffic.
* compute = FLOPs on this GPU / (peak * efficiency) + memory-bound elementwise time. FLOPs
  include activation recomputation (selective or full AC), so AC lowers MFU (MFU counts model
  FLOPs only; HFU would count both). Efficiency = base * f_tokens * f_width * f_moe (heuristics,
  see :func:`efficiency`): ``BASE_EFFICIENCY`` 0.65 for large bf16 GEMMs + FlashAttention on
  H100-class parts (measured dense bf16 cuBLAS GEMMs reach 65-80 % of the datasheet peak,
  FlashAttention-2/3 50-75 %), times f_tokens = n/(n+512) for n tokens per micro-batch per GPU
  (few GEMM rows) and f_width = w/(w+128) for the per-TP-shard width w = d_model/tp (narrow
  GEMMs): a 405B layer at 8K tokens and TP8 runs at 0.65*0.94*0.94 = 0.58, an 8B layer at TP2 at
  0.57, a 1B layer at 2K tokens at 0.50, inside the 0.55-0.6 usually assumed for H100.
  Elementwise ops (RMSNorm, residual adds, RoPE, SwiGLU's product) are HBM-bound: forward traffic
  ~(16 d + 8 d_ff) bf16 elements per token per layer, backward twice that, at the HBM bandwidth
  (an estimate; ~4 % of a 405B step, ~15 % of an 8B one). fp8 runs in fp8 only the linears the
  backend's job converts (``backends.fp8_converted_parts``: the attention projections, the dense /
  shared-expert FFNs and, where the grouped-GEMM converter runs, the routed experts; never the output
  head or the MoE router, whose FLOPs stay bf16 with attention), each part's FLOPs from
  ``flops.linear_flops_by_part``, ``fp8_linear_speedup`` x faster than bf16 per recipe (backends.py), with
  the GEMM shape penalty's half-points scaled by the fp8/bf16 peak ratio (per-tile costs do not
  speed up; torchao float8 README, "Derivation") and, for dense blocks, times torchao's float8 GEMM
  roofline penalty at each linear's TP-shard shape (``fp8_roofline_penalty``: a narrow shard's fp8
  GEMM is bound by its bf16 output write, so it gains less than the peak ratio; 1.0 on large
  shapes, 1.045 for Llama 3 8B at TP 8, 1.016 for 70B); the casts of the converted linears are HBM
  traffic counted per element as in torchao's float8 roofline model (fused into the producing kernel or
  not, weights included);
  MFU for fp8 runs is quoted against the bf16 peak (the usual convention). nvfp4 runs go through the same
  terms with their own numbers (``backends.converted_parts`` etc.): the attention and FFN linears of the blocks
  before the bf16 tail (``training.nvfp4_bf16_tail``; a per-block average: the tail's blocks are not placed on
  their pipeline stage) at ``min(nvfp4_linear_speedup, fp4 / bf16 peak)`` x the bf16 rate, the shape penalty
  stretched by that peak ratio, torchao's GEMM roofline with 0.5 B elements + one scale per 16, and the casts of
  torchao's nvfp4_training kernels (backends.NVFP4_CAST); attention, the head, the router, the routed experts and
  the tail's linears stay bf16. MFU again against the bf16 peak.
* Communication (bandwidths from the hardware table, times ``COMM_EFFICIENCY``):
  - TP (Megatron, Narayanan et al. 2021 / Korthikanti et al. 2022): 2 all-reduces forward + 2
    backward per layer, each of b*s*h*2 bytes, ring factor 2(t-1)/t, inside the node (NVLink; PCIe
    on parts without it, :func:`intra_node_gbps`); +2 with full recomputation (the forward runs
    twice), +2 all-gathers with torchtitan's per-op selective AC (it saves no all-gather output, so the
    backward gathers the attention and MLP inputs again; backends.py ``sac_regathers_tp``). torchtitan's
    tensorwise float8 TP gathers in fp8 (1 B per element). The backend's
    tp_overlap (async TP, TE comm-GEMM overlap) hides a share of the collectives it can fuse.
  - FSDP / ZeRO over dp_shard: ZeRO-3 all-gathers the local parameters before forward and
    backward and reduce-scatters the gradients every micro-batch (FSDP2 with gradient
    accumulation); under pipelining the stage stays unsharded for the step and gradients are
    reduced once (torchtitan + torch.distributed.pipelining), as ZeRO-1/2 do: one reduce-scatter
    and one all-gather per step. Ring volume (n-1)/n of the tensor each. NVLink if the whole shard group sits in a
    node (torchtitan mesh order [pp, dp_replicate, dp_shard, cp, tp]), else the per-GPU network.
  - DP replicas (DDP, or the replicate dim of HSDP): one ring all-reduce of the gradient shard
    per step, 2(r-1)/r of its bytes, over the network.
  - PP: b*s*h*2 bytes (split over TP with sequence parallelism) each way per micro-batch per
    stage boundary, v times for interleaved schedules.
  - EP: 2 all-to-alls (dispatch, combine) per MoE layer per direction, tokens*top_k*h*2 bytes,
    (e-1)/e of it leaves the GPU; the tokens are the rank's sequence shard (/ tp: torchtitan's routed experts take
    each TP rank's own tokens). torchtitan's EP group is ep consecutive ranks (its expert mesh (efsdp, ep) over
    dp_shard x cp x tp, ep innermost: plan.ep_rank_span), so it stays in NVLink while ep fits a node, TP or not.
    The routed experts' FSDP traffic: their rank's share (plan.expert_shards) over efsdp.
  - CP (ring attention): each layer passes the local K,V shard around the ring, (cp-1) hops
    forward and K,V plus their gradients backward (3x the forward bytes).
* Overlap: FSDP/ZeRO-3 traffic hides behind the same micro-batch's compute with efficiency
  ``OVERLAP`` (prefetch; the part longer than the compute is fully exposed). Per-step gradient
  reduction / parameter gather (ZeRO-1, DDP, HSDP) overlaps with one micro-batch of compute
  (the last backward / next forward). CP ring traffic is half hidden behind attention.
  TP, EP, PP traffic is counted as exposed.
* Bubble (Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters"):
  (p-1) micro-batch slots for 1F1B/GPipe, (p-1)/v for interleaved 1F1B, about (p-1)/3 for
  zero-bubble ZB-V (Qi et al. 2023 report ZB-H1 at a third of the 1F1B bubble; an estimate).
* Optimizer: AdamW streams about 30 bytes per locally owned parameter (fp32 master, m, v read
  and written, grad read, bf16 copy written) through HBM.

* FSDP (ZeRO-3) collectives are issued per block; each pays (n-1) ring steps of latency
  (``HOP_LATENCY_NET`` / ``HOP_LATENCY_NVLINK``), which is what makes HSDP (shard inside a few
  nodes, replicate across) win over one huge shard group at scale.

Checkpoint saves stall training between steps: ``checkpoint_cost.py`` models them (bytes each backend writes per
node / the storage bandwidth, or an async save's staging over PCIe); :func:`time_numbers` adds them to the run's
days (and so to its GPU-hours and cost), never to the step time or MFU, which stay per training step.

Known omissions: kernel launch gaps, stragglers, data loading, network
congestion at scale, MoE load imbalance. Anchor (tests/test_timing.py): the published Llama 3
405B layout (TP8 CP1 PP16 DP128, 16K H100) is predicted inside a 30-50 % MFU band; the paper
reports 38-43 %.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from llmc.compiler.memory import eager_attention
from llmc.compiler.plan import EP_SPANS_TP, ParallelPlan, ep_rank_span, expert_shards
from llmc.compiler.result import TimeNumbers
from llmc.spec.schema import NVFP4_BF16_TAIL

# --- heuristics (each one named so tests and docs can cite it) ---------------------------------
BASE_EFFICIENCY = 0.65  # achievable fraction of dense peak for large bf16 GEMMs + flash attention
ELEMENTWISE_D = 16  # fwd HBM traffic of norms, residual adds, RoPE per token per layer, in units of d_model
ELEMENTWISE_FF = 8  # fwd HBM traffic of the SwiGLU gate/product per token per layer, in units of d_ff
FP8_EFFICIENCY_FACTOR = 0.70  # fp8 efficiency relative to bf16's, against the fp8 peak
TOKENS_HALF = 512  # micro-batch tokens per GPU at which GEMM efficiency halves (f = n/(n+512))
WIDTH_HALF = 128  # per-TP-shard hidden width at which efficiency halves (f = w/(w+128))
MOE_EFFICIENCY = 0.80  # grouped expert GEMMs + routing/permutation overhead
COMM_EFFICIENCY = 0.80  # achieved bus bandwidth / link bandwidth (NCCL ring, large messages)
OVERLAP = 0.85  # fraction of overlappable comm actually hidden behind compute
CP_OVERLAP = 0.50  # ring-attention KV passing hidden behind the attention kernels
ADAM_BYTES_PER_PARAM = 30  # HBM traffic of one fused AdamW update per owned parameter
# HBM bytes per score of unfused attention's forward (soft-capped scores; attention sinks: the scores with the sink
# column concatenated in place of tanh's output), fused as torch.compile fuses the pointwise chain (estimate): the
# QK^T product read (2), tanh's (or the concatenation's) output (2), the fp32 softmax (4) and its bf16 cast (2)
# written, the cast read by the PV product (2); eager runs each op apart (x the backend's eager_elementwise, as the
# other memory-bound ops)
SOFTCAP_SCORE_FWD_BYTES = 12
# ZeRO-Offload (parallelism.offload_optimizer; Ren et al. 2021, arXiv:2101.06840 sec. 4): the fp32 master weights
# and AdamW moments live on the host, which runs the update. Per step, each rank's owned 16-bit gradients go to the
# host and its updated 16-bit parameters come back: 2 + 2 B per owned parameter over the rank's PCIe link ("4M"
# for M parameters in the paper), at the table's pcie_gbps per direction (else OFFLOAD_PCIE_GBPS) x COMM_EFFICIENCY,
# counted exposed; the update runs on the node's shared CPUs at CPU_ADAM_PARAMS_PER_S for all of the node's ranks.
OFFLOAD_PCIE_BYTES_PER_PARAM = 4
# ZeRO-Infinity's parameter offload to CPU (parallelism.offload_params; Rajbhandari et al. 2021, arXiv:2104.07857
# sec. 5): the 16-bit parameter partitions live on the host too. Each rank copies its partition over its PCIe link
# before the forward and again before the backward all-gather of every micro-batch (2 x 2 B per owned parameter),
# overlapped with compute as the ZeRO-3 gathers are (prefetch); the updated parameters stay on the host, so the
# step sends only the gradients (2 of OFFLOAD_PCIE_BYTES_PER_PARAM's 4 B).
PARAM_FETCHES_PER_MICRO_BATCH = 2
OFFLOAD_PCIE_GBPS = 32.0  # PCIe Gen4 x16 per direction, where the table gives no host link (Gen5 hosts: 64)
# DeepSpeedCPUAdam (AVX-512, all cores of a training host): an 11.6B-parameter GPT-2's optimizer step in 8.2 s
# (torch.optim.Adam: 56 s), https://github.com/deepspeedai/DeepSpeed/pull/735. Host-dependent: a single
# Xeon Silver took 22.9 s for 1.35B (https://github.com/deepspeedai/DeepSpeed/issues/1635), 24x slower; calibrate.
CPU_ADAM_PARAMS_PER_S = 11.6e9 / 8.2
ZB_BUBBLE_FRACTION = 1 / 3  # zero-bubble schedules: bubble relative to 1F1B (estimate)
ACT_BYTES = 2  # bf16 activations on the wire
HOP_LATENCY_NET = 5e-6  # seconds per ring step across nodes (NCCL ring: n-1 steps per collective; estimate)
# torchao's float8 GEMM roofline (https://github.com/pytorch/ao/blob/main/torchao/testing/float8/roofline_utils.py,
# gpu_name_to_specs, H100): share of the dense tensor peak a large GEMM reaches ("experimental observation with
# sample large inputs") and share of HBM bandwidth a large pointwise kernel reaches; peaks and bandwidth
# themselves come from llmc's hardware table
ROOFLINE_GEMM_FRACTION = 0.78
ROOFLINE_HBM_FRACTION = 0.92
HOP_LATENCY_NVLINK = 1e-6  # seconds per ring step inside a node (estimate)
# fp8 scaling recipes the model knows (spec ``training.fp8_recipe``): per-tensor (torchao "tensorwise", TE current
# scaling), per-row (torchao "rowwise"), and OCP MX block scaling (TE MXFP8, torchao mxfp8); cast traffic per
# recipe in backends.py
FP8_RECIPES = ("tensorwise", "rowwise", "mxfp8")


@dataclass(frozen=True)
class StepModel:
    """Per-(architecture, seq_len, precision, cluster) constants for :func:`step_time`.

    Build once with :func:`step_model`; evaluating a plan is then pure float arithmetic.
    """

    n_layers: int
    n_moe_layers: int
    d_model: int
    seq_len: int
    top_k: int
    kv_bytes_per_token_layer: float  # bf16 K+V bytes per token per layer (MLA: latent + rope)
    elementwise_bytes: float  # HBM bytes of memory-bound ops per token per block, fwd + bwd
    layer_flops: float  # training FLOPs per token of one average block (fwd+bwd, no recompute)
    head_flops: float  # training FLOPs per token of the output head (on the last stage)
    loss_recompute_flops: float  # extra FLOPs per token of a loss in slices (flops.loss_recompute_flops_per_token)
    recompute_flops: dict[str, float]  # extra FLOPs per token for each AC mode (whole model)
    flops_per_token: float  # training model FLOPs per token (no recompute)
    layer_params: float  # parameters of one average block (total, i.e. all experts)
    expert_params_per_layer: float  # routed-expert parameters in one average MoE block
    embed_params: float  # token embedding
    head_params: float  # output head (0 when tied; the embedding is then shared)
    is_moe: bool
    peak: float  # FLOP/s the MFU is quoted against (bf16 peak for fp8: the usual convention)
    sec_per_flop: float  # 1 / effective peak at 100 % efficiency, matmul and attention weighted
    precision: str
    gpus_per_node: int
    nvlink_Bps: float  # bytes/s per direction per GPU inside the node (NVLink; PCIe on parts without it)
    net_Bps: float  # bytes/s per GPU
    hbm_Bps: float
    backend: str = "generic"
    zero12: str = "reference"  # how the backend runs ZeRO-1/2 (backends.Backend.zero12)
    compiled: bool = False  # torch.compile on
    tp_overlap: float = 0.0  # share of TP collectives hidden behind GEMMs (async TP / comm-GEMM overlap)
    fsdp_overlap: float = 0.85  # share of FSDP/ZeRO traffic hidden behind compute (prefetch)
    ep_overlap: float = 0.0  # share of MoE all-to-all hidden behind expert compute
    ep_node_dedup: bool = False  # a token crosses the network once per remote node (DeepEP-style dispatch)
    cp_overlap: float = 0.5  # share of the ring-attention K/V exchange hidden behind attention
    compute_scale: float = 1.0  # calibration: compute and elementwise time / compute_scale
    comm_scale: float = 1.0  # calibration: every exposed communication time x comm_scale
    base_efficiency: float = BASE_EFFICIENCY  # the backend's GEMM efficiency level (already in sec_per_flop)
    fp8_cast_full: float = 0.0  # fp8 cast HBM bytes per token per block not split by tp, when tp > 1 (step_model)
    fp8_cast_sharded: float = 0.0  # fp8 cast HBM bytes per token per block split by tp
    fp8_cast_tp1: float = 0.0  # the fp8_cast_full elements' bytes per token per block when tp = 1 (fusable casts)
    fp8_cast_tp_sharded: float = 0.0  # extra cast bytes per token per block split by tp, when tp > 1
    fp8_weight_cast: float = 0.0  # fp8 weight-cast HBM bytes per block per micro-batch, before tp sharding
    fp8_expert_weight_cast: float = 0.0  # the same for the routed experts' weights, before tp x ep sharding
    tp_gather_bytes: float = ACT_BYTES  # bytes per element of the TP all-gathers (1: fp8 gathers)
    # the low-precision (fp8 / nvfp4) linears' part of sec_per_flop (0 = none); the fp8_* fields below hold an
    # nvfp4 run's numbers too (its peak, casts, shapes)
    fp8_linear_sec_per_flop: float = 0.0
    fp8_shape_stretch: float = 1.0  # fp8 GEMMs: TOKENS_HALF / WIDTH_HALF scaled by this (see _efficiency)
    tp_gather_unfused: bool = False  # TP all-gathers feed an fp8 cast, not a GEMM (torchao rowwise float8)
    sac_regathers_tp: bool = False  # selective AC recomputes the forward TP all-gathers in the backward (backends.py)
    # the fp8 linears of a dense block as (weight K*N, K, N, column_parallel), for fp8_roofline_penalty
    fp8_linear_shapes: tuple[tuple[float, int, int, bool], ...] = ()
    fp8_peak: float = 0.0  # dense fp8 peak FLOP/s (0 = not fp8)
    fp8_peak_ratio: float = 1.0  # fp8 / bf16 dense peak
    # bytes per input element the low-precision GEMMs read, their block scales included (roofline, as torchao
    # counts them: fp8 1, MXFP8 1 + 1/32, NVFP4 0.5 x (1 + 1/16))
    fp8_in_bytes: float = 1.0
    # fp8 routed experts: the alignment their grouped GEMMs need of each rank's expert width (0: experts not in
    # fp8; backends.fp8_expert_align), which the search checks for torchtitan layouts (torchtitan_layout_problem)
    fp8_expert_align: int = 0
    offload_optimizer: bool = False  # ZeRO-Offload: AdamW on the host (OFFLOAD_PCIE_BYTES_PER_PARAM, CPU_ADAM_PARAMS_PER_S)
    offload_params: bool = False  # ZeRO-Infinity to CPU: parameter partitions fetched per pass (PARAM_FETCHES_...)
    host_Bps: float = 0.0  # bytes/s per GPU per direction to the host (PCIe), for the offload traffic
    gpus_per_host: int = 1  # GPUs sharing one host's CPUs (the table's gpus_per_node; not the NVLink domain)
    nvlink_topology: str = "switch"  # the node's GPU fabric (hardware.GPU.nvlink_topology)
    pcie_Bps: float = 0.0  # bytes/s per GPU per direction between bridged pairs ("pairs" topology)
    cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)  # per-pp stage info

    def group_Bps(self, g: int) -> float:
        """Bytes/s per GPU per direction a collective among ``g`` GPUs of one node gets (:func:`group_bandwidth`)."""
        return group_bandwidth(self.nvlink_topology, self.nvlink_Bps, self.pcie_Bps, self.gpus_per_host, g)

    def p2p_Bps(self) -> float:
        """Bytes/s of one point-to-point transfer between two GPUs of a node that need not share a bridge."""
        return group_bandwidth(self.nvlink_topology, self.nvlink_Bps, self.pcie_Bps, self.gpus_per_host, 2,
                               pair=False)


def group_bandwidth(topology: str, fabric_Bps: float, pcie_Bps: float, gpus_per_node: int, g: int,
                    pair: bool = True) -> float:
    """Per-GPU, per-direction bandwidth of a collective among ``g`` GPUs of one node, by the fabric's topology
    (``hardware.GPU.nvlink_topology``): "switch" (NVSwitch: ``fabric_Bps`` whatever the group); "pairs" (an NVLink
    bridge joins two cards, H100 PCIe / NVL: "NVLink bridge connects pairs of cards", the datasheet's 2-way bridge;
    a larger group, or two cards not known to share a bridge (``pair`` False), crosses PCIe); "mesh" (a fully
    connected mesh, MI300X / MI325X: ``gpus_per_node`` - 1 Infinity Fabric links share ``fabric_Bps``, 64 GB/s per
    direction each, and a group of g GPUs drives g - 1 of them: AMD's MI300X datasheet, 7 links of 128 GB/s
    bidirectional)."""
    if topology == "pairs":
        return fabric_Bps if (g <= 2 and pair) else (pcie_Bps or fabric_Bps)
    if topology == "mesh" and gpus_per_node > 1:
        return fabric_Bps * min(1.0, max(1, g - 1) / (gpus_per_node - 1))
    return fabric_Bps


def step_model(arch, seq_len: int, precision: str, gpu, backend=None, *, compile: bool | None = None,
               async_tp: bool = False, fp8_recipe: str | None = None, factors=None,
               offload_optimizer: bool = False, offload_params: bool = False,
               nvfp4_bf16_tail: float = NVFP4_BF16_TAIL) -> StepModel:
    """Precompute the constants of the time model for one architecture on one cluster.

    ``gpu`` is a ``hardware.GPU`` (already carrying the spec's gpus_per_node / network overrides).
    ``backend`` is a :class:`backends.Backend` (or its name; None = the backend-neutral ``generic``
    profile); ``compile`` = torch.compile on (None = the backend's default); ``async_tp`` = torchtitan's
    async tensor parallel (effective only when compiled); ``fp8_recipe`` = ``tensorwise`` / ``rowwise`` /
    ``mxfp8`` (None = the backend's; see :data:`FP8_RECIPES`); ``factors`` = calibration factors
    (:class:`calibration.Factors`: compute_scale divides the compute time, comm_scale multiplies every
    exposed communication time; applied in :meth:`LayoutTimer.time` after the overlap model, so the
    reported step is exactly the linear model the calibration was fitted with); ``offload_optimizer`` =
    ZeRO-Offload (the optimizer step runs on the host: :data:`CPU_ADAM_PARAMS_PER_S`); ``offload_params`` = the
    parameters on the host too (:data:`PARAM_FETCHES_PER_MICRO_BATCH`); ``nvfp4_bf16_tail`` = the share of final
    blocks an nvfp4 run keeps in bf16 (``training.nvfp4_bf16_tail``).
    """
    from llmc.compiler.backends import (
        FP8_GROUPED_GEMM_ALIGN,
        MX_BLOCK,
        NVFP4,
        NVFP4_BLOCK,
        NVFP4_ELEM_BYTES,
        activation_mode,
        compile_on,
        converted_parts,
        get_backend,
        linear_speedup,
        lowp_dtype,
        lowp_recipe,
        nvfp4_converted_layers,
    )

    be = get_backend(backend) if backend is None or isinstance(backend, str) else backend
    compiled_ = compile_on(be, compile)
    if fp8_recipe is not None and fp8_recipe not in FP8_RECIPES:
        raise ValueError(f"unknown fp8 recipe {fp8_recipe!r} (one of {', '.join(FP8_RECIPES)})")
    compute_scale = getattr(factors, "compute_scale", 1.0) if factors is not None else 1.0
    if hasattr(factors, "compute_scale_at"):  # calibration.Factors: with its model-size term
        compute_scale = factors.compute_scale_at(arch.d_model)
    comm_scale = getattr(factors, "comm_scale", 1.0) if factors is not None else 1.0
    from llmc.compiler import flops, params
    from llmc.compiler.hardware import clock_factor, nvlink_group, peak_flops

    total = flops.train_flops_per_token(arch, seq_len)
    V, d, L = arch.vocab_size, arch.d_model, arch.n_layers
    head = 6.0 * d * V  # output projection, fwd (2) + bwd (4) per token
    layer_flops = (total - head) / L
    # "selective" is the backend's kind (backends.activation_mode: per-op SAC or the attention core)
    rec = {m: float(flops.recompute_flops_per_token(arch, seq_len, activation_mode(m, be)))
           for m in ("none", "selective", "full")}
    recipe = lowp_recipe(be, precision, fp8_recipe)

    n_moe = 0
    expert = 0.0
    blocks = 0.0
    e_ff = arch.d_ff
    for i in range(L):
        blocks += params.layer_params(arch, i)
    if arch.moe is not None:
        n_moe = L - min(arch.moe.dense_layers, L)
        e_ff = params.expert_d_ff(arch)
        expert = 3.0 * d * e_ff * arch.moe.num_experts  # routed experts' SwiGLU (params.py)
    kv = params.kv_bytes_per_token(arch) / L  # bf16 K+V bytes per token per layer
    attn_share = flops.attention_share(arch, seq_len)
    # a sliding window W < seq_len: the model FLOPs count the band (flops.attention_span), but the trainers that run
    # such a model (llmc's, also under DeepSpeed; torchtitan has no window, X315) give SDPA a band mask, whose
    # memory-efficient kernel computes every score of the square and masks it: the attention takes s / span times
    # the counted work (FlashAttention's block-skipping window kernel would not; llmc does not call it)
    attn_work = seq_len / flops.attention_span(arch, seq_len)
    peak = mfu_peak(gpu, precision)
    # fp8 (torchao float8, Transformer Engine) runs in fp8 only the linears the backend's job converts
    # (backends.fp8_converted_parts); the other linears (the output head, the MoE router, anything the job
    # leaves out) and attention stay bf16 (hardware.peak_flops note). Each part's share of the FLOPs:
    # flops.linear_flops_by_part. nvfp4 converts its parts (backends.converted_parts) in the blocks before the bf16
    # tail only: their share x the converted blocks' fraction (a per-block average)
    lowp = precision in ("fp8", NVFP4)
    fp8_parts = converted_parts(be, arch, precision, fp8_recipe) if lowp else frozenset()
    conv = nvfp4_converted_layers(L, nvfp4_bf16_tail) / L if precision == NVFP4 else 1.0
    lp_peak = peak_flops(gpu, lowp_dtype(precision)) if fp8_parts else peak
    fp8_share = flops.linear_share(arch, seq_len, fp8_parts) * conv if fp8_parts else 0.0
    fp8_lin = 0.0
    speedup = 1.0
    if fp8_share:
        # the converted linears run the backend's speed-up x faster than in bf16 (never above the low-precision /
        # bf16 peak ratio: backends.linear_speedup)
        speedup = linear_speedup(be, precision, recipe, lp_peak / peak)
        fp8_lin = fp8_share / (peak * speedup) / (be.base_efficiency * clock_factor(gpu))
    sec_per_flop = (fp8_share / (peak * speedup) + (1 - attn_share - fp8_share) / peak
                    + attn_share * attn_work / (peak * be.attn_relative_efficiency))
    sec_per_flop /= be.base_efficiency * clock_factor(gpu)  # a power-capped part runs at lower clocks
    ff_active = arch.d_ff
    if arch.moe is not None:
        ff_active = (arch.moe.top_k + arch.moe.num_shared_experts) * params.expert_d_ff(arch)
    # memory-bound elementwise work (RMSNorm, residual adds, RoPE, SiLU x up): forward traffic in bf16,
    # backward about twice that (estimate; it is what keeps small models well below large-model MFU)
    elementwise = 3 * ACT_BYTES * (ELEMENTWISE_D * d + ELEMENTWISE_FF * ff_active)
    # fp8 casts (torchao float8 / TE), HBM-bound: every fp8 linear casts its input (forward), its weight and
    # its grad_output (backward); only the converted parts' linears (fp8_parts) cast. Bytes per cast element
    # follow torchao's float8 roofline model
    # (torchao/testing/float8/roofline_utils.py, get_tensor_memory_traffic_ovhd_s): a cast that torch.compile
    # fuses into the producing kernel (a norm, SwiGLU) saves the bf16 read (fp8_cast_bytes); one whose input
    # comes out of a collective or an eager op cannot (fp8_cast_bytes_unfused). Elements per token per
    # block: "full" = inputs of the column-parallel linears (wq, wk, wv, w1, w3: sequence-parallel TP
    # all-gathers them to the whole sequence, then each linear casts its input) + grad_outputs of the
    # row-parallel ones (wo, w2: full width); "sharded" (/ tp) = the other inputs and grad_outputs.
    # The FFN's are the dense FFN's in a dense block and the shared experts' in an MoE block (none without
    # them); the routed experts' grouped GEMMs cast their inputs (w1, w3: d each; w2: f) and grad_outputs
    # (w1, w3: f each; w2: d) once per routed copy of a token (top_k per token; torchao fp8_grouped_mm
    # quantizes A per call), after the dispatch, counted as sharded, and each rank's local experts' weights.
    # torchtitan with tensorwise scaling and TP casts on the local shard and all-gathers in fp8
    # (torchtitan parallelize.py: enable_float8_tensorwise_tp; rowwise "all-gather happens in high
    # precision"): torchao's PrepareFloat8ModuleInput casts the attention / MLP input once before the forward
    # gather, Float8RowwiseParallel's output hook casts the gradient before the backward gather ("fwd noop bwd
    # cast", torchao/float8/float8_tensor_parallel.py). All those casts are split by tp, fusable, and every
    # TP all-gather moves 1 byte per element.
    # Without torch.compile, torchao float8 runs each step of a cast as its own kernel and casts each tensor anew in
    # the backward (backends.EAGER_FLOAT8: bytes per input, grad_output and weight element, by recipe): the dense
    # linears' inputs and grad_outputs are counted apart then (their eager bytes differ under rowwise); the routed
    # experts' and the recipes without an eager entry keep the unfused bytes (their cast kernels are the same eager).
    cast_full = cast_sharded = cast_tp1 = cast_tp_sharded = weight_cast = expert_weight_cast = 0.0
    tp_gather = float(ACT_BYTES)
    if fp8_parts:
        fused = be.fp8_cast_bytes.get(recipe, 0.0)
        unfused = be.fp8_cast_bytes_unfused.get(recipe, fused)
        eager = None
        if not compiled_:  # eager: nothing is fused into the producing kernel
            fused = unfused
            eager = be.fp8_eager_casts.get(recipe) if precision == "fp8" else None
        if arch.mla is not None:
            q_out = arch.n_heads * (arch.mla.qk_nope_head_dim + arch.mla.qk_rope_head_dim + arch.mla.v_head_dim)
            kv_out = 0.0
        else:
            q_out, kv_out = arch.n_heads * arch.hd, 2 * arch.kv_heads * arch.hd
        attn_on = 1.0 if "attention" in fp8_parts else 0.0
        # per-block means: FFN width, share of the blocks with an FFN, routed copies of a token
        mlp_ff = mlp_on = routed = 0.0
        if "mlp" in fp8_parts:
            shared = arch.moe.num_shared_experts * e_ff if arch.moe is not None else 0
            mlp_ff = ((L - n_moe) * arch.d_ff + n_moe * shared) / L
            mlp_on = ((L - n_moe) + (n_moe if shared else 0)) / L
        if "experts" in fp8_parts:
            routed = arch.moe.top_k * n_moe / L
        full = attn_on * 4 * d + mlp_on * 3 * d  # wq, wk, wv inputs + wo grad_output; w1, w3 inputs + w2's
        routed_bytes = fused * routed * 3 * (d + e_ff)
        if eager is None:
            cast_sharded = fused * (attn_on * (arch.n_heads * arch.hd + q_out + kv_out) + 3 * mlp_ff) + routed_bytes
            cast_tp1 = fused * full
            cast_full = unfused * full
            gather_cast = fused * 2 * d * (attn_on + mlp_on)  # attention and MLP inputs (once each), wo and w2 go
        else:  # the same elements, inputs and grad_outputs apart
            full_in, full_go = attn_on * 3 * d + mlp_on * 2 * d, (attn_on + mlp_on) * d
            shard_in = attn_on * arch.n_heads * arch.hd + mlp_ff  # wo, w2 inputs
            shard_go = attn_on * (q_out + kv_out) + 2 * mlp_ff  # wq, wk, wv, w1, w3 grad_outputs
            cast_sharded = eager.input * shard_in + eager.grad_output * shard_go + routed_bytes
            cast_tp1 = cast_full = eager.input * full_in + eager.grad_output * full_go
            gather_cast = (eager.input + eager.grad_output) * d * (attn_on + mlp_on)
        if recipe in be.fp8_tp_gather_recipes:
            cast_full, cast_tp_sharded = 0.0, gather_cast
            tp_gather = 1.0
        w_bytes = be.fp8_weight_cast_bytes.get(recipe, 0.0)
        weights = flops.matmul_params_by_part(arch, active=False)
        weight_cast = ((w_bytes if eager is None else eager.weight)
                       * sum(weights[k] for k in ("attention", "mlp") if k in fp8_parts) / L)
        expert_weight_cast = w_bytes * weights["experts"] / L if "experts" in fp8_parts else 0.0
        # nvfp4: only the converted blocks cast (per-block average, as the FLOPs)
        cast_full, cast_sharded, cast_tp1, cast_tp_sharded, weight_cast = (
            x * conv for x in (cast_full, cast_sharded, cast_tp1, cast_tp_sharded, weight_cast))
    if eager_attention(arch):
        # soft-capped attention, or attention with sinks (llmc.runtime.model._eager_attention: no fused kernel takes
        # either), writes and reads every score of every layer (the whole
        # square in a windowed one too): SOFTCAP_SCORE_FWD_BYTES forward, twice that backward (the final logits'
        # soft-cap, one pass over the head's output, is not counted: under 1 % of a Gemma 2 step)
        elementwise += 3 * SOFTCAP_SCORE_FWD_BYTES * arch.n_heads * seq_len
    if not compiled_:  # eager: every norm / RoPE / SwiGLU op reads and writes HBM on its own
        elementwise *= be.eager_elementwise
    tp_overlap = be.async_tp_overlap if (async_tp and compiled_) else be.tp_overlap
    domain = nvlink_group(gpu)  # GPUs on one NVLink fabric: TP and the intra-node collectives there
    embed = float(V * d)
    head_p = 0.0 if arch.tied_embeddings else float(V * d)
    return StepModel(
        n_layers=L, n_moe_layers=n_moe, d_model=d, seq_len=seq_len,
        top_k=arch.moe.top_k if arch.moe else 0,
        kv_bytes_per_token_layer=kv, elementwise_bytes=elementwise, layer_flops=layer_flops, head_flops=head,
        loss_recompute_flops=flops.loss_recompute_flops_per_token(arch),
        recompute_flops=rec, flops_per_token=float(total),
        layer_params=blocks / L, expert_params_per_layer=expert, embed_params=embed, head_params=head_p,
        is_moe=arch.moe is not None, peak=peak, sec_per_flop=sec_per_flop, precision=precision,
        gpus_per_node=domain, nvlink_Bps=intra_node_gbps(gpu)[0] * 1e9 * COMM_EFFICIENCY,
        nvlink_topology=getattr(gpu, "nvlink_topology", "switch") if gpu.nvlink_gbps > 0 else "switch",
        pcie_Bps=float(getattr(gpu, "pcie_gbps", 0.0) or 0.0) * 1e9 * COMM_EFFICIENCY,
        net_Bps=gpu.net_gbps / 8 * 1e9 * COMM_EFFICIENCY, hbm_Bps=gpu.hbm_gbps * 1e9,
        backend=be.name, zero12=be.zero12, compiled=compiled_, tp_overlap=tp_overlap, fsdp_overlap=be.fsdp_overlap,
        ep_overlap=be.ep_overlap, ep_node_dedup=be.ep_node_dedup, cp_overlap=be.cp_overlap, compute_scale=compute_scale, comm_scale=comm_scale,
        base_efficiency=be.base_efficiency, fp8_cast_full=cast_full, fp8_cast_sharded=cast_sharded,
        fp8_cast_tp1=cast_tp1, fp8_cast_tp_sharded=cast_tp_sharded, fp8_weight_cast=weight_cast,
        fp8_expert_weight_cast=expert_weight_cast,
        tp_gather_bytes=tp_gather, fp8_linear_sec_per_flop=fp8_lin,
        fp8_shape_stretch=lp_peak / peak if (fp8_parts and be.fp8_shape_stretch) else 1.0,
        tp_gather_unfused=(bool(fp8_parts) and be.fp8_cast_blocks_async_tp and tp_gather == ACT_BYTES),
        sac_regathers_tp=be.sac_regathers_tp,
        fp8_linear_shapes=_dense_linear_shapes(arch, fp8_parts),
        fp8_peak=lp_peak * clock_factor(gpu) if fp8_parts else 0.0,
        fp8_peak_ratio=lp_peak / peak if fp8_parts else 1.0,
        fp8_in_bytes=(NVFP4_ELEM_BYTES * (1 + 1 / NVFP4_BLOCK) if precision == NVFP4
                      else 1 + 1 / MX_BLOCK if recipe == "mxfp8" else 1.0),
        fp8_expert_align=FP8_GROUPED_GEMM_ALIGN.get(recipe, 16) if "experts" in fp8_parts else 0,
        offload_optimizer=offload_optimizer,
        offload_params=offload_params,
        host_Bps=(float(getattr(gpu, "pcie_gbps", 0.0) or 0.0) or OFFLOAD_PCIE_GBPS) * 1e9 * COMM_EFFICIENCY,
        gpus_per_host=max(1, int(gpu.gpus_per_node)),
    )


def _dense_linear_shapes(arch, parts=("attention", "mlp")) -> tuple[tuple[float, int, int, bool], ...]:
    """(K*N, K, N, column_parallel) of a dense block's fp8 linears (Llama: wq, wk, wv, wo of ``attention``,
    w1, w3, w2 of ``mlp``, as far as ``parts`` converts them). Megatron-LM
    tensor parallelism (Shoemaker et al. 2019, arXiv 1909.08053, sec. 3) splits the output dimension N of
    the column-parallel ones (wq, wk, wv, w1, w3) and the input dimension K of the row-parallel ones (wo, w2).
    MLA and MoE blocks: empty (their fp8 linears keep the d_model / tp width)."""
    if arch.mla is not None or arch.moe is not None:
        return ()
    d, q, kv, ff = arch.d_model, arch.n_heads * arch.hd, arch.kv_heads * arch.hd, arch.d_ff
    out = []
    if "attention" in parts:
        out += [(d, q, True), (d, kv, True), (d, kv, True), (q, d, False)]
    if "mlp" in parts:
        out += [(d, ff, True), (d, ff, True), (ff, d, False)]
    return tuple((float(k * n), k, n, col) for k, n, col in out)


def intra_node_gbps(gpu) -> tuple[float, str]:
    """(GB/s per GPU per direction, link) between GPUs of one node: NVLink / Infinity Fabric where the table
    has it; otherwise PCIe (``pcie_gbps``: L40S, RTX 4090, an H100 PCIe without its bridge), the path
    NCCL takes between GPUs without a GPU fabric (P2P through the PCIe switch, or through host memory;
    https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html, NCCL_P2P_LEVEL); with neither
    given, the node's network NIC (``net_gbps`` Gbit/s), the slowest path, so nothing divides by zero."""
    if gpu.nvlink_gbps > 0:
        return float(gpu.nvlink_gbps), "nvlink"
    pcie = float(getattr(gpu, "pcie_gbps", 0.0) or 0.0)
    if pcie > 0:
        return pcie, "pcie"
    return gpu.net_gbps / 8, "network"


def mfu_peak_dtype(precision: str) -> str:
    """The dtype whose dense peak MFU is quoted against: the precision's own, except bf16's for fp8 and nvfp4
    (convention: torchao float8 runs only the linears in fp8, and fp8 MFU is usually quoted against bf16 peak; nvfp4
    likewise converts only block linears)."""
    return "bf16" if precision in ("fp8", "nvfp4") else precision


def mfu_peak(gpu, precision: str) -> float:
    """The peak MFU is quoted against (:func:`mfu_peak_dtype`'s dense peak)."""
    from llmc.compiler.hardware import peak_flops

    return peak_flops(gpu, mfu_peak_dtype(precision))


def _stage_info(sm: StepModel, p: int, sched: str, v: int, ac: str,
                ac_layers: int = 0, loss_sliced: bool = False) -> tuple[int, float, float, float, int, int]:
    """(blocks on the slowest pipeline rank, its FLOPs/token incl. recompute, its recompute FLOPs/token,
    largest rank parameter count, most blocks on a rank, blocks of the slowest rank recomputed whole);
    cached on the StepModel.

    A rank's work per micro-batch is all of its chunks (interleaved schedules hold v chunks per rank),
    plus the output head where it holds it; the pipeline runs at the pace of the slowest rank. ``partial``
    recomputes the first ``ac_layers`` blocks of each chunk whole (memory.partial_recomputed). ``loss_sliced``: the
    rank with the head runs its forward again in the backward (``ParallelPlan.loss_chunk_tokens``).
    """
    key = (p, sched, v, ac, ac_layers, loss_sliced)
    hit = sm.cache.get(key)
    if hit is not None:
        return hit
    from llmc.compiler.memory import partial_recomputed, pipeline_layout

    layout = pipeline_layout(sm.n_layers, p, sched, v)
    blocks = [len(layers) for layers, _, _ in layout]
    if ac == "partial":
        whole = [len(r) for r in partial_recomputed(sm.n_layers, p, sched, v, ac_layers)]
        rec = sm.recompute_flops["full"] / sm.n_layers
        recs = [w * rec for w in whole]
    else:
        whole = blocks if ac == "full" else [0] * p
        rec = sm.recompute_flops[ac] / sm.n_layers
        recs = [n * rec for n in blocks]
    if loss_sliced:
        recs = [r + (sm.loss_recompute_flops if head else 0.0) for r, (_, _, head) in zip(recs, layout, strict=True)]
    load = [n * sm.layer_flops + r + (sm.head_flops if head else 0.0)
            for n, r, (_, _, head) in zip(blocks, recs, layout, strict=True)]
    params = [n * sm.layer_params + (sm.embed_params if emb else 0.0)
              + ((sm.head_params or sm.embed_params * (not emb)) if head else 0.0)
              for n, (_, emb, head) in zip(blocks, layout, strict=True)]
    i = max(range(p), key=lambda k: load[k])
    out = (blocks[i], load[i], recs[i], max(params), max(blocks), whole[i])
    sm.cache[key] = out
    return out


def efficiency(sm: StepModel, plan: ParallelPlan) -> float:
    """Achievable fraction of peak for this plan's GEMM shapes (heuristic, module docstring)."""
    return sm.base_efficiency * sm.compute_scale * _efficiency(sm, plan.micro_batch, plan.cp, plan.tp)


def _efficiency(sm: StepModel, mb: int, cp: int, tp: int, stretch: float = 1.0) -> float:
    """Shape penalty of the GEMMs. ``stretch`` > 1 for fp8 GEMMs: the half-points come from per-tile costs
    that do not shrink with the tensor-core rate (prologue/epilogue, scale loads, wave quantisation), so a
    kernel whose math runs ``speedup`` x faster needs ``speedup`` x the rows / width to amortise them."""
    tokens = mb * sm.seq_len / cp  # rows of every GEMM on this GPU
    width = sm.d_model / tp  # narrowest sharded GEMM dimension
    # the backend's base efficiency is already in sm.sec_per_flop; this is the shape penalty only
    eff = tokens / (tokens + TOKENS_HALF * stretch) * width / (width + WIDTH_HALF * stretch)
    return eff * MOE_EFFICIENCY if sm.is_moe else eff


def _roofline_gemm_s(m: float, k: float, n: float, fp8: bool, peak: float, hbm_Bps: float, mx: bool = False,
                     in_bytes: float | None = None) -> float:
    """torchao's float8 roofline of one GEMM (torchao/testing/float8/roofline_utils.py,
    get_individual_gemm_time_sympy): max(2 M K N / (peak x 0.78), HBM bytes / (bandwidth x 0.92)); the inputs
    are read in 1 B (fp8) or 2 B (bf16) per element, the output is written in bf16. ``peak``: the dtype's peak.
    ``mx``: MXFP8 also reads one 1-byte E8M0 scale per 32 input elements (torchao/testing/training/
    roofline_utils.py: num_scale_reads = num_reads // block_size). ``in_bytes``: a low-precision GEMM's bytes per
    input element, scales included (StepModel.fp8_in_bytes; NVFP4: 0.5 x (1 + 1/16), the same roofline's
    float4_e2m1fn_x2 case with block_size 16), in place of fp8's."""
    if in_bytes is None or not fp8:
        in_bytes = (1 + (1 / 32 if mx else 0.0)) if fp8 else ACT_BYTES
    compute = 2.0 * m * k * n / (peak * ROOFLINE_GEMM_FRACTION)
    memory = ((m * k + k * n) * in_bytes + m * n * ACT_BYTES) / (hbm_Bps * ROOFLINE_HBM_FRACTION)
    return max(compute, memory)


def fp8_roofline_penalty(sm: StepModel, mb: int, cp: int, tp: int) -> float:
    """How much slower than the fp8/bf16 peak ratio promises a dense block's fp8 linears run at this shape, by
    torchao's float8 roofline (:func:`_roofline_gemm_s`): the three GEMMs of each linear (output M x K x N,
    grad_input M x N x K, grad_weight K x M x N) at its TP-shard shape, M = the micro-batch's tokens on this GPU
    (sequence parallelism gathers the full sequence before the column-parallel GEMMs). A narrow shard leaves
    the fp8 GEMM bound by its bf16 output write, which does not shrink in fp8 (1.0 for large shapes).
    https://github.com/pytorch/ao/blob/main/torchao/float8/README.md (Performance, Derivation)."""
    if not sm.fp8_linear_shapes or not sm.fp8_peak:
        return 1.0
    key = ("fp8_roofline", mb, cp, tp)
    hit = sm.cache.get(key)
    if hit is not None:
        return hit
    m = mb * sm.seq_len / cp
    bf16_peak = sm.fp8_peak / sm.fp8_peak_ratio
    t_bf16 = t_fp8 = 0.0
    for _, k, n, col in sm.fp8_linear_shapes:
        k_, n_ = (k, n / tp) if col else (k / tp, n)
        for dims in ((m, k_, n_), (m, n_, k_), (k_, m, n_)):
            t_bf16 += _roofline_gemm_s(*dims, False, bf16_peak, sm.hbm_Bps)
            t_fp8 += _roofline_gemm_s(*dims, True, sm.fp8_peak, sm.hbm_Bps, in_bytes=sm.fp8_in_bytes)
    out = max(1.0, t_fp8 * sm.fp8_peak_ratio / t_bf16)
    sm.cache[key] = out
    return out


def _exposed(comm: float, window: float, overlap: float = OVERLAP) -> float:
    """Comm time left on the critical path when it may hide behind ``window`` of compute."""
    hidden_max = min(comm, window)
    return (comm - hidden_max) + (1.0 - overlap) * hidden_max


class LayoutTimer:
    """Step time of every (micro_batch, grad_accum, AC) for one layout (degrees, ZeRO, schedule).

    Everything that does not depend on the micro-batch or AC is computed once here, so the search
    can time thousands of candidates cheaply.
    """

    # the layout's own terms (first line) and those only its dp_shard x dp_replicate split changes (second line);
    # ``micro`` caches the per-micro-batch terms, which the split does not change (shared by with_split)
    _FAMILY = ("sm", "t", "p", "cp", "ep", "zero", "sched", "v", "chunks", "world", "bubble_slots", "pp_bw", "ep_bw",
               "cp_bw", "a2a_per_token", "dense_local", "expert_local", "ediv", "max_blocks", "micro")
    __slots__ = _FAMILY + ("ds", "dr", "one_pass", "fsdp_passes", "fsdp_latency", "per_step_comm", "optimizer",
                           "param_fetch", "owned")

    def __init__(self, sm: StepModel, tp: int, pp: int, cp: int, ep: int, dp_shard: int, dp_replicate: int,
                 zero_stage: int, pp_schedule: str = "1F1B", pp_virtual_stages: int = 1):
        self.sm, self.t, self.p, self.cp, self.ep = sm, tp, pp, cp, ep
        self.zero, self.sched = zero_stage, pp_schedule
        self.v = pp_virtual_stages if pp_schedule == "Interleaved1F1B" else 1  # for the bubble
        self.chunks = max(1, pp_virtual_stages)  # model chunks per rank (interleaved v, ZB-V 2)
        self.world = dp_replicate * dp_shard * cp * tp * pp
        self.micro: dict[tuple, tuple] = {}
        gpn = sm.gpus_per_node
        t, p = tp, pp
        if p == 1:
            self.bubble_slots = 0.0
        elif pp_schedule == "Interleaved1F1B":
            self.bubble_slots = (p - 1) / self.v
        elif pp_schedule == "ZBVZeroBubble":
            self.bubble_slots = (p - 1) * ZB_BUBBLE_FRACTION
        else:  # 1F1B, GPipe
            self.bubble_slots = float(p - 1)
        self.pp_bw = sm.p2p_Bps() if self.world <= gpn else sm.net_Bps
        # the consecutive ranks an EP group lies within (plan.ep_rank_span): torchtitan's is the ep ranks themselves
        # (ep, innermost of its expert mesh, takes the TP ranks in), the other profiles' ep x cp x tp
        span = ep_rank_span(t, cp, ep, sm.backend)
        self.ep_bw = sm.group_Bps(span) if span <= gpn else sm.net_Bps
        # seconds per (token x d_model x byte) of one all-to-all: each token goes to top_k experts spread over
        # the ep ranks. Within an NVLink domain: top_k (ep-1)/ep copies over NVLink. Across nodes, plain
        # all-to-all sends top_k (ep-g)/ep copies over the network (g = EP ranks per node) and the rest over
        # NVLink; with per-node deduplication (DeepEP / hierarchical dispatch: a token goes once to each
        # remote node holding one of its experts, then over NVLink, https://github.com/deepseek-ai/DeepEP,
        # DeepSeek-V3 report arXiv 2412.19437 sec. 3.2.2) the network copies are the expected number of
        # remote nodes hit, (n-1)(1 - (1 - 1/n)^top_k) for n nodes.
        k = sm.top_k
        if span <= gpn or ep <= 1:
            self.a2a_per_token = k * (ep - 1) / max(ep, 1) / sm.group_Bps(span) if ep > 1 else 0.0
        else:
            g = max(1, min(ep, gpn // max(1, span // ep)))  # EP ranks sharing a node
            n = max(1, ep // g)
            net_copies = (n - 1) * (1 - (1 - 1 / n) ** k) if sm.ep_node_dedup else k * (ep - g) / ep
            self.a2a_per_token = net_copies / sm.net_Bps + k * (g - 1) / ep / sm.group_Bps(g)
        self.cp_bw = sm.group_Bps(cp) if cp * t <= gpn else sm.net_Bps

        # parameters this GPU holds before data-parallel sharding (heaviest stage)
        _, _, _, p_stage, max_blocks, _ = _stage_info(sm, p, pp_schedule, self.chunks, "none")
        n_experts_stage = max_blocks * sm.expert_params_per_layer * (sm.n_moe_layers / sm.n_layers)
        self.dense_local = (p_stage - n_experts_stage) / t
        self.ediv = _expert_divisor(sm.backend, t, cp, ep)
        self.expert_local = n_experts_stage / self.ediv  # the routed experts before FSDP / ZeRO
        self.max_blocks = max_blocks
        self._split(dp_shard, dp_replicate)

    def with_split(self, dp_shard: int, dp_replicate: int) -> LayoutTimer:
        """This layout with another dp_shard x dp_replicate split of the same data-parallel size (equal to a new
        ``LayoutTimer`` of it; the terms the split does not change, and their cache, are shared)."""
        if dp_shard * dp_replicate * self.cp * self.t * self.p != self.world:
            raise ValueError("with_split keeps the data-parallel size")
        new = object.__new__(LayoutTimer)
        for k in LayoutTimer._FAMILY:
            setattr(new, k, getattr(self, k))
        new._split(dp_shard, dp_replicate)
        return new

    def _split(self, dp_shard: int, dp_replicate: int) -> None:
        """The data-parallel terms: FSDP / ZeRO traffic, the replicas' all-reduce, the optimizer update."""
        sm, t, p, cp, ep, zero_stage = self.sm, self.t, self.p, self.cp, self.ep, self.zero
        self.ds, self.dr = dp_shard, dp_replicate
        gpn, max_blocks = sm.gpus_per_node, self.max_blocks
        dense_local, expert_local = self.dense_local, self.expert_local
        # torchtitan shards over dp_shard x cp jointly; the routed experts over the rest of their mesh
        # (plan.expert_shards: efsdp = dp_shard x cp x tp / ep on torchtitan, (dp_shard x cp) / ep elsewhere)
        n_sh = dp_shard * cp
        n_esh = expert_shards(dp_shard, cp, t, ep, sm.backend)[1]
        shard_net = n_sh * t > gpn
        shard_bw = sm.net_Bps if shard_net else sm.group_Bps(n_sh)
        vol = ACT_BYTES * (dense_local * (n_sh - 1) / n_sh + expert_local * (n_esh - 1) / n_esh)
        self.one_pass = vol / shard_bw if n_sh > 1 else 0.0
        self.fsdp_passes = 0
        self.fsdp_latency = 0.0
        self.per_step_comm = 0.0
        hop = HOP_LATENCY_NET if shard_net else HOP_LATENCY_NVLINK
        fsdp2 = zero_stage in (1, 2) and sm.zero12 == "fsdp2"
        if zero_stage == 3 and n_sh > 1 and p == 1:
            # FSDP2 with gradient accumulation: all-gather before forward and before backward,
            # reduce-scatter after backward, every micro-batch; one collective per FSDP unit (block),
            # each paying (n-1) ring hops of latency
            self.fsdp_passes = 3
            self.fsdp_latency = self.fsdp_passes * (max_blocks + 1) * (n_sh - 1) * hop
        elif fsdp2 and n_sh > 1 and p == 1:
            # ZeRO-1/2 as FSDP2 keeping the gathered parameters (backends.Backend.zero12): all-gather before each
            # micro-batch's forward, reduce-scatter after its backward
            self.fsdp_passes = 2
            self.fsdp_latency = self.fsdp_passes * (max_blocks + 1) * (n_sh - 1) * hop
        elif (zero_stage == 3 or fsdp2) and n_sh > 1:
            # under pipelining torchtitan keeps the stage unsharded (reshard_after_forward=False) and
            # torch.distributed.pipelining reduces gradients once, after the last micro-batch: one
            # all-gather + one reduce-scatter per step (memory.py holds the unsharded stage likewise)
            self.per_step_comm += 2 * self.one_pass + 2 * (max_blocks + 1) * (n_sh - 1) * hop
        elif n_sh > 1 and zero_stage == 2 and sm.zero12 == "deepspeed":
            # DeepSpeed ZeRO-2 reduces into the gradient partitions every micro-batch; parameters gathered once
            self.fsdp_passes = 1
            self.per_step_comm += self.one_pass
        elif n_sh > 1:
            self.per_step_comm += 2 * self.one_pass  # ZeRO-1/2: reduce-scatter grads + all-gather params, once
        if dp_replicate > 1:
            shard_bytes = ACT_BYTES * (dense_local / n_sh + expert_local / n_esh)
            bw = sm.group_Bps(dp_replicate) if n_sh * t * dp_replicate <= gpn else sm.net_Bps
            self.per_step_comm += 2 * (dp_replicate - 1) / dp_replicate * shard_bytes / bw
        # (torchtitan shards its routed experts over efsdp whatever the stage: memory._static_runs)
        e_sharded = zero_stage >= 1 or sm.backend in EP_SPANS_TP
        owned = (dense_local / n_sh if zero_stage >= 1 else dense_local) + (expert_local / n_esh if e_sharded
                                                                            else expert_local)
        self.owned = owned  # parameters whose optimizer state this GPU holds (heaviest stage; checkpoint_cost.py)
        # ZeRO-Infinity: the owned 16-bit partition crosses the host link before each gather of a micro-batch
        self.param_fetch = (PARAM_FETCHES_PER_MICRO_BATCH * ACT_BYTES * owned / sm.host_Bps
                            if sm.offload_params else 0.0)
        if sm.offload_optimizer:  # ZeRO-Offload: PCIe both ways, then the node's CPUs update every rank's share
            pcie = OFFLOAD_PCIE_BYTES_PER_PARAM - (ACT_BYTES if sm.offload_params else 0)  # params stay on the host
            self.optimizer = (owned * pcie / sm.host_Bps
                              + owned * min(sm.gpus_per_host, self.world) / CPU_ADAM_PARAMS_PER_S)
        else:
            self.optimizer = owned * ADAM_BYTES_PER_PARAM / sm.hbm_Bps

    def time(self, mb: int, m: int, ac: str, breakdown: bool = False, ac_layers: int = 0,
             loss_sliced: bool = False):
        """(step seconds, MFU[, breakdown]) for micro_batch ``mb``, ``m`` micro-batches, AC ``ac`` (``partial``:
        the first ``ac_layers`` blocks of each model chunk recomputed whole), the loss in slices or not."""
        sm = self.sm
        key = (mb, ac, ac_layers, loss_sliced)
        hit = self.micro.get(key)
        if hit is None:
            hit = self.micro[key] = self._micro(mb, ac, ac_layers, loss_sliced)
        compute, recompute, elem, tp_comm, ep_comm, cp_comm, pp_comm = hit
        fsdp = 0.0
        if self.fsdp_passes or self.param_fetch:
            fsdp = _exposed(self.fsdp_passes * self.one_pass + self.fsdp_latency + self.param_fetch, compute,
                            sm.fsdp_overlap)
        dp = _exposed(self.per_step_comm, compute, sm.fsdp_overlap)
        if sm.compute_scale != 1.0 or sm.comm_scale != 1.0:
            # calibration (calibration.py): compute parts / compute_scale, exposed communication x comm_scale,
            # applied to the model's own split so that the fitted linear model is exactly what is reported
            a, b = 1.0 / sm.compute_scale, sm.comm_scale
            compute, recompute, elem = compute * a, recompute * a, elem * a
            tp_comm, ep_comm, cp_comm, pp_comm, fsdp, dp = (x * b for x in (tp_comm, ep_comm, cp_comm, pp_comm,
                                                                             fsdp, dp))
        t_micro = compute + tp_comm + ep_comm + cp_comm + pp_comm + fsdp
        bubble = self.bubble_slots * t_micro
        step = m * t_micro + bubble + dp + self.optimizer
        world = self.world
        tokens_step = mb * m * (self.ds * self.dr) * sm.seq_len
        mfu = tokens_step * sm.flops_per_token / (step * world * sm.peak)
        if not breakdown:
            return step, mfu
        return step, mfu, {
            "compute": m * (compute - recompute - elem), "elementwise": m * elem, "recompute": m * recompute, "tp_comm": m * tp_comm,
            "ep_comm": m * ep_comm, "cp_comm": m * cp_comm, "pp_p2p": m * pp_comm, "fsdp_comm": m * fsdp,
            "pp_bubble": bubble, "dp_comm": dp, "optimizer": self.optimizer,
        }

    def _micro(self, mb: int, ac: str, ac_layers: int = 0,
               loss_sliced: bool = False) -> tuple[float, float, float, float, float, float, float]:
        """One micro-batch of the slowest pipeline rank, uncalibrated: (compute incl. recompute and elementwise,
        recompute, elementwise, TP, EP, CP and PP communication seconds); the same for every split. Every
        per-block term of a block recomputed whole (``full``, or one of ``partial``'s) runs its forward part
        again; the other blocks' terms are those without recomputation."""
        sm, t, p, cp, ep = self.sm, self.t, self.p, self.cp, self.ep
        n_slow, flops_tok, rec_tok, _, _, n_whole = _stage_info(sm, p, self.sched, self.chunks, ac, ac_layers,
                                                                loss_sliced)
        tokens_gpu = mb * sm.seq_len / cp  # tokens of this GPU's sequence shard per micro-batch
        eff = _efficiency(sm, mb, cp, t)
        spf = sm.sec_per_flop / eff
        if sm.fp8_linear_sec_per_flop:  # fp8 linears: their own shape penalty and torchao's roofline
            eff8 = eff if sm.fp8_shape_stretch == 1.0 else _efficiency(sm, mb, cp, t, sm.fp8_shape_stretch)
            spf += sm.fp8_linear_sec_per_flop * (fp8_roofline_penalty(sm, mb, cp, t) / eff8 - 1.0 / eff)
        scale = tokens_gpu / t * spf
        # memory-bound ops, split over tp by sequence parallelism; full AC runs the forward part again
        cast, weight_cast = _cast_bytes(sm, tokens_gpu, t, self.ediv)
        elem_bytes = tokens_gpu / t * sm.elementwise_bytes + cast + weight_cast
        elem = (n_slow + n_whole / 3) * elem_bytes / sm.hbm_Bps
        compute = flops_tok * scale + elem
        recompute = rec_tok * scale
        tp_comm = 0.0
        if t > 1:
            # sequence parallelism: per block 2 all-gathers + 2 reduce-scatters forward (again when the forward
            # is recomputed) and backward, each (t-1)/t of the tensor: "4 all-reduces" of b*s*h bytes; the
            # gathers move tp_gather_bytes per element (fp8 with torchtitan's tensorwise float8 TP)
            # Async TP / comm-GEMM overlap hides tp_overlap of each collective it can fuse with its GEMM; an
            # all-gather whose result is first cast to fp8 (torchao rowwise float8: bf16 gathers) feeds no GEMM
            # and stays exposed (PyTorch micro-pipeline TP, torch/_inductor/fx_passes/micro_pipeline_tp.py fuses
            # only the matmuls that consume the all-gather result)
            # all-gathers (and as many reduce-scatters) per block: 4, and 2 more in a block recomputed whole
            n_coll = 4 * n_slow + 2 * n_whole
            # torchtitan's per-op SAC saves no all-gather output: the backward gathers the attention and MLP inputs
            # again (backends.py, sac_regathers_tp); their consumers are the recomputed forward GEMMs, as in full AC
            n_ag = n_coll + (2 * n_slow if ac == "selective" and sm.sac_regathers_tp else 0)
            ag, rs = n_ag * sm.tp_gather_bytes, n_coll * ACT_BYTES
            per_elem = ag + rs - sm.tp_overlap * (rs + (0.0 if sm.tp_gather_unfused else ag))
            tp_comm = tokens_gpu * sm.d_model * per_elem * (t - 1) / t / sm.group_Bps(t)
        ep_comm = 0.0
        # each rank dispatches tokens_gpu / t tokens: torchtitan hands the routed experts each TP rank's own sequence
        # shard with EP (models/common/moe_sharding.py _routed_experts_sharding_configs: experts_input_layout =
        # dense_sequence_parallel_placement(), so the TP ranks hold different tokens; the EP group may include them)
        if ep > 1 and sm.n_moe_layers:  # 4 all-to-alls per MoE block (+2 with full recompute)
            ep_comm = (4 * n_slow + 2 * n_whole) * sm.n_moe_layers / sm.n_layers * self.a2a_per_token \
                * tokens_gpu / t * sm.d_model * ACT_BYTES
            ep_comm *= 1.0 - sm.ep_overlap
        cp_comm = 0.0
        if cp > 1:  # ring attention: (cp-1) hops of the local K/V forward, 2x that backward
            kv = tokens_gpu * sm.kv_bytes_per_token_layer / t
            cp_comm = (1 - sm.cp_overlap) * n_slow * 3 * (cp - 1) * kv / self.cp_bw
        pp_comm = 0.0
        if p > 1:  # activations out + gradients back per boundary, v times when interleaved
            pp_comm = 2 * self.chunks * tokens_gpu * sm.d_model * ACT_BYTES / t / self.pp_bw
        return compute, recompute, elem, tp_comm, ep_comm, cp_comm, pp_comm


def _expert_divisor(backend: str, t: int, cp: int, ep: int) -> int:
    """Routed-expert parameters per rank before FSDP / ZeRO = theirs / this: torchtitan's (plan.expert_shards: ep
    with EP, else tp); the other profiles split them over tp as well as ep (Megatron-Core's expert tensor parallelism
    defaults to TP: plan.EP_SPANS_TP)."""
    if backend in EP_SPANS_TP:
        return expert_shards(1, cp, t, ep, backend)[0]
    return t * max(1, ep)


def _cast_bytes(sm: StepModel, tokens_gpu: float, t: int, ediv: int) -> tuple[float, float]:
    """HBM bytes per block per micro-batch of the low-precision (fp8 / nvfp4) casts on one GPU: (the activations'
    and gradients', which scale with the micro-batch's tokens; the weights', the same for any micro-batch: each
    micro-batch's forward casts the local weights again; ``ediv``: the routed experts' divisor, _expert_divisor).
    0 for bf16."""
    if t > 1:
        act = tokens_gpu * sm.fp8_cast_full + tokens_gpu / t * (sm.fp8_cast_sharded + sm.fp8_cast_tp_sharded)
    else:
        act = tokens_gpu * (sm.fp8_cast_tp1 + sm.fp8_cast_sharded)
    return act, sm.fp8_weight_cast / t + sm.fp8_expert_weight_cast / ediv


def cast_seconds(sm: StepModel, plan: ParallelPlan) -> tuple[float, float]:
    """(weight casts, activation and gradient casts): the seconds per optimizer step of the low-precision casts
    on the slowest pipeline rank, part of the breakdown's ``elementwise`` term (:meth:`LayoutTimer._micro`, with
    the calibration's compute scale). The weight casts are paid once per micro-batch whatever its size, so many
    small micro-batches (a long ``grad_accum``) multiply them."""
    n_slow, _, _, _, _, n_whole = _stage_info(sm, plan.pp, plan.pp_schedule, max(1, plan.pp_virtual_stages),
                                              plan.activation_checkpointing, plan.ac_layers,
                                              plan.loss_chunk_tokens > 0)
    act, weight = _cast_bytes(sm, plan.micro_batch * sm.seq_len / plan.cp, plan.tp,
                              _expert_divisor(sm.backend, plan.tp, plan.cp, plan.ep))
    per_byte = plan.grad_accum * (n_slow + n_whole / 3) / sm.hbm_Bps / sm.compute_scale
    return weight * per_byte, act * per_byte


def layout_timer(sm: StepModel, plan: ParallelPlan) -> LayoutTimer:
    return LayoutTimer(sm, plan.tp, plan.pp, plan.cp, plan.ep, plan.dp_shard, plan.dp_replicate,
                       plan.zero_stage, plan.pp_schedule, plan.pp_virtual_stages)


def step_time(sm: StepModel, plan: ParallelPlan) -> tuple[float, float, dict[str, float]]:
    """(step seconds, MFU, breakdown) of one optimizer step of ``plan``; the breakdown sums to the step."""
    return layout_timer(sm, plan).time(plan.micro_batch, plan.grad_accum, plan.activation_checkpointing, True,
                                       plan.ac_layers, plan.loss_chunk_tokens > 0)


def time_numbers(sm: StepModel, plan: ParallelPlan, steps: int, checkpoint=None) -> TimeNumbers:
    """:class:`TimeNumbers` for ``steps`` optimizer steps of ``plan``; ``checkpoint`` (a
    :class:`~llmc.compiler.result.CheckpointNumbers`, ``checkpoint_cost.checkpoint_numbers``): the run's saves,
    whose stalls the days include: days = (steps x step + checkpoint.total_seconds) / 86400. Step time, MFU and
    tokens/s stay those of a training step."""
    step, mfu, br = step_time(sm, plan)
    tokens_step = plan.global_batch_seqs * sm.seq_len
    stalls = checkpoint.total_seconds if checkpoint is not None else 0.0
    return TimeNumbers(
        step_seconds=step, mfu=mfu, days=(step * steps + stalls) / 86400.0, steps=steps,
        tokens_per_second=tokens_step / step, breakdown=br, checkpoint=checkpoint,
    )


def days_at_mfu(training_flops: float, n_gpus: int, peak: float, mfu: float) -> float:
    """Wall-clock days of ``training_flops`` at a given MFU: C / (n * peak * MFU)."""
    return training_flops / (n_gpus * peak * mfu) / 86400.0


def gpu_hours(days: float, n_gpus: int) -> float:
    return days * 24.0 * n_gpus


def usd(gpu_hours_: float, usd_per_gpu_hour: float) -> float:
    """cost = n_gpu x hours x price."""
    return gpu_hours_ * usd_per_gpu_hour


def gpus_for_days(training_flops: float, days: float, peak: float, mfu: float) -> int:
    """Fewest GPUs that finish ``training_flops`` within ``days`` at ``mfu``."""
    return math.ceil(training_flops / (days * 86400.0 * peak * mfu))
