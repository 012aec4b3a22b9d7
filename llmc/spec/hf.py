"""Import a Hugging Face ``config.json`` as an :class:`~llmc.spec.model.Architecture`.

Supported ``model_type`` values: those of :data:`llmc.spec.families.FAMILIES` (``llama``, ``mistral``, ``phi3``,
``granite``, ``smollm3``, ``olmo2``, ``olmo3``, ``olmoe``, ``gemma2``, ``gemma3_text``, ``qwen2``, ``qwen3``, ``qwen3_moe``, ``mixtral``, ``glm4_moe``,
``gpt_oss``, ``deepseek_v2``, ``deepseek_v3``; ``kimi_k2``, Kimi K2's DeepSeek-V3 model, as ``deepseek_v3``). The mapping is a plain key-by-key translation (no math
beyond copying numbers), with one hook per family for its extra parts (MoE, MLA):

=============================  =====================================
HF key                         Architecture field
=============================  =====================================
num_hidden_layers              n_layers (at most 1024, checked before a per-layer list is derived from it)
hidden_size                    d_model
intermediate_size              d_ff
num_attention_heads            n_heads
num_key_value_heads            n_kv_heads (absent = n_heads)
head_dim                       head_dim (DeepSeek-V3: qk_nope + qk_rope)
vocab_size                     vocab_size
tie_word_embeddings            tied_embeddings
attention_bias                 qkv_bias (qwen2: always True)
(model_type qwen3, qwen3_moe)  qk_norm (Qwen3 always normalises q and k heads)
use_sliding_window: true       sliding_window with max_window_layers 0; none with max_window_layers (absent: 28)
                               at least num_hidden_layers (Qwen2Config / Qwen3Config then window no layer); else
                               refused (Qwen2 / Qwen3 window the layers from max_window_layers on; llmc models one
                               window for every layer); a given layer_types decides instead
sliding_window                 sliding_window where use_sliding_window is not false (Mistral, Phi-3): every layer;
                               0, or at least max_position_embeddings (never binds): none
layer_types                    all "sliding_attention": sliding_window; all "full_attention": none; mixed: refused
                               but for olmo3 / gemma2 / gemma3_text (full_attention_layers: the "full_attention"
                               ones; absent: every 4th / every 2nd / every sliding_window_pattern-th, default 6)
(model_type gemma3_text,       Gemma's block: norm_placement sandwich, norm_unit_offset, activation gelu_tanh
 gemma2)                       (hidden_activation gelu_pytorch_tanh), embedding_scale, per-head qk_norm (Gemma 3
                               only); query_pre_attn_scalar (kept where not head_dim), attn_logit_softcapping /
                               final_logit_softcapping -> attn_logit_softcap / final_logit_softcap (gemma2 absent:
                               50 / 30), rope_local_base_freq -> sliding_rope_theta (gemma3_text); bidirectional
                               attention, biases refused
rope_theta / rope_scaling      rope_theta / rope_scaling: llama3, yarn, linear, longrope (short_factor, long_factor,
                               original_max_position_embeddings (phi3: top level), factor (absent: max_position /
                               original, as transformers), attention_factor); phi3 reads su / yarn as longrope, as
                               transformers' Phi3Config does; a key transformers requires for the type missing
                               (llama3: factor, low_freq_factor, high_freq_factor; linear / yarn: factor; longrope:
                               short_factor, long_factor): refused, as transformers refuses it
partial_rotary_factor (phi3)   rotary_dim = int(head_dim x factor) when below 1 (Phi-4-mini 0.75: 96 of 128)
(model_type olmo2)             qk_norm over the projections, norm_placement post (OLMo 2's block); attention_bias
                               true refused
(model_type olmoe)             qk_norm over the projections in a pre-norm block; num_experts, num_experts_per_tok,
                               router_aux_loss_coef, norm_topk_prob -> moe (experts intermediate_size wide);
                               attention_bias / clip_qkv refused
no_rope_layers (smollm3)       nope_layers: the layers flagged 0 (absent: every no_rope_layer_interval-th, default
                               4); attention_bias / mlp_bias / use_sliding_window true refused
embedding_multiplier, ...      multipliers.embedding / residual / attention / logits (granite: *_multiplier,
                               logits_scaling); attention_bias / mlp_bias true refused (o_proj and MLP biases)
max_position_embeddings        max_seq_len
rms_norm_eps                   norm_eps
num_local_experts, *_per_tok   moe.num_experts, moe.top_k (mixtral)
num_experts, *_per_tok,        moe.num_experts (or num_local_experts), moe.top_k, moe.expert_d_ff,
                               moe.aux_loss_coef (qwen3_moe;
moe_intermediate_size,         mlp_only_layers [0..N-1] -> moe.dense_layers N; other dense-layer placements,
router_aux_loss_coef           decoder_sparse_step != 1 refused; norm_topk_prob -> moe.route_norm (absent: false,
                               transformers' default))
n_routed_experts, ...          moe.* and mla.* (deepseek_v3; routed_scaling_factor, n_group, topk_group ->
                               moe.route_scale, n_expert_groups, n_limited_groups; topk_method noaux_tc or
                               absent -> moe.expert_bias, as transformers' DeepseekV3TopkRouter always adds
                               e_score_correction_bias; norm_topk_prob -> moe.route_norm, absent: true;
                               deepseek_v2: softmax, route_norm false, no expert bias; topk_method
                               group_limited_greedy -> n_group / topk_group with moe.group_score max (a group
                               scored by its best expert); moe_layer_freq != 1, norm_topk_prob true refused)
(model_type glm4_moe)          attention_bias -> qkv_bias (Glm4MoeAttention biases q/k/v, never o_proj); use_qk_norm ->
                               per-head qk_norm; partial_rotary_factor (top level or in rope_parameters; absent: 0.5,
                               Glm4MoeConfig's) -> rotary_dim; n_routed_experts (or num_local_experts),
                               num_experts_per_tok, n_shared_experts, moe_intermediate_size, first_k_dense_replace,
                               routed_scaling_factor, n_group / topk_group, norm_topk_prob -> moe.* with sigmoid
                               scores and moe.expert_bias (Glm4MoeTopkRouter always adds e_score_correction_bias), no
                               aux loss; num_nextn_predict_layers (the MTP layers after the last one) is not part of
                               the model, as for deepseek_v3 (transformers builds none)
rope_scaling mscale,           rope_scaling.mscale / mscale_all_dim (DeepSeek's YaRN)
mscale_all_dim
rope_scaling truncate          rope_scaling.truncate (yarn; absent: true, transformers' default; gpt-oss: false)
(model_type gpt_oss)           gpt-oss's block: attention_bias (absent: true; false refused) -> qkv_bias and
                               attn_out_bias, attn_sinks, activation swiglu_clamped with swiglu_alpha / swiglu_limit
                               (absent: 1.702 / 7.0), num_local_experts (or num_experts), num_experts_per_tok,
                               router_aux_loss_coef -> moe with router_bias, expert_proj_bias, softmax over the
                               top-k logits (route_norm), experts intermediate_size wide in every layer;
                               layer_types (absent: the window in every other layer, layers 1, 3, ... full) ->
                               full_attention_layers, sliding_window absent: 128; the one RoPE (GptOssConfig's
                               default: YaRN x32 from 4096, truncate false, base 150000) in every layer. The
                               released configs' quantization_config (mxfp4 experts) does not change the
                               architecture (the loader refuses such weights)
quantization_config            not read: a GPTQ / AWQ / bitsandbytes / FP8 release imports as the architecture it
                               quantizes; its weights are not read (an init_hf naming it: G018)
architectures                  absent or the causal LM of its model_type (:data:`CAUSAL_LM_CLASS`), else refused
                               (a sequence-classification head, another model's class)
=============================  =====================================

What the trained model leaves out of an imported config is said, not dropped silently (:func:`hf_config_notices`;
the loader's S008 / S009): the MTP layers ``num_nextn_predict_layers`` counts (warning: neither trained nor exported,
as transformers builds none), a training regulariser transformers applies in ``train()`` (``attention_dropout``,
Mixtral's ``router_jitter_noise``, Phi-3's ``resid_pdrop``: warning, llmc trains without it), and a key llmc reads for
other model_types that this one's class ignores as well (info: ``attn_logit_softcapping`` on Llama, ...).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from llmc.rope import rope_attention_factor
from llmc.spec.families import SUPPORTED_MODEL_TYPES, family_for_model_type
from llmc.spec.model import MAX_LAYERS, MLA, Architecture, MoE, Multipliers, RopeScaling

#: the fields of :func:`checkpoint_differences` that change which tensors a checkpoint holds, or their shapes: a
#: difference elsewhere (RoPE, norm epsilon, window, soft-capping, activation, routing rule, ...) leaves the weights
#: loadable into the spec's model, which would then compute another function with them
SHAPE_FIELDS = frozenset({
    "n_layers", "d_model", "n_heads", "n_kv_heads", "hd", "d_ff", "vocab_size", "tied_embeddings", "qkv_bias",
    "qk_norm", "qk_norm_scope", "norm_placement", "attn_out_bias", "attn_sinks", "mla", "moe", "moe.num_shared_experts",
    "moe.dense_layers", "moe.router_bias", "moe.expert_proj_bias", "moe.expert_d_ff"})
#: RopeScaling's fields per type (its docstrings: "llama3 rule only", ...), what a difference line prints
_ROPE_FIELDS = {
    "linear": ("factor",), "llama3": ("factor", "original_max_position", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor", "original_max_position", "beta_fast", "beta_slow", "truncate", "attention_factor", "mscale",
             "mscale_all_dim"),
    "longrope": ("factor", "original_max_position", "attention_factor", "short_factor", "long_factor")}


def rope_text(rs: Any) -> str:
    """A :class:`RopeScaling` as a difference line prints it: its type and that type's fields only (unset optional
    ones left out; longrope's factor lists by their length)."""
    if rs is None:
        return "none"
    parts = []
    for f in _ROPE_FIELDS.get(rs.type, ()):
        v = getattr(rs, f)
        if v is None:
            continue
        parts.append(f"{f}=<{len(v)} factors>" if isinstance(v, tuple) else f"{f}={v}")
    return f"{rs.type}({', '.join(parts)})"


