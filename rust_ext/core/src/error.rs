//! The core's one error type. The bindings map each variant onto one Python
//! exception class under `irtrain.errors.IrtrainError` (see `rust_ext/py/src/errors.rs`).
use thiserror::Error;

#[derive(Debug, Error)]
pub enum CoreError {
    /// Input the user gave is malformed (bad row, bad shape, bad value).
    #[error("{0}")]
    Input(String),
    /// A chat template failed to parse or render.
    #[error("{0}")]
    Template(String),
    /// The tokenizer could not be loaded or failed to encode.
    #[error("{0}")]
    Tokenizer(String),
    /// Reading or writing files failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, CoreError>;
