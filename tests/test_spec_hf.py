"""HF config.json import and presets: each real config in tests/fixtures/hf equals its preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmc.spec.hf import HFConfigError, architecture_from_hf_config
from llmc.spec.presets import PRESETS

HF = Path(__file__).resolve().parent / "fixtures" / "hf"
CONFIGS = sorted(HF.glob("*.json"))

REQUIRED = ["llama2-7b", "llama3-8b", "llama3-70b", "llama3.1-8b", "llama3.1-70b", "llama3.1-405b",
            "llama3.2-1b", "mistral-7b", "phi3-mini-4k", "phi4", "smollm3-3b", "olmo2-7b", "olmo3-7b", "gemma3-1b", "gemma3-4b", "gemma3-12b", "gemma3-27b", "gemma2-2b", "gemma2-9b",
            "gemma2-27b", "deepseek-v2-lite", "olmoe-1b-7b", "mixtral-8x7b", "qwen2.5-7b", "qwen2.5-72b", "qwen3-8b", "qwen3-0.6b",
            "qwen3-30b-a3b", "qwen3-235b-a22b", "deepseek-v3", "kimi-k2", "gpt-oss-20b", "gpt-oss-120b", "tiny",
            "tiny-moe"]


def test_required_presets_exist():
    assert set(REQUIRED) <= set(PRESETS)
    for name, arch in PRESETS.items():
        assert arch.name == name


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_hf_config_equals_preset(path: Path):
    cfg = json.loads(path.read_text())
    arch = architecture_from_hf_config(cfg, name=path.stem)
    assert arch.model_dump() == PRESETS[path.stem].model_dump()


def test_every_published_preset_has_a_fixture():
    have = {p.stem for p in CONFIGS}
    assert set(REQUIRED) - {"tiny", "tiny-moe"} <= have


def test_published_shapes():
    # Independent facts from the model cards / papers, not from our own tables.
    l8 = PRESETS["llama3-8b"]
    assert (l8.n_layers, l8.d_model, l8.n_heads, l8.n_kv_heads, l8.d_ff, l8.vocab_size) == (
        32, 4096, 32, 8, 14336, 128256)
    assert l8.head_dim == 128 and l8.rope_theta == 500000.0
    l405 = PRESETS["llama3.1-405b"]
    assert (l405.n_layers, l405.d_model, l405.n_heads, l405.d_ff) == (126, 16384, 128, 53248)
    rs = l405.rope_scaling
    assert (rs.type, rs.factor, rs.low_freq_factor, rs.high_freq_factor, rs.original_max_position) == (
        "llama3", 8.0, 1.0, 4.0, 8192)
    assert l405.max_seq_len == 131072
    assert PRESETS["llama3.2-1b"].tied_embeddings and PRESETS["llama3.2-1b"].head_dim == 64
    assert PRESETS["qwen2.5-72b"].qkv_bias and not PRESETS["qwen2.5-72b"].tied_embeddings
    ds = PRESETS["deepseek-v3"]
    assert (ds.mla.q_lora_rank, ds.mla.kv_lora_rank, ds.mla.qk_rope_head_dim, ds.mla.qk_nope_head_dim,
            ds.mla.v_head_dim) == (1536, 512, 64, 128, 128)
    assert (ds.moe.num_experts, ds.moe.num_shared_experts, ds.moe.top_k, ds.moe.expert_d_ff,
            ds.moe.dense_layers, ds.moe.score_func) == (256, 1, 8, 2048, 3, "sigmoid")
    assert (ds.n_layers, ds.d_model, ds.n_heads, ds.d_ff, ds.vocab_size) == (61, 7168, 128, 18432, 129280)
    mx = PRESETS["mixtral-8x7b"]
    assert (mx.moe.num_experts, mx.moe.top_k, mx.moe.expert_d_ff) == (8, 2, None)


def test_tiny_presets_are_cpu_sized():
    t, tm = PRESETS["tiny"], PRESETS["tiny-moe"]
    assert (t.n_layers, t.d_model, t.n_heads, t.n_kv_heads, t.d_ff, t.vocab_size, t.max_seq_len) == (
        4, 128, 4, 2, 384, 2048, 256)
    assert tm.moe.num_experts == 4 and tm.moe.top_k == 2 and tm.moe.num_shared_experts == 1
    assert tm.model_dump(exclude={"name", "moe"}) == t.model_dump(exclude={"name", "moe"})


def test_preset_params_match_published_totals():
    """Cross-check the preset shapes against published totals (HF safetensors metadata) with the compiler's count."""
    from llmc.compiler.params import params_total as fn

    published = {"llama3-8b": 8_030_261_248, "mixtral-8x7b": 46_702_792_704, "llama3.1-405b": 405_853_388_800,
                 "qwen2.5-72b": 72_706_203_648, "qwen2.5-7b": 7_615_616_512, "mistral-7b": 7_241_732_096,
                 "llama2-7b": 6_738_415_616, "llama3.2-1b": 1_235_814_400, "deepseek-v3": 671_026_419_200}
    for name, total in published.items():
        assert fn(PRESETS[name]) == total, name
    # Qwen3 model cards give rounded figures: 8.2B (6.95B without embeddings), 0.6B (0.44B)
    for name, total, non_emb in (("qwen3-8b", 8.2e9, 6.95e9), ("qwen3-0.6b", 0.6e9, 0.44e9)):
        a = PRESETS[name]
        emb = a.vocab_size * a.d_model * (1 if a.tied_embeddings else 2)
        assert round(fn(a) / 1e9, 1) == total / 1e9 and round((fn(a) - emb) / 1e9, 2) == non_emb / 1e9, name
    # Qwen3-MoE model cards: 30.5B total / 3.3B activated (29.9B without embeddings); 235B / 22B (activated figures
    # cut, not rounded: llmc's exact 3.353B and 22.19B)
    from llmc.compiler.params import params_active

    a = PRESETS["qwen3-30b-a3b"]
    emb = 2 * a.vocab_size * a.d_model
    assert (round(fn(a) / 1e9, 1), int(params_active(a) / 1e8), round((fn(a) - emb) / 1e9, 1)) == (30.5, 33, 29.9)
    a = PRESETS["qwen3-235b-a22b"]
    assert (round(fn(a) / 1e9), int(params_active(a) / 1e9)) == (235, 22)


