//! `#[pyfunction]` wrappers over `irtrain_core::kendall`. Numbers in, numbers out;
//! the GIL is released around the O(n log n) work. Reached through `irtrain.stats`.
use std::borrow::Cow;

use irtrain_core::{kendall, CoreError};
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

/// Kendall tau-b and its two-sided asymptotic p-value of two equally long 1-D float64 arrays.
#[pyfunction]
fn kendall_tau(py: Python<'_>, x: PyReadonlyArray1<'_, f64>, y: PyReadonlyArray1<'_, f64>) -> PyResult<(f64, f64)> {
    let (xs, ys) = (values(&x), values(&y));
    let r = py.detach(|| kendall::kendall_tau(&xs, &ys)).map_err(to_pyerr)?;
    Ok((r.tau, r.pvalue))
}

/// Kendall tau-b and p-value between every pair of rows of a 2-D float64 array.
#[pyfunction]
fn kendall_tau_matrix<'py>(
    py: Python<'py>,
    m: PyReadonlyArray2<'py, f64>,
) -> PyResult<(Bound<'py, PyArray2<f64>>, Bound<'py, PyArray2<f64>>)> {
    let (n_vars, n_obs) = (m.shape()[0], m.shape()[1]);
    let data = values(&m);
    let (tau, p) = py.detach(|| kendall::kendall_tau_matrix(&data, n_vars, n_obs)).map_err(to_pyerr)?;
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
