"""Where the steps of a response end: each token's exact bytes, and the step-end tokens.

A step ends where its delimiter ends (the delimiter belongs to the step it closes; a run
of delimiters counts as one; a delimiter at the very start opens no step), and the last
step ends at the response's last token. "Last token" is exact at the byte level: each
token's bytes are known (byte-level BPE: its byte alphabet; otherwise incremental
decoding), and the token holding a step's last byte ends that step. When two steps end
in the same token (a token holding a delimiter run and more), the later one is kept.
"""
from __future__ import annotations

import json
import re
from typing import Any

import numpy as np


def unescape(s: str) -> str:
    r"""`\n`, `\t`, `\r` and `\\` typed on a command line become the characters."""
    return re.sub(r"\\([ntr\\])", lambda m: {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}[m.group(1)], s)


def token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """The exact bytes each token contributes to the decoded text.

    Byte-level BPE (GPT-2, Llama-3, Qwen, ...): through the byte alphabet, added tokens
    as their content. Otherwise: incremental decoding (each token gets the text its
    decoding adds, so a character split over several tokens belongs to the last one).
    """
    table = _byte_decoder(tokenizer)
    if table is not None:
        added = {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
        pieces = []
        for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
            if i in added:
                pieces.append(added[i].encode("utf-8"))
            elif t is not None and all(c in table for c in t):
                pieces.append(bytes(table[c] for c in t))
            else:
                return incremental_token_bytes(tokenizer, ids)
        return pieces
    return incremental_token_bytes(tokenizer, ids)


def incremental_token_bytes(tokenizer: Any, ids: list[int]) -> list[bytes]:
    """Per-token bytes by incremental decoding (any tokenizer). Two decodes of a small window
    that start at the same token (so decoders that strip a leading space agree) give each
    token the text it adds; a trailing incomplete character (U+FFFD) waits for the token
    that completes it, so every character belongs to the token holding its last byte."""
    dec = lambda a, b: tokenizer.decode(ids[a:b], skip_special_tokens=False,  # noqa: E731
                                        clean_up_tokenization_spaces=False)
    pieces: list[bytes] = []
    prefix, read, extra = 0, 0, 0  # window start; tokens before `read` are all emitted; chars emitted past them
    for k in range(len(ids)):
        before = dec(prefix, read)
        now = dec(prefix, k + 1)
        stable = len(now)
        if k < len(ids) - 1:
            while stable > 0 and now[stable - 1] == "\ufffd":
                stable -= 1
        start = len(before) + extra
        pieces.append(now[start:stable].encode("utf-8") if stable > start else b"")
        extra += max(0, stable - start)
        if stable == len(now):  # nothing pending: slide the window
            prefix, read, extra = read, k + 1, 0
    return pieces


_BYTE_DECODERS: dict[int, dict[str, int] | None] = {}


def _byte_decoder(tokenizer: Any) -> dict[str, int] | None:
    """The char -> byte table of a byte-level BPE tokenizer, or None."""
    key = id(tokenizer)
    if key not in _BYTE_DECODERS:
        table = None
        try:
            spec = json.loads(tokenizer.backend_tokenizer.to_str())
            dec = spec.get("decoder") or {}
            types = [dec.get("type")] + [d.get("type") for d in dec.get("decoders", []) or []]
            if "ByteLevel" in types:
                table = {c: b for b, c in _bytes_to_unicode().items()}
        except (AttributeError, ValueError):
            table = None
        _BYTE_DECODERS[key] = table
    return _BYTE_DECODERS[key]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (used by every ByteLevel BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def step_ends(pieces: list[bytes], delimiter: bytes) -> list[int]:
    """Index (into `pieces`) of the token that ends each step; see the module docstring.
    Never empty for a non-empty response; strictly increasing; the last is len(pieces) - 1."""
    if not pieces:
        return []
    text = b"".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])  # byte end of each token
    boundaries = []
    i = 0
    while (j := text.find(delimiter, i)) != -1:
        e = j + len(delimiter)
        while text.startswith(delimiter, e):  # a run of delimiters is one boundary
            e += len(delimiter)
        if j > 0:  # a delimiter at the very start opens no step
            boundaries.append(e)
        i = e
    tokens = [min(int(np.searchsorted(ends, b, side="left")), len(pieces) - 1) for b in boundaries if b < len(text)]
    tokens.append(len(pieces) - 1)
    out: list[int] = []
    for t in tokens:  # two steps ending in one token: keep one
        if out and out[-1] == t:
            continue
        out.append(t)
    return out