#: config.json model_type -> the prefix of transformers' config / model classes
_HF_CLASSES = {"qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe", "phi3": "Phi3", "smollm3": "SmolLM3", "olmo2": "Olmo2",
               "olmo3": "Olmo3", "gemma3_text": ("Gemma3", "Gemma3Text"), "gemma2": "Gemma2",
               "deepseek_v2": "DeepseekV2", "olmoe": "Olmoe"}


def _meta_model(name: str):
    """(config.json of fixture ``name``, transformers' own model class for it built on the meta device): an
    independent parameter count (and layer flags) to compare llmc's against."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = json.loads((HF / f"{name}.json").read_text())
    cls = _HF_CLASSES[cfg["model_type"]]
    model_cls, config_cls = cls if isinstance(cls, tuple) else (cls, cls)  # (Gemma 3's text config has its own class)
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    with torch.device("meta"):
        return cfg, getattr(transformers, f"{model_cls}ForCausalLM")(getattr(transformers, f"{config_cls}Config")(**keep))


def _numel(model) -> int:
    """transformers' parameters plus DeepSeek-V3 / GLM-4.5's e_score_correction_bias (a buffer there, a weight of the
    checkpoint that llmc counts: llmc.compiler.params)."""
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))


@pytest.mark.parametrize("name", ["qwen3-8b", "qwen3-0.6b", "qwen3-30b-a3b", "qwen3-235b-a22b"])
def test_qwen3_counts_equal_transformers(name):
    """The parameter count of transformers' own Qwen3ForCausalLM / Qwen3MoeForCausalLM (built on the meta device) for
    the fixture config: an independent count of the q/k norms, the decoupled head_dim, the (un)tied head and, for the
    MoE models, the router and the experts of moe_intermediate_size (intermediate_size unused)."""
    from llmc.compiler.params import params_total

    cfg, model = _meta_model(name)
    assert params_total(architecture_from_hf_config(cfg)) == _numel(model)


@pytest.mark.parametrize("name", ["phi3-mini-4k", "phi4"])
def test_phi_counts_equal_transformers_and_model_cards(name):
    """transformers' own Phi3ForCausalLM (meta device) for the fixture config has llmc's parameter count (its fused
    qkv_proj / gate_up_proj hold exactly llmc's q, k, v / gate, up rows); the Hugging Face model pages (safetensors
    metadata) say 3.82B and 14.7B parameters."""
    from llmc.compiler.params import params_total

    cfg, model = _meta_model(name)
    arch = architecture_from_hf_config(cfg)
    assert params_total(arch) == _numel(model)
    assert round(params_total(arch) / 1e9, 2 if name == "phi3-mini-4k" else 1) == {"phi3-mini-4k": 3.82, "phi4": 14.7}[name]


def test_smollm3_count_equals_transformers_and_model_card():
    """transformers' own SmolLM3ForCausalLM (meta device) for the fixture config has llmc's parameter count (tied
    embeddings: one 128256 x 2048 matrix); the model page (https://huggingface.co/HuggingFaceTB/SmolLM3-3B) says
    3.08B. Its NoPE layers are the ones no_rope_layers flags 0: 3, 7, ..., 35 (the blog's "every 4th layer")."""
    from llmc.compiler.params import params_total

    cfg, model = _meta_model("smollm3-3b")
    arch = architecture_from_hf_config(cfg)
    assert params_total(arch) == _numel(model)
    assert round(params_total(arch) / 1e9, 2) == 3.08
    uses_rope = [layer.self_attn.use_rope for layer in model.model.layers]
    assert arch.nope_layers == tuple(i for i, r in enumerate(uses_rope) if not r) == tuple(range(3, 36, 4))


def test_olmo2_count_equals_transformers_and_model_card():
    """transformers' own Olmo2ForCausalLM (meta device) for the fixture config has llmc's parameter count: its q / k
    norms run over the whole projections (4096 + 4096 weights a layer, not Qwen3's 2 x head_dim) and its two block
    norms sit on the outputs (the same count as Llama's); the model page (https://huggingface.co/allenai/OLMo-2-1124-7B)
    says 7.3B. An attention_bias (which biases o_proj too) is refused."""
    from llmc.compiler.params import params_total

    cfg, model = _meta_model("olmo2-7b")
    arch = architecture_from_hf_config(cfg)
    assert params_total(arch) == _numel(model)
    assert round(params_total(arch) / 1e9, 1) == 7.3
    with pytest.raises(HFConfigError, match="'attention_bias' true is not supported for olmo2"):
        architecture_from_hf_config({**cfg, "attention_bias": True})


def test_olmo3_count_windows_and_rope_equal_transformers():
    """transformers' own Olmo3ForCausalLM (meta device) for the fixture config has llmc's parameter count, the Hub's
    7,298,011,136 for allenai/Olmo-3-1025-7B (OLMo 2-7B's shapes with a 100,278-row vocabulary); its attention
    layers' kinds are llmc's: the 4096-token window everywhere but layers 3, 7, ..., 31, and its per-kind rotary
    embedding scales (YaRN x8, attention factor 1.2079) only the full-attention layers' frequencies."""
    import torch

    from llmc.compiler.params import params_total
    from llmc.runtime.model import rope_inv_freq

    cfg, model = _meta_model("olmo3-7b")
    arch = architecture_from_hf_config(cfg)
    assert params_total(arch) == _numel(model) == 7_298_011_136
    kinds = model.config.layer_types
    assert arch.full_attention_layers == tuple(i for i, k in enumerate(kinds) if k == "full_attention") == tuple(
        range(3, 32, 4))
    assert arch.sliding_window == model.config.sliding_window == 4096
    from transformers.models.olmo3.modeling_olmo3 import Olmo3RotaryEmbedding

    rot = Olmo3RotaryEmbedding(model.config, device="cpu")
    for kind, scaling in (("full_attention", arch.rope_scaling), ("sliding_attention", None)):
        ours, mscale = rope_inv_freq(arch.hd, arch.sliding_rope_theta or arch.rope_theta, scaling)
        torch.testing.assert_close(ours, getattr(rot, f"{kind}_inv_freq").float(), rtol=1e-6, atol=0)
        assert mscale == pytest.approx(getattr(rot, f"{kind}_attention_scaling"))


def test_gemma3_count_layer_kinds_and_rope_equal_transformers():
    """transformers' own Gemma3ForCausalLM (meta device) for google/gemma-3-1b-pt's config has llmc's parameter
    count, 999,885,952 (four norms a block, per-head q / k norms of head_dim 256, tied embeddings of 262,144 rows);
    its attention kinds are llmc's (a 512 window but in layers 5, 11, 17, 23: sliding_window_pattern 6) and its
    per-kind rotary embedding is llmc's (base 1e6 in the full layers, rope_local_base_freq 1e4 in the windowed)."""
    import torch
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    from llmc.compiler.params import params_total
    from llmc.runtime.model import rope_inv_freq

    cfg, model = _meta_model("gemma3-1b")
    arch = architecture_from_hf_config(cfg)
    assert params_total(arch) == _numel(model) == 999_885_952
    kinds = model.config.layer_types
    assert arch.full_attention_layers == tuple(i for i, k in enumerate(kinds) if k == "full_attention") == (
        5, 11, 17, 23)
    rot = Gemma3RotaryEmbedding(model.config, device="cpu")
    for kind, theta in (("full_attention", arch.rope_theta), ("sliding_attention", arch.sliding_rope_theta)):
        ours, mscale = rope_inv_freq(arch.hd, theta, None)
        torch.testing.assert_close(ours, getattr(rot, f"{kind}_inv_freq").float(), rtol=1e-6, atol=0)
        assert mscale == getattr(rot, f"{kind}_attention_scaling") == 1.0


@pytest.mark.parametrize("name,count,scalar", [("gemma3-4b", 3_880_263_168, None), ("gemma3-12b", 11_766_034_176, None),
                                               ("gemma3-27b", 27_009_346_304, 168)])
def test_gemma3_image_text_configs_count_their_language_model(name, count, scalar):
    """gemma-3-4b's, -12b's and -27b's config.json are image-text ones whose text_config gives only what differs from
    Gemma3TextConfig's defaults (no vocabulary, context or RoPE bases; 4B: no heads either): llmc's count of the
    language model equals transformers' own Gemma3ForCausalLM built from that text_config (262,208 tied embedding
    rows, blocks of four norms), with 27B's softmax scale 168^-0.5 and linear RoPE x8 in the full layers."""
    import transformers

    from llmc.compiler.params import params_total

    cfg = json.loads((HF / f"{name}.json").read_text())
    arch = architecture_from_hf_config(cfg)
    keep = {k: v for k, v in cfg["text_config"].items() if k != "model_type"}
    with pytest.importorskip("torch").device("meta"):
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**keep))
    assert params_total(arch) == _numel(model) == count
    assert (arch.query_pre_attn_scalar, arch.rope_scaling.type, arch.rope_scaling.factor) == (scalar, "linear", 8.0)
    assert arch.full_attention_layers == tuple(i for i, k in enumerate(model.config.layer_types)
                                               if k == "full_attention")


