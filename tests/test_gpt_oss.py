"""gpt-oss (``model_type: gpt_oss``, transformers' ``GptOssForCausalLM``: gpt-oss-20b / gpt-oss-120b): the published
configs import with transformers' own parameter counts and the model card's totals (arXiv:2508.10925 Table 1); a tiny
random model made with transformers here (attention sinks, q/k/v and o_proj biases, a window in every other layer, YaRN
without truncation, biased clamped-SwiGLU experts interleaved in gate_up_proj) loads into llmc's model with
transformers' logits past the window and past YaRN's original length, exports back to a GptOssForCausalLM with llmc's
logits, and trains on CPU; an MXFP4 release is refused in one line; torchtitan is a located gap that keeps
``backend: auto`` on llmc's trainer; ``llmc plan`` plans gpt-oss-20b LoRA SFT on one H100 and gpt-oss-120b full SFT on
eight."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from llmc.compiler.params import matmul_params_active, params_total  # noqa: E402
from llmc.runtime.hf_io import HFError, export_hf, load_hf_into, read_hf_config  # noqa: E402
from llmc.runtime.model import build_model, lm_loss, param_groups, rope_inv_freq  # noqa: E402
from llmc.spec.families import family_of  # noqa: E402
from llmc.spec.hf import architecture_from_hf_config  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402
from llmc.spec.presets import PRESETS  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures" / "hf"

# 4 layers (the window of 4 in layers 0 and 2), 4 experts top-2, YaRN x4 from 16 positions without truncation (a RoPE
# base of 500: its correction range ends mid-dim, so truncating moves it) on a
# 64-position model, a small clamp so that the random projections hit it
TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
            max_position_embeddings=64, rms_norm_eps=1e-5, swiglu_limit=1.5, router_aux_loss_coef=0.01,
            rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                             "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 500.0})


def make_hf(tmp: Path, seed: int = 0, **over) -> Path:
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**{**TINY, **over}))
    with torch.no_grad():  # non-trivial norms, biases, sinks and experts: a wrong mapping cannot hide
        for n, p in model.named_parameters():
            if "norm" in n or "bias" in n or n.endswith("sinks"):
                p.add_(torch.randn_like(p) * 0.5)
            elif "experts" in n:
                p.normal_(0, 0.5)
    out = tmp / "hf-gpt-oss"
    model.save_pretrained(out, max_shard_size="60KB")
    return out


def hf_model(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def tokens_for(arch, T=40):
    return torch.randint(0, arch.vocab_size, (2, T), generator=torch.Generator().manual_seed(1))


def test_load_gives_transformers_logits_and_export_round_trips(tmp_path):
    """llmc's loader reads the names, the interleaved gate_up_proj (and its bias), the transposed down_proj, the o_proj
    bias and the sinks; llmc's model then computes transformers' logits over 40 positions (10 windows, 2.5 times YaRN's
    original 16); export_hf writes a GptOssForCausalLM that transformers loads with llmc's logits. Each of gpt-oss's
    parts, dropped, gives other logits: the sinks zeroed is a softmax without the sink column; the clamp off; YaRN
    truncated; the windowed layers on OLMo 3's unscaled RoPE."""
    src = make_hf(tmp_path)
    arch = architecture_from_hf_config(read_hf_config(src), name="oss")
    assert family_of(arch).name == "gpt_oss"
    assert (arch.qkv_bias, arch.attn_out_bias, arch.attn_sinks, arch.activation, arch.swiglu_limit,
            arch.swiglu_alpha) == (True, True, True, "swiglu_clamped", 1.5, 1.702)
    assert (arch.sliding_window, arch.full_attention_layers, arch.rope_scaling.truncate) == (4, (1, 3), False)
    m = arch.moe
    assert (m.num_experts, m.top_k, m.router_bias, m.expert_proj_bias, m.route_norm, m.num_shared_experts,
            m.dense_layers) == (4, 2, True, True, True, 0, 0)
    ours = build_model(arch, seed=123).eval()
    assert params_total(arch) == ours.num_params() == sum(p.numel() for p in hf_model(src).parameters())
    load_hf_into(ours, src, arch)
    tokens = tokens_for(arch)
    with torch.no_grad():
        want = hf_model(src)(input_ids=tokens).logits
        torch.testing.assert_close(ours(tokens), want, atol=1e-4, rtol=1e-4)
        out = export_hf(ours.state_dict(), arch, tmp_path / "out", dtype=torch.float32)
        cfg = json.loads((out / "config.json").read_text())
        assert cfg["architectures"] == ["GptOssForCausalLM"] and cfg["rope_parameters"]["truncate"] is False
        back = hf_model(out)
        assert type(back).__name__ == "GptOssForCausalLM"
        torch.testing.assert_close(back(input_ids=tokens).logits, want, atol=1e-4, rtol=1e-4)
        assert architecture_from_hf_config(read_hf_config(out), name="oss") == arch
        # can fail: each part of the block dropped
        sd = ours.state_dict()
        no_sinks = {k: (torch.zeros_like(v) if k.endswith("sinks") else v) for k, v in sd.items()}
        rs = arch.rope_scaling
        for variant, weights in ((arch, no_sinks), (arch.model_copy(update={"swiglu_limit": 100.0}), sd),
                                 (arch.model_copy(update={"rope_scaling": rs.model_copy(update={"truncate": True})}),
                                  sd)):
            other = build_model(variant, seed=0).eval()
            other.load_state_dict(weights)
            assert (other(tokens) - want).abs().max() > 1e-3


