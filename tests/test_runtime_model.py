"""Runtime model: shapes, GQA semantics, RoPE against a complex-number reference, MoE routing and aux
loss, the loss helper, meta-device init and activation checkpointing."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

from llmc.runtime.model import (  # noqa: E402
    MoE,
    Transformer,
    apply_rope,
    build_model,
    lm_loss,
    mean_token_loss,
    rope_inv_freq,
    rope_tables,
)
from llmc.spec.model import MLA, Architecture, Multipliers, RopeScaling  # noqa: E402
from llmc.spec.model import MoE as MoESpec  # noqa: E402

TINY = dict(n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, vocab_size=97, max_seq_len=32)


def arch(**kw) -> Architecture:
    return Architecture(**{**TINY, **kw})


@pytest.mark.parametrize("kw", [
    {}, {"tied_embeddings": True}, {"qkv_bias": True}, {"n_kv_heads": 1},
    {"moe": MoESpec(num_experts=4, top_k=2, num_shared_experts=1, dense_layers=1)},
    {"moe": MoESpec(num_experts=4, top_k=2, score_func="sigmoid", expert_d_ff=16)},
    {"mla": MLA(q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8)},
    {"mla": MLA(kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6)},
    {"rope_scaling": RopeScaling(type="yarn", factor=4.0, original_max_position=16)},
    {"rope_scaling": RopeScaling(type="longrope", factor=2.0, original_max_position=16, short_factor=[1.0, 1.5, 2, 3],
                                 long_factor=[1.0, 2, 4, 8])},
    {"rotary_dim": 4},
    {"multipliers": Multipliers(embedding=12.0, residual=0.22, attention=0.125, logits=8.0)},
])
def test_forward_shapes_and_backward(kw):
    a = arch(**kw)
    m = build_model(a, seed=0)
    tok = torch.randint(0, a.vocab_size, (3, 17))
    logits, aux = m(tok, return_aux=True)
    assert logits.shape == (3, 17, a.vocab_size) and aux.shape == ()
    assert torch.isfinite(logits).all()
    loss = m.loss(tok, tok)
    loss.backward()
    assert all(p.grad is not None for n, p in m.named_parameters() if "expert_bias" not in n)


def test_gqa_equals_mha_with_repeated_kv_weights():
    """K kv heads shared by groups of H/K query heads == MHA whose k/v projections repeat each kv head."""
    g = build_model(arch(n_kv_heads=2), seed=1)
    m = build_model(arch(n_kv_heads=4), seed=2)
    sd = g.state_dict()
    hd = TINY["d_model"] // TINY["n_heads"]
    for i in range(TINY["n_layers"]):
        for w in ("wk", "wv"):
            k = f"layers.{i}.attention.{w}.weight"
            sd[k] = sd[k].view(2, hd, -1).repeat_interleave(2, dim=0).reshape(4 * hd, -1)
    m.load_state_dict(sd)
    tok = torch.randint(0, 97, (2, 12))
    torch.testing.assert_close(g(tok), m(tok), rtol=1e-5, atol=1e-5)


def test_mha_attention_matches_textbook_softmax():
    """With kv == heads, one attention layer equals softmax(QK^T/sqrt(d) + causal mask) V written out."""
    a = arch(n_kv_heads=4)
    m = build_model(a, seed=3)
    att = m.layers["0"].attention
    x = torch.randn(2, 9, 32)
    rope = m.rope[:9]
    q = apply_rope(att.wq(x).view(2, 9, 4, 8), rope).transpose(1, 2)
    k = apply_rope(att.wk(x).view(2, 9, 4, 8), rope).transpose(1, 2)
    v = att.wv(x).view(2, 9, 4, 8).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    s = s.masked_fill(torch.triu(torch.ones(9, 9, dtype=torch.bool), 1), float("-inf"))
    ref = att.wo((s.softmax(-1) @ v).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(att(x, rope), ref, rtol=1e-5, atol=1e-5)


def _complex_rope_reference(x, theta, inv_freq=None):
    """Meta's llama reference: view pairs as complex numbers and multiply by exp(i * pos * freq)."""
    B, T, H, D = x.shape
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (torch.arange(0, D, 2)[: D // 2].double() / D)
    freqs = torch.outer(torch.arange(T).double(), inv_freq.double())
    cis = torch.polar(torch.ones_like(freqs), freqs)  # (T, D/2) complex
    xc = torch.view_as_complex(x.double().reshape(B, T, H, D // 2, 2))
    return torch.view_as_real(xc * cis[None, :, None, :]).reshape(B, T, H, D).float()


def test_rope_matches_complex_reference():
    x = torch.randn(2, 40, 3, 16)
    got = apply_rope(x, rope_tables(16, 40, 10000.0, None))
    torch.testing.assert_close(got, _complex_rope_reference(x, 10000.0), rtol=1e-4, atol=1e-4)
    # relative property: <R_m q, R_n k> depends only on m - n
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    tab = rope_tables(16, 64, 500000.0, None)
    def dot(m, n):
        return (apply_rope(q, tab[m:m + 1]) * apply_rope(k, tab[n:n + 1])).sum()
    torch.testing.assert_close(dot(10, 3), dot(40, 33), rtol=1e-4, atol=1e-4)


def _llama31_apply_scaling(freqs, factor, low, high, old):
    """Transcription of meta-llama/llama-models `apply_scaling` (Llama 3.1), loop form."""
    low_wl, high_wl = old / low, old / high
    out = []
    for f in freqs.tolist():
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(f)
        elif wl > low_wl:
            out.append(f / factor)
        else:
            s = (old / wl - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return torch.tensor(out)


def test_rope_llama3_scaling_matches_reference():
    sc = RopeScaling(type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
    inv, msc = rope_inv_freq(128, 500000.0, sc)
    base = 1.0 / 500000.0 ** (torch.arange(0, 128, 2).double() / 128)
    torch.testing.assert_close(inv.double(), _llama31_apply_scaling(base, 8.0, 1.0, 4.0, 8192).double(),
                               rtol=1e-6, atol=0)
    assert msc == 1.0
    x = torch.randn(1, 20, 2, 128)
    torch.testing.assert_close(apply_rope(x, rope_tables(128, 20, 500000.0, sc)),
                               _complex_rope_reference(x, 0, inv), rtol=1e-4, atol=1e-4)


def test_rope_linear_and_yarn_scaling():
    base, _ = rope_inv_freq(64, 10000.0, None)
    lin, _ = rope_inv_freq(64, 10000.0, RopeScaling(type="linear", factor=4.0))
    torch.testing.assert_close(lin, base / 4)
    yarn, msc = rope_inv_freq(64, 10000.0, RopeScaling(type="yarn", factor=4.0, original_max_position=4096))
    assert msc == pytest.approx(0.1 * math.log(4.0) + 1.0)  # YaRN attention factor
    assert yarn[0] == pytest.approx(base[0])  # highest frequency: extrapolated (kept)
    assert yarn[-1] == pytest.approx(base[-1] / 4)  # lowest frequency: interpolated
    assert torch.all(yarn <= base + 1e-12) and torch.all(yarn >= base / 4 - 1e-12)


def test_moe_routing_topk_matches_dense_reference():
    a = arch(moe=MoESpec(num_experts=4, top_k=2, num_shared_experts=1, aux_loss_coef=0.01))
    moe = MoE(a)
    torch.manual_seed(0)
    moe.init_weights(0.2, 0.2)
    x = torch.randn(2, 5, 32)
    out, aux = moe(x)
    flat = x.reshape(-1, 32)
    probs = F.softmax(flat @ moe.router.gate.weight.t(), dim=-1)
    ref = torch.zeros_like(flat)
    for t in range(flat.shape[0]):  # token by token: top-2 experts, renormalised weights
        w, idx = probs[t].topk(2)
        w = w / w.sum()
        for wi, e in zip(w, idx, strict=True):
            h = F.silu(flat[t] @ moe.experts.w1[e].t()) * (flat[t] @ moe.experts.w3[e].t())
            ref[t] += wi * (h @ moe.experts.w2[e].t())
    ref += moe.shared_experts(flat)
    torch.testing.assert_close(out.reshape(-1, 32), ref, rtol=1e-5, atol=1e-5)
    # Switch aux: coef * E * sum_e f_e P_e, recomputed from the routing
    _, idx = probs.topk(2, dim=-1)
    f = torch.bincount(idx.flatten(), minlength=4).float() / idx.numel()
    torch.testing.assert_close(aux, 0.01 * 4 * (f * probs.mean(0)).sum())


def test_moe_aux_loss_penalises_collapse():
    a = arch(moe=MoESpec(num_experts=4, top_k=1, aux_loss_coef=1.0))
    moe = MoE(a)
    moe.init_weights(0.02, 0.02)
    x = torch.randn(64, 1, 32)
    with torch.no_grad():
        moe.router.gate.weight.zero_()
        moe.router.gate.weight[2] = 10 * x.reshape(-1, 32).mean(0)  # everything prefers expert 2
    _, collapsed = moe(torch.ones(64, 1, 32) * x.reshape(-1, 32).mean(0))
    assert collapsed.item() > 3.0  # -> E * 1 * 1 = 4 when fully collapsed


def test_sigmoid_router_and_expert_bias_only_change_selection():
    spec = MoESpec(num_experts=4, top_k=2, score_func="sigmoid")
    moe = MoE(arch(moe=spec.model_copy(update={"expert_bias": True})))
    moe.init_weights(0.2, 0.2)
    x = torch.randn(10, 32)
    w0, i0, _ = moe.router(x, moe.expert_bias)
    torch.testing.assert_close(w0.sum(-1), torch.ones(10))
    with torch.no_grad():
        moe.expert_bias[3] = 100.0  # forces expert 3 into every token's top-2
    w1, i1, _ = moe.router(x, moe.expert_bias)
    assert (i1 == 3).any(-1).all()
    scores = torch.sigmoid(moe.router.gate(x))
    torch.testing.assert_close(w1, scores.gather(-1, i1) / scores.gather(-1, i1).sum(-1, keepdim=True))


def test_lm_loss_ignore_index_and_z_loss():
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[0, :2] = -100
    keep = labels != -100
    ce = F.cross_entropy(logits[keep], labels[keep])
    torch.testing.assert_close(lm_loss(logits, labels), ce)
    z = (torch.logsumexp(logits[keep], -1) ** 2).mean()
    torch.testing.assert_close(lm_loss(logits, labels, z_loss=1e-3), ce + 1e-3 * z)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [7, 16])  # 7 leaves a shorter last slice
def test_sliced_loss_equals_whole_loss_and_gradients(tied, chunk):
    """The loss in slices (each recomputed in the backward) is the loss of the whole logits, with the same gradients,
    ignored targets and z-loss included; checked against F.cross_entropy on the logits of a plain forward."""
    a = arch(tied_embeddings=tied)
    whole, sliced = build_model(a, seed=3), build_model(a, seed=3)
    tok = torch.randint(0, 97, (2, 17))
    x, y = tok[:, :-1], tok[:, 1:].clone()
    y[0, :5] = -100
    logits = whole(x)
    keep = y != -100
    ref = F.cross_entropy(logits[keep], y[keep]) + 1e-3 * (torch.logsumexp(logits[keep], -1) ** 2).mean()
    ref.backward()
    got = mean_token_loss(sliced(x, targets=y, loss_chunk=chunk, lse=True), y, 1e-3)
    got.backward()
    torch.testing.assert_close(got, ref)
    for (n, p), (_, q) in zip(whole.named_parameters(), sliced.named_parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, msg=n, rtol=1e-5, atol=1e-7)
    nll = sliced(x, targets=y, loss_chunk=chunk).nll
    assert nll.shape == y.shape and bool((nll[~keep] == 0).all())


def test_sliced_loss_keeps_no_logits_for_the_backward():
    """What autograd saves for the backward (torch.autograd.graph.saved_tensors_hooks): the whole loss keeps tensors
    of the batch's logits size (B*T*V fp32); in slices nothing vocabulary-sized but the head's weight is kept, so the
    logits exist one slice at a time (the memory model's ``loss_chunk_tokens`` term)."""
    a = arch(d_model=32, vocab_size=4099)  # a vocabulary far from every other dimension
    m = build_model(a, seed=0)
    tok = torch.randint(0, a.vocab_size, (2, 33))
    x, y = tok[:, :-1], tok[:, 1:]
    params = {p.data_ptr() for p in m.parameters()}

    def vocab_sized_saved(**kw) -> int:
        sizes = []

        def pack(t):
            if a.vocab_size in t.shape and t.data_ptr() not in params:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            mean_token_loss(m(x, targets=y, **kw), y).backward()
        return sum(sizes)

    assert vocab_sized_saved() >= x.numel() * a.vocab_size  # the whole logits (and more) are kept
    assert vocab_sized_saved(loss_chunk=8) == 0


def test_meta_build_then_init_equals_direct_build():
    a = arch(moe=MoESpec(num_experts=3, top_k=1, dense_layers=1), tied_embeddings=True)
    direct = build_model(a, seed=7)
    with torch.device("meta"):
        m = Transformer(a)
    assert all(p.is_meta for p in m.parameters())
    m.to_empty(device="cpu")
    torch.manual_seed(7)
    m.init_weights()
    for (n, p), (_, q) in zip(direct.state_dict().items(), m.state_dict().items(), strict=True):
        torch.testing.assert_close(p, q, msg=n)
    torch.testing.assert_close(direct.rope, m.rope)


def test_init_weights_depth_scaling():
    m = build_model(arch(n_layers=4, d_model=64, n_heads=4, n_kv_heads=4, d_ff=256), seed=0)
    s0 = m.layers["0"].attention.wo.weight.std().item()
    s3 = m.layers["3"].attention.wo.weight.std().item()
    assert s0 == pytest.approx(0.02 / math.sqrt(2), rel=0.1)
    assert s3 == pytest.approx(0.02 / math.sqrt(8), rel=0.1)
    assert m.lm_head.weight.std().item() == pytest.approx(64**-0.5, rel=0.1)


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_same_gradients(mode):
    a = arch(moe=MoESpec(num_experts=2, top_k=1, dense_layers=1))
    ref, ac = build_model(a, seed=0), build_model(a, seed=0)
    ac.set_ac(mode)
    tok = torch.randint(0, 97, (2, 16))
    for m in (ref, ac):
        m.train()
        m.loss(tok[:, :-1], tok[:, 1:]).backward()
    for (n, p), (_, q) in zip(ref.named_parameters(), ac.named_parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, msg=n, rtol=1e-5, atol=1e-6)


def test_generate_greedy_extends():
    m = build_model(arch(), seed=0)
    out = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4)
    assert out.shape == (1, 7) and out[0, :3].tolist() == [1, 2, 3]


def _deepseek_v3_gate(logits, bias, top_k, n_group, topk_group, scale):
    """MoEGate.forward of https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/modeling_deepseek.py
    (topk_method noaux_tc, scoring sigmoid, norm_topk_prob), transcribed token by token in plain Python."""
    N, E = len(logits), len(logits[0])
    per = E // n_group
    ids, ws = [], []
    for t in range(N):
        s = [1 / (1 + math.exp(-float(v))) for v in logits[t]]
        choice = [s[e] + float(bias[e]) for e in range(E)]
        gscore = [sum(sorted(choice[g * per:(g + 1) * per], reverse=True)[:2]) for g in range(n_group)]
        keep = sorted(range(n_group), key=lambda g: -gscore[g])[:topk_group]
        masked = [choice[e] if e // per in keep else 0.0 for e in range(E)]
        top = sorted(range(E), key=lambda e: -masked[e])[:top_k]
        w = [s[e] for e in top]
        den = sum(w) + 1e-20
        ids.append(top)
        ws.append([x / den * scale for x in w])
    return ids, ws


def test_deepseek_v3_group_limited_routing_matches_reference_gate():
    spec = MoESpec(num_experts=8, top_k=2, score_func="sigmoid", expert_bias=True, aux_loss_coef=0.0,
                   route_scale=2.5, n_expert_groups=4, n_limited_groups=2)
    moe = MoE(arch(moe=spec))
    moe.init_weights(0.5, 0.2)
    torch.manual_seed(3)
    with torch.no_grad():
        moe.expert_bias.copy_(torch.randn(8) * 0.3)
    x = torch.randn(40, 32)
    w, idx, _ = moe.router(x, moe.expert_bias)
    ref_ids, ref_w = _deepseek_v3_gate((x @ moe.router.gate.weight.t()).tolist(), moe.expert_bias.tolist(),
                                       2, 4, 2, 2.5)
    for t in range(40):
        got = dict(zip(idx[t].tolist(), w[t].tolist(), strict=True))
        want = dict(zip(ref_ids[t], ref_w[t], strict=True))
        assert got.keys() == want.keys(), t
        for e in want:
            assert got[e] == pytest.approx(want[e], rel=1e-5)
    assert torch.allclose(w.sum(-1), torch.full((40,), 2.5))  # normalised, then x route_scale
    # the group limit binds: without it some tokens would pick an expert from a dropped group
    free = MoE(arch(moe=spec.model_copy(update={"n_expert_groups": None, "n_limited_groups": None})))
    free.load_state_dict(moe.state_dict())
    assert not torch.equal(free.router(x, free.expert_bias)[1].sort(-1).values, idx.sort(-1).values)
    # the layer's output mixes the experts with these weights
    out, _ = moe(x[None])
    ref = torch.zeros_like(x)
    for t in range(40):
        for e, wi in zip(ref_ids[t], ref_w[t], strict=True):
            ref[t] += wi * moe.experts.expert(e, x[t:t + 1])[0]
    if moe.shared_experts is not None:
        ref += moe.shared_experts(x)
    torch.testing.assert_close(out[0], ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("extra", [{"nope_layers": (1,)},
                                   {"qk_norm": True, "qk_norm_scope": "projection", "norm_placement": "post",
                                    "sliding_window": 5, "full_attention_layers": (1,),
                                    "rope_scaling": RopeScaling(type="yarn", factor=2.0, original_max_position=32)},
                                   {"qk_norm": True, "norm_placement": "sandwich", "norm_unit_offset": True,
                                    "activation": "gelu_tanh", "embedding_scale": True, "sliding_window": 5,
                                    "full_attention_layers": (1,), "sliding_rope_theta": 100.0,
                                    "query_pre_attn_scalar": 10},
                                   {"norm_placement": "sandwich", "norm_unit_offset": True, "activation": "gelu_tanh",
                                    "embedding_scale": True, "sliding_window": 5, "full_attention_layers": (1,),
                                    "attn_logit_softcap": 0.05, "final_logit_softcap": 0.5}],
                         ids=["smollm3-nope", "olmo2-block-olmo3-layer-kinds", "gemma3-block", "gemma2-softcaps"])
def test_compiled_blocks_equal_eager_for_nope_and_olmo2(extra):
    """``training.compile`` compiles each block: a NoPE layer (no rotation), OLMo 2's block (norms on the branch
    outputs, q / k norms over the whole projections) with OLMo 3's layer kinds (a windowed layer with unscaled RoPE, a
    full one with YaRN), Gemma 3's block and Gemma 2's soft-capped scores and logits give the eager model's logits and
    gradients."""
    arch = Architecture(name="t", n_layers=2, d_model=48, n_heads=6, n_kv_heads=2, d_ff=96, vocab_size=100,
                        max_seq_len=64, **extra)
    eager, compiled = build_model(arch, seed=0), build_model(arch, seed=0)
    compiled.compile_blocks()
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    out, ref = compiled(tokens), eager(tokens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    for (n, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-4, msg=n)


def test_soft_capped_attention_holds_the_masks_the_memory_model_counts():
    """Soft-capped attention (no fused kernel) adds its masks itself: the window's band for the windowed layers and
    the causal square for the full ones, each built once per shape and shared (functools cache) -- the two (s, s)
    tensors llmc.compiler.memory.window_mask_bytes charges; without windowed layers, the causal one only."""
    from llmc.compiler.memory import window_mask_bytes
    from llmc.runtime.model import _window_mask

    gemma2 = dict(norm_placement="sandwich", norm_unit_offset=True, activation="gelu_tanh", embedding_scale=True,
                  attn_logit_softcap=50.0, final_logit_softcap=30.0)
    T = 17
    for extra, masks in (({"sliding_window": 5, "full_attention_layers": (1,)}, 2), ({}, 1)):
        arch = Architecture(name="t", n_layers=3, d_model=48, n_heads=6, n_kv_heads=2, d_ff=96, vocab_size=100,
                            max_seq_len=64, **gemma2, **extra)
        model = build_model(arch, seed=0)
        _window_mask.cache_clear()
        model(torch.randint(0, 100, (2, T), generator=torch.Generator().manual_seed(0)))
        assert _window_mask.cache_info().misses == masks  # one tensor per mask, shared by the layers
        assert window_mask_bytes(arch, T, 4.0) == masks * T * T * 4.0


def test_sliding_window_mask_is_one_tensor_for_every_layer_also_compiled():
    """The band mask of a sliding window is built once per shape, outside torch.compile's graphs, and handed to every
    layer (the memory model counts one seq_len^2 mask, llmc.compiler.memory.window_mask_bytes); each query sees only
    the last W positions, compiled or not (the compiled blocks give the eager model's logits and gradients)."""
    from llmc.runtime.model import _window_mask, window_mask

    arch = Architecture(name="t", n_layers=3, d_model=48, n_heads=6, n_kv_heads=2, d_ff=96, vocab_size=100,
                        max_seq_len=64, sliding_window=5)
    band = window_mask(4, 9, 3, torch.device("cpu"), torch.bool)  # the last 4 of 9 positions, window 3, by hand
    assert band.int().tolist() == [[0, 0, 0, 1, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 1, 1, 0, 0],
                                   [0, 0, 0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 1, 1, 1]]
    eager, compiled = build_model(arch, seed=0), build_model(arch, seed=0)
    compiled.compile_blocks()
    tokens = torch.randint(0, 100, (2, 17), generator=torch.Generator().manual_seed(0))
    _window_mask.cache_clear()
    out = compiled(tokens)
    assert _window_mask.cache_info()[:2] == (2, 1)  # (hits, misses): three layers, one mask
    ref = eager(tokens)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(compiled.tok_embeddings.weight.grad, eager.tok_embeddings.weight.grad, rtol=1e-4,
                               atol=1e-4)