def test_gemma3_defaults_and_refusals():
    """Gemma3TextConfig's defaults where a key is absent (tied embeddings, head_dim 256, window 4096 but in every 6th
    layer, RoPE bases 1e6 / 1e4, query_pre_attn_scalar 256 = head_dim: the usual scale); a query_pre_attn_scalar
    apart from head_dim (Gemma 3-27B's 168 over 128) is kept; an image-text config (4B and up) is its text_config;
    bidirectional attention, another activation and biases are refused at once, each named."""
    from llmc.spec.families import family_of

    base = {"model_type": "gemma3_text", "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 6,
            "hidden_size": 64, "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 8192}
    a = architecture_from_hf_config(base)
    assert (a.tied_embeddings, a.hd, a.sliding_window, a.full_attention_layers, a.rope_theta, a.sliding_rope_theta,
            a.query_pre_attn_scalar, family_of(a).name) == (True, 256, 4096, (5,), 1e6, 1e4, None, "gemma3")
    b = architecture_from_hf_config({**base, "head_dim": 128, "query_pre_attn_scalar": 168,
                                     "tie_word_embeddings": False})
    assert (b.query_pre_attn_scalar, b.tied_embeddings) == (168, False)
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**base, "use_bidirectional_attention": True, "hidden_activation": "gelu",
                                     "attention_bias": True})
    assert sorted(m.split("'")[1] for m in e.value.messages) == [
        "attention_bias", "hidden_activation", "use_bidirectional_attention"]
    # the image-text releases (model_type gemma3): their language model, the head's tying from the top level
    mm = architecture_from_hf_config({"model_type": "gemma3", "text_config": base, "tie_word_embeddings": False})
    assert mm == architecture_from_hf_config({**base, "tie_word_embeddings": False})
    with pytest.raises(HFConfigError, match="has no 'text_config' object"):
        architecture_from_hf_config({**base, "model_type": "gemma3"})


