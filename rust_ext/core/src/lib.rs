//! irtrain-core: the pure-Rust core behind `irtrain._rust`.
//!
//! Each module holds one piece of logic with its own `#[cfg(test)]` tests;
//! the pyo3 bindings live in the separate `irtrain-py` crate.
pub mod error;
pub mod kendall;
// data path (`irtrain prepare`)
pub mod mask;
pub mod pack;
pub mod plain;
pub mod prepare;
pub mod rows;
pub mod shard;
pub mod sharegpt;
// score's states
pub mod steps;
pub mod template;
pub mod tokenize;

pub use error::{CoreError, Result};
