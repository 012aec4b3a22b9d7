"""LSH banding math against datasketch's own (scipy-integrated) functions and scipy's betainc."""

from __future__ import annotations

import pytest

from llmc.compiler import quality_math as q

lsh = pytest.importorskip("datasketch.lsh")
special = pytest.importorskip("scipy.special")

BANDINGS = [(1, 1), (2, 3), (5, 25), (9, 13), (14, 8), (20, 450), (450, 20), (32, 4), (128, 1), (1, 128),
            (3000, 3), (1, 9000)]
THRESHOLDS = [0.0, 0.05, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0]


@pytest.mark.parametrize("t", THRESHOLDS)
def test_error_areas_match_datasketch(t):
    for b, r in BANDINGS:
        assert q.false_positive_area(t, b, r) == pytest.approx(lsh._false_positive_probability(t, b, r), abs=1e-9)
        assert q.false_negative_area(t, b, r) == pytest.approx(lsh._false_negative_probability(t, b, r), abs=1e-9)


@pytest.mark.parametrize(("t", "n", "w"), [(0.9, 128, (0.5, 0.5)), (0.8, 128, (0.5, 0.5)), (0.5, 64, (0.5, 0.5)),
                                           (0.7, 256, (0.5, 0.5)), (0.8, 112, (0.3, 0.7)), (0.6, 200, (0.8, 0.2))])
def test_optimal_bands_matches_datasketch(t, n, w):
    got = q.optimal_bands(t, n, *w)
    assert (got.bands, got.rows) == lsh._optimal_param(t, n, *w)
    assert got.num_perm_used <= n


def test_datasketch_docstring_example_and_s_curve():
    # MinHashLSH docstring: threshold 0.9, 128 perms -> b=5, r=25
    assert (q.optimal_bands(0.9, 128).bands, q.optimal_bands(0.9, 128).rows) == (5, 25)
    # datatrove's MinhashConfig note: 14 buckets x 8 hashes include s=0.8 with probability 0.924
    assert q.candidate_probability(0.8, 14, 8) == pytest.approx(0.924, abs=5e-4)
    # Lee et al. 2022 (450 bands x 20 rows): the S-curve midpoint is where P = 1/2
    band = q.banding(0.8, 450, 20)
    assert q.candidate_probability(band.s_half, 450, 20) == pytest.approx(0.5, abs=1e-12)


def test_betainc_against_scipy():
    for a, b, x in [(0.5, 3.0, 0.2), (1 / 13, 10.0, 0.9), (2.0, 0.1, 0.99), (7.0, 450.0, 0.01), (0.25, 0.25, 0.5)]:
        assert q.betainc_regularized(a, b, x) == pytest.approx(float(special.betainc(a, b, x)), rel=1e-10)

