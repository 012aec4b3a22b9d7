"""The stage plan's LoRA / QLoRA numbers against what llmc's runtime builds and trains.

``lora_trainable_params`` (the plan's trainable count) is checked against ``llmc.runtime.lora.apply_lora`` on the
runtime ``Transformer`` built on the meta device (the parameters left with requires_grad), for small architectures of
every block the runtime builds: dense MHA / GQA, MLA with and without a low-rank query (DeepSeek-V3 / V2-Lite), MoE with
shared experts and dense first layers (DeepSeek, GLM-4.5), gpt-oss's biased block. The QLoRA weight bytes of the plan
are checked against the bytes a tiny model holds after ``apply_lora(..., quantize_base="nf4")``: its remaining
parameters in bf16 plus the NF4 codes, absmax codes and scales the runtime stores.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from llmc.compiler.hardware import get_gpu  # noqa: E402
from llmc.compiler.params import params_total  # noqa: E402
from llmc.compiler.stages import NF4_BITS_PER_PARAM, lora_trainable_params, plan_stages  # noqa: E402
from llmc.runtime.lora import NF4Linear, apply_lora, cast_frozen_matmul_weights_  # noqa: E402
from llmc.runtime.model import Transformer, build_model  # noqa: E402
from llmc.spec.load import loads_spec  # noqa: E402
from llmc.spec.model import MLA, Architecture, MoE  # noqa: E402
from llmc.spec.presets import PRESETS  # noqa: E402
from llmc.spec.schema import LORA_TARGETS, NF4_BLOCK, NF4_DQ_BLOCK  # noqa: E402

torch.set_num_threads(1)

_BASE = dict(n_layers=3, d_model=64, n_heads=4, d_ff=96, vocab_size=256, max_seq_len=64)
_MLA_FULL_Q = MLA(q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)
_MLA_LOW_Q = MLA(q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12)


def _mla(mla: MLA, **kw) -> dict:
    # DeepSeek's layout: head_dim is the q/k head dim nope + rope, kv heads = heads (llmc.spec.presets._deepseek)
    return dict(_BASE, n_kv_heads=4, head_dim=mla.qk_nope_head_dim + mla.qk_rope_head_dim, mla=mla, **kw)


def _shrunk(preset: str, **kw) -> Architecture:
    """A preset's block at a toy size (its flags kept, validated again)."""
    d = PRESETS[preset].model_dump()
    d.update(kw)
    return Architecture(**d)


ARCHS = {
    "dense-mha": Architecture(name="dense-mha", **_BASE),
    "dense-gqa-bias-tied": Architecture(name="gqa", **dict(_BASE, n_kv_heads=2, head_dim=24, qkv_bias=True,
                                                           tied_embeddings=True)),
    # DeepSeek-V3 / Kimi-K2: low-rank q, 1 dense layer, routed + 1 shared expert
    "mla-q-lora-moe": Architecture(name="v3", **_mla(_MLA_LOW_Q, moe=MoE(
        num_experts=4, top_k=2, num_shared_experts=1, expert_d_ff=32, dense_layers=1, score_func="sigmoid",
        expert_bias=True))),
    # DeepSeek-V2-Lite: full-rank q, 1 dense layer, routed + 2 shared experts
    "mla-full-q-moe-2-shared": Architecture(name="v2lite", **_mla(_MLA_FULL_Q, moe=MoE(
        num_experts=4, top_k=2, num_shared_experts=2, expert_d_ff=32, dense_layers=1))),
    "mla-full-q-dense": Architecture(name="mla-dense", **_mla(_MLA_FULL_Q)),
    "mla-q-lora-dense": Architecture(name="mla-qlora-dense", **_mla(_MLA_LOW_Q)),
    # GLM-4.5: GQA with q/k/v biases, 2 dense first layers, routed + 1 shared expert
    "gqa-moe-shared-dense-first": Architecture(name="glm", **dict(_BASE, n_layers=4, n_kv_heads=2, qkv_bias=True,
                                                                  moe=MoE(num_experts=4, top_k=2, num_shared_experts=1,
                                                                          expert_d_ff=40, dense_layers=2))),
    "moe-3-shared": Architecture(name="moe3", **dict(_BASE, n_kv_heads=2, moe=MoE(
        num_experts=4, top_k=2, num_shared_experts=3, expert_d_ff=16))),
    "gpt-oss": _shrunk("gpt-oss-20b", name="gpt-oss-toy", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2,
                       head_dim=16, d_ff=48, vocab_size=256, max_seq_len=64, sliding_window=16,
                       full_attention_layers=(1,), moe=MoE(num_experts=4, top_k=2, router_bias=True,
                                                           expert_proj_bias=True)),
    "tiny-moe": PRESETS["tiny-moe"],
}
#: the most a stored NF4 tensor exceeds numel x NF4_BITS_PER_PARAM / 8 by: its last block's padding codes (block / 2
#: bytes), the fp32 scale of its last partial group of absmax codes and the fp32 offset of the double quantisation
NF4_ROUNDING_BYTES = NF4_BLOCK // 2 + 4 + 4
TARGET_SETS = [list(LORA_TARGETS), ["wq", "wv"], ["wo"], ["w1", "w2", "w3"], ["w2"], ["wq", "wk", "wv", "wo"]]


