"""GLM-4.5 / GLM-4.5-Air / GLM-4.6 (``model_type: glm4_moe``, transformers' ``Glm4MoeForCausalLM``): a tiny random
model made with transformers here (first layer dense, 8 sigmoid-routed experts with a non-zero
e_score_correction_bias and one shared expert, RoPE on half of each head, q/k/v biases, q/k norms on and off) loads
into llmc's model with transformers' logits and exports back to a Glm4MoeForCausalLM with llmc's; the published
configs import with transformers' own parameter counts; torchtitan's missing partial RoPE is a located gap that keeps
``backend: auto`` on llmc's trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from llmc.compiler.params import params_active, params_total  # noqa: E402
from llmc.runtime.hf_io import export_hf, hf_export_supported, load_hf_into, read_hf_config  # noqa: E402
from llmc.runtime.model import build_model  # noqa: E402
from llmc.spec.families import family_of  # noqa: E402
from llmc.spec.hf import architecture_from_hf_config  # noqa: E402
from llmc.spec.presets import PRESETS  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, n_shared_experts=1, n_routed_experts=8,
            routed_scaling_factor=2.5, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=64,
            rms_norm_eps=1e-5, attention_bias=True, use_qk_norm=True,
            rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 0.5})


def make_hf(tmp: Path, seed: int = 0, **over) -> Path:
    torch.manual_seed(seed)
    model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**{**TINY, **over}))
    with torch.no_grad():  # non-trivial norms, biases, experts and expert bias: a wrong mapping cannot hide
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.3)
            elif "experts" in n and p.dim() == 3:
                p.normal_(0, 0.2)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):  # small: every selected group keeps positive scores
                b.copy_(torch.randn_like(b) * 0.05)
    out = tmp / "hf-glm"
    model.save_pretrained(out, max_shard_size="60KB")
    return out


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def tokens_for(arch, T=17):
    return torch.randint(0, arch.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("over", [{}, {"use_qk_norm": False}, {"attention_bias": False, "norm_topk_prob": False},
                                  {"n_group": 2, "topk_group": 1}])
def test_load_gives_transformers_logits_and_export_round_trips(tmp_path, over):
    """Loaded through llmc's HF loader, llmc's model computes transformers' logits (q/k norms on and off, biases off,
    top-k weights unnormalised, two expert groups); exported with export_hf, transformers loads a Glm4MoeForCausalLM
    that computes llmc's logits. Rotating whole heads instead of the first half (Glm4MoeConfig's
    partial_rotary_factor 0.5) gives other logits."""
    src = make_hf(tmp_path, **over)
    arch = architecture_from_hf_config(read_hf_config(src), name="glm")
    assert family_of(arch).name == "glm4_moe" and arch.partial_rotary == 8
    assert (arch.qkv_bias, arch.qk_norm) == (over.get("attention_bias", True), over.get("use_qk_norm", True))
    m = arch.moe
    assert (m.num_experts, m.top_k, m.num_shared_experts, m.expert_d_ff, m.dense_layers, m.route_scale, m.score_func,
            m.expert_bias, m.route_norm, m.aux_loss_coef) == (8, 2, 1, 16, 1, 2.5, "sigmoid", True,
                                                              over.get("norm_topk_prob", True), 0.0)
    ours = build_model(arch, seed=123).eval()
    load_hf_into(ours, src, arch)
    tokens = tokens_for(arch)
    with torch.no_grad():
        want = hf_model(src)(input_ids=tokens).logits
        torch.testing.assert_close(ours(tokens), want, atol=1e-4, rtol=1e-4)
        # the expert bias takes part: without it other experts are picked
        moe = ours.layers["1"].moe
        x = torch.randn(64, arch.d_model)
        assert not torch.equal(moe.router(x, moe.expert_bias)[1].sort(-1).values,
                               moe.router(x, None)[1].sort(-1).values)
        out = export_hf(ours.state_dict(), arch, tmp_path / "out", dtype=torch.float32)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == ["Glm4MoeForCausalLM"] and cfg["partial_rotary_factor"] == 0.5
        back = hf_model(out)
        assert type(back).__name__ == "Glm4MoeForCausalLM"
        torch.testing.assert_close(back(input_ids=tokens).logits, want, atol=1e-4, rtol=1e-4)
        # can fail: the same weights rotating whole heads
        full = build_model(arch.model_copy(update={"rotary_dim": None}), seed=0).eval()
        full.load_state_dict(ours.state_dict())
        assert (full(tokens) - want).abs().max() > 1e-3


def test_multi_token_prediction_layer_is_left_out(tmp_path):
    """GLM-4.5's checkpoints store the MTP layer after the last one (model.layers.92.*, num_nextn_predict_layers 1):
    transformers' Glm4MoeForCausalLM builds none and skips it on load; llmc's loader leaves it out as for DeepSeek-V3,
    and without that key the same tensors are unused, named in the error."""
    from safetensors.torch import save_file

    from llmc.runtime.hf_io import HFError

    src = make_hf(tmp_path)
    save_file({"model.layers.3.eh_proj.weight": torch.zeros(32, 64), "model.layers.3.enorm.weight": torch.ones(32)},
              str(src / "mtp.safetensors"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"].update({"model.layers.3.eh_proj.weight": "mtp.safetensors",
                                "model.layers.3.enorm.weight": "mtp.safetensors"})
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = json.loads((src / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1  # what transformers saves (Glm4MoeConfig's num_mtp_layers default)
    arch = architecture_from_hf_config(read_hf_config(src))
    ours = build_model(arch, seed=0).eval()
    load_hf_into(ours, src, arch)
    tokens = tokens_for(arch)
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_model(src)(input_ids=tokens).logits, atol=1e-4, rtol=1e-4)
    (src / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(HFError, match="unused 2: model.layers.3.eh_proj.weight"):
        load_hf_into(build_model(arch, seed=0), src, arch)


def test_spec_and_checkpoint_rotary_must_agree(tmp_path):
    """A spec rotating whole heads is not a GLM checkpoint's model (partial_rotary_factor 0.5): one located error."""
    from llmc.runtime.hf_io import HFError

    src = make_hf(tmp_path)
    arch = architecture_from_hf_config(read_hf_config(src)).model_copy(update={"rotary_dim": None})
    with pytest.raises(HFError, match=r"partial_rotary None \(spec\) != 8 \(checkpoint\)"):
        load_hf_into(build_model(arch, seed=0), src, arch)


