"""Built-in model presets: exact architectures of published models, plus tiny CPU models.

Every value is copied from the model's Hugging Face ``config.json`` (URL above each entry);
``tests/fixtures/hf/<name>.json`` holds those configs and ``tests/test_spec_hf.py`` checks that
:func:`llmc.spec.hf.architecture_from_hf_config` turns each one into exactly its preset.
Published parameter totals these shapes must reproduce (checked by the compiler's tests):
Llama-2-7B 6,738,415,616; Llama-3-8B 8,030,261,248; Llama-3.1-405B 405,853,388,800;
Llama-3.2-1B 1,235,814,400 (tied); Mistral-7B 7,241,732,096; Mixtral-8x7B 46,702,792,704;
Qwen2.5-7B 7,615,616,512; Qwen2.5-72B 72,706,203,648; DeepSeek-V3 671,026,419,200 (without MTP).
Qwen3 (transformers' own count; the model cards round): 8B 8,190,735,360; 0.6B 596,049,920;
30B-A3B 30,532,122,624; 235B-A22B 235,093,634,560. Phi (transformers' Phi3ForCausalLM count): Phi-3-mini-4k
3,821,079,552; Phi-4 14,659,507,200. OLMo 2-7B 7,298,617,344; OLMo 3-7B 7,298,011,136 (the Hub's count); Gemma 3 (transformers' counts; 4B and 27B: the language model
of the image-text release) 1B 999,885,952, 4B 3,880,263,168, 12B 11,766,034,176, 27B 27,009,346,304; Gemma 2
(transformers' counts, the model pages' 2.61B / 9.24B / 27.2B) 2B 2,614,341,888, 9B 9,241,705,984, 27B 27,227,128,320.
DeepSeek-V2 235,741,434,880 total, 21,375,800,320 activated (the paper's 236B / 21B, arXiv:2405.04434 abstract);
DeepSeek-V2-Lite 15,706,484,224 (transformers' count; the model page's 15.7B); OLMoE-1B-7B 6,919,161,856
(transformers' count; the paper's 6.9B). GLM-4.5 352,797,829,024 and GLM-4.5-Air 106,852,251,264 (transformers'
counts without the MTP layer; the model cards' 355B / 106B total, 32B / 12B active: tests/test_glm4_moe.py).
gpt-oss-20b 20,914,757,184 and gpt-oss-120b 116,829,156,672 (transformers' GptOssForCausalLM counts; the model card's
20.91B / 116.83B total, 3.61B / 5.13B active, arXiv:2508.10925 Table 1: tests/test_gpt_oss.py).
"""

from __future__ import annotations

from llmc.spec.model import MLA, Architecture, MoE, RopeScaling

# Llama-3.1 frequency-band RoPE scaling (config.json "rope_scaling", rope_type "llama3").
_LLAMA31_ROPE = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position=8192)
# Llama-3.2 uses the same rule with factor 32.
_LLAMA32_ROPE = RopeScaling(type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position=8192)


def _arch(name: str, **kw) -> Architecture:
    return Architecture(name=name, **kw)


def _glm4_moe(name: str, n_layers: int, d_model: int, d_ff: int, **kw) -> Architecture:
    """GLM-4.5's block (arXiv:2508.06471 sec. 2.1; transformers ``Glm4MoeForCausalLM``): 96 query / 8 kv heads of 128
    with q/k/v biases, RoPE (base 1e6) on the first half of each head, the 151,552-token vocabulary, untied, 128k
    context, RMSNorm eps 1e-5."""
    return _arch(name, n_layers=n_layers, d_model=d_model, n_heads=96, n_kv_heads=8, head_dim=128, d_ff=d_ff,
                 vocab_size=151552, qkv_bias=True, rotary_dim=64, rope_theta=1e6, norm_eps=1e-5, max_seq_len=131072,
                 **kw)


