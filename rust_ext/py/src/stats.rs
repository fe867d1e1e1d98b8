//! `#[pyfunction]` wrappers over `irtrain_core::kendall`. Numbers in, numbers out;
//! the GIL is released around the O(n log n) work. Reached through `irtrain.stats`.
use std::borrow::Cow;

use irtrain_core::kendall::{self, Alternative, Method, Options, Variant};
use irtrain_core::CoreError;
use numpy::{PyArray1, PyArray2, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::prelude::*;

use crate::errors::to_pyerr;

/// The array's values in C order, borrowed when contiguous.
fn values<'a, D: numpy::ndarray::Dimension>(a: &'a numpy::PyReadonlyArray<'_, f64, D>) -> Cow<'a, [f64]> {
    match a.as_slice() {
        Ok(s) => Cow::Borrowed(s),
        Err(_) => Cow::Owned(a.as_array().iter().copied().collect()),
    }
}

/// scipy's spelling of the options (`method`, `variant`, `alternative`).
fn options(method: &str, variant: &str, alternative: &str) -> PyResult<Options> {
    let bad = |what: &str, v: &str, ok: &str| to_pyerr(CoreError::Input(format!("kendall_tau: {what} {v:?} is not one of {ok}")));
    Ok(Options {
        method: match method {
            "auto" => Method::Auto,
            "asymptotic" => Method::Asymptotic,
            "exact" => Method::Exact,
            _ => return Err(bad("method", method, "auto, asymptotic, exact")),
        },
        variant: match variant {
            "b" => Variant::B,
            "c" => Variant::C,
            _ => return Err(bad("variant", variant, "b, c")),
        },
        alternative: match alternative {
            "two-sided" => Alternative::TwoSided,
            "less" => Alternative::Less,
            "greater" => Alternative::Greater,
            _ => return Err(bad("alternative", alternative, "two-sided, less, greater")),
        },
    })
}

/// Kendall tau and its p-value of two equally long 1-D float64 arrays (scipy's options).
#[pyfunction]
#[pyo3(signature = (x, y, method = "auto", variant = "b", alternative = "two-sided"))]
fn kendall_tau(
    py: Python<'_>,
    x: PyReadonlyArray1<'_, f64>,
    y: PyReadonlyArray1<'_, f64>,
    method: &str,
    variant: &str,
    alternative: &str,
) -> PyResult<(f64, f64)> {
    let opts = options(method, variant, alternative)?;
    let (xs, ys) = (values(&x), values(&y));
    let r = py.detach(|| kendall::kendall_tau(&xs, &ys, opts)).map_err(to_pyerr)?;
    Ok((r.tau, r.pvalue))
}

/// The tau and p-value matrices, `[n_vars, n_vars]` each.
type Square<'py> = (Bound<'py, PyArray2<f64>>, Bound<'py, PyArray2<f64>>);

/// Kendall tau and p-value between every pair of rows of a 2-D float64 array.
#[pyfunction]
#[pyo3(signature = (m, method = "auto", variant = "b", alternative = "two-sided"))]
fn kendall_tau_matrix<'py>(
    py: Python<'py>,
    m: PyReadonlyArray2<'py, f64>,
    method: &str,
    variant: &str,
    alternative: &str,
) -> PyResult<Square<'py>> {
    let opts = options(method, variant, alternative)?;
    let (n_vars, n_obs) = (m.shape()[0], m.shape()[1]);
    let data = values(&m);
    let (tau, p) = py.detach(|| kendall::kendall_tau_matrix(&data, n_vars, n_obs, opts)).map_err(to_pyerr)?;
    let square = |v: Vec<f64>| {
        PyArray1::from_vec(py, v)
            .reshape([n_vars, n_vars])
            .map_err(|e| to_pyerr(CoreError::Input(e.to_string())))
    };
    Ok((square(tau)?, square(p)?))
}

pub fn register(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(kendall_tau, m)?)?;
    m.add_function(wrap_pyfunction!(kendall_tau_matrix, m)?)?;
    Ok(())
}