def _runtime_trainable(arch: Architecture, rank: int, targets: list[str]) -> int | None:
    """Trainable parameters of the runtime model after apply_lora, built on the meta device (nothing allocated);
    None where the runtime adapts nothing and refuses the targets."""
    with torch.device("meta"):
        model = Transformer(arch)
        try:
            apply_lora(model, rank, 2.0 * rank, 0.0, targets)
        except ValueError:
            return None
        return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", list(ARCHS))
@pytest.mark.parametrize("targets", TARGET_SETS, ids=lambda t: "+".join(t))
def test_lora_count_equals_runtime(name, targets):
    arch = ARCHS[name]
    want = _runtime_trainable(arch, 8, targets)
    got = lora_trainable_params(arch, 8, targets)
    assert got == (0 if want is None else want)


def test_mla_attention_adapters_by_hand():
    """MLA by hand (r (d_in + d_out) per matrix): the runtime adapts wo (H v_head_dim -> d) in every layer and, with a
    full-rank query, wq (d -> H (nope + rope)); the low-rank wq_a / wq_b / wkv_a / wkv_b have no target name."""
    r, d, H = 8, 64, 4
    wo = r * (H * 12 + d)
    wq = r * (d + H * (16 + 8))
    for arch, per_layer in ((ARCHS["mla-full-q-dense"], wq + wo), (ARCHS["mla-q-lora-dense"], wo)):
        assert lora_trainable_params(arch, r, ["wq", "wk", "wv", "wo"]) == per_layer * arch.n_layers
        assert _runtime_trainable(arch, r, ["wq", "wk", "wv", "wo"]) == per_layer * arch.n_layers


def test_shared_experts_are_one_wide_mlp():
    """S shared experts of width h are one SwiGLU S*h wide in the runtime: one adapter r (d + S h) per matrix and MoE
    layer, not S adapters of r (d + h)."""
    arch = ARCHS["moe-3-shared"]
    r, d, h, E, S, L = 8, 64, 16, 4, 3, arch.n_layers
    routed = E * 3 * r * (d + h)
    shared = 3 * r * (d + S * h)
    assert lora_trainable_params(arch, r, ["w1", "w2", "w3"]) == L * (routed + shared)
    assert _runtime_trainable(arch, r, ["w1", "w2", "w3"]) == L * (routed + shared)


# ----------------------------------------------------------------------------- QLoRA weight bytes


def _runtime_base_bytes(arch: Architecture, targets: list[str], quantize: str = "nf4") -> tuple[int, int]:
    """(bytes, NF4 tensors) of the frozen base as llmc's trainer holds it on a GPU (``posttrain.build_policy`` under
    bf16 autocast): the fp32 model it builds, ``apply_lora`` (quantising the targets to NF4 for QLoRA), then
    ``cast_frozen_matmul_weights_``. Every parameter and persistent buffer but the adapters at its stored size, plus
    each NF4 weight's codes, absmax codes, scales and offset (NF4Tensor.nbytes: plain tensors, not module
    parameters). The non-persistent buffers (RoPE tables, routing counters) are working tables, not weights."""
    torch.manual_seed(0)
    model = build_model(arch, seed=0)
    apply_lora(model, 4, 8.0, 0.0, targets, quantize_base=quantize)
    cast_frozen_matmul_weights_(model)
    total = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)
    persistent = set(model.state_dict())
    total += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n in persistent)
    nf4 = [m.weight_nf4 for m in model.modules() if isinstance(m, NF4Linear)]
    return total + sum(q.nbytes() for q in nf4), len(nf4)


