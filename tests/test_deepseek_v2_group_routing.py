"""DeepSeek-V2 / V2.5 (236B) device-limited routing, ``topk_method: group_limited_greedy`` (arXiv:2405.04434 sec.
2.2.2; transformers' ``DeepseekV2TopkRouter``): a group is scored by its single best softmax score, the top-k experts
are picked among the topk_group best groups, unnormalised, times routed_scaling_factor (16 for DeepSeek-V2).

* a tiny ``DeepseekV2ForCausalLM`` with group-limited routing made with transformers here loads into llmc's model
  with transformers' logits; on a hand-built case the best-expert scoring picks other experts than DeepSeek-V3's
  top-2-sum scoring (and transformers' router agrees with the hand computation);
* llmc's export of it is ``DeepseekV2ForCausalLM`` with ``group_limited_greedy``, which transformers loads with
  llmc's logits;
* the published DeepSeek-V2 config.json imports as the ``deepseek-v2`` preset with 236B parameters, 21B activated;
* torchtitan 0.3.0's router scores groups by their two best experts only: its build reports X319.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmc.compiler.params import params_active, params_total
from llmc.spec.hf import HFConfigError, architecture_from_hf_config
from llmc.spec.model import MLA, Architecture, MoE
from llmc.spec.presets import PRESETS

#: https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/config.json, as published (DeepSeek-V2.5's differs in
#: its YaRN mscale / mscale_all_dim, 1.0, only)
DEEPSEEK_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 100000, "eos_token_id": 100001, "ep_size": 1, "first_k_dense_replace": 1,
    "hidden_act": "silu", "hidden_size": 5120, "initializer_range": 0.02, "intermediate_size": 12288,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
    "moe_intermediate_size": 1536, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 160,
    "n_shared_experts": 2, "norm_topk_prob": False, "num_attention_heads": 128, "num_experts_per_tok": 6,
    "num_hidden_layers": 60, "num_key_value_heads": 128, "pretraining_tp": 1, "q_lora_rank": 1536,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707, "mscale_all_dim": 0.707,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 3, "topk_method": "group_limited_greedy", "torch_dtype": "bfloat16",
    "transformers_version": "4.39.3", "use_cache": True, "v_head_dim": 128, "vocab_size": 102400}

#: DeepSeek-V2's routing on a tiny model: 16 experts in 4 groups of 4, each token's top-3 among the best 2 groups
TINY_V2 = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
               num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=16,
               routed_scaling_factor=16.0, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
               qk_nope_head_dim=16, topk_method="group_limited_greedy", n_group=4, topk_group=2,
               num_experts_per_tok=3, first_k_dense_replace=1, max_position_embeddings=64, rms_norm_eps=1e-6,
               rope_theta=5000.0, scoring_func="softmax", norm_topk_prob=False)


def _tiny_hf(tmp: Path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**TINY_V2))
    with torch.no_grad():  # non-trivial norms and experts; router scores spread out (no near-ties)
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
            elif "experts" in n and p.dim() == 3:
                p.normal_(0, 0.2)
            elif n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.5)
    out = tmp / "hf-v2-groups"
    model.save_pretrained(out, max_shard_size="60KB")
    return out


def _hf_model(path: Path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _tokens(arch, T=17):
    import torch

    return torch.randint(0, arch.vocab_size, (4, T), generator=torch.Generator().manual_seed(1))


def test_group_limited_greedy_loads_with_transformers_logits_and_routes_by_best_expert(tmp_path):
    """transformers' DeepseekV2ForCausalLM with ``group_limited_greedy`` (4 groups, best 2 kept, top-3) loads into
    llmc's model with its logits; scoring the groups DeepSeek-V3's way (top-2 sum) on the same weights gives other
    logits. On a hand-built token (softmax scores 0.40, 0.02 | 0.30, 0.28 in 2 groups, 1 kept, top-2) the best-expert
    scoring keeps group 0 (0.40 > 0.30) and picks experts 0, 1 with weights 16 x (0.40, 0.02); the top-2 sum keeps
    group 1 (0.58 > 0.42) and picks experts 2, 3; transformers' router agrees with the first."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from llmc.runtime.hf_io import load_hf_into, read_hf_config
    from llmc.runtime.model import Router, build_model

    src = _tiny_hf(tmp_path)
    arch = architecture_from_hf_config(read_hf_config(src), name="v2-groups")
    m = arch.moe
    assert (m.num_experts, m.top_k, m.n_expert_groups, m.n_limited_groups, m.group_score, m.score_func,
            m.route_norm, m.route_scale, m.expert_bias) == (16, 3, 4, 2, "max", "softmax", False, 16.0, False)
    ours = build_model(arch, seed=3).eval()
    load_hf_into(ours, src, arch)
    tokens = _tokens(arch)
    with torch.no_grad():
        want = _hf_model(src)(input_ids=tokens).logits
        torch.testing.assert_close(ours(tokens), want, atol=1e-4, rtol=1e-4)
        for blk in ours.layers.values():  # the same weights, groups scored by their two best experts (V3)
            if blk.is_moe:
                blk.moe.router.group_score = "top2_sum"
        assert (ours(tokens) - want).abs().max() > 1e-3

    # the hand-built token: router logits log(p), so the softmax scores are p
    p = torch.tensor([0.40, 0.02, 0.30, 0.28])
    x = torch.tensor([[1.0, 0.0]])
    gate_w = torch.stack([p.log(), torch.zeros(4)], dim=1)  # (E, D)
    picks = {}
    for how in ("max", "top2_sum"):
        r = Router(2, 4, 2, "softmax", False, route_scale=16.0, n_groups=2, topk_groups=1, norm=False,
                   group_score=how)
        with torch.no_grad():
            r.gate.weight.copy_(gate_w)
            w, idx, _ = r(x)
        order = idx[0].argsort()
        picks[how] = (idx[0][order].tolist(), w[0][order])
    assert picks["max"][0] == [0, 1] and picks["top2_sum"][0] == [2, 3]
    torch.testing.assert_close(picks["max"][1], 16.0 * torch.tensor([0.40, 0.02]))
    cfg = transformers.DeepseekV2Config(hidden_size=2, num_attention_heads=1, n_routed_experts=4, num_experts_per_tok=2,
                                        n_group=2, topk_group=1, topk_method="group_limited_greedy",
                                        routed_scaling_factor=16.0)
    hf_router = transformers.models.deepseek_v2.modeling_deepseek_v2.DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        hf_router.weight.copy_(gate_w)
        _, hw, hidx = hf_router(x)
    order = hidx[0].argsort()
    assert hidx[0][order].tolist() == [0, 1]
    torch.testing.assert_close(hw[0][order], picks["max"][1])


