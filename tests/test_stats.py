"""irtrain.stats (Rust Kendall tau-b) against scipy.stats.kendalltau(method="asymptotic")."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from irtrain.errors import DataError
from irtrain.stats import kendall_tau, kendall_tau_matrix

TAU_TOL = 1e-12
P_RTOL = 1e-9


def scipy_tau(x, y):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on n < 2 and constant input
        r = sps.kendalltau(x, y, method="asymptotic")
    return float(r.statistic), float(r.pvalue)


def assert_same(got, want):
    (t, p), (ts, ps) = got, want
    if math.isnan(ts):
        assert math.isnan(t) and math.isnan(p) and math.isnan(ps)
        return
    assert abs(t - ts) <= TAU_TOL, (t, ts)
    assert abs(p - ps) <= P_RTOL * ps + 1e-300, (p, ps)


def sample(rng, n, levels):
    """x, y with `levels` distinct values each (0: continuous), and some association."""
    draw = (lambda: rng.standard_normal(n)) if levels == 0 else (lambda: rng.integers(0, levels, n).astype(float))
    x = draw()
    y = np.where(rng.random(n) < 0.5, x, draw())
    return x, y


@pytest.mark.parametrize("n", [3, 4, 5, 10, 33, 100, 1000, 20_000])
@pytest.mark.parametrize("levels", [0, 2, 5, 100, 3000])
def test_random_inputs_match_scipy(n, levels):
    rng = np.random.default_rng(n * 7919 + levels)
    x, y = sample(rng, n, levels)
    assert_same(kendall_tau(x, y), scipy_tau(x, y))
    # a negative association too
    assert_same(kendall_tau(x, -y), scipy_tau(x, -y))


@pytest.mark.parametrize("levels", [0, 50])
def test_million_observations_match_scipy(levels):
    rng = np.random.default_rng(levels)
    x, y = sample(rng, 1_000_000, levels)
    assert_same(kendall_tau(x, y), scipy_tau(x, y))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.integers(-3, 3), st.integers(-3, 3)), min_size=3, max_size=60))
def test_property_small_tied_integers(pairs):
    x, y = (np.array(v, dtype=float) for v in zip(*pairs))
    assert_same(kendall_tau(x, y), scipy_tau(x, y))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(allow_nan=False)), min_size=3, max_size=40))
def test_property_floats_including_infinities(pairs):
    x, y = (np.array(v, dtype=float) for v in zip(*pairs))
    assert_same(kendall_tau(x, y), scipy_tau(x, y))


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
    assert_same(kendall_tau(x, y), scipy_tau(x, y))


def test_two_observations():
    # scipy's asymptotic branch raises ZeroDivisionError at n = 2 (a 0/0 term that is 0);
    # var = n(n-1)(2n+5)/18 = 1, so z = +-1 and p = erfc(1/sqrt 2).
    assert kendall_tau([1, 2], [3, 4]) == (1.0, pytest.approx(math.erfc(1 / math.sqrt(2)), rel=1e-14))
    t, p = kendall_tau([1, 2], [4, 3])
    assert t == -1.0 and p == pytest.approx(0.31731050786291415, rel=1e-14)
    assert all(math.isnan(v) for v in kendall_tau([1, 1], [3, 4]))


def test_nan_propagates_like_scipy_default():
    x = np.array([1.0, 2.0, np.nan, 4.0])
    y = np.array([1.0, 3.0, 2.0, 4.0])
    for a, b in [(x, y), (y, x)]:
        t, p = kendall_tau(a, b)
        assert math.isnan(t) and math.isnan(p)
        assert_same((t, p), scipy_tau(a, b))


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
    tau, p = kendall_tau_matrix(m)
    v = m.shape[0]
    assert tau.shape == p.shape == (v, v)
    for i in range(v):
        for j in range(v):
            assert_same((tau[i, j], p[i, j]), scipy_tau(m[i], m[j]))
    np.testing.assert_array_equal(tau, tau.T)  # NaNs compare equal here
    np.testing.assert_array_equal(p, p.T)


def test_matrix_of_a_fortran_ordered_and_degenerate_input():
    rng = np.random.default_rng(5)
    m = np.asfortranarray(rng.standard_normal((3, 50)))
    tau, _ = kendall_tau_matrix(m)
    assert tau[0, 1] == pytest.approx(scipy_tau(m[0], m[1])[0], abs=TAU_TOL)
    assert kendall_tau_matrix(np.zeros((0, 5)))[0].shape == (0, 0)
    assert np.isnan(kendall_tau_matrix(np.zeros((2, 1)))[0]).all()
