"""Training / forward FLOPs per token, recomputation FLOPs and total training compute.

Convention (one, used everywhere in llmc, the one torchtitan uses for its MFU log line so that the
planned and the measured MFU agree):

    train FLOPs/token = 6 * N_mm + 6 * L * s * H * (d_qk + d_v)

* ``N_mm`` = active parameters that take part in a matmul per token: all active parameters minus the
  token-embedding lookup (which is a gather, no FLOPs); the output head is a matmul and is included
  (also when tied). MoE: only the top_k routed experts + shared experts + router (params.params_active).
  The factor 6 = 2 FLOPs per multiply-add x (1 forward + 2 backward matmuls) -- Kaplan et al. 2020
  sec. 2.1, "C = 6N" per token.
* attention scores (Q K^T) and weighted values (A V): per token per layer 2*s*H*d_qk + 2*s*H*d_v
  forward, x3 for forward+backward -> 6*L*s*H*(d_qk+d_v). This is PaLM (Chowdhery et al. 2022,
  App. B: 6N + 12*L*H*Q*T) and Megatron-LM (Narayanan et al. 2021, eq. 3: the 12*s*l*h term) and
  torchtitan ``get_dense_model_nparams_and_flops``.
* **Sliding-window attention** (``model.sliding_window`` W): each query attends to at most W keys, so the
  attention term counts min(s, W) keys per query instead of s in each windowed layer (every layer, or all but
  ``model.full_attention_layers``, which count s): 6*L*min(s, W)*H*(d_qk+d_v) with the window everywhere. This is
  Megatron-Bridge's convention (``transformer_flops`` in megatron/bridge/training/utils/flop_utils.py: its sliding-
  window layers' core attention uses ``swa_context = min(window, seq_len)`` where full layers use seq_len), so the
  two stay comparable; it counts the useful band, not the work of a kernel that computes the whole square and masks
  it (``timing.py`` times llmc's masked kernel).
* **gpt-oss** (``attn_sinks``): its sink logits (one per head, a column of the softmax: elementwise work) and its
  biases (q/k/v, o_proj, router, experts: an add per output, counted as parameters in N_mm, i.e. 6 FLOPs each, not
  the 3 an add costs forward and backward) are under 0.1 % of its matmul FLOPs and stay in the convention as they
  are; its windowed layers (every other one, W = 128) count min(s, 128) keys, the full ones s.
* **No causal halving.** With a causal mask only about half the score entries are needed (FlashAttention
  skips masked blocks), so "useful" attention FLOPs are half of this term. PaLM, Megatron and torchtitan
  all count the full s x s product; so do we (``attention_flops_per_token(..., causal_halved=True)``
  gives the halved variant for comparison).
* Recomputation (activation checkpointing, FlashAttention's backward recompute) is excluded: these are
  *model* FLOPs (MFU). :func:`recompute_flops_per_token` gives the extra work for HFU.
* Per part (:func:`linear_flops_by_part`): 6 N_mm split into the attention projections, the dense /
  shared-expert FFNs, the routed experts, the router, the output head and the rest (norms, biases). A
  low-precision recipe converts some of these parts only (fp8: never the head;
  ``backends.fp8_converted_parts``), and the time model speeds up those FLOPs (:func:`linear_share`).
"""

from __future__ import annotations

from llmc.compiler.params import (
    expert_d_ff,
    layer_components,
    matmul_params_active,
    params_active,
)
from llmc.spec.families import family_of
from llmc.spec.model import Architecture

CONVENTION: str = (
    "torchtitan/Megatron-LM/PaLM: 6*N_matmul_active + 6*L*s*n_heads*(d_qk+d_v) per token (fwd+bwd); "
    "N excludes the embedding lookup and includes the output head; MoE counts top_k+shared experts; "
    "attention NOT halved for the causal mask; recompute excluded (model FLOPs, for MFU)"
)


def _attn_dims(arch: Architecture) -> tuple[int, int]:
    """(d_qk, d_v) per head. MLA: q/k carry nope+rope dims, v its own (DeepSeek-V3 192 / 128)."""
    if family_of(arch).attention == "mla":
        assert arch.mla is not None
        return arch.mla.qk_nope_head_dim + arch.mla.qk_rope_head_dim, arch.mla.v_head_dim
    return arch.hd, arch.hd


def attention_keys(arch: Architecture, seq_len: int) -> int:
    """Keys per query that the attention term counts, summed over the layers: seq_len in each, min(seq_len, W) in a
    layer with a sliding window W (every layer, or all but ``full_attention_layers``)."""
    w = arch.sliding_window
    if not w:
        return arch.n_layers * seq_len
    n_full = len(arch.full_attention_layers)
    return n_full * seq_len + (arch.n_layers - n_full) * min(seq_len, w)


