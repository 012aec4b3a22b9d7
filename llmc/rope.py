"""YaRN's and LongRoPE's attention temperature: the one place its numbers are computed (no torch), for llmc's model
(:mod:`llmc.runtime.model`, its RoPE tables and MLA's softmax scale) and for the torchtitan job it emits (whose RoPE
is a pure rotation, so the job scales its cache by the same factor).

Sources: Peng et al. 2023, "YaRN" (arXiv:2309.00071, sec. 3.4: sqrt(1/t) = 0.1 ln(s) + 1); DeepSeek's coefficient
(``mscale`` / ``mscale_all_dim``, DeepSeek-V2 / V3's config.json) and LongRoPE's default as transformers computes
them (``modeling_rope_utils._compute_yarn_parameters`` / ``_compute_longrope_parameters``).
"""

from __future__ import annotations

import math

from llmc.spec.model import RopeScaling


def yarn_mscale(factor: float, k: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 k ln(factor) + 1 (1 for factor <= 1), with DeepSeek's coefficient k
    (transformers' ``get_mscale`` / ``yarn_get_mscale``)."""
    return 0.1 * k * math.log(factor) + 1.0 if factor > 1 else 1.0


def rope_attention_factor(scaling: RopeScaling) -> float:
    """The scale on a yarn or longrope table's cos/sin: ``attention_factor`` where set; yarn: m(mscale) /
    m(mscale_all_dim) with DeepSeek's two, else 0.1 ln(factor) + 1 (:func:`yarn_mscale`); longrope: sqrt(1 + ln(factor)
    / ln(original_max_position)) (1 for factor <= 1); 1 for the other rules."""
    if scaling.attention_factor:
        return scaling.attention_factor
    if scaling.type == "yarn":
        if scaling.mscale and scaling.mscale_all_dim:
            return yarn_mscale(scaling.factor, scaling.mscale) / yarn_mscale(scaling.factor, scaling.mscale_all_dim)
        return yarn_mscale(scaling.factor)
    if scaling.type == "longrope" and scaling.factor > 1:
        return math.sqrt(1 + math.log(scaling.factor) / math.log(scaling.original_max_position))
    return 1.0


def mla_softmax_factor(scaling: RopeScaling | None) -> float:
    """What multi-head latent attention multiplies its softmax scale by: m(mscale_all_dim)^2 under a YaRN with
    DeepSeek's ``mscale_all_dim`` (transformers' ``yarn_apply_mscale``), else 1."""
    if scaling is None or not scaling.mscale_all_dim:
        return 1.0
    return yarn_mscale(scaling.factor, scaling.mscale_all_dim) ** 2


def rope_inv_freq(dim: int, theta: float, scaling: RopeScaling | None, long: bool = False) -> list[float]:
    """The rotary inverse frequencies theta^(-2i/dim), i < dim/2, after ``scaling``: the one definition, in plain floats,
    that :func:`llmc.runtime.model.rope_inv_freq` (what llmc's trainers rotate with) turns into a tensor, matching torchtitan
    0.3.0's RoPE (torchtitan/models/common/rope.py: ``ComplexRoPE._precompute_cache`` 'llama', ``_yarn_inv_freq``),
    so the compiler can compare two scalings' frequencies without torch. llama3: Meta's band rule (meta-llama/
    llama-models ``apply_scaling``); yarn: YaRN's ramp over [beta_fast, beta_slow] (Peng et al. 2023, arXiv:2309.00071
    sec. 3.2; transformers ``_compute_yarn_parameters``); linear: / factor (Chen et al. 2023, arXiv:2306.15595);
    longrope: / one factor per frequency (``long``: the long ones)."""
    inv = [1.0 / theta ** (i / dim) for i in range(0, dim, 2)][: dim // 2]
    if scaling is None:
        return inv
    f = scaling.factor
    if scaling.type == "linear":
        return [x / f for x in inv]
    if scaling.type == "llama3":
        old = scaling.original_max_position
        lo, hi = scaling.low_freq_factor, scaling.high_freq_factor
        out = []
        for x in inv:
            wavelen = 2 * math.pi / x
            if wavelen < old / hi:
                out.append(x)
            elif wavelen > old / lo:
                out.append(x / f)
            else:
                smooth = (old / wavelen - lo) / (hi - lo)
                out.append((1 - smooth) * x / f + smooth * x)
        return out
    if scaling.type == "yarn":
        def corr_dim(n_rot: float) -> float:  # the dim whose wavelength turns n_rot times over the original context
            return dim * math.log(scaling.original_max_position / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

        low, high = corr_dim(scaling.beta_fast), corr_dim(scaling.beta_slow)
        if scaling.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        out = []
        for i, x in enumerate(inv):
            ramp = min(1.0, max(0.0, (i - low) / (high - low)))  # 1 = interpolate (/ factor), 0 = keep
            out.append(x / f * ramp + x * (1 - ramp))
        return out
    ext = scaling.long_factor if long else scaling.short_factor  # longrope
    return [x / e for x, e in zip(inv, ext, strict=False)]


#: Meta's llama3 rule reaches twice ``factor`` x ``original_max_position``: Llama 3.1 pairs factor 8 from 8,192 tokens
#: with 131,072 positions (16 x 8,192; Meta-Llama-3.1-8B config.json ``rope_scaling`` / ``max_position_embeddings``),
#: Llama 3.2 factor 32 from 8,192 with 131,072 (within 2 x 32 x 8,192)
LLAMA3_REACH_PER_FACTOR = 2


def rope_reach(scaling: RopeScaling | None) -> float | None:
    """The sequence length a RoPE scaling extends its model to: ``factor`` x ``original_max_position`` for yarn, linear
    and longrope (what their factor means: YaRN's s = L' / L, arXiv:2309.00071 sec. 2.3; transformers' rope_scaling
    docs: "a factor of x will enable the model to handle sequences of length x * original maximum pre-trained
    length"), :data:`LLAMA3_REACH_PER_FACTOR` times that for llama3 (Meta's published pairing). None without a
    scaling (the model's context is what it was trained at). A float: an absurd factor reaches infinity, not an
    error."""
    if scaling is None:
        return None
    per = LLAMA3_REACH_PER_FACTOR if scaling.type == "llama3" else 1
    return per * float(scaling.factor) * float(scaling.original_max_position)


def rope_factor_for(kind: str, seq_len: int, original: int) -> int:
    """The smallest whole ``factor`` with which a ``kind`` scaling from ``original`` tokens reaches ``seq_len``
    (:func:`rope_reach`'s inverse, rounded up)."""
    per = LLAMA3_REACH_PER_FACTOR if kind == "llama3" else 1
    return max(1, math.ceil(seq_len / (per * original)))