def test_group_limited_greedy_export_round_trip(tmp_path):
    """llmc's model (moved off the source weights) exports as DeepseekV2ForCausalLM with ``topk_method:
    group_limited_greedy``, n_group 4, topk_group 2, which transformers loads with llmc's logits and llmc reads back
    as the same routing; an architecture transformers' classes would route otherwise is not exported."""
    torch = pytest.importorskip("torch")
    from llmc.runtime.hf_io import HFError, export_hf, hf_export_supported, load_hf_into, read_hf_config
    from llmc.runtime.model import build_model

    src = _tiny_hf(tmp_path)
    arch = architecture_from_hf_config(read_hf_config(src), name="v2-groups")
    model = build_model(arch, seed=0).eval()
    load_hf_into(model, src, arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    out = export_hf(model.state_dict(), arch, tmp_path / "out", dtype=torch.float32)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["architectures"], cfg["topk_method"], cfg["n_group"], cfg["topk_group"], cfg["scoring_func"],
            cfg["norm_topk_prob"], cfg["routed_scaling_factor"]) == (
        ["DeepseekV2ForCausalLM"], "group_limited_greedy", 4, 2, "softmax", False, 16.0)
    tokens = _tokens(arch, 13)
    with torch.no_grad():
        torch.testing.assert_close(_hf_model(out)(input_ids=tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
    assert architecture_from_hf_config(read_hf_config(out)).moe == arch.moe
    # groups scored by their two best experts with softmax scores: neither DeepseekV2TopkRouter nor V3's
    top2 = arch.model_copy(update={"moe": arch.moe.model_copy(update={"group_score": "top2_sum"})})
    assert "best expert" in hf_export_supported(top2)
    with pytest.raises(HFError, match=r"moe.group_score top2_sum \(spec\) != max \(checkpoint\)"):
        load_hf_into(build_model(top2), out, top2)  # nor loaded into a spec that routes otherwise
    # sigmoid scores (DeepseekV3ForCausalLM) with best-expert groups: V3's router sums the two best
    v3 = arch.model_copy(update={"moe": arch.moe.model_copy(update={"score_func": "sigmoid", "route_norm": True})})
    assert "sum of its 2 best experts" in hf_export_supported(v3)


def test_published_deepseek_v2_config_imports_with_236b_21b_params():
    """The published DeepSeek-V2 config.json imports as the ``deepseek-v2`` preset, 160 experts in 8 groups, top-6
    among the 3 best groups scored by their best expert, routed_scaling_factor 16; it has the paper's 236B parameters,
    21B activated per token (arXiv:2405.04434 abstract), and transformers' own DeepseekV2ForCausalLM for the config
    (meta device) exactly llmc's count."""
    arch = architecture_from_hf_config(DEEPSEEK_V2, name="deepseek-v2")
    assert arch.model_dump() == PRESETS["deepseek-v2"].model_dump()
    m = arch.moe
    assert (m.num_experts, m.top_k, m.n_expert_groups, m.n_limited_groups, m.group_score, m.route_scale,
            m.route_norm, m.num_shared_experts, m.expert_d_ff, m.dense_layers) == (
        160, 6, 8, 3, "max", 16.0, False, 2, 1536, 1)
    total, active = params_total(arch), params_active(arch)
    assert (round(total / 1e9), round(active / 1e9)) == (236, 21)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    keep = {k: v for k, v in DEEPSEEK_V2.items() if k not in ("architectures", "torch_dtype", "transformers_version")}
    with torch.device("meta"):
        hf = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(**keep))
    assert sum(p.numel() for p in hf.parameters()) == total
    # DeepSeek-V2.5 (same architecture, YaRN mscale 1.0) and a greedy V2 (V2-Lite's method) import too
    v25 = architecture_from_hf_config({**DEEPSEEK_V2, "rope_scaling": {**DEEPSEEK_V2["rope_scaling"], "mscale": 1.0,
                                                                       "mscale_all_dim": 1.0}})
    assert v25.moe == m and v25.rope_scaling.mscale == 1.0
    greedy = architecture_from_hf_config({**DEEPSEEK_V2, "topk_method": "greedy"}).moe
    assert (greedy.n_expert_groups, greedy.n_limited_groups, greedy.group_score) == (None, None, "top2_sum")
    # what transformers cannot route is refused, each key named
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**DEEPSEEK_V2, "n_group": None})
    assert "'n_group'" in str(e.value)
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**DEEPSEEK_V2, "n_group": 7})
    assert "'n_group' 7 must divide 'n_routed_experts' 160" in str(e.value)
    with pytest.raises(HFConfigError) as e:
        architecture_from_hf_config({**DEEPSEEK_V2, "topk_method": "noaux_tc"})
    assert [x.split("'")[1] for x in e.value.messages] == ["topk_method"]