def test_windowed_layers_rotate_with_the_scaled_rope():
    """transformers' GptOssRotaryEmbedding rotates every layer with YaRN; OLMo 3's rule (the windowed layers unscaled)
    would not: llmc's windowed gpt-oss layers take the model's one table, and its YaRN without truncation has
    transformers' frequencies and attention factor (truncation moves them)."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    cfg = transformers.GptOssConfig(**TINY)
    rot = GptOssRotaryEmbedding(config=cfg)
    arch = architecture_from_hf_config({"model_type": "gpt_oss", **TINY})
    ours, mscale = rope_inv_freq(arch.hd, arch.rope_theta, arch.rope_scaling)
    torch.testing.assert_close(ours.double(), rot.inv_freq.double(), rtol=1e-6, atol=0)
    assert mscale == pytest.approx(rot.attention_scaling) == pytest.approx(0.1 * math.log(4) + 1)
    truncated, _ = rope_inv_freq(arch.hd, arch.rope_theta, arch.rope_scaling.model_copy(update={"truncate": True}))
    assert (truncated - ours).abs().max() > 1e-6
    model = build_model(arch, "meta")
    assert not arch.window_rope_apart and not model.has_local_rope
    assert not any(blk.local_rope for blk in model.layers.values())


def test_mxfp4_release_is_refused_in_one_line(tmp_path):
    """The released checkpoints keep the experts in MXFP4 (quantization_config quant_method mxfp4): the loader says so
    in one line, with how to get bf16 weights, instead of a list of missing tensors."""
    src = make_hf(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (src / "config.json").write_text(json.dumps(cfg))
    arch = architecture_from_hf_config(cfg, name="oss")
    with pytest.raises(HFError) as e:
        load_hf_into(build_model(arch, seed=0), src, arch)
    msg = str(e.value)
    assert "\n" not in msg and "mxfp4" in msg and "bf16" in msg


def test_lora_on_gpt_oss_experts_keeps_their_biases_and_clamp(tmp_path):
    """LoRA on the stacked experts (llmc.runtime.lora.LoRAExperts) runs the base experts' own expert with the merged
    weights: with fresh adapters (B = 0) the model's logits are the loaded checkpoint's, transformers' (a plain
    SwiGLU would drop gpt-oss's biases and clamp); a non-zero adapter on w1 moves them."""
    from llmc.runtime.lora import LoRAExperts, apply_lora

    src = make_hf(tmp_path)
    arch = architecture_from_hf_config(read_hf_config(src), name="oss")
    model = build_model(arch, seed=0).eval()
    load_hf_into(model, src, arch)
    apply_lora(model, rank=2, alpha=4.0, targets=["w1", "w2", "w3"])
    wrapped = [m for m in model.modules() if isinstance(m, LoRAExperts)]
    assert len(wrapped) == arch.n_layers
    tokens = tokens_for(arch)
    with torch.no_grad():
        want = hf_model(src)(input_ids=tokens).logits
        torch.testing.assert_close(model(tokens), want, atol=1e-4, rtol=1e-4)
        wrapped[0].lora_B["w1"].normal_(0, 0.5)
        assert (model(tokens) - want).abs().max() > 1e-3


