"""DeepSeek-V3 (MLA + DeepSeekMoE) to and from Hugging Face: a tiny random ``DeepseekV3ForCausalLM`` made with
transformers here (dense first layer, 8 routed experts in 2 groups, 1 shared expert, non-zero
e_score_correction_bias) loads into llmc's model with transformers' logits; llmc's model exported with
``export_hf`` loads in transformers with llmc's logits; a checkpoint that is not the spec's model is a one-line
error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from llmc.runtime.hf_io import (  # noqa: E402
    HFError,
    export_hf,
    hf_export_supported,
    hf_names,
    load_hf_into,
    read_hf_config,
)
from llmc.runtime.model import build_model  # noqa: E402
from llmc.spec.hf import architecture_from_hf_config  # noqa: E402
from llmc.spec.model import MLA, Architecture, MoE, RopeScaling  # noqa: E402

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
            routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
            qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
            max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=5000.0)


def make_hf(tmp: Path, shard: str | None = "60KB", seed: int = 0, **over) -> Path:
    torch.manual_seed(seed)
    cfg = transformers.DeepseekV3Config(**{**TINY, **over})
    model = transformers.DeepseekV3ForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms, experts and expert bias: a wrong mapping cannot hide
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
            elif "experts" in n and p.dim() == 3:
                p.normal_(0, 0.2)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):  # small: every selected group keeps positive scores
                b.copy_(torch.randn_like(b) * 0.05)
    out = tmp / "hf-deepseek"
    model.save_pretrained(out, **({"max_shard_size": shard} if shard else {}))
    return out


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def arch_of(path: Path) -> Architecture:
    return architecture_from_hf_config(read_hf_config(path), name="from-hf")


def tokens_for(arch, T=17):
    return torch.randint(0, arch.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


_YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 5000.0}


@pytest.mark.parametrize("over", [{}, {"q_lora_rank": None}, {"rope_interleave": False},
                                  {"q_lora_rank": None, "rope_interleave": False}, {"norm_topk_prob": False},
                                  {"rope_parameters": {**_YARN, "mscale": 1.0, "mscale_all_dim": 1.0}},
                                  {"rope_parameters": {**_YARN, "mscale": 0.707, "mscale_all_dim": 1.0}},
                                  {"rope_parameters": _YARN}])
def test_load_gives_transformers_logits(tmp_path, over):
    """rope_interleave false: the rope rows are in rotate_half order and go through the inverse permutation;
    norm_topk_prob false: the picked experts' sigmoid scores unnormalised (route_norm false); DeepSeek's YaRN, the
    softmax scale times m(mscale_all_dim)^2 and cos/sin times m(mscale) / m(mscale_all_dim) (DeepSeek-V3's own 1 / 1,
    unequal ones, and none: cos/sin times 0.1 ln(factor) + 1), at 17 positions beyond the original 16."""
    src = make_hf(tmp_path, **over)
    assert (src / "model.safetensors.index.json").exists()
    arch = arch_of(src)
    assert arch.mla.q_lora_rank == over.get("q_lora_rank", 24)
    if "rope_parameters" in over:
        rp, rs = over["rope_parameters"], arch.rope_scaling
        assert (rs.type, rs.factor, rs.mscale, rs.mscale_all_dim) == ("yarn", 4.0, rp.get("mscale"),
                                                                     rp.get("mscale_all_dim"))
    m = arch.moe
    assert (m.num_experts, m.top_k, m.num_shared_experts, m.dense_layers, m.n_expert_groups, m.n_limited_groups,
            m.route_scale, m.score_func, m.expert_bias) == (8, 2, 1, 1, 2, 1, 2.5, "sigmoid", True)
    model = build_model(arch, seed=123).eval()
    info = load_hf_into(model, src, arch)
    assert info["params"] == len(list(model.parameters()))
    tokens = tokens_for(arch)
    ref_model = hf_model(src)
    with torch.no_grad():
        ref = ref_model(input_ids=tokens).logits
        ours = model(tokens)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # the routing is exercised: the group limit and the expert bias change which experts are picked
    gate = model.layers["1"].moe
    x = torch.randn(64, arch.d_model)
    _, idx, _ = gate.router(x, gate.expert_bias)
    assert (idx // 4 == idx[:, :1] // 4).all()  # top_k experts of one group (topk_group 1 of 2)
    _, idx_nobias, _ = gate.router(x, None)
    assert not torch.equal(idx.sort(-1).values, idx_nobias.sort(-1).values)


@pytest.mark.parametrize("q_lora_rank", [None, 24])
def test_deepseek_v2_loads_and_exports_with_transformers_logits(tmp_path, q_lora_rank):
    """DeepSeek-V2 (DeepseekV2ForCausalLM, V2-Lite's shape: softmax-routed experts mixed by their unnormalised top-k
    scores times routed_scaling_factor, no expert bias; YaRN with mscale = mscale_all_dim = 0.707) loads into llmc's
    model with transformers' logits, exports as DeepseekV2ForCausalLM (no e_score_correction_bias) with llmc's logits,
    and renormalising the top-k weights (route_norm, V3's and Mixtral's way) would give other logits."""
    torch.manual_seed(0)
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 5000.0,
            "mscale": 0.707, "mscale_all_dim": 0.707}
    keep = {k: v for k, v in TINY.items() if k not in ("n_group", "topk_group", "rope_theta")}
    model = transformers.DeepseekV2ForCausalLM(transformers.DeepseekV2Config(
        **{**keep, "q_lora_rank": q_lora_rank, "rope_parameters": yarn}))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
            elif "experts" in n and p.dim() == 3:
                p.normal_(0, 0.2)
    src = tmp_path / "hf-v2"
    model.save_pretrained(src, max_shard_size="60KB")
    arch = arch_of(src)
    assert (arch.moe.score_func, arch.moe.route_norm, arch.moe.expert_bias, arch.mla.q_lora_rank) == (
        "softmax", False, False, q_lora_rank)
    ours = build_model(arch, seed=0).eval()
    load_hf_into(ours, src, arch)
    tokens = tokens_for(arch)
    with torch.no_grad():
        want = hf_model(src)(input_ids=tokens).logits
        torch.testing.assert_close(ours(tokens), want, atol=1e-4, rtol=1e-4)
        out = export_hf(ours.state_dict(), arch, tmp_path / "out", dtype=torch.float32)
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["architectures"], cfg["topk_method"], cfg["norm_topk_prob"]) == (
            ["DeepseekV2ForCausalLM"], "greedy", False)
        torch.testing.assert_close(hf_model(out)(input_ids=tokens).logits, want, atol=1e-4, rtol=1e-4)
        for blk in ours.layers.values():  # the same weights, the top-k weights renormalised
            if blk.is_moe:
                blk.moe.router.norm = True
        assert (ours(tokens) - want).abs().max() > 1e-3


def test_export_loads_in_transformers_with_our_logits(tmp_path):
    src = make_hf(tmp_path)
    arch = arch_of(src)
    model = build_model(arch, seed=0).eval()
    load_hf_into(model, src, arch)
    with torch.no_grad():  # move away from the source weights so the check is on the export
        for n, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.01 if "expert_bias" in n else 0.05))
    out = export_hf(model.state_dict(), arch, tmp_path / "out", dtype=torch.float32, max_shard_size="40KB")
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"] and cfg["rope_interleave"] is True
    tokens = tokens_for(arch, 13)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(input_ids=tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
    again = build_model(arch, seed=5)  # and back, bit-exactly
    load_hf_into(again, out, arch)
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("kw", [
    # dense MLA, full-rank q, tied embeddings, YaRN (written without mscale keys: HF then scales cos/sin)
    dict(mla=MLA(q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6),
         tied_embeddings=True,
         rope_scaling=RopeScaling(type="yarn", factor=4.0, original_max_position=16, beta_fast=32, beta_slow=1)),
    # MoE without expert bias (HF's e_score_correction_bias written as zeros) and without groups
    dict(mla=MLA(q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6),
         moe=MoE(num_experts=4, top_k=2, num_shared_experts=2, expert_d_ff=20, dense_layers=1, score_func="sigmoid",
                 route_scale=1.5)),
])
def test_llmc_native_models_export(tmp_path, kw):
    arch = Architecture(name="t", n_layers=2, d_model=24, n_heads=3, d_ff=40, vocab_size=77, max_seq_len=64,
                        rope_theta=10000.0, norm_eps=1e-6, **kw)
    assert hf_export_supported(arch) is None
    model = build_model(arch, seed=0).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    out = export_hf(model.state_dict(), arch, tmp_path / "out", dtype=torch.float32)
    tokens = torch.randint(0, arch.vocab_size, (2, 40), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(input_ids=tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)
    back = arch_of(out)  # config.json reads back as the same architecture
    assert back.mla == arch.mla and back.rope_scaling == arch.rope_scaling and back.tied_embeddings == arch.tied_embeddings
    again = build_model(arch, seed=9)  # the spec's own architecture (head_dim, n_kv_heads unused by MLA) loads it
    load_hf_into(again, out, arch)
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_mismatches_are_one_line_errors(tmp_path):
    src = make_hf(tmp_path, shard=None)
    arch = arch_of(src)
    for update, pattern in (
            ({"mla": arch.mla.model_copy(update={"kv_lora_rank": 8})}, r"mla .*kv_lora_rank=8.* \(spec\)"),
            ({"moe": arch.moe.model_copy(update={"num_shared_experts": 2})}, r"moe.num_shared_experts 2 \(spec\)"),
            ({"moe": arch.moe.model_copy(update={"dense_layers": 2})}, r"moe.dense_layers 2 \(spec\)"),
            ({"moe": arch.moe.model_copy(update={"route_norm": False})}, r"moe.route_norm False \(spec\)")):
        other = arch.model_copy(update=update)
        with pytest.raises(HFError, match=pattern) as e:
            load_hf_into(build_model(other), src, other)
        assert "\n" not in str(e.value)
    wide = arch.model_copy(update={"mla": arch.mla.model_copy(update={"kv_lora_rank": 8})})
    with pytest.raises(HFError, match=r"shape mismatch .*kv_a_proj_with_mqa.weight \[24, 32\] vs"):
        load_hf_into(build_model(wide), src, wide, check_config=False)
    no_bias = arch.model_copy(update={"moe": arch.moe.model_copy(update={"expert_bias": False})})
    with pytest.raises(HFError, match=r"e_score_correction_bias is not zero"):
        load_hf_into(build_model(no_bias), src, no_bias)
    # what transformers computes differently is refused, not loaded into a different model
    cfg = json.loads((src / "config.json").read_text())
    for key, val, pattern in (
            ("rope_parameters", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                 "mscale": 1.0, "mscale_all_dim": 1.0, "rope_theta": 5000.0}, "mscale"),
            ("quantization_config", {"quant_method": "fp8"}, "quantized")):
        (src / "config.json").write_text(json.dumps({**cfg, key: val}))
        with pytest.raises(HFError, match=pattern):
            load_hf_into(build_model(arch), src, arch)
    (src / "config.json").write_text(json.dumps(cfg))


def test_names_cover_every_parameter_and_refusals():
    arch = Architecture(name="t", n_layers=3, d_model=24, n_heads=3, d_ff=40, vocab_size=77, max_seq_len=64,
                        mla=MLA(q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6),
                        moe=MoE(num_experts=4, top_k=2, num_shared_experts=1, dense_layers=1, score_func="sigmoid",
                                expert_bias=True))
    model = build_model(arch, device="meta")
    assert set(hf_names(arch)) == {n for n, _ in model.named_parameters()}
    # no expert_bias in the spec: HF's e_score_correction_bias is zeros, or the bias a torchtitan checkpoint
    # carries (torchtitan balances with a bias whenever aux_loss_coef > 0)
    from llmc.runtime.hf_io import to_hf_state_dict

    sd = build_model(arch, seed=0).state_dict()
    sd["layers.2.moe.expert_bias"] = torch.tensor([0.1, -0.2, 0.3, 0.0])
    no_bias = arch.model_copy(update={"moe": arch.moe.model_copy(update={"expert_bias": False})})
    hf = to_hf_state_dict(sd, no_bias)
    assert torch.equal(hf["model.layers.2.mlp.gate.e_score_correction_bias"], sd["layers.2.moe.expert_bias"])
    hf = to_hf_state_dict({k: v for k, v in sd.items() if "expert_bias" not in k}, no_bias)
    assert not hf["model.layers.1.mlp.gate.e_score_correction_bias"].any()
    softmax = arch.model_copy(update={"moe": arch.moe.model_copy(update={"score_func": "softmax"})})
    assert "DeepseekV2ForCausalLM routes softmax top-k unnormalised" in hf_export_supported(softmax)  # with V3's bias
    unshared = arch.model_copy(update={"moe": arch.moe.model_copy(update={"num_shared_experts": 0})})
    assert "shared experts" in hf_export_supported(unshared)


def test_lora_adapter_on_mla_loads_with_peft(tmp_path):
    peft = pytest.importorskip("peft")
    from llmc.runtime.hf_io import export_peft_adapter
    from llmc.runtime.lora import apply_lora, lora_state_dict

    src = make_hf(tmp_path, shard=None)
    arch = arch_of(src)
    model = build_model(arch).eval()
    load_hf_into(model, src, arch)
    apply_lora(model, rank=4, alpha=8.0, targets=("wq_a", "wq_b", "wkv_a", "wkv_b", "wo", "w1"))
    with torch.no_grad():  # B = 0 at init: give the adapters a real effect
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(std=0.05)
    # FFN adapters (dense, shared, routed experts): PEFT maps gate/up/down_proj onto the fused experts
    with pytest.raises(HFError, match="feed-forward|stacked MoE experts"):
        export_peft_adapter(lora_state_dict(model), arch, tmp_path / "refused", rank=4, alpha=8.0)
    attn_sd = {k: v for k, v in lora_state_dict(model).items() if ".attention." in k}
    with torch.no_grad():  # the same model without the FFN adapters, in llmc
        for k, p in model.named_parameters():
            if "lora_B" in k and ".attention." not in k:
                p.zero_()
        ours = model(tokens := tokens_for(arch, 9))
    export_peft_adapter(attn_sd, arch, tmp_path / "adapter", rank=4, alpha=8.0)
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "q_a_proj", "q_b_proj"]
    peft_model = peft.PeftModel.from_pretrained(hf_model(src), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=tokens).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
        assert (theirs - hf_model(src)(input_ids=tokens).logits).abs().max() > 1e-2  # the adapters act


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    from llmc.runtime import corpus

    d = tmp_path_factory.mktemp("docs")
    corpus.write_corpus(d / "docs.jsonl", max_docs=200)
    return d / "docs.jsonl"


@pytest.mark.slow
def test_native_stage_from_deepseek_checkpoint_ends_with_hf(tmp_path, docs):
    """init_hf from a DeepseekV3 checkpoint: the native trainer's first loss = transformers' loss on the same
    batch; the stage ends with an hf/ directory transformers loads with the trained model's logits (expert bias
    updated by the aux-loss-free balancing included)."""
    from test_hf_init import _lock

    from llmc.runtime.checkpoint import load_model_weights
    from llmc.runtime.data import build_stream_loader
    from llmc.runtime.entry import prepare_assets, run_stage
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import lm_loss

    src = make_hf(tmp_path, vocab_size=512)
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
    exported = hf_model(out / "hf")
    with torch.no_grad():  # an fp32 run exports its weights as trained (fp32): the same logits
        torch.testing.assert_close(exported(input_ids=x[:2]).logits, trained(x[:2]), atol=1e-5, rtol=1e-5)


def test_export_from_a_torchtitan_deepseek_dcp_checkpoint(tmp_path):
    """A torchtitan deepseek_v3 run's DCP checkpoint (FQNs of torchtitan/models/common/moe.py: stacked experts
    ``moe.routed_experts.inner_experts.w1_EFD`` ..., the bias buffer ``moe.expert_bias_E``) exports to hf/."""
    import torch.distributed.checkpoint as dcp
    from test_build_fakes import lock_for

    from llmc.runtime.export import export_checkpoint

    arch = Architecture(name="t", n_layers=2, d_model=24, n_heads=3, d_ff=40, vocab_size=77, max_seq_len=64,
                        norm_eps=1e-6,
                        mla=MLA(q_lora_rank=12, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6),
                        moe=MoE(num_experts=4, top_k=2, num_shared_experts=1, dense_layers=1, score_func="sigmoid",
                                expert_bias=True, n_expert_groups=2, n_limited_groups=1, route_scale=2.0))
    model = build_model(arch, seed=11).eval()
    with torch.no_grad():
        model.layers["1"].moe.expert_bias.copy_(torch.tensor([0.02, -0.01, 0.03, 0.0]))
    names = {"moe.experts.w1": "moe.routed_experts.inner_experts.w1_EFD",
             "moe.experts.w2": "moe.routed_experts.inner_experts.w2_EDF",
             "moe.experts.w3": "moe.routed_experts.inner_experts.w3_EFD", "moe.expert_bias": "moe.expert_bias_E"}
    titan = {}
    for k, v in model.state_dict().items():
        for a, b in names.items():
            k = k.replace(a, b)
        titan[k] = v.clone()
    assert "layers.1.moe.routed_experts.inner_experts.w2_EDF" in titan and "layers.1.moe.expert_bias_E" in titan
    dcp.save(titan, checkpoint_id=str(tmp_path / "outputs" / "torchtitan" / "checkpoint" / "step-2"))
    spec = {"name": "t", "model": arch.model_dump(mode="json"), "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "python-docs", "format": "builtin"}], "seq_len": 32, "tokens": 1024}}
    (tmp_path / "plan.lock.json").write_text(json.dumps(lock_for(spec)))
    hf = Path(export_checkpoint(tmp_path, "pretrain")["hf"])
    tokens = torch.randint(0, 77, (2, 7))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        torch.testing.assert_close(hf_model(hf)(input_ids=tokens).logits, model(tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_export_loads_through_torchtitans_deepseek_adapter(tmp_path, monkeypatch):
    """The export is what torchtitan's own DeepSeekV3StateDictAdapter.from_hf expects (strict load into the
    deepseek_v3 model the torchtitan job builds), and torchtitan's FQNs map onto llmc's (the DCP export path)."""
    pytest.importorskip("torchtitan")
    from safetensors.torch import load_file
    from test_torchtitan import OFFLINE, load_job, write_build
    from test_torchtitan_render import TINY, compiled_for

    from llmc.compiler.plan import ParallelPlan
    from llmc.runtime.hf_io import _TITAN_RENAMES
    from llmc.runtime.titan_cpu_shim import swap_flex_for_sdpa

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    model = {**TINY, "n_kv_heads": 4, "norm_eps": 1e-6,
             "moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "dense_layers": 1, "score_func": "sigmoid",
                     "expert_bias": True, "n_expert_groups": 2, "n_limited_groups": 1, "route_scale": 2.0},
             "mla": {"q_lora_rank": 24, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
                     "v_head_dim": 16}}
    c = compiled_for(model=model, plan=ParallelPlan(micro_batch=4), gpu="cpu", seq=64, steps=8)
    arch = c.spec.model
    ref = build_model(arch, "cpu", seed=0).eval()
    hf = export_hf(ref.state_dict(), arch, tmp_path / "hf", dtype=torch.float32)
    cfg = load_job(write_build(c, tmp_path / "build"))
    swap_flex_for_sdpa(cfg)
    m = cfg.model_spec.model
    titan = m.build()
    titan.init_states(buffer_device=torch.device("cpu"))
    hf_sd = {}
    for f in sorted(hf.glob("*.safetensors")):
        hf_sd.update(load_file(f))
    res = titan.load_state_dict(cfg.model_spec.state_dict_adapter(m, str(hf)).from_hf(hf_sd), strict=True)
    assert not res.missing_keys and not res.unexpected_keys
    renamed = set()
    for k in titan.state_dict():
        for a, b in _TITAN_RENAMES:
            k = k.replace(a, b)
        renamed.add(k)
    assert renamed == set(ref.state_dict())
    for k, v in titan.state_dict().items():  # the same tensors under the renamed names
        for a, b in _TITAN_RENAMES:
            k = k.replace(a, b)
        assert torch.equal(v, ref.state_dict()[k]), k


@pytest.mark.slow
def test_fsdp_meta_init_loads_deepseek_shards(tmp_path, docs):
    """FSDP2 on 2 processes, built on meta: each rank cuts its shards out of the DeepSeek checkpoint; the first
    loss is the mean of transformers' losses on the two ranks' micro-batches."""
    import re

    from test_hf_init import _lock
    from test_runtime_train import torchrun_cases

    from llmc.runtime.data import build_stream_loader
    from llmc.runtime.entry import prepare_assets
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import lm_loss

    src = make_hf(tmp_path, vocab_size=512)
    arch = arch_of(src)
    lock = _lock(tmp_path, docs, arch, steps=2, init_hf=str(src), plan={"dp_shard": 2, "micro_batch": 4})
    case = tmp_path / "case"
    case.mkdir()
    (case / "plan.lock.json").write_text(json.dumps(lock))
    p = torchrun_cases(tmp_path, {"deepseek": case / "plan.lock.json"}, 2, meta_init=True, timeout=300)["deepseek"]
    p.check()
    read = int(re.search(r"\(([\d,]+) bytes read by rank 0\)", p.stdout).group(1).replace(",", ""))
    assert read < sum(t.numel() * t.element_size() for t in hf_model(src).state_dict().values())
    recs = [json.loads(x) for x in (p.out / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in recs if r.get("step") == 1 and "loss" in r)
    job = TrainJob.from_lock(lock)
    assets = prepare_assets(job, case)
    ref = hf_model(src)
    losses = []
    for r in range(2):
        x, y = build_stream_loader(list(assets.sources), assets.tokenizer(), job.seq_len, job.global_batch_seqs,
                                   job.seed, r, 2).next_batch(job.micro_batch)
        with torch.no_grad():
            losses.append(float(lm_loss(ref(input_ids=x).logits, y)))
    assert abs(first - sum(losses) / 2) < 1e-4, (first, losses)
    assert (p.out / "hf" / "config.json").exists()


def _titan_job_model(tmp_path, monkeypatch, model: dict, build: str = "build"):
    """(compiled spec, the torchtitan job's model built on CPU with the job's own init, seed 0) for an MLA ``model``
    (on CPU the job's flex attention is swapped for SDPA, as llmc's CPU launcher does)."""
    from test_torchtitan import OFFLINE, load_job, write_build
    from test_torchtitan_render import compiled_for

    from llmc.compiler.plan import ParallelPlan
    from llmc.runtime.titan_cpu_shim import swap_flex_for_sdpa

    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    c = compiled_for(model=model, plan=ParallelPlan(micro_batch=4), gpu="cpu", seq=64, steps=8)
    cfg = load_job(write_build(c, tmp_path / build))
    swap_flex_for_sdpa(cfg)
    torch.manual_seed(0)
    titan = cfg.model_spec.model.build()
    titan.init_states(buffer_device=torch.device("cpu"))
    return c, titan


def _export_titan_checkpoint(tmp_path, sd: dict, arch) -> Path:
    """Save a torchtitan state dict as the job's DCP checkpoint (its own FQNs) under ``tmp_path`` and export it as
    llmc's launcher does (``export_checkpoint`` of the pre-training stage of a lock for ``arch``): the HF directory."""
    import torch.distributed.checkpoint as dcp
    from test_build_fakes import lock_for

    from llmc.runtime.export import export_checkpoint

    dcp.save(dict(sd), checkpoint_id=str(tmp_path / "outputs" / "torchtitan" / "checkpoint" / "step-8"))
    spec = {"name": "t", "model": arch.model_dump(mode="json"), "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "python-docs", "format": "builtin"}], "seq_len": 64, "tokens": 1024}}
    (tmp_path / "plan.lock.json").write_text(json.dumps(lock_for(spec)))
    return Path(export_checkpoint(tmp_path, "pretrain")["hf"])


@pytest.mark.slow
def test_deepseeks_yarn_is_one_model_on_torchtitan_llmc_and_transformers(tmp_path, monkeypatch):
    """DeepSeek's YaRN (mscale = mscale_all_dim: the rotation pure, the softmax scale times (0.1 ln(factor) + 1)^2)
    is one model everywhere: torchtitan's deepseek_v3 job, its DCP checkpoint (its own FQNs) exported with the spec's
    mscale keys, transformers loading that export, and llmc's model loading it give the same logits; without the
    mscale keys the same weights are another model (transformers then scales cos/sin), which the torchtitan job of
    that spec computes too (its TemperedRoPE)."""
    pytest.importorskip("torchtitan")
    from test_torchtitan_render import TINY

    from llmc.emit.torchtitan import torchtitan_diagnostics
    from llmc.runtime.hf_io import _TITAN_RENAMES

    model = {**TINY, "n_kv_heads": 4, "norm_eps": 1e-6,
             "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position": 64, "mscale": 1.0,
                              "mscale_all_dim": 1.0},
             "mla": {"q_lora_rank": 24, "kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16,
                     "v_head_dim": 16}}
    c, titan = _titan_job_model(tmp_path, monkeypatch, model)
    arch = c.spec.model
    with torch.no_grad():  # sharper attention, so the softmax temperature shows in the logits
        for n, p in titan.named_parameters():
            if n.endswith(("attention.wq_b.weight", "attention.wkv_b.weight")):
                p.mul_(4.0)
            p.copy_(p.to(torch.bfloat16).float())  # the export is bf16
    x = torch.randint(0, arch.vocab_size, (2, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = titan.eval()(x)
    sd = titan.state_dict()
    assert any("inner_experts" in k for k in sd) is False and "layers.0.attention.wkv_b.weight" in sd
    hf = _export_titan_checkpoint(tmp_path, sd, arch)
    rs = json.loads((hf / "config.json").read_text())["rope_scaling"]
    assert (rs["rope_type"], rs["mscale"], rs["mscale_all_dim"]) == ("yarn", 1.0, 1.0)
    ours = build_model(arch, seed=1).eval()
    load_hf_into(ours, hf, arch)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(hf)(input_ids=x).logits, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours(x), want, atol=1e-4, rtol=1e-4)
        renamed = {}
        for k, v in sd.items():
            for a, b in _TITAN_RENAMES:
                k = k.replace(a, b)
            renamed[k] = v
        plain = arch.model_copy(update={"rope_scaling": arch.rope_scaling.model_copy(
            update={"mscale": None, "mscale_all_dim": None})})
        other = export_hf(renamed, plain, tmp_path / "plain", dtype=torch.float32)
        got = hf_model(other)(input_ids=x).logits
        assert (got - want).abs().max() > 1e-3
    # that other model (YaRN without DeepSeek's keys: cos/sin times 0.1 ln(factor) + 1) is what the torchtitan job of
    # the spec without them computes too (its TemperedRoPE), from the same weights
    plain_spec = {**model, "rope_scaling": {k: v for k, v in model["rope_scaling"].items() if "mscale" not in k}}
    pc, titan_plain = _titan_job_model(tmp_path, monkeypatch, plain_spec, "build-plain")
    assert torchtitan_diagnostics(pc) == []
    titan_plain.load_state_dict(sd, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(titan_plain.eval()(x), got, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_torchtitan_job_of_a_deepseek_v2_model_is_transformers_deepseek_v2(tmp_path, monkeypatch):
    """A DeepSeek-V2-shaped spec (MLA with a full-rank q, softmax-routed experts mixed by their unnormalised top-k
    scores, shared experts, a dense first layer, DeepSeek's YaRN) runs as torchtitan's deepseek_v3 job (softmax
    router, route_norm false); its DCP checkpoint exports as DeepseekV2ForCausalLM, which transformers loads with the
    job's logits, and llmc's model loads the export with them; renormalising the job's top-k weights changes them."""
    pytest.importorskip("torchtitan")
    from test_torchtitan_render import TINY

    model = {**TINY, "n_kv_heads": 4, "norm_eps": 1e-6,
             "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position": 64, "mscale": 0.707,
                              "mscale_all_dim": 0.707},
             "mla": {"kv_lora_rank": 32, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16},
             "moe": {"num_experts": 4, "top_k": 2, "num_shared_experts": 1, "expert_d_ff": 32, "dense_layers": 1,
                     "score_func": "softmax", "route_norm": False, "route_scale": 1.5, "aux_loss_coef": 0.0}}
    c, titan = _titan_job_model(tmp_path, monkeypatch, model)
    arch = c.spec.model
    with torch.no_grad():
        for p in titan.parameters():
            p.copy_(p.to(torch.bfloat16).float())  # the export is bf16
    x = torch.randint(0, arch.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = titan.eval()(x)
    hf = _export_titan_checkpoint(tmp_path, titan.state_dict(), arch)
    cfg_hf = json.loads((hf / "config.json").read_text())
    assert (cfg_hf["architectures"], cfg_hf["topk_method"], cfg_hf["norm_topk_prob"]) == (
        ["DeepseekV2ForCausalLM"], "greedy", False)
    ours = build_model(arch, seed=1).eval()
    load_hf_into(ours, hf, arch)
    with torch.no_grad():
        theirs = hf_model(hf)(input_ids=x).logits
        # torchtitan 0.3.0's grouped experts multiply in bf16 (models/common/moe.py GroupedExperts: x.bfloat16() @
        # w.bfloat16()), transformers and llmc in fp32: the job's logits are theirs to bf16's precision (hidden while
        # the job's embeddings were N(0, 1), which dwarfed the experts' outputs), the two fp32 models' to fp32's
        torch.testing.assert_close(theirs, want, atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(ours(x), theirs, atol=1e-4, rtol=1e-4)
        routers = [m for m in titan.modules() if hasattr(m, "route_norm")]
        assert routers and not any(r.route_norm for r in routers)
        for r in routers:  # the same job renormalising the top-k weights (DeepSeek-V3's, Mixtral's): other logits
            r.route_norm = True
        assert (titan(x) - want).abs().max() > 1e-3


def test_deepseek_v3_preset_config_builds_the_671b_hf_model():
    """hf_config of the deepseek-v3 preset builds (on meta) a DeepseekV3ForCausalLM with exactly llmc's
    parameter count, 671B as published (arXiv:2412.19437 abstract; the multi-token-prediction module aside)."""
    from llmc.runtime.hf_io import hf_config
    from llmc.spec.presets import PRESETS

    arch = PRESETS["deepseek-v3"]
    cfg = hf_config(arch)
    config = transformers.DeepseekV3Config(**{k: v for k, v in cfg.items()
                                              if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("meta"):
        theirs = transformers.DeepseekV3ForCausalLM(config)
    n_hf = sum(p.numel() for p in theirs.parameters()) + sum(
        b.numel() for n, b in theirs.named_buffers() if n.endswith("e_score_correction_bias"))
    n_ours = build_model(arch, device="meta").num_params()
    assert n_hf == n_ours
    assert round(n_ours / 1e9) == 671


def test_kimi_k2_config_builds_the_1t_hf_model():
    """Kimi K2's released config.json (model_type kimi_k2) read as DeepSeek-V3's, which its makers say it is
    (https://github.com/MoonshotAI/Kimi-K2/blob/main/docs/deploy_guidance.md: change model_type to deepseek_v3 where an
    engine does not know kimi_k2): transformers' DeepseekV3ForCausalLM built from it on meta has exactly llmc's count,
    the kimi-k2 preset's, and the model card's 1T total / 32B activated parameters."""
    from llmc.compiler.params import params_active, params_total
    from llmc.spec.presets import PRESETS

    cfg = json.loads((Path(__file__).parent / "fixtures" / "hf" / "kimi-k2.json").read_text())
    arch = architecture_from_hf_config(cfg, name="kimi-k2")
    assert arch.model_dump() == PRESETS["kimi-k2"].model_dump()
    config = transformers.DeepseekV3Config(**{k: v for k, v in cfg.items() if k not in (
        "architectures", "model_type", "torch_dtype", "auto_map", "quantization_config")})
    with torch.device("meta"):
        theirs = transformers.DeepseekV3ForCausalLM(config)
    n_hf = sum(p.numel() for p in theirs.parameters()) + sum(
        b.numel() for n, b in theirs.named_buffers() if n.endswith("e_score_correction_bias"))
    assert n_hf == build_model(arch, device="meta").num_params() == params_total(arch)
    assert (round(params_total(arch) / 1e12), int(params_active(arch) / 1e9)) == (1, 32)


def test_kimi_k2_checkpoint_loads_with_transformers_logits(tmp_path):
    """A Kimi K2-shaped checkpoint (one dense layer, no expert groups, routed_scaling_factor 2.827, YaRN with
    beta_fast = beta_slow = 1 on a 50,000 base) saved by transformers' DeepseekV3ForCausalLM, its config.json then
    saying model_type kimi_k2 as Moonshot's does: llmc imports and loads it with transformers' logits, at 17
    positions beyond the original 16; its fp8 release is refused with one line."""
    src = make_hf(tmp_path, n_group=1, topk_group=1, routed_scaling_factor=2.827, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 50000.0,
        "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0})
    want = hf_model(src)(input_ids=tokens_for(arch_of(src), T=33)).logits
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2"}))
    arch = arch_of(src)
    assert (arch.moe.route_scale, arch.moe.n_expert_groups, arch.rope_scaling.beta_fast) == (2.827, None, 1.0)
    model = build_model(arch).eval()
    load_hf_into(model, src, arch)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens_for(arch, T=33)), want, atol=1e-4, rtol=1e-4)
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "kimi_k2", "quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}}))
    with pytest.raises(HFError, match=r"quantized weights \(fp8\) are not read") as e:
        load_hf_into(build_model(arch), src, arch)
    assert "\n" not in str(e.value)


def test_kimi_k25_image_text_config_imports_its_language_model(tmp_path):
    """Kimi K2.5 (model_type kimi_k25, KimiK25ForConditionalGeneration) keeps a Kimi K2 language model (model_type
    kimi_k2) in text_config beside its image encoder: llmc imports that language model, the same architecture as
    the text config alone (the image encoder not counted); a text_config of another family is refused; its
    checkpoint's weights are refused by the loader and by the torchtitan job (X310) with one line each."""
    from llmc.compiler.backends import torchtitan_model_gaps
    from llmc.spec.hf import HFConfigError

    k2 = json.loads((Path(__file__).parent / "fixtures" / "hf" / "kimi-k2.json").read_text())
    wrap = {"architectures": ["KimiK25ForConditionalGeneration"], "model_type": "kimi_k25", "text_config": k2,
            "vision_config": {"hidden_size": 1152, "num_hidden_layers": 27}}
    arch = architecture_from_hf_config(wrap, name="kimi-k2")
    assert arch.model_dump() == architecture_from_hf_config(k2, name="kimi-k2").model_dump()
    with pytest.raises(HFConfigError, match="text_config has model_type 'llama'"):
        architecture_from_hf_config({**wrap, "text_config": {**k2, "model_type": "llama"}})
    src = tmp_path / "k25"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(wrap))
    with pytest.raises(HFError, match="Kimi K2.5 image-text checkpoint") as e:
        load_hf_into(build_model(arch, device="meta"), src, arch)
    assert "\n" not in str(e.value)
    gaps = torchtitan_model_gaps(arch, str(src), "training.init_hf", "kimi_k25")
    assert [g.code for g in gaps] == ["X310"] and "Kimi K2.5" in gaps[0].message


def test_multi_token_prediction_layers_are_left_out(tmp_path):
    """DeepSeek-V3 checkpoints carry the MTP module as one more layer (model.layers.61.*, num_nextn_predict_layers
    1): not part of llmc's model, left out as transformers does; without that key they are unused tensors."""
    from safetensors.torch import save_file

    src = make_hf(tmp_path, shard=None)
    arch = arch_of(src)
    save_file({"model.layers.3.eh_proj.weight": torch.zeros(32, 64), "model.layers.3.enorm.weight": torch.ones(32)},
              str(src / "mtp.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 1}))
    model = build_model(arch).eval()
    load_hf_into(model, src, arch)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens_for(arch)), hf_model(src)(input_ids=tokens_for(arch)).logits,
                                   atol=1e-4, rtol=1e-4)
    (src / "config.json").write_text(json.dumps({**cfg, "num_nextn_predict_layers": 0}))
    with pytest.raises(HFError, match=r"unused 2: model.layers.3.eh_proj.weight"):
        load_hf_into(model, src, arch)


@pytest.mark.slow
def test_zero3_from_deepseek_checkpoint_matches_transformers(tmp_path):
    """DeepSpeed ZeRO-3 (parameters partitioned under zero.Init, rank 0 reads the file): the first loss of a
    stage started from a DeepseekV3 checkpoint is transformers' loss; the stage ends with hf/."""
    pytest.importorskip("deepspeed")
    from test_ds_zero_init import DS_CASES_RUN, ENV, _lock, _results
    from test_runtime_train import torchrun_cases

    from llmc.runtime.data import build_stream_loader
    from llmc.runtime.entry import prepare_assets
    from llmc.runtime.job import TrainJob
    from llmc.runtime.model import lm_loss

    src = make_hf(tmp_path, vocab_size=512)
    arch = arch_of(src)
    case = tmp_path / "case"
    case.mkdir()
    lock = _lock(case, steps=2, ac="none", init_hf=str(src), arch=arch.model_dump(mode="json"))
    run = torchrun_cases(tmp_path, {"deepseek": lock}, 2, script=DS_CASES_RUN, timeout=300,
                         env={k: ENV[k] for k in ("DS_ACCELERATOR", "PYTHONWARNINGS", "PYTHONPATH")})["deepseek"]
    res = _results(run.check())
    assert len(res) == 2 and all(r["rc"] == 0 for r in res)
    out = run.out
    recs = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(r["loss"] for r in recs if r.get("step") == 1)
    job = TrainJob.from_lock(json.loads(lock.read_text()))
    assets = prepare_assets(job, case)
    ref = hf_model(src)
    losses = []
    for rank in (0, 1):
        x, y = build_stream_loader(list(assets.sources), assets.tokenizer(), job.seq_len, job.global_batch_seqs,
                                   job.seed, dp_rank=rank, dp_size=2).next_batch(2)
        with torch.no_grad():
            losses.append(float(lm_loss(ref(input_ids=x).logits, y)))
    assert abs(first - sum(losses) / 2) < 1e-4, (first, losses)
    assert (out / "hf" / "config.json").exists()
