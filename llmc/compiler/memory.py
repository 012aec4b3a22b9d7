"""Per-GPU training memory: model states (weights, grads, optimizer), activations and buffers.

Everything is in bytes and per pipeline stage; ``per_gpu_bytes`` is the peak stage. Pure arithmetic.

Model states (Rajbhandari et al. 2020, "ZeRO", arXiv 1910.02054, sec. 3.1 and Figure 1)
    mixed-precision AdamW: 2 B bf16 weights + 2 B bf16 grads + K=12 B optimizer (fp32 master, m, v)
    = 16 B/param. ZeRO-1 shards the optimizer over the data-parallel shard group N_d (4 + 12/N_d),
    ZeRO-2 also the grads (2 + 14/N_d), ZeRO-3/FSDP also the weights (16/N_d). The replicate dimension
    of HSDP (``dp_replicate``) does not shard. The shard group is dp_shard x cp (torchtitan's FSDP mesh
    ``dp_shard_cp``: context-parallel ranks hold the same weights, so FSDP shards over them too).
    fp32 training: weights are the master copy -> 4 + 4 + (K - 4). fp8 (torchao float8): parameters stay
    bf16/fp32 exactly as for bf16 (the fp8 casts are transient), so model states are the bf16 ones. nvfp4
    (torchtitan's NVFP4Linear over torchao's nvfp4_training) likewise keeps the bf16 weight; what its GEMMs save for
    the backward (torchao nvfp4_mm_triton: the input's column-wise NVFP4 codes and the weight's, 0.5 + 1/16 B per
    element, instead of the bf16 input) is not modelled: activations are sized as bf16's.
    ``grad_bytes_per_param=4`` models fp32 gradient accumulation; 6 = bf16 grads + an fp32 copy (what
    DeepSpeed's estimator assumes for ZeRO-2: 18 = 2 + 4 + 12).
    Offloaded optimizer (ZeRO-Offload, Ren et al. 2021): the fp32 master/m/v and the fp32 grads live on
    the CPU; the GPU keeps the bf16 weights (DeepSpeed estimator: ZeRO-2 offload GPU = 2P).

Tensor / expert / pipeline sharding of the states
    Attention and MLP matmul weights (and Qwen q/k/v biases) / tp (Megatron column/row parallel);
    token embedding and output head / tp (torchtitan shards both along the vocabulary: vocab-parallel
    embedding + loss_parallel); norms, the MoE router and MLA's small down-projections (wq_a, wkv_a) are
    replicated over tp. Routed experts (``plan.expert_shards``): on torchtitan 0.3.0 the expert mesh (efsdp, ep)
    covers the dp_shard x cp x tp ranks (parallel_dims.py: efsdp = dp_shard x cp x tp / ep), so with EP they are
    / ep (not tp-sharded: no expert tensor parallelism) and FSDP shards them over efsdp; without EP they are / tp
    (moe_sharding.py expert_param_placement_dense) and sharded over dp_shard x cp: dp_shard x cp x tp ways in every
    layout (ZeRO-3). llmc's other profiles: / ep, the remaining shard group (dp_shard x cp) / ep. Pipeline: each
    stage holds its blocks; the embedding lives on the first stage, the final norm and output head on the
    last (a tied embedding is held by both when pp > 1).

Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
arXiv 2205.05198, sec. 4.1 and Table 2) -- see :func:`layer_activation_bytes_per_token` for the
SwiGLU/GQA/MLA/MoE derivation and :func:`korthikanti_layer_bytes` for the paper's GPT formula.
    Sharded / tp with sequence parallelism (torchtitan turns SP on with TP), / cp for context parallel; on a
    backend without SP (``Backend.sequence_parallel``: llmc's native trainer) the norms' activations and the
    head's inputs stay whole on every TP rank (Table 2's "tensor parallel" row: :func:`_replicated_per_token`).
    Pipeline: stage i of p with 1F1B keeps min(p - i, m) micro-batches in flight (Narayanan et al. 2021,
    "Efficient Large-Scale Language Model Training on GPU Clusters", sec. 2.2.1); interleaved 1F1B with v
    chunks per rank multiplies by (1 + (p - 1)/(p v)) (Korthikanti et al. 2022 sec. 4.2.3); GPipe keeps
    all m micro-batches.

Buffers: FSDP all-gather/reduce-scatter buffers (two unsharded units in bf16 for current + prefetch, one
unit's fp32 gradient before reduce-scatter, torchtitan reduce_dtype=fp32); with pipeline parallelism
torchtitan keeps the whole stage unsharded (no reshard after forward, gradients accumulated unsharded in
fp32 until the last micro-batch), i.e. FSDP+PP costs (2 + 4) B per stage-local parameter; ZeRO-1/2
(``Backend.zero12``): FSDP2 keeping the gathered parameters, one unit's fp32 gradient before its
reduce-scatter; DeepSpeed, its reduce buffers under llmc's ds_config (``backends.ds_reduce_buffer_bytes``; ZeRO-3
``backends.ds_zero3_buffer_bytes``: DeepSpeed gathers and reduces tensor by tensor, so its largest tensor counts); the
reference profiles, reduce and all-gather buckets of DeepSpeed's default 5e8 elements; DDP buckets (25 MiB); the fp32
logits/loss peak on the last stage (12 B per token per vocab entry, see LOGITS_BYTES_PER_ELEM); 1 GiB
workspace (CUDA context, cuBLAS workspace, NCCL). A loss computed in slices (``plan.loss_chunk_tokens``: llmc's
trainers, the head and cross-entropy of each slice recomputed in the backward) holds one slice's logits; a backend
with a chunked loss (``Backend.loss_chunks``: torchtitan 0.3.0's ChunkedLossWrapper) one chunk's, plus the hidden
states cut into chunks and their fp32 gradient (``loss_logits_bytes``). A sliding window shorter than the sequence:
the additive band mask llmc's model hands SDPA, seq_len^2 elements in the activation dtype, one tensor shared by every
layer and kept for the backward (``window_mask_bytes``).
Context parallelism on torchtitan (FlexAttention: each layer's K and V all-gathered to the whole sequence,
``cp_gathered_kv_bytes``): the gathered K/V of every block whose activations are kept, and the layer being
back-propagated's gathered K/V gradients (and re-gathered K/V when recomputed).
Not modelled: allocator fragmentation on the ``generic`` profile (``fits`` keeps 8% headroom there; a backend profile's
reserved bytes are fitted on measured peaks, fragmentation included), ring-attention K/V exchange buffers (CP on the
reference profiles, ``cp_attention="ring"``), MoE load imbalance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from llmc.compiler.backends import (
    activation_mode,
    compile_on,
    ds_reduce_buffer_bytes,
    ds_zero3_buffer_bytes,
    fit_headroom,
    get_backend,
)
from llmc.compiler.params import expert_d_ff, is_moe_layer, largest_tensor, layer_components
from llmc.compiler.plan import EP_SPANS_TP, ParallelPlan, expert_shards
from llmc.compiler.result import MemoryNumbers
from llmc.compiler.units import GiB, MiB
from llmc.spec.families import family_of
from llmc.spec.model import Architecture
from llmc.spec.schema import AC_MODES

# the backend-neutral profile's device memory outside the allocator (CUDA context + cuBLAS workspace + NCCL), the
# workspace every ``generic`` plan counts; the backend profiles have their own (backends.Backend.cuda_context_bytes)
WORKSPACE_BYTES = get_backend("generic").cuda_context_bytes
DS_BUCKET_ELEMS = 500_000_000  # DeepSpeed reduce_bucket_size / allgather_bucket_size defaults (5e8)
DDP_BUCKET_BYTES = 25 * MiB  # torch DDP bucket_cap_mb default
# ZeRO-Offload keeps on the host, per parameter a rank owns: the fp32 master weight (4), AdamW's two moments (8)
# and the fp32 gradient the host update reads (4) (Ren et al. 2021, arXiv:2101.06840 sec. 4; DeepSpeed's
# estimate_zero3_model_states_mem_needs with zero_init: 16 x params / nodes per node)
OFFLOAD_HOST_BYTES_PER_PARAM = 16
# ... and with parameter offload (ZeRO-Infinity to CPU) also its bf16 parameter partition (2): DeepSpeed's
# estimate_zero3_model_states_mem_needs with cpu_offload_params and zero_init: 18 x params / nodes per node
OFFLOAD_PARAM_HOST_BYTES_PER_PARAM = 2
# Loss memory per token per vocabulary entry on the last stage. torchtitan computes
# cross_entropy(pred.float(), labels): log_softmax keeps its fp32 output (4 B, the "s*b*V*4 fp32 logits"),
# and the peak comes at the start of the backward, while all activations are still alive: nll_loss's dense
# fp32 gradient (4) + the saved log-probs (4) + log_softmax's fp32 input gradient (4) = 12 B
# (the forward peak is 2 bf16 logits + 4 fp32 copy + 4 log-probs = 10 B). Vocab-parallel: / tp.
LOGITS_BYTES_PER_ELEM = 12
SOFTMAX_FP32_BYTES = 4.0  # a softmax computed in fp32 (dtype=torch.float32) keeps its fp32 output
# With the loss compiled (torchtitan compile.components includes "loss"), Inductor fuses the upcast,
# log_softmax and nll_loss: only the bf16 logits (2 B) and their bf16 gradient (2 B) exist at the peak.
LOGITS_COMPILED_BYTES_PER_ELEM = 4
# torchtitan's ChunkedLossWrapper runs each chunk's backward while its loop still references the chunk's bf16 logits,
# so an eager loss holds them (2 B) on top of LOGITS_BYTES_PER_ELEM (the compiled loss's 4 B already count them).
# Measured with torchtitan 0.3.0's wrapper on CPU: 14.0 B per element of a chunk (tests/test_memory.py).
CHUNKED_LOSS_LOGITS_BYTES = 2
# Logits bytes one slice of a sliced loss holds at most (``ParallelPlan.loss_chunk_tokens``): small next to a GPU,
# while slices of hundreds of tokens keep the head's GEMM large (512 x d x V for Llama 3's 128K vocabulary).
LOSS_SLICE_BYTES = 1 * GiB


def loss_slice_tokens(vocab_size: int) -> int:
    """Tokens per slice of a sliced loss: the largest power of two whose logits (LOGITS_BYTES_PER_ELEM per entry)
    fit in LOSS_SLICE_BYTES."""
    n = max(1, LOSS_SLICE_BYTES // (vocab_size * LOGITS_BYTES_PER_ELEM))
    return 1 << (n.bit_length() - 1)


def loss_logits_bytes(vocab_size: int, tokens: float, plan: ParallelPlan, *, compiled: bool = False,
                      chunks: int = 1, d_model: int = 0, act_bytes: float = 2.0, softcapped: bool = False) -> float:
    """The logits / loss peak of a micro-step of ``tokens`` tokens on the rank holding the head: one slice's when the
    plan slices the loss (``plan.loss_chunk_tokens``: llmc's trainers), one of ``chunks`` equal slices' with the
    backend's chunked loss (``Backend.loss_chunks``: torchtitan's ChunkedLossWrapper), else the whole micro-step's;
    LOGITS_BYTES_PER_ELEM per vocab entry (LOGITS_COMPILED_BYTES_PER_ELEM with the loss compiled), vocab-parallel
    over tp. The chunked loss also holds the hidden states cut into slices (a copy, ``act_bytes`` per element) and
    their fp32 gradient (GradAccumulator), whole on every tp rank (the head's input is replicated on the TP axis).
    ``softcapped`` (``final_logit_softcap``, llmc.runtime.model.Transformer._head): tanh keeps its output, ``act_bytes``
    per logit, until the backward reaches it."""
    per_elem, extra = (LOGITS_COMPILED_BYTES_PER_ELEM if compiled else LOGITS_BYTES_PER_ELEM), 0.0
    if softcapped:
        per_elem += act_bytes
    if plan.loss_chunk_tokens:
        tokens = min(tokens, plan.loss_chunk_tokens)
    elif chunks > 1:
        extra = tokens * d_model * (act_bytes + 4.0)
        tokens = tokens / chunks
        per_elem += 0 if compiled else CHUNKED_LOSS_LOGITS_BYTES
    return tokens * vocab_size * per_elem / plan.tp + extra

# ----------------------------------------------------------------------------- parameter groups

#: how each labelled component (params.layer_components / param_breakdown) is sharded
_TP_SHARDED = {
    "attn/wq", "attn/wkv", "attn/wo", "attn/bias",
    "mla/wq", "mla/wq_b", "mla/wkv_b", "mla/wo",
    "mlp/dense", "moe/shared",
}  # fmt: skip
_EXPERT = {"moe/experts"}
_VOCAB = {"embed/tok", "head/output"}


def _group(label: str) -> str:
    if label in _TP_SHARDED:
        return "tp"
    if label in _EXPERT:
        return "expert"
    if label in _VOCAB:
        return "vocab"
    return "replicated"  # norms, router, expert bias, mla/wq_a, mla/q_norm, mla/wkv_a, mla/kv_norm


SINGLE_STAGE_SCHEDULES = ("1F1B", "GPipe")  # one model chunk per pp rank (torchtitan PipelineScheduleSingle)


def _default_virtual(schedule: str) -> int:
    """torchtitan ``_get_pipeline_metadata``: 1 chunk per rank for single-stage schedules, 2 otherwise."""
    return 1 if schedule in SINGLE_STAGE_SCHEDULES else 2


def even_parts(n_layers: int, n_parts: int) -> list[int]:
    """Layers per part when llmc passes an explicit split (render_torchtitan._pp_module_fqns): as even
    as possible, the remainder to the middle parts first, then the first, then the last. With one or two
    parts more than blocks, the last part, then also the first, gets none: it holds only the norm and head
    (the embedding). This is Megatron-LM's ``account_for_loss_in_pipeline_split`` /
    ``account_for_embedding_in_pipeline_split`` layout, which Megatron-Bridge's Llama 3.1 405B recipes use at
    pp 16 x 8 virtual stages (126 blocks + 2), and torchtitan builds such chunks from the same module lists
    (``_split_module`` keeps an empty ``layers`` dict)."""
    base, extra = divmod(n_layers, n_parts)
    counts = [base] * n_parts
    order = list(range(1, n_parts - 1)) + [0, n_parts - 1] if n_parts > 2 else list(range(n_parts))
    for i in order[:extra]:
        counts[i] += 1
    return counts


def _titan_parts(
    n_layers: int, n_parts: int, input_weight: int = 1, output_weight: int = 1
) -> list[int] | None:
    """Layers per part of torchtitan's automatic split (``_generate_llm_fqn_per_model_part``): the
    embedding and the norm + head count as ``input_weight`` / ``output_weight`` layers, n_layers + both
    weights are spread evenly with the remainder on the first parts. None where torchtitan would refuse."""
    eff = n_layers + input_weight + output_weight
    per, extra = divmod(eff, n_parts)
    if n_parts > eff or per == 0 or input_weight > per or output_weight > per:
        return None
    counts, left = [], n_layers
    for k in range(n_parts):
        c = per + (1 if k < extra else 0)
        if k == 0:
            c -= input_weight
        elif k == n_parts - 1:
            c -= output_weight
        c = min(c, left)
        counts.append(c)
        left -= c
    return counts


@lru_cache(maxsize=4096)
def _parts_owners(n_layers: int, pp: int, schedule: str, virtual: int) -> tuple[tuple, tuple]:
    """(blocks of every model chunk, chunk indices held by each pp rank): see :func:`pipeline_layout`."""
    if pp < 1 or virtual < 1:
        raise ValueError("pp and virtual stages must be >= 1")
    n_parts = pp * virtual
    if n_parts > n_layers + 2:
        raise ValueError(f"{n_parts} pipeline chunks exceed n_layers + 2 = {n_layers + 2} (every chunk needs a block, "
                         "except a first one of only the embedding and a last one of only the norm and head)")
    if n_parts == 1:
        return (tuple(range(n_layers)),), ((0,),)
    counts = None
    if virtual == _default_virtual(schedule):
        counts = _titan_parts(n_layers, n_parts)
    if counts is None or sum(counts) != n_layers:
        counts = even_parts(n_layers, n_parts)
    parts, start = [], 0
    for c in counts:
        parts.append(tuple(range(start, start + c)))
        start += c
    if schedule == "ZBVZeroBubble" and virtual == 2:
        owners = [(r, 2 * pp - 1 - r) for r in range(pp)]
    else:
        owners = [tuple(r + k * pp for k in range(virtual)) for r in range(pp)]
    return tuple(parts), tuple(owners)


def pipeline_chunks(n_layers: int, pp: int, schedule: str = "1F1B", virtual: int = 1) -> tuple[tuple[int, ...], ...]:
    """The blocks of every pipeline model chunk, in stage order (the first chunk also holds the embedding, the last
    the norm and head; either may hold no block): see :func:`pipeline_layout`."""
    return _parts_owners(n_layers, pp, schedule, virtual)[0]


@lru_cache(maxsize=1024)
def pipeline_layout(
    n_layers: int, pp: int, schedule: str = "1F1B", virtual: int = 1
) -> tuple[tuple[tuple[int, ...], bool, bool], ...]:
    """Per pp rank: (blocks it holds, holds the embedding, holds the final norm + output head).

    Mirrors what llmc's torchtitan job does: with the schedule's default number of chunks per rank
    (1 for 1F1B/GPipe, 2 for Interleaved1F1B/ZBV) torchtitan splits automatically
    (``_generate_llm_fqn_per_model_part`` with first/last_stage_less_layers = 1); otherwise llmc passes
    an explicit even split. Chunks map to ranks "loop"-style (rank r holds chunks r, r + pp, ...) or, for
    ZBVZeroBubble, "v"-style (rank r holds chunks r and 2pp - 1 - r, so rank 0 has embedding and head)
    -- torchtitan ``_get_pp_rank_to_stage_indices_mapping``.
    """
    parts, owners = _parts_owners(n_layers, pp, schedule, virtual)
    n_parts = len(parts)
    return tuple((tuple(sorted(i for k in own for i in parts[k])), 0 in own, n_parts - 1 in own) for own in owners)


@lru_cache(maxsize=4096)
def partial_recomputed(n_layers: int, pp: int, schedule: str, virtual: int, ac_layers: int) -> tuple[tuple[int, ...], ...]:
    """Per pp rank: the blocks ``activation_checkpointing: partial`` recomputes, the first ``ac_layers`` of each
    of the rank's model chunks (Megatron-LM ``--recompute-method block --recompute-num-layers``: "the first N
    layers of each pipeline stage (virtual stage)" are recomputed; llmc's torchtitan job and runtime wrap
    the same blocks)."""
    return tuple(rec for rec, _ in _partial_split(n_layers, pp, schedule, virtual, ac_layers))


@lru_cache(maxsize=16384)
def _partial_split(n_layers: int, pp: int, schedule: str, virtual: int, ac_layers: int) -> tuple[tuple, ...]:
    """Per pp rank: (blocks recomputed whole, the others) under partial recomputation."""
    parts, owners = _parts_owners(n_layers, pp, schedule, virtual)
    out = []
    for own in owners:
        rec = tuple(sorted(i for k in own for i in parts[k][:ac_layers]))
        out.append((rec, tuple(sorted(i for k in own for i in parts[k][ac_layers:]))))
    return tuple(out)


@lru_cache(maxsize=4096)
def max_chunk_layers(n_layers: int, pp: int, schedule: str = "1F1B", virtual: int = 1) -> int:
    """Blocks of the largest model chunk: ``ac_layers`` at or above it recomputes every block (= ``full``)."""
    return max(len(p) for p in _parts_owners(n_layers, pp, schedule, virtual)[0])


def stage_layers(n_layers: int, pp: int, schedule: str = "1F1B", virtual: int = 1) -> list[list[int]]:
    """Blocks held by each pipeline rank (see :func:`pipeline_layout`)."""
    return [list(layers) for layers, _, _ in pipeline_layout(n_layers, pp, schedule, virtual)]


_LAYER_GROUPS: dict[int, tuple] = {}


def _layer_groups(arch: Architecture) -> tuple[tuple[tuple[str, int], ...], ...]:
    """Per block: (sharding group, parameters) of each labelled component, in layer_components' order;
    computed once per architecture (keyed by identity, the entry holds the architecture)."""
    hit = _LAYER_GROUPS.get(id(arch))
    if hit is None or hit[0] is not arch:
        hit = (arch, tuple(tuple((_group(label), n) for label, n in layer_components(arch, i).items())
                           for i in range(arch.n_layers)))
        if len(_LAYER_GROUPS) > 64:
            _LAYER_GROUPS.clear()
        _LAYER_GROUPS[id(arch)] = hit
    return hit[1]


@lru_cache(maxsize=256)
def _stage_param_groups(
    arch: Architecture, pp: int, schedule: str, virtual: int
) -> tuple[dict[str, int], ...]:
    V, d = arch.vocab_size, arch.d_model
    per_layer = _layer_groups(arch)
    out = []
    for layers, emb, head in pipeline_layout(arch.n_layers, pp, schedule, virtual):
        g = {"tp": 0, "expert": 0, "vocab": 0, "replicated": 0}
        for i in layers:
            for group, n in per_layer[i]:
                g[group] += n
        if emb:
            g["vocab"] += V * d
        if head:
            g["replicated"] += d  # final norm
            if not arch.tied_embeddings or not emb:
                # untied head; or the tied matrix again on a rank without the embedding
                g["vocab"] += V * d
        out.append(g)
    return tuple(out)


# ----------------------------------------------------------------------------- model states


def model_state_bytes(
    n_params: float,
    *,
    zero_stage: int = 0,
    shard: int = 1,
    weight_bytes: float = 2,
    grad_bytes: float = 2,
    optimizer_bytes: float = 12,
    offload_optimizer: bool = False,
    offload_params: bool = False,
) -> dict[str, float]:
    """Weights / grads / optimizer bytes for n_params replicated over a shard group of size ``shard``.

    ZeRO paper sec. 5 / Figure 1: stage 1 shards the optimizer, 2 also the grads, 3 also the weights.
    With ``offload_optimizer`` the optimizer states and the (fp32) grads are on the CPU (GPU part 0); with
    ``offload_params`` (ZeRO-3) the weights' partitions too (ZeRO-Infinity, Rajbhandari et al. 2021,
    arXiv:2104.07857: each layer is gathered to the GPU only while it runs, in the buffers).
    """
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    n = max(1, int(shard))
    w = n_params * weight_bytes / (n if zero_stage >= 3 else 1)
    g = n_params * grad_bytes / (n if zero_stage >= 2 else 1)
    o = n_params * optimizer_bytes / (n if zero_stage >= 1 else 1)
    if offload_optimizer:
        g, o = 0.0, 0.0
    if offload_params:
        _check_param_offload(zero_stage, offload_optimizer)
        w = 0.0
    return {"weights": w, "grads": g, "optimizer": o}


def _check_param_offload(zero_stage: int, offload_optimizer: bool) -> None:
    if zero_stage != 3 or not offload_optimizer:
        raise ValueError("offload_params needs ZeRO stage 3 with offload_optimizer (DeepSpeed ZeRO-Infinity on CPU)")


# bytes per element of the low-precision copies of a sequence-parallel TP all-gather's output held while the layer
# runs (memory._stage_values): five column-parallel linears' inputs (wq, wk, wv, w1, w3), 1 B each in fp8, two
# NVFP4 copies of 0.5 B + one scale byte per 16 each in nvfp4
_LOWP_GATHER_COPIES = {"fp8": 5.0, "nvfp4": 5 * 2 * (0.5 + 1 / 16)}


def _precision_bytes(precision: str, optimizer_bytes_per_param: float, grad_bytes_per_param: float | None):
    if precision == "fp32":
        # fp32 weights are the master copy: 4 + 4 + (K - 4) (K=12 -> m, v) = 16 B/param
        return (
            4.0,
            (4.0 if grad_bytes_per_param is None else grad_bytes_per_param),
            optimizer_bytes_per_param - 4,
        )
    if precision in ("bf16", "fp16", "fp8", "nvfp4"):
        # fp8: torchao float8 keeps bf16 (sharded fp32) parameters; fp8 copies are transient. nvfp4: torchtitan's
        # NVFP4Linear keeps the bf16 weight too (components/quantization/nvfp4.py), quantized per forward
        return 2.0, (2.0 if grad_bytes_per_param is None else grad_bytes_per_param), optimizer_bytes_per_param
    raise ValueError(f"unknown precision {precision!r}")


def _shard_groups(plan: ParallelPlan, backend: str | None = None) -> dict[str, tuple[int, int]]:
    """(model-parallel divisor, ZeRO shard group) per parameter group; the routed experts' on ``backend``'s expert
    mesh (:func:`llmc.compiler.plan.expert_shards`)."""
    z = plan.dp_shard * plan.cp
    return {
        "tp": (plan.tp, z),
        "vocab": (plan.tp, z),
        "replicated": (1, z),
        "expert": expert_shards(plan.dp_shard, plan.cp, plan.tp, plan.ep, backend),
    }


# ----------------------------------------------------------------------------- activations


def _attn_act_per_token(arch: Architecture) -> tuple[float, float, float]:
    """(saved elements excluding norms, linear-output elements, attention-output elements) per token,
    attention sub-block, no recompute."""
    H = arch.n_heads
    if family_of(arch).attention == "mla":
        m = arch.mla
        assert m is not None
        dqk, dv = m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim
        inter = 0.0
        lin_out = 0.0
        if m.q_lora_rank is not None:
            inter += 2 * m.q_lora_rank  # wq_a output (q_norm input) + q_norm output (wq_b input)
            lin_out += m.q_lora_rank + H * dqk  # wq_a, wq_b
        else:
            lin_out += H * dqk  # wq
        inter += (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank  # wkv_a out + kv_norm out
        lin_out += (m.kv_lora_rank + m.qk_rope_head_dim) + H * (m.qk_nope_head_dim + dv) + arch.d_model
        qkv = H * dqk + H * dqk + H * dv  # per-head K after broadcasting the shared rope key
        return inter + qkv, lin_out, H * dv
    hd, kv = arch.hd, arch.kv_heads
    qkv = H * hd + 2 * kv * hd  # post-RoPE q, k and v saved by SDPA (GQA: K/V at n_kv heads)
    if arch.qk_norm:  # q/k norms keep their inputs (wq / wk outputs; Gemma's in fp32: 2 elements each) and one fp32
        # rstd per head (Qwen3) or per projection (OLMo 2's norm over all heads at once)
        qkv += (H + kv) * hd * (2 if arch.norm_unit_offset else 1) + (
            2 * (H + kv) if arch.qk_norm_scope == "head" else 2 * 2)
    lin_out = H * hd + 2 * kv * hd + arch.d_model  # wq, wk, wv, wo outputs
    return qkv, lin_out, H * hd


def block_norm_elems(arch: Architecture) -> float:
    """Elements per token a block's RMSNorms keep for the backward (16-bit units): each norm its input and one fp32
    rstd (2), a norm feeding a matmul also its output (the matmul's input): 4 d + 4 for Llama's two (OLMo 2's on the
    outputs keep as much: the next matmul keeps the residual instead). Gemma's four (before and after attention and
    MLP, ``norm_placement: sandwich``) upcast their input to fp32 (``Gemma3RMSNorm``), kept so: 2 d each, the two
    before the branches their output too: 4 (2 d + 2) + 2 d = 10 d + 8."""
    d = arch.d_model
    if arch.norm_placement == "sandwich":
        inp = 2 * d if arch.norm_unit_offset else d
        return 4 * (inp + 2) + 2 * d
    return 4 * d + 4


def _ffn_act_per_token(arch: Architecture, i: int) -> tuple[float, float]:
    """(saved elements, linear-output elements) per token for the FFN of block i, no recompute.

    SwiGLU: w1 output (SiLU input), w3 output, SiLU output, and their product (w2 input) = 4 x d_ff
    (Shazeer 2020 FFN_SwiGLU; each is saved by autograd for the backward of SiLU / mul / w2).
    MoE: each token is processed by top_k experts, so the expert part scales with top_k: per routed copy
    the permuted input (h), 4 x f_e SwiGLU intermediates and the expert output (h, needed for the
    gradient of the routing weights); shared experts 4 x S x f_e; router scores E (fp32 -> 2 elements).
    gpt-oss's clamped SwiGLU (``activation: swiglu_clamped``, llmc.runtime.model.GroupedExperts, as transformers'
    ``GptOssExperts._apply_gate``) keeps 7 x f_e per routed copy instead of 4: the two clamps' inputs (gate, up), the
    clamped gate, the sigmoid's output, up + 1, the gated product and the w2 input.
    """
    d = arch.d_model
    glu = 7 if arch.activation == "swiglu_clamped" else 4
    if not is_moe_layer(arch, i):
        return 4.0 * arch.d_ff, 2.0 * arch.d_ff + d
    moe = arch.moe
    f = expert_d_ff(arch)
    k, S, E = moe.top_k, moe.num_shared_experts, moe.num_experts
    saved = k * (d + glu * f + d) + 4 * S * f + 2 * E
    lin = k * (2 * f + d) + (S and (2 * S * f + d)) + E
    return float(saved), float(lin)


@lru_cache(maxsize=65536)
def layer_activation_bytes_per_token(
    arch: Architecture,
    i: int,
    ac_mode: str = "none",
    *,
    seq_len: int = 0,
    flash_attention: bool = True,
    bytes_per_elem: float = 2,
) -> float:
    """Activation bytes kept per token for block i until its backward (no sharding, b = 1).

    Derivation for a Llama block, adapted from Korthikanti et al. 2022 sec. 4.1 (which counts
    34 s b h + 5 a s^2 b for a GPT block with dropout), with 16-bit elements and no dropout:

    * the two RMSNorms: input and output of each (the output is the next matmul's saved input): 4 h
      (Korthikanti's two LayerNorm inputs 4sbh + the QKV/MLP matmul inputs 2sbh + 2sbh), plus one fp32
      rstd per token per norm (CUDA's fused rms_norm saves input + rstd);
    * attention: post-RoPE Q (H d_qk), K, V (n_kv heads for GQA; per-head for MLA; torchtitan makes
      q/k/v contiguous after splitting the fused wqkv output, so the fused buffer is not retained), the
      FlashAttention output O (H d_v, saved by the kernel; flash returns it in (b, s, H, d) layout so the
      reshape that feeds wo is a view of the same storage = Korthikanti's "output projection input") and
      its log-sum-exp (H fp32 = 2H elements); MLA adds its low-rank intermediates; RoPE saves only its
      (shared, per-position) frequency table;
    * FFN: SwiGLU 4 d_ff (see :func:`_ffn_act_per_token`); MoE scales the expert part with top_k;
    * without FlashAttention the softmax output a s^2 b (2 a s bytes per token) is saved too;
      Korthikanti's 5as/h term also counts the dropout mask and output (1 + 2).

    For MHA with a GeLU MLP this reproduces Korthikanti's 34 minus the dropout masks (2 x sbh); the
    term-by-term match and an autograd saved-tensor measurement are in tests/test_memory.py.

    ``ac_mode``:
    * ``none``: everything above.
    * ``selective`` (torchtitan per-op SAC): the block input (h), the attention output + LSE, and the
      outputs of every other matmul (half the linear outputs) are kept; norms, SiLU, products and the
      other matmuls are recomputed; the non-flash score term is dropped (Korthikanti's selective
      recompute of the attention core).
    * ``selective_core`` (what ``selective`` means on backends whose ``selective_ac`` is ``attention_core``:
      llmc's runtime, Megatron-Core): only the attention core (RoPE + softmax(QK^T)V) is recomputed
      (Korthikanti et al. 2022 sec. 4.1). Its inputs (the linears' q, k, v: as many elements as the
      post-RoPE ones; MLA: q, the kv expansion and the one shared rope key) and its output (wo's input) stay
      saved, so only the kernel's log-sum-exp, MLA's per-head copies of the rope key and the non-flash
      score term go.
    * ``full``: only the block input, 2 s b h bytes (Korthikanti Table 2 "full"); the one-layer working
      set during recompute is added by the caller once per stage.
    """
    d, H = arch.d_model, arch.n_heads
    if ac_mode == "full":
        return d * bytes_per_elem
    attn_saved, attn_lin, attn_out = _attn_act_per_token(arch)
    ffn_saved, ffn_lin = _ffn_act_per_token(arch, i)
    norms = block_norm_elems(arch)
    if ac_mode == "none" and eager_attention(arch):
        # soft-capped attention or attention sinks (llmc.runtime.model._eager_attention): no kernel's log-sum-exp; K
        # and V expanded to every query head (GQA) and kept by the two matmuls; every score kept (eager_score_bytes),
        # the whole s x s square in a windowed layer too (the band is a mask on it)
        expand = 2 * (H - arch.kv_heads) * arch.hd
        elems = norms + attn_saved + expand + attn_out + ffn_saved
        sink = H * SOFTMAX_FP32_BYTES if arch.attn_sinks else 0.0  # the softmax's sink column (fp32), per query
        return elems * bytes_per_elem + H * seq_len * eager_score_bytes(arch, bytes_per_elem) + sink
    if ac_mode == "none":
        elems = norms + attn_saved + attn_out + 2 * H + ffn_saved
        score = 0.0 if flash_attention else H * seq_len  # softmax output, a s^2 b per sequence
        return (elems + score) * bytes_per_elem
    if ac_mode == "selective":
        elems = d + attn_out + 2 * H + 0.5 * (attn_lin + ffn_lin)
        return elems * bytes_per_elem
    if ac_mode == "selective_core":
        core_in = attn_saved
        if arch.mla is not None:  # the core gets k_pe once (rope dims) and expands it to every head itself
            core_in -= (H - 1) * arch.mla.qk_rope_head_dim
        return (norms + core_in + attn_out + ffn_saved) * bytes_per_elem
    raise ValueError(f"unknown activation checkpointing mode {ac_mode!r}")


def korthikanti_layer_bytes(
    s: int, b: int, h: int, a: int, t: int = 1, *, sp: bool = False, recompute: str = "none"
) -> float:
    """Korthikanti et al. 2022 Table 2: activation bytes per GPT transformer layer (16-bit, dropout).

    no parallelism: s b h (34 + 5 a s / h); tensor parallel t: s b h (10 + 24/t + 5 a s/(h t));
    + sequence parallel: s b h (34/t + 5 a s/(h t)); selective recompute drops the 5as/h term;
    full recompute keeps 2 s b h.
    """
    sbh = s * b * h
    score = 5.0 * a * s / h
    if recompute == "full":
        return 2.0 * sbh
    if recompute == "selective":
        score = 0.0
    if sp:
        return sbh * (34.0 / t + score / t)
    return sbh * (10.0 + 24.0 / t + score / t)


def in_flight_microbatches(plan: ParallelPlan, stage: int) -> float:
    """Micro-batches whose activations stage ``stage`` holds at its peak.

    Counted in micro-batches of the rank's whole share of blocks. 1F1B (PipeDream-Flush, Narayanan et
    al. 2021 sec. 2.2.1): min(p - i, m). Interleaved 1F1B with v chunks: x (1 + (p - 1)/(p v))
    (Korthikanti et al. 2022 sec. 4.2.3). GPipe: all m. ZB-V (Qi et al. 2024, "Zero Bubble Pipeline
    Parallelism", arXiv 2401.10241, sec. 4): the same peak as 1F1B's first stage, p micro-batches,
    on every rank -> min(p, m).
    """
    p, m = plan.pp, max(1, plan.grad_accum)
    if p == 1:
        return 1.0
    if plan.pp_schedule == "GPipe":
        return float(m)
    if plan.pp_schedule == "ZBVZeroBubble":
        return float(min(p, m))
    n = float(min(p - stage, m))
    if plan.pp_schedule == "Interleaved1F1B":
        v = max(1, plan.pp_virtual_stages)
        n *= 1.0 + (p - 1) / (p * v)
    return n


# ----------------------------------------------------------------------------- the whole GPU


@dataclass(frozen=True)
class StageMemory:
    weights: float
    grads: float
    optimizer: float
    activations: float
    buffers: float

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.buffers

    def as_dict(self) -> dict[str, int]:
        return {
            "weights": int(self.weights),
            "grads": int(self.grads),
            "optimizer": int(self.optimizer),
            "activations": int(self.activations),
            "buffers": int(self.buffers),
        }


def stage_memory(
    arch: Architecture,
    plan: ParallelPlan,
    seq_len: int,
    precision: str = "bf16",
    *,
    optimizer_bytes_per_param: float = 12,
    offload_optimizer: bool = False,
    grad_bytes_per_param: float | None = None,
    flash_attention: bool = True,
    backend=None,
    compile: bool | None = None,
    compile_loss: bool | None = None,
    offload_params: bool = False,
    loss_chunks: int | None = None,
    cp_attention: str | None = None,
) -> list[StageMemory]:
    """Memory of one GPU in each pipeline stage (see the module docstring for every term).

    ``backend`` (a :class:`backends.Backend` or its name; None = ``generic``) sets the model-state bytes
    (FSDP2's fp32 shards vs DeepSpeed's bf16 + fp32 partitions), the device memory outside the caching
    allocator (CUDA context, NCCL) and, with ``compile`` (None = the backend's default), the activations
    torch.compile does not save. Buffers include the backend's device-level bytes (``non_allocator``).
    """
    be = get_backend(backend) if backend is None or isinstance(backend, str) else backend
    return [StageMemory(w, gr, op, acts, buf) for _, _, w, gr, op, acts, buf in _stage_values(
        arch, plan, seq_len, precision, optimizer_bytes_per_param, _offload_level(offload_optimizer, offload_params),
        grad_bytes_per_param, flash_attention, be, compile, compile_loss, loss_chunks, runs=False,
        cp_attention=cp_attention)]


def _offload_level(offload_optimizer: bool, offload_params: bool) -> int:
    """0: nothing on the host; 1: the optimizer (ZeRO-Offload); 2: the optimizer and the parameters (ZeRO-Infinity)."""
    return 2 if offload_params else 1 if offload_optimizer else 0


def _stage_values(arch, plan, seq_len, precision, optimizer_bytes_per_param, offload, grad_bytes_per_param,
                  flash_attention, be, compile, compile_loss, loss_chunks, *, runs: bool,
                  cp_attention: str | None = None) -> list[tuple]:
    """(first stage, number of stages, weights, grads, optimizer, activations, buffers) for every stage
    (``runs=False``), or once per run of consecutive stages with the same parameters and blocks
    (``runs=True``), valued at the run's first stage: its in-flight micro-batch count is the run's
    largest, since it never rises with the stage index (:func:`in_flight_microbatches`)."""
    act_b = 4.0 if precision == "fp32" else 2.0
    compiled = compile_on(be, compile)
    act_keep = 1.0 - (be.compile_act_saving if compiled else 0.0)
    loss_compiled = compiled and (be.compiles_loss if compile_loss is None else compile_loss)
    tokens_mb = plan.micro_batch * seq_len / plan.cp  # tokens per micro-batch on this rank
    act_div = plan.tp  # sequence parallel: every activation is split over tp (Korthikanti Table 2)
    ac = plan.activation_checkpointing
    if ac not in AC_MODES:
        raise ValueError(f"unknown activation checkpointing mode {ac!r}")
    virtual = max(1, plan.pp_virtual_stages)
    structure = _structure(arch, plan.pp, plan.pp_schedule, virtual, seq_len, flash_attention, act_b)
    split = None
    if ac == "partial":
        if plan.ac_layers < 1:
            raise ValueError("activation_checkpointing 'partial' needs ac_layers >= 1")
        split = _partial_split(arch.n_layers, plan.pp, plan.pp_schedule, virtual, plan.ac_layers)
    static = _static_runs(arch, plan, precision, optimizer_bytes_per_param, offload, grad_bytes_per_param, be,
                          structure)
    out: list[tuple] = []
    for run, (w, gr, op, buf0) in zip(structure, static, strict=True):
        start, count, layers, has_head = run[0], run[1], run[4], run[5]
        per_tok, work = run[7][activation_mode(ac, be)] if split is None else (0.0, 0.0)
        # per token, + the final norm's and the head's inputs on the last stage
        for si in ((start,) if runs else range(start, start + count)):
            if split is not None:  # partial: the recomputed blocks keep what "full" keeps, the others everything
                rec, rest = split[si]  # (the stages of a run have the same chunk sizes: _structure)
                kept_f, work = _stage_act_cached(arch, rec, "full", seq_len, flash_attention, act_b)
                kept_n, _ = _stage_act_cached(arch, rest, "none", seq_len, flash_attention, act_b)
                per_tok = kept_f + kept_n + (2 * arch.d_model * act_b if has_head else 0.0)
                # the recomputed blocks come first in each chunk, so the backward reaches them after the others'
                # activations are freed: the working set adds to the peak only beyond what those held
                work = max(0.0, work - kept_n)
            # --- activations
            acts = in_flight_microbatches(plan, si) * tokens_mb * per_tok / act_div * act_keep
            if plan.tp > 1 and not be.sequence_parallel:
                # TP without sequence parallelism (Korthikanti et al. 2022 Table 2, "tensor parallel": 10 s b h
                # outside the 24/t): the norms' inputs / outputs (the column-parallel linears' inputs), or the block
                # input a recomputed block keeps, and the head's inputs are whole on every TP rank, not 1/tp of them
                acts += (in_flight_microbatches(plan, si) * tokens_mb * act_keep * (1.0 - 1.0 / plan.tp)
                         * _replicated_per_token(arch, layers if split is None else split[si], activation_mode(ac, be),
                                                 has_head, act_b))
            # while one block is recomputed and back-propagated, what was dropped for it is rematerialised:
            # its full working set minus what is kept anyway (so AC never exceeds no AC); 0 without AC
            acts += tokens_mb * work / act_div
            if plan.tp > 1:
                # sequence-parallel TP all-gathers the attention and FFN inputs to the whole micro-batch before
                # the column-parallel linears (Korthikanti et al. 2022 sec. 4.2.2), so the layer being computed
                # holds them and, in the backward, their gradients unsplit by tp; with fp8 also the fp8 copies
                # of the gathered input for each column-parallel linear (wq, wk, wv, w1, w3: 1 B each); with nvfp4
                # its row- and column-wise NVFP4 copies (2 x (0.5 + 1/16) B each: torchao nvfp4_mm_triton quantizes
                # the input both ways)
                acts += tokens_mb * arch.d_model * (4 * act_b + _LOWP_GATHER_COPIES.get(precision, 0.0))
            if plan.cp > 1 and cp_kv_gathered(be, cp_attention):
                kept_layers = (len(layers) if split is None else len(split[si][1])) if ac in ("none", "partial") else 0
                acts += cp_gathered_kv_bytes(arch, plan, seq_len, act_b, kept_layers, in_flight_microbatches(plan, si),
                                             recomputed=ac != "none")
            buf = buf0 + window_mask_bytes(arch, seq_len, act_b)
            if has_head:
                buf += loss_logits_bytes(arch.vocab_size, tokens_mb, plan, compiled=loss_compiled,
                                         chunks=be.loss_chunks if loss_chunks is None else loss_chunks,
                                         d_model=arch.d_model, act_bytes=act_b,
                                         softcapped=arch.final_logit_softcap is not None)
            out.append((si, count if runs else 1, w, gr, op, acts, buf))
    return out


#: Backends whose context parallelism all-gathers each layer's K and V (:func:`cp_gathered_kv_bytes`): torchtitan 0.3.0,
#: whose jobs llmc emits with FlexAttention (llmc.emit.torchtitan: ``attn_backend`` 'flex'), wraps it with
#: ``flex_cp_allgather`` (torchtitan/distributed/context_parallel/api.py ``apply_cp_to_forward``). Other runners: no
#: CP (llmc's native and DeepSpeed trainers) or a ring exchange of K/V chunks (the reference profiles), not modelled.
CP_KV_ALLGATHER_BACKENDS = frozenset({"torchtitan"})
#: ``cp_attention`` values: "allgather" (FlexAttention CP: whole-sequence K/V per layer), "ring" (ring attention:
#: the K/V chunks in flight are not modelled; e.g. torchtitan's SDPA CP of its 2024 releases)
CP_ATTENTIONS = ("allgather", "ring")


def cp_kv_gathered(be, cp_attention: str | None = None) -> bool:
    """Does CP on ``be`` gather each layer's whole-sequence K and V (``cp_attention`` None: the backend's way,
    :data:`CP_KV_ALLGATHER_BACKENDS`)?"""
    if cp_attention is None:
        return be.name in CP_KV_ALLGATHER_BACKENDS
    if cp_attention not in CP_ATTENTIONS:
        raise ValueError(f"unknown cp_attention {cp_attention!r}: one of {', '.join(CP_ATTENTIONS)}")
    return cp_attention == "allgather"


def cp_kv_elems_per_token(arch) -> float:
    """K and V elements per token of one attention layer as the attention kernel reads them: GQA's n_kv_heads x
    head_dim each; MLA's per-head keys (nope + rope dims) and values."""
    if arch.mla is not None:
        m = arch.mla
        return arch.n_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
    return 2.0 * arch.kv_heads * arch.hd


def cp_gathered_kv_bytes(arch, plan: ParallelPlan, seq_len: int, act_bytes: float, kept_layers: int,
                         in_flight: float, *, recomputed: bool) -> float:
    """What FlexAttention's context parallelism adds per GPU (torchtitan 0.3.0 ``apply_cp_to_forward``: each rank's
    K and V all-gathered to the whole sequence before ``flex_attention``, torch's ``cplib::flex_cp_allgather``,
    torch/distributed/tensor/experimental/_context_parallel/_cp_custom_ops.py). Its autograd saves no tensor
    (``_flex_cp_setup_context`` keeps the group and dim only) and its backward reduce-scatters the gradients of the
    gathered K and V (``flex_cp_allgather_backward``), whole-sequence tensors the attention's backward produces.
    flex_attention saves its inputs, the gathered K and V, for its backward: a block whose activations are kept
    (``kept_layers``: no AC, partial AC's other blocks) keeps them, seq_len instead of seq_len / cp tokens of K/V,
    for each micro-batch in flight; torchtitan's selective AC saves flex_attention's output, not its inputs
    (torchtitan/distributed/activation_checkpoint.py ``_get_default_save_ops``), so the K/V are re-gathered in the
    backward as under full AC. Plus the layer being back-propagated: the gradients of its gathered K/V and, when
    ``recomputed``, its re-gathered K/V. K/V heads split over tp; one micro-batch of ``plan.micro_batch``
    sequences."""
    whole = plan.micro_batch * seq_len * cp_kv_elems_per_token(arch) / plan.tp * act_bytes  # one layer's K + V
    saved = kept_layers * in_flight * whole * (1.0 - 1.0 / plan.cp)  # (the local 1/cp is among the saved tensors)
    return saved + whole * (2.0 if recomputed else 1.0)


def window_mask_bytes(arch, seq_len: int, act_bytes: float) -> float:
    """The band mask of a sliding window W < seq_len (llmc.runtime.model: one additive (s, s) mask per micro-batch
    shape, in the activation dtype, shared by every layer and saved by SDPA for the backward); with soft-capped
    attention or attention sinks (:func:`eager_attention`, llmc.runtime.model._eager_attention) also the causal mask of
    the layers without a binding window, cached alike; 0 otherwise."""
    w = arch.sliding_window
    band = bool(w and w < seq_len)
    n = int(band) + int(eager_attention(arch) and (not band or bool(arch.full_attention_layers)))
    return n * float(seq_len) ** 2 * act_bytes


def eager_attention(arch) -> bool:
    """llmc's trainer computes this model's attention scores unfused, as transformers' eager attention (no fused kernel
    takes them): soft-capped scores (Gemma 2, ``attn_logit_softcap``) or attention sinks (gpt-oss, ``attn_sinks``)."""
    return arch.attn_logit_softcap is not None or arch.attn_sinks


def eager_score_bytes(arch, act_bytes: float) -> float:
    """Bytes the unfused attention (:func:`eager_attention`) keeps per score for the backward: soft-capped,
    :func:`softcap_score_bytes`; with sinks (llmc.runtime.model._eager_attention, as transformers'
    ``eager_attention_forward`` in modeling_gpt_oss.py: the scores and the sink column concatenated, softmax in fp32,
    cast back without the sink column) the fp32 softmax and its cast (the same tensor when the activations are fp32):
    4 + 2 = 6 in bf16 (the softmax's sink column, 4 B a query and head, is counted beside)."""
    if arch.attn_logit_softcap is not None:
        return softcap_score_bytes(act_bytes)
    return SOFTMAX_FP32_BYTES + (act_bytes if act_bytes < SOFTMAX_FP32_BYTES else 0.0)


def softcap_score_bytes(act_bytes: float) -> float:
    """Bytes soft-capped attention keeps per score for the backward (llmc.runtime.model._eager_attention, as transformers'
    eager attention): tanh's output (the activation dtype), the fp32 softmax and its cast back (the same tensor when
    the activations are fp32): 2 + 4 + 2 = 8 in bf16, 4 + 4 in fp32."""
    return act_bytes + SOFTMAX_FP32_BYTES + (act_bytes if act_bytes < SOFTMAX_FP32_BYTES else 0.0)


def _replicated_per_token(arch, layers, ac: str, has_head: bool, act_b: float) -> float:
    """Bytes per token of a stage's activations that tensor parallelism without sequence parallelism leaves whole on
    every rank (the part of :func:`layer_activation_bytes_per_token` outside the heads and the FFN width): per block
    the two norms' inputs and outputs + their fp32 rstd (4 d + 4 elements) where the block keeps its activations, its
    input (d) where it is recomputed (full, or torchtitan-style selective); + the final norm's and the head's inputs.
    ``layers``: the stage's blocks, or under partial recomputation its (recomputed, kept) blocks."""
    d, norms = arch.d_model, block_norm_elems(arch)
    if ac == "partial":
        rec, kept = layers
        elems = len(rec) * d + len(kept) * norms
    else:
        elems = len(layers) * (d if ac in ("full", "selective") else norms)
    return (elems + (2 * d if has_head else 0)) * act_b


ACT_MODES = ("none", "selective", "full", "selective_core")  # what activations are computed for (backends.activation_mode)

# Per-layout results that do not depend on the micro-batch, AC or gradient accumulation, keyed by the
# architecture's identity (hashing the pydantic model on every call is what made the search slow); the
# cached value holds the architecture, so its id cannot be reused while the entry lives.
_STATIC: dict[tuple, tuple] = {}
_ACTS: dict[tuple, tuple] = {}
_STRUCT: dict[tuple, tuple] = {}
_BLOCKS: dict[tuple, tuple] = {}
_CACHE_MAX = 200_000


def _bounded(cache: dict) -> dict:
    if len(cache) > _CACHE_MAX:
        cache.clear()
    return cache


def _stage_act_cached(arch, layers, ac, seq_len, flash, act_b) -> tuple[float, float]:
    """(kept activation bytes per token summed over ``layers``, the largest rematerialised working set of one
    of them) from per-layer values computed once per (architecture, AC mode, ...)."""
    key = (id(arch), layers, ac, seq_len, flash, act_b)
    hit = _ACTS.get(key)
    if hit is None or hit[0] is not arch:
        lkey = (id(arch), "layers", ac, seq_len, flash, act_b)
        per = _ACTS.get(lkey)
        if per is None or per[0] is not arch:
            vals = []
            for i in range(arch.n_layers):
                kept = layer_activation_bytes_per_token(arch, i, ac, seq_len=seq_len, flash_attention=flash,
                                                        bytes_per_elem=act_b)
                none = layer_activation_bytes_per_token(arch, i, "none", seq_len=seq_len, flash_attention=flash,
                                                        bytes_per_elem=act_b)
                vals.append((kept, 0.0 if ac == "none" else none - kept))
            per = (arch, tuple(vals))
            _bounded(_ACTS)[lkey] = per
        v = per[1]
        hit = (arch, (sum(v[i][0] for i in layers), max((v[i][1] for i in layers), default=0.0)))
        _bounded(_ACTS)[key] = hit
    return hit[1]


def _structure(arch, pp, schedule, virtual, seq_len, flash, act_b) -> tuple:
    """The pipeline stages as runs of consecutive stages holding the same parameters and blocks:
    (first stage, number of stages, parameters by sharding group, holds the embedding, the first
    stage's blocks, holds the head, the run's key, {AC mode: (kept activation bytes per token, rematerialised
    working set per token)}). The key is what :func:`_static_runs` reads (group counts, embedding,
    head, number of blocks), the activation values of every AC mode and the sizes of the stage's model chunks
    (partial recomputation's block count), so the stages of a run have identical inputs everywhere."""
    key = (id(arch), pp, schedule, virtual, seq_len, flash, act_b)
    hit = _STRUCT.get(key)
    if hit is not None and hit[0] is arch:
        return hit[1]
    groups = _stage_param_groups(arch, pp, schedule, virtual)
    layout = pipeline_layout(arch.n_layers, pp, schedule, virtual)
    parts, owners = _parts_owners(arch.n_layers, pp, schedule, virtual)
    runs: list[list] = []
    for si, (g, (layers, has_emb, has_head)) in enumerate(zip(groups, layout, strict=True)):
        acts = {}
        for ac in ACT_MODES:
            per_tok, work = _stage_act_cached(arch, layers, ac, seq_len, flash, act_b)
            if has_head:
                per_tok += 2 * arch.d_model * act_b  # final norm input + head input
            acts[ac] = (per_tok, work)
        # the chunk sizes: partial recomputation's count per stage depends on them (partial_recomputed)
        rkey = (tuple(g.values()), has_emb, has_head, len(layers), tuple(acts.values()),
                tuple(len(parts[k]) for k in owners[si]))
        if runs and runs[-1][6] == rkey:
            runs[-1][1] += 1
        else:
            runs.append([si, 1, g, has_emb, layers, has_head, rkey, acts])
    out = tuple(tuple(r) for r in runs)
    _bounded(_STRUCT)[key] = (arch, out)
    return out


def _static_runs(arch, plan, precision, optimizer_bytes_per_param, offload, grad_bytes_per_param, be,
                 structure) -> tuple:
    """Per run of ``structure`` (:func:`_structure`): (weights, grads, optimizer, buffers without the
    logits), which depend on the layout but not on the micro-batch, AC or gradient accumulation."""
    # dp_replicate > 1 separately from dp > 1: the outside-allocator bytes count its NCCL communicator
    key = (id(structure), plan.tp, plan.ep, plan.dp_shard, plan.cp, plan.dp > 1, plan.dp_replicate > 1,
           plan.zero_stage, plan.pp, precision, optimizer_bytes_per_param, offload, grad_bytes_per_param, be.name)
    hit = _STATIC.get(key)
    if hit is not None and hit[0] is structure:
        return hit[1]
    cwb = 4.0 if precision == "fp32" else 2.0  # bytes of an all-gathered (unsharded) parameter in compute
    zs = plan.zero_stage
    groups = _shard_groups(plan, be.name)
    # torchtitan applies fully_shard whatever the stage (models/*/parallelize.py apply_fsdp_to_decoder; llmc emits
    # reshard_after_forward "never" below ZeRO-3): with no dense shard group (stage 0) its routed experts are still
    # sharded over efsdp > 1, as FSDP2 keeping the gathered parameters (the ZeRO-1/2 states)
    zs_e = 1 if zs == 0 and be.name in EP_SPANS_TP and groups["expert"][1] > 1 else zs
    per_group = {name: _group_bytes(mp, z, zs_e if name == "expert" else zs, precision, optimizer_bytes_per_param,
                                    offload, grad_bytes_per_param, be)
                 for name, (mp, z) in groups.items()}
    out = []
    outside = non_allocator_bytes(plan, be)
    for _, _, g, has_emb, layers, has_head, _, _ in structure:
        w = gr = op = 0.0
        unsharded_local = 0.0  # params of this stage after tp/ep split, before ZeRO
        for name, n in g.items():
            if n:
                inv, bw, bg, bo = per_group[name]
                unsharded_local += n * inv
                w += n * bw
                gr += n * bg
                op += n * bo

        # --- buffers (the logits, which depend on the micro-batch, are added by _stage_values)
        buf = outside
        z_dense = plan.dp_shard * plan.cp
        if zs >= 3 and z_dense > 1 and plan.pp > 1:
            # torchtitan under PP: reshard_after_forward=False (fsdp.get_fsdp_reshard_after_forward_policy,
            # "default" policy) and torch.distributed.pipelining sets set_requires_gradient_sync(False) /
            # set_reshard_after_backward(False) until the last micro-batch (stage.backward_maybe_with_nosync):
            # the stage's whole unsharded bf16 parameters stay gathered and its unsharded gradients
            # accumulate in reduce_dtype fp32 -> (wb + 4) bytes x the stage's local parameters.
            buf += unsharded_local * (cwb + 4)
        elif zs >= 3 and z_dense > 1 and be.zero12 == "deepspeed":
            # DeepSpeed gathers and reduces tensor by tensor, in buckets of llmc's ds_config's sizes
            buf += ds_zero3_buffer_bytes(arch.d_model, largest_tensor(arch, layers, has_emb, has_head), cwb)
        elif zs >= 3 and z_dense > 1:
            # FSDP unit = one block (or the embedding / head): 2 units all-gathered in the compute dtype
            # (current + prefetch) + 1 unit's unsharded fp32 gradient before reduce-scatter (pp = 1: one
            # stage, so the run's blocks are the stage's)
            block, unit = _fsdp_units(arch, layers, plan, has_emb or has_head, be.name)
            # the largest unit gathered (wb) with its fp32 gradient (4) + the next block prefetched (wb)
            buf += unit * (cwb + 4) + block * cwb
        elif zs in (1, 2) and z_dense > 1 and be.zero12 == "fsdp2":
            # FSDP2 keeping the gathered parameters (counted in the weights): the reduce-scatter input of one unit,
            # its unsharded gradient in fp32 (reduce_dtype); under PP gradient sync waits for the last micro-batch
            # (as above), so the stage's whole unsharded gradient accumulates in fp32
            buf += unsharded_local * 4 if plan.pp > 1 else _fsdp_units(arch, layers, plan, has_emb or has_head, be.name)[1] * 4
        elif zs in (1, 2) and plan.dp > 1 and be.zero12 == "deepspeed":
            # DeepSpeed's reduce buckets under llmc's ds_config (fp32 reduction and accumulation): the bf16 ZeRO-2
            # buckets and their fp32 copies for the reduction, or BF16_Optimizer's flattened fp32 all-reduce (ZeRO-1)
            buf += ds_reduce_buffer_bytes(arch.d_model, zs, precision != "fp32", offload >= 1, unsharded_local,
                                          largest_tensor(arch, layers, has_emb, has_head), plan.dp)
        elif zs in (1, 2) and plan.dp > 1:
            buf += 2 * min(DS_BUCKET_ELEMS, unsharded_local) * cwb  # reduce + all-gather buckets
        elif plan.dp > 1:
            buf += 2 * DDP_BUCKET_BYTES
        out.append((w, gr, op, buf))
    out_t = tuple(out)
    _bounded(_STATIC)[key] = (structure, out_t)
    return out_t


def _fsdp_units(arch, layers, plan: ParallelPlan, has_emb_or_head: bool,
                backend: str | None = None) -> tuple[float, float]:
    """(the stage's largest block, its largest FSDP unit: that block or the embedding / head) in local parameters
    (the routed experts split as on ``backend``'s expert mesh)."""
    ediv = expert_shards(plan.dp_shard, plan.cp, plan.tp, plan.ep, backend)[0]  # the routed experts' divisor
    bkey = (id(arch), layers, plan.tp, ediv)
    bhit = _BLOCKS.get(bkey)
    if bhit is None or bhit[0] is not arch:
        bhit = (arch, _max_block_local(arch, layers, plan.tp, ediv))
        _bounded(_BLOCKS)[bkey] = bhit
    block = bhit[1]
    unit = max(block, arch.vocab_size * arch.d_model / plan.tp) if has_emb_or_head else block
    return block, unit


_GROUP_BYTES: dict[tuple, tuple] = {}


def _group_bytes(mp, z, zs, precision, optimizer_bytes_per_param, offload, grad_bytes_per_param, be):
    """(1, weights, grads, optimizer) bytes per parameter of a sharding group, / its model-parallel divisor
    ``mp``: the same arithmetic as backend_state_bytes / model_state_bytes, evaluated once per group and
    shard size instead of once per stage."""
    key = (mp, z, zs, precision, optimizer_bytes_per_param, offload, grad_bytes_per_param, id(be))
    hit = _GROUP_BYTES.get(key)
    if hit is not None and hit[0] is be:
        return hit[1]
    wb, gb, ob = _precision_bytes(precision, optimizer_bytes_per_param, grad_bytes_per_param)
    if precision != "fp32" and grad_bytes_per_param is None and optimizer_bytes_per_param == 12:
        st = backend_state_bytes(1.0, be, zero_stage=zs, shard=z, offload_optimizer=offload >= 1,
                                 offload_params=offload == 2)
    else:
        st = model_state_bytes(1.0, zero_stage=zs, shard=z, weight_bytes=wb, grad_bytes=gb, optimizer_bytes=ob,
                               offload_optimizer=offload >= 1, offload_params=offload == 2)
    out = (1.0 / mp, st["weights"] / mp, st["grads"] / mp, st["optimizer"] / mp)
    _bounded(_GROUP_BYTES)[key] = (be, out)
    return out


def backend_state_bytes(n_params: float, backend, *, zero_stage: int = 0, shard: int = 1,
                        offload_optimizer: bool = False, offload_params: bool = False) -> dict[str, float]:
    """Weights / grads / optimizer bytes of ``n_params`` under ``backend``'s mixed-precision layout
    (:mod:`llmc.compiler.backends`: replicated + sharded bytes per parameter for each ZeRO stage)."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_stage must be 0..3, got {zero_stage}")
    st = backend.states[zero_stage]
    n = max(1, int(shard))

    def part(rep_sh: tuple[float, float]) -> float:
        return n_params * (rep_sh[0] + rep_sh[1] / n)

    w, g, o = part(st.weights), part(st.grads), part(st.optimizer)
    if offload_optimizer:  # ZeRO-Offload: fp32 grads, master and moments on the CPU; bf16 weights stay
        w, g, o = n_params * 2.0 / (n if zero_stage >= 3 else 1), 0.0, 0.0
    if offload_params:  # ZeRO-Infinity: the bf16 partitions too; a layer is gathered only while it runs (buffers)
        _check_param_offload(zero_stage, offload_optimizer)
        w = 0.0
    return {"weights": w, "grads": g, "optimizer": o}


def non_allocator_bytes(plan: ParallelPlan, backend) -> float:
    """Device memory outside PyTorch's caching allocator: the CUDA context (+ cuBLAS workspace) and
    NCCL's buffers, one set per communicator this rank joins (NCCL_BUFFSIZE 4 MiB per channel and
    peer; https://docs.nvidia.com/deeplearning/nccl/user-guide/docs/env.html#nccl-buffsize).
    The ``generic`` profile keeps llmc's historical 1 GiB workspace."""
    groups = ((plan.dp_shard * plan.cp > 1) + (plan.dp_replicate > 1) + (plan.tp > 1) + (plan.pp > 1)
              + (plan.cp > 1) + (plan.ep > 1))
    return float(backend.cuda_context_bytes + groups * backend.nccl_bytes_per_peer_group)


@lru_cache(maxsize=4096)
def _max_block_local(arch: Architecture, layers: tuple[int, ...], tp: int, ediv: int) -> float:
    """Largest block of the stage after the tp / expert split (one FSDP unit; ``ediv``: the routed experts'
    model-parallel divisor, :func:`llmc.compiler.plan.expert_shards`)."""
    div = {"tp": tp, "vocab": tp, "replicated": 1, "expert": ediv}
    return max(
        (sum(n / div[_group(label)] for label, n in layer_components(arch, i).items()) for i in layers),
        default=0.0,
    )


def memory_per_gpu(
    arch: Architecture,
    plan: ParallelPlan,
    seq_len: int,
    precision: str,
    capacity_bytes: int,
    optimizer_bytes_per_param: int = 12,
    offload_optimizer: bool = False,
    *,
    grad_bytes_per_param: float | None = None,
    flash_attention: bool = True,
    backend=None,
    compile: bool | None = None,
    factors=None,
    compile_loss: bool | None = None,
    per_stage: bool = True,
    offload_params: bool = False,
    loss_chunks: int | None = None,
    cp_attention: str | None = None,
) -> MemoryNumbers:
    """Peak bytes per GPU over the pipeline stages, with the breakdown of the peak stage.

    ``allocated_bytes`` is the peak of tensors (``torch.cuda.max_memory_allocated``) on the most loaded
    stage; ``reserved_bytes`` what the caching allocator holds for it (``max_memory_reserved``: allocated
    x the backend's ``reserved_over_allocated``, x calibration ``mem_scale`` + ``mem_overhead_bytes``, never
    below allocated);
    ``per_gpu_bytes`` = reserved + the device memory outside the allocator (CUDA context, NCCL): what
    must fit in the GPU, and what ``fits`` compares with the capacity.

    ``per_stage=False`` (the search's fit checks) leaves ``per_stage_bytes`` empty and values only the
    first stage of each run of stages with the same parameters and blocks: every term is non-decreasing
    in the in-flight micro-batch count, which never rises along a run, so the peak (and every other
    field) is exactly the one of the full evaluation.

    ``compile_loss`` / ``loss_chunks`` (None: the backend's) describe a run of another release of the backend
    (the benchmark's older torchtitan rows: no chunked loss).
    """
    be = get_backend(backend) if backend is None or isinstance(backend, str) else backend
    outside = non_allocator_bytes(plan, be)
    scale = be.reserved_over_allocated * (getattr(factors, "mem_scale", 1.0) if factors is not None else 1.0)
    extra = getattr(factors, "mem_overhead_bytes", 0.0) if factors is not None else 0.0
    runs = not per_stage and scale > 0 and be.compile_act_saving <= 1.0
    values = _stage_values(arch, plan, seq_len, precision, optimizer_bytes_per_param,
                           _offload_level(offload_optimizer, offload_params), grad_bytes_per_param, flash_attention, be,
                           compile, compile_loss, loss_chunks, runs=runs, cp_attention=cp_attention)
    ceil = math.ceil

    def reserved(allocated: float) -> float:
        """allocated x scale + extra, and never below allocated: the caching allocator holds at least what it hands
        out (a calibration's negative overhead or a scale under 1 would predict less)."""
        return max(allocated, allocated * scale + extra)

    # reserved = (StageMemory.total - outside) x scale + extra; what must fit = reserved + outside
    totals = [int(ceil(reserved((w + gr + op + acts + buf) - outside) + outside))
              for _, _, w, gr, op, acts, buf in values]
    peak = totals.index(max(totals)) if len(totals) > 1 else 0  # the first stage with the peak
    s = StageMemory(*values[peak][2:])
    return MemoryNumbers(
        per_gpu_bytes=totals[peak],
        capacity_bytes=int(capacity_bytes),
        breakdown=s.as_dict(),
        per_stage_bytes=[] if runs else totals,
        allocated_bytes=int(ceil(s.total - outside)),
        reserved_bytes=int(ceil(reserved(s.total - outside))),
        outside_allocator_bytes=int(outside),
        backend=be.name,
    )


def offload_host_bytes_per_node(n_params: int, plan: ParallelPlan, gpus_per_node: int,
                                offload_params: bool = False) -> int:
    """Host memory per node under optimizer offload: every parameter is owned by one rank of each data-parallel
    replica (ZeRO shards the optimizer over dp_shard; TP / PP / EP split it first), so the hosts hold
    :data:`OFFLOAD_HOST_BYTES_PER_PARAM` x params x dp_replicate (+ :data:`OFFLOAD_PARAM_HOST_BYTES_PER_PARAM` with
    ``offload_params``), spread evenly over the nodes. Steady state: llmc's runtimes build the model on the GPU
    (ZeRO-3 under ``zero.Init``, on the host with parameter offload), never a full fp32 copy per rank on the host
    (which DeepSpeed's ZeRO-2 estimator adds as 4 B x params x GPUs)."""
    nodes = max(1, math.ceil(plan.world / max(1, gpus_per_node)))
    per_param = OFFLOAD_HOST_BYTES_PER_PARAM + (OFFLOAD_PARAM_HOST_BYTES_PER_PARAM if offload_params else 0)
    return math.ceil(per_param * n_params * plan.dp_replicate / nodes)


def fits(mem: MemoryNumbers, headroom: float | None = None) -> bool:
    """True when the peak stays under ``headroom`` x capacity. Default: :func:`llmc.compiler.backends.fit_headroom`
    (0.92 for the ``generic`` profile, a fragmentation margin; 0.95 for a backend profile, whose per_gpu_bytes already
    is the allocator's reserved memory plus the CUDA context and NCCL: the margin is the memory model's measured error;
    the capacity is the total the device reports, torch's ``total_memory``: ``hardware.GPU.hbm_bytes``)."""
    if headroom is None:
        headroom = fit_headroom(mem.backend)
    return mem.per_gpu_bytes <= headroom * mem.capacity_bytes
