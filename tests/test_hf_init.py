"""Start from a pretrained Hugging Face model, end with one: tiny random Llama / Qwen2 / Qwen3 / Mixtral / Qwen3-MoE models made
with transformers here, loaded into llmc's model (logits and loss equal transformers'), trained by the native
trainer and exported back (transformers loads the export with llmc's logits); LoRA adapters load with PEFT."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from llmc.runtime.hf_io import (  # noqa: E402
    HFError,
    export_hf,
    export_peft_adapter,
    load_hf_into,
    loaded_from,
    read_hf_config,
    resolve_hf_source,
)
from llmc.runtime.model import build_model, lm_loss  # noqa: E402
from llmc.spec.hf import architecture_from_hf_config  # noqa: E402
from llmc.spec.presets import PRESETS  # noqa: E402

TINY = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, rope_theta=5000.0, rms_norm_eps=1e-5)


def make_hf(tmp: Path, kind: str = "llama", shard: str | None = "40KB", seed: int = 0, **over) -> Path:
    """A random tiny HF model saved with save_pretrained (sharded safetensors when ``shard``)."""
    torch.manual_seed(seed)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**{**TINY, **over})
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":
        cfg = transformers.Qwen3Config(**{**TINY, **over})
        model = transformers.Qwen3ForCausalLM(cfg)
    elif kind == "mixtral":
        cfg = transformers.MixtralConfig(**{**TINY, "num_local_experts": 3, "num_experts_per_tok": 2, **over})
        model = transformers.MixtralForCausalLM(cfg)
    elif kind == "mistral":  # the Llama block with a sliding window (Mistral-7B v0.1: 4096)
        cfg = transformers.MistralConfig(**{**TINY, **over})
        model = transformers.MistralForCausalLM(cfg)
    elif kind == "olmo2":  # norms on the branches' outputs, q / k norms over the whole projections
        cfg = transformers.Olmo2Config(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **over})
        model = transformers.Olmo2ForCausalLM(cfg)
    elif kind == "olmo3":  # OLMo 2's block with a window in layers 0 and 2 and YaRN in layer 1 only (transformers >= 5
        # saves the windowed layers' RoPE apart, at its default base 500000: llmc's sliding_rope_theta)
        cfg = transformers.Olmo3Config(**{**TINY, "num_hidden_layers": 3, "sliding_window": 5, "layer_types": [
            "sliding_attention", "full_attention", "sliding_attention"], "rope_scaling": {
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, "pad_token_id": 0,
            "bos_token_id": 1, "eos_token_id": 2, **over})
        model = transformers.Olmo3ForCausalLM(cfg)
    elif kind == "gemma3":  # norms before and after both branches (1 + weight), GeGLU, embeddings x sqrt(d), a window
        # in layers 0 and 2 at base 100, full attention with linear RoPE scaling in layer 1, softmax scale 12^-0.5
        cfg = transformers.Gemma3TextConfig(**{**TINY, "num_hidden_layers": 3, "head_dim": 16, "query_pre_attn_scalar": 12,
                                               "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                               "sliding_window": 5, "rope_scaling": {"rope_type": "linear", "factor": 4.0},
                                               "rope_local_base_freq": 100.0, "pad_token_id": 0, "bos_token_id": 1,
                                               "eos_token_id": 2, **over})
        model = transformers.Gemma3ForCausalLM(cfg)
    elif kind == "gemma2":  # Gemma 3's block without q / k norms, a window in layers 0 and 2, full attention in layer
        # 1, softmax scale 12^-0.5, attention scores soft-capped at 1 and logits at 1.5 (small caps and weights ten
        # times the usual initialisation's, so that both caps bind)
        cfg = transformers.Gemma2Config(**{**TINY, "num_hidden_layers": 3, "head_dim": 16, "query_pre_attn_scalar": 12,
                                           "initializer_range": 0.2,
                                           "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
                                           "sliding_window": 5, "attn_logit_softcapping": 1.0,
                                           "final_logit_softcapping": 1.5, "pad_token_id": 0, "bos_token_id": 1,
                                           "eos_token_id": 2, **over})
        model = transformers.Gemma2ForCausalLM(cfg)
    elif kind == "olmoe":  # a pre-norm block, q / k norms over the whole projections, 4 experts top-2 unnormalised
        cfg = transformers.OlmoeConfig(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 40,
                                          "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **over})
        model = transformers.OlmoeForCausalLM(cfg)
    elif kind == "gemma3_mm":  # Gemma 3-4B and up: an image-text model (a tiny SigLIP encoder) around the language model
        text = {**TINY, "num_hidden_layers": 3, "head_dim": 16, "layer_types": [
            "sliding_attention", "full_attention", "sliding_attention"], "sliding_window": 5, **over}
        cfg = transformers.Gemma3Config(text_config=text, vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
            patch_size=14), mm_tokens_per_image=4, image_token_index=500, boi_token_index=501, eoi_token_index=502)
        model = transformers.Gemma3ForConditionalGeneration(cfg)
    elif kind == "smollm3":  # no RoPE in the layers no_rope_layers flags 0 (SmolLM3-3B: every 4th)
        cfg = transformers.SmolLM3Config(**{**TINY, "num_hidden_layers": 3, "no_rope_layers": [1, 0, 1],
                                            "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **over})
        model = transformers.SmolLM3ForCausalLM(cfg)
    elif kind == "phi3":  # q/k/v and gate/up fused in the checkpoint (token ids inside the tiny vocabulary)
        cfg = transformers.Phi3Config(**{**TINY, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, **over})
        model = transformers.Phi3ForCausalLM(cfg)
    elif kind == "granite":  # muP multipliers as Granite 3's (embeddings x 12, residual branches x 0.22, logits / 8)
        cfg = transformers.GraniteConfig(**{**TINY, "embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                            "attention_multiplier": 0.125, "logits_scaling": 8.0, "pad_token_id": 0,
                                            **over})
        model = transformers.GraniteForCausalLM(cfg)
    elif kind == "qwen3_moe":  # experts narrower than intermediate_size (the dense layers' width), top-k renormalised
        cfg = transformers.Qwen3MoeConfig(**{**TINY, "num_experts": 4, "num_experts_per_tok": 2,
                                             "moe_intermediate_size": 40, "norm_topk_prob": True, **over})
        model = transformers.Qwen3MoeForCausalLM(cfg)
    elif kind == "gpt_oss":  # sinks, q/k/v and o biases, biased clamped-SwiGLU experts (8, top-2; no aux loss in the
        # logged loss; 8 x 96 gate / up biases: above DeepSpeed's ZeRO-3 persistence threshold of 10 x hidden, so
        # partitioned), a window in layers 0 and 2 (GptOssConfig's default head_dim 64 replaced by hidden / heads)
        kw = {**TINY, **over}
        cfg = transformers.GptOssConfig(**{**kw, "num_hidden_layers": 3, "num_local_experts": 8,
                                           "head_dim": kw["hidden_size"] // kw["num_attention_heads"],
                                           "num_experts_per_tok": 2, "sliding_window": 5, "router_aux_loss_coef": 0.0,
                                           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
        model = transformers.GptOssForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**{**TINY, **over})
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms and biases: a wrong mapping cannot hide behind ones / zeros
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
    out = tmp / f"hf-{kind}"
    kw = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(out, **kw)
    return out


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def arch_of(path: Path):
    return architecture_from_hf_config(read_hf_config(path), name="from-hf")


@pytest.mark.parametrize("kind,over", [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}),
                                       ("qwen3", {"head_dim": 16}), ("mixtral", {}),
                                       ("qwen3_moe", {"head_dim": 16, "mlp_only_layers": [0]}),
                                       ("qwen3_moe", {"head_dim": 16, "norm_topk_prob": False}), ("phi3", {}),
                                       ("olmoe", {}), ("olmoe", {"norm_topk_prob": True}),
                                       ("granite", {"tie_word_embeddings": True}),
                                       # sliding windows shorter than the 17 tokens: each query sees its last 5
                                       ("mistral", {"sliding_window": 5}), ("phi3", {"sliding_window": 5}),
                                       ("qwen2", {"use_sliding_window": True, "sliding_window": 5,
                                                  "max_window_layers": 0}),
                                       ("smollm3", {"tie_word_embeddings": True}), ("olmo2", {}),
                                       ("olmo2", {"tie_word_embeddings": True, "num_key_value_heads": 6}),
                                       ("olmo3", {"sliding_window": 5}),
                                       ("olmo3", {"sliding_window": 4, "tie_word_embeddings": True}),
                                       ("gemma3", {"sliding_window": 5}),
                                       ("gemma3", {"sliding_window": 4, "tie_word_embeddings": False}),
                                       ("gemma2", {"sliding_window": 5}),
                                       ("gemma2", {"sliding_window": 4, "tie_word_embeddings": False}),
                                       ("gemma3", {"sliding_window": 5, "final_logit_softcapping": 1.5})])
def test_load_gives_transformers_logits(tmp_path, kind, over):
    src = make_hf(tmp_path, kind, **over)
    if kind != "mixtral":  # sharded: several files + index
        assert (src / "model.safetensors.index.json").exists()
    arch = arch_of(src)
    assert arch.sliding_window == over.get("sliding_window")
    model = build_model(arch, seed=123).eval()
    info = load_hf_into(model, src, arch)
    assert info["params"] == len(list(model.parameters()))
    tokens = torch.randint(0, arch.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf_model(src)(input_ids=tokens).logits
        ours = model(tokens)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    labels = torch.roll(tokens, -1, 1)  # same loss on the same batch (fp32)
    assert abs(float(lm_loss(ours, labels)) - float(lm_loss(ref, labels))) < 1e-4


@pytest.mark.parametrize("kind,over", [("qwen2", {}), ("qwen3", {"head_dim": 16}),
                                       ("qwen3_moe", {"mlp_only_layers": [0], "num_hidden_layers": 3}), ("granite", {}),
                                       ("mistral", {"sliding_window": 4}),
                                       ("qwen3", {"head_dim": 16, "use_sliding_window": True, "sliding_window": 4,
                                                  "max_window_layers": 0}),
                                       ("smollm3", {"no_rope_layers": [0, 1, 0]}), ("olmo2", {}),
                                       ("olmo3", {"layer_types": ["full_attention", "sliding_attention"] * 2,
                                                  "num_hidden_layers": 4}), ("gemma3", {}), ("gemma2", {}),
                                       ("olmoe", {})])
def test_export_loads_in_transformers_with_our_logits(tmp_path, kind, over):
    src = make_hf(tmp_path, kind, **over)
    arch = arch_of(src)
    assert arch.qk_norm is kind.startswith(("qwen3", "olmo", "gemma3")) and arch.hd == (
        over.get("head_dim") or (16 if kind.startswith("gemma") else 8))
    if kind == "qwen3_moe":
        assert (arch.moe.dense_layers, arch.moe.expert_d_ff, arch.d_ff) == (1, 40, 96)
    model = build_model(arch, seed=0).eval()
    load_hf_into(model, src, arch)
    with torch.no_grad():  # move away from the source weights so the check is on the export
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out = export_hf(model.state_dict(), arch, tmp_path / "out", dtype=torch.float32, max_shard_size="30KB")
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    if arch.sliding_window:  # a window transformers applies (LlamaConfig has none: the Llama block goes as Mistral)
        assert arch_of(out).sliding_window == arch.sliding_window
        assert json.loads((out / "config.json").read_text())["model_type"] == {
            "mistral": "mistral", "gemma3": "gemma3_text"}.get(kind, kind)
    if kind == "olmo2":  # the post-norm block with whole-projection q / k norms is Olmo2ForCausalLM's
        assert json.loads((out / "config.json").read_text())["architectures"] == ["Olmo2ForCausalLM"]
        assert (arch.norm_placement, arch.qk_norm_scope) == ("post", "projection") == (
            arch_of(out).norm_placement, arch_of(out).qk_norm_scope)
    if kind == "olmo3":  # full attention in layers 0 and 2, the other two windowed, each with its own RoPE
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["layer_types"] == over["layer_types"] and cfg["architectures"] == ["Olmo3ForCausalLM"]
        assert (arch.full_attention_layers, arch.sliding_rope_theta) == ((0, 2), 5e5) == (
            arch_of(out).full_attention_layers, arch_of(out).sliding_rope_theta)
    if kind == "gemma3":  # Gemma 3's block, its layer kinds and RoPE bases, its softmax scale: read back unchanged
        assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
        assert arch_of(out).model_dump(exclude={"name"}) == arch.model_dump(exclude={"name"})
        assert (arch.full_attention_layers, arch.sliding_rope_theta, arch.query_pre_attn_scalar) == ((1,), 100.0, 12)
    if kind == "gemma2":  # Gemma 2's block, its layer kinds, softmax scale and soft-caps: read back unchanged
        assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma2ForCausalLM"]
        assert arch_of(out).model_dump(exclude={"name"}) == arch.model_dump(exclude={"name"})
        assert (arch.full_attention_layers, arch.query_pre_attn_scalar, arch.attn_logit_softcap,
                arch.final_logit_softcap) == ((1,), 12, 1.0, 1.5)
    if kind == "smollm3":  # NoPE layers 0 and 2, written as SmolLM3Config's flags and read back
        assert json.loads((out / "config.json").read_text())["no_rope_layers"] == [0, 1, 0]
        assert arch_of(out).nope_layers == arch.nope_layers == (0, 2)
    tokens = torch.randint(0, arch.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(input_ids=tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)
    # and back: the export loads into a fresh llmc model bit-exactly
    again = build_model(arch, seed=5)
    load_hf_into(again, out, arch)
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_nope_layers_are_what_makes_smollm3_logits_equal(tmp_path):
    """The check above can fail: the same SmolLM3 weights in llmc's model with RoPE in every layer (no NoPE layer)
    give other logits than transformers' (it skips RoPE in layer 1); with layer 1 NoPE they are equal. Position 0
    is the same either way (RoPE at position 0 is the identity)."""
    src = make_hf(tmp_path, "smollm3")
    arch = arch_of(src)
    assert arch.nope_layers == (1,)
    tokens = torch.randint(0, arch.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf_model(src)(input_ids=tokens).logits
        outs = []
        for a in (arch, arch.model_copy(update={"nope_layers": ()})):
            model = build_model(a, seed=0).eval()
            load_hf_into(model, src, arch)  # (the same weights; the checkpoint's config is arch's)
            outs.append(model(tokens))
    torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[1][:, 0], ref[:, 0], atol=1e-5, rtol=1e-5)
    assert (outs[1][:, 1:] - ref[:, 1:]).abs().max() > 100 * 1e-5  # (random tiny weights: ~4e-3, 400x the tolerance)


def test_olmo3_layer_kinds_are_what_makes_the_logits_equal(tmp_path):
    """The checks above can fail: OLMo 3's weights in llmc's model give transformers' logits (17 tokens, window 5)
    only with both halves of its layer kinds: the window everywhere (no full-attention layer) gives others, and so
    does RoPE scaled in the windowed layers too (one table for every layer, as a single-kind model has)."""
    src = make_hf(tmp_path, "olmo3")
    arch = arch_of(src)
    assert (arch.full_attention_layers, arch.sliding_window, arch.rope_scaling.type) == ((1,), 5, "yarn")
    tokens = torch.randint(0, arch.vocab_size, (1, 17), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf_model(src)(input_ids=tokens).logits
        outs = []
        for a in (arch, arch.model_copy(update={"full_attention_layers": (), "sliding_rope_theta": None}), arch):
            model = build_model(a, seed=0).eval()
            load_hf_into(model, src, arch)  # (the same weights; the checkpoint's config is arch's)
            if len(outs) == 2:
                model.rope_local = model.rope  # the full-attention layers' scaled table in every layer
            outs.append(model(tokens))
    torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=1e-5)
    for other in outs[1:]:
        assert (other - ref).abs().max() > 100 * 1e-5


def test_gemma3_image_text_checkpoint_loads_as_its_language_model(tmp_path):
    """Gemma 3-4B / 12B / 27B are released as Gemma3ForConditionalGeneration (model_type gemma3): llmc imports the
    text_config as Gemma 3's language model and loads its weights (language_model.model.*) alone, the image encoder's
    tensors left out and said so; on text the image-text model's logits are llmc's; the export is the text model,
    Gemma3ForCausalLM, which transformers loads with the same logits."""
    src = make_hf(tmp_path, "gemma3_mm")
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["model_type"] == "gemma3" and cfg["architectures"] == ["Gemma3ForConditionalGeneration"]
    arch = arch_of(src)
    text = architecture_from_hf_config({**cfg["text_config"], "tie_word_embeddings": cfg["tie_word_embeddings"]},
                                       name="from-hf")
    assert arch == text and (arch.norm_placement, arch.full_attention_layers) == ("sandwich", (1,))
    model = build_model(arch, seed=0).eval()
    got = load_hf_into(model, src, arch)
    assert got["params"] == len(list(model.parameters())) and got["skipped"] > 0
    assert "image-encoder tensors left out" in loaded_from(got)
    tokens = torch.randint(0, 500, (2, 17), generator=torch.Generator().manual_seed(1))  # (500..: image specials)
    ref_model = transformers.Gemma3ForConditionalGeneration.from_pretrained(src, dtype=torch.float32,
                                                                            attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref_model(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
        out = export_hf(model.state_dict(), arch, tmp_path / "out", dtype=torch.float32)
        assert json.loads((out / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
        torch.testing.assert_close(hf_model(out)(input_ids=tokens).logits, model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gemma3", "gemma2"])
def test_each_part_of_gemmas_block_changes_the_logits(tmp_path, kind):
    """The checks above can fail: Gemma's weights in llmc's model give transformers' logits only with every part of
    its block; without any one of them (norms scaling by weight instead of 1 + weight, no sqrt(d) on the
    embeddings, SiLU for its tanh GELU, the usual softmax scale, the window in every layer; Gemma 3: the windowed
    layers at the full layers' RoPE base; Gemma 2: either soft-cap) the same weights give other logits."""
    src = make_hf(tmp_path, kind)
    arch = arch_of(src)
    tokens = torch.randint(0, arch.vocab_size, (1, 17), generator=torch.Generator().manual_seed(3))
    variants = [{}, {"norm_unit_offset": False}, {"embedding_scale": False}, {"activation": "silu"},
                {"query_pre_attn_scalar": None}, {"full_attention_layers": ()}] + (
        [{"sliding_rope_theta": None}] if kind == "gemma3" else
        [{"attn_logit_softcap": None}, {"final_logit_softcap": None}])
    with torch.no_grad():
        ref = hf_model(src)(input_ids=tokens).logits
        outs = []
        for v in variants:
            model = build_model(arch.model_copy(update=v), seed=0).eval()
            load_hf_into(model, src, arch)  # (the same weights; the checkpoint's config is arch's)
            outs.append(model(tokens))
    torch.testing.assert_close(outs[0], ref, atol=1e-5, rtol=1e-5)
    for v, other in zip(variants[1:], outs[1:], strict=True):
        assert (other - ref).abs().max() > 100 * 1e-5, v


@pytest.mark.parametrize("partial", [None, 0.75])
def test_phi3_longrope_both_regimes_in_and_out(tmp_path, partial):
    """LongRoPE (Phi-3-mini-128k, Phi-3.5-mini): transformers' Phi3 switches every position to the long factors once
    a sequence is longer than original_max_position_embeddings (here 16). llmc's model gives transformers' logits
    below and above the switch, and its export gives llmc's logits in transformers at both (LlamaForCausalLM with
    rope_type longrope; with Phi-4-mini's partial RoPE, 0.75 of each head, and tied embeddings: Phi3ForCausalLM,
    fused, which loads back bit-exactly); with the short table at 40 tokens the logits would differ (> 1e-3)."""
    over = {"hidden_size": 64, "num_attention_heads": 4, "partial_rotary_factor": partial, "tie_word_embeddings": True} \
        if partial else {}
    n = 6 if partial else 4  # one factor per rotary frequency: 16 x 0.75 / 2, or 8 / 2
    src = make_hf(tmp_path, "phi3", shard=None, original_max_position_embeddings=16,
                  rope_scaling={"type": "longrope", "short_factor": [1.0, 1.3, 2.0, 3.5, 4.0, 5.0][:n],
                                "long_factor": [1.1, 2.5, 4.0, 9.0, 10.0, 12.0][:n]}, **over)
    arch = arch_of(src)
    rs = arch.rope_scaling
    assert (rs.type, rs.factor, rs.original_max_position, arch.rotary_dim) == (
        "longrope", 4.0, 16, 12 if partial else None)
    model = build_model(arch, seed=3).eval()
    load_hf_into(model, src, arch)
    out = export_hf(model.state_dict(), arch, tmp_path / "out", dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Phi3ForCausalLM" if partial else "LlamaForCausalLM"]
    if partial:
        assert cfg["partial_rotary_factor"] == 0.75 and cfg["tie_word_embeddings"]
        again = build_model(arch, seed=5)
        load_hf_into(again, out, arch)
        for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
            assert torch.equal(a, b), name
        with pytest.raises(HFError, match="fused"):  # no PEFT layout: the merged model is what a LoRA stage exports
            export_peft_adapter({}, arch, tmp_path / "adapter", rank=4, alpha=8.0)
    ref, back = hf_model(src), hf_model(out)
    for T in (12, 16, 17, 40):
        tokens = torch.randint(0, arch.vocab_size, (2, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            ours = model(tokens)
            torch.testing.assert_close(ours, ref(input_ids=tokens).logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(back(input_ids=tokens).logits, ours, atol=1e-5, rtol=1e-5)
    model.long_from = None  # the short table for every length
    with torch.no_grad():
        assert (model(tokens) - ours).abs().max() > 1e-3


def test_mismatches_are_one_line_errors(tmp_path):
    src = make_hf(tmp_path, "llama", shard=None)
    arch = arch_of(src)
    deeper = arch.model_copy(update={"n_layers": 3})
    with pytest.raises(HFError, match=r"n_layers 3 \(spec\) != 2 \(checkpoint\)") as e:
        load_hf_into(build_model(deeper), src, deeper)
    assert "\n" not in str(e.value)
    with pytest.raises(HFError, match=r"missing 9: model.layers.2") as e:  # names, without the config check
        load_hf_into(build_model(deeper), src, deeper, check_config=False)
    wider = arch.model_copy(update={"d_ff": 64})
    with pytest.raises(HFError, match=r"shape mismatch 6: model.layers.0.mlp.gate_proj.weight \[96, 48\] vs"):
        load_hf_into(build_model(wider), src, wider, check_config=False)
    with pytest.raises(HFError, match="not in the local Hugging Face cache"):
        resolve_hf_source("nobody/not-a-model-llmc-test")
    # Gemma 2 weights under a spec without its soft-caps (the same tensors, another model): refused, named
    g2 = make_hf(tmp_path, "gemma2", shard=None)
    uncapped = arch_of(g2).model_copy(update={"attn_logit_softcap": None})
    with pytest.raises(HFError, match=r"attn_logit_softcap None \(spec\) != 1.0 \(checkpoint\)"):
        load_hf_into(build_model(uncapped), g2, uncapped)


def test_quantized_weights_are_refused_in_one_line_naming_the_method(tmp_path):
    """An AutoAWQ checkpoint (config.json quantization_config quant_method awq) stores each linear of a block as packed
    int32 ``qweight`` / ``qzeros`` and fp16 ``scales`` (AutoAWQ's WQLinear_GEMM: qweight [in, out / 8], scales
    [in / group, out]) instead of a ``weight``: the loader says the weights are quantized, names the method and offers
    the bf16 release, in one line, instead of listing missing tensors."""
    from safetensors.torch import load_file, save_file

    src = make_hf(tmp_path, "llama", shard=None)
    arch = arch_of(src)
    tensors, packed = load_file(src / "model.safetensors"), {}
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            out, inp = t.shape
            stem = name[: -len(".weight")]
            packed[f"{stem}.qweight"] = torch.zeros(inp, out // 8, dtype=torch.int32)
            packed[f"{stem}.qzeros"] = torch.zeros(inp // 16, out // 8, dtype=torch.int32)
            packed[f"{stem}.scales"] = torch.ones(inp // 16, out, dtype=torch.float16)
        else:
            packed[name] = t
    save_file(packed, src / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"bits": 4, "group_size": 16, "quant_method": "awq", "version": "gemm",
                                  "zero_point": True}
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(HFError) as e:
        load_hf_into(build_model(arch), src, arch)
    msg = str(e.value)
    assert "\n" not in msg and "quantized weights (awq) are not read" in msg and "bf16" in msg


def test_hub_id_resolves_through_the_local_cache(tmp_path, monkeypatch):
    src = make_hf(tmp_path, "llama", shard=None)
    cache = tmp_path / "hub"
    snap = cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (cache / "models--org--tiny" / "refs").mkdir()
    (cache / "models--org--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert resolve_hf_source("org/tiny") == snap
    arch = arch_of(src)
    model = build_model(arch)
    load_hf_into(model, "org/tiny", arch)
    ref = hf_model(src)
    torch.testing.assert_close(model.tok_embeddings.weight, ref.model.embed_tokens.weight)


@pytest.mark.slow
def test_lora_adapter_loads_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from llmc.runtime.lora import apply_lora, lora_state_dict, merge_lora

    src = make_hf(tmp_path, "llama", shard=None)
    arch = arch_of(src)
    model = build_model(arch).eval()
    load_hf_into(model, src, arch)
    apply_lora(model, rank=4, alpha=8.0, targets=("wq", "wk", "wv", "wo", "w1", "w2", "w3"))
    with torch.no_grad():  # B = 0 at init: give the adapters a real effect
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.05)
    tokens = torch.randint(0, arch.vocab_size, (2, 9))
    with torch.no_grad():
        ours = model(tokens)
    export_peft_adapter(lora_state_dict(model), arch, tmp_path / "adapter", rank=4, alpha=8.0)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    peft_model = peft.PeftModel.from_pretrained(hf_model(src), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=tokens).logits, ours, atol=1e-5, rtol=1e-5)
    merge_lora(model)
    out = export_hf(model.state_dict(), arch, tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(input_ids=tokens).logits, ours, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- through the trainers


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    from llmc.runtime import corpus

    d = tmp_path_factory.mktemp("docs")
    corpus.write_corpus(d / "docs.jsonl", max_docs=200)
    return d / "docs.jsonl"


def _lock(tmp: Path, docs: Path, arch, *, steps: int, init_hf: str, stages: list | None = None,
          stage_entries: list | None = None, plan: dict | None = None) -> dict:
    from test_build_fakes import lock_for

    spec = {"name": "hf", "model": arch.model_dump(mode="json"), "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": str(docs), "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 256 * steps},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 1e-3},
                         "checkpoint": {"interval_steps": 100}, "log_every": 1,
                         "init_hf": None if stages else init_hf},
            "stages": stages or []}
    return lock_for(spec, plan=plan or {"micro_batch": 8}, stages=stage_entries, spec_path=str(tmp / "spec.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("kind,over", [("llama", {}), ("phi3", {"partial_rotary_factor": 0.5}),
                                       ("mistral", {"sliding_window": 8})])
def test_native_continued_pretraining_from_hf_and_export(tmp_path, docs, kind, over):
    """First-step loss of the native trainer = transformers' loss on the same batch; the stage ends with an HF
    directory that transformers loads with the trained model's logits (Phi-3 with partial RoPE: a fused
    Phi3ForCausalLM export; Mistral with an 8-token window, shorter than the sequences)."""
    from llmc.runtime.checkpoint import load_model_weights
    from llmc.runtime.data import build_stream_loader
    from llmc.runtime.entry import prepare_assets, run_stage
    from llmc.runtime.job import TrainJob

    src = make_hf(tmp_path, kind, **over)
    arch = arch_of(src)
    lock = _lock(tmp_path, docs, arch, steps=2, init_hf=str(src))
    out = tmp_path / "run" / "pretrain"
    res = run_stage(lock, None, out, tmp_path)
    assert res["status"] == "done" and (out / "hf" / "config.json").exists()
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in recs if r.get("step") == 1 and "loss" in r)

    job = TrainJob.from_lock(lock)
    assets = prepare_assets(job, tmp_path)
    loader = build_stream_loader(list(assets.sources), assets.tokenizer(), job.seq_len, job.global_batch_seqs,
                                 job.seed)
    x, y = loader.next_batch(job.micro_batch)
    with torch.no_grad():
        ref = float(lm_loss(hf_model(src)(input_ids=x).logits, y))
    assert abs(first - ref) < 1e-4, (first, ref)

    trained = build_model(arch)
    load_model_weights(trained, out)
    assert not torch.equal(trained.tok_embeddings.weight, hf_model(src).model.embed_tokens.weight)
    exported = transformers.AutoModelForCausalLM.from_pretrained(out / "hf", torch_dtype=torch.float32).eval()
    assert type(exported).__name__ == {"phi3": "Phi3ForCausalLM", "mistral": "MistralForCausalLM"}.get(
        kind, "LlamaForCausalLM")
    assert job.seq_len > (arch.sliding_window or 0)
    assert (out / "hf" / "tokenizer.json").exists()
    # an fp32 run exports its weights as trained (fp32; bf16 rounded every weight, unsaid): the same logits
    assert json.loads((out / "hf" / "config.json").read_text())["torch_dtype"] == "float32"
    with torch.no_grad():
        torch.testing.assert_close(exported(input_ids=x[:2]).logits, trained(x[:2]), atol=1e-5, rtol=1e-5)

    # `llmc export RUN_DIR --stage pretrain`: the same tensors again, from the checkpoint
    from safetensors.torch import load_file

    from llmc.runtime.hf_io import main as export_main

    (tmp_path / "plan.lock.json").write_text(json.dumps(lock))
    assert export_main([str(tmp_path), "--stage", "pretrain", "-o", str(tmp_path / "again")]) == 0
    a, b = load_file(str(tmp_path / "again" / "model.safetensors")), {}
    for f in (out / "hf").glob("model*.safetensors"):
        b.update(load_file(str(f)))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert export_main([str(tmp_path), "--stage", "nope"]) == 1  # one-line error, no traceback


@pytest.mark.slow
def test_sft_lora_stage_from_hf_exports_merged_and_peft(tmp_path, docs):
    peft = pytest.importorskip("peft")
    from llmc.runtime.entry import prepare_assets
    from llmc.runtime.job import TrainJob
    from llmc.runtime.posttrain import run_stage as run_post

    src = make_hf(tmp_path, "qwen2", shard=None)
    arch = arch_of(src)
    stages = [{"name": "sft", "kind": "sft", "steps": 3, "lr": 1e-3, "seq_len": 64, "init_hf": str(src),
               "lora": {"rank": 4, "alpha": 8, "targets": ["wq", "wv"]}}]
    lock = _lock(tmp_path, docs, arch, steps=2, init_hf=str(src), stages=stages)
    job = TrainJob.from_lock(lock, "sft")
    assets = prepare_assets(job.replace(stage="pretrain"), tmp_path)
    res = run_post(job, tmp_path / "run" / "sft", assets=assets)
    hf = tmp_path / "run" / "sft" / "hf"
    assert res["hf"] == "hf" and res["adapter"] == "hf/adapter"
    tc = json.loads((hf / "tokenizer_config.json").read_text())
    assert "<|start_header_id|>" in tc["chat_template"]
    tokens = torch.randint(0, arch.vocab_size, (2, 9))
    base = hf_model(src)
    with torch.no_grad():
        merged = hf_model(hf)(input_ids=tokens).logits
        adapted = peft.PeftModel.from_pretrained(base, str(hf / "adapter")).eval()(input_ids=tokens).logits
    # merged export is bf16, the adapter path fp32 on the fp32 base: equal up to bf16 rounding
    torch.testing.assert_close(merged, adapted, atol=3e-2, rtol=3e-2)
    assert not torch.allclose(adapted, hf_model(src)(input_ids=tokens).logits, atol=1e-4)


def titan_build(build: Path, scales: dict[int, float]):
    """A build folder whose torchtitan run left DCP checkpoints under outputs/torchtitan/checkpoint/step-N (its
    Llama FQNs put q/k/v under attention.qkv_linear), step N holding a model's weights x ``scales[N]``; the model."""
    import torch.distributed.checkpoint as dcp
    from test_build_fakes import lock_for

    from llmc.spec.model import Architecture

    arch = Architecture(name="t", n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=96, vocab_size=512,
                        max_seq_len=64, norm_eps=1e-5)
    model = build_model(arch, seed=11).eval()
    titan = {k.replace(".attention.w", ".attention.qkv_linear.w") if any(f".attention.{w}." in k for w in
             ("wq", "wk", "wv")) else k: v.clone() for k, v in model.state_dict().items()}
    titan["train_state"] = torch.tensor([3])
    for step, scale in scales.items():
        dcp.save({k: v * scale for k, v in titan.items()},
                 checkpoint_id=str(build / "outputs" / "torchtitan" / "checkpoint" / f"step-{step}"))
    spec = {"name": "t", "model": arch.model_dump(mode="json"), "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "python-docs", "format": "builtin"}], "seq_len": 32, "tokens": 1024}}
    (build / "plan.lock.json").write_text(json.dumps(lock_for(spec)))
    return model


def test_export_from_a_torchtitan_dcp_checkpoint(tmp_path):
    """A torchtitan run leaves DCP checkpoints under outputs/torchtitan/checkpoint/step-N; export_checkpoint turns
    the newest into an HF directory."""
    from llmc.runtime.export import export_checkpoint

    model = titan_build(tmp_path, {2: 0.0, 3: 1.0})  # the newest step wins
    res = export_checkpoint(tmp_path, "pretrain")
    hf = Path(res["hf"])
    assert hf == tmp_path / "run" / "pretrain" / "hf"
    tokens = torch.randint(0, 512, (2, 7))
    exported = transformers.AutoModelForCausalLM.from_pretrained(hf, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        torch.testing.assert_close(exported(input_ids=tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)


from test_runtime_train import ParametrizedRuns  # noqa: E402  (the runtime tests' multi-rank launcher)


@pytest.fixture(scope="module")
def meta_hf_runs(request, tmp_path_factory, docs) -> ParametrizedRuns:
    """The sharded meta-init cases' runs, all in one 2-rank torchrun launch, each from its own random HF
    model."""

    def build(folder: Path, kind: str, plan: dict) -> Path:
        src = make_hf(folder, kind, **({"sliding_window": 8} if kind == "mistral" else {}))
        lock = _lock(folder, docs, arch_of(src), steps=2, init_hf=str(src), plan=plan)
        (folder / "plan.lock.json").write_text(json.dumps(lock))
        return folder / "plan.lock.json"

    return ParametrizedRuns(request, "test_sharded_meta_init_loads_only_local_shards",
                            tmp_path_factory.mktemp("meta_hf"), build, lambda params: 2, meta_init=True,
                            timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind,plan", [("qwen2", {"dp_shard": 2, "micro_batch": 4}),
                                       ("qwen2", {"tp": 2, "micro_batch": 8}), ("phi3", {"tp": 2, "micro_batch": 8}),
                                       ("mistral", {"tp": 2, "micro_batch": 8}),
                                       ("olmo2", {"dp_shard": 2, "micro_batch": 4}),
                                       ("olmo2", {"tp": 2, "micro_batch": 8}),
                                       ("gemma3", {"tp": 2, "micro_batch": 8}),
                                       ("gemma2", {"tp": 2, "micro_batch": 8})])
def test_sharded_meta_init_loads_only_local_shards(request, meta_hf_runs, kind, plan):
    """FSDP2 / TP built on meta: each rank cuts its shards out of the HF tensors (Phi-3: its row ranges of the fused
    qkv_proj / gate_up_proj); the first loss is still transformers' loss on the same global batch (Mistral: an
    8-token sliding window, each TP rank's heads masked alike)."""
    from llmc.runtime.data import build_stream_loader
    from llmc.runtime.entry import prepare_assets
    from llmc.runtime.job import TrainJob

    p = meta_hf_runs[request.node].check()
    src, lock = p.dir / f"hf-{kind}", json.loads(p.lock.read_text())
    read = int(re.search(r"\(([\d,]+) bytes read by rank 0\)", p.stdout).group(1).replace(",", ""))
    sd = hf_model(src).state_dict()
    # (a tied head is the embedding's tensor: counted once)
    full = sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in sd.values()}.values())
    if "tp" in plan:  # attention / MLP projections (and q/k/v biases) halved, and OLMo 2's q / k norms (over the
        # whole projection, sharded with it); embeddings, head, other norms whole
        sharded = r"_proj\.(weight|bias)$" + (r"|self_attn\.[qk]_norm\.weight$" if kind == "olmo2" else "")
        split = sum(t.numel() * t.element_size() for k, t in sd.items() if re.search(sharded, k))
        assert read == full - split // 2, (read, full, split)
    else:  # FSDP2: every parameter's first half of rows
        assert read == full // 2, (read, full)
    recs = [json.loads(x) for x in (p.out / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in recs if r.get("step") == 1 and "loss" in r)
    job = TrainJob.from_lock(lock)
    assets = prepare_assets(job, p.dir)
    dp = plan.get("dp_shard", 1)
    ref = hf_model(src)
    losses = []
    for r in range(dp):  # each data-parallel rank's micro-batch; the logged loss is their mean
        x, y = build_stream_loader(list(assets.sources), assets.tokenizer(), job.seq_len, job.global_batch_seqs,
                                   job.seed, r, dp).next_batch(job.micro_batch)
        with torch.no_grad():
            losses.append(float(lm_loss(ref(input_ids=x).logits, y)))
    assert abs(first - sum(losses) / dp) < 1e-4, (first, losses)


def test_deepseek_v3_routing_keys_written_and_checked(tmp_path):
    """hf_config writes routed_scaling_factor / n_group / topk_group; an init_hf checkpoint whose routing
    differs from the spec's is refused (the keys are read back through llmc.spec.hf)."""
    from llmc.runtime.hf_io import HFError, _check_config, hf_config, hf_export_supported

    fixture = Path(__file__).parent / "fixtures" / "hf" / "deepseek-v3.json"
    cfg = json.loads(fixture.read_text())
    a = architecture_from_hf_config(cfg)
    assert (a.moe.route_scale, a.moe.n_expert_groups, a.moe.n_limited_groups) == (2.5, 8, 4)
    # DeepSeek-V3's own yarn (mscale = mscale_all_dim = 1: the softmax scale times m^2) is the preset's: accepted ...
    assert a == PRESETS["deepseek-v3"].model_copy(update={"name": a.name})
    _check_config(cfg, a, tmp_path)
    plain = {**cfg, "rope_scaling": {k: v for k, v in cfg["rope_scaling"].items() if not k.startswith("mscale")}}
    with pytest.raises(HFError, match="rope_scaling"):  # ... without it, another model (cos/sin scaled): refused
        _check_config(plain, a, tmp_path)
    for key, val in (("routed_scaling_factor", 1.0), ("topk_group", 2)):
        with pytest.raises(HFError, match="route_scale|n_limited_groups"):
            _check_config({**cfg, key: val}, a, tmp_path)
    mix = a.model_copy(update={"mla": None, "moe": a.moe.model_copy(update={
        "score_func": "softmax", "expert_bias": False, "num_shared_experts": 0, "dense_layers": 0,
        "expert_d_ff": None})})
    out = hf_config(mix)
    assert (out["routed_scaling_factor"], out["n_group"], out["topk_group"]) == (2.5, 8, 4)
    assert "DeepSeek-V3 routing" in hf_export_supported(mix)  # a Mixtral class would drop the routing


def test_init_from_a_stage_that_left_only_hf(tmp_path):
    """A torchtitan stage leaves run/<stage>/hf (no llmc checkpoint, no DONE.json): the next stage, native
    pre-training or post-training, starts from that export; an llmc checkpoint wins when both exist."""
    import shutil

    from llmc.runtime.checkpoint import save_checkpoint
    from llmc.runtime.distributed import DistInfo
    from llmc.runtime.hf_io import HFError, init_from_source, load_init_from
    from llmc.runtime.job import TrainJob
    from llmc.runtime.posttrain import build_policy
    from llmc.runtime.train import _setup_model
    from llmc.spec.schema import make_stage

    src = make_hf(tmp_path, "llama", shard=None)
    arch = arch_of(src)
    run = tmp_path / "run"
    with pytest.raises(HFError, match="neither an llmc checkpoint"):
        init_from_source(run / "titan")
    shutil.copytree(src, run / "titan" / "hf")
    assert init_from_source(run / "titan") == ("hf", run / "titan" / "hf")
    want = hf_model(src)
    tokens = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        ref = want(input_ids=tokens).logits
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    pre = TrainJob(arch=arch, sources=[], seq_len=16, steps=1, name="p", stage="mid", kind="midtrain",
                   init_from="titan")
    native, _, _ = _setup_model(pre, info, run / "titan", None, lambda *a: None)
    st = make_stage(name="sft", kind="sft", init_from="titan", data={"sources": [{"name": "synthetic-chat", "format": "builtin", "kind": "chat"}],
                                                                      "seq_len": 16, "tokens": 1e4})
    post = TrainJob(arch=arch, sources=[], seq_len=16, steps=1, name="p", stage="sft", kind="sft", init_from="titan",
                    stage_spec=st)
    policy, _, _ = build_policy(post, info, run / "sft", None)
    with torch.no_grad():
        for m in (native, policy):
            torch.testing.assert_close(m(tokens), ref, rtol=1e-4, atol=1e-4)
    # an llmc checkpoint in the same folder is preferred (here: other weights)
    other = build_model(arch, seed=5)
    save_checkpoint(run / "titan" / "checkpoints", 3, other, None, {})
    kind, path = init_from_source(run / "titan")
    assert kind == "llmc" and path.name == "step-00000003"
    fresh = build_model(arch, seed=0)
    assert "step 3" in load_init_from(fresh, run / "titan", arch)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), other.state_dict().values(),
                                                  strict=True))
