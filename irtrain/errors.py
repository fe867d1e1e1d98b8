"""irtrain's exceptions: one hierarchy, everything under `IrtrainError`.

The CLI prints the message of any `IrtrainError` (no traceback) and exits 1.
Errors raised in the Rust extension are mapped onto these classes once, in
`rust_ext/py/src/errors.rs`.
"""
from __future__ import annotations


class IrtrainError(Exception):
    """Base class of every error irtrain raises on purpose."""


class ConfigError(IrtrainError):
    """A config file or flag is wrong: unknown key, bad value, impossible combination."""


class DataError(IrtrainError):
    """Input data is malformed. Carries the file and row when known.

    `str(err)` reads ``FILE:ROW: message`` (row 1-based), so users can jump to it.
    """

    def __init__(self, message: str, *, path: str | None = None, row: int | None = None):
        self.message = message
        self.path = path
        self.row = row
        where = ""
        if path is not None:
            where = f"{path}:{row}: " if row is not None else f"{path}: "
        super().__init__(where + message)


class TemplateError(DataError):
    """A chat template failed to parse or to render a conversation."""


class TokenizerError(IrtrainError):
    """A tokenizer could not be loaded or does not fit the data or model."""


class ShardError(IrtrainError):
    """A shard directory is missing, incomplete, corrupted or of the wrong kind."""


class ReferenceMismatchError(IrtrainError):
    """Precomputed reference log-probs were made for another model, tokenizer or data."""


class CorruptCacheError(ReferenceMismatchError):
    """A cache file is truncated, corrupted or from another format version: recomputed, with a warning."""


class TrainingError(IrtrainError):
    """Training cannot continue (e.g. too many non-finite steps in a row)."""


class IrtrainIOError(IrtrainError):
    """Reading or writing a file failed."""


class LockedError(IrtrainError):
    """Another run holds the output directory (see `irtrain.paths.OutLock`)."""


class MissingExtraError(ConfigError):
    """An optional package a flag needs is not installed; the message names the pip command."""
