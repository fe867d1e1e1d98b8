"""The shard format written by `irtrain prepare` and read by everything else.

A shard directory::

    OUT/
      manifest.json              # see MANIFEST below; written last (atomic rename of OUT)
      shard-00000/               # one folder per shard, arrays as flat little-endian files
        input_ids.bin   <u4  [N]    token ids, rows concatenated
        labels.bin      <i4  [N]    = input_ids where trained, -100 elsewhere (NOT shifted)
        position_ids.bin <i4 [N]    restart at 0 at every segment
        row_offsets.bin <i8  [R+1]  token offset of each packed row
        seg_offsets.bin <i8  [S+1]  token offset of each segment (document); cu_seqlens
        seg_example.bin <i8  [S]    source example id of the segment (0-based over all inputs)
        seg_part.bin    <i4  [S]    0 single/chosen/desirable; 1 rejected; k = candidate rank (0 best)
        seg_score.bin   <f4  [S]    ranked: candidate score; unpaired: 1.0/0.0 label; else NaN
      shard-00001/ ...

Rules every writer keeps and every reader may rely on:
- A segment is one tokenized sequence (prompt + response rendered together).
- Rows never split an example: a preference pair's chosen and rejected, and all
  K candidates of a ranked example, sit in the same row, consecutively, in
  `seg_part` order.
- The first token of every segment has label -100 (nothing in the segment
  predicts it, and in a packed row the previous segment must not).
- Row and segment offsets are absolute within the shard; ``row_offsets[0] ==
  seg_offsets[0] == 0`` and both end at N. Segment boundaries include all row
  boundaries.

MANIFEST (``manifest.json``)::

    {"irtrain_shards": 1, "format": "chat"|"preference"|"prompt-completion"|"unpaired"|"ranked"|"text",
     "packed": bool, "max_len": int,
     "tokenizer_hash": str, "chat_template_hash": str,
     "sources": [{"path": str, "sha256": str, "rows": int}], "config": {...},
     "report": {...},
     "shards": [{"name": "shard-00000", "rows": R, "segments": S, "tokens": N,
                 "sha256": {"input_ids.bin": "...", ...}}],
     "content_hash": str}   # hash of the shards' checksums: identifies the data
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from irtrain.durable import publish
from irtrain.errors import ShardError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
IGNORE_INDEX = -100
FORMATS = ("chat", "preference", "prompt-completion", "unpaired", "ranked", "text")
#: the formats `irtrain sft` trains on (one response per example; `text`: plain language modelling)
SFT_FORMATS = ("chat", "prompt-completion", "text")

#: name -> (numpy dtype, indexed by: "token" | "row+1" | "seg+1" | "seg")
ARRAYS: dict[str, tuple[str, str]] = {
    "input_ids": ("<u4", "token"),
    "labels": ("<i4", "token"),
    "position_ids": ("<i4", "token"),
    "row_offsets": ("<i8", "row+1"),
    "seg_offsets": ("<i8", "seg+1"),
    "seg_example": ("<i8", "seg"),
    "seg_part": ("<i4", "seg"),
    "seg_score": ("<f4", "seg"),
}


_verified: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _checked_sha256(path: Path) -> str:
    """`file_sha256`, once per file version in a process (keyed by path, size and mtime): a shard
    set opened again in the same run (stages, evaluation) is not hashed again."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _verified:
        _verified[key] = file_sha256(path)
    return _verified[key]


def content_hash(shards: list[dict[str, Any]]) -> str:
    """Hash identifying the data of a shard set: its per-file checksums, in order."""
    h = hashlib.sha256()
    for s in shards:
        for name in sorted(s["sha256"]):
            h.update(f"{s['name']}/{name}={s['sha256'][name]}\n".encode())
    return h.hexdigest()


@dataclass
class Row:
    """One packed row. Arrays are numpy views; `cu_seqlens` is relative to the row."""

    input_ids: np.ndarray  # [T] uint32
    labels: np.ndarray  # [T] int32
    position_ids: np.ndarray  # [T] int32
    cu_seqlens: np.ndarray  # [S_row + 1] int64, starts at 0, ends at T
    seg_example: np.ndarray  # [S_row]
    seg_part: np.ndarray  # [S_row]
    seg_score: np.ndarray  # [S_row]

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


