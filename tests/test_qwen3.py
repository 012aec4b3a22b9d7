"""Qwen3 (q/k norms; dense and MoE): the torchtitan job llmc emits builds torchtitan's own Qwen3 / Qwen3-MoE model,
and computes what llmc's model computes for the same weights (the Hugging Face side, transformers' Qwen3ForCausalLM
and Qwen3MoeForCausalLM, is checked in test_hf_init.py and test_runtime_export.py; the parameter counts against
transformers in test_spec_hf.py)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchtitan")

sys.path.insert(0, str(Path(__file__).parent))
from test_torchtitan import load_job, write_build  # noqa: E402

from llmc.compiler.compile import compile_spec  # noqa: E402
from llmc.spec.load import load_spec  # noqa: E402


def _compiled(tmp_path: Path, model: str, hardware: str, data: str):
    spec = tmp_path / "spec.yaml"
    spec.write_text(f"name: q3\nmodel: {model}\nhardware: {hardware}\ndata: {data}\n"
                    "training: {precision: fp32, backend: torchtitan}\n")
    run, lines = load_spec(spec)
    return compile_spec(run, spec_path=str(spec), yaml_lines=lines)


def test_emitted_qwen3_8b_is_torchtitans_own_8b_model(tmp_path):
    """Every parameter of the emitted job's model has the name and shape of torchtitan 0.3.0's own Qwen3 8B flavour
    (q/k norms included), and the total is the published 8,190,735,360 llmc counts."""
    from torchtitan.models.qwen3 import qwen3_configs

    from llmc.compiler.params import params_total

    c = _compiled(tmp_path, "qwen3-8b", "{gpu: h100-sxm, count: 8}", "{seq_len: 4096, tokens: 1e9}")
    cfg = load_job(write_build(c, tmp_path / "b"), "job_without_converters")
    with torch.device("meta"):
        ours = cfg.model_spec.model.build()
        theirs = qwen3_configs["8B"](attn_backend="flex").build()
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    assert any(n.endswith("attention.q_norm.weight") for n in shapes)
    assert sum(p.numel() for p in ours.parameters()) == params_total(c.spec.model) == 8_190_735_360


def test_emitted_qwen3_30b_a3b_is_torchtitans_own_moe_model(tmp_path):
    """Qwen3-30B-A3B (q/k norms + 128 experts of width 768, top-8): the emitted job's model has the names and shapes
    of torchtitan 0.3.0's own 30B-A3B flavour and its routers (top-8 softmax, renormalised, no groups), and the
    30,532,122,624 parameters transformers counts (test_spec_hf.py)."""
    from test_torchtitan import _routers
    from torchtitan.models.qwen3 import qwen3_configs

    from llmc.compiler.params import params_total

    c = _compiled(tmp_path, "qwen3-30b-a3b", "{gpu: h100-sxm, count: 64}", "{seq_len: 4096, tokens: 1e10}")
    cfg = load_job(write_build(c, tmp_path / "b"), "job_without_converters")
    ref = qwen3_configs["30B-A3B"](attn_backend="flex")
    with torch.device("meta"):
        ours, theirs = cfg.model_spec.model.build(), ref.build()
    shapes = {n: tuple(p.shape) for n, p in ours.named_parameters()}
    assert shapes == {n: tuple(p.shape) for n, p in theirs.named_parameters()}
    assert _routers(cfg.model_spec.model) == _routers(ref) and len(_routers(ref)) == 48
    assert sum(p.numel() for p in ours.parameters()) == params_total(c.spec.model) == 30_532_122_624


@pytest.mark.parametrize("moe", ["", ", moe: {num_experts: 4, top_k: 2, expert_d_ff: 40, dense_layers: 1}",
                                 ", rope_scaling: {type: yarn, factor: 4.0, original_max_position: 8}"],
                         ids=["dense", "moe", "yarn"])
def test_torchtitan_qwen3_forward_equals_llmcs_model(tmp_path, moe):
    """The emitted job's torchtitan model, given llmc's model's weights as a Hugging Face checkpoint holds them (llmc's
    export: HF names, q/k rows and norms in rotate_half order) read through the state-dict adapter the job names
    (torchtitan's Qwen3StateDictAdapter, what ``init_hf`` uses), returns llmc's logits: the cos/sin RoPE and the q/k
    norms sit at the same place (per head, before RoPE) in both, on a head_dim apart from d_model / n_heads; with
    experts (Qwen3-MoE, a dense first layer), the routing (softmax, top-k, renormalised) and the experts too. And the
    torchtitan state, renamed and permuted back as llmc's export of a torchtitan checkpoint does
    (``titan_state_to_llmc``), is llmc's state exactly. Norm weights are perturbed so a misplaced or missing norm,
    or one left in the wrong order, changes the logits. With YaRN (x4 from 8 positions), the job's TemperedRoPE puts
    its attention factor (0.1 ln 4 + 1) on cos / sin as llmc's model and transformers do; torchtitan's own pure
    rotation would give other logits."""
    from torchtitan.models.qwen3.state_dict_adapter import Qwen3StateDictAdapter

    from llmc.runtime.hf_io import _TITAN_RENAMES, titan_state_to_llmc, to_hf_state_dict
    from llmc.runtime.model import build_model
    from llmc.runtime.titan_cpu_shim import swap_flex_for_sdpa

    model = ("{name: q3tiny, n_layers: 3, d_model: 64, n_heads: 4, n_kv_heads: 2, head_dim: 24, d_ff: 96, "
             f"vocab_size: 97, max_seq_len: 32, qk_norm: true{moe}}}")
    c = _compiled(tmp_path, model, "{gpu: cpu, count: 1}", "{seq_len: 32, tokens: 4096}")
    cfg = load_job(write_build(c, tmp_path / "b"), "job_without_converters")
    assert swap_flex_for_sdpa(cfg) > 0  # plain causal attention on the CPU, as llmc's model
    titan = cfg.model_spec.model.build()
    titan.init_states(buffer_device=torch.device("cpu"))
    ref = build_model(c.spec.model, "cpu", seed=0).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("norm.weight"):
                p.add_(torch.randn_like(p) * 0.3)
    ours = ref.state_dict()
    assert "Qwen3StateDictAdapter" in cfg.model_spec.state_dict_adapter.__name__
    sd = cfg.model_spec.state_dict_adapter(cfg.model_spec.model, None).from_hf(to_hf_state_dict(ours, c.spec.model))
    extra = set(titan.state_dict()) - set(sd)  # torchtitan's load-balancing buffers (the aux-loss-free bias: zero)
    assert all(k.endswith((".moe.expert_bias_E", ".moe.tokens_per_expert_E")) for k in extra), extra
    sd.update({k: titan.state_dict()[k] for k in extra})
    back = {}
    for k, v in sd.items():
        for a, b in _TITAN_RENAMES:
            k = k.replace(a, b)
        back[k] = v
    back = titan_state_to_llmc(back, c.spec.model)
    assert all(torch.equal(back[k], v) for k, v in ours.items())
    assert issubclass(cfg.model_spec.state_dict_adapter, Qwen3StateDictAdapter)
    titan.load_state_dict(sd, strict=True)
    titan.eval()
    tokens = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(0))
    # torchtitan's grouped experts compute in bf16 (GroupedExperts.forward casts x and the weights): 3.0e-4 at most
    # here, where the top-k weights left unnormalised (route_norm False in the job) give 2.8e-2
    tol = 3e-3 if "moe" in moe else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(titan(tokens), ref(tokens), rtol=1e-5, atol=tol)
        if "yarn" in moe:  # the same job without the temperature: torchtitan's pure rotation, other logits
            ropes = [m for m in titan.modules() if type(m).__name__ == "TemperedRoPE"]
            assert ropes and ropes[0].config.attention_factor == pytest.approx(0.1 * math.log(4.0) + 1)
            for rope in ropes:
                rope.cache /= rope.config.attention_factor
            assert (titan(tokens) - ref(tokens)).abs().max() > 1e-3
