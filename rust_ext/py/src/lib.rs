//! `irtrain._rust`: this file only lists the exports. Wrappers live in the
//! per-area files; errors map once in `errors.rs`.
use pyo3::prelude::*;

mod data;
mod errors;
mod stats;

#[pymodule]
fn _rust(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    errors::register(m)?;
    data::register(m)?;
    stats::register(m)?;
    Ok(())
}
