"""Where the steps of a response end, and its states: computed in Rust (`rust_ext/core/src/steps.rs`,
the Python face of which this module is), over all segments in one call, outside the GIL.

A response (the tokens whose label is not -100) is its content, then the end-of-turn token
when there is one, then what the template appends after the turn:

- the end-of-turn token is the first *special* token (an added token flagged special:
  `<|im_end|>`, `<|eot_id|>`, `</s>`) of the response's trailing run of special and
  whitespace-only tokens (ChatML's `<|im_end|>\\n`; `<|end|>\\n<|endoftext|>`); a response
  without one is all content;
- the content is cut into steps: a step ends where its delimiter ends (the delimiter
  belongs to the step it closes; a run of delimiters counts as one; a delimiter at the very
  start opens no step), at the token holding that byte; the last step ends at the last
  content token; when two steps end in the same token, one is kept;
- the states are `s_0` (the last prompt position), the end of every step, and the
  end-of-turn token as the *terminal* state; nothing after it is a state.

Token bytes are exact: byte-level BPE through its byte alphabet (added tokens as their
content); any other tokenizer by incremental decoding (each token gets the text its decoding
adds, so a character split over several tokens belongs to the last one). The Python reference
implementation is in `tests/test_score_steps.py` (and the old per-token Python splitting, as
the baseline, in `bench/score_steps.py`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from irtrain.data import step_splitter
from irtrain.errors import TokenizerError


def unescape(s: str) -> str:
    r"""`\n`, `\t`, `\r` and `\\` typed on a command line become the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], s)


@dataclass
class States:
    """The states of every segment with a response, in segment order: `segment` [N] (index over
    all the arrays given), `offsets` [N+1] into `states` (token positions in the segment: s_0,
    the end of each step, then the end-of-turn token where `terminal` [N] is set)."""

    segment: np.ndarray
    offsets: np.ndarray
    states: np.ndarray
    terminal: np.ndarray


def splitter(tokenizer: Any) -> Any:
    """The Rust step splitter for a transformers (fast) tokenizer: its per-vocabulary tables
    built once from the tokenizer's own serialization."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError("the model's tokenizer is not a fast (tokenizers) tokenizer; irtrain needs tokenizer.json")
    return step_splitter(backend.to_str())


def token_bytes(tokenizer: Any, ids: list[int] | np.ndarray) -> list[bytes]:
    """The exact bytes each token contributes to the decoded text (see the module docstring)."""
    return splitter(tokenizer).token_bytes(np.asarray(ids, dtype=np.uint32))


def split_states(tokenizer: Any, arrays: list[tuple[np.ndarray, np.ndarray, np.ndarray]], delimiter: str) -> States:
    """The states of every segment of every (input_ids, labels, seg_offsets [S+1]) triple
    (a shard's arrays), in one Rust call; segments with no trained token are left out."""
    typed = [(np.asarray(i, dtype=np.uint32), np.asarray(lab, dtype=np.int32), np.asarray(o, dtype=np.int64))
             for i, lab, o in arrays]
    out = splitter(tokenizer).split(typed, delimiter.encode("utf-8"))
    return States(segment=out["segment"], offsets=out["offsets"], states=out["states"], terminal=out["terminal"])
