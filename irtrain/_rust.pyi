"""Type stubs of the private Rust extension `irtrain._rust` (reach it through
`irtrain.data` and `irtrain.stats`, never from CLI code)."""
from typing import Any, final

import numpy as np
import numpy.typing as npt

__all__ = ["__version__", "Encoder", "Preparer", "StepSplitter", "detect_format", "kendall_tau", "kendall_tau_matrix", "pack_bfd", "write_shards"]
__version__: str

# --------------------------------------------------------------------------- data path (irtrain.data)
_RowErrors = list[tuple[int, str, str]]  # (1-based row, kind: "data"|"template"|"tokenizer"|"io", message)

@final
class Encoder:
    """Renders (chat template), tokenizes (offsets) and masks JSON rows; no packing, no files."""

    def __new__(
        cls,
        tokenizer_file: str,
        chat_template: str,
        special_tokens: list[tuple[str, str]],
        format: str,
        mask: str,
        threads: int = 0,
        fast_bpe: bool = True,
        *,
        template_vars: list[str] = ...,
        clock: int | None = None,
        columns: list[tuple[str, str]] = ...,
        apply_chat_template: bool = True,
    ) -> Encoder: ...
    def encode_jsonl(
        self, buf: bytes, first_row: int = 1, first_example: int = 0
    ) -> tuple[dict[str, npt.NDArray[Any]], _RowErrors]: ...
    def render(self, messages_json: str, add_generation_prompt: bool = False) -> str: ...
    @property
    def tokenizer_hash(self) -> str: ...
    @property
    def fast_bpe(self) -> bool: ...

@final
class Preparer:
    """The `prepare` pipeline writing shards into `out_dir`, fed JSON-lines buffers."""

    def __new__(
        cls,
        tokenizer_file: str,
        chat_template: str,
        special_tokens: list[tuple[str, str]],
        format: str,
        mask: str,
        out_dir: str,
        *,
        max_len: int,
        truncation: str,
        pack: bool,
        shard_rows: int,
        skip_invalid: bool = False,
        threads: int = 0,
        window_tokens: int = 0,
        fast_bpe: bool = True,
        template_vars: list[str] = ...,
        clock: int | None = None,
        columns: list[tuple[str, str]] = ...,
        apply_chat_template: bool = True,
    ) -> Preparer: ...
    def add_jsonl(self, buf: bytes, first_row: int) -> tuple[int, _RowErrors]: ...
    def progress(self) -> tuple[int, int, int]: ...
    @property
    def tokenizer_hash(self) -> str: ...
    @property
    def fast_bpe(self) -> bool: ...
    def finish(self) -> str: ...

def detect_format(line: str, columns: list[tuple[str, str]] = ...) -> str: ...

# --------------------------------------------------------------------------- score states (irtrain.score.steps)
@final
class StepSplitter:
    """score's states (`rust_ext/core/src/steps.rs`) for one tokenizer (its JSON text)."""

    def __new__(cls, tokenizer_json: str) -> StepSplitter: ...
    @property
    def byte_level(self) -> bool: ...
    def token_bytes(self, ids: npt.NDArray[np.uint32]) -> list[bytes]: ...
    def split(
        self,
        arrays: list[tuple[npt.NDArray[np.uint32], npt.NDArray[np.int32], npt.NDArray[np.int64]]],
        delimiter: bytes,
    ) -> dict[str, npt.NDArray[Any]]: ...

def pack_bfd(lengths: npt.NDArray[np.int64], capacity: int) -> list[list[int]]: ...
def write_shards(
    out_dir: str,
    shard_rows: int,
    input_ids: npt.NDArray[np.uint32],
    labels: npt.NDArray[np.int32],
    seg_offsets: npt.NDArray[np.int64],
    seg_example: npt.NDArray[np.int64],
    seg_part: npt.NDArray[np.int32],
    seg_score: npt.NDArray[np.float32],
    row_segments: npt.NDArray[np.int64],
) -> str: ...

# --------------------------------------------------------------------------- statistics (irtrain.stats)
def kendall_tau(
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.float64],
    method: str = "auto",
    variant: str = "b",
    alternative: str = "two-sided",
) -> tuple[float, float]: ...
def kendall_tau_matrix(
    m: npt.NDArray[np.float64],
    method: str = "auto",
    variant: str = "b",
    alternative: str = "two-sided",
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]: ...
