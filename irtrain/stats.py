"""Rank statistics, computed in Rust (`irtrain._rust`, `rust_ext/core/src/kendall.rs`).

Kendall's τ-b with ties (FORMULAS.md, "Value ranking") in O(n log n), and its
two-sided p-value by the asymptotic normal approximation. Both agree with
``scipy.stats.kendalltau(x, y, method="asymptotic")``: τ to 1e-12, p to 1e-9.

Edge cases follow scipy: fewer than two observations, or a constant variable,
give ``(nan, nan)``; a NaN in the input gives ``(nan, nan)`` (scipy's default
``nan_policy="propagate"``). For n = 2 scipy's asymptotic branch raises
``ZeroDivisionError``; here that variance term (identically 0 for n = 2) is taken
as 0, so the p-value is ``erfc(1/√2) ≈ 0.3173``. Inputs are converted to float64
(integers beyond 2**53 lose precision). Mismatched lengths and arrays of the
wrong dimension raise `irtrain.errors.DataError`.
"""
from __future__ import annotations

import numpy as np
import numpy.typing as npt

from irtrain import _rust
from irtrain.errors import DataError


def _as_float64(a: npt.ArrayLike, ndim: int, name: str) -> np.ndarray:
    arr = np.ascontiguousarray(a, dtype=np.float64)
    if arr.ndim != ndim:
        raise DataError(f"{name} must be {ndim}-D, got an array of shape {arr.shape}")
    return arr


def kendall_tau(x: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, float]:
    """Kendall's τ-b of two samples and its two-sided p-value.

    x, y: 1-D, the same length n (any real dtype; read as float64).
    Returns ``(tau_b, pvalue)`` as Python floats.
    """
    return _rust.kendall_tau(_as_float64(x, 1, "x"), _as_float64(y, 1, "y"))


def kendall_tau_matrix(m: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """τ-b and p-value between every pair of rows (rows are variables).

    m: ``[V, n]``. Returns ``(tau [V, V], pvalue [V, V])``, symmetric; the diagonal
    holds each row against itself (τ = 1 unless the row is constant or has a NaN).
    Row pairs run in parallel; each row is ranked once.
    """
    return _rust.kendall_tau_matrix(_as_float64(m, 2, "m"))
