"""irtrain.stats (Rust Kendall tau) against scipy.stats.kendalltau: its default (method="auto":
the exact null distribution without ties at n <= 33), and each method, variant and alternative."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from irtrain.errors import ConfigError, DataError
from irtrain.stats import kendall_tau, kendall_tau_matrix

TAU_TOL = 1e-12
P_RTOL = 1e-9  # the asymptotic p-value: erfc computed another way than scipy's
EXACT_RTOL = 1e-15  # the exact one: scipy's recurrence, in scipy's order (bit-equal in the Rust tests)


def scipy_tau(x, y, method="auto", **kw):
    """scipy's (tau, p); its default method unless told."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on n < 2 and constant input
        r = sps.kendalltau(x, y, method=method, **kw)
    return float(r.statistic), float(r.pvalue)


def uses_exact(x, y) -> bool:
    """Whether scipy's default takes the exact distribution: no ties and n <= 33, or at most
    one discordant (or concordant) pair (its rule, restated)."""
    x, y = np.asarray(x), np.asarray(y)
    n = len(x)
    if len(np.unique(x)) < n or len(np.unique(y)) < n:
        return False
    i, j = np.triu_indices(n, 1)
    dis = int((np.sign(x[i] - x[j]) != np.sign(y[i] - y[j])).sum()) if n <= 3000 else n * n
    return n <= 33 or min(dis, n * (n - 1) // 2 - dis) <= 1


def assert_same(got, want, p_rtol=P_RTOL):
    (t, p), (ts, ps) = got, want
    if math.isnan(ts):
        assert math.isnan(t) and math.isnan(p) and math.isnan(ps)
        return
    assert abs(t - ts) <= TAU_TOL, (t, ts)
    assert abs(p - ps) <= p_rtol * ps + 1e-300, (p, ps)


def sample(rng, n, levels):
    """x, y with `levels` distinct values each (0: continuous), and some association."""
    draw = (lambda: rng.standard_normal(n)) if levels == 0 else (lambda: rng.integers(0, levels, n).astype(float))
    x = draw()
    y = np.where(rng.random(n) < 0.5, x, draw())
    return x, y


@pytest.mark.parametrize("n", [0, 1, 2, 3, 4, 5, 10, 20, 33, 34, 50, 100, 1000, 20_000])
@pytest.mark.parametrize("levels", [0, 2, 5, 100, 3000])
def test_random_inputs_match_scipy_default(n, levels):
    rng = np.random.default_rng(n * 7919 + levels)
    x, y = sample(rng, n, levels)
    exact = uses_exact(x, y)
    for b in (y, -y):  # a negative association too
        assert_same(kendall_tau(x, b), scipy_tau(x, b), EXACT_RTOL if exact else P_RTOL)
    if n in (3, 33) and levels == 0:
        assert exact  # without ties, up to 33 observations: the exact distribution
    if n > 33 and levels in (2, 5):
        assert not exact


def test_million_observations_with_ties_match_scipy_default():
    rng = np.random.default_rng(50)
    x, y = sample(rng, 1_000_000, 50)
    assert_same(kendall_tau(x, y), scipy_tau(x, y))


@pytest.mark.parametrize("n", [2, 3, 4, 8, 20, 33, 34, 60, 171, 200])
@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_exact_method_matches_scipy_exact(n, alternative):
    # without ties; n >= 171 is scipy's other branch (n! overflows, each step divided by j)
    rng = np.random.default_rng(n)
    x = rng.standard_normal(n)
    for y in (x + rng.standard_normal(n), -x + 0.3 * rng.standard_normal(n), rng.standard_normal(n)):
        assert_same(kendall_tau(x, y, "exact", alternative=alternative),
                    scipy_tau(x, y, "exact", alternative=alternative), EXACT_RTOL)


@pytest.mark.parametrize("n", [3, 4, 10, 33, 34, 500, 20_000])
@pytest.mark.parametrize("levels", [0, 3, 100])
@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
def test_asymptotic_method_matches_scipy_asymptotic(n, levels, alternative):
    rng = np.random.default_rng(n + levels)
    x, y = sample(rng, n, levels)
    for b in (y, -y):
        assert_same(kendall_tau(x, b, "asymptotic", alternative=alternative),
                    scipy_tau(x, b, "asymptotic", alternative=alternative))


@pytest.mark.parametrize("method", ["auto", "asymptotic"])
@pytest.mark.parametrize("alternative", ["two-sided", "less", "greater"])
@pytest.mark.parametrize("n, levels", [(3, 0), (5, 2), (12, 4), (33, 0), (200, 7), (5000, 30), (5000, 0)])
def test_tau_c_and_alternatives_match_scipy(method, alternative, n, levels):
    rng = np.random.default_rng(n * 3 + levels)
    x, y = sample(rng, n, levels)
    for variant in ("b", "c"):
        kw = dict(variant=variant, alternative=alternative)
        exact = method == "auto" and uses_exact(x, y)
        assert_same(kendall_tau(x, y, method, **kw), scipy_tau(x, y, method, **kw), EXACT_RTOL if exact else P_RTOL)


@pytest.mark.parametrize("n", [34, 50, 300, 2000])
def test_all_but_one_pair_concordant_is_exact_at_any_n(n):
    # scipy's default: exact when min(discordant, concordant) <= 1, whatever n (2/n!, 2/(n-1)!,
    # 0 once n! overflows)
    x = np.arange(n, dtype=float)
    for y in (x.copy(), x[::-1].copy(), np.r_[x[1], x[0], x[2:]]):
        got, want = kendall_tau(x, y), scipy_tau(x, y)
        assert_same(got, want, EXACT_RTOL)
        assert got[1] == want[1]


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=3, max_size=60))
def test_property_small_tied_integers(pairs):
    x, y = (np.array(v, dtype=float) for v in zip(*pairs))
    assert_same(kendall_tau(x, y), scipy_tau(x, y))
    assert_same(kendall_tau(x, y, "asymptotic"), scipy_tau(x, y, "asymptotic"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(allow_nan=False)), min_size=3, max_size=40))
