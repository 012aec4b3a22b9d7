"""Model architecture spec: the resolved, explicit shape of a Llama-style decoder.

A spec's ``model:`` entry is a preset name, a preset with overrides, a Hugging Face
``config.json`` path, or an explicit architecture; the loader always resolves it to one
:class:`Architecture`. This module holds declarations only: no math, no torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

#: Every spec model: unknown keys refused, frozen, and no infinities or NaN in any float field
#: (``.inf``, ``.nan`` or an overflowing ``1e400`` would turn every derived number into inf/nan).
_CFG = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def refuse_bool(value: Any) -> Any:
    """Refuse YAML ``true``/``false`` where a number is wanted: Python's bool is an int, so pydantic's lax
    mode would read ``count: true`` as 1."""
    if isinstance(value, bool):
        raise ValueError(f"must be a number, not {str(value).lower()}")
    return value


#: Largest magnitude of any integer in a spec: 2**53, the largest integer a double holds exactly. llmc's FLOP,
#: time and memory math is in doubles; a larger count is a typo, and one past ~10**308 overflows that math.
MAX_INT = 2**53


def within_max_int(value: int) -> int:
    """Refuse an integer larger in magnitude than :data:`MAX_INT`."""
    if abs(value) > MAX_INT:
        raise ValueError(f"must be at most 2**53 = {MAX_INT:,} in magnitude (got a {len(str(abs(value)))}-digit "
                         "number)")
    return value


#: An int that refuses ``true``/``false`` (and, as pydantic does, floats with a fraction) and magnitudes past
#: :data:`MAX_INT`.
Int = Annotated[int, BeforeValidator(refuse_bool), AfterValidator(within_max_int)]


def printable_label(value: str) -> str:
    """Refuse display text with control characters (NUL, escape sequences, newlines), unpaired surrogates or
    invisible format characters (bidi overrides): such a name would garble the report and the emitted files."""
    bad = next((c for c in value if not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"must be printable text (found the character U+{ord(bad):04X})")
    return value


#: Display text (a model or GPU name): printable characters only, at most 256 of them.
Label = Annotated[str, Field(max_length=256), AfterValidator(printable_label)]


#: A float that refuses ``true``/``false`` (infinities and NaN are refused by :data:`_CFG`).
Float = Annotated[float, BeforeValidator(refuse_bool)]


#: Most transformer blocks llmc plans for: published LLMs have at most ~126 (Llama 3.1 405B), the deepest
#: trained Transformer 1,000 (DeepNet, Wang et al. 2022, arXiv:2203.00555); the parallelism search
#: enumerates pipeline splits per layer count, so this also bounds its work.
MAX_LAYERS = 1024
#: Most routed experts per MoE layer: published models have at most 256 (DeepSeek-V3), the most fine-grained
#: research design 1024**2 (PEER, He 2024, arXiv:2407.04153); the search enumerates expert-parallel degrees
#: among the divisors of this number, so it also bounds that work.
MAX_EXPERTS = 2**20


class SpecModel(BaseModel):
    """Base of every spec model (:data:`_CFG`)."""

    model_config = _CFG


class MoE(SpecModel):
    """Mixture-of-experts feed-forward (Mixtral / DeepSeek-MoE style)."""

    num_experts: Int = Field(gt=0, le=MAX_EXPERTS)
    """Routed experts per MoE layer (Mixtral 8, DeepSeek-V3 256)."""
    top_k: Int = Field(gt=0)
    """Routed experts each token is sent to (Mixtral 2, DeepSeek-V3 8)."""
    num_shared_experts: Int = Field(default=0, ge=0)
    """Always-on shared experts per MoE layer (DeepSeek-V3 1)."""
    expert_d_ff: Int | None = Field(default=None, gt=0)
    """Hidden size of one expert's SwiGLU. None = the model's d_ff (Mixtral)."""
    dense_layers: Int = Field(default=0, ge=0)
    """The first N layers use a dense FFN of width d_ff (DeepSeek-V3 first_k_dense_replace=3)."""
    router_bias: bool = False
    """Router (gate) linear has a bias. Llama/Mixtral/DeepSeek: False."""
    aux_loss_coef: Float = Field(default=0.01, ge=0)
    """Load-balancing loss coefficient (Switch Transformer 0.01). 0 = none / aux-free."""
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    """Router score function (Mixtral softmax, DeepSeek-V3 sigmoid)."""
    expert_bias: bool = False
    """Learned per-expert routing bias for aux-loss-free balancing (DeepSeek-V3
    ``e_score_correction_bias``, ``topk_method: noaux_tc``): num_experts extra parameters per MoE layer."""
    expert_proj_bias: bool = False
    """Every routed expert's gate, up and down projections carry a bias (gpt-oss: transformers' ``GptOssExperts``
    ``gate_up_proj_bias`` / ``down_proj_bias``): 2 expert_d_ff + d_model extra parameters per expert. gpt-oss's block
    only (``Architecture.attn_sinks``)."""
    route_norm: bool = True
    """The picked experts' mixing weights are renormalised to sum 1 (Mixtral, Qwen3-30B-A3B, DeepSeek-V3: config.json
    ``norm_topk_prob`` true; torchtitan's ``route_norm``); false = their router scores as they are (Qwen1.5 / Qwen2
    MoE, OLMoE: ``norm_topk_prob`` false, transformers' Qwen3-MoE default)."""
    route_scale: Float = Field(default=1.0, gt=0)
    """Factor on the routed experts' combined output (DeepSeek-V3 config.json ``routed_scaling_factor`` 2.5;
    Mixtral 1.0)."""
    n_expert_groups: Int | None = Field(default=None, gt=0)
    """Node-limited routing: experts split into this many groups (DeepSeek-V3 ``n_group`` 8; arXiv:2412.19437
    sec. 2.1.2). None = no grouping."""
    n_limited_groups: Int | None = Field(default=None, gt=0)
    """Groups each token may route to (DeepSeek-V3 ``topk_group`` 4). Needs ``n_expert_groups``."""
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    """How a group of ``n_expert_groups`` is scored before the ``n_limited_groups`` best are kept: the sum of its two
    best experts' selection scores (DeepSeek-V3's node-limited routing, arXiv:2412.19437 sec. 2.1.2; config.json
    ``topk_method: noaux_tc``) or its single best score (DeepSeek-V2 / V2.5's device-limited routing,
    arXiv:2405.04434 sec. 2.2.2; config.json ``topk_method: group_limited_greedy``, transformers'
    ``DeepseekV2TopkRouter``). ``max`` needs ``n_expert_groups``."""

    @model_validator(mode="after")
    def _groups(self) -> MoE:
        g, lim = self.n_expert_groups, self.n_limited_groups
        if (g is None) != (lim is None):
            raise ValueError("give n_expert_groups and n_limited_groups together (or neither)")
        if self.group_score != "top2_sum" and g is None:
            raise ValueError(f"group_score {self.group_score} scores expert groups: give n_expert_groups and "
                             "n_limited_groups")
        if g is not None and lim is not None:
            if self.num_experts % g:
                raise ValueError(f"n_expert_groups {g} must divide num_experts {self.num_experts}")
            if lim > g:
                raise ValueError(f"n_limited_groups {lim} exceeds n_expert_groups {g}")
            if self.top_k > lim * (self.num_experts // g):
                raise ValueError(f"top_k {self.top_k} exceeds the {lim * (self.num_experts // g)} experts of "
                                 f"{lim} groups")
        return self


class MLA(SpecModel):
    """Multi-head latent attention (DeepSeek-V2/V3)."""

    q_lora_rank: Int | None = Field(default=None, gt=0)
    """Rank of the query down-projection. None = full-rank wq (DeepSeek-V2-Lite)."""
    kv_lora_rank: Int = Field(gt=0)
    """Rank of the joint KV down-projection (DeepSeek-V3 512)."""
    qk_rope_head_dim: Int = Field(gt=0)
    """Per-head dims carrying RoPE (DeepSeek-V3 64)."""
    qk_nope_head_dim: Int = Field(gt=0)
    """Per-head dims without RoPE (DeepSeek-V3 128)."""
    v_head_dim: Int = Field(gt=0)
    """Per-head value dims (DeepSeek-V3 128)."""


class Multipliers(SpecModel):
    """Fixed scalars of a muP-parametrised model (IBM Granite 3: config.json ``embedding_multiplier``,
    ``residual_multiplier``, ``attention_multiplier``, ``logits_scaling``; transformers ``modeling_granite.py``)."""

    embedding: Float = Field(default=1.0, gt=0)
    """Token embeddings are multiplied by this (Granite-3 8B: 12)."""
    residual: Float = Field(default=1.0, gt=0)
    """Each attention and FFN output is multiplied by this before its residual add (Granite-3 8B: 0.22)."""
    attention: Float | None = Field(default=None, gt=0)
    """The softmax scale of q.k (Granite-3: 1/128); None = 1/sqrt(head_dim)."""
    logits: Float = Field(default=1.0, gt=0)
    """The head's logits are divided by this (Granite-3 8B: 16)."""

    def softmax_scale(self, head_dim: int) -> float:
        """The q.k scale the model runs with: ``attention``, else the usual 1/sqrt(head_dim)."""
        return self.attention if self.attention is not None else head_dim ** -0.5


class RopeScaling(SpecModel):
    """RoPE frequency scaling for context extension."""

    type: Literal["llama3", "yarn", "linear", "longrope"]
    """Scaling rule: Llama-3.1 band scaling, YaRN, plain linear position interpolation, or LongRoPE (Phi-3 128k,
    Phi-3.5: per-frequency factors, the short ones while a sequence fits original_max_position, else the long ones)."""
    factor: Float = Field(gt=0)
    """Context extension factor (Llama-3.1: 8, YaRN for 4k->128k: 32; longrope: max_seq_len / original_max_position,
    what sets its default attention_factor)."""
    original_max_position: Int = Field(default=8192, gt=0)
    """Context length the base model was trained at."""
    low_freq_factor: Float = 1.0
    """llama3 rule only."""
    high_freq_factor: Float = 4.0
    """llama3 rule only."""
    beta_fast: Float = 32.0
    """yarn rule only."""
    beta_slow: Float = 1.0
    """yarn rule only."""
    truncate: bool = True
    """yarn rule only: the correction range [beta_fast, beta_slow] is widened to whole dims (floor / ceil), as YaRN's
    reference and transformers' default do; false keeps its fractional ends (gpt-oss: config.json
    ``rope_scaling.truncate`` false; transformers' ``_compute_yarn_parameters`` ``truncate``)."""
    short_factor: tuple[Float, ...] | None = None
    """longrope rule only: one divisor per rotary frequency (head_dim / 2 of them) while a sequence is at most
    original_max_position tokens long."""
    long_factor: tuple[Float, ...] | None = None
    """longrope rule only: the divisors for longer sequences."""
    attention_factor: Float | None = Field(default=None, gt=0)
    """longrope and yarn rules only: cos/sin scale; None = longrope's sqrt(1 + ln(factor) / ln(original_max_position)),
    yarn's 0.1 ln(factor) + 1 (1 for factor <= 1; with ``mscale`` and ``mscale_all_dim`` their ratio below),
    transformers' ``_compute_longrope_parameters`` / ``_compute_yarn_parameters`` (OLMo 3 states yarn's default,
    1.2079 for factor 8)."""
    mscale: Float | None = Field(default=None, gt=0)
    """yarn rule only, DeepSeek's YaRN (config.json ``mscale``; DeepSeek-V3 1.0, V2-Lite 0.707): with
    ``mscale_all_dim`` the cos/sin scale is m(mscale) / m(mscale_all_dim), m(k) = 0.1 k ln(factor) + 1
    (transformers' ``_compute_yarn_parameters``): 1 when the two are equal. None = not set."""
    mscale_all_dim: Float | None = Field(default=None, gt=0)
    """yarn rule only (config.json ``mscale_all_dim``): multi-head latent attention multiplies its softmax scale by
    m(mscale_all_dim)^2 (DeepSeek-V2 / V3's reference and transformers' ``DeepseekV3Attention``, torchtitan's
    deepseek_v3 ``mscale``), so with ``mscale`` equal the rotation stays pure and the temperature moves into the
    softmax. None = not set (MLA keeps its softmax scale)."""

    @model_validator(mode="after")
    def _longrope_fields(self) -> RopeScaling:
        factors = (self.short_factor, self.long_factor)
        if self.type == "longrope":
            if None in factors or len(self.short_factor) != len(self.long_factor) or not self.short_factor:
                raise ValueError("longrope needs short_factor and long_factor lists of the same length (head_dim / 2)")
            if min(self.short_factor + self.long_factor) <= 0:
                raise ValueError("longrope short_factor / long_factor values must be > 0")
        elif factors != (None, None):
            raise ValueError(f"short_factor / long_factor belong to type longrope, not {self.type}")
        elif self.attention_factor is not None and self.type != "yarn":
            raise ValueError(f"attention_factor belongs to types longrope and yarn, not {self.type}")
        if not self.truncate and self.type != "yarn":
            raise ValueError(f"truncate belongs to type yarn, not {self.type}")
        if (self.mscale is not None or self.mscale_all_dim is not None) and self.type != "yarn":
            raise ValueError(f"mscale / mscale_all_dim belong to type yarn, not {self.type}")
        return self


class Architecture(SpecModel):
    """An explicit Llama-style decoder: RMSNorm, RoPE, GQA (or MLA), SwiGLU, optional MoE."""

    name: Label = "custom"
    """Display name (the preset name when resolved from a preset)."""
    n_layers: Int = Field(gt=0, le=MAX_LAYERS)
    """Transformer blocks (at most 1024)."""
    d_model: Int = Field(gt=0)
    """Residual stream width."""
    n_heads: Int = Field(gt=0)
    """Query heads."""
    n_kv_heads: Int | None = Field(default=None, gt=0)
    """KV heads for GQA. None = n_heads (MHA); 1 = MQA. Must divide n_heads."""
    head_dim: Int | None = Field(default=None, gt=0)
    """Per-head dim. None = d_model // n_heads."""
    d_ff: Int = Field(gt=0)
    """SwiGLU hidden size of a dense FFN (Llama-3-8B 14336)."""
    vocab_size: Int = Field(gt=0)
    """Tokenizer vocabulary size, embedding rows (Llama-3 128256)."""
    tied_embeddings: bool = False
    """Output head shares the token-embedding matrix."""
    qkv_bias: bool = False
    """Bias on the q/k/v projections (Qwen2)."""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3, Qwen3-MoE; GQA models only)."""
    qk_norm_scope: Literal["head", "projection"] = "head"
    """What a q / k norm normalises: each head (Qwen3: one weight of head_dim shared by the heads) or the whole
    q / k projection output (OLMo 2, Groeneveld et al.'s OLMo 2 report, arXiv:2501.00656 sec. 3.1: one weight of
    n_heads x head_dim / n_kv_heads x head_dim). Only with ``qk_norm``."""
    norm_placement: Literal["pre", "post", "sandwich"] = "pre"
    """Where a block's RMSNorms sit: on the input of attention and of the MLP (Llama), on their outputs, before each is
    added to the residual stream (OLMo 2: h = x + norm(attention(x)), out = h + norm(mlp(h)), arXiv:2501.00656 sec.
    3.1; "post" needs ``qk_norm_scope: projection``, OLMo 2's block: M013), or on both, four a block (Gemma 2 / 3:
    h = x + norm(attention(norm(x))), out = h + norm(mlp(norm(h))), arXiv:2503.19786 sec. 2; "sandwich" is Gemma's
    block with ``norm_unit_offset``, ``activation: gelu_tanh``, ``embedding_scale``, and per-head ``qk_norm`` (Gemma 3)
    or none (Gemma 2): M015)."""
    norm_unit_offset: bool = False
    """Every RMSNorm scales by (1 + weight) instead of weight, the weights starting at 0, computed in fp32 (Gemma:
    transformers' ``Gemma3RMSNorm``; the checkpoint stores the weight so)."""
    activation: Literal["silu", "gelu_tanh", "swiglu_clamped"] = "silu"
    """The gated MLP's activation: SiLU (SwiGLU, Llama), tanh-approximated GELU (GeGLU, Gemma: config.json
    ``hidden_activation: gelu_pytorch_tanh``; Shazeer 2020), or gpt-oss's clamped SwiGLU (its experts: the gate
    clamped above at ``swiglu_limit``, the up projection to [-limit, limit], out = (up + 1) x gate x sigmoid(
    ``swiglu_alpha`` x gate); transformers' ``GptOssExperts._apply_gate``, OpenAI's gpt-oss reference
    ``swiglu``). ``swiglu_clamped`` is gpt-oss's block only (``attn_sinks``)."""
    swiglu_alpha: Float = Field(default=1.702, gt=0)
    """``activation: swiglu_clamped`` only: the sigmoid's gain (gpt-oss 1.702; config.json ``swiglu_alpha``, absent in
    the released configs: transformers' GptOssConfig default)."""
    swiglu_limit: Float = Field(default=7.0, gt=0)
    """``activation: swiglu_clamped`` only: the clamp (gpt-oss 7.0; config.json ``swiglu_limit``)."""
    attn_out_bias: bool = False
    """The attention output projection (o_proj) carries a bias too, beside the q/k/v biases of ``qkv_bias`` (gpt-oss:
    config.json ``attention_bias`` biases q, k, v and o). gpt-oss's block only (``attn_sinks``)."""
    attn_sinks: bool = False
    """One learned logit per query head joins every softmax of the attention as a key with no value, an attention
    sink (gpt-oss: ``self_attn.sinks``; OpenAI 2025, gpt-oss-120b & gpt-oss-20b model card, arXiv:2508.10925 sec.
    2.1; Xiao et al. 2023, arXiv:2309.17453): p_j = exp(s_j) / (exp(sink_h) + sum_k exp(s_k)), so a head may attend to
    nothing. The fused attention kernels llmc's trainer calls take no sink, so such a layer computes and keeps its
    scores as transformers' eager attention (``eager_attention_forward`` in modeling_gpt_oss.py) does, as a
    soft-capped one (the memory model counts them). Marks gpt-oss's block: a pre-norm GQA block with q/k/v and o_proj
    biases (``qkv_bias``, ``attn_out_bias``), sinks, and in every layer routed experts (softmax over the top-k router
    logits, ``route_norm``, a router bias, no shared experts) with ``expert_proj_bias`` and ``activation:
    swiglu_clamped``; its windowed layers (``full_attention_layers``) rotate with the one RoPE of the full ones
    (transformers' ``GptOssRotaryEmbedding``: YaRN in every layer)."""
    embedding_scale: bool = False
    """The token embeddings are multiplied by sqrt(d_model), rounded to the weights' dtype (Gemma: transformers'
    ``Gemma3TextScaledWordEmbedding``)."""
    query_pre_attn_scalar: Int | None = Field(default=None, gt=0)
    """The softmax scale is query_pre_attn_scalar^-0.5 instead of head_dim^-0.5 (Gemma 3-27B: 168 with head_dim 128;
    config.json ``query_pre_attn_scalar``). None = head_dim. Gemma's block only (M015)."""
    attn_logit_softcap: Float | None = Field(default=None, gt=0)
    """Attention logit soft-capping: every score (after the softmax scale) becomes cap x tanh(score / cap) before the
    mask and the softmax (Gemma 2: 50; Gemma Team 2024, "Gemma 2", arXiv:2408.00118 sec. 2; config.json
    ``attn_logit_softcapping``). The fused attention kernels llmc's trainer calls have no soft-capping, so such a
    layer computes and keeps its scores as transformers' eager attention does (the memory and time models count
    them). Gemma's block only (M015). None = none."""
    final_logit_softcap: Float | None = Field(default=None, gt=0)
    """Final logit soft-capping: every output logit becomes cap x tanh(logit / cap) (Gemma 2: 30; config.json
    ``final_logit_softcapping``). Gemma's block only (M015). None = none."""
    sliding_window: Int | None = Field(default=None, gt=0)
    """Sliding-window attention in every layer (Mistral-7B v0.1 4096, Phi-3-mini 2047; config.json ``sliding_window``):
    the query at position i attends to the keys at positions i - W + 1 .. i (Jiang et al. 2023, arXiv:2310.06825
    sec. 2; transformers' sliding-window causal mask). Modelled in the FLOP count, memory, timing, serving KV cache and
    llmc's trainer; GQA models only (M011). None = full causal attention."""
    full_attention_layers: tuple[Annotated[Int, Field(ge=0)], ...] = Field(default=(), max_length=MAX_LAYERS)
    """With ``sliding_window``: the layers (0-based) that attend to every earlier position while the others keep the
    window (OLMo 3: every 4th, 3, 7, ..., 31 of 32; config.json ``layer_types`` "full_attention"). ``rope_scaling``
    then applies in these layers only, the windowed ones rotating at ``rope_theta`` unscaled, as transformers'
    per-layer-type RoPE (``Olmo3RotaryEmbedding``) and vLLM's OLMo 3 ("rope scaling is only applied on full attention
    layers") do. Empty = the window in every layer. Modelled on OLMo 3's block (M014)."""
    sliding_rope_theta: Float | None = Field(default=None, gt=0)
    """With ``full_attention_layers``: the RoPE base of the windowed layers where it is not ``rope_theta``
    (config.json ``rope_parameters.sliding_attention.rope_theta``; transformers >= 5 gives OLMo 3's windowed layers
    its default 500000 whatever the full layers' base). None = ``rope_theta``."""
    rope_theta: Float = Field(default=10_000.0, gt=0)
    """RoPE base (Llama-2 10000, Llama-3 500000)."""
    nope_layers: tuple[Annotated[Int, Field(ge=0)], ...] = Field(default=(), max_length=MAX_LAYERS)
    """Layers (0-based) whose attention applies no rotary position embedding, "NoPE" (SmolLM3: every 4th layer,
    3, 7, ..., 35 of 36, after Yang et al. 2025, arXiv:2501.18795; config.json ``no_rope_layers`` 0). Their queries
    and keys carry no position: the causal mask alone orders the tokens. Empty = RoPE in every layer. GQA models
    only (M012)."""
    rotary_dim: Int | None = Field(default=None, gt=0)
    """Dimensions of each query / key head that RoPE rotates, the first ones (Phi-4-mini: 96 of 128, config.json
    ``partial_rotary_factor`` 0.75); the rest carry no position. None = the whole head. GQA models only."""
    rope_scaling: RopeScaling | None = None
    """Optional RoPE scaling for long context."""
    norm_eps: Float = Field(default=1e-5, gt=0)
    """RMSNorm epsilon."""
    max_seq_len: Int = Field(default=8192, gt=0)
    """Longest context the model is configured for (RoPE tables, serving default)."""
    moe: MoE | None = None
    """Mixture-of-experts FFN; None = dense."""
    multipliers: Multipliers | None = None
    """muP-style fixed scalars on the embeddings, residual branches, softmax and logits (Granite); None = none."""
    mla: MLA | None = None
    """Multi-head latent attention; None = standard GQA."""

    @model_validator(mode="after")
    def _fill_defaults(self) -> Architecture:
        # Frozen model: fill the "None = derive" fields once, so every consumer sees numbers.
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.head_dim is None and self.d_model % self.n_heads == 0:
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        return self

    @model_validator(mode="after")
    def _gpt_oss_block(self) -> Architecture:
        """gpt-oss's switches (``attn_sinks``, ``attn_out_bias``, ``activation: swiglu_clamped``,
        ``moe.expert_proj_bias``) are modelled together only, on gpt-oss's block (transformers' GptOssForCausalLM),
        and ``swiglu_alpha`` / ``swiglu_limit`` belong to the clamped SwiGLU."""
        m = self.moe
        parts = {"attn_sinks": self.attn_sinks, "attn_out_bias": self.attn_out_bias,
                 "activation": self.activation == "swiglu_clamped",
                 "moe.expert_proj_bias": m is not None and m.expert_proj_bias}
        if not parts["activation"] and {"swiglu_alpha", "swiglu_limit"} & self.model_fields_set and (
                self.swiglu_alpha, self.swiglu_limit) != (1.702, 7.0):
            raise ValueError(f"swiglu_alpha / swiglu_limit belong to activation swiglu_clamped, not {self.activation}")
        if not any(parts.values()):
            return self
        if not all(parts.values()):
            missing = [k for k, on in parts.items() if not on]
            raise ValueError("attn_sinks, attn_out_bias, activation: swiglu_clamped and moe.expert_proj_bias are "
                             f"modelled together only (gpt-oss's block): {', '.join(missing)} not set")
        other = [k for k, on in (
            ("qkv_bias: false", not self.qkv_bias), ("mla", self.mla is not None), ("qk_norm", self.qk_norm),
            (f"norm_placement {self.norm_placement}", self.norm_placement != "pre"),
            ("norm_unit_offset", self.norm_unit_offset), ("embedding_scale", self.embedding_scale),
            ("query_pre_attn_scalar", self.query_pre_attn_scalar is not None),
            ("attn_logit_softcap", self.attn_logit_softcap is not None),
            ("final_logit_softcap", self.final_logit_softcap is not None), ("nope_layers", bool(self.nope_layers)),
            ("rotary_dim", self.partial_rotary is not None), ("multipliers", self.multipliers is not None),
            ("sliding_rope_theta", self.sliding_rope_theta is not None),
            ("moe.num_shared_experts", m.num_shared_experts > 0), ("moe.dense_layers", m.dense_layers > 0),
            ("moe.score_func sigmoid", m.score_func != "softmax"), ("moe.route_norm: false", not m.route_norm),
            ("moe.router_bias: false", not m.router_bias), ("moe.expert_bias", m.expert_bias),
            ("moe.route_scale", m.route_scale != 1.0), ("moe.n_expert_groups", m.n_expert_groups is not None)) if on]
        if other:
            raise ValueError(f"gpt-oss's block with {', '.join(other)} is not modelled (a pre-norm GQA block with q/k/v "
                             "biases, every layer's experts routed by a softmax over the top-k biased router logits, "
                             "no shared experts)")
        return self

    @property
    def window_rope_apart(self) -> bool:
        """The windowed layers of a mixed-window model rotate with a RoPE of their own, unscaled at
        ``window_rope_theta`` (OLMo 3, Gemma 3); False where every layer takes the model's one RoPE (gpt-oss:
        ``GptOssRotaryEmbedding``, its YaRN in every layer; models whose window is in every layer or none)."""
        return bool(self.full_attention_layers) and not self.attn_sinks

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def window_rope_theta(self) -> float:
        """The RoPE base of the windowed layers: ``sliding_rope_theta``, else ``rope_theta``."""
        return self.sliding_rope_theta or self.rope_theta

    def layer_window(self, layer: int) -> int | None:
        """The attention window of ``layer`` (0-based): ``sliding_window``, or None (every earlier position)."""
        return None if layer in self.full_attention_layers else self.sliding_window

    @property
    def partial_rotary(self) -> int | None:
        """``rotary_dim`` when RoPE rotates only part of each head (Phi-4-mini), else None (the whole head)."""
        return self.rotary_dim if self.rotary_dim is not None and self.rotary_dim < self.hd else None

    @property
    def is_moe(self) -> bool:
        return self.moe is not None
