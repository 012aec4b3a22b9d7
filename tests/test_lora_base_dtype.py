"""Post-training's frozen weights in bf16 under bf16 autocast, and QLoRA's base built and quantised on the host.

Under ``torch.autocast(dtype=bfloat16)`` a weight read only by ``linear`` / ``matmul`` is rounded to bf16 (nearest even)
before each use, so holding it in bf16 from the start cannot change a single bit: these tests compare a model with
its frozen matmul weights cast (``llmc.runtime.lora.cast_frozen_matmul_weights_``) against the same model left in fp32,
both under the CPU's bf16 autocast (``cpu_bf16``), with ``torch.equal`` on losses, gradients, log-probs and samples.
The tensors the cast must leave alone are named from the model's layout (``llmc.runtime.model``): embeddings, norms,
biases, sinks. Adapted expert matrices are cast too: ``LoRAExperts`` adds its product to theirs (PEFT's unmerged
forward), which is shown here to compute the merged model's numbers."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from llmc.runtime.checkpoint import read_model_state, resolve_checkpoint, save_checkpoint  # noqa: E402
from llmc.runtime.distributed import DistInfo  # noqa: E402
from llmc.runtime.dpo import Reference, frozen_copy  # noqa: E402
from llmc.runtime.grpo import completion_logprobs, sample_groups  # noqa: E402
from llmc.runtime.job import TrainJob  # noqa: E402
from llmc.runtime.lora import (  # noqa: E402
    NF4Linear,
    apply_lora,
    cast_frozen_matmul_weights_,
    disable_adapters,
    lora_modules,
    merge_lora,
    quantize_nf4,
)
from llmc.runtime.model import build_model, mean_token_loss  # noqa: E402
from llmc.runtime.posttrain import KIND_FOR_STAGE, bf16_forwards, build_policy, run_stage  # noqa: E402
from llmc.runtime.synthetic import ByteTokenizer  # noqa: E402
from llmc.spec.hf import architecture_from_hf_config  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402
from llmc.spec.presets import PRESETS  # noqa: E402
from llmc.spec.schema import make_stage  # noqa: E402

torch.set_num_threads(1)
CPU = torch.device("cpu")
TOK = ByteTokenizer()


class BF16:
    precision = "bf16"


GPT_OSS = dict(vocab_size=96, hidden_size=32, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
               max_position_embeddings=64, rms_norm_eps=1e-5, swiglu_limit=1.5, router_aux_loss_coef=0.01,
               rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                "truncate": False, "original_max_position_embeddings": 16, "rope_theta": 500.0})
ARCHS = {
    # q/k/v biases (inside F.linear), a tied head (the embedding read by F.embedding and a matmul)
    "dense": Architecture(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=300,
                          max_seq_len=64, qkv_bias=True, tied_embeddings=True),
    "moe": Architecture(**{**PRESETS["tiny-moe"].model_dump(), "n_layers": 2}),  # router, shared experts
    # attention sinks, o_proj bias, router bias, expert biases added outside the matmuls, clamped SwiGLU
    "gpt-oss": architecture_from_hf_config({"model_type": "gpt_oss", **GPT_OSS}, name="oss"),
    "mla": Architecture(name="v2", n_layers=2, d_model=64, n_heads=4, d_ff=128, vocab_size=512, max_seq_len=64,
                        mla={"kv_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
                             "q_lora_rank": 24},
                        moe={"num_experts": 8, "top_k": 2, "num_shared_experts": 1, "expert_d_ff": 32,
                             "dense_layers": 1}),
}
ATTENTION = ["wq", "wk", "wv", "wo"]
ALL = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]


def _model(arch: Architecture, targets: list[str] | None) -> torch.nn.Module:
    """A model with non-trivial norms, biases and sinks (so a wrongly cast one shows), LoRA on ``targets`` with
    B != 0 (so every adapter gets a gradient and changes the output)."""
    m = build_model(arch, seed=0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.dim() == 1 or re.search(r"(bias|sinks|b[123])$", n):
                p.normal_(0, 0.3).add_(1.0 if "norm" in n else 0.0)
    if targets is not None:
        apply_lora(m, 4, 8, 0.0, targets)
        with torch.no_grad():
            for mod in lora_modules(m):
                for b in (mod.lora_B.values() if isinstance(mod.lora_B, torch.nn.ParameterDict) else [mod.lora_B]):
                    b.normal_(0, 0.05)
    return m


def _pair(arch: Architecture, targets: list[str] | None) -> tuple[torch.nn.Module, torch.nn.Module, int]:
    """(fp32 model, the same with its frozen matmul weights cast to bf16, elements cast), both under bf16 autocast."""
    m = _model(arch, targets)
    c = copy.deepcopy(m)
    n = cast_frozen_matmul_weights_(c)
    for x in (m, c):
        bf16_forwards(x, BF16, CPU, cpu_bf16=True)
    return m, c, n


def _expected_cast(model: torch.nn.Module) -> set[str]:
    """By name, from the model's layout: the frozen linear weights (attention / MLA projections, MLPs, shared
    experts, router gate, untied head, LoRA bases) and the stacked experts, adapted or not."""
    names = set()
    for n, p in model.named_parameters():
        if p.requires_grad:
            continue
        if re.search(r"\.(wq|wk|wv|wo|wq_a|wq_b|wkv_a|wkv_b|w1|w2|w3|gate)(\.base)?\.weight$|^lm_head\.weight$", n):
            names.add(n)
        elif re.search(r"experts(\.base)?\.w[123]$", n):
            names.add(n)
    return names


# ----------------------------------------------------------------------------- which tensors


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("targets", [ATTENTION, ALL])
def test_the_cast_weights_are_the_frozen_matmul_only_ones(arch, targets):
    m = _model(ARCHS[arch], targets)
    fp32 = {n: p.dtype for n, p in m.named_parameters()}
    n = cast_frozen_matmul_weights_(m)
    bf16 = {k for k, p in m.named_parameters() if p.dtype == torch.bfloat16}
    assert bf16 == _expected_cast(m) and bf16
    assert n == sum(p.numel() for k, p in m.named_parameters() if k in bf16)
    assert fp32.keys() == {k for k, _ in m.named_parameters()}
    for k, p in m.named_parameters():
        if k not in bf16:
            assert p.dtype == fp32[k] == torch.float32, k  # everything else as it was
        if "lora_" in k:
            assert p.requires_grad, k
        else:
            assert not p.requires_grad, k
    assert cast_frozen_matmul_weights_(m) == 0  # idempotent


@pytest.mark.parametrize("arch", ["moe", "gpt-oss"])
def test_adapted_experts_compute_the_merged_models_numbers(arch):
    """LoRAExperts' unmerged forward, x W^T + (alpha / r) (x A^T) B^T for each adapted matrix, is the merged model's
    x (W + (alpha / r) B A)^T (Hu et al. 2021, arXiv:2106.09685 sec. 4.1): the adapted model's logits are, to fp32
    rounding, those of the model merge_lora makes, which sums the adapters in by its own route (torch.bmm over the experts). A
    bf16-held base merges in fp32: the merged matrix is the bf16 value plus the whole delta, not its bf16 rounding."""
    from llmc.runtime.lora import LoRAExperts

    a = ARCHS[arch]
    m = _model(a, ALL)
    x = torch.randint(0, a.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = m(x)
        merged = merge_lora(copy.deepcopy(m))(x)
    assert not any(isinstance(mod, LoRAExperts) for mod in merge_lora(copy.deepcopy(m)).modules())
    torch.testing.assert_close(adapted, merged)
    with disable_adapters(m), torch.no_grad():  # (the adapters' share is far above that rounding)
        assert (m(x) - adapted).abs().max() > 100 * (merged - adapted).abs().max()
    c = _model(a, ALL)
    cast_frozen_matmul_weights_(c)
    wrapped = next(mod for mod in c.modules() if isinstance(mod, LoRAExperts))
    w, delta = wrapped.base.w1.detach().clone(), wrapped.delta("w1").detach()
    assert w.dtype == torch.bfloat16 and delta.abs().max() > 0
    merge_lora(c)
    assert wrapped.base.w1.dtype == torch.float32 and torch.equal(wrapped.base.w1, w.float() + delta)


# ----------------------------------------------------------------------------- the same bits


def _sft_step(m: torch.nn.Module, x: torch.Tensor, loss_chunk: int) -> tuple[torch.Tensor, dict]:
    y = torch.roll(x, -1, 1)
    losses, aux = m(x, return_aux=True, targets=y, loss_chunk=loss_chunk)
    loss = mean_token_loss(losses, y) + aux
    loss.backward()  # outside autocast, as the runtime's loops
    return loss.detach(), {k: p.grad for k, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("targets", [ATTENTION, ALL])
def test_lora_sft_forward_backward_is_bitwise_the_same_with_a_bf16_base(arch, targets):
    a = ARCHS[arch]
    m, c, n = _pair(a, targets)
    assert n > 0
    chunk = 0
    if arch == "dense":  # recomputed blocks and loss slices: the recomputation runs under the saved autocast too
        for x in (m, c):
            x.set_ac("full")
        chunk = 16
    x = torch.randint(0, a.vocab_size, (3, 20), generator=torch.Generator().manual_seed(1))
    (l0, g0), (l1, g1) = _sft_step(m, x, chunk), _sft_step(c, x, chunk)
    assert l0.dtype == torch.float32 and torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        assert g0[k].dtype == torch.float32 and torch.equal(g0[k], g1[k]), k
        assert g0[k].abs().sum() > 0, k


@pytest.mark.parametrize("arch", ["dense", "gpt-oss"])
def test_dpo_and_grpo_reference_passes_are_bitwise_the_same(arch):
    """The LoRA reference (adapters off), GRPO's sampler (KV cache) and its log-probs, with and without the cast."""
    a = ARCHS[arch]
    m, c, _ = _pair(a, ATTENTION)
    ids = torch.randint(3, a.vocab_size, (4, 12), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[:, :5] = -100
    r0, r1 = Reference(m), Reference(c)
    assert r0.shared and r1.shared
    assert torch.equal(r0.logprobs(ids, labels), r1.logprobs(ids, labels))
    prompts = [ids[0, :5].tolist(), ids[1, :3].tolist()]
    s0 = sample_groups(m, prompts, 3, 6, stop_id=0, generator=torch.Generator().manual_seed(3))
    s1 = sample_groups(c, prompts, 3, 6, stop_id=0, generator=torch.Generator().manual_seed(3))
    for (f0, k0), (f1, k1) in zip(s0, s1, strict=True):
        assert torch.equal(f0, f1) and torch.equal(k0, k1)
    with torch.no_grad():
        assert torch.equal(completion_logprobs(m, s0[0][0], 5), completion_logprobs(c, s1[0][0], 5))


@pytest.mark.parametrize("arch", ["dense", "moe", "mla"])
def test_a_full_reference_copy_keeps_its_matmul_weights_in_bf16_with_the_same_logprobs(arch):
    """DPO / GRPO without LoRA: the frozen copy of a policy whose forwards autocast holds every matmul weight in bf16
    (made straight from the policy's, no fp32 copy first) and gives the fp32 copy's log-probs bit for bit; without
    autocast the copy is a plain fp32 one."""
    a = ARCHS[arch]
    m = _model(a, None)
    plain = frozen_copy(m)
    assert all(p.dtype == torch.float32 for p in plain.parameters())  # not marked: no autocast, nothing cast
    bf16_forwards(m, BF16, CPU, cpu_bf16=True)
    ref = Reference(m)
    assert not ref.shared
    cast = {k for k, p in ref.copy.named_parameters() if p.dtype == torch.bfloat16}
    frozen_all = copy.deepcopy(m).requires_grad_(False)
    assert cast == _expected_cast(frozen_all) and cast
    assert all(p.dtype == torch.float32 for p in m.parameters())  # the policy itself untouched
    ids = torch.randint(3, a.vocab_size, (3, 14), generator=torch.Generator().manual_seed(4))
    labels = ids.clone()
    labels[:, :4] = -100
    fp32_ref = Reference(m, frozen=copy.deepcopy(m))  # the copy as it was made before
    assert torch.equal(ref.logprobs(ids, labels), fp32_ref.logprobs(ids, labels))


def test_merge_of_a_bf16_base_is_its_value_plus_the_adapter_in_fp32():
    """merge_lora folds (alpha / r) B A into the bf16 base as W16 + (alpha / r) B A in fp32 (the export rounds it to
    bf16 anyway): computed here from the weights directly."""
    m = _model(ARCHS["dense"], ATTENTION)
    cast_frozen_matmul_weights_(m)
    want = {}
    for name, mod in m.named_modules():
        if hasattr(mod, "lora_A") and not isinstance(mod.lora_A, torch.nn.ParameterDict):
            want[f"{name}.weight"] = (mod.base.weight.detach().float()
                                      + 2.0 * mod.lora_B.detach() @ mod.lora_A.detach())
    merge_lora(m)
    sd = m.state_dict()
    for k, v in want.items():
        assert sd[k].dtype == torch.float32
        torch.testing.assert_close(sd[k], v, rtol=0, atol=1e-7, msg=k)


# ----------------------------------------------------------------------------- the runtime


#: the dense test model with the byte tokenizer's vocabulary (run_stage encodes its data with it)
BYTE_ARCH = Architecture(**{**ARCHS["dense"].model_dump(), "vocab_size": TOK.vocab_size, "max_seq_len": 160})


def _run(tmp: Path, arch: Architecture | None = None) -> Path:
    """A run folder whose stage ``base`` left an llmc checkpoint (fp32 random weights, seed 11)."""
    save_checkpoint(tmp / "base" / "checkpoints", 0, build_model(arch or ARCHS["dense"], seed=11), None, {})
    return tmp


def _job(kind: str = "sft", lora: dict | None = None, precision: str = "bf16", steps: int = 2,
         arch: Architecture | None = None) -> TrainJob:
    arch = arch or BYTE_ARCH
    fields = {"kind": kind, **({"lora": lora} if lora else {}), **({"dpo_beta": 0.1} if kind == "dpo" else {})}
    st = make_stage(name="s", init_from="base", data={"sources": [{"name": "synthetic", "format": "builtin", "kind": KIND_FOR_STAGE[kind]}],
                                                      "seq_len": 160, "tokens": 1e4}, **fields)
    return TrainJob(arch=arch, sources=[], seq_len=160, steps=steps, name="p", stage="s", kind=kind, lr=3e-3,
                    micro_batch=2, init_from="base", stage_spec=st, log_every=1000, precision=precision)


LORA = {"rank": 4, "alpha": 8, "dropout": 0.0, "targets": ["wq", "wv", "w2"]}


def test_build_policy_casts_the_lora_base_only_under_autocast(tmp_path):
    """A LoRA stage's policy: bf16 frozen matmul weights when the stage autocasts (CPU: cpu_bf16), everything fp32
    otherwise (fp32 precision, or the CPU's default)."""
    run = _run(tmp_path)
    arch = ARCHS["dense"]
    job = _job(lora=LORA, arch=arch)
    st = job.stage_spec
    m, _, _ = build_policy(job, DistInfo(0, 1, 0, CPU), run / "s", st.lora, cpu_bf16=True)
    bf16 = {k for k, p in m.named_parameters() if p.dtype == torch.bfloat16}
    assert bf16 == _expected_cast(m) and bf16
    for off in (dict(job=job, cpu_bf16=False), dict(job=_job(lora=LORA, arch=arch, precision="fp32"), cpu_bf16=True)):
        m2, _, _ = build_policy(off["job"], DistInfo(0, 1, 0, CPU), run / "s", st.lora, cpu_bf16=off["cpu_bf16"])
        assert all(p.dtype == torch.float32 for p in m2.parameters())
        # the cast values are the fp32 ones rounded: the same start
        sd = dict(m.named_parameters())
        for k, p in m2.named_parameters():
            if k in bf16:
                assert torch.equal(sd[k], p.detach().bfloat16()), k


def test_lora_sft_stage_under_cpu_bf16_runs_with_a_bf16_base_and_logs_the_same_losses(tmp_path, monkeypatch):
    """run_stage with cpu_bf16: the policy it builds holds its frozen linear weights in bf16; its per-step losses are
    those of the same stage with the cast turned off; it exports as before."""
    import llmc.runtime.lora as lora_mod
    import llmc.runtime.posttrain as pt

    arch = BYTE_ARCH
    run = _run(tmp_path, arch)
    built = []
    real = pt.build_policy

    def spy(*a, **k):
        out = real(*a, **k)
        built.append({n: p.dtype for n, p in out[0].named_parameters()})
        return out

    monkeypatch.setattr(pt, "build_policy", spy)
    res = run_stage(_job(lora=LORA, arch=arch), run / "cast", tokenizer=TOK, cpu_bf16=True)
    assert res["status"] == "done" and res["hf"] == "hf"
    [dtypes] = built
    assert {n for n, d in dtypes.items() if d == torch.bfloat16} == {
        n for n in dtypes if re.search(r"\.(wq|wk|wv|wo|w1|w2|w3)(\.base)?\.weight$", n)}
    monkeypatch.setattr(lora_mod, "cast_frozen_matmul_weights_", lambda model, dtype=None: 0)
    run_stage(_job(lora=LORA, arch=arch), run / "plain", tokenizer=TOK, cpu_bf16=True)
    assert {d for d in built[1].values()} == {torch.float32}

    def losses(d):
        return [r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "event" not in r]

    assert losses(run / "cast") == losses(run / "plain") and all(v > 1 for v in losses(run / "cast"))
    merged = read_model_state(resolve_checkpoint(run / "cast"))
    assert set(merged) == set(build_model(arch, seed=0).state_dict())


def test_full_dpo_stage_under_cpu_bf16_has_a_bf16_reference_and_the_same_losses(tmp_path, monkeypatch):
    """One-process DPO without LoRA: its reference copy (dpo.Reference) holds bf16 matmul weights, and the stage's
    losses, margins and rewards are those of an fp32 reference."""
    import llmc.runtime.dpo as dpo_mod

    arch = BYTE_ARCH
    run = _run(tmp_path, arch)
    refs = []
    real = dpo_mod.Reference.__init__

    def spy(self, model, frozen=None):
        real(self, model, frozen)
        refs.append({p.dtype for p in self.copy.parameters()})

    monkeypatch.setattr(dpo_mod.Reference, "__init__", spy)
    run_stage(_job("dpo", arch=arch), run / "cast", tokenizer=TOK, cpu_bf16=True)
    assert refs == [{torch.bfloat16, torch.float32}]
    monkeypatch.setattr(dpo_mod, "frozen_copy", copy.deepcopy)
    run_stage(_job("dpo", arch=arch), run / "plain", tokenizer=TOK, cpu_bf16=True)
    assert refs[1] == {torch.float32}

    def rows(d):
        return [{k: r[k] for k in ("loss", "margin", "chosen_reward", "rejected_reward")}
                for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "event" not in r]

    assert rows(run / "cast") == rows(run / "plain") and rows(run / "cast")[-1]["margin"] != 0


# ----------------------------------------------------------------------------- QLoRA: built and quantised on the host


def _spy_build_and_quantise(monkeypatch) -> list:
    import llmc.runtime.lora as lora_mod
    import llmc.runtime.train as train_mod

    seen: list = []
    build, quant = train_mod.build_model, lora_mod.quantize_nf4

    def build_spy(arch, device="cpu", **kw):
        seen.append(("build", torch.device(device).type))
        return build(arch, device, **kw)

    def quant_spy(w, *a, **kw):
        seen.append(("quantise", w.device.type, w.dtype))
        return quant(w, *a, **kw)

    monkeypatch.setattr(train_mod, "build_model", build_spy)
    monkeypatch.setattr(lora_mod, "quantize_nf4", quant_spy)
    return seen


def test_qlora_base_is_built_loaded_and_quantised_on_the_host_then_moved(tmp_path, monkeypatch):
    """The device (a meta device stands in for the GPU: nothing is computed there) never sees the full-precision
    model: it is built and loaded on the CPU, quantised there from the fp32 weights, and only the result moves."""
    run = _run(tmp_path)
    seen = _spy_build_and_quantise(monkeypatch)
    job = _job(lora={**LORA, "quantize_base": "nf4"}, arch=ARCHS["dense"], precision="fp32")
    m, _, _ = build_policy(job, DistInfo(0, 1, 0, torch.device("meta")), run / "s", job.stage_spec.lora)
    assert seen[0] == ("build", "cpu")
    quantised = seen[1:]
    assert len(quantised) == 2 * 3 and set(quantised) == {("quantise", "cpu", torch.float32)}  # 2 layers x 3
    assert {p.device.type for p in m.parameters()} == {"meta"}
    nf4 = [mod for mod in m.modules() if isinstance(mod, NF4Linear)]
    assert len(nf4) == 6 and {mod.weight_nf4.packed.device.type for mod in nf4} == {"meta"}
    assert {mod.weight_nf4.dq_codes.device.type for mod in nf4} == {"meta"}


def test_lora_bf16_base_is_built_and_cast_on_the_host_then_moved(tmp_path, monkeypatch):
    """The same for a LoRA stage whose base is cast to bf16 (autocast, as on CUDA): the device gets the bf16 base."""
    import llmc.runtime.posttrain as pt

    run = _run(tmp_path)
    seen = _spy_build_and_quantise(monkeypatch)
    monkeypatch.setattr(pt, "autocasts", lambda job, device, cpu_bf16=False: True)  # (no autocast on meta)
    job = _job(lora=LORA, arch=ARCHS["dense"])
    m, _, _ = build_policy(job, DistInfo(0, 1, 0, torch.device("meta")), run / "s", job.stage_spec.lora)
    assert seen == [("build", "cpu")]
    assert {p.device.type for p in m.parameters()} == {"meta"}
    assert {k for k, p in m.named_parameters() if p.dtype == torch.bfloat16} == _expected_cast(m)


def test_a_fresh_init_is_still_built_on_the_device(tmp_path, monkeypatch):
    """Without weights to load, the random init is drawn where it always was (a QLoRA merge rebuilds that base there,
    and a full DPO reference must start as the policy)."""
    from llmc.runtime.posttrain import PostTrainError

    seen = _spy_build_and_quantise(monkeypatch)
    job = _job(lora={**LORA, "quantize_base": "nf4"}, arch=ARCHS["dense"], precision="fp32").replace(init_from=None)
    with pytest.raises(PostTrainError, match="meta-device"):  # the stand-in device holds no values to quantise
        build_policy(job, DistInfo(0, 1, 0, torch.device("meta")), tmp_path / "s", job.stage_spec.lora)
    assert seen == [("build", "meta")]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_qlora_host_build_gives_the_codes_and_loss_of_the_model_built_by_hand(tmp_path, precision):
    """The stage's QLoRA model equals one built the way the runtime did before (build, load the checkpoint, quantise
    where it is): the same NF4 codes and constants, the same output. Under bf16 autocast (cpu_bf16) the codes are
    still those of the fp32 weights (quantised before the other linears are cast) and the output is the same bits."""
    run = _run(tmp_path)
    job = _job(lora={**LORA, "quantize_base": "nf4"}, arch=ARCHS["dense"], precision=precision)
    m, _, _ = build_policy(job, DistInfo(0, 1, 0, CPU), run / "s", job.stage_spec.lora, cpu_bf16=True)
    assert {p.dtype for p in m.parameters()} == ({torch.float32, torch.bfloat16} if precision == "bf16"
                                                 else {torch.float32})
    hand = build_model(ARCHS["dense"], seed=0)
    hand.load_state_dict(read_model_state(resolve_checkpoint(run / "base")))
    apply_lora(hand, 4, 8, 0.0, LORA["targets"], "nf4")
    with torch.no_grad():  # the same adapters (the runtime's are seeded by name: llmc.runtime.lora.init_lora_)
        for (ka, a), (kb, b) in zip(m.named_parameters(), hand.named_parameters(), strict=True):
            assert ka == kb
            if "lora_" in ka:
                b.copy_(a)
    got = {n: mod.weight_nf4 for n, mod in m.named_modules() if isinstance(mod, NF4Linear)}
    want = {n: mod.weight_nf4 for n, mod in hand.named_modules() if isinstance(mod, NF4Linear)}
    assert got.keys() == want.keys() and got
    for n in got:
        for f in ("packed", "dq_codes", "dq_scale"):
            assert torch.equal(getattr(got[n], f), getattr(want[n], f)), (n, f)
        assert got[n].dq_offset == want[n].dq_offset
    x = torch.randint(0, ARCHS["dense"].vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    for model in (m, hand):
        bf16_forwards(model, job, CPU, cpu_bf16=True)
    with torch.no_grad():
        assert torch.equal(m(x), hand(x))


def test_nf4_codes_in_slices_equal_the_whole_matrix_at_once(monkeypatch):
    """quantize_nf4's nearest-level search in slices (bounded temporaries) gives the codes of the search over the whole
    matrix: |x / absmax - level| minimised per element, computed here directly."""
    import llmc.runtime.lora as lora_mod

    w = torch.randn(96, 70, generator=torch.Generator().manual_seed(6))  # 6720 = 105 blocks of 64
    monkeypatch.setattr(lora_mod, "NF4_SLICE", 128)  # 2 blocks per slice: 53 slices
    q = quantize_nf4(w, 64, double_quant=True)
    blocks = w.reshape(-1, 64)
    normed = blocks / blocks.abs().amax(1, keepdim=True)
    codes = (normed[..., None] - lora_mod.NF4_LEVELS).abs().argmin(-1).to(torch.uint8).reshape(-1)
    assert torch.equal(q.packed, (codes[0::2] << 4) | codes[1::2])


def test_nf4_codes_follow_module_moves_but_never_change_dtype():
    lin = torch.nn.Linear(64, 32)
    q = NF4Linear(lin)
    before = (q.weight_nf4.packed.clone(), q.weight_nf4.dq_scale.clone())
    q.to("meta")
    assert q.weight_nf4.packed.device.type == "meta" and q.bias.device.type == "meta"
    q2 = NF4Linear(lin).half()
    assert q2.weight_nf4.dq_scale.dtype == torch.float32 and torch.equal(q2.weight_nf4.packed, before[0])
    assert torch.equal(q2.weight_nf4.dq_scale, before[1])


# ----------------------------------------------------------------------------- FSDP2 on 2 ranks (gloo)

RUNNER = r'''
import json, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
import llmc.runtime.posttrain as pt
from llmc.runtime.distributed import init_distributed, shutdown
sys.path.insert(0, sys.argv[2])
from test_posttrain_dist import job_of, TOK
info = init_distributed()
real = pt.build_policy
def spy(job, info, out, *a, **k):  # the dtypes of the model it built (sharded: each rank's DTensors)
    got = real(job, info, out, *a, **k)
    Path(out).mkdir(parents=True, exist_ok=True)
    dtypes = {n: str(p.dtype) for n, p in got[0].named_parameters()}
    with open(f"{out}/dtypes-{info.rank}-{'ref' if k.get('frozen') else 'policy'}.json", "w") as f:
        json.dump(dtypes, f)
    return got
pt.build_policy = spy
try:
    for name in json.loads(sys.argv[3]):
        pt.run_stage(job_of(name).replace(precision="bf16"), sys.argv[1] + "/" + name, tokenizer=TOK, info=info,
                     cpu_bf16=True)
finally:
    shutdown()
'''


@pytest.mark.slow
def test_fsdp2_shards_a_bf16_frozen_base_beside_fp32_adapters(tmp_path):
    """FSDP2 (fully_shard, 2 gloo ranks) takes a module whose frozen weights are bf16 and whose trainable ones are
    fp32 (torch's FSDPParamGroup requires one dtype among the trainable parameters only, and all-gathers mixed dtypes
    as bytes), and a sharded DPO reference whose matmul weights are all bf16: a LoRA SFT stage under cpu_bf16, built
    whole or on meta (its base loaded into the bf16 shards), logs the one-process stage's first loss (the same start)
    and close losses after it."""
    from test_posttrain_dist import _base, job_of

    one, two = tmp_path / "one", tmp_path / "two"
    for r in (one, two):
        _base(r)
    run_stage(job_of("sft_lora").replace(precision="bf16"), one / "sft_lora", tokenizer=TOK, cpu_bf16=True)
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    two.mkdir(exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--rdzv_backend=c10d",
           "--rdzv_endpoint=localhost:0", str(script), str(two), str(Path(__file__).parent),
           json.dumps(["sft_lora", "sft_lora_meta", "dpo"])]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-4000:]
    linear = r"\.(wq|wk|wv|wo|w1|w2|w3)(\.base)?\.weight$|^lm_head\.weight$"
    for rank in (0, 1):
        for name in ("sft_lora", "sft_lora_meta"):  # built whole, or on meta and loaded into the bf16 shards
            lora = json.loads((two / name / f"dtypes-{rank}-policy.json").read_text())
            assert {n for n, d in lora.items() if d == "torch.bfloat16"} == {n for n in lora if re.search(linear, n)}
            assert {d for n, d in lora.items() if "lora_" in n} == {"torch.float32"}
        assert set(json.loads((two / "dpo" / f"dtypes-{rank}-policy.json").read_text()).values()) == {"torch.float32"}
        ref = json.loads((two / "dpo" / f"dtypes-{rank}-ref.json").read_text())
        want = {n for n in ref if re.search(linear, n)}
        assert {n for n, d in ref.items() if d == "torch.bfloat16"} == want and want
    def steps(d):
        return [r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "event" not in r]

    a = steps(one / "sft_lora")
    for name in ("sft_lora", "sft_lora_meta"):
        b = steps(two / name)
        assert len(a) == len(b) > 1
        assert b[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5), name
        for ra, rb in zip(a, b, strict=True):  # (measured: 2.5e-4 apart at most)
            assert rb["loss"] == pytest.approx(ra["loss"], rel=2e-3), name
    done = json.loads((two / "dpo" / "DONE.json").read_text())
    assert done["status"] == "done" and done["world"] == 2