def _gpt_oss(name: str, n_layers: int, num_experts: int) -> Architecture:
    """gpt-oss's block (arXiv:2508.10925 sec. 2.1; transformers ``GptOssForCausalLM``): 64 query / 8 kv heads of 64 on a
    2880-wide residual, q/k/v and o_proj biases, a sink logit per head, a 128-token window in every other layer (layers
    1, 3, ... attend fully), YaRN x32 from 4096 (truncate false) on base 150000 in every layer; in every layer top-4 of
    ``num_experts`` experts 2880 wide, softmax over the biased router's top-4 logits, the clamped SwiGLU (limit 7,
    alpha 1.702) with biases; o200k_harmony's 201,088-row vocabulary, untied; config.json router_aux_loss_coef 0.9."""
    return _arch(name, n_layers=n_layers, d_model=2880, n_heads=64, n_kv_heads=8, head_dim=64, d_ff=2880,
                 vocab_size=201088, qkv_bias=True, attn_out_bias=True, attn_sinks=True, activation="swiglu_clamped",
                 swiglu_alpha=1.702, swiglu_limit=7.0, sliding_window=128,
                 full_attention_layers=tuple(range(1, n_layers, 2)), rope_theta=150000.0,
                 rope_scaling=RopeScaling(type="yarn", factor=32.0, original_max_position=4096, truncate=False),
                 norm_eps=1e-5, max_seq_len=131072,
                 moe=MoE(num_experts=num_experts, top_k=4, aux_loss_coef=0.9, router_bias=True,
                         expert_proj_bias=True))


def _gemma3(name: str, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int, *,
            vocab_size: int = 262208, window: int = 1024, max_seq_len: int = 131072,
            rope_scaling: RopeScaling | None = RopeScaling(type="linear", factor=8.0), **kw) -> Architecture:
    """Gemma 3's block (arXiv:2503.19786 sec. 2: norms before and after attention and MLP scaling by 1 + weight,
    per-head q / k norms, GeGLU, embeddings x sqrt(d_model), tied) with a window in five of every six layers (RoPE
    base 10k) and full attention in the sixth (base 1M); the defaults are Gemma3TextConfig's."""
    return Architecture(
        name=name, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        d_ff=d_ff, vocab_size=vocab_size, tied_embeddings=True, qk_norm=True, norm_placement="sandwich",
        norm_unit_offset=True, activation="gelu_tanh", embedding_scale=True, sliding_window=window,
        full_attention_layers=tuple(range(5, n_layers, 6)), sliding_rope_theta=10000.0, rope_theta=1e6,
        rope_scaling=rope_scaling, norm_eps=1e-6, max_seq_len=max_seq_len, **kw)


def _gemma2(name: str, n_layers: int, d_model: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int,
            **kw) -> Architecture:
    """Gemma 2's block (arXiv:2408.00118 sec. 2: Gemma 3's without the q / k norms) with a 4096-token window in the
    even layers and full attention in the odd ones (one RoPE base, 10k), attention logits soft-capped at 50 and final
    logits at 30, tied embeddings of 256,000 rows, an 8192-token context (Gemma2Config's defaults)."""
    return Architecture(
        name=name, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=head_dim,
        d_ff=d_ff, vocab_size=256000, tied_embeddings=True, norm_placement="sandwich", norm_unit_offset=True,
        activation="gelu_tanh", embedding_scale=True, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=4096, full_attention_layers=tuple(range(1, n_layers, 2)), rope_theta=10000.0, norm_eps=1e-6,
        max_seq_len=8192, **kw)


def _deepseek(name: str, n_layers: int, d_model: int, n_heads: int, d_ff: int, vocab_size: int, *,
              q_lora_rank: int | None, mscale: float, moe: MoE, rope_theta: float = 10000.0, yarn_factor: float = 40.0,
              beta_fast: float = 32.0) -> Architecture:
    """DeepSeek-V2 / V3's shared shape (arXiv:2405.04434 sec. 2.1, arXiv:2412.19437 sec. 2.1): MLA with a 512-wide kv
    latent, 128 + 64 q/k head dims (the 64 rotated) and 128 v dims, a 1e-6 norm epsilon, and DeepSeek's YaRN x40 from
    4096 (163,840 positions) with mscale = mscale_all_dim (the temperature in the softmax, the rotation pure)."""
    return Architecture(
        name=name, n_layers=n_layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_heads, head_dim=192, d_ff=d_ff,
        vocab_size=vocab_size, rope_theta=rope_theta, norm_eps=1e-6, max_seq_len=int(4096 * yarn_factor),
        rope_scaling=RopeScaling(type="yarn", factor=yarn_factor, original_max_position=4096, beta_fast=beta_fast,
                                 beta_slow=1.0, mscale=mscale, mscale_all_dim=mscale),
        moe=moe,
        mla=MLA(q_lora_rank=q_lora_rank, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128))