class Shard:
    """One shard folder, memory-mapped."""

    def __init__(self, root: Path, meta: dict[str, Any]):
        self.root = root / meta["name"]
        self.meta = meta
        self.arrays: dict[str, np.ndarray] = {}
        for name, (dtype, _) in ARRAYS.items():
            path = self.root / f"{name}.bin"
            if not path.is_file():
                raise ShardError(f"{path} is missing: the shard directory is incomplete")
            size = path.stat().st_size
            itemsize = np.dtype(dtype).itemsize
            if size == 0:
                self.arrays[name] = np.zeros(0, dtype=dtype)
            elif size % itemsize:
                raise ShardError(f"{path}: size {size} is not a multiple of {itemsize}")
            else:
                self.arrays[name] = np.memmap(path, dtype=dtype, mode="r")
        n_rows = len(self.arrays["row_offsets"]) - 1
        n_segs = len(self.arrays["seg_offsets"]) - 1
        n_tok = len(self.arrays["input_ids"])
        if n_rows != meta.get("rows") or n_segs != meta.get("segments") or n_tok != meta.get("tokens"):
            raise ShardError(f"{self.root}: array sizes do not match manifest.json")

    @property
    def num_rows(self) -> int:
        return int(self.meta["rows"])

    @cached_property
    def row_lengths(self) -> np.ndarray:
        """[R] int64 tokens of each packed row."""
        return np.diff(np.asarray(self.arrays["row_offsets"], dtype=np.int64))

    @cached_property
    def row_segments(self) -> np.ndarray:
        """[R] int64 segments of each packed row (rows start at segment boundaries)."""
        ro = np.asarray(self.arrays["row_offsets"], dtype=np.int64)
        so = np.asarray(self.arrays["seg_offsets"], dtype=np.int64)
        return np.diff(np.searchsorted(so, ro, side="left")).astype(np.int64)

    @cached_property
    def segment_response_tokens(self) -> np.ndarray:
        """[S] int64 response tokens (label != -100) of each segment."""
        return response_tokens_per_segment(self.arrays["labels"], self.arrays["seg_offsets"])

    def row(self, i: int) -> Row:
        a = self.arrays
        start, end = int(a["row_offsets"][i]), int(a["row_offsets"][i + 1])
        so = a["seg_offsets"]
        s0 = int(np.searchsorted(so, start, side="left"))
        s1 = int(np.searchsorted(so, end, side="left"))
        return Row(
            input_ids=a["input_ids"][start:end],
            labels=a["labels"][start:end],
            position_ids=a["position_ids"][start:end],
            cu_seqlens=np.asarray(so[s0 : s1 + 1], dtype=np.int64) - start,
            seg_example=a["seg_example"][s0:s1],
            seg_part=a["seg_part"][s0:s1],
            seg_score=a["seg_score"][s0:s1],
        )

    def verify(self) -> None:
        for name, digest in self.meta["sha256"].items():
            if _checked_sha256(self.root / name) != digest:
                raise ShardError(f"{self.root / name}: checksum does not match manifest.json (corrupted or modified); "
                                 "run `irtrain prepare` again")


