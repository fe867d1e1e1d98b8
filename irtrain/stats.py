"""Rank statistics, computed in Rust (`irtrain._rust`, `rust_ext/core/src/kendall.rs`).

Kendall's τ-b (or τ-c) with ties (FORMULAS.md, "Value ranking") in O(n log n), and its
p-value: the numbers of ``scipy.stats.kendalltau(x, y, method=..., variant=...,
alternative=...)`` for the same options (τ to 1e-12, p to 1e-9 relative; the exact
p-value to the last bit). The default, ``method="auto"``, is scipy's default: the exact
null distribution when neither variable has ties and n ≤ 33, or when at most one pair is
discordant (or concordant); the asymptotic normal approximation otherwise. ``"exact"``
costs O(n·c) (c ≤ n(n−1)/4: seconds at n in the low thousands, as in scipy) and refuses
data with ties, and beyond 2**27 terms of the distribution (n of about 23,000 and more); ``"asymptotic"`` is always the normal approximation.

Edge cases follow scipy: fewer than two observations, or a constant variable, give
``(nan, nan)``; a NaN in the input gives ``(nan, nan)`` (scipy's default
``nan_policy="propagate"``). For n = 2 scipy's asymptotic branch raises
``ZeroDivisionError``; here that variance term (identically 0 for n = 2) is taken as 0, so
``method="asymptotic"`` gives ``erfc(1/√2) ≈ 0.3173`` (``"auto"`` takes the exact
distribution there: p = 1, as scipy). Inputs are converted to float64 (integers beyond
2**53 lose precision). Mismatched lengths, arrays of the wrong dimension and ties under
``method="exact"`` raise `irtrain.errors.DataError`; an unknown option `ConfigError`.
"""
from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from irtrain import _rust
from irtrain.errors import ConfigError, DataError

METHODS = ("auto", "asymptotic", "exact")
VARIANTS = ("b", "c")
ALTERNATIVES = ("two-sided", "less", "greater")


def _as_float64(a: npt.ArrayLike, ndim: int, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(a, dtype=np.float64)
    if arr.ndim != ndim:
        raise DataError(f"{name} must be {ndim}-D, got an array of shape {arr.shape}")
    return arr


def _check(method: str, variant: str, alternative: str) -> None:
    for name, value, allowed in (("method", method, METHODS), ("variant", variant, VARIANTS),
                                 ("alternative", alternative, ALTERNATIVES)):
        if value not in allowed:
            raise ConfigError(f"kendall_tau: {name} = {value!r} is not one of: {', '.join(allowed)}")


def kendall_tau(x: npt.ArrayLike, y: npt.ArrayLike, method: str = "auto", *, variant: str = "b",
                alternative: str = "two-sided") -> tuple[float, float]:
    """Kendall's τ of two samples and its p-value, as ``scipy.stats.kendalltau``.

    x, y: 1-D, the same length n (any real dtype; read as float64).
    method: ``"auto"`` (scipy's default), ``"asymptotic"`` or ``"exact"``;
    variant: ``"b"`` (τ-b) or ``"c"`` (Stuart's τ-c); alternative: ``"two-sided"``,
    ``"less"`` (τ < 0) or ``"greater"`` (τ > 0).
    Returns ``(tau, pvalue)`` as Python floats.
    """
    _check(method, variant, alternative)
    return _rust.kendall_tau(_as_float64(x, 1, "x"), _as_float64(y, 1, "y"), method, variant, alternative)


def kendall_tau_matrix(m: npt.ArrayLike, method: str = "auto", *, variant: str = "b",
                       alternative: str = "two-sided") -> tuple[np.ndarray, np.ndarray]:
    """τ and p-value between every pair of rows (rows are variables), each pair as `kendall_tau`.

    m: ``[V, n]``. Returns ``(tau [V, V], pvalue [V, V])``, symmetric; the diagonal
    holds each row against itself (τ = 1 unless the row is constant or has a NaN).
    Row pairs run in parallel; each row is ranked once.
    """
    _check(method, variant, alternative)
    return _rust.kendall_tau_matrix(_as_float64(m, 2, "m"), method, variant, alternative)


def format_pvalue(p: float) -> str:
    """A p-value for a table: ``3.2e-12`` (two significant digits, scientific); one that
    underflowed to 0 (below the smallest float64) as ``< 1e-300``, never ``0``; NaN as ``—``."""
    p = float(p)
    if not math.isfinite(p):
        return "—"
    return "< 1e-300" if p == 0.0 else f"{p:.1e}"
