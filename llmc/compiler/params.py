"""Parameter counts of a Llama-style decoder (GQA or MLA attention, SwiGLU dense or MoE FFN).

Counting follows the modules torchtitan builds (parameter names in the comments), which are the same
shapes as the Hugging Face checkpoints:

* token embedding ``tok_embeddings.weight`` [V, d]; output head ``lm_head.weight`` [V, d] unless tied (torchtitan 0.3.0 name);
  final ``norm.weight`` [d].
* per block: ``attention_norm.weight`` [d], ``ffn_norm.weight`` [d] (RMSNorm: weight only, no bias).
* GQA attention: ``wq`` [H*hd, d], ``wk``/``wv`` [KV*hd, d], ``wo`` [d, H*hd]; Qwen2-style q/k/v biases
  [H*hd] + 2*[KV*hd] when ``qkv_bias``; Qwen3's ``q_norm`` / ``k_norm`` [hd] each when ``qk_norm`` (one RMSNorm
  weight shared by every head, HF ``Qwen3Attention``), OLMo 2's [H*hd] / [KV*hd] with ``qk_norm_scope: projection``
  (HF ``Olmo2Attention``). ``norm_placement: post`` moves the two block norms, it does not add any; ``sandwich``
  (Gemma 3) adds two more, on the outputs of attention and MLP: 4 [d] a block. gpt-oss adds the o_proj bias
  ``attn/o_bias`` [d] (``attn_out_bias``) and one sink logit per query head ``attn/sinks`` [H] (``attn_sinks``;
  transformers ``GptOssAttention.sinks``).
* MLA attention (DeepSeek-V2/V3, arXiv 2405.04434 sec. 2.1): ``wq_a`` [q_lora, d], ``q_norm`` [q_lora],
  ``wq_b`` [H*(nope+rope), q_lora] (or ``wq`` [H*(nope+rope), d] when q_lora_rank is None),
  ``wkv_a`` [kv_lora+rope, d], ``kv_norm`` [kv_lora], ``wkv_b`` [H*(nope+v), kv_lora], ``wo`` [d, H*v].
* dense FFN (SwiGLU, Shazeer 2020): ``w1``/``w3`` [d_ff, d], ``w2`` [d, d_ff] -> 3*d*d_ff.
* MoE FFN: router ``moe.router.gate`` Linear(d, E, bias=router_bias); routed experts (GroupedExperts
  ``w1``/``w3`` [E, f, d], ``w2`` [E, d, f]) -> E*3*d*f; shared experts one SwiGLU of width S*f -> 3*d*S*f.
  DeepSeek-V3's ``e_score_correction_bias`` (``expert_bias``) adds E per MoE layer: a weight of the checkpoint,
  counted here, though transformers >= 5 and torchtitan register it as a buffer (outside ``parameters()``).
  gpt-oss's expert biases (``moe.expert_proj_bias``: ``gate_up_proj_bias`` [E, 2f], ``down_proj_bias`` [E, d]) are
  counted in ``moe/experts`` (E x (3 d f + 2 f + d): sharded with their experts).

Verified against the published totals in tests/test_params.py.
"""

from __future__ import annotations

from llmc.spec.families import family_of
from llmc.spec.model import Architecture

# ----------------------------------------------------------------------------- per-block components


def _mla_components(arch: Architecture) -> dict[str, int]:
    d, H = arch.d_model, arch.n_heads
    m = arch.mla
    assert m is not None
    qk = m.qk_nope_head_dim + m.qk_rope_head_dim
    out: dict[str, int] = {}
    if m.q_lora_rank is None:
        out["mla/wq"] = H * qk * d
    else:
        out["mla/wq_a"] = m.q_lora_rank * d
        out["mla/q_norm"] = m.q_lora_rank
        out["mla/wq_b"] = H * qk * m.q_lora_rank
    out["mla/wkv_a"] = (m.kv_lora_rank + m.qk_rope_head_dim) * d
    out["mla/kv_norm"] = m.kv_lora_rank
    out["mla/wkv_b"] = H * (m.qk_nope_head_dim + m.v_head_dim) * m.kv_lora_rank
    out["mla/wo"] = d * H * m.v_head_dim
    return out


