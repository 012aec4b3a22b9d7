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