@pytest.mark.parametrize("name,count,scalar", [("gemma2-2b", 2_614_341_888, None), ("gemma2-9b", 9_241_705_984, None),
                                               ("gemma2-27b", 27_227_128_320, 144)])
def test_gemma2_count_layer_kinds_and_soft_caps_equal_transformers(name, count, scalar):
    """transformers' own Gemma2ForCausalLM (meta device) for google/gemma-2-{2b,9b,27b}'s configs has llmc's parameter
    count (the model pages' 2.61B / 9.24B / 27.2B: Gemma 3's four norms a block, no q / k norms, 256,000 tied rows);
    its layer kinds are llmc's (the 4096 window in the even layers), and so are its soft-caps (50, 30) and 27B's
    softmax scale (144^-0.5 with head_dim 128)."""
    from llmc.compiler.params import params_total
    from llmc.spec.families import family_of

    cfg, model = _meta_model(name)
    arch = architecture_from_hf_config(cfg)
    assert params_total(arch) == _numel(model) == count
    assert arch.full_attention_layers == tuple(i for i, k in enumerate(model.config.layer_types)
                                               if k == "full_attention") == tuple(range(1, arch.n_layers, 2))
    assert (arch.sliding_window, arch.attn_logit_softcap, arch.final_logit_softcap) == (
        model.config.sliding_window, model.config.attn_logit_softcapping, model.config.final_logit_softcapping)
    assert (arch.query_pre_attn_scalar, arch.qk_norm, family_of(arch).name) == (scalar, False, "gemma2")


def test_gemma2_defaults_and_refusals():
    """Gemma2Config's defaults where a key is absent (soft-capping on, 50 / 30; the window in every other layer; tied;
    head_dim 256); an explicit null switches a soft-cap off; soft-capping is read for Gemma 3 too (its config class
    has the keys, off by default, and applies only the final one); biases and bidirectional attention are refused, each named."""
    base = {"model_type": "gemma2", "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 4,
            "hidden_size": 64, "intermediate_size": 128, "vocab_size": 100}
    a = architecture_from_hf_config(base)
    assert (a.attn_logit_softcap, a.final_logit_softcap, a.full_attention_layers, a.sliding_window, a.hd,
            a.tied_embeddings, a.rope_theta, a.sliding_rope_theta) == (50.0, 30.0, (1, 3), 4096, 256, True, 1e4, None)
    b = architecture_from_hf_config({**base, "attn_logit_softcapping": None, "final_logit_softcapping": None})
    assert (b.attn_logit_softcap, b.final_logit_softcap) == (None, None)
    g3 = architecture_from_hf_config({**base, "model_type": "gemma3_text", "final_logit_softcapping": 30.0})
    assert (g3.final_logit_softcap, g3.attn_logit_softcap, g3.qk_norm) == (30.0, None, True)
    with pytest.raises(HFConfigError, match="Gemma3Attention does not apply it"):  # (transformers keeps, never uses it)
        architecture_from_hf_config({**base, "model_type": "gemma3_text", "attn_logit_softcapping": 50.0})
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**base, "attention_bias": True, "use_bidirectional_attention": True,
                                     "attn_logit_softcapping": "x"})
    assert sorted(m.split("'")[1] for m in e.value.messages) == [
        "attention_bias", "attn_logit_softcapping", "use_bidirectional_attention"]


def test_deepseek_v2_lite_count_routing_and_refusals():
    """transformers' own DeepseekV2ForCausalLM (meta device) for deepseek-ai/DeepSeek-V2-Lite's config has llmc's
    parameter count, 15,706,484,224 (the model page's 15.7B: MLA with a full-rank q, 64 routed experts of 1408 and 2
    shared, the first layer dense); its router is softmax top-6 unnormalised (DeepseekV2TopkRouter never reads
    norm_topk_prob), no bias, and its YaRN keeps DeepSeek-V2's mscale keys. A routing method DeepseekV2TopkRouter has
    no branch for (V3's noaux_tc), a sparse step, norm_topk_prob true and sigmoid scoring are refused, each named
    (group_limited_greedy, DeepSeek-V2's own: tests/test_deepseek_v2_group_routing.py)."""
    from llmc.compiler.params import params_total
    from llmc.spec.families import family_of

    cfg, model = _meta_model("deepseek-v2-lite")
    arch = architecture_from_hf_config(cfg)
    assert params_total(arch) == _numel(model) == 15_706_484_224
    m, rs = arch.moe, arch.rope_scaling
    assert (m.score_func, m.route_norm, m.expert_bias, m.n_expert_groups, m.top_k, family_of(arch).name) == (
        "softmax", False, False, None, 6, "deepseek_v2")
    assert (rs.type, rs.factor, rs.mscale, rs.mscale_all_dim, arch.mla.q_lora_rank) == ("yarn", 40.0, 0.707, 0.707, None)
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**cfg, "topk_method": "noaux_tc", "moe_layer_freq": 2,
                                     "norm_topk_prob": True, "scoring_func": "sigmoid"})
    assert [x.split("'")[1] for x in e.value.messages] == ["topk_method", "moe_layer_freq", "norm_topk_prob",
                                                           "scoring_func"]


def test_olmoe_count_block_and_refusals():
    """transformers' own OlmoeForCausalLM (meta device) for allenai/OLMoE-1B-7B-0924's config has llmc's parameter
    count, 6,919,161,856 (the paper's 6.9B total, 1.3B active: arXiv:2409.02060): a pre-norm block with q / k norms
    over the whole projections (2048 + 2048 weights a layer) and 64 experts of 1024 in every layer, top-8
    unnormalised (norm_topk_prob false); clip_qkv and attention_bias are refused, each named."""
    from llmc.compiler.params import params_active, params_total
    from llmc.spec.families import family_of

    cfg, model = _meta_model("olmoe-1b-7b")
    arch = architecture_from_hf_config(cfg)
    assert params_total(arch) == _numel(model) == 6_919_161_856 and round(params_active(arch) / 1e9, 1) == 1.3
    assert (arch.norm_placement, arch.qk_norm_scope, arch.moe.route_norm, arch.moe.top_k, family_of(arch).name) == (
        "pre", "projection", False, 8, "olmoe")
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**cfg, "attention_bias": True, "clip_qkv": 8.0})
    assert [x.split("'")[1] for x in e.value.messages] == ["attention_bias", "clip_qkv"]