def test_property_floats_including_infinities(pairs):
    x, y = (np.array(v, dtype=float) for v in zip(*pairs))
    assert_same(kendall_tau(x, y), scipy_tau(x, y), EXACT_RTOL if uses_exact(x, y) else P_RTOL)


@settings(max_examples=100, deadline=None)
@given(st.permutations(list(range(12))), st.integers(2, 12))
def test_property_permutations_exact(perm, n):
    x, y = np.arange(n, dtype=float), np.array(perm[:n], dtype=float)
    assert_same(kendall_tau(x, y), scipy_tau(x, y), EXACT_RTOL)
    assert_same(kendall_tau(x, y, "exact", alternative="less"), scipy_tau(x, y, "exact", alternative="less"), EXACT_RTOL)


@pytest.mark.parametrize(
    "x, y",
    [
        ([], []),  # n = 0
        ([1.0], [2.0]),  # n = 1
        ([1, 2, 3, 4], [5, 5, 5, 5]),  # constant y
        ([7, 7, 7], [1, 2, 3]),  # constant x
        ([2, 2, 2, 2], [2, 2, 2, 2]),  # all ties
        ([1, 1, 2, 2], [3, 3, 4, 4]),  # ties in both, all joint
        ([0.0, -0.0, 1.0], [1, 2, 3]),  # -0.0 ties with 0.0
        ([-np.inf, -1e300, 0, 1e-300, np.inf], [1, 2, 3, 4, 5]),
    ],
)
def test_edge_cases_match_scipy(x, y):
    for method in ("auto", "asymptotic"):
        assert_same(kendall_tau(x, y, method), scipy_tau(x, y, method))


def test_two_and_three_observations():
    # scipy's default takes the exact distribution: n = 2 gives p = 1, n = 3 monotone 2/3! = 1/3
    assert kendall_tau([1, 2], [3, 4]) == (1.0, 1.0) == scipy_tau([1, 2], [3, 4])
    assert kendall_tau([1, 2], [4, 3]) == (-1.0, 1.0)
    assert kendall_tau([1, 2, 3], [4, 5, 6]) == (1.0, pytest.approx(1 / 3, rel=1e-15))
    assert kendall_tau([1, 2, 3], [4, 5, 6])[1] == scipy_tau([1, 2, 3], [4, 5, 6])[1]
    # scipy's asymptotic branch raises ZeroDivisionError at n = 2 (a 0/0 term that is 0);
    # var = n(n-1)(2n+5)/18 = 1, so z = +-1 and p = erfc(1/sqrt 2).
    t, p = kendall_tau([1, 2], [4, 3], "asymptotic")
    assert t == -1.0 and p == pytest.approx(0.31731050786291415, rel=1e-14)
    assert kendall_tau([1, 2, 3], [4, 5, 6], "asymptotic")[1] == pytest.approx(0.11718508719813801, rel=1e-12)
    for method in ("auto", "asymptotic", "exact"):
        assert all(math.isnan(v) for v in kendall_tau([1, 1], [3, 4], method if method != "exact" else "auto"))
        assert all(math.isnan(v) for v in kendall_tau([], [], method))
        assert all(math.isnan(v) for v in kendall_tau([1.0], [2.0], method))