def test_group_score_max_is_a_torchtitan_model_gap():
    """torchtitan 0.3.0's TokenChoiceTopKRouter (torchtitan/models/common/moe.py) scores a group by the sum of its
    top-2 experts only: a DeepSeek-V2 spec's torchtitan build is the error X319 (hinting at the native backend), not a
    job with V3's router; ``training.backend: auto`` plans llmc's trainer. Every group kept (no limit) or V3's scoring
    is no gap."""
    from test_torchtitan_render import compiled_for

    from llmc.compiler.backends import torchtitan_model_gaps
    from llmc.compiler.compile import compile_spec
    from llmc.emit.torchtitan import torchtitan_diagnostics
    from llmc.spec.load import loads_spec

    [gap] = torchtitan_model_gaps(PRESETS["deepseek-v2"])
    assert (gap.code, gap.path) == ("X319", "model.moe.group_score") and "native" in gap.hint
    tiny = dict(name="v2", n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=512, max_seq_len=256,
                mla={"kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8},
                moe={"num_experts": 8, "top_k": 2, "num_shared_experts": 1, "expert_d_ff": 32, "dense_layers": 1,
                     "score_func": "softmax", "route_norm": False, "route_scale": 16.0, "n_expert_groups": 4,
                     "n_limited_groups": 2, "group_score": "max"})
    diags = torchtitan_diagnostics(compiled_for(model=tiny))
    [d] = [d for d in diags if d.code == "X319"]
    assert (d.severity, d.path) == ("error", "model.moe.group_score") and "best single expert" in d.message
    assert all(d.code != "X319" for d in torchtitan_diagnostics(compiled_for(model={
        **tiny, "moe": {**tiny["moe"], "group_score": "top2_sum"}})))
    assert all(d.code != "X319" for d in torchtitan_diagnostics(compiled_for(model={
        **tiny, "moe": {**tiny["moe"], "n_limited_groups": 4}})))
    text = ("name: t\nmodel: deepseek-v2\nhardware: {gpu: h100-sxm, count: 64}\n"
            "data: {seq_len: 4096, tokens: 1e9}\n")
    run, lines = loads_spec(text, file="spec.yaml")
    c = compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())
    assert c.backend.name == "native" and "best single expert" in c.backend.reason


def test_group_score_needs_groups():
    with pytest.raises(ValueError, match="group_score max scores expert groups"):
        MoE(num_experts=8, top_k=2, group_score="max")
    Architecture(name="t", n_layers=1, d_model=8, n_heads=2, d_ff=8, vocab_size=8,
                 mla=MLA(kv_lora_rank=4, qk_rope_head_dim=2, qk_nope_head_dim=2, v_head_dim=2),
                 moe=MoE(num_experts=8, top_k=2, n_expert_groups=4, n_limited_groups=2, group_score="max"))
