"""Model families: the one table of what distinguishes Llama, Qwen2, Qwen3, Qwen3-MoE, Mixtral, GLM-4.5, gpt-oss and
DeepSeek-V3.

An :class:`~llmc.spec.model.Architecture` is a Llama-style decoder with optional switches (q/k/v
biases, q/k norms, MoE, MLA); :func:`family_of` names the family those switches select, and :data:`FAMILIES`
declares, per family, what the other layers need: the Hugging Face ``model_type`` / class names
(import in :mod:`llmc.spec.hf`, export in the runtime), the torchtitan 0.3.0 model module, the
attention kind (what params / memory / FLOPs count), and the tokenizer's chat special tokens.
Adding a family is one entry here plus, for a new attention kind, its math hooks: parameter
components (``llmc.compiler.params.ATTENTION_COMPONENTS``), KV elements per token (``params``),
activations (``llmc.compiler.memory``) and head dims (``llmc.compiler.flops``), each keyed by
``family_of(arch).attention``; and, for new config keys, an import hook in ``llmc.spec.hf``.

Sources:
  * Llama 2 / 3: Touvron et al. 2023 (arXiv:2307.09288); Llama 3 herd, arXiv:2407.21783 §3.1
  * Qwen2: Yang et al. 2024 (arXiv:2407.10671 §2.2.1: "QKV bias")
  * Qwen3: Yang et al. 2025 (arXiv:2505.09388 §2: no QKV bias, "QK-Norm" on queries and keys; the MoE models
    (§2, Table 2): 128 experts, 8 activated, no shared experts, global-batch load balancing)
  * Mixtral: Jiang et al. 2024 (arXiv:2401.04088 §2: 8 experts, top-2)
  * DeepSeek-V3: DeepSeek-AI 2024 (arXiv:2412.19437 §2.1: MLA + DeepSeekMoE)
  * DeepSeek-V2: DeepSeek-AI 2024 (arXiv:2405.04434 §2: MLA, DeepSeekMoE with softmax gates, top-k unnormalised;
    transformers modeling_deepseek_v2.py)
  * Phi-3 / Phi-4: Abdin et al. 2024 (arXiv:2404.14219, arXiv:2412.08905): Llama-style blocks (RMSNorm, SwiGLU, RoPE,
    GQA for Phi-4); the checkpoints fuse qkv_proj and gate_up_proj (transformers modeling_phi3.py); Phi-4-mini rotates
    0.75 of each head (partial_rotary_factor)
  * Granite 3: IBM, "Granite 3.0 Language Models" (2024; https://github.com/ibm-granite/granite-3.0-language-models):
    a Llama block with muP multipliers (transformers modeling_granite.py)
  * SmolLM3: Hugging Face, "SmolLM3: smol, multilingual, long-context reasoner" (2025; https://huggingface.co/blog/smollm3):
    a Llama block with GQA and tied embeddings, no RoPE in every 4th layer (NoPE, Yang et al. 2025, arXiv:2501.18795)
  * OLMo 2: Team OLMo 2024, "2 OLMo 2 Furious" (arXiv:2501.00656 sec. 3.1): a Llama block with its two RMSNorms on
    the outputs of attention and MLP (before the residual add) and q / k norms over the whole projections
  * OLMo 3: Team OLMo 2025, "Olmo 3" (https://allenai.org/blog/olmo3; transformers modeling_olmo3.py): OLMo 2's block
    with a sliding window (4096) in three of every four layers, RoPE scaling (YaRN) in the full-attention layers only
  * Gemma 3: Gemma Team 2025, "Gemma 3 Technical Report" (arXiv:2503.19786 sec. 2): GQA with per-head q / k norms,
    RMSNorms before and after attention and MLP (scaling by 1 + weight), GeGLU (tanh GELU), embeddings x sqrt(d),
    five windowed layers (RoPE base 10k) for every full one (base 1M; transformers modeling_gemma3.py)
  * Gemma 2: Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical Size" (arXiv:2408.00118 sec. 2,
    Table 1): Gemma 3's block without q / k norms, a 4096 window in every other layer, logit soft-capping (attention
    50, final 30; transformers modeling_gemma2.py)
  * GLM-4.5: GLM-4.5 Team 2025, "GLM-4.5: Agentic, Reasoning, and Coding (ARC) Foundation Models" (arXiv:2508.06471
    sec. 2.1): GQA with q/k/v biases, RoPE on half of each head, q / k norms (GLM-4.5; not GLM-4.5-Air), the first
    layers dense, then DeepSeek-V3's MoE (sigmoid gates with a selection bias, one shared expert; transformers
    modeling_glm4_moe.py, ``Glm4MoeForCausalLM``: GLM-4.5, GLM-4.5-Air, GLM-4.6)
  * gpt-oss: OpenAI 2025, "gpt-oss-120b & gpt-oss-20b Model Card" (arXiv:2508.10925 sec. 2.1): GQA (64 query heads, 8
    kv heads of 64 dims) with q/k/v and output biases and a learned sink logit per head, a 128-token window in every
    other layer, YaRN x32 from 4096 in every layer, pre-norm, and in every layer routed experts (top-4 of 32 / 128,
    softmax over the picked router logits) whose SwiGLU is clamped (limit 7, alpha 1.702, (up + 1) x glu) and biased
    (transformers modeling_gpt_oss.py, ``GptOssForCausalLM``)
  * HF configs: https://huggingface.co/docs/transformers/model_doc/{llama,phi3,granite,smollm3,olmo2,olmo3,gemma2,gemma3,qwen2,qwen3,qwen3_moe,mixtral,glm4_moe,gpt_oss,deepseek_v2,deepseek_v3}
  * torchtitan 0.3.0 models: https://github.com/pytorch/torchtitan/tree/v0.3.0/torchtitan/models
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmc.spec.model import Architecture

#: chat special tokens of the Llama 3 tokenizer (https://www.llama.com/docs/model-cards-and-prompt-formats/meta-llama-3/)
LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
#: ChatML special tokens of the Qwen2 tokenizer (https://huggingface.co/Qwen/Qwen2-7B/blob/main/tokenizer_config.json)
QWEN_SPECIALS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
#: turn markers of the Gemma 2 / 3 tokenizers (https://huggingface.co/google/gemma-3-1b-it/blob/main/tokenizer_config.json)
GEMMA_SPECIALS = ("<bos>", "<start_of_turn>", "<end_of_turn>")


@dataclass(frozen=True)
class Family:
    """What one model family needs from every layer of llmc."""

    name: str
    hf_model_types: tuple[str, ...]  # config.json model_type values imported as this family
    hf_class: str  # transformers class the runtime exports to
    attention: Literal["gqa", "mla"]  # grouped-query attention, or multi-head latent attention
    moe: bool  # has routed experts
    qkv_bias: bool  # q/k/v projections always carry a bias
    torchtitan_module: str  # torchtitan 0.3.0 ``torchtitan.models.<module>``
    name_prefixes: tuple[str, ...]  # model names (lower case, no punctuation) recognised as this family
    tokenizer_specials: tuple[str, ...] = ()  # chat special tokens its tokenizer is known to have
    # torchtitan 0.3.0's state-dict adapter for its module converts every weight of the model llmc emits, so a
    # torchtitan job can start from Hugging Face weights (continued-training stages run as torchtitan jobs then)
    torchtitan_hf: bool = False
    qk_norm: bool = False  # q and k heads always pass an RMSNorm before RoPE
    # the torchtitan job's RoPE: "complex" rotates adjacent pairs (Meta's layout, llmc's model: ComplexRoPE), "cossin"
    # rotates halves (HF's rotate_half: CosSinRoPE, what torchtitan's qwen3 flavours and its Qwen3StateDictAdapter use,
    # so its q/k rows and norms are in HF's order and the adapter reads an HF checkpoint unchanged)
    torchtitan_rope: Literal["complex", "cossin"] = "complex"


FAMILIES: dict[str, Family] = {
    # Mistral-7B and Phi-3 / Phi-4 (Phi3ForCausalLM: the same block, q/k/v and gate/up fused in the checkpoint) are
    # Llama computations: imported as this family, exported as LlamaForCausalLM (with a sliding window: mistral)
    "llama": Family("llama", ("llama", "mistral", "phi3"), "LlamaForCausalLM", "gqa", False, False, "llama3",
                    ("llama3",), LLAMA3_SPECIALS, torchtitan_hf=True),
    # q/k norms + routed experts (Qwen3-30B-A3B, Qwen3-235B-A22B): torchtitan's qwen3 MoE build. Routing is Mixtral's
    # (softmax over all experts, top-k, weights renormalised, HF norm_topk_prob true, or not: moe.route_norm), experts of their own width
    # (moe_intermediate_size), the first layers optionally dense (mlp_only_layers)
    "qwen3_moe": Family("qwen3_moe", ("qwen3_moe",), "Qwen3MoeForCausalLM", "gqa", True, False, "qwen3",
                        ("qwen3moe",), QWEN_SPECIALS, torchtitan_hf=True, qk_norm=True, torchtitan_rope="cossin"),
    # before qwen2: family_by_name takes the first family whose prefix a name starts with
    "qwen3": Family("qwen3", ("qwen3",), "Qwen3ForCausalLM", "gqa", False, False, "qwen3", ("qwen3",),
                    QWEN_SPECIALS, torchtitan_hf=True, qk_norm=True, torchtitan_rope="cossin"),
    "qwen2": Family("qwen2", ("qwen2",), "Qwen2ForCausalLM", "gqa", False, True, "llama3", ("qwen",),
                    QWEN_SPECIALS),
    # RoPE on the first rotary_dim dims of each head only (Phi-4-mini: partial_rotary_factor 0.75), which
    # LlamaForCausalLM cannot express: exported as Phi3ForCausalLM (fused qkv_proj / gate_up_proj); phi3 configs
    # import through the llama entry (the first family listing the type), which yields this family when partial
    "phi3": Family("phi3", ("phi3",), "Phi3ForCausalLM", "gqa", False, False, "llama3", ("phi",)),
    # a Llama block with a sliding window in every layer (Mistral-7B v0.1, Phi-3-mini): LlamaConfig has no window, so
    # it is exported as MistralForCausalLM (the same names); imported through the llama entry, torchtitan's Llama
    # (up to the window's length: backends.torchtitan_model_gaps, X315)
    "mistral": Family("mistral", ("mistral",), "MistralForCausalLM", "gqa", False, False, "llama3", (),
                      torchtitan_hf=True),
    # a Llama block with muP's fixed multipliers on the embeddings, residual branches, softmax and logits (IBM Granite 3)
    "granite": Family("granite", ("granite",), "GraniteForCausalLM", "gqa", False, False, "llama3", ("granite",)),
    # a Llama block with no RoPE in some layers (SmolLM3: every 4th); its tokenizer (Llama 3's vocabulary) holds the
    # ChatML specials its chat template uses (https://huggingface.co/HuggingFaceTB/SmolLM3-3B/blob/main/tokenizer_config.json)
    "smollm3": Family("smollm3", ("smollm3",), "SmolLM3ForCausalLM", "gqa", False, False, "llama3", ("smollm3",),
                      ("<|im_start|>", "<|im_end|>")),
    # norms on the outputs of attention and MLP, q / k norms over the whole projections (OLMo 2): no torchtitan 0.3.0
    # model has this block (backends.torchtitan_model_gaps, X317)
    "olmo2": Family("olmo2", ("olmo2",), "Olmo2ForCausalLM", "gqa", False, False, "llama3", ("olmo2",)),
    # OLMo 2's block with a sliding window, in every layer or all but ``full_attention_layers`` (OLMo 3: 3 of 4)
    "olmo3": Family("olmo3", ("olmo3",), "Olmo3ForCausalLM", "gqa", False, False, "llama3", ("olmo3",)),
    # norms before and after attention and MLP, GeGLU, scaled embeddings, mixed windows (Gemma 3): no torchtitan 0.3.0
    # model has this block (backends.torchtitan_model_gaps, X318)
    # (its tokenizer's turn markers, https://huggingface.co/google/gemma-3-1b-it/blob/main/tokenizer_config.json, make
    # the gemma chat template a chat stage's default)
    "gemma3": Family("gemma3", ("gemma3_text", "gemma3"), "Gemma3ForCausalLM", "gqa", False, False, "llama3", ("gemma3",),
                     GEMMA_SPECIALS, qk_norm=True),
    # Gemma 3's block without the q / k norms, with logit soft-capping and a window in every other layer (Gemma 2); its
    # tokenizer has the same turn markers (https://huggingface.co/google/gemma-2-2b-it/blob/main/tokenizer_config.json)
    "gemma2": Family("gemma2", ("gemma2",), "Gemma2ForCausalLM", "gqa", False, False, "llama3", ("gemma2",),
                     GEMMA_SPECIALS),
    # a pre-norm block with OLMo 2's q / k norms over the whole projections and softmax-routed experts, top-k
    # unnormalised (OLMoE-1B-7B: Muennighoff et al. 2024, arXiv:2409.02060): no torchtitan 0.3.0 model has those
    # norms (X317)
    "olmoe": Family("olmoe", ("olmoe",), "OlmoeForCausalLM", "gqa", True, False, "qwen3", ("olmoe",), qk_norm=True),
    # GQA (q/k/v biases, RoPE on part of each head, optional per-head q/k norms: use_qk_norm) + DeepSeek-V3's
    # sigmoid-routed experts with e_score_correction_bias, shared experts and dense first layers (GLM-4.5, GLM-4.5-Air,
    # GLM-4.6: Glm4MoeForCausalLM). torchtitan's qwen3 MoE build has the block but rotates whole heads (X301 for
    # partial rotary), and no state-dict adapter reads its checkpoints (q/k/v biases, shared experts: X310)
    "glm4_moe": Family("glm4_moe", ("glm4_moe",), "Glm4MoeForCausalLM", "gqa", True, False, "qwen3", ("glm4.5", "glm4.6")),
    # gpt-oss (gpt-oss-20b / 120b): attention sinks, q/k/v and o_proj biases, clamped biased SwiGLU experts, a window
    # in every other layer, YaRN in every layer. torchtitan 0.3.0 ships torchtitan/models/gpt_oss, which llmc's
    # torchtitan job does not emit (backends.torchtitan_model_gaps, X320)
    "gpt_oss": Family("gpt_oss", ("gpt_oss",), "GptOssForCausalLM", "gqa", True, True, "gpt_oss", ("gptoss",)),
    # torchtitan 0.3.0 has no Mixtral model: its Qwen3 MoE model is the GQA + MoE implementation
    "mixtral": Family("mixtral", ("mixtral",), "MixtralForCausalLM", "gqa", True, False, "qwen3", ("mixtral",)),
    # MLA with softmax-routed experts, the picked scores unnormalised, no bias (DeepSeek-V2 / V2-Lite,
    # DeepSeek-Coder-V2): torchtitan's deepseek_v3 module builds it (its router takes softmax scores), but its
    # DeepSeekV3StateDictAdapter is V3's (X310 for a V2 checkpoint)
    "deepseek_v2": Family("deepseek_v2", ("deepseek_v2",), "DeepseekV2ForCausalLM", "mla", True, False,
                          "deepseek_v3", ("deepseekv2",)),
    # Kimi K2 (config.json model_type kimi_k2, architectures DeepseekV3ForCausalLM): "Kimi-K2 reuses the
    # DeepSeekV3CausalLM architecture" and its model_type only tells inference engines apart
    # (https://github.com/MoonshotAI/Kimi-K2/blob/main/docs/deploy_guidance.md): imported as deepseek_v3; Kimi K2.5
    # (model_type kimi_k25, KimiK25ForConditionalGeneration) wraps a kimi_k2 language model in text_config with an
    # image encoder: its language model is imported (llmc.spec.hf.language_model_config)
    "deepseek_v3": Family("deepseek_v3", ("deepseek_v3", "kimi_k2", "kimi_k25"), "DeepseekV3ForCausalLM", "mla", True,
                          False,
                          "deepseek_v3", ("deepseek",), torchtitan_hf=True),
}

#: HF model_types whose checkpoints fuse q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (transformers
#: modeling_phi3.py): llmc's loader reads them by row ranges; torchtitan's state-dict adapters cannot read them
FUSED_HF_MODEL_TYPES: tuple[str, ...] = ("phi3",)

#: every HF model_type llmc imports
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(dict.fromkeys(t for f in FAMILIES.values() for t in f.hf_model_types))


def family_of(arch: Architecture) -> Family:
    """The family an architecture's switches select: MLA -> deepseek_v3 (deepseek_v2 with softmax-routed experts), attention
    sinks -> gpt_oss (the spec admits them on gpt-oss's block only), MoE -> glm4_moe
    with sigmoid-routed experts, qwen3_moe with q/k norms, else mixtral (olmoe with q/k norms over the projections), post-norm blocks -> olmo2 (olmo3 with a sliding window), sandwich norms -> gemma3 (gemma2 without q/k norms), q/k norms -> qwen3, q/k/v biases -> qwen2, partial rotary -> phi3, muP multipliers -> granite, a
    sliding window -> mistral, NoPE layers -> smollm3, else llama (the spec refuses q/k norms with MLA: M006;
    multipliers combine with none of these: M010; NoPE layers neither: M012; OLMo 2's block: M013)."""
    if arch.mla is not None:  # softmax-routed experts: DeepSeek-V2's MoE; sigmoid (or dense): V3's
        return FAMILIES["deepseek_v2" if arch.moe is not None and arch.moe.score_func == "softmax" else "deepseek_v3"]
    if arch.attn_sinks:
        return FAMILIES["gpt_oss"]
    if arch.moe is not None:
        if arch.qk_norm and arch.qk_norm_scope == "projection":
            return FAMILIES["olmoe"]
        if arch.moe.score_func == "sigmoid":  # DeepSeek-V3's gates on a GQA block: GLM-4.5's MoE
            return FAMILIES["glm4_moe"]
        return FAMILIES["qwen3_moe" if arch.qk_norm else "mixtral"]
    if arch.norm_placement == "post":
        return FAMILIES["olmo3" if arch.sliding_window is not None else "olmo2"]
    if arch.norm_placement == "sandwich":
        return FAMILIES["gemma3" if arch.qk_norm else "gemma2"]
    if arch.qk_norm:
        return FAMILIES["qwen3"]
    if arch.qkv_bias:
        return FAMILIES["qwen2"]
    if arch.partial_rotary:
        return FAMILIES["phi3"]
    if arch.multipliers is not None:
        return FAMILIES["granite"]
    if arch.sliding_window is not None:
        return FAMILIES["mistral"]
    if arch.nope_layers:
        return FAMILIES["smollm3"]
    return FAMILIES["llama"]


def family_for_model_type(model_type: str | None) -> Family | None:
    """The family that imports an HF ``model_type`` (None: unsupported)."""
    return next((f for f in FAMILIES.values() if model_type in f.hf_model_types), None)


def family_by_name(model_name: str | None) -> Family | None:
    """The family a model name announces (``Llama-3.1-8B`` -> llama, ``qwen2.5-7b`` -> qwen2), if any."""
    n = (model_name or "").lower().replace("-", "").replace("_", "")
    return next((f for f in FAMILIES.values() if any(n.startswith(p) for p in f.name_prefixes)), None)


__all__ = ["Family", "FAMILIES", "FUSED_HF_MODEL_TYPES", "SUPPORTED_MODEL_TYPES", "family_of", "family_for_model_type", "family_by_name",
           "LLAMA3_SPECIALS", "QWEN_SPECIALS"]