def checkpoint_differences(arch: Any, theirs: Any, *, shapes_only: bool = False) -> list[str]:
    """What differs between the spec's model ``arch`` and the model a checkpoint's config.json describes (``theirs``,
    :func:`architecture_from_hf_config`), field by field: the plan refuses a stage's ``init_hf`` with any (G021) and
    ``llmc.runtime.hf_io`` a checkpoint it loads (its weights would not be the spec's model). ``shapes_only``: only
    the differences in :data:`SHAPE_FIELDS` (the weights would not even fit the spec's model)."""
    bad: list[tuple[str, str]] = []
    # MLA: K and V have n_heads heads whatever n_kv_heads says, and its head dims are the mla ones
    fields_ = ("n_layers", "d_model", "n_heads", "n_kv_heads", "hd", "d_ff", "vocab_size", "tied_embeddings",
               "qkv_bias", "qk_norm", "rope_theta", "norm_eps", "qk_norm_scope", "norm_placement", "nope_layers",
               "full_attention_layers", "norm_unit_offset", "activation", "embedding_scale", "query_pre_attn_scalar",
               "attn_logit_softcap", "final_logit_softcap", "partial_rotary", "attn_out_bias", "attn_sinks",
               "swiglu_alpha", "swiglu_limit", "sliding_window")
    for f in fields_ if arch.mla is None else [f for f in fields_ if f not in ("n_kv_heads", "hd")]:
        a, b = getattr(arch, f), getattr(theirs, f)
        if a != b:
            bad.append((f, f"{f} {a} (spec) != {b} (checkpoint)"))
    if arch.mla != theirs.mla:
        bad.append(("mla", f"mla {arch.mla} (spec) != {theirs.mla} (checkpoint)"))
    if (arch.moe is None) != (theirs.moe is None) or (
            arch.moe is not None and (arch.moe.num_experts, arch.moe.top_k) != (theirs.moe.num_experts,
                                                                                theirs.moe.top_k)):
        bad.append(("moe", "mixture-of-experts settings differ"))
    elif arch.moe is not None:
        for f in ("route_scale", "n_expert_groups", "n_limited_groups", "group_score", "num_shared_experts",
                  "dense_layers", "score_func", "router_bias", "route_norm", "expert_proj_bias"):
            a, b = getattr(arch.moe, f), getattr(theirs.moe, f)
            if a != b:
                bad.append((f"moe.{f}", f"moe.{f} {a} (spec) != {b} (checkpoint)"))
        a, b = arch.moe.expert_d_ff or arch.d_ff, theirs.moe.expert_d_ff or theirs.d_ff  # None = d_ff
        if a != b:
            bad.append(("moe.expert_d_ff", f"moe.expert_d_ff {a} (spec) != {b} (checkpoint)"))
    rs_a, rs_b = arch.rope_scaling, theirs.rope_scaling
    if (rs_a is None) != (rs_b is None) or (rs_a is not None and (
            (rs_a.type, rs_a.factor, rs_a.mscale_all_dim, rs_a.truncate)
            != (rs_b.type, rs_b.factor, rs_b.mscale_all_dim, rs_b.truncate)
            or abs(rope_attention_factor(rs_a) - rope_attention_factor(rs_b)) > 1e-9)):
        bad.append(("rope_scaling", f"rope_scaling {rope_text(rs_a)} (spec) != {rope_text(rs_b)} (checkpoint)"))
    return [text for f, text in bad if not shapes_only or f in SHAPE_FIELDS]


__all__ = ["checkpoint_differences", "SHAPE_FIELDS", "rope_text", "HFConfigError", "HFProblem", "hint_for", "hf_config_notices",
           "architectures_problem", "CAUSAL_LM_CLASS", "MTP_TYPES", "mtp_layers", "mtp_prefixes", "HF_ACTIVATIONS", "HF_KEY_FOR_FIELD", "architecture_from_hf_config", "fold_rope_parameters",
           "quantization_method",
           "language_model_config", "SUPPORTED_MODEL_TYPES"]


#: Architecture field -> the config.json key it is read from (to name the key in error messages).
HF_KEY_FOR_FIELD: dict[str, str] = {
    "n_layers": "num_hidden_layers", "d_model": "hidden_size", "d_ff": "intermediate_size",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "vocab_size": "vocab_size", "tied_embeddings": "tie_word_embeddings", "qkv_bias": "attention_bias",
    "rope_theta": "rope_theta", "rope_scaling": "rope_scaling", "norm_eps": "rms_norm_eps",
    "max_seq_len": "max_position_embeddings",
}


class HFProblem(str):
    """One line of what is wrong with (or worth knowing about) a config.json: the message, with the ``hint`` that
    says what to do (:func:`hint_for` where the raising code gives none) and the ``key`` it names where a caller
    completes the hint (``model_type``: the loader's did-you-mean)."""

    hint: str
    key: str | None

    def __new__(cls, message: str, hint: str = "", key: str | None = None) -> HFProblem:
        obj = super().__new__(cls, message)
        obj.hint = hint or getattr(message, "hint", "")
        obj.key = key or getattr(message, "key", None)
        return obj


def hint_for(message: str) -> str:
    """The hint of an import error ``message``: its own (:class:`HFProblem`), else what fixes that kind of line."""
    if getattr(message, "hint", ""):
        return message.hint  # type: ignore[attr-defined]
    if " has no " in message or message.startswith("config.json has no"):
        return ("add the key to config.json as the model's release writes it: transformers' config class for this "
                "model_type reads it")
    if " must " in message:
        return "fix the value in config.json: the type and range transformers' config class gives the key"
    return ("llmc imports a config only where it trains the model transformers builds from it: use a config without "
            "this, or describe the model in the spec instead: `model: {preset: NAME, ...}` with overrides, "
            "`llmc presets` lists them")


class HFConfigError(ValueError):
    """The config.json cannot be imported; ``messages`` say why (and what is supported), one per problem, each an
    :class:`HFProblem` with its hint (``hints``)."""

    def __init__(self, *problems: str) -> None:
        super().__init__(*(p if isinstance(p, HFProblem) else HFProblem(p) for p in problems))

    @property
    def messages(self) -> list[str]:
        return [str(a) for a in self.args]

    @property
    def problems(self) -> list[HFProblem]:
        return list(self.args)

    @property
    def hints(self) -> list[str]:
        return [hint_for(a) for a in self.args]

    def __str__(self) -> str:
        return "; ".join(self.messages)