def test_olmo3_layer_kinds_defaults_and_refusals():
    """``layer_types`` absent: Olmo3Config's default, every 4th layer full ((i + 1) % 4 == 0), a 4096 window and base
    500000; all layers full: OLMo 2's computation; a windowed layer's own base in transformers >= 5's per-kind
    rope_parameters is ``sliding_rope_theta``, a scaling there is refused, as are mixed kinds in another model type."""
    from llmc.spec.families import family_of

    base = {"model_type": "olmo3", "num_attention_heads": 4, "num_hidden_layers": 8, "hidden_size": 64,
            "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 8192}
    a = architecture_from_hf_config(base)
    assert (a.full_attention_layers, a.sliding_window, a.rope_theta, family_of(a).name) == ((3, 7), 4096, 5e5, "olmo3")
    full = architecture_from_hf_config({**base, "layer_types": ["full_attention"] * 8})
    assert (full.sliding_window, full.full_attention_layers, family_of(full).name) == (None, (), "olmo2")
    kinds = ["sliding_attention", "full_attention"] * 4
    rp = {"full_attention": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048,
                             "rope_theta": 1e4}, "sliding_attention": {"rope_type": "default", "rope_theta": 5e5}}
    b = architecture_from_hf_config({**base, "layer_types": kinds, "sliding_window": 512, "rope_parameters": rp})
    assert (b.full_attention_layers, b.sliding_window, b.rope_theta, b.sliding_rope_theta, b.rope_scaling.type) == (
        (1, 3, 5, 7), 512, 1e4, 5e5, "yarn")
    with pytest.raises(HFConfigError, match="'rope_parameters.sliding_attention'"):
        architecture_from_hf_config({**base, "rope_parameters": {**rp, "sliding_attention": rp["full_attention"]}})
    with pytest.raises(HFConfigError, match="'layer_types' must list one kind for each of the 8"):
        architecture_from_hf_config({**base, "layer_types": kinds[:6]})
    with pytest.raises(HFConfigError, match="layer_types: layers of different attention kinds"):
        architecture_from_hf_config({**base, "model_type": "mistral", "layer_types": kinds, "sliding_window": 512})


def test_smollm3_nope_layers_read_and_refusals():
    """``no_rope_layers`` absent: SmolLM3Config's default, NoPE every ``no_rope_layer_interval``-th layer (here 2:
    1, 3, 5); all flags 1: no NoPE layer, a plain Llama; a RoPE base absent: SmolLM3's 2e6. Flags that are not
    one 0/1 per layer, and the bias / window switches llmc does not model, are refused at once, each named."""
    from llmc.spec.families import family_of

    base = {"model_type": "smollm3", "num_attention_heads": 4, "num_hidden_layers": 6, "hidden_size": 64,
            "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64}
    a = architecture_from_hf_config({**base, "no_rope_layer_interval": 2})
    assert (a.nope_layers, a.rope_theta, family_of(a).name) == ((1, 3, 5), 2e6, "smollm3")
    assert architecture_from_hf_config({**base, "no_rope_layers": [0, 1, 1, 1, 1, 0]}).nope_layers == (0, 5)
    plain = architecture_from_hf_config({**base, "no_rope_layers": [1] * 6, "rope_theta": 1e4})
    assert (plain.nope_layers, family_of(plain).name) == ((), "llama")
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**base, "no_rope_layers": [1, 0], "attention_bias": True,
                                     "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 3})
    assert [m.split("'")[1] for m in e.value.messages] == ["attention_bias", "use_sliding_window", "no_rope_layers"]
    for bad in ([1, 0, 1, 1, 2, 1], [1.0] * 6, "1110"):
        with pytest.raises(HFConfigError, match="'no_rope_layers' must list 1"):
            architecture_from_hf_config({**base, "no_rope_layers": bad})


def test_phi3_long_context_rope_is_longrope_and_partial_rotary_refused():
    """Phi3Config reads every rope_scaling type (su, yarn, longrope) as LongRoPE (never llmc's yarn), with
    original_max_position_embeddings at the top level of Phi-3's configs and factor = max / original when absent
    (Phi-3-mini-128k: 131072 / 4096 = 32); a Llama config's yarn stays yarn. Phi-4-mini's partial_rotary_factor 0.75
    is int(head_dim x 0.75) = 96 rotary dims (an out-of-range factor is refused with every other problem at once);
    transformers >= 5 configs (rope_parameters) read the same."""
    cfg = {**json.loads((HF / "phi3-mini-4k.json").read_text()), "max_position_embeddings": 131072,
           "sliding_window": 262144}
    short, long = [1.0 + i / 10 for i in range(48)], [2.0 + i for i in range(48)]
    for kind in ("su", "yarn", "longrope"):
        rs = architecture_from_hf_config({**cfg, "rope_scaling": {"type": kind, "short_factor": short,
                                                                  "long_factor": long}}).rope_scaling
        assert (rs.type, rs.factor, rs.original_max_position, rs.short_factor, rs.long_factor) == (
            "longrope", 32.0, 4096, tuple(short), tuple(long))
    t5 = {k: v for k, v in cfg.items() if k not in ("rope_theta", "rope_scaling")}
    t5["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": short,
                             "long_factor": long, "original_max_position_embeddings": 4096, "partial_rotary_factor": 1.0}
    assert architecture_from_hf_config(t5).rope_scaling == architecture_from_hf_config(
        {**cfg, "rope_scaling": {"type": "longrope", "short_factor": short, "long_factor": long}}).rope_scaling
    llama = json.loads((HF / "llama3-8b.json").read_text())
    assert architecture_from_hf_config({**llama, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}).rope_scaling.type \
        == "yarn"
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**cfg, "partial_rotary_factor": 1.5,
                                     "rope_scaling": {"rope_type": "longrope", "short_factor": "x", "long_factor": long}})
    assert ["partial_rotary_factor" in m for m in e.value.messages] == [False, True]
    assert "rope_scaling.short_factor" in e.value.messages[0]
    from llmc.spec.families import family_of

    mini = architecture_from_hf_config({**cfg, "num_attention_heads": 24, "num_key_value_heads": 8,
                                        "partial_rotary_factor": 0.75})
    assert (mini.hd, mini.rotary_dim, family_of(mini).name) == (128, 96, "phi3")
    full = architecture_from_hf_config({**cfg, "partial_rotary_factor": 1.0})
    # Phi-3.5-mini's window (262144) is longer than its context (131072): it never binds, full attention
    assert (full.rotary_dim, full.sliding_window, family_of(full).name) == (None, None, "llama")