def _gqa_components(arch: Architecture) -> dict[str, int]:
    d, H = arch.d_model, arch.n_heads
    hd, kv = arch.hd, arch.kv_heads
    out = {
        "attn/wq": H * hd * d,
        "attn/wkv": 2 * kv * hd * d,
        "attn/wo": d * H * hd,
    }
    if arch.qkv_bias:
        out["attn/bias"] = H * hd + 2 * kv * hd
    if arch.attn_out_bias:  # gpt-oss: o_proj's bias
        out["attn/o_bias"] = d
    if arch.attn_sinks:  # gpt-oss: one sink logit per query head
        out["attn/sinks"] = H
    if arch.qk_norm:  # over a head (one weight for every head), or over the whole q / k projection (OLMo 2)
        out["attn/qk_norm"] = 2 * hd if arch.qk_norm_scope == "head" else (H + kv) * hd
    return out


#: attention kind (``families.Family.attention``) -> its per-block parameter components
ATTENTION_COMPONENTS = {"gqa": _gqa_components, "mla": _mla_components}


def _attn_components(arch: Architecture) -> dict[str, int]:
    return ATTENTION_COMPONENTS[family_of(arch).attention](arch)


def expert_d_ff(arch: Architecture) -> int:
    """Hidden width of one routed expert (MoE.expert_d_ff, default the model's d_ff as in Mixtral)."""
    assert arch.moe is not None
    return arch.moe.expert_d_ff or arch.d_ff


def is_moe_layer(arch: Architecture, i: int) -> bool:
    """Block i has an MoE FFN (DeepSeek: the first ``dense_layers`` blocks are dense)."""
    return arch.moe is not None and i >= arch.moe.dense_layers


def n_moe_layers(arch: Architecture) -> int:
    if arch.moe is None:
        return 0
    return max(0, arch.n_layers - arch.moe.dense_layers)


def expert_params(arch: Architecture) -> int:
    """Parameters of one routed expert: its SwiGLU's 3 d f, with ``moe.expert_proj_bias`` (gpt-oss) its gate / up
    biases (2 f) and down bias (d)."""
    assert arch.moe is not None
    d, f = arch.d_model, expert_d_ff(arch)
    return 3 * d * f + (2 * f + d if arch.moe.expert_proj_bias else 0)


def _ffn_components(arch: Architecture, i: int) -> dict[str, int]:
    d = arch.d_model
    if not is_moe_layer(arch, i):
        return {"mlp/dense": 3 * d * arch.d_ff}  # w1, w2, w3 (SwiGLU)
    moe = arch.moe
    f = expert_d_ff(arch)
    out = {
        "moe/router": d * moe.num_experts + (moe.num_experts if moe.router_bias else 0),
        "moe/experts": moe.num_experts * expert_params(arch),
    }
    if moe.num_shared_experts:
        out["moe/shared"] = 3 * d * moe.num_shared_experts * f
    if getattr(moe, "expert_bias", False):
        out["moe/expert_bias"] = moe.num_experts
    return out


def layer_components(arch: Architecture, i: int) -> dict[str, int]:
    """Labelled parameter counts of block i (0-based)."""
    if not 0 <= i < arch.n_layers:
        raise IndexError(f"layer {i} out of range 0..{arch.n_layers - 1}")
    out = {"norm/attn": arch.d_model, "norm/ffn": arch.d_model}  # RMSNorm weights, no bias
    if arch.norm_placement == "sandwich":  # Gemma: a norm before and one after each of attention and MLP
        out["norm/attn_post"], out["norm/ffn_post"] = arch.d_model, arch.d_model
    out.update(_attn_components(arch))
    out.update(_ffn_components(arch, i))
    return out


