"""score's step splitting: the old per-token Python path against the Rust one, on 10,000 traces.

    python bench/score_steps.py                      # the BENCHMARKS.md table (smollm2's tokenizer if present)
    python bench/score_steps.py --tokenizer toy      # the tests' byte-level toy tokenizer (no download)
    python bench/score_steps.py --traces 500         # a smoke run

Traces are reasoning responses of 3-8 steps in ChatML (`<|im_end|>\\n` trained), packed
2-4 per row into shards. Timed (median of `--repeats`, wall and process CPU seconds, the
load average printed):

- `python`: the splitting score had before, kept here verbatim as the baseline (per segment:
  `token_bytes`, each token's characters through the byte alphabet, then `step_ends`);
- `python+eot`: the same plus the end-of-turn rule, i.e. the Python reference of today's
  states (`tests/test_score_steps.py`);
- `rust`: `irtrain.score.read_segments` (one Rust call over all segments, GIL released).

The Rust states must equal `python+eot`'s exactly (checked on every trace), and today's
`python` ones but for the last state. Prints one JSON line; writes it to `--out` if given.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
REAL = Path("/root/.cache/irtrain/smollm2-135m-instruct-float32")


# --------------------------------------------------------------------------- the old Python path (baseline)
def old_token_bytes(tokenizer: Any, ids: list[int], table: dict[str, int] | None, added: dict[int, str]) -> list[bytes]:
    if table is not None:
        pieces = []
        for i, t in zip(ids, tokenizer.convert_ids_to_tokens(ids)):
            if i in added:
                pieces.append(added[i].encode("utf-8"))
            elif t is not None and all(c in table for c in t):
                pieces.append(bytes(table[c] for c in t))
            else:
                raise SystemExit("not a byte-level vocabulary")  # the bench's tokenizers all are
        return pieces
    raise SystemExit("not a byte-level tokenizer")


def byte_decoder(tokenizer: Any) -> dict[str, int] | None:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    dec = spec.get("decoder") or {}
    if "ByteLevel" not in [dec.get("type")] + [d.get("type") for d in dec.get("decoders", []) or []]:
        return None
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def old_step_ends(pieces: list[bytes], delimiter: bytes) -> list[int]:
    if not pieces:
        return []
    text = b"".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    boundaries = []
    i = 0
    while (j := text.find(delimiter, i)) != -1:
        e = j + len(delimiter)
        while text.startswith(delimiter, e):
            e += len(delimiter)
        if j > 0:
            boundaries.append(e)
        i = e
    tokens = [min(int(np.searchsorted(ends, b, side="left")), len(pieces) - 1) for b in boundaries if b < len(text)]
    tokens.append(len(pieces) - 1)
    out: list[int] = []
    for t in tokens:
        if out and out[-1] == t:
            continue
        out.append(t)
    return out


def end_of_turn(pieces: list[bytes], special: list[bool]) -> int | None:
    eot = None
    for k in range(len(pieces) - 1, -1, -1):
        if special[k]:
            eot = k
        elif pieces[k].strip(b" \t\n\r\x0b\x0c"):
            break
    return eot


def python_states(shards: Any, tokenizer: Any, delim: bytes, *, eot_rule: bool) -> list[list[int]]:
    """The old `read_segments` loop (per row, per segment), optionally with the end-of-turn rule."""
    table = byte_decoder(tokenizer)
    added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
    specials = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    out = []
    for r in range(len(shards)):
        row = shards.row(r)
        labels = np.asarray(row.labels)
        ids = np.asarray(row.input_ids)
        for s in range(len(row.cu_seqlens) - 1):
            a, b = int(row.cu_seqlens[s]), int(row.cu_seqlens[s + 1])
            resp = np.flatnonzero(labels[a:b] != -100)
            if len(resp) == 0:
                continue
            r_ids = ids[a:b][resp].tolist()
            pieces = old_token_bytes(tokenizer, r_ids, table, added)
            if eot_rule:
                eot = end_of_turn(pieces, [i in specials for i in r_ids])
                ends = old_step_ends(pieces[:eot], delim) + ([eot] if eot is not None else [])
            else:
                ends = old_step_ends(pieces, delim)
            out.append([int(resp[0]) - 1] + resp[ends].tolist())
    return out


# --------------------------------------------------------------------------- data
def traces(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    words = ["so", "the", "sum", "is", "we", "check", "carry", "then", "café", "naïve", "日本語", "🎉", "x", "y", "=", "+"]
    out = []
    for i in range(n):
        steps = [f"Step {k + 1}: " + " ".join(rng.choice(words, size=int(rng.integers(4, 16)))) + f" {int(rng.integers(0, 999))}."
                 for k in range(int(rng.integers(3, 9)))]
        out.append((f"what is {i} plus {i * 3}?", "\n\n".join(steps)))
    return out


def build_shards(tok: Any, n: int, out: Path) -> Path:
    from irtrain.shards import Segment, write_shard_set

    segs = []
    for i, (p, r) in enumerate(traces(n)):
        prompt = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        p_ids = tok(prompt, add_special_tokens=False).input_ids
        r_ids = tok(r + "<|im_end|>\n", add_special_tokens=False).input_ids
        segs.append(Segment(p_ids + r_ids, [-100] * len(p_ids) + r_ids, example=i))
    rows, k, rng = [], 0, np.random.default_rng(1)
    while k < len(segs):
        m = int(rng.integers(2, 5))
        rows.append(segs[k:k + m])
        k += m
    write_shard_set(out, "chat", rows, max_len=4096)
    return out


def timed(fn: Any, repeats: int) -> tuple[float, float, Any]:
    walls, cpus, res = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        res = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus), res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", choices=["smollm2", "toy"], default="smollm2" if REAL.is_dir() else "toy")
    ap.add_argument("--traces", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the result JSON here too")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from transformers import AutoTokenizer

    from irtrain.score import read_segments
    from irtrain.shards import ShardSet

    with tempfile.TemporaryDirectory(prefix="irtrain-bench-steps-") as tmp:
        if args.tokenizer == "smollm2":
            tok_dir = REAL
        else:
            from conftest import TEXTS

            from irtrain.toy import train_tokenizer

            tok_dir = train_tokenizer(TEXTS, Path(tmp) / "tok", template="chatml", vocab_size=500)
        tok = AutoTokenizer.from_pretrained(str(tok_dir))
        shards = ShardSet(build_shards(tok, args.traces, Path(tmp) / "shards"))
        delim = "\n\n"
        py_w, py_c, old = timed(lambda: python_states(shards, tok, delim.encode(), eot_rule=False), args.repeats)
        pe_w, pe_c, ref = timed(lambda: python_states(shards, tok, delim.encode(), eot_rule=True), args.repeats)
        rs_w, rs_c, segs = timed(lambda: read_segments(shards, tok, delim, max_len=4096), args.repeats)
        got = [s.states.tolist() for s in segs]
        if got != ref:
            raise SystemExit("the Rust states differ from the Python reference")
        # today's states but the last: [.., last content token, end-of-turn token] for [.., last token]
        if any(g[:-2] != o[:-1] or g[-1] != o[-1] - 1 for g, o in zip(got, old)):
            raise SystemExit("the Rust states differ from the old ones other than at the end")
        res = {"tokenizer": args.tokenizer, "traces": len(got), "tokens": int(sum(int(n) for n in shards.row_lengths)),
               "states": int(sum(len(g) for g in got)), "python_s": round(py_w, 4), "python_cpu_s": round(py_c, 4),
               "python_eot_s": round(pe_w, 4), "rust_s": round(rs_w, 4), "rust_cpu_s": round(rs_c, 4),
               "speedup": round(py_w / rs_w, 1), "speedup_vs_reference": round(pe_w / rs_w, 1),
               "cpu_speedup": round(py_c / rs_c, 1) if rs_c > 0 else None, "identical": True,
               "loadavg": [round(x, 2) for x in os.getloadavg()], "cpus": os.cpu_count()}
    line = json.dumps(res)
    print(line)
    if args.out:
        Path(args.out).write_text(line + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