@pytest.mark.parametrize("cfg, msg", [
    ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
    ({"model_type": "llama", "hidden_act": "gelu"}, "hidden_act"),
    ({"model_type": "llama", "hidden_size": 64}, "num_attention_heads"),
    ({"model_type": "llama", "num_attention_heads": 4, "num_hidden_layers": 2, "hidden_size": 64,
      "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64,
      "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_scaling"),
    ({"model_type": "qwen3", "num_attention_heads": 4, "num_hidden_layers": 2, "hidden_size": 64,
      "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64, "use_sliding_window": True,
      "max_window_layers": 1}, "use_sliding_window"),  # (layer 1 windowed, layer 0 not: a mix)
])
def test_hf_errors(cfg, msg):
    with pytest.raises(HFConfigError, match=msg):
        architecture_from_hf_config(cfg)


def test_hf_defaults_mha_and_qwen_bias():
    base = {"num_attention_heads": 4, "num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128,
            "vocab_size": 100, "max_position_embeddings": 64}
    a = architecture_from_hf_config({"model_type": "llama", **base})
    assert a.n_kv_heads == 4 and not a.qkv_bias and a.rope_scaling is None
    q = architecture_from_hf_config({"model_type": "qwen2", **base})
    assert q.qkv_bias


@pytest.mark.parametrize("model_type, family", [
    ("llama", "llama"), ("mistral", "llama"), ("phi3", "llama"), ("granite", "granite"), ("smollm3", "smollm3"), ("olmo2", "olmo2"), ("qwen2", "qwen2"), ("qwen3", "qwen3"), ("mixtral", "mixtral"),
    ("qwen3_moe", "qwen3_moe"), ("deepseek_v3", "deepseek_v3"), ("glm4_moe", "glm4_moe"),
])
def test_imported_config_lands_in_its_family(model_type, family):
    from llmc.spec.families import family_of

    cfg = {"model_type": model_type, "num_attention_heads": 4, "num_hidden_layers": 2, "hidden_size": 64,
           "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64}
    if model_type == "mixtral":
        cfg.update(num_local_experts=4, num_experts_per_tok=2)
    if model_type == "smollm3":  # (a NoPE layer: the 4th)
        cfg.update(num_hidden_layers=4)
    if model_type == "qwen3_moe":
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True)
    if model_type == "glm4_moe":
        cfg.update(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if model_type == "deepseek_v3":
        cfg.update(kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=32)
    arch = architecture_from_hf_config(cfg)
    assert family_of(arch).name == family and model_type in family_of(arch).hf_model_types


def test_granite_multipliers_and_refusals():
    """Granite's four muP scalars land in model.multipliers (transformers' GraniteConfig defaults: 1.0 each, and the
    softmax scale is attention_multiplier itself, not 1/sqrt(head_dim)); its attention_bias (which also biases o_proj)
    and mlp_bias are refused, with a zero multiplier, all at once."""
    base = {"model_type": "granite", "num_attention_heads": 4, "num_hidden_layers": 2, "hidden_size": 64,
            "intermediate_size": 128, "vocab_size": 100, "max_position_embeddings": 64}
    m = architecture_from_hf_config({**base, "embedding_multiplier": 12, "residual_multiplier": 0.22,
                                     "attention_multiplier": 0.0078125, "logits_scaling": 16}).multipliers
    assert (m.embedding, m.residual, m.attention, m.logits) == (12.0, 0.22, 0.0078125, 16.0)
    assert architecture_from_hf_config(base).multipliers.attention == 1.0
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**base, "attention_bias": True, "mlp_bias": True, "logits_scaling": 0})
    assert [m.split("'")[1] for m in e.value.messages[:2]] == ["attention_bias", "mlp_bias"]
    assert e.value.messages[2] == "config.json 'logits_scaling' must be > 0 (got 0.0)"


def test_deepseek_v3_config_as_transformers_saves_it():
    """transformers' DeepseekV3Config.save_pretrained writes no topk_method / scoring_func (its router always
    applies sigmoid + e_score_correction_bias) and head_dim = qk_rope_head_dim: read as the V3 design."""
    cfg = json.loads((HF / "deepseek-v3.json").read_text())
    for key in ("topk_method", "scoring_func"):
        cfg.pop(key)
    cfg["head_dim"] = cfg["qk_rope_head_dim"]
    arch = architecture_from_hf_config(cfg, name="deepseek-v3")
    assert arch.model_dump() == PRESETS["deepseek-v3"].model_dump()
    assert arch.moe.expert_bias and arch.moe.score_func == "sigmoid" and arch.hd == 192 and arch.moe.route_norm
    assert architecture_from_hf_config({**cfg, "norm_topk_prob": False}).moe.route_norm is False