def largest_tensor(arch: Architecture, layers, has_emb: bool, has_head: bool) -> int:
    """Elements of the largest single parameter tensor a model chunk holds (blocks ``layers``, with the embedding /
    output head or not), as llmc's model holds its tensors (llmc/runtime/model.py, torchtitan's layout): the
    embedding or head V x d; attention's wq, wk, wv, wo (GQA) or each MLA projection; a dense SwiGLU projection
    d x d_ff; a routed-expert projection stacked over the experts, E x f x d (``moe.experts.w1``); the shared
    experts' projection, S x f x d; the router d x E. DeepSpeed reduces a gradient larger than its reduce bucket
    on its own, whole (:func:`llmc.compiler.backends.ds_reduce_buffer_bytes`)."""
    d = arch.d_model
    sizes = [arch.vocab_size * d] if has_emb or has_head else []
    if layers:
        if arch.mla is not None:
            sizes += [n for k, n in _mla_components(arch).items() if not k.endswith("_norm")]
        else:
            sizes += [arch.n_heads * arch.hd * d, arch.kv_heads * arch.hd * d]
    for moe_block in {is_moe_layer(arch, i) for i in layers}:  # (dense blocks, MoE blocks, or both)
        if not moe_block:
            sizes.append(d * arch.d_ff)
        else:
            f, moe = expert_d_ff(arch), arch.moe
            sizes += [moe.num_experts * f * d, moe.num_shared_experts * f * d, moe.num_experts * d]
    return max(sizes, default=0)


def layer_params(arch: Architecture, i: int) -> int:
    """Parameters of block i (used for pipeline stage balancing)."""
    return sum(layer_components(arch, i).values())


# ----------------------------------------------------------------------------- whole model


def param_breakdown(arch: Architecture) -> dict[str, int]:
    """Labelled components summed over layers; the values add up to :func:`params_total`."""
    V, d = arch.vocab_size, arch.d_model
    out: dict[str, int] = {"embed/tok": V * d}
    if not arch.tied_embeddings:
        out["head/output"] = V * d
    for i in range(arch.n_layers):
        for k, v in layer_components(arch, i).items():
            out[k] = out.get(k, 0) + v
    out["norm/final"] = d
    return out


def params_total(arch: Architecture) -> int:
    return sum(param_breakdown(arch).values())


def params_embedding(arch: Architecture) -> int:
    """Input embedding plus the untied output head (a tied head is counted once, as the embedding)."""
    return arch.vocab_size * arch.d_model * (1 if arch.tied_embeddings else 2)


def params_non_embedding(arch: Architecture) -> int:
    """Kaplan et al. 2020 count non-embedding parameters (their N)."""
    return params_total(arch) - params_embedding(arch)


def inactive_expert_params(arch: Architecture) -> int:
    """Routed-expert parameters a token does not touch: (E - top_k) experts in every MoE layer."""
    if arch.moe is None:
        return 0
    moe = arch.moe
    return (moe.num_experts - moe.top_k) * expert_params(arch) * n_moe_layers(arch)


def params_active(arch: Architecture) -> int:
    """Parameters used per token: total minus the routed experts not selected (top_k of E stay).

    Router, shared experts, attention, norms and both embedding tables count as active, as in
    Mixtral's "12.9B active" and DeepSeek-V3's "37B activated" (our exact figure 37.55B includes the
    embedding and output head). Dense models: == params_total.
    """
    return params_total(arch) - inactive_expert_params(arch)


def matmul_params_active(arch: Architecture) -> int:
    """Active parameters that take part in a matmul per token: active minus the embedding lookup.

    The output head is a matmul (counted, also when tied). Norm weights and biases are kept (negligible,
    and torchtitan's ``get_nparams_and_flops`` keeps them too: it subtracts only the nn.Embedding).
    """
    emb = arch.vocab_size * arch.d_model
    if arch.tied_embeddings:
        return params_active(arch)  # the one shared matrix is used as the head matmul
    return params_active(arch) - emb


# ----------------------------------------------------------------------------- KV cache


def kv_elems_per_token_per_layer(arch: Architecture) -> int:
    """Cached elements per token per layer: GQA 2*KV*hd (K and V); MLA kv_lora + rope (the compressed
    latent c_KV and the shared RoPE key, DeepSeek-V2 sec. 2.1.2, what vLLM/SGLang cache)."""
    if family_of(arch).attention == "mla":
        assert arch.mla is not None
        return arch.mla.kv_lora_rank + arch.mla.qk_rope_head_dim
    return 2 * arch.kv_heads * arch.hd


def kv_bytes_per_token(arch: Architecture, bytes_per_elem: int | float = 2) -> int:
    """KV-cache bytes per token over all layers (GQA: 2*L*n_kv*hd*b; MLA: L*(kv_lora+rope)*b)."""
    return int(arch.n_layers * kv_elems_per_token_per_layer(arch) * bytes_per_elem)