#: https://huggingface.co/zai-org/GLM-4.5/blob/main/config.json and
#: https://huggingface.co/zai-org/GLM-4.5-Air/blob/main/config.json: the keys they share, then each one's own
#: (the shapes as Megatron-Bridge's docs/models/llm/glm45.md lists them: 92 layers, 3 dense, 160 experts of 1536,
#: 96 heads / 8 groups, d 5120; Air: 46 layers, 1 dense, 128 experts of 1408, d 4096, no q/k norm)
_GLM45_COMMON = {
    "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
    "partial_rotary_factor": 0.5, "initializer_range": 0.02, "max_position_embeddings": 131072,
    "model_type": "glm4_moe", "norm_topk_prob": True, "num_attention_heads": 96, "n_group": 1, "topk_group": 1,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
    "rope_scaling": None, "rope_theta": 1000000, "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 151552}
GLM45 = {**_GLM45_COMMON, "hidden_size": 5120, "intermediate_size": 12288, "moe_intermediate_size": 1536,
         "n_routed_experts": 160, "routed_scaling_factor": 2.5, "first_k_dense_replace": 3, "num_hidden_layers": 92,
         "use_qk_norm": True}
GLM45_AIR = {**_GLM45_COMMON, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
             "n_routed_experts": 128, "routed_scaling_factor": 1.0, "first_k_dense_replace": 1,
             "num_hidden_layers": 46, "use_qk_norm": False}


def _transformers_count(cfg: dict) -> int:
    """transformers' own Glm4MoeForCausalLM for ``cfg`` built on the meta device: its parameters plus the
    e_score_correction_bias buffers (a weight of the checkpoint; llmc counts it, as for DeepSeek-V3)."""
    keep = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype", "model_type")}
    with torch.device("meta"):
        model = transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**keep))
    return sum(p.numel() for p in model.parameters()) + sum(
        b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))


def _mtp_layer(arch) -> int:
    """One MTP module as GLM-4.5 stores it after the last layer: an MoE decoder layer, eh_proj [d, 2d] and its
    enorm / hnorm / shared_head.norm (the embedding and head are the model's)."""
    from llmc.compiler.params import layer_params

    return layer_params(arch, arch.n_layers - 1) + 2 * arch.d_model ** 2 + 3 * arch.d_model