def fold_rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` with its RoPE parameters in the ``rope_theta`` / ``rope_scaling`` keys of the released configs, as
    transformers >= 5 resolves them (``RotaryEmbeddingConfigMixin.convert_rope_params_to_dict``): a ``rope_scaling``
    object replaces ``rope_parameters`` (how transformers >= 5 saves every config), and a ``rope_theta`` inside it wins
    over the top-level one. Parameters per layer kind (OLMo 3, Gemma 3: ``{"full_attention": ...,
    "sliding_attention": ...}``) fold the full-attention layers' (llmc's ``rope_scaling`` applies there only;
    :func:`_layer_kinds` reads the windowed layers')."""
    rs = cfg.get("rope_scaling")
    rp = rs if isinstance(rs, dict) and rs else cfg.get("rope_parameters")
    if isinstance(rp, dict) and "full_attention" in rp:
        rp = rp["full_attention"]
    if not isinstance(rp, dict):
        return cfg
    cfg = dict(cfg)
    if rp.get("rope_theta") is not None:
        cfg["rope_theta"] = rp["rope_theta"]
    if rp.get("rope_type", rp.get("type", "default")) != "default":
        cfg["rope_scaling"] = {k: v for k, v in rp.items() if k != "rope_theta"}
    elif rp is not rs:
        cfg.pop("rope_scaling", None)
    return cfg


#: transformers' ``Gemma3TextConfig`` defaults (configuration_gemma3.py) for the keys llmc reads: the image-text
#: releases' text_config gives only what differs from them (gemma-3-27b-it: no vocab_size, context or RoPE bases)
_GEMMA3_TEXT_DEFAULTS: dict[str, Any] = {
    "vocab_size": 262_208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
    "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "max_position_embeddings": 131_072,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "query_pre_attn_scalar": 256, "sliding_window": 4096,
    "hidden_activation": "gelu_pytorch_tanh", "rope_theta": 1e6, "rope_local_base_freq": 1e4,
    "sliding_window_pattern": 6}
#: transformers' ``Gemma2Config`` defaults (configuration_gemma2.py) for the keys llmc reads: Gemma3TextConfig's shape,
#: window, scalar and activation, with Gemma 2's vocabulary, context and one RoPE base; absent soft-capping keys are on
#: (final 30, attention 50), an explicit null off (the window pattern and the local base are not Gemma 2's keys)
_GEMMA2_DEFAULTS: dict[str, Any] = {
    **_GEMMA3_TEXT_DEFAULTS, "vocab_size": 256_000, "max_position_embeddings": 8192, "rope_theta": 1e4,
    "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0}


#: transformers' config classes' defaults (configuration_<type>.py) for the keys llmc reads whose absence would
#: otherwise mean llmc's own default: what ``<Type>Config()`` fills in where config.json leaves a key out (an explicit
#: null num_key_value_heads is still num_attention_heads, as their __post_init__ sets it). Checked against transformers
#: in tests/test_spec_hf.py.
_CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 1e4, "tie_word_embeddings": False},
    "mistral": {"num_key_value_heads": 8, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "tie_word_embeddings": False,
                "sliding_window": 4096},
    "phi3": {"rms_norm_eps": 1e-5, "rope_theta": 1e4, "tie_word_embeddings": False,
             "original_max_position_embeddings": 4096},
    "granite": {"rms_norm_eps": 1e-6, "rope_theta": 1e4, "tie_word_embeddings": False},
    "smollm3": {"num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 2e6, "tie_word_embeddings": True},
    "olmo2": {"rms_norm_eps": 1e-5, "rope_theta": 1e4, "tie_word_embeddings": False},
    "olmo3": {"rms_norm_eps": 1e-5, "rope_theta": 5e5, "tie_word_embeddings": False},
    "olmoe": {"rms_norm_eps": 1e-5, "rope_theta": 1e4, "tie_word_embeddings": False, "router_aux_loss_coef": 0.01},
    "qwen2": {"num_key_value_heads": 32, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "tie_word_embeddings": False,
              "sliding_window": 4096},
    "qwen3": {"num_key_value_heads": 32, "head_dim": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e4,
              "tie_word_embeddings": False, "sliding_window": 4096},
    "qwen3_moe": {"num_key_value_heads": 4, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "tie_word_embeddings": False,
                  "router_aux_loss_coef": 0.001, "sliding_window": 4096},
    "mixtral": {"num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "tie_word_embeddings": False,
                "router_aux_loss_coef": 0.001},
    "glm4_moe": {"num_key_value_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 1e4, "tie_word_embeddings": False},
    # GptOssConfig (configuration_gpt_oss.py): gpt-oss-20b's shape but 36 layers / 128 experts (gpt-oss-120b's), its
    # base default_theta 150000 (its rope_parameters default: _GPT_OSS_ROPE)
    "gpt_oss": {"vocab_size": 201_088, "hidden_size": 2880, "intermediate_size": 2880, "num_hidden_layers": 36,
                "num_local_experts": 128, "head_dim": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
                "sliding_window": 128, "tie_word_embeddings": False, "max_position_embeddings": 131_072,
                "rms_norm_eps": 1e-5, "num_experts_per_tok": 4, "swiglu_alpha": 1.702, "swiglu_limit": 7.0,
                "router_aux_loss_coef": 0.001, "attention_bias": True, "rope_theta": 150_000.0},
    "deepseek_v2": {"rms_norm_eps": 1e-6, "rope_theta": 1e4, "tie_word_embeddings": False},
    "deepseek_v3": {"num_key_value_heads": 128, "rms_norm_eps": 1e-6, "rope_theta": 1e4, "tie_word_embeddings": False},
}
#: model_types whose config class is another type's: Kimi K2's auto_map names DeepSeek-V3's
#: configuration_deepseek.DeepseekV3Config
_CONFIG_CLASS_TYPE = {"kimi_k2": "deepseek_v3"}
#: model_types whose attention reads ``attention_bias`` for q, k, v and o_proj alike (transformers' modeling_<type>.py;
#: DeepSeek: q_a_proj, kv_a_proj_with_mqa and o_proj): a bias llmc does not model, refused when true. Granite, SmolLM3,
#: OLMo 2 / 3, OLMoE and Gemma refuse it in their hooks; Qwen2 (q/k/v biased, o_proj not), Mistral, Mixtral and Phi-3
#: hard-code their biases and never read the key.
_O_PROJ_BIAS_TYPES = frozenset({"llama", "qwen3", "qwen3_moe", "deepseek_v2", "deepseek_v3", "kimi_k2"})
#: model_types whose MLP reads ``mlp_bias`` (gate, up and down biased): refused when true (Granite, SmolLM3: their hooks)
_MLP_BIAS_TYPES = frozenset({"llama", "deepseek_v2"})
#: model_types whose attention reads ``sliding_window`` for every layer (Mistral, Mixtral, Phi-3; Qwen's only with
#: use_sliding_window true, default false); Llama, OLMo 2, OLMoE, Granite and DeepSeek never read it
_WINDOW_TYPES = frozenset({"mistral", "mixtral", "phi3", "qwen2", "qwen3", "qwen3_moe"})


#: image-text model_type -> the model_type of the language model its ``text_config`` holds (None: the text_config's own)
IMAGE_TEXT_TYPES: dict[str, str | None] = {"gemma3": "gemma3_text", "kimi_k25": None}


def quantization_method(cfg: dict[str, Any]) -> str | None:
    """How a checkpoint's weights are stored when its config.json says they are quantized: the
    ``quantization_config.quant_method`` transformers dispatches on (``gptq``, ``awq``, ``bitsandbytes``, ``fp8``,
    ``mxfp4``, ``compressed-tensors``, ...; https://huggingface.co/docs/transformers/main/en/quantization/overview),
    ``"quantized"`` where it names none; None for a checkpoint of plain floating-point weights. No llmc trainer reads
    such weights (QLoRA quantizes a bf16 base itself); the architecture they quantize is the config's all the same."""
    q = cfg.get("quantization_config")
    if not q:
        return None
    method = q.get("quant_method") if isinstance(q, dict) else None
    return method if isinstance(method, str) and method else "quantized"


def language_model_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """An image-text config's language model as a config of its own: Gemma 3's ``Gemma3Config`` (model_type gemma3,
    ``Gemma3ForConditionalGeneration``: the 4B, 12B and 27B releases) keeps it in ``text_config`` (a
    ``Gemma3TextConfig``), the head's tying at the top level; Kimi K2.5's (model_type kimi_k25,
    ``KimiK25ForConditionalGeneration``) keeps a Kimi K2 config (model_type kimi_k2) there. The image encoder is not
    llmc's model (nor counted)."""
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise HFConfigError(f"config.json of model_type {cfg.get('model_type')!r} has no 'text_config' object (the "
                            "language model's config)")
    mt = IMAGE_TEXT_TYPES.get(cfg.get("model_type")) or text.get("model_type")
    out = fold_rope_parameters({**text, "model_type": mt})
    if cfg.get("tie_word_embeddings") is not None:
        out["tie_word_embeddings"] = cfg["tie_word_embeddings"]
    return out


def _req(cfg: dict[str, Any], key: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise HFConfigError(f"config.json has no {key!r}" + (f" (needed for model_type {cfg['model_type']!r})"
                                                             if cfg.get("model_type") else ""))
    return cfg[key]


#: model_types whose use_sliding_window windows only the layers from max_window_layers on (transformers' Qwen2 /
#: Qwen3 configs; false in every release): llmc reads it only with max_window_layers 0 (every layer). Qwen3-MoE's
#: windows every layer (Qwen3MoeConfig has no max_window_layers).
_MAX_WINDOW_LAYERS_TYPES = frozenset({"qwen2", "qwen3"})
#: transformers' per-layer attention kinds (``layer_types``) llmc reads: every layer one or the other (OLMo 3: a mix)
_LAYER_KINDS = frozenset({"full_attention", "sliding_attention"})
#: config.json's MLP activation (``hidden_act``; Gemma's configs: ``hidden_activation``) -> llmc's gated MLP
HF_ACTIVATIONS: dict[str, str] = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "swish": "silu"}
#: model_types whose layers may mix the two kinds (llmc's ``full_attention_layers``)
_MIXED_LAYER_TYPES = frozenset({"olmo3", "gemma3_text", "gemma2", "gpt_oss"})


def _int(cfg: dict[str, Any], key: str, default: int | None = None, *, minimum: int = 1) -> int:
    """``cfg[key]`` as an int >= ``minimum`` (``default`` when absent or null); a float with a fraction,
    a bool, a string or a value below ``minimum`` is an error naming the key (never truncated)."""
    value = cfg.get(key)
    if value is None:
        if default is not None:
            return default
        value = _req(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            isinstance(value, float) and not (math.isfinite(value) and value.is_integer())):
        raise HFConfigError(f"config.json {key!r} must be an integer (got {value!r})")
    if value < minimum:
        raise HFConfigError(f"config.json {key!r} must be >= {minimum} (got {value!r})")
    return int(value)


def _layer_count(cfg: dict[str, Any], key: str) -> int:
    """A count of layers (``num_hidden_layers``) as :func:`_int` reads it, at most
    :data:`~llmc.spec.model.MAX_LAYERS`: checked before anything builds a list per layer from it (``layer_types`` /
    ``no_rope_layers`` absent: one kind per layer), so a config saying 1e11 layers is refused at once, not after
    building 1e11 items for the Architecture's own bound to refuse."""
    n = _int(cfg, key)
    if n > MAX_LAYERS:
        raise HFConfigError(HFProblem(
            f"config.json {key!r} must be <= {MAX_LAYERS} (got {n})",
            f"fix {key} in config.json: llmc plans models of at most {MAX_LAYERS} layers (the deepest trained "
            "Transformer has 1,000)", key=key))
    return n


def _float(cfg: dict[str, Any], key: str, default: float | None = None) -> float:
    """``cfg[key]`` as a finite float (``default`` when absent or null); anything else names the key."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            value = _req(cfg, key)
        else:
            return default
    try:
        ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    except OverflowError:  # an integer past the double range
        ok = False
    if not ok:
        raise HFConfigError(f"config.json {key!r} must be a finite number (got {_short(value)})")
    return float(value)


def _bool(cfg: dict[str, Any], key: str, default: bool = False) -> bool:
    value = cfg.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise HFConfigError(f"config.json {key!r} must be true or false (got {value!r})")
    return value


def _factors(rs: dict[str, Any], key: str) -> tuple[float, ...]:
    value = rs.get(key)
    if not isinstance(value, list) or not value or not all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in value):
        raise HFConfigError(f"config.json 'rope_scaling.{key}' must be a non-empty list of positive numbers "
                            f"(got {_short(value)})")
    return tuple(float(v) for v in value)


def _longrope(rs: dict[str, Any], cfg: dict[str, Any]) -> RopeScaling:
    """LongRoPE (transformers ``_compute_longrope_parameters``): per-frequency divisors, short while a sequence fits
    the original context, long beyond it; ``factor`` absent = max_position_embeddings / original (Phi-3's configs
    keep original_max_position_embeddings at the top level)."""
    original = _original_context(rs, cfg)
    factor = _float(rs, "factor") if rs.get("factor") is not None else _int(cfg, "max_position_embeddings") / original
    kw: dict[str, Any] = {"type": "longrope", "factor": factor, "original_max_position": original,
                          "short_factor": _factors(rs, "short_factor"), "long_factor": _factors(rs, "long_factor")}
    if rs.get("attention_factor") is not None:
        kw["attention_factor"] = _float(rs, "attention_factor")
    return RopeScaling(**kw)


def _original_context(rs: dict[str, Any], cfg: dict[str, Any]) -> int:
    """The pre-training context a llama3 / yarn / longrope scaling starts from, where transformers'
    ``standardize_rope_params`` takes it: a top-level original_max_position_embeddings (Phi-3's configs keep it
    there; Phi3Config's default 4096) wins, then the one in rope_scaling, then max_position_embeddings."""
    for where in (cfg, rs):
        if where.get("original_max_position_embeddings") is not None:
            return _int(where, "original_max_position_embeddings")
    return _int(cfg, "max_position_embeddings")


#: the rope_scaling keys transformers requires per rope_type (transformers 5.x ``modeling_rope_utils.py``,
#: ``RotaryEmbeddingConfigMixin._validate_<type>_rope_parameters`` ``required_keys``; ``_check_received_keys`` raises
#: ``KeyError: Missing required keys``), less those its ``standardize_rope_params`` fills in before validating:
#: ``rope_type`` (from the legacy ``type``), ``rope_theta`` (the top-level one) and ``original_max_position_embeddings``
#: (llama3 / yarn / longrope: the top-level one, else max_position_embeddings, as :func:`_original_context`). A null
#: value counts as absent (transformers' checks compare it, and fail). The optional keys keep transformers' defaults:
#: yarn's beta_fast 32 / beta_slow 1 / truncate true (``_compute_yarn_parameters``), longrope's factor
#: max_position_embeddings / original (``_compute_longrope_parameters``).
_ROPE_REQUIRED: dict[str, tuple[str, ...]] = {
    "linear": ("factor",), "yarn": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor")}
#: what a release writes, for the hint of a missing key
_ROPE_EXAMPLE = {
    "linear": "e.g. factor 4.0", "yarn": "Qwen2.5's: factor 4.0, original_max_position_embeddings 32768",
    "llama3": "Llama 3.1's: factor 8.0, low_freq_factor 1.0, high_freq_factor 4.0, original_max_position_embeddings "
              "8192",
    "longrope": "Phi-3.5-mini's: short_factor and long_factor, one number per rotary frequency"}


def _rope_scaling(rs: Any, cfg: dict[str, Any] | None = None) -> RopeScaling | None:
    """HF ``rope_scaling`` dict -> :class:`RopeScaling` (``rope_type`` or legacy ``type`` key). A ``phi3`` config's
    su / yarn are LongRoPE (transformers' ``Phi3Config.convert_rope_params_to_dict`` renames them)."""
    if not rs:
        return None
    if not isinstance(rs, dict):
        raise HFConfigError(f"config.json 'rope_scaling' must be an object or null (got {rs!r})")
    cfg = cfg or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind in (None, "default"):
        return None
    if cfg.get("model_type") == "phi3" and kind in ("su", "yarn"):
        kind = "longrope"
    if kind not in _ROPE_REQUIRED:
        raise HFConfigError(HFProblem(
            f"unsupported rope_scaling type {kind!r} (supported: llama3, yarn, linear, longrope)",
            "llmc's RoPE scalings are transformers' llama3, yarn, linear and longrope rules; a config of another "
            "(dynamic NTK, mrope, ...) trains a model llmc does not compute"))
    if kind != "longrope" and cfg.get("model_type") == "phi3":
        raise HFConfigError(f"config.json 'rope_scaling' type {kind!r} is not supported for phi3 (transformers' "
                            "Phi3Config takes longrope only)")
    lacking = [k for k in _ROPE_REQUIRED[kind] if rs.get(k) is None]
    if lacking:
        raise HFConfigError(HFProblem(
            f"config.json 'rope_scaling' ({kind}) lacks {', '.join(map(repr, lacking))}: transformers refuses such a "
            f"config (KeyError: Missing required keys in rope_parameters for 'rope_type'='{kind}')",
            f"give {' and '.join(lacking)} in rope_scaling as the model's release does; {_ROPE_EXAMPLE[kind]}"))
    if kind == "longrope":
        return _longrope(rs, cfg)
    kw: dict[str, Any] = {"type": kind, "factor": _float(rs, "factor")}
    if kind in ("llama3", "yarn"):
        kw["original_max_position"] = _original_context(rs, cfg)
    if kind == "yarn" and rs.get("truncate") is not None:  # (transformers: absent or null = true)
        kw["truncate"] = _bool(rs, "truncate", True)
    if kind == "llama3":  # (required: _ROPE_REQUIRED)
        kw["low_freq_factor"] = _float(rs, "low_freq_factor")
        kw["high_freq_factor"] = _float(rs, "high_freq_factor")
    if kind == "yarn":
        kw["beta_fast"] = _float(rs, "beta_fast", 32.0)
        kw["beta_slow"] = _float(rs, "beta_slow", 1.0)
        if rs.get("attention_factor") is not None:
            kw["attention_factor"] = _float(rs, "attention_factor")
        for key in ("mscale", "mscale_all_dim"):  # DeepSeek's YaRN (0 or absent: not set, as transformers reads it)
            if rs.get(key):
                kw[key] = _float(rs, key)
    return RopeScaling(**kw)


def _each(errs: list[str], **getters: Callable[[], Any]) -> dict[str, Any]:
    """Call every getter; collect the :class:`HFConfigError` messages so all bad keys are reported at once."""
    out: dict[str, Any] = {}
    for field, get in getters.items():
        try:
            out[field] = get()
        except HFConfigError as e:
            errs.extend(e.problems)
    return out


def _phi3(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str], default: float | None = None) -> None:
    """``phi3`` (Phi-3, Phi-3.5, Phi-4, Phi-4-mini: ``Phi3ForCausalLM``, a Llama block with fused projections in the
    checkpoint): ``partial_rotary_factor`` (top level, or in rope_parameters / rope_scaling) -> ``rotary_dim`` =
    int(head_dim x factor), as transformers' Phi3 rotary embedding and ``Phi3Attention`` compute it; absent:
    ``default`` (None: the whole head)."""
    rs = cfg.get("rope_scaling")
    where = next((w for w in (cfg, cfg.get("rope_parameters"), rs)
                  if isinstance(w, dict) and w.get("partial_rotary_factor") is not None), None)
    if where is None:
        if default is None:
            return
        where = {"partial_rotary_factor": default}
    try:
        prf = _float(where, "partial_rotary_factor")
    except HFConfigError as e:
        errs.extend(e.problems)
        return
    if not 0 < prf <= 1:
        errs.append(f"config.json 'partial_rotary_factor' must be in (0, 1] (got {_short(prf)})")
        return
    hd = kw.get("head_dim") or (kw["d_model"] // kw["n_heads"] if "d_model" in kw and "n_heads" in kw else None)
    if prf < 1 and hd:
        kw["rotary_dim"] = int(hd * prf)


def _mixtral(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    moe = _each(errs, num_experts=lambda: _int(cfg, "num_local_experts"),
                top_k=lambda: _int(cfg, "num_experts_per_tok"),
                aux_loss_coef=lambda: _float(cfg, "router_aux_loss_coef", 0.01))
    if len(moe) == 3:
        kw["moe"] = MoE(**moe, score_func="softmax")


def _short(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (a config value quoted in an error line)."""
    text = repr(value) if not isinstance(value, list | dict) or len(value) <= 64 else f"<{type(value).__name__} of {len(value)}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _qwen3_moe(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``Qwen3MoeConfig``: layer i is sparse unless it is in ``mlp_only_layers`` or (i + 1) is not a
    multiple of ``decoder_sparse_step`` (``Qwen3MoeDecoderLayer``); llmc's dense layers are the first N."""
    step = cfg.get("decoder_sparse_step", 1)
    if step != 1:
        errs.append(f"config.json 'decoder_sparse_step' {_short(step)} is not supported (llmc's dense layers are the "
                    "first N: decoder_sparse_step 1 with mlp_only_layers [0, ..., N-1])")
    dense = cfg.get("mlp_only_layers") or []
    if not isinstance(dense, list) or dense != list(range(len(dense))):
        errs.append(f"config.json 'mlp_only_layers' {_short(dense)} is not supported (llmc's dense layers are the "
                    "first N: [0, ..., N-1] or [])")
        dense = []
    # the released configs say num_experts; transformers >= 5 saves it as num_local_experts (its attribute_map)
    experts = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    moe = _each(errs, num_experts=lambda: _int(cfg, experts),
                top_k=lambda: _int(cfg, "num_experts_per_tok"),
                expert_d_ff=lambda: _int(cfg, "moe_intermediate_size"),
                aux_loss_coef=lambda: _float(cfg, "router_aux_loss_coef", 0.001))
    if len(moe) == 4:  # norm_topk_prob: transformers' default false; Qwen3-30B-A3B's / 235B-A22B's configs say true
        kw["moe"] = MoE(**moe, dense_layers=len(dense), score_func="softmax",
                        route_norm=cfg.get("norm_topk_prob", False) is True)


def _deepseek_v3(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str], *, v2: bool = False) -> None:
    """transformers ``DeepseekV3Config``: MLA, and experts routed by a sigmoid (``DeepseekV3TopkRouter`` never reads
    scoring_func: another value is refused as ambiguous) with e_score_correction_bias, a group scored by its two best
    experts; ``v2``: DeepSeek-V2's softmax routing, a group scored by its best expert (:func:`_deepseek_v2`)."""
    if not v2 and cfg.get("scoring_func", "sigmoid") != "sigmoid":
        errs.append(f"config.json 'scoring_func' {_short(cfg.get('scoring_func'))} is not supported for deepseek_v3 "
                    "(DeepseekV3ForCausalLM routes with a sigmoid whatever it says)")
    mla = _each(errs, q_lora_rank=lambda: _int(cfg, "q_lora_rank") if cfg.get("q_lora_rank") is not None else None,
                kv_lora_rank=lambda: _int(cfg, "kv_lora_rank"),
                qk_rope_head_dim=lambda: _int(cfg, "qk_rope_head_dim"),
                qk_nope_head_dim=lambda: _int(cfg, "qk_nope_head_dim"),
                v_head_dim=lambda: _int(cfg, "v_head_dim"))
    if len(mla) == 5:
        kw["mla"] = MLA(**mla)
        kw["head_dim"] = kw["mla"].qk_nope_head_dim + kw["mla"].qk_rope_head_dim  # q/k head dim
    if cfg.get("n_routed_experts"):
        moe = _each(errs, num_experts=lambda: _int(cfg, "n_routed_experts"),
                    top_k=lambda: _int(cfg, "num_experts_per_tok"),
                    num_shared_experts=lambda: _int(cfg, "n_shared_experts", 0, minimum=0),
                    expert_d_ff=lambda: _int(cfg, "moe_intermediate_size"),
                    dense_layers=lambda: _int(cfg, "first_k_dense_replace", 0, minimum=0),
                    # DeepSeek's released config.json: aux_loss_alpha 0.001 with seq_aux true (the preset's value);
                    # absent (transformers' DeepseekV3Config / V2Config have no such field and save none): no loss
                    aux_loss_coef=lambda: _float(cfg, "aux_loss_alpha", 0.0),
                    route_scale=lambda: _float(cfg, "routed_scaling_factor", 1.0),
                    n_group=lambda: _int(cfg, "n_group", 1),
                    topk_group=lambda: _int(cfg, "topk_group", 1))
        if len(moe) == 9:
            groups = moe.pop("n_group"), moe.pop("topk_group")  # one group = no group limit
            kw["moe"] = MoE(
                **moe,
                n_expert_groups=groups[0] if groups[0] > 1 else None,
                n_limited_groups=groups[1] if groups[0] > 1 else None,
                group_score="max" if v2 and groups[0] > 1 else "top2_sum",
                score_func="softmax" if v2 else "sigmoid",
                # transformers' DeepseekV3TopkRouter always adds e_score_correction_bias (and its saved
                # config.json has no topk_method): absent = noaux_tc, DeepSeek-V3's own setting
                expert_bias=cfg.get("topk_method", "noaux_tc") == "noaux_tc",
                route_norm=cfg.get("norm_topk_prob", True) is not False,  # transformers' and DeepSeek-V3's: true
            )


def _glm4_moe(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``Glm4MoeConfig`` (configuration_glm4_moe.py; ``Glm4MoeForCausalLM``: GLM-4.5, GLM-4.5-Air,
    GLM-4.6): GQA whose ``attention_bias`` biases q, k and v (``Glm4MoeAttention``: o_proj never), per-head q / k norms
    with ``use_qk_norm`` (GLM-4.5: true, GLM-4.5-Air: false), RoPE on the first int(head_dim x partial_rotary_factor)
    dims of each head (absent: 0.5, the class's default; rotate_half layout); the first ``first_k_dense_replace``
    layers dense (intermediate_size wide), the others DeepSeek-V3's MoE (``Glm4MoeTopkRouter``: sigmoid scores plus
    e_score_correction_bias for the choice, groups scored by their two best, the picked unbiased scores renormalised
    with norm_topk_prob, times routed_scaling_factor; ``Glm4MoeMoE``: n_shared_experts x moe_intermediate_size wide
    shared experts), no auxiliary loss (the class has none). ``num_nextn_predict_layers`` counts the MTP layers stored
    after the last layer: transformers' model has none, nor has llmc's (the loader leaves them out)."""
    kw.update(_each(errs, qkv_bias=lambda: _bool(cfg, "attention_bias"), qk_norm=lambda: _bool(cfg, "use_qk_norm")))
    _phi3(cfg, kw, errs, default=0.5)
    # the released configs say n_routed_experts (num_local_experts: its attribute_map alias); absent keys take
    # Glm4MoeConfig's defaults
    experts = "n_routed_experts" if cfg.get("n_routed_experts") is not None else "num_local_experts"
    moe = _each(errs, num_experts=lambda: _int(cfg, experts, 128),
                top_k=lambda: _int(cfg, "num_experts_per_tok", 8),
                num_shared_experts=lambda: _int(cfg, "n_shared_experts", 1, minimum=0),
                expert_d_ff=lambda: _int(cfg, "moe_intermediate_size", 1408),
                dense_layers=lambda: _int(cfg, "first_k_dense_replace", 1, minimum=0),
                route_scale=lambda: _float(cfg, "routed_scaling_factor", 1.0),
                n_group=lambda: _int(cfg, "n_group", 1),
                topk_group=lambda: _int(cfg, "topk_group", 1),
                route_norm=lambda: _bool(cfg, "norm_topk_prob", True))
    if len(moe) == 9:
        groups = moe.pop("n_group"), moe.pop("topk_group")  # one group = no group limit
        kw["moe"] = MoE(**moe, aux_loss_coef=0.0, score_func="sigmoid", expert_bias=True,
                        n_expert_groups=groups[0] if groups[0] > 1 else None,
                        n_limited_groups=groups[1] if groups[0] > 1 else None)


#: GptOssConfig's RoPE where config.json gives none (a null or absent rope_scaling / rope_parameters)
_GPT_OSS_ROPE: dict[str, Any] = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "truncate": False, "original_max_position_embeddings": 4096}


def _gpt_oss(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``GptOssConfig`` (configuration_gpt_oss.py; ``GptOssForCausalLM``: gpt-oss-20b, gpt-oss-120b):
    ``attention_bias`` biases q, k, v and o_proj (``GptOssAttention``; false is refused: no release has it, and llmc's
    gpt-oss block has them), every layer's attention has a sink logit per head; every layer is sparse
    (``GptOssMLP``: a router with a bias, softmax over the top-k logits, num_local_experts experts intermediate_size
    wide with biased, clamped SwiGLU projections, ``swiglu_alpha`` / ``swiglu_limit``; ``hidden_act`` is not read);
    ``layer_types`` absent = the window in every other layer ((i + 1) % 2: layers 1, 3, ... attend fully). One
    ``GptOssRotaryEmbedding`` rotates every layer, the windowed ones too, with the rope_scaling (llmc's
    ``Architecture.window_rope_apart`` false for this block)."""
    if cfg.get("attention_bias") is not True:
        errs.append(f"config.json 'attention_bias' {_short(cfg.get('attention_bias'))} is not supported for gpt_oss "
                    "(llmc's gpt-oss block has q/k/v and o_proj biases, as every release)")
    kw.update(qkv_bias=True, attn_out_bias=True, attn_sinks=True, activation="swiglu_clamped",
              **_each(errs, swiglu_alpha=lambda: _float(cfg, "swiglu_alpha"),
                      swiglu_limit=lambda: _float(cfg, "swiglu_limit")))
    # the released configs say num_local_experts (num_experts: GptOssConfig's attribute_map alias)
    experts = "num_local_experts" if cfg.get("num_local_experts") is not None else "num_experts"
    moe = _each(errs, num_experts=lambda: _int(cfg, experts), top_k=lambda: _int(cfg, "num_experts_per_tok"),
                aux_loss_coef=lambda: _float(cfg, "router_aux_loss_coef", 0.001))
    if len(moe) == 3:
        kw["moe"] = MoE(**moe, score_func="softmax", route_norm=True, router_bias=True, expert_proj_bias=True)
    if not any(isinstance(cfg.get(k), dict) for k in ("rope_scaling", "rope_parameters")):
        kw.update(_each(errs, rope_scaling=lambda: _rope_scaling(_GPT_OSS_ROPE, cfg)))
    scaling = kw.get("rope_scaling")
    _layer_kinds(cfg, kw, errs, every=2, window=128, local_theta=None)
    if scaling is not None:  # (every layer windowed: still the one scaled RoPE)
        kw["rope_scaling"] = scaling


def _deepseek_v2(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``DeepseekV2Config`` (DeepSeek-V2, V2.5, V2-Lite, DeepSeek-Coder-V2): V3's MLA, and experts routed
    by a softmax over all of them whose top-k scores mix unnormalised (``DeepseekV2TopkRouter``: norm_topk_prob is
    never read, so a config saying true is refused as ambiguous), times routed_scaling_factor, no bias.
    ``topk_method``: ``greedy`` (or absent, V2-Lite) picks the top-k of all experts (n_group / topk_group unread);
    ``group_limited_greedy`` (DeepSeek-V2 / V2.5: n_group 8, topk_group 3; arXiv:2405.04434 sec. 2.2.2) first keeps
    the topk_group groups whose best expert scores highest -> ``n_expert_groups``, ``n_limited_groups`` with
    ``group_score: max``. Another method and a sparse step (``moe_layer_freq`` != 1) are refused."""
    method = cfg.get("topk_method")
    for key, ok, why in (("topk_method", ("greedy", "group_limited_greedy", None),
                          "DeepseekV2ForCausalLM routes with greedy or group_limited_greedy"),
                         ("moe_layer_freq", (1, None), "llmc's dense layers are the first N, every later one sparse"),
                         ("norm_topk_prob", (False, None), "DeepseekV2ForCausalLM never renormalises the top-k "
                                                           "weights whatever it says"),
                         ("scoring_func", ("softmax", None), "DeepseekV2ForCausalLM routes with softmax")):
        if cfg.get(key) not in ok:
            errs.append(f"config.json {key!r} {_short(cfg.get(key))} is not supported for deepseek_v2 ({why})")
    groups = {"n_group": 1, "topk_group": 1}  # greedy: one group, no limit
    if method == "group_limited_greedy" and cfg.get("n_routed_experts"):
        got = _each(errs, n_group=lambda: _int(cfg, "n_group"), topk_group=lambda: _int(cfg, "topk_group"))
        if len(got) == 2:
            experts = cfg.get("n_routed_experts")
            if isinstance(experts, int) and experts % got["n_group"]:
                errs.append(f"config.json 'n_group' {got['n_group']} must divide 'n_routed_experts' {experts} "
                            "(group_limited_greedy splits the experts into n_group equal groups)")
            elif got["topk_group"] > got["n_group"]:
                errs.append(f"config.json 'topk_group' {got['topk_group']} must be at most 'n_group' {got['n_group']}")
            else:
                groups = got
    _deepseek_v3({**cfg, "topk_method": "greedy", **groups, "norm_topk_prob": False}, kw, errs, v2=True)


def _granite(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``GraniteConfig``: a Llama block with muP multipliers (``modeling_granite.py``: embeddings x
    embedding_multiplier, each attention / MLP output x residual_multiplier, softmax scale attention_multiplier,
    logits / logits_scaling). Its attention_bias also biases o_proj, and mlp_bias the MLP: neither is llmc's."""
    for key, what in (("attention_bias", "q/k/v and o_proj biases"), ("mlp_bias", "MLP biases")):
        if cfg.get(key) is True:
            errs.append(f"config.json {key!r} true is not supported for granite ({what}; llmc's Granite block has none)")
    kw["qkv_bias"] = False
    keys = {"embedding": "embedding_multiplier", "residual": "residual_multiplier",
            "attention": "attention_multiplier", "logits": "logits_scaling"}
    m = _each(errs, **{f: (lambda k=k: _float(cfg, k, 1.0)) for f, k in keys.items()})
    bad = [f"config.json {keys[f]!r} must be > 0 (got {_short(v)})" for f, v in m.items() if v <= 0]
    errs.extend(bad)
    if len(m) == 4 and not bad:
        kw["multipliers"] = Multipliers(**m)


def _smollm3(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``SmolLM3Config`` (configuration_smollm3.py): ``no_rope_layers`` holds one flag per layer, 1 =
    RoPE, 0 = none (absent: 0 for every ``no_rope_layer_interval``-th layer, int((i + 1) % interval != 0), interval
    4), read into ``nope_layers``; RoPE base absent = 2e6 (its ``default_theta``). Its attention_bias also biases
    o_proj and mlp_bias the MLP, and use_sliding_window windows the NoPE layers only (``SmolLM3Config.layer_types``):
    none of these is modelled (no released checkpoint sets them)."""
    for key, what in (("attention_bias", "q/k/v and o_proj biases"), ("mlp_bias", "MLP biases"),
                      ("use_sliding_window", "a window on the NoPE layers only")):
        if cfg.get(key) is True:
            errs.append(f"config.json {key!r} true is not supported for smollm3 ({what}; llmc's SmolLM3 block has "
                        "none)")
    kw["qkv_bias"] = False
    n = kw.get("n_layers")
    flags = cfg.get("no_rope_layers")
    if flags is None and n is not None:
        try:
            every = _int(cfg, "no_rope_layer_interval", 4)
        except HFConfigError as e:
            errs.extend(e.problems)
            return
        flags = [int((i + 1) % every != 0) for i in range(n)]
    if flags is None:
        return
    if not isinstance(flags, list) or any(f not in (0, 1) or isinstance(f, float) for f in flags) or (
            n is not None and len(flags) != n):
        errs.append(f"config.json 'no_rope_layers' must list 1 (RoPE) or 0 (none) for each of the {n} layers "
                    f"(got {_short(flags)})")
        return
    kw["nope_layers"] = tuple(i for i, f in enumerate(flags) if not f)


def _olmo2(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``Olmo2Config`` (modeling_olmo2.py): always q / k norms over the whole projections and the block's
    norms on the attention / MLP outputs (``Olmo2DecoderLayer``); its attention_bias also biases o_proj (refused);
    RMSNorm epsilon absent = 1e-5 (its default)."""
    if cfg.get("attention_bias") is True:
        errs.append("config.json 'attention_bias' true is not supported for olmo2 (q/k/v and o_proj biases; llmc's "
                    "OLMo 2 block has none)")
    kw.update(qkv_bias=False, qk_norm=True, qk_norm_scope="projection", norm_placement="post")


def _olmoe(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``OlmoeConfig`` (modeling_olmoe.py): a pre-norm block whose q / k norms run over the whole
    projections (``OlmoeAttention``), every layer sparse (``OlmoeSparseMoeBlock``: num_experts of width
    intermediate_size, softmax top-k, renormalised only with norm_topk_prob, default false, no shared experts);
    clip_qkv (clamping q / k / v) and attention_bias (o_proj too) are refused; RMSNorm epsilon absent = 1e-5."""
    for key, what in (("attention_bias", "q/k/v and o_proj biases"), ("clip_qkv", "q / k / v clamped")):
        if cfg.get(key) not in (None, False):
            errs.append(f"config.json {key!r} {_short(cfg[key])} is not supported for olmoe ({what})")
    kw.update(qkv_bias=False, qk_norm=True, qk_norm_scope="projection")
    if kw.get("head_dim") is not None and "d_model" in kw and kw["head_dim"] * kw.get("n_heads", 0) != kw["d_model"]:
        errs.append(f"config.json 'head_dim' {kw['head_dim']} is not supported for olmoe (OlmoeAttention sizes its q "
                    "norm hidden_size wide: head_dim x num_attention_heads must equal hidden_size)")
    moe = _each(errs, num_experts=lambda: _int(cfg, "num_experts"), top_k=lambda: _int(cfg, "num_experts_per_tok"),
                aux_loss_coef=lambda: _float(cfg, "router_aux_loss_coef", 0.01))
    if len(moe) == 3:
        kw["moe"] = MoE(**moe, score_func="softmax", route_norm=cfg.get("norm_topk_prob", False) is True)


def _olmo3(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``Olmo3Config`` (configuration_olmo3.py): OLMo 2's block; ``layer_types`` absent = a window in
    every layer but each 4th ((i + 1) % 4 == 0: full attention), ``sliding_window`` absent = 4096, RoPE base absent =
    500000. Its rope_scaling (OLMo 3-7B: YaRN x8 from 8192) applies to the full-attention layers only, the windowed
    ones rotating unscaled at the same base (``Olmo3RotaryEmbedding`` per layer type; vLLM's OLMo 3 alike): llmc's
    ``full_attention_layers`` semantics. transformers >= 5 saves the two kinds' RoPE apart
    (``rope_parameters.sliding_attention``): another base there is ``sliding_rope_theta``, a scaling is refused."""
    _olmo2(cfg, kw, errs)
    _layer_kinds(cfg, kw, errs, every=4, window=4096, local_theta=None)


def _layer_kinds(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str], *, every: int, window: int,
                 local_theta: float | None) -> None:
    """A mixed-window model's ``layer_types`` (absent: full attention in every ``every``-th layer, (i + 1) % every
    == 0, as its config class derives them) -> ``full_attention_layers``; ``sliding_window`` absent = ``window``; the
    windowed layers' RoPE base, from transformers >= 5's ``rope_parameters.sliding_attention`` (else
    ``local_theta``, else the full layers'), where it differs -> ``sliding_rope_theta``; a scaling there is
    refused."""
    n = kw.get("n_layers")
    if n is None:
        return
    kinds = cfg.get("layer_types")
    if kinds is None:
        kinds = ["sliding_attention" if (i + 1) % every else "full_attention" for i in range(n)]
    elif not isinstance(kinds, list):  # (reported by the caller)
        return
    elif len(kinds) != n:
        errs.append(f"config.json 'layer_types' must list one kind for each of the {n} layers (got {len(kinds)})")
        return
    full = tuple(i for i, k in enumerate(kinds) if k == "full_attention")
    if "sliding_window" not in cfg:  # (an explicit null: no window, as the config classes keep it)
        kw["sliding_window"] = window
    rp = cfg.get("rope_parameters")
    local = rp.get("sliding_attention") if isinstance(rp, dict) else None
    if len(full) == n:  # no layer windowed
        kw.pop("sliding_window", None)
        return
    if kw.get("sliding_window") is None:  # "sliding_attention" layers without a window (null or 0)
        if kw.get("rope_scaling") is not None or (local_theta or kw.get("rope_theta")) != kw.get("rope_theta") or (
                isinstance(local, dict) and local.get("rope_theta", kw.get("rope_theta")) != kw.get("rope_theta")):
            errs.append(f"config.json 'sliding_window' {_short(cfg.get('sliding_window'))} with 'sliding_attention' "
                        "layers is not supported (transformers still rotates those layers with their own RoPE, "
                        "unscaled at their own base: give the window)")
        return
    if full:
        kw["full_attention_layers"] = full
    theta = local_theta
    if isinstance(local, dict):
        if local.get("rope_type", "default") != "default":
            errs.append(f"config.json 'rope_parameters.sliding_attention' {_short(local)} is not supported (llmc's "
                        "windowed layers rotate unscaled)")
            return
        if local.get("rope_theta") is not None:
            try:
                theta = _float(local, "rope_theta")
            except HFConfigError as e:
                errs.extend(e.problems)
                return
    if not full:  # every layer windowed: each rotates as transformers' windowed layers do (unscaled, their base)
        kw.pop("rope_scaling", None)
        if theta is not None:
            kw["rope_theta"] = theta
    elif theta is not None and theta != kw.get("rope_theta"):
        kw["sliding_rope_theta"] = theta


def _gemma3(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``Gemma3TextConfig`` (configuration_gemma3.py; ``Gemma3ForCausalLM``): Gemma's block (norms
    before and after attention and MLP, scaling by 1 + weight; GeGLU with tanh GELU, ``hidden_activation``; embeddings
    x sqrt(hidden_size)) with per-head q / k norms; softmax scale query_pre_attn_scalar^-0.5; ``layer_types`` absent =
    full attention in every ``sliding_window_pattern``-th layer; the windowed layers' RoPE base
    ``rope_local_base_freq``, unscaled (Gemma 3-4B and up scale the full layers' linearly x8). Absent keys take the
    config class's defaults (:data:`_GEMMA3_TEXT_DEFAULTS`: tied embeddings, head_dim 256, pattern 6, bases 1e6 /
    1e4, no soft-capping, ...). Its attn_logit_softcapping is refused: Gemma3Attention keeps it but never applies it."""
    if cfg.get("attn_logit_softcapping") is not None:
        errs.append(f"config.json 'attn_logit_softcapping' {_short(cfg['attn_logit_softcapping'])} is not supported "
                    "for gemma3_text (transformers' Gemma3Attention does not apply it; llmc would)")
    extra = _each(errs, every=lambda: _int(cfg, "sliding_window_pattern"),
                  local=lambda: _float(cfg, "rope_local_base_freq"))
    if len(extra) == 2:
        _gemma(cfg, kw, errs, every=extra["every"], local_theta=extra["local"])


def _gemma2(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str]) -> None:
    """transformers ``Gemma2Config`` (configuration_gemma2.py; ``Gemma2ForCausalLM``): Gemma's block without q / k
    norms; ``layer_types`` absent = the window in every other layer (layers 1, 3, ... attend fully), one RoPE base;
    soft-capping of the attention scores and the final logits (absent: 50 and 30, :data:`_GEMMA2_DEFAULTS`). A
    rope_scaling is refused: Gemma2ForCausalLM scales every layer's RoPE, llmc's mixed-window models only the full
    layers' (no Gemma 2 release scales it)."""
    if kw.get("rope_scaling") is not None:
        errs.append(f"config.json 'rope_scaling' {_short(cfg.get('rope_scaling'))} is not supported for gemma2 (it "
                    "would scale the windowed layers too; llmc scales the full-attention layers only)")
    _gemma(cfg, kw, errs, every=2, local_theta=None)


def _gemma(cfg: dict[str, Any], kw: dict[str, Any], errs: list[str], *, every: int,
           local_theta: float | None) -> None:
    """What Gemma 2 and 3 share: the block's switches, query_pre_attn_scalar (kept where not head_dim), logit
    soft-capping, the layer kinds; bidirectional attention, biases and another activation refused."""
    mt = cfg.get("model_type")
    if kw.get("activation", "gelu_tanh") != "gelu_tanh":  # (an unknown one: reported by the caller)
        errs.append(f"config.json 'hidden_activation' {_short(cfg.get('hidden_activation'))} is not supported for "
                    f"{mt} (llmc's Gemma block uses gelu_pytorch_tanh)")
    for key, what in (("attention_bias", "q/k/v and o_proj biases"), ("use_bidirectional_attention",
                                                                       "bidirectional attention")):
        if cfg.get(key) is True:
            errs.append(f"config.json {key!r} true is not supported for {mt} ({what})")
    kw.update(qkv_bias=False, norm_placement="sandwich", norm_unit_offset=True, embedding_scale=True)
    extra = _each(errs, scalar=lambda: _int(cfg, "query_pre_attn_scalar"),
                  **{field: functools.partial(_float, cfg, key) for field, key in (
                      ("attn_logit_softcap", "attn_logit_softcapping"),
                      ("final_logit_softcap", "final_logit_softcapping")) if cfg.get(key) is not None})
    scalar = extra.pop("scalar", None)
    if scalar is None:
        return
    if "head_dim" in kw and scalar != kw["head_dim"]:  # (a bad head_dim: reported by the caller)
        kw["query_pre_attn_scalar"] = scalar
    kw.update(extra)
    _layer_kinds(cfg, kw, errs, every=every, window=4096, local_theta=local_theta)


#: family name -> the hook that reads its extra config keys
_FAMILY_HOOKS: dict[str, Callable[[dict[str, Any], dict[str, Any], list[str]], None]] = {
    "mixtral": _mixtral, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3, "deepseek_v2": _deepseek_v2,
    "glm4_moe": _glm4_moe, "gpt_oss": _gpt_oss,
    "granite": _granite,
    "smollm3": _smollm3, "olmo2": _olmo2, "olmo3": _olmo3, "olmoe": _olmoe, "gemma3": _gemma3, "gemma2": _gemma2,
}
#: model_type -> the hook for a type imported by a family that also imports others (phi3 through llama)
_TYPE_HOOKS: dict[str, Callable[[dict[str, Any], dict[str, Any], list[str]], None]] = {"phi3": _phi3}


#: model_type -> the causal-LM class transformers builds for it: ``AutoModelForCausalLM``'s
#: ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (transformers models/auto/modeling_auto.py; gemma3: the image-text
#: ``Gemma3ForConditionalGeneration`` the 4B-27B releases name); Kimi K2 / K2.5 (no transformers model_type) as their
#: released config.json names them (their auto_map: DeepSeek-V3's modeling code / KimiK25ForConditionalGeneration).
#: Checked against the installed transformers in tests/test_hf_import_notices.py.
CAUSAL_LM_CLASS: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM", "smollm3": "SmolLM3ForCausalLM", "olmo2": "Olmo2ForCausalLM",
    "olmo3": "Olmo3ForCausalLM", "olmoe": "OlmoeForCausalLM", "gemma2": "Gemma2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM", "gemma3": "Gemma3ForConditionalGeneration", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM",
    "glm4_moe": "Glm4MoeForCausalLM", "gpt_oss": "GptOssForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM", "kimi_k2": "DeepseekV3ForCausalLM",
    "kimi_k25": "KimiK25ForConditionalGeneration"}


def architectures_problem(cfg: dict[str, Any]) -> HFProblem | None:
    """Why a config.json's ``architectures`` is not the causal LM of its ``model_type`` (:data:`CAUSAL_LM_CLASS`):
    a checkpoint saved from another head (``LlamaForSequenceClassification``: ``score.weight`` where the LM head
    would be) or another model's class (``MambaForCausalLM`` under model_type llama) is not the model llmc trains
    and exports. None where it is (or where the key is absent or null, as in a hand-written config)."""
    mt, classes = cfg.get("model_type"), cfg.get("architectures")
    want = CAUSAL_LM_CLASS.get(mt) if isinstance(mt, str) else None
    if classes is None or want is None:
        return None
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        return HFProblem(f"config.json 'architectures' must be a list of class names (got {_short(classes)})",
                         f"model_type {mt!r} is transformers' {want}: architectures [{want!r}]", key="architectures")
    other = [c for c in classes if c != want]
    if not other:
        return None
    head = next((c for c in other if c.startswith(want.removesuffix("ForCausalLM").removesuffix(
        "ForConditionalGeneration"))), None)
    why = (f"{head} is another head on the model (its weights are not a language model's: llmc's loader would find "
           "no lm_head.weight)" if head else f"{other[0]} is not the model that model_type {mt!r} names")
    return HFProblem(f"config.json 'architectures' {_short(classes)} is not {want}, the causal language model of "
                     f"model_type {mt!r}: {why}",
                     f"start from the model's causal-LM release, architectures [{want!r}]: llmc trains and exports "
                     f"{want} only", key="architectures")


#: model_types whose releases store multi-token-prediction (MTP) layers after the last layer, counted by
#: ``num_nextn_predict_layers`` (DeepSeek-V3 / Kimi K2: 1, model.layers.61; GLM-4.5: 1): transformers'
#: DeepseekV3ForCausalLM / Glm4MoeForCausalLM build none (``_keys_to_ignore_on_load_unexpected`` skips
#: ``model.layers.61.*``), nor does llmc (``llmc.runtime.hf_io`` leaves them out; the export writes 0)
MTP_TYPES = frozenset({"deepseek_v3", "kimi_k2", "glm4_moe"})


def mtp_layers(cfg: dict[str, Any]) -> int:
    """How many MTP layers a config.json says its checkpoint stores (0 where its model_type has none, or the key is
    absent, null or not a positive integer)."""
    if cfg.get("model_type") in IMAGE_TEXT_TYPES and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    n = cfg.get("num_nextn_predict_layers")
    return n if cfg.get("model_type") in MTP_TYPES and isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


def mtp_prefixes(cfg: dict[str, Any]) -> tuple[str, ...]:
    """The tensor-name prefixes of those MTP layers (``model.layers.<num_hidden_layers + j>.``), of the first
    :data:`~llmc.spec.model.MAX_LAYERS` at most (an init_hf checkpoint's config.json is read unvalidated: one saying
    1e9 MTP layers must not build 1e9 prefixes; a release has 1)."""
    if cfg.get("model_type") in IMAGE_TEXT_TYPES and isinstance(cfg.get("text_config"), dict):
        cfg = cfg["text_config"]
    n = cfg.get("num_hidden_layers")
    if not isinstance(n, int) or isinstance(n, bool):
        return ()
    return tuple(f"model.layers.{n + j}." for j in range(min(mtp_layers(cfg), MAX_LAYERS)))


#: Training-time regularisers transformers' class applies in ``train()`` mode (its modeling_<type>.py reads the key):
#: key -> (the model_types whose class reads it, what it does). llmc's trainers have neither dropout nor router
#: jitter. The same keys set on a class that does not read them are :data:`_IGNORED_KEYS`' business.
_REGULARISERS: dict[str, tuple[frozenset[str] | None, str]] = {
    # every supported class: ``nn.functional.dropout(attn_weights, p=self.attention_dropout if self.training ...)``
    "attention_dropout": (None, "drops attention probabilities at this rate"),
    # MixtralSparseMoeBlock: ``if self.training and self.jitter_noise > 0: hidden_states *= uniform(1 - j, 1 + j)``
    "router_jitter_noise": (frozenset({"mixtral"}), "multiplies the router's input by noise uniform in "
                                                    "[1 - j, 1 + j]"),
    # Phi3DecoderLayer: resid_attn_dropout / resid_mlp_dropout = nn.Dropout(config.resid_pdrop)
    "resid_pdrop": (frozenset({"phi3"}), "drops the attention and MLP outputs at this rate"),
}
#: config.json keys llmc reads for some model_types whose class, for the others, never reads them (transformers'
#: modeling_<type>.py has no ``config.<key>``): key -> (the model_types whose class reads it, where it is read, the
#: value that means "off"). llmc ignores them there too, so the model it trains is the one transformers builds.
_IGNORED_KEYS: dict[str, tuple[frozenset[str], str, Any]] = {
    "attn_logit_softcapping": (frozenset({"gemma2", "gemma3_text"}), "Gemma's attention soft-capping", None),
    "final_logit_softcapping": (frozenset({"gemma2", "gemma3_text"}), "Gemma's final-logit soft-capping", None),
    "query_pre_attn_scalar": (frozenset({"gemma2", "gemma3_text"}), "Gemma's softmax scale", None),
    "attention_bias": (_O_PROJ_BIAS_TYPES | {"granite", "smollm3", "olmo2", "olmo3", "olmoe", "gemma2", "gemma3_text",
                                             "glm4_moe", "gpt_oss"}, "attention biases", False),
    "mlp_bias": (_MLP_BIAS_TYPES | {"granite", "smollm3"}, "MLP biases", False),
    "use_qk_norm": (frozenset({"glm4_moe"}), "GLM-4.5's q / k norms", False),
    # Qwen's read it under use_sliding_window; the others read it in every layer or per layer kind
    "sliding_window": (_WINDOW_TYPES | _MIXED_LAYER_TYPES | {"smollm3"}, "an attention window", None),
    "embd_pdrop": (frozenset(), "an embedding dropout", 0),
    "hidden_dropout": (frozenset(), "a hidden-state dropout", 0),
    "resid_pdrop": (frozenset({"phi3"}), "Phi-3's residual dropout", 0),
    "router_jitter_noise": (frozenset({"mixtral"}), "Mixtral's router jitter", 0),
}


def hf_config_notices(cfg: dict[str, Any]) -> list[tuple[str, HFProblem]]:
    """What an imported config.json holds that the model llmc trains leaves out, as (severity, line with hint):
    ``warning``: what transformers' own class would have (the MTP layers it stores, the regularisers
    :data:`_REGULARISERS` it applies in training); ``info``: a key that class ignores as well
    (:data:`_IGNORED_KEYS`). Only for a config :func:`architecture_from_hf_config` imports."""
    top = cfg
    if cfg.get("model_type") in IMAGE_TEXT_TYPES and isinstance(cfg.get("text_config"), dict):
        cfg = language_model_config(cfg)
    mt = cfg.get("model_type")
    cls = CAUSAL_LM_CLASS.get(top.get("model_type"), "its class")
    out: list[tuple[str, HFProblem]] = []
    n_mtp = mtp_layers(cfg)
    if n_mtp:
        n = cfg.get("num_hidden_layers")
        first = f"model.layers.{n}" if n_mtp == 1 else f"model.layers.{n} to {n + n_mtp - 1}"
        out.append(("warning", HFProblem(
            f"config.json 'num_nextn_predict_layers' {n_mtp}: the model's multi-token-prediction (MTP) module "
            f"({n_mtp} more decoder layer{'s' if n_mtp > 1 else ''} with eh_proj, enorm, hnorm and shared_head, "
            f"{first} in the checkpoint) is neither trained nor exported: llmc's model is the {n} main layers, as "
            f"transformers' {cls} (which builds no MTP layer either), and the export's config.json says "
            "num_nextn_predict_layers 0",
            "the trained model decodes as usual; speculative decoding with its own MTP head, vLLM's "
            "--speculative-config method deepseek_mtp or SGLang's NEXTN, has no MTP weights to use: serve it without, "
            "or with a separate draft model", key="num_nextn_predict_layers")))
    for key, (readers, what) in _REGULARISERS.items():
        value = cfg.get(key)
        if (readers is None or mt in readers) and _nonzero(value):
            out.append(("warning", HFProblem(
                f"config.json {key!r} {_short(value)}: transformers' {cls} {what} in training (train() mode); llmc "
                "trains without it (its plan's step time, memory and loss are for that), and the exported model has "
                f"none ({key} 0 or absent in its config.json)",
                f"set {key} to 0 in config.json to plan what will run; llmc's trainers have no dropout or router "
                "jitter: train with transformers for it", key=key)))
    for key, (readers, what, off) in _IGNORED_KEYS.items():
        value = cfg.get(key)
        if mt in readers or value is None or value == off or (off == 0 and not _nonzero(value)):
            continue
        if key == "sliding_window" and (value == 0 or cfg.get("use_sliding_window") is False):
            continue  # (0 / use_sliding_window false: no window, said by the config itself)
        where = (f"only the classes of model_type {', '.join(sorted(readers))} read it: {what}" if readers else
                 f"no class llmc imports reads it: {what}")
        out.append(("info", HFProblem(
            f"config.json {key!r} {_short(value)} is ignored: transformers' {cls} ignores it as well ({where}), so "
            "the model llmc trains is the one transformers builds from this config",
            f"drop {key} from config.json to silence this", key=key)))
    return out


def _nonzero(value: Any) -> bool:
    """A number other than 0 (a null, a bool or text: not a regulariser's rate)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and value != 0


def architecture_from_hf_config(cfg: dict[str, Any], name: str = "custom") -> Architecture:
    """Translate an HF ``config.json`` (already parsed) into an :class:`Architecture`.

    Raises :class:`HFConfigError` for an unsupported ``model_type`` / activation, missing keys or
    values of the wrong type (``messages`` lists every one), and pydantic's ``ValidationError`` if the
    values are out of the Architecture's ranges.
    """
    original = cfg
    cfg = fold_rope_parameters(cfg)
    mt = cfg.get("model_type")
    family = family_for_model_type(mt) if isinstance(mt, str) else None
    if isinstance(mt, str) and mt in IMAGE_TEXT_TYPES:  # Gemma 3-4B / 12B / 27B, Kimi K2.5: image-text models whose language model llmc imports
        cfg = language_model_config(cfg)
        mt = cfg.get("model_type")
        if mt == "kimi_k25" or family_for_model_type(mt) is not family:
            raise HFConfigError(f"config.json's text_config has model_type {mt!r}, not the language model of "
                                f"{family.name if family else '?'} that its model_type names")
    gemma = mt in ("gemma3_text", "gemma2")
    # what its config class fills in where a key is absent
    cfg = {**(_GEMMA3_TEXT_DEFAULTS if mt == "gemma3_text" else _GEMMA2_DEFAULTS if gemma else
              _CLASS_DEFAULTS.get(_CONFIG_CLASS_TYPE.get(mt, mt), {}) if isinstance(mt, str) else {}), **cfg}
    if family is None:
        supported = f"llmc imports model_type {', '.join(SUPPORTED_MODEL_TYPES)}"
        if mt is None:
            raise HFConfigError(HFProblem(
                "config.json has no 'model_type' (the key transformers' AutoConfig picks the model class by)",
                f"add it as the model's release writes it; {supported}", key="model_type"))
        if not isinstance(mt, str):
            raise HFConfigError(HFProblem(f"config.json 'model_type' must be a string (got {_short(mt)})",
                                          supported, key="model_type"))
        raise HFConfigError(HFProblem(f"unsupported model_type {mt!r}", supported, key="model_type"))
    errs: list[str] = []
    if (bad_class := architectures_problem(original)) is not None:
        errs.append(bad_class)
    act_key = "hidden_activation" if "hidden_activation" in cfg else "hidden_act"
    act = cfg.get(act_key, "silu")
    activation = HF_ACTIVATIONS.get(act) if isinstance(act, str) else None
    if activation is None:
        errs.append(f"config.json {act_key!r} {_short(act)} is not supported (llmc models SwiGLU, silu, and "
                    "Gemma's GeGLU, gelu_pytorch_tanh)")
    elif activation != "silu" and not gemma:
        errs.append(f"config.json {act_key!r} {_short(act)} is not supported for {mt} (llmc's GeGLU is Gemma's block "
                    "only; this block's MLP is SwiGLU, silu)")
    for key, types, what in (("attention_bias", _O_PROJ_BIAS_TYPES, "q/k/v and o_proj biases"),
                             ("mlp_bias", _MLP_BIAS_TYPES, "MLP biases")):
        if mt in types and cfg.get(key) is True:
            errs.append(f"config.json {key!r} true is not supported for {mt} ({what}; llmc's block has none)")
    # Qwen2Config / Qwen3Config.__post_init__ (transformers configuration_qwen2.py / _qwen3.py): without layer_types,
    # layer i is "sliding_attention" when use_sliding_window and i >= max_window_layers (absent: 28), else
    # "full_attention"; so max_window_layers 0 windows every layer, and max_window_layers >= num_hidden_layers none
    # (full attention, as the release configs with use_sliding_window false); a given layer_types wins (read below)
    qwen_unwindowed = False
    if mt in _MAX_WINDOW_LAYERS_TYPES and cfg.get("use_sliding_window") is True and cfg.get("layer_types") is None:
        first = cfg.get("max_window_layers", 28)
        n = cfg.get("num_hidden_layers")
        if isinstance(first, int) and not isinstance(first, bool) and isinstance(n, int) and first >= n:
            qwen_unwindowed = True
        elif first != 0:
            errs.append(HFProblem(
                f"config.json 'use_sliding_window' true with 'max_window_layers' {_short(first)} is not supported "
                f"({mt} windows only the layers from max_window_layers on; llmc models one attention window for "
                "every layer or none)",
                "max_window_layers 0 windows every layer, one of at least num_hidden_layers none; or "
                "use_sliding_window false"))
    kinds = cfg.get("layer_types")  # transformers >= 4.5x writes it: one "full_attention" / "sliding_attention" per layer
    kind_set = set(map(str, kinds)) if isinstance(kinds, list) else None
    if kinds is not None and (kind_set is None or not kind_set <= _LAYER_KINDS):
        errs.append(f"layer_types must list {' or '.join(sorted(_LAYER_KINDS))} per layer (got {kinds!r:.80})")
        kind_set = None
    elif kind_set is not None and len(kind_set) > 1 and mt not in _MIXED_LAYER_TYPES:
        errs.append("layer_types: layers of different attention kinds are not modelled for this model_type (llmc "
                    "models them on OLMo 3's block; here one attention window, or none, for every layer)")
    # Mistral's / Mixtral's / Phi-3's window, in every layer; Qwen's where use_sliding_window is true (default false);
    # OLMo 3's and Gemma's in their sliding_attention layers (:func:`_layer_kinds`)
    windowed = cfg.get("sliding_window") is not None and mt in _WINDOW_TYPES | _MIXED_LAYER_TYPES and (
        cfg.get("use_sliding_window") is True or mt not in ("qwen2", "qwen3", "qwen3_moe")) and not qwen_unwindowed
    if kind_set:
        windowed = windowed and "sliding_attention" in kind_set
    heads = _each(errs, n_heads=lambda: _int(cfg, "num_attention_heads"))
    n_heads = heads.get("n_heads", 1)
    kw: dict[str, Any] = {"name": name, **heads, **_each(
        errs,
        n_layers=lambda: _layer_count(cfg, "num_hidden_layers"),  # bounded before a hook builds a list per layer
        d_model=lambda: _int(cfg, "hidden_size"),
        # null (or absent where the config class has no default of its own: _CLASS_DEFAULTS) = MHA
        n_kv_heads=lambda: _int(cfg, "num_key_value_heads", n_heads),
        d_ff=lambda: _int(cfg, "intermediate_size"),
        vocab_size=lambda: _int(cfg, "vocab_size"),
        tied_embeddings=lambda: _bool(cfg, "tie_word_embeddings"),
        # Qwen2 always has q/k/v biases (the HF Qwen2 attention hard-codes bias=True); attention_bias biases o_proj
        # too where it is read (refused above), nowhere q/k/v alone
        qkv_bias=lambda: family.qkv_bias,
        qk_norm=lambda: family.qk_norm,
        rope_theta=lambda: _float(cfg, "rope_theta", 10000.0),
        rope_scaling=lambda: _rope_scaling(cfg.get("rope_scaling"), cfg),
        norm_eps=lambda: _float(cfg, "rms_norm_eps", 1e-6),
        max_seq_len=lambda: _int(cfg, "max_position_embeddings"),
    )}
    if activation is not None:
        kw["activation"] = activation
    if cfg.get("head_dim") is not None:
        kw.update(_each(errs, head_dim=lambda: _int(cfg, "head_dim")))
    if windowed:
        kw.update(_each(errs, sliding_window=lambda: _int(cfg, "sliding_window", minimum=0)))
        # 0 means no window (vLLM reads it so: some checkpoints disable it that way); a window at least the model's
        # context never binds (Phi-3.5-mini: 262144 over 131072 positions): both are full attention
        w, context = kw.get("sliding_window"), kw.get("max_seq_len")
        # (a mixed-window model keeps it: its windowed layers' own RoPE still applies: _layer_kinds)
        if w == 0 or (w is not None and context is not None and w >= context and mt not in _MIXED_LAYER_TYPES):
            del kw["sliding_window"]
    for hook in (_FAMILY_HOOKS.get(family.name), _TYPE_HOOKS.get(mt)):
        if hook is not None:
            hook(cfg, kw, errs)
    if errs:
        raise HFConfigError(*errs)
    return Architecture(**kw)
