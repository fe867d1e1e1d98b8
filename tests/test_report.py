"""irtrain.report's confidence helpers: the Wilson interval and the exact paired (McNemar)
test that every claim of the quickstart report rests on, against scipy and by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from irtrain import report as R


def test_wilson_interval_by_hand():
    # k = 8 of n = 10, z = 1.96: centre (0.8 + 1.96²/20) / (1 + 1.96²/10), half-width z·sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n)
    z = 1.959963984540054
    centre = (0.8 + z * z / 20) / (1 + z * z / 10)
    half = z * math.sqrt(0.8 * 0.2 / 10 + z * z / 400) / (1 + z * z / 10)
    lo, hi = R.wilson_interval(8, 10)
    assert lo == pytest.approx(centre - half, abs=1e-12) and hi == pytest.approx(centre + half, abs=1e-12)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)  # the textbook value


@pytest.mark.parametrize("k,n", [(0, 1), (1, 1), (0, 48), (1, 48), (24, 48), (47, 48), (48, 48), (172, 200), (3, 1000)])
def test_wilson_interval_equals_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    lo, hi = R.wilson_interval(k, n)
    assert lo == pytest.approx(ci.low, abs=1e-9) and hi == pytest.approx(ci.high, abs=1e-9)


def test_wilson_interval_of_nothing_is_nan():
    assert all(math.isnan(v) for v in R.wilson_interval(0, 0))


def test_paired_sign_test_equals_scipy_binomtest():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 48, 200):
        for _ in range(20):
            a = rng.random(n) < rng.random()
            b = rng.random(n) < rng.random()
            t = R.paired_sign_test(a.tolist(), b.tolist())
            assert t["a_only"] == int((a & ~b).sum()) and t["b_only"] == int((b & ~a).sum())
            m = t["a_only"] + t["b_only"]
            expected = 1.0 if m == 0 else binomtest(t["b_only"], m, 0.5).pvalue
            assert t["p_value"] == pytest.approx(expected, rel=1e-12, abs=1e-300)


def test_paired_sign_test_by_hand_and_verdicts():
    # 6 items right only for b, none only for a: p = 2 · (1/2)^6 = 0.03125 < 0.05 → "above"
    a = [False] * 6 + [True] * 4
    b = [True] * 10
    t = R.paired_sign_test(a, b)
    assert (t["a_only"], t["b_only"], t["p_value"]) == (0, 6, 0.03125)
    assert R.compare_verdict(t) == "above"
    assert R.compare_verdict(R.paired_sign_test(b, a)) == "below"
    # 5 of 5 discordant for b: p = 2/32 = 0.0625, not significant — one more right answer is no claim
    assert R.paired_sign_test(a[1:], b[1:])["p_value"] == 0.0625
    assert R.compare_verdict(R.paired_sign_test(a[1:], b[1:])) == "not distinguishable from"
    assert R.compare_verdict(R.paired_sign_test([True] * 48, [True] * 47 + [False])) == "not distinguishable from"
    with pytest.raises(ValueError):
        R.paired_sign_test([True], [True, False])


def test_with_interval_text():
    assert R.with_interval(43, 48).startswith("0.896 [")
    assert R.with_interval(0, 0) == "—"
