"""Property: the runtime model's parameter count (built on the meta device) equals the compiler's
analytic count ``llmc.compiler.params.params_total`` -- for every preset and for random architectures --
and the per-component labels of ``param_breakdown`` match the modules that hold them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
params = pytest.importorskip("llmc.compiler.params")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from llmc.runtime.model import Transformer  # noqa: E402
from llmc.spec.model import MLA, Architecture, MoE  # noqa: E402
from llmc.spec.presets import PRESETS  # noqa: E402


def meta_model(arch: Architecture) -> Transformer:
    with torch.device("meta"):
        return Transformer(arch)


def label(name: str) -> str:
    """Runtime parameter FQN -> the compiler's param_breakdown label."""
    if name.startswith("tok_embeddings."):
        return "embed/tok"
    if name.startswith("lm_head."):
        return "head/output"
    if name == "norm.weight":
        return "norm/final"
    part = name.split(".", 2)[2]  # drop "layers.{i}."
    if part.startswith("attention_norm."):
        return "norm/attn"
    if part.startswith("ffn_norm."):
        return "norm/ffn"
    if part.startswith("post_attention_norm."):  # Gemma 3's norms on the branches' outputs
        return "norm/attn_post"
    if part.startswith("post_ffn_norm."):
        return "norm/ffn_post"
    if part.startswith("attention."):
        sub = part.split(".")[1]
        if sub in ("wq_a", "q_norm", "wq_b", "wkv_a", "kv_norm", "wkv_b"):
            return f"mla/{sub}"  # (MLA's wq/wo are relabelled by runtime_breakdown)
        if sub == "sinks":  # gpt-oss: one sink logit per query head
            return "attn/sinks"
        if part.endswith(".bias"):  # q/k/v biases; gpt-oss's o_proj bias apart
            return "attn/o_bias" if sub == "wo" else "attn/bias"
        return {"wq": "attn/wq", "wk": "attn/wkv", "wv": "attn/wkv", "wo": "attn/wo"}[sub]
    if part.startswith("feed_forward."):
        return "mlp/dense"
    if part.startswith("moe.router."):
        return "moe/router"
    if part.startswith("moe.experts."):
        return "moe/experts"
    if part.startswith("moe.shared_experts."):
        return "moe/shared"
    if part == "moe.expert_bias":
        return "moe/expert_bias"
    raise AssertionError(f"unlabelled parameter {name}")


def runtime_breakdown(arch: Architecture) -> dict[str, int]:
    model = meta_model(arch)
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if arch.mla is None and name.endswith(("attention.q_norm.weight", "attention.k_norm.weight")):
            out["attn/qk_norm"] = out.get("attn/qk_norm", 0) + p.numel()  # Qwen3's q/k norms (GQA)
            continue
        lab = label(name)
        if arch.mla is not None and lab in ("attn/wq", "attn/wo"):
            lab = "mla/" + lab.split("/")[1]
        out[lab] = out.get(lab, 0) + p.numel()
    return out


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_param_count_matches_compiler(name):
    arch = PRESETS[name]
    model = meta_model(arch)
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    assert model.num_params() == params.params_total(arch), name
    assert runtime_breakdown(arch) == params.param_breakdown(arch), name


@st.composite
def architectures(draw):
    kv = draw(st.sampled_from([1, 2, 4]))
    n_heads = kv * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([8, 16, 24]))
    kw = dict(
        n_layers=draw(st.integers(1, 4)), d_model=draw(st.sampled_from([32, 48, 64])), n_heads=n_heads,
        n_kv_heads=kv, head_dim=head_dim, d_ff=draw(st.sampled_from([40, 64, 96])),
        vocab_size=draw(st.integers(300, 700)), tied_embeddings=draw(st.booleans()), qkv_bias=draw(st.booleans()),
        max_seq_len=64,
    )
    if draw(st.booleans()):
        E = draw(st.integers(2, 6))
        moe = dict(num_experts=E, top_k=draw(st.integers(1, E)), num_shared_experts=draw(st.integers(0, 2)),
                   expert_d_ff=draw(st.sampled_from([None, 16, 32])), dense_layers=draw(st.integers(0, 2)),
                   router_bias=draw(st.booleans()), score_func=draw(st.sampled_from(["softmax", "sigmoid"])))
        if "expert_bias" in MoE.model_fields:
            moe["expert_bias"] = draw(st.booleans())
        kw["moe"] = MoE(**moe)
    if draw(st.booleans()):
        kw["qkv_bias"] = False  # MLA has no q/k/v biases
        kw["mla"] = MLA(q_lora_rank=draw(st.sampled_from([None, 16, 24])), kv_lora_rank=draw(st.sampled_from([8, 16])),
                        qk_rope_head_dim=draw(st.sampled_from([4, 8])), qk_nope_head_dim=draw(st.sampled_from([8, 16])),
                        v_head_dim=draw(st.sampled_from([8, 12])))
    kw["qk_norm"] = "moe" not in kw and "mla" not in kw and draw(st.booleans())  # Qwen3: dense GQA only (M006)
    return Architecture(**kw)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(architectures())
def test_random_architectures_param_count_matches_compiler(arch):
    model = meta_model(arch)
    assert model.num_params() == params.params_total(arch)
    assert runtime_breakdown(arch) == params.param_breakdown(arch)