def test_tiny_gpt_oss_trains_on_cpu():
    """A tiny gpt-oss spec trains: a few AdamW steps on one batch lower llmc's loss; the expert biases (2-D) and the
    sinks are not weight-decayed, and every gpt-oss parameter gets a gradient."""
    arch = architecture_from_hf_config({"model_type": "gpt_oss", **TINY}, name="tiny-oss")
    model = build_model(arch, seed=0).train()
    groups = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = {names[id(p)].rsplit(".", 1)[-1] for p in groups[1]["params"]}
    assert {"b1", "b2", "b3", "sinks", "bias"} <= undecayed
    opt = torch.optim.AdamW(groups, lr=3e-3)
    tokens = tokens_for(arch, T=33)
    losses = []
    for _ in range(6):
        logits, aux = model(tokens[:, :-1], return_aux=True)
        loss = lm_loss(logits, tokens[:, 1:]) + aux
        opt.zero_grad()
        loss.backward()
        if not losses:
            for n, p in model.named_parameters():
                if n.endswith(("sinks", "b1", "b2", "b3", "wo.bias", "gate.bias")):
                    assert p.grad is not None and p.grad.abs().sum() > 0, n
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def _transformers_count(cfg: dict) -> int:
    hf = transformers.GptOssConfig(**{k: v for k, v in cfg.items()
                                      if k not in ("architectures", "transformers_version", "quantization_config")})
    with torch.device("meta"):
        return sum(p.numel() for p in transformers.GptOssForCausalLM(hf).parameters())


@pytest.mark.parametrize("name, total, active", [("gpt-oss-20b", 20.91, 3.61), ("gpt-oss-120b", 116.83, 5.13)])
def test_published_configs_count_as_transformers_and_the_model_card(name, total, active):
    """Each published config.json imports as its preset, with transformers' own parameter count, and the model card's
    totals (arXiv:2508.10925 Table 1: 20.91B / 116.83B total; 3.61B / 5.13B active, which counts the unembedding but
    not the embedding lookup: llmc's matmul-active parameters)."""
    cfg = json.loads((FIXTURES / f"{name}.json").read_text())
    arch = architecture_from_hf_config(cfg, name=name)
    assert arch == PRESETS[name]
    assert params_total(arch) == _transformers_count(cfg)
    assert round(params_total(arch) / 1e9, 2) == total
    assert round(matmul_params_active(arch) / 1e9, 2) == active