def _plan_weights(arch: Architecture, targets: list[str], quantize: str = "nf4") -> tuple[int, list[str]]:
    model = json.dumps(arch.model_dump(mode="json", exclude_none=True))
    text = f"""\
name: q
model: {model}
hardware: {{gpu: h100-sxm, count: 1}}
data:
  sources: [{{name: web, path: /data/web.jsonl}}]
  tokenizer: {{path: /nope/tok}}
  seq_len: 64
  tokens: 1M
stages:
  - name: sft
    kind: sft
    lora: {{rank: 4, quantize_base: {quantize}, targets: {json.dumps(targets)}}}
    data: {{seq_len: 64, tokens: 1M}}
"""
    run, lines = loads_spec(text, file="q.yaml")
    plans, _ = plan_stages(run, gpu=get_gpu("h100-sxm"), lines=lines, file="q.yaml")
    return plans[0].memory.weights_bytes, plans[0].notes


@pytest.mark.parametrize("name,targets", [
    ("tiny-moe", list(LORA_TARGETS)),
    ("tiny-moe", ["wq", "wv"]),
    ("mla-q-lora-moe", list(LORA_TARGETS)),
    ("gpt-oss", list(LORA_TARGETS)),
    ("dense-mha", list(LORA_TARGETS)),
    ("dense-mha", ["wq", "wv"]),
    ("dense-gqa-bias-tied", ["wo", "w2"]),
])
def test_qlora_weight_bytes_equal_runtime(name, targets):
    arch = ARCHS[name]
    stored, n_nf4 = _runtime_base_bytes(arch, targets)
    planned, notes = _plan_weights(arch, targets)
    assert n_nf4 > 0
    # the plan prices NF4 at its mean rate; each stored NF4 tensor rounds up by at most one block and one scale
    assert 0 <= stored - planned <= n_nf4 * NF4_ROUNDING_BYTES + 1, (stored, planned)
    note = next(n for n in notes if n.startswith("QLoRA"))
    assert note.endswith("in fp32 (embeddings, norms, biases)")


@pytest.mark.parametrize("name,targets", [
    ("tiny-moe", list(LORA_TARGETS)),
    ("tiny-moe", ["wq", "wv", "w2"]),
    ("mla-q-lora-moe", list(LORA_TARGETS)),
    ("gpt-oss", ["wq", "wk", "wv", "wo"]),
    ("dense-gqa-bias-tied", list(LORA_TARGETS)),
])
def test_lora_base_bytes_equal_runtime(name, targets):
    """A LoRA stage's frozen base as llmc's trainer holds it on a GPU: the matmul-only weights in bf16 (adapted expert
    matrices too), embeddings, norms and biases in fp32 -- byte for byte."""
    arch = ARCHS[name]
    stored, _ = _runtime_base_bytes(arch, targets, quantize="none")
    planned, _ = _plan_weights(arch, targets, quantize="none")
    assert planned == stored


def test_qlora_moe_keeps_experts_unquantised_at_scale():
    """Qwen3-30B-A3B under QLoRA: its 48 x 128 x 3 x 2048 x 768 routed-expert weights (config.json) are not quantised
    by llmc's trainer and, adapted, are held in bf16: 58 GB alone, so the base cannot be the ~16 GB an all-NF4 count
    gives. The rest (1.5B parameters: fp32 embeddings, NF4 attention, bf16 head and routers) adds 0.5 to 4 B each."""
    arch = PRESETS["qwen3-30b-a3b"]
    experts = 48 * 128 * 3 * 2048 * 768
    planned, notes = _plan_weights(arch, list(LORA_TARGETS))
    rest = params_total(arch) - experts
    assert experts * 2 + rest * 0.5 < planned < experts * 2 + rest * 4


def test_nf4_rate_matches_runtime_storage():
    """NF4_BITS_PER_PARAM (4 + 8/64 + 32/(64 x 256), QLoRA paper sec. 3) is the runtime's storage rate for a weight
    of whole blocks and scale groups."""
    n = NF4_BLOCK * NF4_DQ_BLOCK * 4
    lin = torch.nn.Linear(n // 128, 128, bias=False)
    q = NF4Linear(lin).weight_nf4
    assert q.nbytes() == n * NF4_BITS_PER_PARAM / 8 + 4  # + the fp32 offset of the double quantisation