def test_exact_with_ties_and_unknown_options_are_clear_errors():
    with pytest.raises(DataError, match="ties found, the exact method cannot be used"):
        kendall_tau([1, 2, 2, 3], [1, 2, 3, 4], "exact")
    with pytest.raises(ValueError, match="Ties found"):  # scipy refuses it too
        sps.kendalltau([1, 2, 2, 3], [1, 2, 3, 4], method="exact")
    with pytest.raises(DataError, match="ties found"):
        kendall_tau_matrix([[1, 2, 3, 4], [1, 1, 2, 3]], "exact")
    # the exact distribution of 30,000 observations would need ~2e8 terms (scipy: as many floats)
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match="the exact method at n = 30000 needs .* terms"):
        kendall_tau(np.arange(30_000.0), rng.permutation(30_000).astype(float), "exact")
    with pytest.raises(ConfigError, match="method = 'fast' is not one of: auto, asymptotic, exact"):
        kendall_tau([1, 2, 3], [1, 2, 3], "fast")
    with pytest.raises(ConfigError, match="alternative"):
        kendall_tau([1, 2, 3], [1, 2, 3], alternative="two_sided")
    with pytest.raises(ConfigError, match="variant"):
        kendall_tau_matrix([[1, 2, 3]], variant="a")


def test_nan_propagates_like_scipy_default():
    x = np.array([1.0, 2.0, np.nan, 4.0])
    y = np.array([1.0, 3.0, 2.0, 4.0])
    for a, b in [(x, y), (y, x)]:
        for method in ("auto", "asymptotic", "exact"):
            t, p = kendall_tau(a, b, method)
            assert math.isnan(t) and math.isnan(p)
            assert_same((t, p), scipy_tau(a, b, method))


def test_input_types_and_strided_views():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 20, size=(400,))
    x_int, y_list = base[::2], list(base[1::2])  # strided int view, Python list
    assert_same(kendall_tau(x_int, y_list), scipy_tau(x_int, y_list))
    assert_same(kendall_tau(x_int.astype(np.float32), y_list), scipy_tau(x_int.astype(np.float32), y_list))


def test_mismatched_lengths_and_shapes_are_clear_errors():
    with pytest.raises(DataError, match="same length, got 3 and 2"):
        kendall_tau([1, 2, 3], [1, 2])
    with pytest.raises(DataError, match="x must be 1-D"):
        kendall_tau([[1, 2], [3, 4]], [1, 2])
    with pytest.raises(DataError, match="m must be 2-D"):
        kendall_tau_matrix([1, 2, 3])
    with pytest.raises(ValueError):
        kendall_tau(["a", "b"], [1, 2])


def test_matrix_matches_scipy_pairwise():
    rng = np.random.default_rng(11)
    n = 3000
    rows = [
        rng.standard_normal(n),
        rng.standard_normal(n),
        rng.integers(0, 4, n).astype(float),
        rng.integers(0, 700, n).astype(float),  # 700 x 700 cells: the gather path with ties
        rng.integers(0, 700, n).astype(float),
        rng.integers(0, 3000, n).astype(float),
        np.full(n, 2.0),  # constant
    ]
    rows[1] += rows[0]
    nan_row = rng.standard_normal(n)
    nan_row[17] = np.nan
    m = np.stack(rows + [nan_row])
    v = m.shape[0]
    for method in ("auto", "asymptotic"):
        tau, p = kendall_tau_matrix(m, method)
        assert tau.shape == p.shape == (v, v)
        for i in range(v):
            for j in range(v):
                assert_same((tau[i, j], p[i, j]), scipy_tau(m[i], m[j], method))
        np.testing.assert_array_equal(tau, tau.T)  # NaNs compare equal here
        np.testing.assert_array_equal(p, p.T)


@pytest.mark.parametrize("method", ["auto", "exact"])
def test_matrix_of_short_rows_is_exact_like_scipy(method):
    # rank's per-trace case: a few states per trace, no ties
    rng = np.random.default_rng(2)
    for n in (2, 3, 5, 9, 33):
        m = rng.standard_normal((4, n))
        tau, p = kendall_tau_matrix(m, method, alternative="greater")
        for i in range(4):
            for j in range(4):
                assert_same((tau[i, j], p[i, j]), scipy_tau(m[i], m[j], method, alternative="greater"), EXACT_RTOL)


def test_matrix_of_a_fortran_ordered_and_degenerate_input():
    rng = np.random.default_rng(5)
    m = np.asfortranarray(rng.standard_normal((3, 50)))
    tau, _ = kendall_tau_matrix(m)
    assert tau[0, 1] == pytest.approx(scipy_tau(m[0], m[1])[0], abs=TAU_TOL)
    assert kendall_tau_matrix(np.zeros((0, 5)))[0].shape == (0, 0)
    assert np.isnan(kendall_tau_matrix(np.zeros((2, 1)))[0]).all()
