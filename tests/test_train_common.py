"""Helpers shared by the training tests (data made here, from token lists), and tests of
the loop's pure pieces: the data plan, the micro-batch split, the lr schedule."""
from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import pytest

from irtrain.shards import Segment, write_shard_set


def tokenizer_hash(tokenizer) -> str:
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()


def arithmetic_conversations(n: int, seed: int) -> list[list[dict[str, str]]]:
    """Tiny deterministic task: 'Compute: a + b - c' -> worked answer."""
    rng = random.Random(seed)
    convs = []
    for _ in range(n):
        a, b, c = rng.randint(1, 9), rng.randint(1, 9), rng.randint(1, 9)
        convs.append([
            {"role": "user", "content": f"Compute: {a} + {b} - {c}"},
            {"role": "assistant", "content": f"{a} + {b} = {a + b}\n\n{a + b} - {c} = {a + b - c}\n\nAnswer: {a + b - c}"},
        ])
    return convs


def tokenize_chat(tokenizer, conv: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 on the prompt) of one conversation, last turn trained."""
    full = tokenizer.apply_chat_template(conv, tokenize=False)
    prompt = tokenizer.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)
    assert full.startswith(prompt)
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert ids[: len(p_ids)] == p_ids
    return ids, [-100] * len(p_ids) + ids[len(p_ids):]


def pack(segments: list[Segment], max_len: int) -> list[list[Segment]]:
    """Greedy packing in order (a test fixture, not `prepare`'s best-fit)."""
    rows, cur, n = [], [], 0
    for s in segments:
        if cur and n + len(s.input_ids) > max_len:
            rows.append(cur)
            cur, n = [], 0
        cur.append(s)
        n += len(s.input_ids)
    if cur:
        rows.append(cur)
    return rows


def make_sft_shards(tokenizer, out: Path, *, n: int, seed: int = 0, max_len: int = 128, fmt: str = "chat",
                    tok_hash: str | None = None) -> Path:
    segs = []
    for i, conv in enumerate(arithmetic_conversations(n, seed)):
        ids, labels = tokenize_chat(tokenizer, conv)
        segs.append(Segment(ids, labels, example=i))
    write_shard_set(out, fmt, pack(segs, max_len), max_len=max_len,
                    tokenizer_hash=tokenizer_hash(tokenizer) if tok_hash is None else tok_hash)
    return out


def make_preference_shards(tokenizer, out: Path, *, n: int, seed: int = 1, max_len: int = 256) -> Path:
    """Pairs whose rejected answer has a wrong final result."""
    rows = []
    for i, conv in enumerate(arithmetic_conversations(n, seed)):
        ids_w, lab_w = tokenize_chat(tokenizer, conv)
        bad = [conv[0], {"role": "assistant", "content": conv[1]["content"].rsplit("Answer: ", 1)[0] + "Answer: 17"}]
        ids_l, lab_l = tokenize_chat(tokenizer, bad)
        rows.append([Segment(ids_w, lab_w, example=i, part=0), Segment(ids_l, lab_l, example=i, part=1)])
    write_shard_set(out, "preference", rows, max_len=max_len, tokenizer_hash=tokenizer_hash(tokenizer))
    return out
