"""One readable Llama-style decoder built from an :class:`~llmc.spec.model.Architecture`.

RMSNorm, RoPE (theta + llama3 / yarn / linear scaling), GQA attention or DeepSeek MLA, SwiGLU FFN,
optional MoE (top-k softmax/sigmoid router, stacked ``[E, ...]`` experts, shared experts, Switch
load-balancing aux loss); gpt-oss's block (attention sinks, o_proj bias, biased clamped-SwiGLU experts). Parameter names follow torchtitan so state dicts line up with torchtitan
checkpoints and with the compiler's ``param_breakdown`` keys::

    tok_embeddings.weight
    layers.{i}.attention_norm.weight, layers.{i}.ffn_norm.weight   (OLMo 2: on the branches' outputs)
    layers.{i}.post_attention_norm.weight, layers.{i}.post_ffn_norm.weight   (Gemma 3: on the outputs too)
    layers.{i}.attention.{wq,wk,wv,wo}.weight           (GQA; q/k/v biases when qkv_bias)
    layers.{i}.attention.{q_norm,k_norm}.weight         (GQA with qk_norm: Qwen3 per head, OLMo 2 per projection)
    layers.{i}.attention.wo.bias, layers.{i}.attention.sinks   (gpt-oss: attn_out_bias, attn_sinks)
    layers.{i}.attention.{wq_a,q_norm,wq_b | wq, wkv_a,kv_norm,wkv_b,wo}   (MLA)
    layers.{i}.feed_forward.{w1,w2,w3}.weight            (dense layers)
    layers.{i}.moe.router.gate.weight, layers.{i}.moe.experts.{w1,w2,w3},
    layers.{i}.moe.shared_experts.{w1,w2,w3}.weight      (MoE layers)
    layers.{i}.moe.router.gate.bias, layers.{i}.moe.experts.{b1,b3,b2}   (gpt-oss: router_bias, expert_proj_bias)
    norm.weight, lm_head.weight                          (lm_head absent when tied)

Shapes in comments: B batch, T sequence, D d_model, H query heads, K kv heads, hd head dim,
E experts, N = B*T tokens, k = top_k.

Usage::

    model = Transformer(arch)                 # or: with torch.device("meta"): Transformer(arch)
    model.init_weights(job.init)              # (after .to_empty(device=...) when built on meta; None: the default)
    logits, aux = model(tokens, return_aux=True)
    loss = lm_loss(logits, labels, z_loss=1e-4) + aux
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from llmc.rope import mla_softmax_factor, rope_attention_factor
from llmc.rope import rope_inv_freq as rope_inv_freq_values
from llmc.runtime.chat import IGNORE_INDEX
from llmc.runtime.job import check_ac
from llmc.spec.model import Architecture, RopeScaling
from llmc.weight_init import TRUNCATION_SIGMAS, InitScheme, init_scheme


def _normal_(w: torch.Tensor, std: float, cut: float | None) -> None:
    """``w`` ~ N(0, std^2) in place, truncated at +-``cut`` x std (None: not truncated), the draws of
    ``nn.init.trunc_normal_`` / ``nn.init.normal_`` (the one initialiser of :meth:`Transformer.init_weights`; the
    scheme's numbers: :mod:`llmc.weight_init`)."""
    if cut is None:
        nn.init.normal_(w, std=std)
    else:
        nn.init.trunc_normal_(w, std=std, a=-cut * std, b=cut * std)


# ----------------------------------------------------------------------------- norms and RoPE


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight (Zhang & Sennrich 2019), computed in fp32. ``unit_offset`` (Gemma):
    y = x / sqrt(mean(x^2) + eps) * (1 + weight), the weight starting at 0, computed in fp32 and cast back as
    transformers' ``Gemma3RMSNorm`` does (its input is kept in fp32 for the backward:
    llmc.compiler.memory counts it so)."""

    def __init__(self, dim: int, eps: float = 1e-5, unit_offset: bool = False):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.unit_offset:
            return F.rms_norm(x.float(), (x.shape[-1],), 1.0 + self.weight.float(), eps=self.eps).to(x.dtype)
        # one fused op with the weight, as torch.nn.RMSNorm (torchtitan's norm): it computes in fp32 and saves
        # only x and the fp32 rstd for the backward. Upcasting x first (x.float()) saved an fp32 copy of x plus the
        # normalised output for the weight's product: 8 extra bytes per element of the two norms of a block
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        return F.rms_norm(x, (x.shape[-1],), w, eps=self.eps)

    def reset_parameters(self) -> None:
        (nn.init.zeros_ if self.unit_offset else nn.init.ones_)(self.weight)


def norm_for(arch: Architecture, dim: int) -> RMSNorm:
    """The model's RMSNorm over ``dim`` features (its epsilon; Gemma's 1 + weight)."""
    return RMSNorm(dim, arch.norm_eps, arch.norm_unit_offset)


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None, long: bool = False
                  ) -> tuple[torch.Tensor, float]:
    """Inverse frequencies theta^(-2i/dim), i < dim/2, after optional scaling (:func:`llmc.rope.rope_inv_freq`, the
    one definition of the llama3 / yarn / linear / longrope rules, which the compiler's RoPE checks compare too), as
    a float32 tensor; returns (inv_freq, mscale): cos/sin are scaled by the attention factor of yarn and longrope
    (:func:`llmc.rope.rope_attention_factor`)."""
    inv_freq = torch.tensor(rope_inv_freq_values(dim, theta, scaling, long), dtype=torch.float64)
    mscale = rope_attention_factor(scaling) if scaling is not None and scaling.type in ("yarn", "longrope") else 1.0
    return inv_freq.float(), mscale


def rope_tables(dim: int, max_len: int, theta: float, scaling: RopeScaling | None, long: bool = False
                ) -> torch.Tensor:
    """(max_len, dim/2, 2) table of (cos, sin) for positions 0..max_len-1 (``long``: longrope's long factors)."""
    inv_freq, mscale = rope_inv_freq(dim, theta, scaling, long)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, dim/2)
    return torch.stack([angles.cos() * mscale, angles.sin() * mscale], dim=-1)


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) by angle pos*inv_freq[i] (Meta/torchtitan interleaved layout).

    x: (B, T, h, dim); rope: (T, dim/2, 2) of (cos, sin), or (B, T, dim/2, 2) with each row's own positions (a
    left-padded sampling batch, :class:`KVCache` ``pad``). The same numbers as Meta's complex
    ``apply_rotary_emb`` (view_as_complex(x) * (cos + i sin)), written with real cos/sin so that
    torch.compile and bf16 kernels see plain elementwise ops: (a, b) -> (a cos - b sin, a sin + b cos), in fp32.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, h, dim/2, 2)
    a, b = xf[..., 0], xf[..., 1]
    r = rope[None, :, None] if rope.dim() == 3 else rope[:, :, None]  # (1 or B, T, 1, dim/2, 2)
    cos, sin = r[..., 0], r[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------- attention


def _sdpa_gqa_ok(q: torch.Tensor) -> bool:
    """SDPA's ``enable_gqa`` has a fused kernel only in the FlashAttention backend (CUDA, fp16/bf16, head dim
    <= 256); elsewhere it falls back to the math backend, slower than expanding K/V first
    (pytorch/pytorch#139586; transformers ``use_gqa_in_sdpa``)."""
    return (q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256
            and torch.backends.cuda.flash_sdp_enabled())


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
          causal: bool = True, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention core. q: (B, H, T, dq); k: (B, K, S, dq); v: (B, K, S, dv) -> (B, H, T, dv); causal (S = T), or
    ``causal=False`` for one query position that sees every key (a decoding step against a KV cache); ``mask``
    (B, 1, T, S), True = attend, replaces both (a left-padded sampling batch, :class:`KVCache`).

    K < H (grouped-query): each kv head serves H/K consecutive query heads. Where the flash kernel runs,
    through SDPA's own GQA path (``enable_gqa``, torch >= 2.5, no K/V copies); otherwise K/V are expanded
    with ``repeat_interleave`` first (same numbers)."""
    rep = q.shape[1] // k.shape[1]
    kw = {"is_causal": causal} if mask is None else {"attn_mask": mask}
    if rep == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)
    if _sdpa_gqa_ok(q):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True, **kw)
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, scale=scale, **kw)


class KVCache:
    """Keys and values of the positions seen so far, per layer, for sampling: ``model(prompt, cache=c)`` fills it
    (and returns the last position's logits), then ``model(next_tokens[:, None], cache=c)`` runs one position per
    call against it. Keys are stored after RoPE. A plain object (not a pytree), so FSDP2's input casting leaves it
    alone.

    ``pad`` (B,): left padding per row, for a batch of prompts of different lengths (the sampler's several groups
    in one batch): row b's first ``pad[b]`` positions are no token; its real positions count from 0 (RoPE) and no
    query attends to a padding key (``mask``, set by :meth:`Transformer.forward` for each call)."""

    def __init__(self, pad: torch.Tensor | None = None) -> None:
        self.length = 0  # positions cached (the next position's index)
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pad = pad
        self.mask: torch.Tensor | None = None  # (B, 1, T, S) of the current call when ``pad`` is set

    def extend(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``k``, ``v`` (B, T, heads, dim) of ``layer``; returns everything cached for it."""
        if layer in self.layers:
            k0, v0 = self.layers[layer]
            k, v = torch.cat([k0, k], dim=1), torch.cat([v0, v], dim=1)
        self.layers[layer] = (k, v)
        return k, v


@functools.lru_cache(maxsize=4)
def _window_mask(T: int, S: int, window: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(T, S) sliding-window causal mask of the last T of S positions: the query at position i (S - T <= i < S) sees
    the keys at positions i - window + 1 .. i (Jiang et al. 2023, arXiv:2310.06825 sec. 2; transformers'
    ``sliding_window_overlay``: kv_idx > q_idx - sliding_window). ``torch.bool``: True = attend; a float dtype: the
    additive form (0 / -inf), which SDPA uses as it is rather than converting a boolean mask in every layer, so one
    tensor, shared by the layers and kept once for the backward (llmc.compiler.memory.window_mask_bytes), serves them
    all. Cached per shape: every micro-batch of a run has the same."""
    q = torch.arange(S - T, S, device=device)[:, None]
    keys = torch.arange(S, device=device)[None, :]
    band = (keys <= q) & (keys > q - window)
    if dtype == torch.bool:
        return band
    return torch.zeros(T, S, device=device, dtype=dtype).masked_fill_(~band, float("-inf"))


# built eagerly and cached, also inside torch.compile'd blocks (a graph break, not a mask per layer):
# Transformer.compile_blocks rebinds this to torch.compiler.disable(_window_mask) before it compiles, since wrapping
# it here would import torch._dynamo (~1.5 s of CPU) in every process, also those that never compile
window_mask = _window_mask


def _eager_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None, causal: bool,
                     mask: torch.Tensor | None, cap: float | None = None,
                     sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Attention with its scores computed, as transformers' eager attention does: with soft-capped scores (Gemma 2,
    arXiv:2408.00118 sec. 2; modeling_gemma2.py ``eager_attention_forward``): scores = q k^T x scale, then
    cap x tanh(scores / cap), the mask added, softmax in fp32, cast back; with attention ``sinks`` (H,) (gpt-oss,
    modeling_gpt_oss.py ``eager_attention_forward``): each head's sink logit joins the masked scores as one more
    column of the softmax, which is dropped after it (p_j = exp(s_j) / (exp(sink) + sum_k exp(s_k))). q: (B, H, T, d);
    k, v: (B, K, S, d) (K < H: expanded first). No fused kernel takes a soft-cap or a sink, so the scores exist:
    autograd keeps tanh's output (soft-capped), the fp32 softmax and its cast per score
    (llmc.compiler.memory.eager_score_bytes). ``causal`` (S = T) without a ``mask``: :func:`window_mask`'s band as
    wide as the sequence, i.e. the causal mask (one cached tensor)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if cap is not None:
        s = torch.tanh(s / cap) * cap
    T, S = q.shape[2], k.shape[2]
    if mask is None and causal:
        mask = window_mask(T, S, S, q.device, s.dtype)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask
    if sinks is None:
        return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)
    B, H = s.shape[0], s.shape[1]
    s = torch.cat([s, sinks.to(s.dtype).view(1, H, 1, 1).expand(B, H, T, 1)], dim=-1)  # (B, H, T, S + 1)
    return torch.matmul(torch.softmax(s, dim=-1, dtype=torch.float32)[..., :-1].to(q.dtype), v)


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    """A parameter as this rank's tensor: a DTensor's local shard (TP-sharded attention sinks), else itself."""
    return t.to_local() if t is not None and hasattr(t, "to_local") else t


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache | None, layer: int,
            scale: float | None = None, window: int | None = None, softcap: float | None = None,
            sinks: torch.Tensor | None = None) -> torch.Tensor:
    """(B, T, h, d) roped q / k / v -> (B, H, T, dv): causal over the T positions, or, with a ``cache`` that holds
    earlier positions, one new position (T = 1) against all of them; with a sliding ``window`` each query sees only
    the last ``window`` positions up to itself (:func:`window_mask`, where there are more keys than that); with a
    ``softcap`` or attention ``sinks`` (H,), computed as transformers' eager attention (:func:`_eager_attention`)."""
    if cache is not None:
        k, v = cache.extend(layer, k, v)
        if k.shape[1] != q.shape[1] and q.shape[1] != 1:
            raise ValueError("a KV cache takes the whole prompt first, then one position per call")
    mask = cache.mask if cache is not None else None
    T, S = q.shape[1], k.shape[1]
    if window is not None and S > window:
        if mask is not None:  # a padded sampling batch (bool): its real-key mask and the band
            mask = mask & window_mask(T, S, window, q.device, torch.bool)
        else:
            mask = window_mask(T, S, window, q.device, q.dtype)
    if softcap is not None or sinks is not None:
        if sinks is not None and sinks.shape[0] != q.shape[2]:  # (TP: llmc.runtime.distributed shards them by head)
            raise ValueError(f"attention sinks for {sinks.shape[0]} heads, {q.shape[2]} query heads here")
        return _eager_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, S == T, mask,
                                cap=softcap, sinks=sinks)
    return _sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale=scale,
                 causal=S == T, mask=mask)


class Attention(nn.Module):
    """Grouped-query attention (Ainslie et al. 2023): K kv heads shared by H/K query heads each. With
    ``qk_norm`` (Qwen3, arXiv:2505.09388 §2) every query and key head passes an RMSNorm over its head dim (one
    weight shared by all heads) before RoPE, as HF ``Qwen3Attention`` and torchtitan's ``qk_norm`` do."""

    def __init__(self, arch: Architecture, rope: bool = True, window: int | None = None):
        super().__init__()
        d, hd = arch.d_model, arch.hd
        self.head_dim = hd
        # False: a NoPE layer (SmolLM3's every 4th, HF SmolLM3Attention's use_rope 0): q and k carry no position
        self.use_rope = rope
        self.wq = nn.Linear(d, arch.n_heads * hd, bias=arch.qkv_bias)
        self.wk = nn.Linear(d, arch.kv_heads * hd, bias=arch.qkv_bias)
        self.wv = nn.Linear(d, arch.kv_heads * hd, bias=arch.qkv_bias)
        self.wo = nn.Linear(arch.n_heads * hd, d, bias=arch.attn_out_bias)  # gpt-oss: o_proj biased too
        # gpt-oss: one learned sink logit per query head in every softmax (transformers' GptOssAttention.sinks)
        self.sinks = nn.Parameter(torch.zeros(arch.n_heads)) if arch.attn_sinks else None
        # None, "head" (Qwen3: per head) or "projection" (OLMo 2: over the whole q / k output, before the head split)
        self.qk_norm = arch.qk_norm_scope if arch.qk_norm else None
        if self.qk_norm == "projection":
            self.q_norm = norm_for(arch, arch.n_heads * hd)
            self.k_norm = norm_for(arch, arch.kv_heads * hd)
        elif self.qk_norm == "head":
            self.q_norm, self.k_norm = norm_for(arch, hd), norm_for(arch, hd)
        # partial RoPE (Phi-4-mini): only the first rotary_dim dims of each head rotate, as HF Phi3Attention's q_rot
        self.rotary = arch.partial_rotary
        # Granite's softmax scale (attention_multiplier), Gemma's query_pre_attn_scalar^-0.5; None = 1/sqrt(head_dim)
        self.scale = (arch.multipliers.attention if arch.multipliers is not None
                      else arch.query_pre_attn_scalar ** -0.5 if arch.query_pre_attn_scalar else None)
        self.window = window  # None: full causal attention (the layer's own: Architecture.layer_window)
        self.softcap = arch.attn_logit_softcap  # Gemma 2: scores capped by cap x tanh(score / cap)
        self.checkpoint_core = False  # selective activation checkpointing (see Transformer.set_ac)

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        B, T, _ = x.shape
        q, k = self.wq(x), self.wk(x)  # (B, T, H*hd), (B, T, K*hd)
        if self.qk_norm == "projection":
            q, k = self.q_norm(q), self.k_norm(k)
        # -1 instead of H/K: under tensor parallelism each rank holds H/tp, K/tp heads
        q = q.view(B, T, -1, self.head_dim)  # (B, T, H, hd)
        k = k.view(B, T, -1, self.head_dim)  # (B, T, K, hd)
        v = self.wv(x).view(B, T, -1, self.head_dim)  # (B, T, K, hd)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            out = self._core(q, k, v, rope, cache, layer)
        elif self.checkpoint_core and self.training:
            out = checkpoint(self._core, q, k, v, rope, use_reentrant=False)
        else:
            out = self._core(q, k, v, rope)
        return self.wo(out)

    def _core(self, q, k, v, rope, cache=None, layer=0):  # -> (B, T, H*hd)
        B, T, H, _ = q.shape
        if self.use_rope and self.rotary is None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        elif self.use_rope:
            r = self.rotary
            q = torch.cat([apply_rope(q[..., :r], rope), q[..., r:]], dim=-1)
            k = torch.cat([apply_rope(k[..., :r], rope), k[..., r:]], dim=-1)
        out = _attend(q, k, v, cache, layer, scale=self.scale, window=self.window,
                      softcap=self.softcap, sinks=_local(self.sinks))  # (B, H, T, hd); k, v keep K heads
        return out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)

    def init_weights(self, std: float, out_std: float, cut: float = TRUNCATION_SIGMAS) -> None:
        for lin in (self.wq, self.wk, self.wv):
            _normal_(lin.weight, std, cut)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)
        _normal_(self.wo.weight, out_std, cut)
        if self.wo.bias is not None:
            nn.init.zeros_(self.wo.bias)
        if self.sinks is not None:  # 0: each head's sink starts as one more key scoring 0
            nn.init.zeros_(self.sinks)
        if self.qk_norm:
            self.q_norm.reset_parameters()
            self.k_norm.reset_parameters()


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention: low-rank q and joint low-rank kv, decoupled RoPE dims.

    q = wq_b(q_norm(wq_a(x))) (or wq(x)) split into [nope | rope] per head; wkv_a(x) gives the kv latent
    (kv_lora) plus one shared rope key (rope dims); wkv_b expands the normed latent into per-head
    [k_nope | v]. Softmax scale 1/sqrt(nope + rope), times m(mscale_all_dim)^2 under a YaRN
    with ``mscale_all_dim`` (DeepSeek-V2 / V3; transformers' ``DeepseekV3Attention``); the rope dims' cos/sin carry
    the YaRN attention factor (:func:`rope_inv_freq`, 1 when mscale equals mscale_all_dim).
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        m = arch.mla
        assert m is not None
        d, H = arch.d_model, arch.n_heads
        self.nope, self.rope_dim, self.v_dim = m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim
        self.kv_lora = m.kv_lora_rank
        qk = self.nope + self.rope_dim
        if m.q_lora_rank is None:
            self.wq = nn.Linear(d, H * qk, bias=False)
        else:
            self.wq_a = nn.Linear(d, m.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(m.q_lora_rank, arch.norm_eps)
            self.wq_b = nn.Linear(m.q_lora_rank, H * qk, bias=False)
        self.wkv_a = nn.Linear(d, self.kv_lora + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(self.kv_lora, arch.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, d, bias=False)
        self.scale = qk**-0.5 * mla_softmax_factor(arch.rope_scaling)
        self.checkpoint_core = False

    def forward(self, x: torch.Tensor, rope: torch.Tensor, cache: KVCache | None = None,
                layer: int = 0) -> torch.Tensor:  # (B, T, D) -> (B, T, D)
        B, T, _ = x.shape
        q = self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(B, T, -1, self.nope + self.rope_dim)  # (B, T, H, nope+rope)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora, self.rope_dim], dim=-1)  # (B,T,kv_lora), (B,T,rope)
        kv = self.wkv_b(self.kv_norm(kv)).view(B, T, -1, self.nope + self.v_dim)  # (B, T, H, nope+v)
        args = (q, kv, k_pe, rope)
        if cache is not None:
            out = self._core(*args, cache, layer)
        elif self.checkpoint_core and self.training:
            out = checkpoint(self._core, *args, use_reentrant=False)
        else:
            out = self._core(*args)
        return self.wo(out)

    def _core(self, q, kv, k_pe, rope, cache=None, layer=0):  # -> (B, T, H*v)
        B, T, H, _ = q.shape
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        q = torch.cat([q_nope, apply_rope(q_pe, rope)], dim=-1)  # (B, T, H, nope+rope)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, T, H, nope), (B, T, H, v)
        k_pe = apply_rope(k_pe.unsqueeze(2), rope).expand(-1, -1, H, -1)  # (B, T, H, rope) shared by heads
        k = torch.cat([k_nope, k_pe], dim=-1)  # (B, T, H, nope+rope)
        out = _attend(q, k, v, cache, layer, scale=self.scale)  # (B, H, T, v)
        return out.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*v)

    def init_weights(self, std: float, out_std: float, cut: float = TRUNCATION_SIGMAS) -> None:
        for name in ("wq", "wq_a", "wq_b", "wkv_a", "wkv_b"):
            if hasattr(self, name):
                _normal_(getattr(self, name).weight, std, cut)
        for name in ("q_norm", "kv_norm"):
            if hasattr(self, name):
                getattr(self, name).reset_parameters()
        _normal_(self.wo.weight, out_std, cut)


# ----------------------------------------------------------------------------- feed-forward and MoE


class FeedForward(nn.Module):
    """SwiGLU (Shazeer 2020): w2(silu(w1 x) * w3 x); ``activation`` gelu_tanh: GeGLU with the tanh-approximated GELU
    (Gemma: transformers' ``gelu_pytorch_tanh``)."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "silu"):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.gelu = activation == "gelu_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., D)
        g = self.w1(x)
        return self.w2((F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)) * self.w3(x))

    def init_weights(self, std: float, out_std: float, cut: float = TRUNCATION_SIGMAS) -> None:
        _normal_(self.w1.weight, std, cut)
        for lin in (self.w2, self.w3):  # torchtitan scales w2 and w3 by depth
            _normal_(lin.weight, out_std, cut)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored as stacked parameters (torchtitan GroupedExperts layout, nn.Linear order).

    w1, w3: (E, hidden, D); w2: (E, D, hidden). The forward is a readable loop over experts.

    gpt-oss (``clamp``: ``activation: swiglu_clamped``; ``bias``: ``moe.expert_proj_bias``): biases b1, b3 (E, hidden),
    b2 (E, D), and the clamped SwiGLU of transformers' ``GptOssExperts._apply_gate``: gate = w1 x + b1 clamped above at
    limit, up = w3 x + b3 clamped to [-limit, limit], w2 ((up + 1) x gate x sigmoid(alpha x gate)) + b2.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, *, bias: bool = False,
                 clamp: tuple[float, float] | None = None):
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        if bias:
            self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim))
            self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
            self.b3 = nn.Parameter(torch.zeros(num_experts, hidden_dim))
        self.bias = bias
        self.clamp = clamp  # (alpha, limit) of gpt-oss's clamped SwiGLU, or None (SwiGLU)

    def expert(self, e: int, x: torch.Tensor,
               adapter: Callable[[str, torch.Tensor], torch.Tensor | None] | None = None) -> torch.Tensor:
        """(n, D) -> (n, D) through expert ``e``; ``adapter(name, input)``: what a LoRA wrapper adds to the product
        ``input @ w_name[e]^T`` (None: nothing), so that each stored matrix is read by a matmul only."""

        def mm(name: str, inp: torch.Tensor) -> torch.Tensor:
            y = inp @ getattr(self, name)[e].t()
            extra = adapter(name, inp) if adapter is not None else None
            return y if extra is None else y + extra

        if self.clamp is None and not self.bias:
            return mm("w2", F.silu(mm("w1", x)) * mm("w3", x))
        gate, up = mm("w1", x), mm("w3", x)
        if self.bias:
            gate, up = gate + self.b1[e], up + self.b3[e]
        if self.clamp is None:
            h = F.silu(gate) * up
        else:
            alpha, limit = self.clamp
            gate, up = gate.clamp(max=limit), up.clamp(min=-limit, max=limit)
            h = (up + 1) * (gate * torch.sigmoid(gate * alpha))
        out = mm("w2", h)
        return out + self.b2[e] if self.bias else out

    def init_weights(self, std: float, out_std: float, cut: float = TRUNCATION_SIGMAS) -> None:
        _normal_(self.w1, std, cut)
        _normal_(self.w2, out_std, cut)
        _normal_(self.w3, out_std, cut)
        if self.bias:
            for b in (self.b1, self.b2, self.b3):
                nn.init.zeros_(b)


class Router(nn.Module):
    """Token-choice top-k router: scores = softmax|sigmoid(gate(x)); top-k weights renormalised to sum 1 (``norm``;
    else the picked scores as they are: HF ``norm_topk_prob`` false), then times ``route_scale``.

    DeepSeek-V3 routing (``MoEGate`` of https://huggingface.co/deepseek-ai/DeepSeek-V3/blob/main/modeling_deepseek.py;
    arXiv:2412.19437 sec. 2.1.2): with ``n_groups`` / ``topk_groups`` the E experts form n_groups equal groups,
    each scored by the sum of its 2 best selection scores; a token picks its top-k experts among the
    topk_groups best groups only (the other experts' selection scores set to 0, as the reference's
    ``masked_fill(..., 0.0)``). The mixing weights are the unbiased scores of the picked experts,
    normalised, then multiplied by ``route_scale`` (``routed_scaling_factor``, 2.5 for V3).

    DeepSeek-V2 / V2.5 routing (``group_score`` "max": device-limited routing, arXiv:2405.04434 sec. 2.2.2;
    ``MoEGate`` of https://huggingface.co/deepseek-ai/DeepSeek-V2/blob/main/modeling_deepseek.py, ``topk_method:
    group_limited_greedy``, and transformers' ``DeepseekV2TopkRouter``): each group is scored by its single best
    softmax score instead, the rest as above (V2: ``route_norm`` false, ``routed_scaling_factor`` 16).
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, score_func: str, bias: bool,
                 route_scale: float = 1.0, n_groups: int | None = None, topk_groups: int | None = None,
                 norm: bool = True, group_score: str = "top2_sum"):
        super().__init__()
        self.gate = nn.Linear(dim, num_experts, bias=bias)
        self.top_k, self.score_func, self.norm = top_k, score_func, norm
        self.route_scale, self.n_groups, self.topk_groups = float(route_scale), n_groups, topk_groups
        self.group_score = group_score

    def forward(self, x: torch.Tensor, expert_bias: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D) -> weights (N, k), expert ids (N, k), probs (N, E) normalised to sum 1 per token.

        expert_bias (E,) shifts only the top-k *selection* (DeepSeek-V3 aux-loss-free balancing);
        the mixing weights come from the unbiased scores."""
        logits = self.gate(x).float()  # (N, E)
        scores = logits.softmax(-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores if expert_bias is None else scores + expert_bias.float()  # (N, E)
        if self.n_groups and self.topk_groups and self.topk_groups < self.n_groups:
            N, E = choice.shape
            grouped = choice.view(N, self.n_groups, E // self.n_groups)  # (N, G, E/G)
            if self.group_score == "max":  # DeepSeek-V2: a group's best expert
                group_scores = grouped.amax(-1)  # (N, G)
            else:  # DeepSeek-V3: the sum of a group's 2 best experts
                group_scores = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # (N, G)
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(self.topk_groups, dim=-1).indices, True)  # (N, G)
            choice = grouped.masked_fill(~keep[..., None], 0.0).view(N, E)
        idx = choice.topk(self.top_k, dim=-1).indices  # (N, k)
        weights = scores.gather(-1, idx)
        if self.norm:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        weights = weights * self.route_scale
        probs = scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        return weights, idx, probs


class MoE(nn.Module):
    """Routed experts + optional always-on shared experts + Switch load-balancing loss (Fedus et al. 2021).

    aux = coef * E * sum_e f_e * P_e, f_e = share of the N*k assignments sent to expert e,
    P_e = mean router probability of e. Equals coef when routing is perfectly balanced.
    """

    def __init__(self, arch: Architecture):
        super().__init__()
        m = arch.moe
        assert m is not None
        hidden = m.expert_d_ff or arch.d_ff
        self.num_experts, self.top_k, self.aux_coef = m.num_experts, m.top_k, m.aux_loss_coef
        self.router = Router(arch.d_model, m.num_experts, m.top_k, m.score_func, m.router_bias,
                             route_scale=m.route_scale, n_groups=m.n_expert_groups, topk_groups=m.n_limited_groups,
                             norm=m.route_norm, group_score=m.group_score)
        self.experts = GroupedExperts(arch.d_model, hidden, m.num_experts, bias=m.expert_proj_bias,
                                      clamp=(arch.swiglu_alpha, arch.swiglu_limit)
                                      if arch.activation == "swiglu_clamped" else None)
        # S shared experts as one SwiGLU of width S*hidden (DeepSeek-V3 / torchtitan); same param count
        self.shared_experts = FeedForward(arch.d_model, hidden * m.num_shared_experts) if m.num_shared_experts else None
        if getattr(m, "expert_bias", False):
            # DeepSeek-V3 e_score_correction_bias: updated by update_expert_bias, never by gradients
            self.expert_bias = nn.Parameter(torch.zeros(m.num_experts), requires_grad=False)
            self.register_buffer("tokens_per_expert", torch.zeros(m.num_experts), persistent=False)
        else:
            self.expert_bias = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # (B,T,D) -> (B,T,D), aux ()
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # (N, D)
        weights, idx, probs = self.router(flat, self.expert_bias)  # (N, k), (N, k), (N, E)
        if self.expert_bias is not None and self.training:
            with torch.no_grad():
                self.tokens_per_expert += torch.bincount(idx.flatten(), minlength=self.num_experts).float()
        out = torch.zeros_like(flat)
        for e in range(self.num_experts):
            tok, slot = (idx == e).nonzero(as_tuple=True)  # tokens routed to e and which of their k slots
            if tok.numel() == 0:
                continue
            y = self.experts.expert(e, flat[tok]) * weights[tok, slot, None].to(flat.dtype)  # (n_e, D)
            out.index_add_(0, tok, y)
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        aux = flat.new_zeros((), dtype=torch.float32)
        if self.aux_coef > 0 and self.training:
            counts = torch.bincount(idx.flatten(), minlength=self.num_experts).float()  # (E,)
            f = counts / idx.numel()
            aux = self.aux_coef * self.num_experts * (f * probs.mean(0)).sum()
        return out.view(B, T, D), aux

    @torch.no_grad()
    def update_expert_bias(self, rate: float = 1e-3) -> None:
        """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_e += rate * sign(mean load - load_e), then reset
        the counts. Call after each optimizer step (all-reduce tokens_per_expert first when data-parallel)."""
        if self.expert_bias is None:
            return
        load = self.tokens_per_expert
        delta = rate * torch.sign(load.mean() - load)  # (E,)
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(self.expert_bias, DTensor):  # sharded by FSDP2
            delta = distribute_tensor(delta, self.expert_bias.device_mesh, self.expert_bias.placements)
        self.expert_bias.add_(delta)
        load.zero_()

    def init_weights(self, std: float, out_std: float, cut: float = TRUNCATION_SIGMAS) -> None:
        if self.expert_bias is not None:
            nn.init.zeros_(self.expert_bias)
            self.tokens_per_expert = torch.zeros(self.num_experts, device=self.router.gate.weight.device)
        _normal_(self.router.gate.weight, std, cut)
        if self.router.gate.bias is not None:
            nn.init.zeros_(self.router.gate.bias)
        self.experts.init_weights(std, out_std, cut)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std, cut)


# ----------------------------------------------------------------------------- blocks and model


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h))."""

    def __init__(self, layer_id: int, arch: Architecture):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = norm_for(arch, arch.d_model)
        self.attention = (MLAttention(arch) if arch.mla is not None
                          else Attention(arch, rope=layer_id not in arch.nope_layers,
                                         window=arch.layer_window(layer_id)))
        # OLMo 3 / Gemma 3: a windowed layer of a model with full-attention layers rotates without the rope_scaling,
        # at sliding_rope_theta (Transformer.rope_local); every other layer takes the model's table
        # (gpt-oss: every layer takes the one table: Architecture.window_rope_apart)
        self.local_rope = arch.window_rope_apart and arch.layer_window(layer_id) is not None
        self.ffn_norm = norm_for(arch, arch.d_model)
        # Gemma: the attention's and the MLP's outputs pass a norm of their own too, before the residual adds
        self.sandwich = arch.norm_placement == "sandwich"
        if self.sandwich:
            self.post_attention_norm, self.post_ffn_norm = norm_for(arch, arch.d_model), norm_for(arch, arch.d_model)
        self.is_moe = arch.moe is not None and layer_id >= arch.moe.dense_layers
        if self.is_moe:
            self.moe = MoE(arch)
        else:
            self.feed_forward = FeedForward(arch.d_model, arch.d_ff, arch.activation)
        # Granite: each branch's output x residual_multiplier before its residual add (1: none)
        self.residual = arch.multipliers.residual if arch.multipliers is not None else 1.0
        # OLMo 2: the two norms on the branches' outputs (a dense block without multipliers: the spec's M013)
        self.post_norm = arch.norm_placement == "post"

    def forward(self, x: torch.Tensor, rope: torch.Tensor,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.post_norm:  # h = x + norm(attention(x)); out = h + norm(mlp(h)) (HF Olmo2DecoderLayer)
            h = x + self.attention_norm(self.attention(x, rope, cache, self.layer_id))
            return h + self.ffn_norm(self.feed_forward(h)), h.new_zeros((), dtype=torch.float32)
        if self.sandwich:  # h = x + norm(attention(norm(x))); out = h + norm(mlp(norm(h))) (HF Gemma3DecoderLayer)
            h = x + self.post_attention_norm(self.attention(self.attention_norm(x), rope, cache, self.layer_id))
            return (h + self.post_ffn_norm(self.feed_forward(self.ffn_norm(h))),
                    h.new_zeros((), dtype=torch.float32))
        a = self.attention(self.attention_norm(x), rope, cache, self.layer_id)  # (B, T, D)
        h = x + (a if self.residual == 1.0 else a * self.residual)
        if self.is_moe:
            y, aux = self.moe(self.ffn_norm(h))
        else:
            y, aux = self.feed_forward(self.ffn_norm(h)), h.new_zeros((), dtype=torch.float32)
        return h + (y if self.residual == 1.0 else y * self.residual), aux

    def init_weights(self, std: float, out_std: float, cut: float = TRUNCATION_SIGMAS) -> None:
        self.attention_norm.reset_parameters()
        self.ffn_norm.reset_parameters()
        if self.sandwich:
            self.post_attention_norm.reset_parameters()
            self.post_ffn_norm.reset_parameters()
        self.attention.init_weights(std, out_std, cut)
        (self.moe if self.is_moe else self.feed_forward).init_weights(std, out_std, cut)


class Transformer(nn.Module):
    """Decoder-only LM. ``forward(tokens) -> logits (B, T, V)``; ``return_aux=True`` adds the MoE aux loss."""

    def __init__(self, arch: Architecture):
        super().__init__()
        self.arch = arch
        self.tok_embeddings = nn.Embedding(arch.vocab_size, arch.d_model)
        # ModuleDict keyed "0".."L-1" (torchtitan) so pipeline/FSDP wrapping keeps stable FQNs
        self.layers = nn.ModuleDict({str(i): TransformerBlock(i, arch) for i in range(arch.n_layers)})
        self.norm = norm_for(arch, arch.d_model)
        if not arch.tied_embeddings:
            self.lm_head = nn.Linear(arch.d_model, arch.vocab_size, bias=False)
        self.rope_dim = arch.mla.qk_rope_head_dim if arch.mla is not None else arch.partial_rotary or arch.hd
        self.register_buffer("rope", self._rope_tables(), persistent=False)  # (max_seq_len, rope_dim/2, 2)
        # longrope: the table of its long factors, used for every position of a sequence longer than the original
        # context (transformers' longrope_frequency_update: max position + 1 > original_max_position_embeddings)
        rs = arch.rope_scaling
        self.long_from = rs.original_max_position if rs is not None and rs.type == "longrope" else None
        self.register_buffer("rope_long", self._rope_tables(True) if self.long_from else None, persistent=False)
        # OLMo 3 / Gemma 3: the windowed layers' table, unscaled at their own base (only where it differs from the
        # full layers')
        self.has_local_rope = arch.window_rope_apart and (
            rs is not None or arch.window_rope_theta != arch.rope_theta)
        self.register_buffer("rope_local", self._local_rope_table() if self.has_local_rope else None,
                             persistent=False)
        self.ac_mode, self.ac_layers = "none", 0  # see set_ac
        mult = arch.multipliers
        self.embed_scale, self.logit_div = (mult.embedding, mult.logits) if mult is not None else (1.0, 1.0)
        # Gemma: embeddings x sqrt(d_model), the factor rounded to the weights' dtype (Gemma3TextScaledWordEmbedding)
        self.embed_sqrt_d = arch.embedding_scale

    def _rope_tables(self, long: bool = False) -> torch.Tensor:
        a = self.arch
        return rope_tables(self.rope_dim, a.max_seq_len, a.rope_theta, a.rope_scaling, long)

    def _local_rope_table(self) -> torch.Tensor:
        a = self.arch
        return rope_tables(self.rope_dim, a.max_seq_len, a.window_rope_theta, None)

    def _rope_for(self, length: int) -> torch.Tensor:
        """The (cos, sin) table for a sequence of ``length`` positions (longrope: the long one past the original)."""
        return self.rope_long if self.long_from is not None and length > self.long_from else self.rope

    def set_ac(self, mode: str, layers: int = 0) -> None:
        """Activation checkpointing. ``full``: recompute each whole block in backward
        (torch.utils.checkpoint, non-reentrant). ``partial`` with ``layers`` = K >= 1: recompute the first K
        blocks of ``self.layers`` whole (as ``full``) and keep every activation of the others (as ``none``);
        Megatron-LM's ``recompute_method="block"`` with ``recompute_num_layers=K``
        (megatron/core/transformer/transformer_block.py, ``_checkpointed_forward``), counted per pipeline model
        chunk: under pipelining a chunk's ``self.layers`` holds only its own blocks. K above the number of
        blocks recomputes them all. ``selective``: recompute only the attention core
        (RoPE + softmax(QK^T)V) of every block, the part Korthikanti et al. 2022 call selective
        recomputation. ``none``: store everything. ``layers`` must be 0 for every mode but ``partial``;
        ValueError otherwise (:func:`llmc.runtime.job.check_ac`)."""
        check_ac(mode, layers)
        self.ac_mode, self.ac_layers = mode, layers
        for blk in self.layers.values():
            blk.attention.checkpoint_core = mode == "selective"

    def _recomputed_blocks(self) -> int:
        """How many blocks, from the first, the forward wraps in torch.utils.checkpoint."""
        if not self.training:
            return 0
        return len(self.layers) if self.ac_mode == "full" else self.ac_layers if self.ac_mode == "partial" else 0

    def compile_blocks(self, **kw) -> None:
        """``torch.compile`` each block in place (``nn.Module.compile``: parameter names unchanged), as
        torchtitan's per-block compile; call after activation checkpointing, before FSDP. The sliding-window
        mask is built eagerly inside the compiled blocks (:data:`window_mask`, rebound here)."""
        global window_mask
        window_mask = torch.compiler.disable(_window_mask)
        for blk in self.layers.values():
            blk.compile(**kw)

    def forward(self, tokens: torch.Tensor, return_aux: bool = False, cache: KVCache | None = None, *,
                targets: torch.Tensor | None = None, loss_chunk: int = 0, lse: bool = False):
        """tokens (B, T) int64 -> logits (B, T, V) [fp32 upcast left to the loss]; aux = summed MoE loss.
        With a :class:`KVCache` (sampling, no gradients): tokens continue the cached positions, and the logits
        are the last position's only, (B, 1, V); a cache with ``pad`` gives each row its own positions and mask.
        With ``targets`` (B, T) (the token each position predicts, IGNORE_INDEX for none): the per-token
        :class:`TokenLosses` instead of the logits (:func:`token_losses`, in slices of ``loss_chunk`` tokens; with
        the log-sum-exp when ``lse``), computed inside the forward so that wrappers (FSDP2, DDP) see one call."""
        T = tokens.shape[1]
        pos = cache.length if cache is not None else 0
        if pos + T > self.rope.shape[0]:
            raise ValueError(f"sequence length {pos + T} exceeds max_seq_len {self.rope.shape[0]}")
        idx: slice | torch.Tensor = slice(pos, pos + T)
        table = self._rope_for(pos + T)
        if cache is not None and cache.pad is not None:
            idx, cache.mask = self._padded(cache.pad.to(tokens.device), pos, T)
            # longrope picks its table by the batch's largest position (a host sync, so only where it matters)
            table = self._rope_for(int(idx.max()) + 1) if self.long_from is not None else self.rope
        rope = table[idx]  # (T, rope_dim/2, 2), or (B, T, rope_dim/2, 2) for a padded batch
        rope_local = self.rope_local[idx] if self.has_local_rope else rope
        h = self.tok_embeddings(tokens)  # (B, T, D)
        if self.embed_scale != 1.0:  # Granite's embedding_multiplier
            h = h * self.embed_scale
        if self.embed_sqrt_d:
            h = h * torch.tensor(self.arch.d_model ** 0.5, dtype=h.dtype)
        aux = h.new_zeros((), dtype=torch.float32)
        n_ckpt = 0 if cache is not None else self._recomputed_blocks()
        for i, blk in enumerate(self.layers.values()):
            r = rope_local if blk.local_rope else rope
            if i < n_ckpt:
                h, a = checkpoint(blk, h, r, use_reentrant=False)
            else:
                h, a = blk(h, r) if cache is None else blk(h, r, cache)
            aux = aux + a
        if cache is not None:
            cache.length += T
            h = h[:, -1:]
        h = self.norm(h)
        if targets is not None:
            out = token_losses(self._head, h, targets, loss_chunk, lse)
        else:
            out = self._head(h)  # (B, T, V)
        return (out, aux) if return_aux else out

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        """The output projection: hidden states (..., D) -> logits (..., V) (a tied head uses the embeddings; Granite
        divides the logits by its logits_scaling; Gemma 2 soft-caps them, cap x tanh(logit / cap), in their dtype as
        transformers' Gemma2ForCausalLM)."""
        out = h @ self.tok_embeddings.weight.t() if self.arch.tied_embeddings else self.lm_head(h)
        cap = self.arch.final_logit_softcap
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out if self.logit_div == 1.0 else out / self.logit_div

    def _padded(self, pad: torch.Tensor, pos: int, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE positions (B, T) and attention mask (B, 1, T, pos + T) of cache positions pos..pos+T-1 in a
        batch whose row b starts with ``pad[b]`` padding positions: a real position counts from the row's first
        token (RoPE scores depend only on q - k, so this keeps the row's numbers those of its prompt alone rather
        than changing them), a query sees the real keys up to itself; a padding query sees only itself (its output
        is never used, and a query with no key at all would give NaN)."""
        q = torch.arange(pos, pos + T, device=pad.device)  # cache index of each query
        keys = torch.arange(pos + T, device=pad.device)
        idx = (q[None, :] - pad[:, None]).clamp(min=0)
        real = keys[None, None, :] >= pad[:, None, None]  # (B, 1, S)
        mask = (real & (keys[None, :] <= q[:, None])[None]) | (keys[None, :] == q[:, None])[None]  # (B, T, S)
        return idx, mask[:, None]

    @torch.no_grad()
    def init_weights(self, init: InitScheme | None = None, buffer_device: torch.device | None = None) -> None:
        """Initialise in place (also after ``to_empty`` from meta) under ``init`` (the lock's ``model.init``,
        :class:`llmc.weight_init.InitScheme`; None: :func:`llmc.weight_init.init_scheme` of the model's
        architecture): torchtitan's depth init, wq/wk/wv/w1 and the router N(0, std); wo/w2/w3
        N(0, std/sqrt(2(layer+1))); norms 1; biases 0; embeddings N(0, embedding_std) (0.02, not torchtitan's 1, so
        tied heads start with small logits); an untied output N(0, output_std = D^-0.5) as torchtitan; every
        truncated normal cut at init.truncation sigmas, the embeddings not truncated."""
        dev = buffer_device or self.tok_embeddings.weight.device
        if dev.type != "meta":
            with torch.device(dev):
                self.rope = self._rope_tables()
                if self.long_from is not None:
                    self.rope_long = self._rope_tables(True)
                if self.has_local_rope:
                    self.rope_local = self._local_rope_table()
        for _, part in self.init_parts(init):
            part()

    def init_parts(self, init: InitScheme | None = None) -> list[tuple[nn.Module, Callable[[], None]]]:
        """(module, initialiser) in the order :meth:`init_weights` runs them, so a sharded build (DeepSpeed
        ZeRO-3: gather one part, initialise it on one rank, re-partition) draws the same random numbers."""
        s = init or init_scheme(self.arch)
        parts: list[tuple[nn.Module, Callable[[], None]]] = [
            (self.tok_embeddings, functools.partial(_normal_, self.tok_embeddings.weight, s.embedding_std,
                                                    s.embedding_truncation))]
        for i, blk in enumerate(self.layers.values()):
            parts.append((blk, functools.partial(blk.init_weights, s.std, s.out_std(i), s.truncation)))
        parts.append((self.norm, self.norm.reset_parameters))
        if not self.arch.tied_embeddings:
            parts.append((self.lm_head, functools.partial(_normal_, self.lm_head.weight, s.head_std, s.head_truncation)))
        return parts

    def loss(self, tokens: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
        """Convenience for single-process use: lm_loss(self(tokens)) + MoE aux. Under DDP call the wrapped
        module and :func:`lm_loss` instead (DDP hooks run only through ``__call__`` of the wrapper)."""
        logits, aux = self(tokens, return_aux=True)
        return lm_loss(logits, labels, z_loss) + aux

    def num_params(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 eos_id: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Plain (no KV cache) sampling: tokens (B, T0) -> (B, T0 + n). temperature 0 = greedy."""
        for _ in range(max_new_tokens):
            ctx = tokens[:, -self.rope.shape[0]:]
            logits = self(ctx)[:, -1].float()  # (B, V)
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
            if eos_id is not None and bool((nxt == eos_id).all()):
                break
        return tokens


class TokenLosses(NamedTuple):
    """Per-token losses of a forward with targets, fp32, shaped like the targets."""

    nll: torch.Tensor  # -log p(target); 0 where the target is IGNORE_INDEX
    lse: torch.Tensor | None  # log-sum-exp of the logits (for the z-loss); None unless asked for


def token_losses(head: Callable[[torch.Tensor], torch.Tensor], h: torch.Tensor, targets: torch.Tensor,
                 chunk: int = 0, lse: bool = False) -> TokenLosses:
    """Cross-entropy of ``head(h)`` (logits, upcast to fp32) against ``targets`` per token.

    ``chunk`` > 0: over slices of ``chunk`` tokens (of the flattened batch), each wrapped in torch.utils.checkpoint
    when gradients are on, so its logits are freed after its loss and recomputed in the backward: one slice's logits
    exist at a time instead of the whole batch's (B x T x V fp32 and their gradient), for the head's forward once more
    (the "chunked cross-entropy" of torchtune / Liger-Kernel, here by recomputation). 0: all tokens at once."""
    flat_h, flat_t = h.reshape(-1, h.shape[-1]), targets.reshape(-1)

    def piece(hs: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        logits = head(hs).float()
        nll = F.cross_entropy(logits, ts, ignore_index=IGNORE_INDEX, reduction="none")
        return torch.stack([nll, torch.logsumexp(logits, -1)]) if lse else nll[None]

    n = flat_t.numel()
    if chunk <= 0 or chunk >= n:
        out = piece(flat_h, flat_t)
    else:
        run = functools.partial(checkpoint, piece, use_reentrant=False) if torch.is_grad_enabled() else piece
        out = torch.cat([run(flat_h[i:i + chunk], flat_t[i:i + chunk]) for i in range(0, n, chunk)], dim=1)
    return TokenLosses(out[0].view(targets.shape), out[1].view(targets.shape) if lse else None)


def loss_terms(losses: TokenLosses, targets: torch.Tensor, z_loss: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy over targets != -100, the z-loss term coef * mean(logsumexp(logits)^2) over the
    same tokens: PaLM, Chowdhery et al. 2022; ``losses`` must then carry ``lse``; a 0 tensor when ``z_loss`` is 0).
    The trainers optimize their sum (plus the MoE aux loss) and log the cross-entropy as ``loss``, the z term apart."""
    mask = targets != IGNORE_INDEX
    ce = losses.nll.sum() / mask.sum()
    z = z_loss * (losses.lse[mask] ** 2).mean() if z_loss > 0 else ce.new_zeros(())
    return ce, z


def mean_token_loss(losses: TokenLosses, targets: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy plus the z-loss term (:func:`loss_terms`)."""
    ce, z = loss_terms(losses, targets, z_loss)
    return ce + z if z_loss > 0 else ce


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, z_loss: float = 0.0) -> torch.Tensor:
    """Mean next-token cross-entropy of ``logits`` over labels != -100 (labels already shifted), in fp32, with the
    z-loss (:func:`mean_token_loss`)."""
    return mean_token_loss(token_losses(lambda x: x, logits, labels, lse=z_loss > 0), labels, z_loss)


# Weight decay (one rule for the native trainer, DeepSpeed, the post-training stages and the torchtitan job), chosen by
# the spec's ``training.optimizer.no_decay`` (the lock's; its docstring in llmc/spec/schema.py names each rule's
# source): the matrices (projections, experts, an untied output head) are always decayed;
# - "embeddings_and_1d" (the default): none on 1-D parameters (norm gains, biases, the MoE expert bias; Megatron-LM's
#   default ``no_weight_decay_cond``: bias or 1-D) and none on the token embeddings (OLMo 2, arXiv:2501.00656: no
#   weight decay on embeddings, one of its training-stability changes; a tied head shares that matrix);
# - "1d": none on the 1-D parameters only (Megatron-LM's default, nanoGPT's ``configure_optimizers``); the token
#   embeddings are decayed;
# - "none": every parameter decayed, in one group (torchtitan 0.3.0's ``default_adamw``: one ``.*`` group).
# gpt-oss's stacked expert biases (``experts.b1`` / ``b3`` / ``b2``, (E, n): biases though 2-D) and attention sinks
# (1-D) count as 1-D (no torchtitan job builds gpt-oss's block: X320, so the patterns need not name them).
# torchtitan 0.3.0 matches ``ParamGroupConfig`` patterns first match wins, so the job lists the rule's pattern
# (``ParamGroupConfig(pattern=..., weight_decay=0)``) before its catch-all ``.*`` group; each pattern names exactly the
# parameters :func:`param_groups` leaves undecayed under its rule (checked in tests against torchtitan's grouping).
NO_DECAY_RULES = ("embeddings_and_1d", "1d", "none")
DEFAULT_NO_DECAY = "embeddings_and_1d"
NO_DECAY_PATTERNS: dict[str, str | None] = {
    "embeddings_and_1d": r"(norm\.weight|\.bias|expert_bias|tok_embeddings\.weight)$",
    "1d": r"(norm\.weight|\.bias|expert_bias)$",
    "none": None,  # no group without decay
}
# the default rule's pattern (the name earlier llmc used)
NO_DECAY_PATTERN = NO_DECAY_PATTERNS[DEFAULT_NO_DECAY]


def param_groups(model: nn.Module, weight_decay: float, no_decay: str = DEFAULT_NO_DECAY) -> list[dict]:
    """AdamW parameter groups under the rule ``no_decay`` (:data:`NO_DECAY_RULES`, the comment above):
    [{decayed, weight_decay}, {not decayed, 0}], empty groups left out ("none": one group of every parameter);
    frozen parameters left out. Names are matched on the module as built (wrappers such as FSDP2 keep them).
    ValueError for an unknown rule."""
    if no_decay not in NO_DECAY_PATTERNS:
        raise ValueError(f"unknown weight-decay rule {no_decay!r} (training.optimizer.no_decay: one of "
                         f"{', '.join(NO_DECAY_RULES)})")
    decay, undecayed = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            shape = getattr(p, "ds_shape", p.shape)  # DeepSpeed ZeRO-3 keeps the full shape in ds_shape
            embedding = name.endswith("tok_embeddings.weight")
            expert_bias = re.search(r"experts\.b[123]$", name) is not None  # gpt-oss's stacked expert biases
            one_d = len(shape) < 2 or expert_bias
            skip = no_decay != "none" and (one_d or (no_decay == "embeddings_and_1d" and embedding))
            (undecayed if skip else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": undecayed, "weight_decay": 0.0})
            if g["params"]]


def build_model(arch: Architecture, device: str | torch.device = "cpu", seed: int | None = 0,
                init: InitScheme | None = None) -> Transformer:
    """Build and initialise on ``device`` under ``init`` (a job's ``TrainJob.init``; None: the architecture's
    scheme, :func:`llmc.weight_init.init_scheme`) (``meta`` = shapes only, nothing allocated, no init)."""
    device = torch.device(device)
    with torch.device(device):
        model = Transformer(arch)
    if device.type != "meta":
        if seed is not None:
            torch.manual_seed(seed)
        model.init_weights(init)
    return model