PRESETS: dict[str, Architecture] = {
    # https://huggingface.co/meta-llama/Llama-2-7b-hf/blob/main/config.json
    "llama2-7b": _arch(
        "llama2-7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=11008, vocab_size=32000,
        rope_theta=10000.0, norm_eps=1e-5, max_seq_len=4096,
    ),
    # https://huggingface.co/meta-llama/Meta-Llama-3-8B/blob/main/config.json
    "llama3-8b": _arch(
        "llama3-8b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=128256,
        rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192,
    ),
    # https://huggingface.co/meta-llama/Meta-Llama-3-70B/blob/main/config.json
    "llama3-70b": _arch(
        "llama3-70b", n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672, vocab_size=128256,
        rope_theta=500000.0, norm_eps=1e-5, max_seq_len=8192,
    ),
    # https://huggingface.co/meta-llama/Llama-3.1-8B/blob/main/config.json
    "llama3.1-8b": _arch(
        "llama3.1-8b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, norm_eps=1e-5, max_seq_len=131072,
    ),
    # https://huggingface.co/meta-llama/Llama-3.1-70B/blob/main/config.json
    "llama3.1-70b": _arch(
        "llama3.1-70b", n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=28672, vocab_size=128256,
        rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, norm_eps=1e-5, max_seq_len=131072,
    ),
    # https://huggingface.co/meta-llama/Llama-3.1-405B/blob/main/config.json
    "llama3.1-405b": _arch(
        "llama3.1-405b", n_layers=126, d_model=16384, n_heads=128, n_kv_heads=8, d_ff=53248,
        vocab_size=128256, rope_theta=500000.0, rope_scaling=_LLAMA31_ROPE, norm_eps=1e-5,
        max_seq_len=131072,
    ),
    # https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json (head_dim 64, tied embeddings)
    "llama3.2-1b": _arch(
        "llama3.2-1b", n_layers=16, d_model=2048, n_heads=32, n_kv_heads=8, head_dim=64, d_ff=8192,
        vocab_size=128256, tied_embeddings=True, rope_theta=500000.0, rope_scaling=_LLAMA32_ROPE,
        norm_eps=1e-5, max_seq_len=131072,
    ),
    # https://huggingface.co/mistralai/Mistral-7B-v0.1/blob/main/config.json
    # (sliding_window 4096: each token attends to the previous 4096)
    "mistral-7b": _arch(
        "mistral-7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=32000,
        rope_theta=10000.0, norm_eps=1e-5, max_seq_len=32768, sliding_window=4096,
    ),
    # https://huggingface.co/microsoft/Phi-3-mini-4k-instruct/blob/main/config.json (model_type phi3: a Llama block
    # with fused qkv_proj / gate_up_proj in the checkpoint; sliding_window 2047)
    "phi3-mini-4k": _arch(
        "phi3-mini-4k", n_layers=32, d_model=3072, n_heads=32, n_kv_heads=32, d_ff=8192, vocab_size=32064,
        rope_theta=10000.0, norm_eps=1e-5, max_seq_len=4096, sliding_window=2047,
    ),
    # https://huggingface.co/HuggingFaceTB/SmolLM3-3B/blob/main/config.json (SmolLM3ForCausalLM: a Llama block, GQA
    # 16 / 4 heads, tied embeddings, RoPE base 5e6 for its 64K context, no RoPE in every 4th layer: no_rope_layers
    # 0 at 3, 7, ..., 35; https://huggingface.co/blog/smollm3)
    "smollm3-3b": _arch(
        "smollm3-3b", n_layers=36, d_model=2048, n_heads=16, n_kv_heads=4, d_ff=11008, vocab_size=128256,
        tied_embeddings=True, rope_theta=5e6, norm_eps=1e-6, max_seq_len=65536, nope_layers=tuple(range(3, 36, 4)),
    ),
    # https://huggingface.co/allenai/OLMo-2-1124-7B/blob/main/config.json (Olmo2ForCausalLM: MHA, norms on the attention
    # and MLP outputs, q / k norms over the whole projections; arXiv:2501.00656 sec. 3.1)
    "olmo2-7b": _arch(
        "olmo2-7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=11008, vocab_size=100352,
        qk_norm=True, qk_norm_scope="projection", norm_placement="post", rope_theta=500000.0, norm_eps=1e-6,
        max_seq_len=4096,
    ),
    # https://huggingface.co/allenai/Olmo-3-1025-7B/blob/main/config.json (Olmo3ForCausalLM: OLMo 2's block, a 4096-token
    # window in three of every four layers, YaRN x8 from 8192 in the full-attention ones; 7,298,011,136 parameters)
    "olmo3-7b": _arch(
        "olmo3-7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=32, d_ff=11008, vocab_size=100278,
        qk_norm=True, qk_norm_scope="projection", norm_placement="post", rope_theta=500000.0, norm_eps=1e-6,
        max_seq_len=65536, sliding_window=4096, full_attention_layers=tuple(range(3, 32, 4)),
        rope_scaling=RopeScaling(type="yarn", factor=8.0, original_max_position=8192, beta_fast=32.0, beta_slow=1.0,
                                 attention_factor=1.2079441541679836),
    ),
    # https://huggingface.co/google/gemma-3-1b-pt/blob/main/config.json (Gemma3ForCausalLM: MQA with head_dim 256, a
    # 512-token window in five of every six layers at RoPE base 10k, full attention at base 1M in the sixth; tied
    # embeddings of 262,144 rows)
    "gemma3-1b": _gemma3("gemma3-1b", 26, 1152, 4, 1, 256, 6912, vocab_size=262144, window=512, max_seq_len=32768,
                         rope_scaling=None),
    # https://huggingface.co/google/gemma-3-{4b,12b,27b}-pt/blob/main/config.json (Gemma3ForConditionalGeneration: its
    # text_config, the rest Gemma3TextConfig's defaults: tied embeddings of 262,208 rows, a 1024-token window in five of
    # every six layers, linear RoPE scaling x8 in the others; 27B: head_dim 128, softmax scale 168^-0.5)
    "gemma3-4b": _gemma3("gemma3-4b", 34, 2560, 8, 4, 256, 10240),
    "gemma3-12b": _gemma3("gemma3-12b", 48, 3840, 16, 8, 256, 15360),
    "gemma3-27b": _gemma3("gemma3-27b", 62, 5376, 32, 16, 128, 21504, query_pre_attn_scalar=168),
    # https://huggingface.co/google/gemma-2-{2b,9b,27b}/blob/main/config.json (Gemma2ForCausalLM: a 4096-token window in
    # every other layer, attention scores soft-capped at 50, logits at 30; 27B: head_dim 128, softmax scale 144^-0.5)
    "gemma2-2b": _gemma2("gemma2-2b", 26, 2304, 8, 4, 256, 9216),
    "gemma2-9b": _gemma2("gemma2-9b", 42, 3584, 16, 8, 256, 14336),
    "gemma2-27b": _gemma2("gemma2-27b", 46, 4608, 32, 16, 128, 36864, query_pre_attn_scalar=144),
    # https://huggingface.co/microsoft/phi-4/blob/main/config.json (Phi3ForCausalLM, GQA 40 / 10 heads, full attention)
    "phi4": _arch(
        "phi4", n_layers=40, d_model=5120, n_heads=40, n_kv_heads=10, d_ff=17920, vocab_size=100352,
        rope_theta=250000.0, norm_eps=1e-5, max_seq_len=16384,
    ),
    # https://huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json
    # (num_local_experts 8, num_experts_per_tok 2, router_aux_loss_coef 0.02)
    "mixtral-8x7b": _arch(
        "mixtral-8x7b", n_layers=32, d_model=4096, n_heads=32, n_kv_heads=8, d_ff=14336, vocab_size=32000,
        rope_theta=1e6, norm_eps=1e-5, max_seq_len=32768,
        moe=MoE(num_experts=8, top_k=2, aux_loss_coef=0.02, score_func="softmax"),
    ),
    # https://huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json (Qwen2: bias on q/k/v)
    "qwen2.5-7b": _arch(
        "qwen2.5-7b", n_layers=28, d_model=3584, n_heads=28, n_kv_heads=4, d_ff=18944, vocab_size=152064,
        qkv_bias=True, rope_theta=1e6, norm_eps=1e-6, max_seq_len=131072,
    ),
    # https://huggingface.co/Qwen/Qwen2.5-72B/blob/main/config.json
    "qwen2.5-72b": _arch(
        "qwen2.5-72b", n_layers=80, d_model=8192, n_heads=64, n_kv_heads=8, d_ff=29568, vocab_size=152064,
        qkv_bias=True, rope_theta=1e6, norm_eps=1e-5, max_seq_len=131072,
    ),
    # https://huggingface.co/Qwen/Qwen3-8B/blob/main/config.json (Qwen3: q/k norms, no q/k/v bias; 8.2B
    # parameters, 6.95B without embeddings, per the model card)
    "qwen3-8b": _arch(
        "qwen3-8b", n_layers=36, d_model=4096, n_heads=32, n_kv_heads=8, head_dim=128, d_ff=12288,
        vocab_size=151936, qk_norm=True, rope_theta=1e6, norm_eps=1e-6, max_seq_len=40960,
    ),
    # https://huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json (head_dim 128 with d_model 1024 / 16 heads:
    # the attention is twice the residual width; tied embeddings)
    "qwen3-0.6b": _arch(
        "qwen3-0.6b", n_layers=28, d_model=1024, n_heads=16, n_kv_heads=8, head_dim=128, d_ff=3072,
        vocab_size=151936, tied_embeddings=True, qk_norm=True, rope_theta=1e6, norm_eps=1e-6, max_seq_len=40960,
    ),
    # https://huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json (Qwen3-MoE: q/k norms, 128 experts of
    # moe_intermediate_size 768, top-8 renormalised (norm_topk_prob true), no shared experts, every layer sparse;
    # intermediate_size 6144 is unused; 30.5B parameters, 3.3B activated, per the model card)
    "qwen3-30b-a3b": _arch(
        "qwen3-30b-a3b", n_layers=48, d_model=2048, n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144,
        vocab_size=151936, qk_norm=True, rope_theta=1e6, norm_eps=1e-6, max_seq_len=40960,
        moe=MoE(num_experts=128, top_k=8, expert_d_ff=768, aux_loss_coef=0.001, score_func="softmax"),
    ),
    # https://huggingface.co/Qwen/Qwen3-235B-A22B/blob/main/config.json (235B parameters, 22B activated)
    "qwen3-235b-a22b": _arch(
        "qwen3-235b-a22b", n_layers=94, d_model=4096, n_heads=64, n_kv_heads=4, head_dim=128, d_ff=12288,
        vocab_size=151936, qk_norm=True, rope_theta=1e6, norm_eps=1e-6, max_seq_len=40960,
        moe=MoE(num_experts=128, top_k=8, expert_d_ff=1536, aux_loss_coef=0.001, score_func="softmax"),
    ),
    # https://huggingface.co/zai-org/GLM-4.5/blob/main/config.json (Glm4MoeForCausalLM: GQA 96 / 8 heads of 128 with
    # q/k/v biases and per-head q/k norms, RoPE on the first 64 dims of each head (partial_rotary_factor 0.5), 3 dense
    # layers (intermediate_size 12288) then 89 MoE layers of 160 experts of width 1536 + 1 shared, top-8 sigmoid scores
    # with e_score_correction_bias, renormalised, times routed_scaling_factor 2.5; no aux loss). 352,797,829,024
    # parameters = transformers' count (its 14,240 e_score_correction_bias entries, a buffer there, included); the
    # MTP layer (num_nextn_predict_layers 1) is not part of it, as for DeepSeek-V3
    "glm4.5": _glm4_moe(
        "glm4.5", 92, 5120, 12288, qk_norm=True,
        moe=MoE(num_experts=160, top_k=8, num_shared_experts=1, expert_d_ff=1536, dense_layers=3, aux_loss_coef=0.0,
                score_func="sigmoid", expert_bias=True, route_scale=2.5)),
    # https://huggingface.co/zai-org/GLM-4.5-Air/blob/main/config.json (GLM-4.5's block without q/k norms: 1 dense layer
    # (10944) then 45 MoE layers of 128 experts of width 1408 + 1 shared, top-8, routed_scaling_factor 1.0);
    # 106,852,251,264 parameters = transformers' count (the MTP layer aside)
    "glm4.5-air": _glm4_moe(
        "glm4.5-air", 46, 4096, 10944, qk_norm=False,
        moe=MoE(num_experts=128, top_k=8, num_shared_experts=1, expert_d_ff=1408, dense_layers=1, aux_loss_coef=0.0,
                score_func="sigmoid", expert_bias=True)),
    # https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/config.json
    # MLA (q_lora_rank 1536, kv_lora_rank 512, qk_rope 64, qk_nope 128, v 128; head_dim here is the
    # q/k head dim 128 + 64 = 192), 3 dense layers (intermediate_size 18432) then 58 MoE layers with
    # 256 routed + 1 shared expert of moe_intermediate_size 2048, top-8, sigmoid scores.
    # aux_loss_coef mirrors config.json's aux_loss_alpha 0.001 (seq_aux true), as its import reads it; the paper
    # balances mainly with the aux-loss-free bias (expert_bias: no T008 at 0) plus a sequence-wise loss of alpha
    # 1e-4 (arXiv:2412.19437 sec. 2.1.2, 4.2); llmc's auxiliary loss is over the batch, not per sequence.
    # expert_bias: the 256-entry e_score_correction_bias per MoE layer (counted in the 671,026,419,200).
    # Routing: routed_scaling_factor 2.5, n_group 8, topk_group 4 (config.json; node-limited routing, sec. 2.1.2).
    # YaRN rope_scaling: factor 40 from 4096, mscale = mscale_all_dim = 1.0 (the softmax scale times
    # (0.1 ln 40 + 1)^2, the rotation pure). The MTP module is not part of it.
    "deepseek-v3": _deepseek(
        "deepseek-v3", 61, 7168, 128, 18432, 129280, q_lora_rank=1536, mscale=1.0,
        moe=MoE(num_experts=256, top_k=8, num_shared_experts=1, expert_d_ff=2048, dense_layers=3,
                aux_loss_coef=0.001, score_func="sigmoid", expert_bias=True,
                route_scale=2.5, n_expert_groups=8, n_limited_groups=4)),
    # https://huggingface.co/moonshotai/Kimi-K2-Instruct/blob/main/config.json (model_type kimi_k2, DeepSeek-V3's
    # DeepseekV3ForCausalLM: Kimi K2, Kimi Team 2025, arXiv:2507.20534): DeepSeek-V3's MLA and sigmoid-routed MoE
    # with 64 heads, 384 routed experts + 1 shared (top-8, routed_scaling_factor 2.827, no group limit: n_group 1),
    # one dense first layer, a 163,840-token vocabulary, YaRN x32 from 4096 on a 50,000 RoPE base (beta_fast =
    # beta_slow = 1). 1,026,408,232,448 parameters = transformers' DeepseekV3ForCausalLM count, 32,861,500,928
    # activated per token (the model card's 1T total / 32B activated).
    "kimi-k2": _deepseek(
        "kimi-k2", 61, 7168, 64, 18432, 163840, q_lora_rank=1536, mscale=1.0, rope_theta=50000.0, yarn_factor=32.0,
        beta_fast=1.0,
        moe=MoE(num_experts=384, top_k=8, num_shared_experts=1, expert_d_ff=2048, dense_layers=1,
                aux_loss_coef=0.001, score_func="sigmoid", expert_bias=True, route_scale=2.827)),
    # https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json (DeepseekV2ForCausalLM: MLA with
    # q_lora_rank 1536, 160 softmax-routed experts of width 1536 + 2 shared, top-6 unnormalised (norm_topk_prob false)
    # times routed_scaling_factor 16, the first layer dense (intermediate_size 12288), aux_loss_alpha 0.001; YaRN x40
    # from 4096 with mscale = mscale_all_dim = 0.707). Device-limited routing (topk_method group_limited_greedy,
    # arXiv:2405.04434 sec. 2.2.2): the 160 experts in n_group 8 groups, each token's top-6 among the topk_group 3
    # groups with the best single expert. 235,741,434,880 parameters, 21,375,800,320 activated per token (the paper's
    # 236B / 21B, abstract).
    "deepseek-v2": _deepseek(
        "deepseek-v2", 60, 5120, 128, 12288, 102400, q_lora_rank=1536, mscale=0.707,
        moe=MoE(num_experts=160, top_k=6, num_shared_experts=2, expert_d_ff=1536, dense_layers=1,
                aux_loss_coef=0.001, score_func="softmax", route_norm=False, route_scale=16.0,
                n_expert_groups=8, n_limited_groups=3, group_score="max")),
    # https://huggingface.co/deepseek-ai/DeepSeek-V2-Lite/blob/main/config.json (DeepseekV2ForCausalLM: MLA with a
    # full-rank q, 64 softmax-routed experts of width 1408 + 2 shared, top-6 unnormalised, the first layer dense; YaRN
    # x40 from 4096 with mscale = mscale_all_dim = 0.707; 15,706,484,224 parameters = transformers' count)
    "deepseek-v2-lite": _deepseek(
        "deepseek-v2-lite", 27, 2048, 16, 10944, 102400, q_lora_rank=None, mscale=0.707,
        moe=MoE(num_experts=64, top_k=6, num_shared_experts=2, expert_d_ff=1408, dense_layers=1,
                aux_loss_coef=0.001, score_func="softmax", route_norm=False)),
    # https://huggingface.co/allenai/OLMoE-1B-7B-0924/blob/main/config.json (OlmoeForCausalLM: a pre-norm block with q / k
    # norms over the whole projections, 64 experts of width 1024 in every layer, top-8 unnormalised; 6,919,161,856
    # parameters = transformers' count, 1.28B active; Muennighoff et al. 2024, arXiv:2409.02060)
    "olmoe-1b-7b": _arch(
        "olmoe-1b-7b", n_layers=16, d_model=2048, n_heads=16, n_kv_heads=16, d_ff=1024, vocab_size=50304,
        qk_norm=True, qk_norm_scope="projection", rope_theta=10000.0, norm_eps=1e-5, max_seq_len=4096,
        moe=MoE(num_experts=64, top_k=8, aux_loss_coef=0.01, score_func="softmax", route_norm=False),
    ),
    # https://huggingface.co/openai/gpt-oss-20b/blob/main/config.json and
    # https://huggingface.co/openai/gpt-oss-120b/blob/main/config.json (GptOssForCausalLM; 24 layers of 32 experts /
    # 36 of 128; the released experts are MXFP4, the architecture the same)
    "gpt-oss-20b": _gpt_oss("gpt-oss-20b", 24, 32),
    "gpt-oss-120b": _gpt_oss("gpt-oss-120b", 36, 128),
    # llmc's own CPU model (1.31M params): small enough to train visibly on 2 cores in minutes.
    "tiny": _arch(
        "tiny", n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384, vocab_size=2048,
        rope_theta=10000.0, norm_eps=1e-5, max_seq_len=256,
    ),
    # The same with a small MoE FFN (4 routed experts, top-2, 1 shared expert; 3.67M params), for CPU MoE tests.
    "tiny-moe": _arch(
        "tiny-moe", n_layers=4, d_model=128, n_heads=4, n_kv_heads=2, d_ff=384, vocab_size=2048,
        rope_theta=10000.0, norm_eps=1e-5, max_seq_len=256,
        moe=MoE(num_experts=4, top_k=2, num_shared_experts=1),
    ),
}