def attention_span(arch: Architecture, seq_len: int) -> float:
    """Keys per query that the attention term counts, the mean over the layers (:func:`attention_keys` / L)."""
    return attention_keys(arch, seq_len) / arch.n_layers


def attention_flops_per_token(
    arch: Architecture, seq_len: int, *, causal_halved: bool = False, backward: bool = True
) -> float:
    """Score + value FLOPs per token, all layers: 2*L*s*H*(d_qk+d_v) forward, x3 with backward; L*s is
    :func:`attention_keys` (min(s, W) keys in a layer with a sliding window W).

    Narayanan et al. 2021 eq. 3 / PaLM App. B (not halved); ``causal_halved`` divides by 2.
    """
    dqk, dv = _attn_dims(arch)
    fwd = 2.0 * attention_keys(arch, seq_len) * arch.n_heads * (dqk + dv)
    f = fwd * (3 if backward else 1)
    return f / 2 if causal_halved else f


def forward_flops_per_token(arch: Architecture, seq_len: int, *, attention: bool = True) -> float:
    """Forward pass: 2*N_mm + 2*L*s*H*(d_qk+d_v) (Kaplan et al. 2020 Table 1, C_forward)."""
    f = 2.0 * matmul_params_active(arch)
    if attention:
        f += attention_flops_per_token(arch, seq_len, backward=False)
    return f


def convention(arch: Architecture) -> str:
    """:data:`CONVENTION`, with the sliding-window span where the model has one."""
    w = arch.sliding_window
    if not w:
        return CONVENTION
    where = (f" in {arch.n_layers - len(arch.full_attention_layers)} of {arch.n_layers} layers"
             if arch.full_attention_layers else "")
    return CONVENTION + f"; s = min(seq_len, sliding_window {w}){where} (Megatron-Bridge's windowed term)"


def train_flops_per_token(arch: Architecture, seq_len: int, *, attention: bool = True) -> float:
    """Forward + backward model FLOPs per token = 3 x forward (backward = 2 x forward: gradients w.r.t.
    inputs and weights). See :data:`CONVENTION`. ``attention=False`` gives the pure 6N part."""
    return 3.0 * forward_flops_per_token(arch, seq_len, attention=attention)


def _head_params(arch: Architecture) -> int:
    return arch.vocab_size * arch.d_model


def recompute_flops_per_token(arch: Architecture, seq_len: int, ac_mode: str) -> float:
    """Extra forward FLOPs per token spent on activation recomputation (HFU - MFU numerator).

    * ``none``: 0.
    * ``full``: every transformer block is re-run once in the backward (torchtitan wraps each block in
      ``checkpoint_wrapper``; the output head is not recomputed): 2*(N_mm - V*d) + attention forward.
      Hence "full AC = 8N instead of 6N" (+33%, Narayanan et al. 2021's 96 vs 72).
    * ``selective``: torchtitan's per-op SAC saves the outputs of every *other* matmul and of attention
      and recomputes the rest (elementwise ops and every second mm): we count half of the block matmul
      forward FLOPs, and no attention recompute. (Korthikanti et al. 2022's selective recompute instead
      recomputes only Q K^T/softmax/A V: 2*L*s*H*(d_qk+d_v); with FlashAttention that recompute already
      happens inside the kernel's backward and is not counted.) Approximation: for MoE the alternation
      is over the linears actually called, which this halving only approximates.
    * ``selective_core`` (``selective`` on backends that recompute only the attention core: llmc's runtime,
      Megatron-Core's default ``recompute_modules=["core_attn"]``): the attention forward once more.
    """
    if ac_mode == "none":
        return 0.0
    block_mm = 2.0 * (matmul_params_active(arch) - _head_params(arch))
    if ac_mode == "full":
        return block_mm + attention_flops_per_token(arch, seq_len, backward=False)
    if ac_mode == "selective":
        return 0.5 * block_mm
    if ac_mode == "selective_core":
        return attention_flops_per_token(arch, seq_len, backward=False)
    raise ValueError(f"unknown activation checkpointing mode {ac_mode!r}")


def loss_recompute_flops_per_token(arch: Architecture) -> float:
    """Extra FLOPs per token of a loss computed in slices, each slice's logits recomputed in the backward so that
    only one slice's exist at a time (llmc's native trainer, ``ParallelPlan.loss_chunk_tokens``): the output head's
    forward once more, 2*V*d (its backward is not repeated; the cross-entropy itself is elementwise)."""
    return 2.0 * _head_params(arch)


def hardware_flops_per_token(arch: Architecture, seq_len: int, ac_mode: str) -> float:
    """Model FLOPs + recompute FLOPs (numerator of HFU)."""
    return train_flops_per_token(arch, seq_len) + recompute_flops_per_token(arch, seq_len, ac_mode)


