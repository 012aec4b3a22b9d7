"""MinHash LSH banding math and the CPU cost of a dedup pass (pure functions: no I/O, no torch).

Banding (Leskovec, Rajaraman, Ullman, *Mining of Massive Datasets*, 3rd ed., section 3.4.2,
http://www.mmds.org/): a MinHash signature of ``b * r`` values is cut into ``b`` bands of ``r``
rows; two documents whose (shingle-set) Jaccard similarity is ``s`` share at least one band, and so
become a candidate pair, with probability

    P(s) = 1 - (1 - s^r)^b.

For a similarity threshold ``t`` the false-positive and false-negative *areas* are the integrals
that datasketch's ``MinHashLSH`` minimises (``datasketch/lsh.py``: ``_false_positive_probability``,
``_false_negative_probability``, ``_optimal_param``; https://github.com/ekzhu/datasketch):

    FP(t) = integral_0^t P(s) ds            FN(t) = integral_t^1 (1 - P(s)) ds.

datasketch integrates numerically (``scipy.integrate.quad``); here they are in closed form through
the incomplete beta function (substituting u = s^r):

    integral_t^1 (1 - s^r)^b ds = (1/r) B(1/r, b+1) I_{1 - t^r}(b+1, 1/r)
    FN(t) = that;   FP(t) = t - (1/r) B(1/r, b+1) I_{t^r}(1/r, b+1)

with I the regularised incomplete beta (DLMF 8.17.2, https://dlmf.nist.gov/8.17), evaluated by
its continued fraction (DLMF 8.17.22) with the modified Lentz method (Press et al., *Numerical
Recipes*, 3rd ed., section 6.4). No scipy needed, so the compiler keeps its small dependency set.

:func:`optimal_bands` is the same grid search as datasketch's ``_optimal_param``: over every
``b`` in ``1..num_perm`` and ``r`` in ``1..num_perm // b``, minimise
``fp_weight * FP + fn_weight * FN`` (first minimum wins, b outer, r inner).

Cost model (:func:`dedup_cpu_seconds`): computing one document's signature hashes each of its
``k`` shingles once (SHA-1 in datasketch) and applies ``num_perm`` permutations to each hash
(``MinHash.update_batch``: a vectorised multiply-add and a column min), so

    seconds = documents * k * (1 / SHINGLE_HASHES_PER_S + num_perm / PERM_UPDATES_PER_S) / workers.

Both rates are fitted factors measured by ``scripts/bench_quality.py`` (which prints them); the
LSH index insert/query (``b`` dictionary lookups per document) and exact-dedup sha256 are small
next to this and not modelled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Fitted by scripts/bench_quality.py (least squares of update_batch time over shingles and
# num_perm, datasketch 2.0.0 affine32 scheme) on one core of a 2-core x86-64 cloud VM.
SHINGLE_HASHES_PER_S = 2.9e6
"""Shingles hashed per second per core (SHA-1 of a word n-gram + Python overhead)."""
PERM_UPDATES_PER_S = 2.9e8
"""(shingle, permutation) updates per second per core inside ``MinHash.update_batch``."""


def candidate_probability(s: float, bands: int, rows: int) -> float:
    """P(s) = 1 - (1 - s^r)^b: probability that a pair with Jaccard ``s`` shares a band (MMDS 3.4.2)."""
    if not 0.0 <= s <= 1.0:
        raise ValueError(f"similarity must be in [0, 1], got {s}")
    return -math.expm1(bands * math.log1p(-(s ** rows))) if s < 1.0 else 1.0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta (DLMF 8.17.22), modified Lentz (Numerical Recipes 6.4)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def betainc_regularized(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function (DLMF 8.17.2)."""
    if a <= 0 or b <= 0:
        raise ValueError("a and b must be positive")
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(a * math.log(x) + b * math.log1p(-x) - _log_beta(a, b))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def _betainc_direct(a: float, b: float, x: float, log_x: float, log_y: float) -> float:
    """I_x(a, b) by the continued fraction alone (valid for x < (a+1)/(a+b+2)).

    ``log_x`` and ``log_y`` = ln x, ln(1 - x) are passed separately so that x^a keeps its value
    when x itself underflows (x = t^r with r in the hundreds).
    """
    front = math.exp(a * log_x + b * log_y - _log_beta(a, b))
    return front * _betacf(a, b, x) / a