def test_qwen3_moe_dense_layers_and_refusals():
    """Qwen3-MoE's layer placement (``Qwen3MoeDecoderLayer``: dense where the index is in mlp_only_layers): a leading
    run of dense layers is llmc's dense_layers; any other placement or a sparse step is refused with the key named,
    every problem at once. Unnormalised top-k weights (norm_topk_prob false, transformers' default where absent) are
    ``route_norm: false``; Qwen3-30B-A3B's config says true."""
    cfg = json.loads((HF / "qwen3-30b-a3b.json").read_text())
    arch = architecture_from_hf_config({**cfg, "mlp_only_layers": [0, 1, 2]})
    assert arch.moe.dense_layers == 3 and arch.moe.expert_d_ff == 768 and arch.qk_norm and arch.moe.route_norm
    for value in (False, None):
        assert architecture_from_hf_config({**cfg, "norm_topk_prob": value}).moe.route_norm is False
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**cfg, "mlp_only_layers": [1, 3], "decoder_sparse_step": 2})
    assert [m.split("'")[1] for m in e.value.messages] == ["decoder_sparse_step", "mlp_only_layers"]


def test_sliding_window_read_where_the_config_uses_it():
    """Mistral-7B v0.1 attends to the previous 4096 tokens (its config.json ``sliding_window``, no
    ``use_sliding_window`` key); Qwen2 / Qwen3 configs carry a window they switch off (``use_sliding_window: false``),
    or apply from layer max_window_layers on (every layer only when that is 0); transformers' ``layer_types`` lists
    each layer's kind (one kind for every layer, or refused)."""
    mistral = json.loads((HF / "mistral-7b.json").read_text())
    assert mistral["sliding_window"] == 4096 and architecture_from_hf_config(mistral).sliding_window == 4096
    assert architecture_from_hf_config({**mistral, "sliding_window": None}).sliding_window is None
    qwen = json.loads((HF / "qwen2.5-7b.json").read_text())
    assert qwen["use_sliding_window"] is False and qwen["sliding_window"]
    assert architecture_from_hf_config(qwen).sliding_window is None
    with pytest.raises(HFConfigError, match="'sliding_window' must be an integer"):
        architecture_from_hf_config({**mistral, "sliding_window": "4k"})
    assert architecture_from_hf_config({**mistral, "sliding_window": 0}).sliding_window is None  # 0: disabled
    assert architecture_from_hf_config({**mistral, "sliding_window": 32768}).sliding_window is None  # >= context
    every = {**qwen, "use_sliding_window": True, "max_window_layers": 0, "sliding_window": 4096}
    assert architecture_from_hf_config(every).sliding_window == 4096
    with pytest.raises(HFConfigError, match="max_window_layers"):
        architecture_from_hf_config({**every, "max_window_layers": 4})
    n = mistral["num_hidden_layers"]
    assert architecture_from_hf_config({**mistral, "layer_types": ["sliding_attention"] * n}).sliding_window == 4096
    assert architecture_from_hf_config({**mistral, "layer_types": ["full_attention"] * n}).sliding_window is None
    with pytest.raises(HFConfigError, match="layer_types: layers of different attention kinds"):
        architecture_from_hf_config({**mistral, "layer_types": ["sliding_attention", "full_attention"] * (n // 2)})
    for bad in ("sliding_attention", ["chunked_attention"] * n, [1] * n):  # not a list of the two kinds
        with pytest.raises(HFConfigError, match="layer_types must list full_attention or sliding_attention"):
            architecture_from_hf_config({**mistral, "layer_types": bad})


def test_class_defaults_are_transformers_config_defaults():
    """Where config.json leaves a key out, llmc reads what transformers' config class fills in (its dataclass default
    or its RoPE default base): the table in llmc.spec.hf, checked here against transformers itself."""
    transformers = pytest.importorskip("transformers")
    from llmc.spec.hf import _CLASS_DEFAULTS

    for mt, defaults in _CLASS_DEFAULTS.items():
        cls = transformers.CONFIG_MAPPING[mt]
        fields = cls.__dataclass_fields__
        for key, value in defaults.items():
            if key == "rope_theta":  # RotaryEmbeddingConfigMixin: the class's default_theta unless it declares one
                theo = fields["rope_theta"].default if "rope_theta" in fields else cls.default_theta
                theo = theo if isinstance(theo, float | int) else cls.default_theta
                built = cls().rope_parameters
                built = built.get("full_attention", built)
                assert built["rope_theta"] == value == theo, (mt, key)
            else:
                assert fields[key].default == value, (mt, key, fields[key].default)
        for key in ("num_key_value_heads", "head_dim", "tie_word_embeddings", "rms_norm_eps"):
            # every default that differs from llmc's own fallbacks (n_heads, d_model / n_heads, untied, 1e-6) is listed
            default = fields[key].default if key in fields else None
            fallback = {"num_key_value_heads": None, "head_dim": None, "tie_word_embeddings": False,
                        "rms_norm_eps": 1e-6}[key]
            if default != fallback and not (key == "head_dim" and mt.startswith("deepseek")):  # (MLA's: its own keys)
                assert defaults.get(key) == default, (mt, key, default)


_TINY = {"num_attention_heads": 8, "num_hidden_layers": 2, "hidden_size": 128, "intermediate_size": 256,
         "vocab_size": 128, "max_position_embeddings": 256, "num_key_value_heads": 4, "head_dim": 16,
         "pad_token_id": None}
_TINY_MOE = {"mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
             "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32},
             "glm4_moe": {"n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}}


def _tiny(mt: str, drop=(), **changes) -> dict:
    cfg = {"model_type": mt, **_TINY, **_TINY_MOE.get(mt, {}), **changes}
    return {k: v for k, v in cfg.items() if k not in drop}


@pytest.mark.parametrize("cfg", [
    _tiny("mistral", attention_bias=True),  # Mistral's attention hard-codes bias=False: the key is not read
    _tiny("mixtral", attention_bias=True, drop=("rope_theta", "rms_norm_eps")),  # and absent: 1e6, 1e-5
    _tiny("llama", sliding_window=16),  # LlamaAttention never reads a window
    _tiny("olmo2", sliding_window=16),
    _tiny("qwen2", sliding_window=16),  # use_sliding_window absent: false
    _tiny("qwen3_moe", use_sliding_window=True, sliding_window=16),  # every layer (no max_window_layers)
    _tiny("mistral", max_position_embeddings=8192),  # sliding_window absent: MistralConfig's 4096
    _tiny("mistral", drop=("num_key_value_heads",)),  # absent: MistralConfig's 8
    _tiny("qwen3", drop=("head_dim",)),  # absent: Qwen3Config's 128
    _tiny("smollm3"),  # tie_word_embeddings absent: SmolLM3Config's true
    _tiny("phi3", drop=("head_dim",)),  # rms_norm_eps absent: Phi3Config's 1e-5
    _tiny("llama", hidden_act="swish"),
    # GLM-4.5's block: q/k/v biases (o_proj none), RoPE on half of each head (absent: Glm4MoeConfig's 0.5), the
    # factor inside rope_parameters (transformers >= 5's saves), the defaults where the keys are absent
    _tiny("glm4_moe", attention_bias=True, use_qk_norm=True, first_k_dense_replace=1, n_shared_experts=2),
    _tiny("glm4_moe", drop=("num_key_value_heads", "head_dim", "rms_norm_eps", "n_routed_experts"),
          rope_parameters={"rope_type": "default", "rope_theta": 5e5, "partial_rotary_factor": 0.25}),
    _tiny("glm4_moe", partial_rotary_factor=1.0, rope_scaling={"rope_type": "yarn", "factor": 4.0},
          original_max_position_embeddings=64),
    _tiny("llama", rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    _tiny("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0}, original_max_position_embeddings=64),
    # YaRN's correction range kept fractional (gpt-oss's truncate: false; was refused)
    _tiny("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0, "truncate": False},
          original_max_position_embeddings=64),
    _tiny("llama", rope_theta=1e4, rope_parameters={"rope_type": "default", "rope_theta": 5e5}),
    _tiny("llama", rope_theta=1e4, rope_scaling={"rope_type": "linear", "factor": 2.0, "rope_theta": 2e5}),
    _tiny("phi3", drop=("head_dim",), original_max_position_embeddings=64, max_position_embeddings=256,
          rope_scaling={"rope_type": "longrope", "original_max_position_embeddings": 32,
                        "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
], ids=lambda c: "-".join(f"{k}" for k in c if k not in _TINY and k != "model_type") or c["model_type"])
def test_imported_model_is_the_one_transformers_builds(cfg):
    """The model llmc imports from a config.json is the one transformers builds from it: the same parameter count
    (meta device), tying, RMSNorm epsilon, window in every layer and RoPE frequencies / attention scaling, where the
    config leaves keys out, says things its model class never reads, or puts a RoPE key in two places."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llmc.compiler.params import params_total
    from llmc.runtime.model import rope_inv_freq

    arch = architecture_from_hf_config(cfg)
    hf_cfg = transformers.AutoConfig.for_model(cfg["model_type"], **{k: v for k, v in cfg.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    assert params_total(arch) == _numel(model)
    assert arch.tied_embeddings == (model.lm_head.weight is model.model.embed_tokens.weight)
    assert arch.norm_eps == hf_cfg.rms_norm_eps
    n, mt = hf_cfg.num_hidden_layers, cfg["model_type"]
    if mt in ("qwen2", "qwen3"):
        windows = [hf_cfg.sliding_window if k == "sliding_attention" else None for k in hf_cfg.layer_types]
    elif mt in ("mistral", "mixtral", "phi3", "qwen3_moe"):
        windows = [hf_cfg.sliding_window] * n
    else:
        windows = [None] * n
    windows = [w if w is not None and w < hf_cfg.max_position_embeddings else None for w in windows]  # (else: never binds)
    assert [arch.layer_window(i) for i in range(n)] == windows
    with torch.device("cpu"):
        rot = type(model.model.rotary_emb)(config=hf_cfg)
    ours, scaling = rope_inv_freq(arch.rotary_dim or arch.hd, arch.rope_theta, arch.rope_scaling)
    torch.testing.assert_close(ours.double(), rot.inv_freq.double(), rtol=1e-6, atol=0)
    assert scaling == pytest.approx(rot.attention_scaling)


@pytest.mark.parametrize("cfg, key", [
    (_tiny("llama", attention_bias=True), "attention_bias"),  # q/k/v and o_proj biased in transformers
    (_tiny("qwen3", attention_bias=True), "attention_bias"),
    (_tiny("qwen3_moe", attention_bias=True), "attention_bias"),
    (_tiny("llama", mlp_bias=True), "mlp_bias"),
    (_tiny("llama", hidden_act="gelu_pytorch_tanh"), "hidden_act"),  # GeGLU: Gemma's block only
    (_tiny("phi3", rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_scaling"),
    (_tiny("qwen3", use_sliding_window=True, sliding_window=16, max_window_layers=1), "use_sliding_window"),
])
def test_configs_whose_model_llmc_would_change_are_refused_naming_the_key(cfg, key):
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config(cfg)
    assert [m.split("'")[1] for m in e.value.messages] == [key]


def test_a_float_key_given_as_a_huge_integer_is_named():
    with pytest.raises(HFConfigError, match="'rms_norm_eps' must be a finite number"):
        architecture_from_hf_config(_tiny("llama", rms_norm_eps=10**400))
