"""LoRA / QLoRA: merge identity, trainable-count formula (shared with the compiler), NF4 round trip."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from llmc.compiler.stages import lora_trainable_params  # noqa: E402
from llmc.runtime.lora import (  # noqa: E402
    NF4_LEVELS,
    LoRALinear,
    NF4Linear,
    apply_lora,
    dequantize_nf4,
    disable_adapters,
    lora_param_count,
    merge_lora,
    quantize_nf4,
)
from llmc.runtime.model import build_model  # noqa: E402
from llmc.spec.model import Architecture  # noqa: E402
from llmc.spec.presets import PRESETS  # noqa: E402

torch.set_num_threads(1)
ARCH = Architecture(name="t", n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=96, vocab_size=300,
                    max_seq_len=64)


def _train_a_bit(model, steps=5, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, ARCH.vocab_size, (4, 16), generator=g)
        loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_lora_starts_as_base_and_freezes_it():
    m = build_model(ARCH, seed=0)
    x = torch.randint(0, ARCH.vocab_size, (2, 10))
    before = m(x).detach()
    apply_lora(m, rank=4, alpha=8, targets=["wq", "wv"])
    assert torch.equal(m(x).detach(), before)  # B = 0
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    lin = m.layers["0"].attention.wq
    assert isinstance(lin, LoRALinear) and lin.lora_A.shape == (4, 64) and lin.lora_B.shape == (64, 4)
    assert lin.scaling == 2.0


@pytest.mark.parametrize("targets", [["wq", "wk", "wv", "wo", "w1", "w2", "w3"], ["wq", "wv"], ["w2"]])
def test_trainable_count_matches_compiler_formula(targets):
    m = build_model(ARCH, seed=0)
    n = apply_lora(m, rank=8, alpha=16, targets=targets)
    assert n == lora_param_count(m) == sum(p.numel() for p in m.parameters() if p.requires_grad)
    assert n == lora_trainable_params(ARCH, 8, targets)
    # independent count: r*(d_in+d_out) per adapted matrix, by hand for this shape
    shapes = {"wq": (64, 64), "wk": (64, 32), "wv": (64, 32), "wo": (64, 64), "w1": (64, 96), "w3": (64, 96),
              "w2": (96, 64)}
    assert n == sum(8 * sum(shapes[t]) for t in targets) * ARCH.n_layers


def test_compiler_lora_counts_published():
    all7 = ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    assert lora_trainable_params(PRESETS["llama3-70b"], 16, all7) == 207_093_760
    assert lora_trainable_params(PRESETS["llama3-70b"], 16, ["wq", "wv"]) == 32_768_000
    assert lora_trainable_params(PRESETS["llama3-8b"], 16, all7) == 41_943_040  # "41.9M"


def test_merge_identity_after_training():
    torch.manual_seed(0)
    m = build_model(ARCH, seed=0)
    apply_lora(m, rank=4, alpha=8, dropout=0.1)
    _train_a_bit(m)
    assert any(float(mod.lora_B.detach().abs().max()) > 0 for mod in m.modules() if isinstance(mod, LoRALinear))
    m.eval()
    x = torch.randint(0, ARCH.vocab_size, (2, 12))
    before = m(x).detach()
    with disable_adapters(m):
        base_out = m(x).detach()
    assert not torch.allclose(before, base_out, atol=1e-4)  # adapters do something
    merge_lora(m)
    assert not any(isinstance(mod, LoRALinear) for mod in m.modules())
    assert set(m.state_dict()) == set(build_model(ARCH, seed=0).state_dict())  # plain torchtitan names again
    after = m(x).detach()
    assert torch.allclose(before, after, atol=1e-5), (before - after).abs().max()


def test_nf4_levels_and_roundtrip_bound():
    assert NF4_LEVELS.numel() == 16 and NF4_LEVELS[0] == -1 and NF4_LEVELS[7] == 0 and NF4_LEVELS[-1] == 1
    torch.manual_seed(0)
    w = torch.randn(96, 200) * 0.02
    q = quantize_nf4(w, block=64)
    d = dequantize_nf4(q)
    assert d.shape == w.shape
    # each value lands on the nearest level: error <= absmax * half the widest gap between levels
    half_gap = float((NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2)
    flat = torch.cat([w.reshape(-1), w.new_zeros((-w.numel()) % 64)]).view(-1, 64)
    bound = (flat.abs().amax(1, keepdim=True).expand_as(flat) * half_gap).reshape(-1)[: w.numel()].view_as(w)
    assert bool(((d - w).abs() <= bound + 1e-7).all())
    # typical error for Gaussian weights is far below the bound (NF4 is information-theoretically matched)
    rel = float((d - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt())
    assert rel < 0.12, rel
    # block maxima are represented exactly (level +-1)
    assert torch.allclose(d.reshape(-1)[: w.numel()].abs().max(), w.abs().max())
    assert abs(q.bits_per_param() - (4 + 32 / 64)) < 0.05  # fp32 absmax per 64 values


def test_nf4_double_quant_bits_and_error():
    torch.manual_seed(1)
    w = torch.randn(256, 512) * 0.02
    q = quantize_nf4(w, double_quant=True)
    # 4 bits + 8-bit absmax / 64 + fp32 scale per 256 blocks ~= 4.127 bit/param (QLoRA paper)
    assert 4.12 < q.bits_per_param() < 4.14
    e_dq = (dequantize_nf4(q) - w).pow(2).mean()
    e_plain = (dequantize_nf4(quantize_nf4(w)) - w).pow(2).mean()
    assert e_dq < 1.05 * e_plain


def test_qlora_training_with_nf4_base():
    torch.manual_seed(0)
    m = build_model(ARCH, seed=0)
    x = torch.randint(0, ARCH.vocab_size, (2, 10))
    ref = m(x).detach()
    apply_lora(m, rank=4, alpha=8, quantize_base="nf4")
    assert isinstance(m.layers["0"].feed_forward.w1.base, NF4Linear)
    out = m(x).detach()
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.15, rel  # quantised base is close to the full-precision one (~8% here)
    # training lowers the loss on a fixed batch while the NF4 codes stay untouched
    codes = m.layers["0"].attention.wq.base.weight_nf4.packed.clone()
    y = torch.randint(0, ARCH.vocab_size, (8, 16), generator=torch.Generator().manual_seed(3))
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(y)[:, :-1].flatten(0, 1), y[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert torch.equal(codes, m.layers["0"].attention.wq.base.weight_nf4.packed)
    m.eval()
    before = m(y).detach()
    merge_lora(m)
    assert torch.allclose(before, m(y).detach(), atol=1e-4)


def test_qlora_merges_into_the_full_precision_base():
    """QLoRA's merge used to fold the adapters into the dequantised NF4 weights, keeping the 4-bit error in the
    merged model; given the full-precision base, merge_lora and merged_state_dict give W + (alpha/r) B A with the
    original W, computed here from the weights and adapters directly."""
    from llmc.runtime.lora import lora_modules, merged_state_dict

    torch.manual_seed(0)
    base = build_model(ARCH, seed=0)
    w0 = {k: v.clone() for k, v in base.state_dict().items()}
    apply_lora(base, rank=4, alpha=8, quantize_base="nf4", targets=["wq", "w2"])
    with torch.no_grad():
        for mod in lora_modules(base):
            mod.lora_B.normal_(0, 0.02)
    want = dict(w0)
    for name, mod in base.named_modules():
        if isinstance(mod, LoRALinear):
            want[f"{name}.weight"] = w0[f"{name}.weight"] + (8 / 4) * mod.lora_B.detach() @ mod.lora_A.detach()
    sd = merged_state_dict(base, w0)
    assert sd.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(sd[k], want[k], rtol=0, atol=1e-6, msg=k)
    dequantised = merged_state_dict(base)  # without the base: the 4-bit weights (the old behaviour) are far off
    wq = "layers.0.attention.wq.weight"
    assert float((dequantised[wq] - want[wq]).abs().max()) > 1e-3
    merge_lora(base, w0)
    for k, v in base.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-6, msg=k)


def test_lora_on_moe_experts_counts_and_merges():
    arch = PRESETS["tiny-moe"]
    torch.manual_seed(0)
    m = build_model(arch, seed=0)
    n = apply_lora(m, rank=4, alpha=8)
    assert n == lora_trainable_params(arch, 4, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])
    _train = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randint(0, arch.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(m(x)[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        _train.zero_grad()
        loss.backward()
        _train.step()
    m.eval()
    before = m(x).detach()
    merge_lora(m)
    assert set(m.state_dict()) == set(build_model(arch, seed=0).state_dict())
    assert torch.allclose(before, m(x).detach(), atol=1e-5)