class ShardSet:
    """A shard directory written by `irtrain prepare`: manifest plus memory-mapped shards."""

    def __init__(self, path: str | Path, *, verify: bool = True):
        """Open the shard directory at `path`; with `verify` (the default: every read) each file
        is checked against the sha256 in manifest.json first (`ShardError` naming the file)."""
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.exists():
            raise ShardError(f"{self.path} does not exist")
        if not mpath.is_file():
            raise ShardError(f"{self.path} is not a shard directory made by `irtrain prepare` (no {MANIFEST})")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise ShardError(f"{mpath}: not valid JSON: {e}") from None
        if self.manifest.get("irtrain_shards") != FORMAT_VERSION:
            raise ShardError(f"{mpath}: unsupported shard format version {self.manifest.get('irtrain_shards')!r}")
        self.shards = [Shard(self.path, m) for m in self.manifest.get("shards", [])]
        self._starts = np.cumsum([0] + [s.num_rows for s in self.shards])
        if verify:
            self.verify()

    @property
    def format(self) -> str:
        return str(self.manifest["format"])

    @property
    def tokenizer_hash(self) -> str:
        return str(self.manifest["tokenizer_hash"])

    @property
    def content_hash(self) -> str:
        return str(self.manifest["content_hash"])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def row(self, i: int) -> Row:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self.shards[k].row(i - int(self._starts[k]))

    def __iter__(self) -> Iterator[Row]:
        for s in self.shards:
            for i in range(s.num_rows):
                yield s.row(i)

    def verify(self) -> None:
        """Recompute every checksum; raise `ShardError` on a mismatch."""
        for s in self.shards:
            s.verify()

    @cached_property
    def num_segments(self) -> int:
        return sum(int(s.meta["segments"]) for s in self.shards)

    @cached_property
    def row_lengths(self) -> np.ndarray:
        """[R] int64 tokens of each packed row, over all shards."""
        return np.concatenate([s.row_lengths for s in self.shards]) if self.shards else np.zeros(0, np.int64)

    @cached_property
    def row_segments(self) -> np.ndarray:
        """[R] int64 segments of each packed row, over all shards."""
        return np.concatenate([s.row_segments for s in self.shards]) if self.shards else np.zeros(0, np.int64)

    @cached_property
    def preference_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """Global segment indices (chosen = part 0, rejected = part 1) of every example that has
        both, by example id."""
        ex = np.concatenate([np.asarray(sh.arrays["seg_example"], dtype=np.int64) for sh in self.shards]) if self.shards else np.zeros(0, np.int64)
        part = np.concatenate([np.asarray(sh.arrays["seg_part"], dtype=np.int64) for sh in self.shards]) if self.shards else np.zeros(0, np.int64)
        chosen = {int(e): i for i, (e, p) in enumerate(zip(ex, part)) if p == 0}
        rejected = {int(e): i for i, (e, p) in enumerate(zip(ex, part)) if p == 1}
        common = sorted(set(chosen) & set(rejected))
        return np.asarray([chosen[e] for e in common], dtype=np.int64), np.asarray([rejected[e] for e in common], dtype=np.int64)


def open_shards(path: str | Path, what: str) -> ShardSet:
    """A shard set that must hold rows (`what` names the option in the error)."""
    s = ShardSet(path)
    if len(s) == 0:
        raise ShardError(f"{what} {path}: the shard directory holds no rows")
    return s


def response_tokens_per_segment(labels: np.ndarray, seg_offsets: np.ndarray) -> np.ndarray:
    """[S] int64 response tokens (label != -100) of each segment, from a token array of labels
    and its [S+1] segment offsets (a shard's, or a packed batch's `cu_seqlens`)."""
    so = np.asarray(seg_offsets, dtype=np.int64)
    if len(so) < 2:
        return np.zeros(0, dtype=np.int64)
    trained = np.concatenate([[0], np.cumsum(np.asarray(labels) != IGNORE_INDEX, dtype=np.int64)])
    return trained[so[1:]] - trained[so[:-1]]


def _segment(a: dict[str, np.ndarray], j: int) -> dict[str, Any]:
    s, e = int(a["seg_offsets"][j]), int(a["seg_offsets"][j + 1])
    return {"input_ids": a["input_ids"][s:e].astype(np.int64).tolist(), "labels": a["labels"][s:e].astype(np.int64).tolist()}