def _split_integral(t: float, bands: int, rows: int) -> tuple[float, float]:
    """(integral_0^t, integral_t^1) of (1 - s^r)^b ds, each evaluated without cancellation.

    With u = s^r both are (1/r) B(1/r, b+1) times I_x(1/r, b+1) resp. I_y(b+1, 1/r), x = t^r,
    y = 1 - x, both carried as logarithms (x underflows for large r while x^(1/r) = t does not). The part whose
    continued fraction converges directly is computed; the other is the whole minus it.
    """
    a, bb = 1.0 / rows, bands + 1.0
    whole = math.exp(_log_beta(a, bb)) / rows  # integral_0^1 (1 - s^r)^b ds
    if t <= 0.0:
        return 0.0, whole
    if t >= 1.0:
        return whole, 0.0
    log_x = rows * math.log(t)
    x, y = math.exp(log_x), -math.expm1(log_x)
    log_y = math.log1p(-x) if x < 0.5 else math.log(y)
    if x < (a + 1.0) / (a + bb + 2.0):
        lower = whole * _betainc_direct(a, bb, x, log_x, log_y)
        return lower, max(0.0, whole - lower)
    upper = whole * _betainc_direct(bb, a, y, log_y, log_x)
    return max(0.0, whole - upper), upper


def false_negative_area(threshold: float, bands: int, rows: int) -> float:
    """FN(t) = integral_t^1 (1 - P(s)) ds (datasketch ``_false_negative_probability``)."""
    _check(threshold, bands, rows)
    return _split_integral(threshold, bands, rows)[1]


def false_positive_area(threshold: float, bands: int, rows: int) -> float:
    """FP(t) = integral_0^t P(s) ds = t - integral_0^t (1 - s^r)^b ds (datasketch ``_false_positive_probability``)."""
    _check(threshold, bands, rows)
    return max(0.0, threshold - _split_integral(threshold, bands, rows)[0])


def _check(threshold: float, bands: int, rows: int) -> None:
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if bands < 1 or rows < 1:
        raise ValueError(f"bands and rows must be >= 1, got {bands}, {rows}")


@dataclass(frozen=True)
class Banding:
    """An LSH banding and its error areas at the threshold it was chosen for."""

    bands: int
    rows: int
    threshold: float
    false_positive: float
    false_negative: float

    @property
    def num_perm_used(self) -> int:
        """Signature values the bands read (``bands * rows <= num_perm``)."""
        return self.bands * self.rows

    @property
    def s_half(self) -> float:
        """Similarity at which P(s) = 1/2: (1 - 2^(-1/b))^(1/r), the S-curve's midpoint."""
        return (1.0 - 0.5 ** (1.0 / self.bands)) ** (1.0 / self.rows)


def banding(threshold: float, bands: int, rows: int) -> Banding:
    """The error areas of a given banding at ``threshold``."""
    return Banding(bands, rows, threshold, false_positive_area(threshold, bands, rows),
                   false_negative_area(threshold, bands, rows))


def optimal_bands(threshold: float, num_perm: int, fp_weight: float = 0.5,
                  fn_weight: float = 0.5) -> Banding:
    """Bands x rows minimising ``fp_weight * FP + fn_weight * FN`` (datasketch ``_optimal_param``)."""
    if num_perm < 2:
        raise ValueError(f"num_perm must be >= 2, got {num_perm}")
    if fp_weight < 0 or fn_weight < 0:
        raise ValueError("weights must be >= 0")
    best, best_err = (0, 0), math.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            err = fp_weight * false_positive_area(threshold, b, r) + fn_weight * false_negative_area(threshold, b, r)
            if err < best_err:
                best, best_err = (b, r), err
    return banding(threshold, *best)


@dataclass(frozen=True)
class DedupCost:
    """Estimated CPU time of computing MinHash signatures for a corpus."""

    documents: int
    shingles_per_document: float
    num_perm: int
    workers: int
    hash_seconds: float
    """Core-seconds hashing shingles."""
    permutation_seconds: float
    """Core-seconds applying the ``num_perm`` permutations."""

    @property
    def core_seconds(self) -> float:
        return self.hash_seconds + self.permutation_seconds

    @property
    def wall_seconds(self) -> float:
        return self.core_seconds / self.workers


def dedup_cpu_seconds(documents: int, shingles_per_document: float, num_perm: int, workers: int = 1,
                      shingle_hashes_per_s: float = SHINGLE_HASHES_PER_S,
                      perm_updates_per_s: float = PERM_UPDATES_PER_S) -> DedupCost:
    """CPU time of the signature pass: documents x shingles x (1 hash + num_perm permutations)."""
    if documents < 0 or shingles_per_document < 0 or num_perm < 1 or workers < 1:
        raise ValueError("documents, shingles >= 0; num_perm, workers >= 1")
    shingles = documents * shingles_per_document
    return DedupCost(documents, shingles_per_document, num_perm, workers,
                     hash_seconds=shingles / shingle_hashes_per_s,
                     permutation_seconds=shingles * num_perm / perm_updates_per_s)