def training_flops(arch: Architecture, seq_len: int, tokens: float, *, attention: bool = True) -> float:
    """Total training model FLOPs for ``tokens`` tokens at sequence length ``seq_len``."""
    return train_flops_per_token(arch, seq_len, attention=attention) * float(tokens)


def six_nd(n_params: float, tokens: float) -> float:
    """The textbook C = 6*N*D (Kaplan et al. 2020; Hoffmann et al. 2022): dense part only, N as given."""
    return 6.0 * float(n_params) * float(tokens)


def attention_share(arch: Architecture, seq_len: int) -> float:
    """Fraction of training FLOPs spent in attention scores/values (grows linearly with seq_len)."""
    return attention_flops_per_token(arch, seq_len) / train_flops_per_token(arch, seq_len)


#: the groups of linears a low-precision recipe converts or leaves alone, named by what they are in the model:
#: ``attention`` = the attention projections (GQA wq, wk, wv, wo; MLA wq / wq_a, wq_b, wkv_a, wkv_b, wo);
#: ``mlp`` = the SwiGLU linears of the dense FFNs and of the MoE shared experts (nn.Linear modules in
#: torchtitan, TE linears in Megatron-Core); ``experts`` = the routed experts' grouped GEMMs (torchtitan
#: ``GroupedExperts``: 3-D parameters, no nn.Linear); ``router`` = the MoE gate; ``head`` = the output
#: projection (tied or not). ``other`` holds the rest of N_mm (norm weights, biases, attention sinks), which
#: the convention counts and no GEMM runs.
LINEAR_PARTS = ("attention", "mlp", "experts", "router", "head")
_ATTENTION_MATRICES = frozenset({"attn/wq", "attn/wkv", "attn/wo", "mla/wq", "mla/wq_a", "mla/wq_b",
                                 "mla/wkv_a", "mla/wkv_b", "mla/wo"})
_MLP_MATRICES = frozenset({"mlp/dense", "moe/shared"})


def matmul_params_by_part(arch: Architecture, *, active: bool = True) -> dict[str, float]:
    """Parameters of each part of the model (:data:`LINEAR_PARTS` and ``other``), summed over the layers, from
    the per-block components of params.py. ``active``: the routed experts a token uses (top_k of E in every
    MoE layer, as :func:`params.params_active`); then the values add up to N_mm
    (:func:`params.matmul_params_active`), so 6 x each value is that part's share of the 6 N_mm of
    :data:`CONVENTION`. ``active=False``: every expert (the weights a rank casts). The routed experts'
    matrices are E x 3 d f per MoE layer; their biases (gpt-oss) and the router's bias go to ``other``."""
    out = dict.fromkeys((*LINEAR_PARTS, "other"), 0.0)
    d = arch.d_model
    for i in range(arch.n_layers):
        for label, n in layer_components(arch, i).items():
            if label in _ATTENTION_MATRICES:
                out["attention"] += n
            elif label in _MLP_MATRICES:
                out["mlp"] += n
            elif label == "moe/experts":
                moe = arch.moe
                used = moe.top_k if active else moe.num_experts
                matrices = 3 * d * expert_d_ff(arch)
                out["experts"] += used * matrices
                out["other"] += used * (n / moe.num_experts - matrices)  # expert biases (gpt-oss)
            elif label == "moe/router":
                out["router"] += d * arch.moe.num_experts
                out["other"] += n - d * arch.moe.num_experts
            else:
                out["other"] += n
    out["head"] = float(arch.vocab_size * d)  # a matmul, also when tied (CONVENTION)
    out["other"] += d  # the final norm
    return out


def linear_flops_by_part(arch: Architecture) -> dict[str, float]:
    """Training FLOPs per token (forward + backward, 6 per active parameter, as :data:`CONVENTION`) of each
    part of :func:`matmul_params_by_part`; with the attention scores and values
    (:func:`attention_flops_per_token`) they add up to :func:`train_flops_per_token`."""
    return {k: 6.0 * v for k, v in matmul_params_by_part(arch).items()}


def linear_share(arch: Architecture, seq_len: int, parts) -> float:
    """Fraction of the training FLOPs per token spent in the linears of ``parts`` (names of
    :data:`LINEAR_PARTS`): what a recipe that converts those linears (fp8) speeds up, next to
    :func:`attention_share`."""
    by_part = linear_flops_by_part(arch)
    return sum(by_part[p] for p in parts) / train_flops_per_token(arch, seq_len)


__all__ = [
    "CONVENTION",
    "attention_flops_per_token",
    "attention_share",
    "forward_flops_per_token",
    "hardware_flops_per_token",
    "linear_flops_by_part",
    "linear_share",
    "matmul_params_by_part",
    "params_active",
    "recompute_flops_per_token",
    "six_nd",
    "train_flops_per_token",
    "training_flops",
]