def iter_documents(shard_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Yield one dict per source example, in source order.

    - chat / prompt-completion: ``{"id", "input_ids", "labels"}`` (labels -100 where masked)
    - preference: ``{"id", "chosen": {"input_ids", "labels"}, "rejected": {...}}``
    - unpaired: ``{"id", "input_ids", "labels", "label": bool}`` (True = desirable)
    - ranked: ``{"id", "candidates": [{"input_ids", "labels", "score"}, ...]}`` best first
    """
    ss = ShardSet(shard_dir)
    fmt = ss.format
    index: list[tuple[int, int, int]] = []  # (example id, shard k, segment j)
    for k, sh in enumerate(ss.shards):
        ex = np.asarray(sh.arrays["seg_example"])
        index.extend(zip(ex.tolist(), [k] * len(ex), range(len(ex))))
    index.sort()
    i = 0
    while i < len(index):
        ex_id = index[i][0]
        group = []
        while i < len(index) and index[i][0] == ex_id:
            group.append(index[i])
            i += 1
        segs = []
        for _, k, j in group:
            a = ss.shards[k].arrays
            d = _segment(a, j)
            d["_part"] = int(a["seg_part"][j])
            d["_score"] = float(a["seg_score"][j])
            segs.append(d)
        segs.sort(key=lambda d: d["_part"])
        if fmt == "preference":
            yield {"id": ex_id, "chosen": _clean(segs[0]), "rejected": _clean(segs[1])}
        elif fmt == "ranked":
            yield {"id": ex_id, "candidates": [dict(_clean(d), score=d["_score"]) for d in segs]}
        elif fmt == "unpaired":
            yield {"id": ex_id, **_clean(segs[0]), "label": bool(segs[0]["_score"] > 0.5)}
        else:
            yield {"id": ex_id, **_clean(segs[0])}


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    return {"input_ids": d["input_ids"], "labels": d["labels"]}


# --------------------------------------------------------------------------- reference writer
@dataclass
class Segment:
    """One tokenized sequence to store. `labels` aligned to `input_ids` (-100 = not trained)."""

    input_ids: list[int]
    labels: list[int]
    example: int
    part: int = 0
    score: float = float("nan")


def _atomic_dir(out: Path) -> Path:
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_shard_set(out_dir: str | Path, fmt: str, rows: list[list[Segment]], *, shard_rows: int = 16384,
                    **manifest: Any) -> dict[str, Any]:
    """Pure-Python reference writer of the format above (the oracle for the Rust writer;
    also handy for writing pre-tokenized data). `rows` are already packed: each row a
    list of segments; `manifest` the fields of `write_shard_arrays` (max_len, packed,
    tokenizer_hash, ...). Writes under a temporary name, renames when complete, returns the
    manifest. The first label of every segment is forced to -100 (format rule)."""
    chunks = [_row_arrays(rows[a : a + shard_rows]) for a in range(0, len(rows), shard_rows)] or [_row_arrays([])]
    return write_shard_arrays(out_dir, fmt, chunks, **manifest)


def write_shard_arrays(
    out_dir: str | Path,
    fmt: str,
    shards: list[dict[str, Any]],
    *,
    max_len: int,
    packed: bool = True,
    tokenizer_hash: str = "",
    chat_template_hash: str = "",
    sources: list[dict[str, Any]] | None = None,
    config: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write a shard set from its arrays (one dict of `ARRAYS` per shard, offsets relative to
    the shard) and the manifest: under a temporary name, renamed when complete. Returns the
    manifest. The Python writer of the format (the Rust data path has its own, checked
    against this one)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}")
    out = Path(out_dir)
    if out.exists():
        raise ShardError(f"{out} already exists")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _atomic_dir(out)
    try:
        shards_meta = []
        for k, arrays in enumerate(shards):
            name = f"shard-{k:05d}"
            (tmp / name).mkdir()
            digests = {}
            for aname, (dtype, _) in ARRAYS.items():
                path = tmp / name / f"{aname}.bin"
                np.asarray(arrays[aname], dtype=dtype).tofile(path)
                digests[f"{aname}.bin"] = file_sha256(path)
            shards_meta.append({
                "name": name, "rows": len(arrays["row_offsets"]) - 1, "segments": len(arrays["seg_example"]),
                "tokens": len(arrays["input_ids"]), "sha256": digests,
            })
        manifest = {
            "irtrain_shards": FORMAT_VERSION, "format": fmt, "packed": packed, "max_len": max_len,
            "tokenizer_hash": tokenizer_hash, "chat_template_hash": chat_template_hash,
            "sources": sources or [], "config": config or {}, "report": report or {},
            "shards": shards_meta, "content_hash": content_hash(shards_meta),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
        publish(tmp, out)  # fsynced, then renamed
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _row_arrays(rows: list[list[Segment]]) -> dict[str, list]:
    a: dict[str, list] = {name: [] for name in ARRAYS}
    a["row_offsets"].append(0)
    a["seg_offsets"].append(0)
    n = 0
    for row in rows:
        for seg in row:
            if len(seg.input_ids) != len(seg.labels) or not seg.input_ids:
                raise ValueError(f"segment of example {seg.example}: input_ids and labels must be non-empty and equal length")
            a["input_ids"].extend(seg.input_ids)
            a["labels"].extend([IGNORE_INDEX, *seg.labels[1:]])
            a["position_ids"].extend(range(len(seg.input_ids)))
            n += len(seg.input_ids)
            a["seg_offsets"].append(n)
            a["seg_example"].append(seg.example)
            a["seg_part"].append(seg.part)
            a["seg_score"].append(seg.score)
        a["row_offsets"].append(n)
    return a