@pytest.mark.parametrize("name, cfg, total, active", [("glm4.5", GLM45, 355, 32), ("glm4.5-air", GLM45_AIR, 106, 12)])
def test_published_configs_count_as_transformers_and_equal_the_presets(name, cfg, total, active):
    """The published configs import as the presets, with exactly transformers' parameter count (the MTP layer aside,
    which transformers does not build either). The model cards' figures (355B / 32B, 106B / 12B): the active ones are
    llmc's active count without the embedding and the output head (32.08B, 12.18B); GLM-4.5-Air's 106B total is its
    count without the MTP layer (106.85B), while GLM-4.5's 355B lies between its count without the MTP layer (352.80B)
    and with it (356.79B)."""
    arch = architecture_from_hf_config(cfg, name=name)
    assert arch.model_dump() == PRESETS[name].model_dump()
    assert (arch.rotary_dim, arch.qkv_bias, arch.qk_norm) == (64, True, cfg["use_qk_norm"])
    n = params_total(arch)
    assert n == _transformers_count(cfg) == build_model(arch, device="meta").num_params()
    emb = 2 * arch.vocab_size * arch.d_model
    assert round((params_active(arch) - emb) / 1e9) == active
    if name == "glm4.5":
        assert (round(n / 1e9, 2), round((n + _mtp_layer(arch)) / 1e9, 2)) == (352.80, 356.79)
        assert n < total * 1e9 < n + _mtp_layer(arch)
    else:
        assert int(n / 1e9) == total and round((n + _mtp_layer(arch)) / 1e9, 2) == 109.23
    assert hf_export_supported(arch) is None


def test_defaults_are_the_config_class_defaults():
    """A config.json that leaves the GLM keys out reads what Glm4MoeConfig fills in (partial_rotary_factor 0.5,
    128 experts of 1408, top-8, one shared, the first layer dense, renormalised, no q/k norms or biases): the same
    parameter count and RoPE frequencies as transformers' model."""
    from llmc.runtime.model import rope_inv_freq

    cfg = {"model_type": "glm4_moe", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
           "num_attention_heads": 4, "vocab_size": 128, "max_position_embeddings": 64}
    arch = architecture_from_hf_config(cfg)
    hf_cfg = transformers.Glm4MoeConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    assert params_total(arch) == _transformers_count(cfg)
    assert (arch.kv_heads, arch.rotary_dim, arch.norm_eps, arch.qkv_bias, arch.qk_norm) == (8, 8, 1e-5, False, False)
    m = arch.moe
    assert (m.num_experts, m.top_k, m.num_shared_experts, m.expert_d_ff, m.dense_layers, m.route_norm) == (
        hf_cfg.n_routed_experts, hf_cfg.num_experts_per_tok, hf_cfg.n_shared_experts, hf_cfg.moe_intermediate_size,
        hf_cfg.first_k_dense_replace, hf_cfg.norm_topk_prob)
    rot = transformers.models.glm4_moe.modeling_glm4_moe.Glm4MoeRotaryEmbedding(config=hf_cfg)
    ours, _ = rope_inv_freq(arch.rotary_dim, arch.rope_theta, arch.rope_scaling)
    torch.testing.assert_close(ours.double(), rot.inv_freq.double(), rtol=1e-6, atol=0)


def test_torchtitan_cannot_rotate_part_of_a_head_so_auto_plans_the_native_trainer():
    """torchtitan 0.3.0's Qwen3 GQA + MoE build has the rest of the block (q/k/v biases, q/k norms, sigmoid routing with
    a selection bias, shared experts, dense first layers: torchtitan/models/common/moe.py TokenChoiceTopKRouter) but
    rotates whole heads: X301 at model.rotary_dim; starting from the Hub checkpoint also X310 (no state-dict adapter
    reads its biases and shared experts). ``training.backend: auto`` plans llmc's native trainer, saying why."""
    from llmc.compiler.backends import torchtitan_model_gaps
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    gaps = torchtitan_model_gaps(PRESETS["glm4.5-air"], init_hf="zai-org/GLM-4.5-Air")
    assert [(g.code, g.path) for g in gaps] == [("X301", "model.rotary_dim"), ("X310", "training.init_hf")]
    assert "rotary_dim 64 of head_dim 128" in gaps[0].message
    text = "name: t\nmodel: glm4.5-air\nhardware: {gpu: h100-sxm, count: 64}\ndata: {seq_len: 4096, tokens: 1e9}\n"
    run, lines = loads_spec(text, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())
    assert c.backend.name == "native" and "rotates whole heads" in c.backend.reason
