//! The one place where `irtrain_core::CoreError` becomes a Python exception.
//! The Python classes are defined in `irtrain/errors.py`; this module imports
//! them so that `except irtrain.errors.DataError` catches errors raised in Rust.
use irtrain_core::CoreError;
use pyo3::prelude::*;
use pyo3::types::PyModule;

fn exception_class(py: Python<'_>, name: &str) -> PyResult<Py<PyAny>> {
    Ok(PyModule::import(py, "irtrain.errors")?.getattr(name)?.unbind())
}

/// Convert a core error into the matching `irtrain.errors` exception.
pub fn to_pyerr(err: CoreError) -> PyErr {
    let (class, msg) = match &err {
        CoreError::Input(m) => ("DataError", m.clone()),
        CoreError::Template(m) => ("TemplateError", m.clone()),
        CoreError::Tokenizer(m) => ("TokenizerError", m.clone()),
        CoreError::Io(e) => ("IrtrainIOError", e.to_string()),
    };
    Python::attach(|py| match exception_class(py, class) {
        Ok(cls) => match cls.bind(py).call1((msg.clone(),)) {
            Ok(inst) => PyErr::from_value(inst),
            Err(e) => e,
        },
        Err(e) => e,
    })
}

pub fn register(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
