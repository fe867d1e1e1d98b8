//! irtrain-core: the pure-Rust core behind `irtrain._rust`.
//!
//! Each module holds one piece of logic with its own `#[cfg(test)]` tests;
//! the pyo3 bindings live in the separate `irtrain-py` crate.
pub mod error;

pub use error::{CoreError, Result};