def test_defaults_are_the_config_class_defaults():
    """A config.json that leaves the gpt-oss keys out reads what GptOssConfig fills in (gpt-oss-120b's 36 layers of
    128 experts, YaRN x32 from 4096 without truncation on base 150000, the window of 128 in every other layer, q/k/v
    and o_proj biases, the clamp 7.0 / 1.702): transformers' parameter count and RoPE frequencies."""
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    arch = architecture_from_hf_config({"model_type": "gpt_oss"})
    hf_cfg = transformers.GptOssConfig()
    assert params_total(arch) == _transformers_count({})
    assert arch.model_dump(exclude={"name"}) == PRESETS["gpt-oss-120b"].model_copy(
        update={"moe": PRESETS["gpt-oss-120b"].moe.model_copy(update={"aux_loss_coef": 0.001})}).model_dump(
        exclude={"name"})
    rot = GptOssRotaryEmbedding(config=hf_cfg)
    ours, _ = rope_inv_freq(arch.hd, arch.rope_theta, arch.rope_scaling)
    torch.testing.assert_close(ours.double(), rot.inv_freq.double(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("update, says", [
    ({"attn_sinks": False}, "attn_sinks not set"),
    ({"moe": None}, "moe.expert_proj_bias not set"),
    ({"qk_norm": True}, "gpt-oss's block with qk_norm"),
    ({"norm_placement": "post"}, "gpt-oss's block with norm_placement post"),
])
def test_gpt_oss_switches_are_modelled_on_its_block_only(update, says):
    """gpt-oss's parts are modelled together only, on its block: a located one-line refusal otherwise."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        Architecture(**{**PRESETS["gpt-oss-20b"].model_dump(), **update})
    assert says in str(e.value)
    with pytest.raises(ValidationError, match="belong to activation swiglu_clamped"):
        Architecture(**{**PRESETS["tiny"].model_dump(), "swiglu_limit": 3.0})


def _plan(text: str):
    from llmc.compiler.compile import compile_spec
    from llmc.spec.load import loads_spec

    run, lines = loads_spec(text, file="spec.yaml")
    return compile_spec(run, "spec.yaml", lines, spec_bytes=text.encode())


def test_torchtitan_is_a_located_gap_and_auto_plans_the_native_trainer():
    """llmc's torchtitan job has no gpt-oss block: X320 at model.attn_sinks, first (before its window's X315); auto
    plans llmc's native trainer, saying why; pinning torchtitan, the torchtitan emitter refuses it there."""
    from llmc.compiler.backends import torchtitan_model_gaps
    from llmc.emit.torchtitan import torchtitan_diagnostics

    gaps = torchtitan_model_gaps(PRESETS["gpt-oss-20b"], seq_len=4096)
    assert gaps[0].code == "X320" and gaps[0].path == "model.attn_sinks"
    assert "X318" not in {g.code for g in gaps}  # (not Gemma's block)
    base = "name: t\nmodel: gpt-oss-20b\nhardware: {gpu: h100-sxm, count: 8}\ndata: {seq_len: 4096, tokens: 1e9}\n"
    c = _plan(base)
    assert c.backend.name == "native" and "gpt-oss" in c.backend.reason
    pinned = _plan(base + "training: {backend: torchtitan}\n")
    d = torchtitan_diagnostics(pinned)[0]
    assert (d.code, d.severity, d.path) == ("X320", "error", "model.attn_sinks") and "gpt-oss" in d.message


SFT = """name: oss
model: {model}
hardware: {{gpu: h100-sxm, count: {gpus}, gpus_per_node: {gpus}}}
data: {{sources: [{{name: web, path: /data/web/*.parquet, format: parquet}}], seq_len: 4096, tokens: 1T}}
training: {{precision: bf16}}
stages:
  - name: sft
    kind: sft
    init_hf: /models/{model}
{lora}    data: {{sources: [{{name: chat, path: /data/sft/*.jsonl, kind: chat}}], seq_len: 4096, tokens: 100M}}
"""


def test_step_time_counts_the_unfused_scores_of_attention_with_sinks():
    """No fused attention kernel takes gpt-oss's sinks, so llmc's trainer writes and reads every score as transformers'
    eager attention does: the time model's memory-bound bytes per token and block carry 3 x 12 B per score (forward
    and backward, the same estimate as Gemma 2's soft-capped scores), x the eager factor on llmc's native trainer."""
    from llmc.compiler import timing
    from llmc.compiler.backends import get_backend
    from llmc.compiler.hardware import get_gpu

    arch = PRESETS["gpt-oss-20b"]
    plain = arch.model_copy(update={"attn_sinks": False})  # (the same block with fused attention, unvalidated)
    s = 4096
    got = [timing.step_model(a, s, "bf16", get_gpu("h100-sxm"), "native").elementwise_bytes for a in (arch, plain)]
    want = 3 * timing.SOFTCAP_SCORE_FWD_BYTES * arch.n_heads * s * get_backend("native").eager_elementwise
    assert got[0] - got[1] == pytest.approx(want)


def test_plan_gpt_oss_20b_lora_on_one_h100_and_120b_full_sft_on_eight(tmp_path):
    """`llmc plan` runs for gpt-oss-20b LoRA SFT of its attention, or of every linear, on one H100 (fits: the frozen
    base, its matmul weights in bf16, ~43 GB, adapted experts too (llmc's trainer adds their adapters' products to
    theirs, unmerged), and r=16 adapters)
    and gpt-oss-120b full SFT on eight (the bf16 weights, gradients and AdamW states alone, 16 B x 116.8B / 8 = 234 GB
    a GPU, do not fit: a G005 error saying so, a warning with --no-fit-check); both count FLOPs with the windowed
    layers' 128 keys."""
    from typer.testing import CliRunner

    from llmc.cli import app

    for model, gpus, lora, fits in (("gpt-oss-20b", 1, "    lora: {rank: 16, alpha: 32, targets: [wq, wk, wv, wo]}\n",
                                     True),
                                    ("gpt-oss-20b", 1, "    lora: {rank: 16, alpha: 32, targets: all-linear}\n", True),
                                    ("gpt-oss-120b", 8, "", False)):
        spec = tmp_path / f"{model}.yaml"
        spec.write_text(SFT.format(model=model, gpus=gpus, lora=lora))
        c = _plan(spec.read_text())
        assert [d.code for d in c.diagnostics if d.severity == "error"] == ([] if fits else ["G005"])
        warned = [d for d in c.diagnostics if d.code == "G005"]
        assert bool(warned) != fits
        if not fits:
            states = 16 * params_total(PRESETS[model]) / gpus
            assert f"{states / 2**30:.1f} GiB of it is weights" in warned[0].hint
        r = CliRunner().invoke(app, ["plan", str(spec)])
        assert r.exit_code == (0 if fits else 1), r.output
        r = CliRunner().invoke(app, ["plan", str(spec), "--no-fit-check"])
        assert r.exit_code == 0, r.output
        assert f"{model}: " in r.output and "MoE" in r.output


def _saved_bytes(fn, params, *args) -> int:
    """Bytes autograd keeps for ``fn(*args)`` (each storage once, ``params`` left out); the backward runs."""
    skip = {p.untyped_storage().data_ptr() for p in params}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in skip:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    out.float().sum().backward()
    return sum(saved.values())


@pytest.mark.parametrize("layer", [0, 1])
def test_sink_attention_and_clamped_experts_keep_what_the_memory_formula_counts(layer):
    """gpt-oss's attention has no fused kernel (the sinks), so every score is kept: autograd's saved tensors of the
    attention of a bf16 block of llmc's model (a windowed layer and a full one) equal the formula's attention part of
    ``none`` (6 B a score: the fp32 softmax, its bf16 cast; 4 B a query and head: the softmax's sink column; q, K / V
    expanded to the query heads; the output for wo; the input), and checkpointing the attention core drops exactly the
    scores and the expansion.
    One routed copy through a clamped, biased expert keeps 7 x its width (the clamps' inputs, the clamped gate, the
    sigmoid, up + 1, the gated product, w2's input) and its input: the formula's per-copy FFN term."""
    from llmc.compiler.memory import _ffn_act_per_token, block_norm_elems, layer_activation_bytes_per_token

    arch = architecture_from_hf_config({"model_type": "gpt_oss", **TINY}, name="oss")
    model = build_model(arch, seed=0).to(torch.bfloat16).train()
    S, d, B = 32, arch.d_model, 2
    att = model.layers[str(layer)].attention
    measured = {}
    for mode in ("none", "selective"):
        model.set_ac(mode)
        x = torch.randn(B, S, d, dtype=torch.bfloat16, requires_grad=True)
        measured[mode] = _saved_bytes(att, [*model.parameters(), model.rope], x, model.rope[:S]) / (B * S)
    f_none = layer_activation_bytes_per_token(arch, layer, "none", seq_len=S)
    f_core = layer_activation_bytes_per_token(arch, layer, "selective_core", seq_len=S)
    outside = 2 * (block_norm_elems(arch) - d + _ffn_act_per_token(arch, layer)[0])
    assert measured["none"] == f_none - outside
    H, hd, kv = arch.n_heads, arch.hd, arch.kv_heads
    assert measured["none"] - measured["selective"] == f_none - f_core == H * S * 6 + H * 4 + 2 * 2 * (H - kv) * hd
    ex, f, k, E = model.layers["0"].moe.experts, arch.moe.expert_d_ff or arch.d_ff, arch.moe.top_k, arch.moe.num_experts
    x = torch.randn(10, d, dtype=torch.bfloat16, requires_grad=True)
    per_copy = _saved_bytes(lambda t: ex.expert(0, t), list(ex.parameters()), x) / 10 / 2  # elements
    assert per_copy == d + 7 * f
    assert _ffn_act_per_token(arch, 0)[0] == k * (per_copy + d) + 2 * E  # + each copy's output, the fp32 scores


def test_lora_on_the_experts_keeps_the_clamp_and_biases():
    """LoRA adapters on gpt-oss's experts (llmc.runtime.lora: B starts at 0) leave the logits those of the base model:
    the wrapped experts still run the biased, clamped SwiGLU (the wrapper's own expert is a plain SwiGLU)."""
    from llmc.runtime.lora import apply_lora

    arch = architecture_from_hf_config({"model_type": "gpt_oss", **TINY}, name="oss")
    model = build_model(arch, seed=0).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.rsplit(".", 1)[-1] in ("b1", "b2", "b3", "sinks"):
                p.normal_(0, 0.5)
        tokens = tokens_for(arch, T=12)
        want = model(tokens)
        apply_lora(model, rank=4, alpha=8.0, targets=("wq", "wv", "w1", "w2", "w3"))
        assert type(model.layers["0"].moe.experts).__name__ == "LoRAExperts"
        torch.testing.assert_close(model(tokens), want, atol=1e-5, rtol=1e-5)


def test_tiny_gpt_oss_spec_trains_with_llmcs_trainer(tmp_path):
    """A tiny gpt-oss spec (its block written out in the spec: sinks, biases, mixed windows, YaRN without truncation,
    clamped experts) runs on llmc's trainer on CPU: 6 steps, the loss falls."""
    from test_build_fakes import lock_for

    from llmc.runtime import corpus
    from llmc.runtime.entry import run_stage

    corpus.write_corpus(tmp_path / "docs.jsonl", max_docs=300)
    arch = architecture_from_hf_config({"model_type": "gpt_oss", **TINY, "vocab_size": 512}, name="tiny-oss")
    spec = {"name": "t", "model": arch.model_dump(exclude_defaults=True), "hardware": {"gpu": "cpu", "count": 1},
            "data": {"sources": [{"name": "docs", "path": str(tmp_path / "docs.jsonl"), "format": "jsonl"}],
                     "tokenizer": {"train": True, "vocab_size": 512}, "seq_len": 32, "tokens": 256 * 6},
            "training": {"precision": "fp32", "global_batch_tokens": 256, "optimizer": {"lr": 3e-3},
                         "checkpoint": {"interval_steps": 6, "keep_latest": 1}, "log_every": 1,
                         "loss_spike": {"enabled": False}}}
    lock = lock_for(spec, plan={"micro_batch": 8}, hyper={"warmup_steps": 2}, spec_path=str(tmp_path / "spec.yaml"))
    res = run_stage(lock, None, tmp_path / "out", tmp_path)
    recs = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    loss = {r["step"]: r["loss"] for r in recs if "loss" in r and "event" not in r}
    assert res["status"] == "done" and loss[6] < loss[1]


def test_flops_per_token_count_the_windowed_layers_per_layer():
    """gpt-oss-20b at 4096 tokens, by hand: 6 x (active matmul parameters: the 4 picked of 32 experts, attention,
    router, the unembedding; the model card's 3.61B) + 6 x (12 full layers x 4096 keys + 12 windowed x 128) x 64 heads
    x (64 + 64); the biases and sinks inside it are under 0.1 %."""
    from llmc.compiler.flops import train_flops_per_token

    a = PRESETS["gpt-oss-20b"]
    d, f, V, L, E, k = 2880, 2880, 201088, 24, 32, 4
    attn = d * 4096 + 4096 + 2 * (d * 512 + 512) + 4096 * d + d + 64  # q, k, v, o with biases; sinks
    expert = 3 * d * f + 2 * f + d
    n_mm = L * (attn + 2 * d + d * E + E + k * expert) + d + V * d  # + norms, router; final norm, head
    want = 6 * n_mm + 6 * (12 * 4096 + 12 * 128) * 64 * 128
    assert train_flops_per_token(a, 4096) == want
    biases = L * (4096 + 1024 + d + 64 + E + k * (2 * f + d))
    assert 6 * biases / want < 1e-3
