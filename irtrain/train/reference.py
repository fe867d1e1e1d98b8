"""Reference log-probs, computed once with the starting model and cached beside the shards.

For a shard set and a reference model `π_ref`, the cache holds (FORMULAS.md "Reference
log-probs"):

- `token_logps` [T] float32: log q_t for every response token (label != -100), rows in
  order, tokens in order (exactly the order of `response_token_stats` on a row);
- `seg_logps` [S] float64: log π_ref(y) per segment (sum over its response tokens), and
  `seg_tokens` [S] int64: |y|;
- `row_token_offsets` [R+1], `row_seg_offsets` [R+1]: where each row's entries start.

It is one portable safetensors file, ``<shard dir>/reference/<key id>.safetensors`` (or
under `--reference-dir`), whose metadata records the key (model hash, tokenizer hash,
shard content hash). `ReferenceLogps.load(path, expect=key)` refuses a file made for
another model, tokenizer or data with `ReferenceMismatchError`. Arrays are memory-mapped,
so no reference model and no copy of the cache stays resident during training.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from irtrain.adapters import AdaptersDisabled, peft_model_of
from irtrain.config import TrainConfig
from irtrain.display import Phase
from irtrain.durable import publish, sweep_temps
from irtrain.errors import CorruptCacheError, ReferenceMismatchError, ShardError
from irtrain.losses import TokenStats, segment_sums
from irtrain.models import model_hash
from irtrain.shards import IGNORE_INDEX, ShardSet
from irtrain.train.batching import Batch, PackedData, collate
from irtrain.train.packed import packed_token_stats
from irtrain.train.strategy import Strategy

FORMAT = "2"  # 2: per-array sha256 in the metadata, checked on every load
_ARRAYS = ("token_logps", "row_token_offsets", "seg_logps", "seg_tokens", "row_seg_offsets")


# --------------------------------------------------------------------------- keys
@dataclass(frozen=True)
class ReferenceKey:
    """What a reference cache was made from."""

    model_hash: str
    tokenizer_hash: str
    data_hash: str

    @property
    def id(self) -> str:
        return hashlib.sha256(f"{self.model_hash}|{self.tokenizer_hash}|{self.data_hash}".encode()).hexdigest()[:24]

    def describe_mismatch(self, other: ReferenceKey) -> str:
        parts = []
        for name, label in (("model_hash", "model"), ("tokenizer_hash", "tokenizer"), ("data_hash", "data")):
            a, b = getattr(other, name), getattr(self, name)
            if a != b:
                parts.append(f"{label} {a[:12]} (this run: {b[:12]})")
        return ", ".join(parts)


def default_path(shards: ShardSet, key: ReferenceKey, reference_dir: str | Path | None = None) -> Path:
    if reference_dir:
        return Path(reference_dir) / f"{shards.content_hash[:16]}-{key.id}.safetensors"
    return shards.path / "reference" / f"{key.id}.safetensors"


# --------------------------------------------------------------------------- the cache
class ReferenceLogps:
    """A loaded reference cache (memory-mapped numpy arrays; see the module docstring)."""

    def __init__(self, path: Path, key: ReferenceKey, arrays: dict[str, np.ndarray], meta: dict[str, str]):
        self.path = path
        self.key = key
        self.meta = meta
        self.token_logps = arrays["token_logps"]
        self.row_token_offsets = arrays["row_token_offsets"]
        self.seg_logps = arrays["seg_logps"]
        self.seg_tokens = arrays["seg_tokens"]
        self.row_seg_offsets = arrays["row_seg_offsets"]

    @property
    def num_rows(self) -> int:
        return len(self.row_token_offsets) - 1

    def row_tokens(self, i: int) -> np.ndarray:
        """log q_t of row i's response tokens, [T_i] float32."""
        return self.token_logps[self.row_token_offsets[i] : self.row_token_offsets[i + 1]]

    def row_segments(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(log π_ref(y) [S_i] float64, |y| [S_i] int64) of row i's segments."""
        a, b = self.row_seg_offsets[i], self.row_seg_offsets[i + 1]
        return self.seg_logps[a:b], self.seg_tokens[a:b]

    @classmethod
    def load(cls, path: str | Path, *, expect: ReferenceKey | None = None, shards: ShardSet | None = None) -> ReferenceLogps:
        """Open a cache file; refuse it (`ReferenceMismatchError`) if it was made for another
        model, tokenizer or data than `expect`, or does not fit `shards`."""
        path = Path(path)
        if not path.is_file():
            raise ReferenceMismatchError(f"{path}: no reference log-probs file")
        header, data_start = _read_header(path)
        meta = header.pop("__metadata__", {}) or {}
        if meta.get("irtrain_reference") != FORMAT:
            raise CorruptCacheError(f"{path}: not an irtrain reference log-probs file of format {FORMAT} "
                                    f"(format {meta.get('irtrain_reference')!r})")
        key = ReferenceKey(meta.get("model_hash", ""), meta.get("tokenizer_hash", ""), meta.get("data_hash", ""))
        if expect is not None and key != expect:
            raise ReferenceMismatchError(
                f"{path}: reference log-probs were made for another {expect.describe_mismatch(key)}; "
                "delete the file or point at the right model/data")
        dtypes = {"F32": "<f4", "F64": "<f8", "I64": "<i8"}
        arrays = {}
        for name in _ARRAYS:
            if name not in header:
                raise ReferenceMismatchError(f"{path}: array {name} is missing")
            info = header[name]
            start, end = info["data_offsets"]
            dt = np.dtype(dtypes[info["dtype"]])
            count = (end - start) // dt.itemsize
            try:
                arrays[name] = (np.memmap(path, dtype=dt, mode="r", offset=data_start + start, shape=(count,))
                                if count else np.zeros(0, dtype=dt))
            except ValueError:
                raise CorruptCacheError(f"{path}: truncated (array {name} ends past the end of the file)") from None
        verify_arrays(path, arrays, meta)
        ref = cls(path, key, arrays, meta)
        if shards is not None:
            n_rows, n_segs = len(shards), shards.num_segments
            if ref.num_rows != n_rows or len(ref.seg_logps) != n_segs:
                raise ReferenceMismatchError(
                    f"{path}: made for {ref.num_rows} rows / {len(ref.seg_logps)} segments, the data has {n_rows} / {n_segs}")
        return ref


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """safetensors layout: u64 little-endian header size, JSON header, raw little-endian data."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CorruptCacheError(f"{path}: truncated file")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise CorruptCacheError(f"{path}: not a safetensors file")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise CorruptCacheError(f"{path}: not a safetensors file (header unreadable)") from None
    return header, 8 + n


def array_checksums(arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """`sha256/<name>` of each array's little-endian bytes: the metadata a cache is verified by."""
    out = {}
    for name, a in arrays.items():
        h = hashlib.sha256()
        c = np.ascontiguousarray(a)
        if c.size:
            h.update(c.data)  # the buffer as is: no copy
        out[f"sha256/{name}"] = h.hexdigest()
    return out


def verify_arrays(path: Path, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """`CorruptCacheError` unless every array matches the checksum written with it."""
    found = array_checksums(arrays)
    for k, digest in found.items():
        if meta.get(k) != digest:
            raise CorruptCacheError(f"{path}: array {k.split('/', 1)[1]} does not match its checksum (corrupted)")


def write_reference(path: Path, key: ReferenceKey, arrays: dict[str, np.ndarray], meta: dict[str, str]) -> None:
    """Write a cache file durably (temporary name, fsync, rename), with its checksums."""
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: np.ascontiguousarray(arrays[k]) for k in _ARRAYS}
    metadata = {"irtrain_reference": FORMAT, "model_hash": key.model_hash, "tokenizer_hash": key.tokenizer_hash,
                "data_hash": key.data_hash, **meta, **array_checksums(data)}
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    save_file(data, str(tmp), metadata=metadata)
    publish(tmp, path)


# --------------------------------------------------------------------------- computing
def row_schedule(lengths: np.ndarray, token_budget: int, world_size: int, rank: int) -> list[list[int]]:
    """Rows (strided over ranks) grouped into forward batches of at most `token_budget`
    tokens; every rank gets the same number of batches (an empty list = a filler forward,
    needed under ZeRO-3 where all ranks must run every forward)."""
    def batches_of(r: int) -> list[list[int]]:
        out: list[list[int]] = []
        cur: list[int] = []
        tok = 0
        for i in range(r, len(lengths), world_size):
            n = int(lengths[i])
            if cur and tok + n > token_budget:
                out.append(cur)
                cur, tok = [], 0
            cur.append(i)
            tok += n
        if cur:
            out.append(cur)
        return out

    per_rank = [batches_of(r) for r in range(world_size)]
    count = max(len(b) for b in per_rank)
    return per_rank[rank] + [[] for _ in range(count - len(per_rank[rank]))]


@torch.no_grad()
def sequence_logps(model: Any, shards: ShardSet, *, device: torch.device, token_budget: int, world_size: int = 1,
                   rank: int = 0, autocast: Any = None) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    """For this rank's rows of `shards`: (row index, token logps [T_i] f32, segment sums
    [S_i] f64, segment response-token counts [S_i] i64) under `model`, by padding-free
    forwards of at most `token_budget` tokens (at least one row)."""
    lengths = shards.row_lengths
    budget = max(token_budget, int(lengths.max()) if len(lengths) else 1)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for rows in row_schedule(lengths, budget, world_size, rank):
            use = rows if rows else [0]  # a filler forward keeps ZeRO-3 ranks in lockstep
            batch = collate([shards.row(i) for i in use]).to(device)
            with autocast() if autocast else contextlib.nullcontext():
                stats = packed_token_stats(model, batch)
            if rows:
                yield from _split_rows(batch, stats, rows, [int(lengths[i]) for i in rows])
    finally:
        if was_training:
            model.train()


def batch_sequence_logps(batch: Batch, stats: TokenStats) -> tuple[Tensor, Tensor, Tensor]:
    """(token logps [N], segment sums [S] f64, segment response-token counts [S]) of a
    packed batch's `TokenStats`."""
    seg_of_token = batch.seg_id[stats.index]
    sums = segment_sums(stats.logps.double(), seg_of_token, batch.num_segments)
    counts = torch.zeros(batch.num_segments, dtype=torch.long, device=sums.device).index_add_(
        0, seg_of_token, torch.ones_like(seg_of_token))
    return stats.logps, sums, counts


def _split_rows(batch: Batch, stats: TokenStats, rows: list[int], row_lens: list[int]) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
    logps_t, sums_t, counts_t = batch_sequence_logps(batch, stats)
    logps, sums, counts = logps_t.float().cpu().numpy(), sums_t.cpu().numpy(), counts_t.cpu().numpy()
    labels = batch.labels[0].cpu().numpy()
    seg_ends = batch.cu_seqlens[1:].cpu().numpy()
    tok_off = seg_off = pos = 0
    for i, n in zip(rows, row_lens):
        n_resp = int((labels[pos : pos + n] != IGNORE_INDEX).sum())
        n_seg = int(((seg_ends > pos) & (seg_ends <= pos + n)).sum())
        yield i, logps[tok_off : tok_off + n_resp], sums[seg_off : seg_off + n_seg], counts[seg_off : seg_off + n_seg]
        tok_off += n_resp
        seg_off += n_seg
        pos += n


def compute_reference(model: Any, shards: ShardSet, key: ReferenceKey, path: Path, *, strategy: Any, token_budget: int,
                      meta: dict[str, str] | None = None) -> None:
    """Run the starting model over every row of `shards` (rows split over ranks) and write
    the cache file. Ranks write part files beside `path`; the main rank merges them."""
    parts: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    mine = len(range(strategy.rank, len(shards), strategy.world_size))  # the main rank shows its share
    with Phase(f"reference log-probs of {shards.path.name}", mine, enabled=strategy.is_main) as progress:
        for i, tok, sums, counts in sequence_logps(model, shards, device=strategy.device, token_budget=token_budget,
                                                   world_size=strategy.world_size, rank=strategy.rank, autocast=strategy.autocast):
            parts[i] = (tok, sums, counts)
            progress.advance()
    if strategy.world_size > 1:
        path.parent.mkdir(parents=True, exist_ok=True)
        part_file = path.parent / f".{path.name}.part{strategy.rank}.npz"
        idx = np.asarray(sorted(parts), dtype=np.int64)
        np.savez(part_file, rows=idx,
                 tok_len=np.asarray([len(parts[i][0]) for i in idx], dtype=np.int64),
                 seg_len=np.asarray([len(parts[i][1]) for i in idx], dtype=np.int64),
                 tok=np.concatenate([parts[i][0] for i in idx]) if len(idx) else np.zeros(0, np.float32),
                 sums=np.concatenate([parts[i][1] for i in idx]) if len(idx) else np.zeros(0, np.float64),
                 counts=np.concatenate([parts[i][2] for i in idx]) if len(idx) else np.zeros(0, np.int64))
        strategy.barrier()
        if strategy.is_main:
            for r in range(strategy.world_size):
                f = path.parent / f".{path.name}.part{r}.npz"
                with np.load(f, allow_pickle=False) as z:
                    to, so = np.concatenate([[0], np.cumsum(z["tok_len"])]), np.concatenate([[0], np.cumsum(z["seg_len"])])
                    for j, i in enumerate(z["rows"].tolist()):
                        parts[i] = (z["tok"][to[j]:to[j + 1]], z["sums"][so[j]:so[j + 1]], z["counts"][so[j]:so[j + 1]])
                f.unlink()
    if strategy.is_main:
        n = len(shards)
        if sorted(parts) != list(range(n)):
            raise ShardError(f"{shards.path}: reference pass covered {len(parts)} of {n} rows")
        order = [parts[i] for i in range(n)]
        arrays: dict[str, np.ndarray] = {
            "token_logps": np.concatenate([p[0] for p in order]).astype(np.float32) if n else np.zeros(0, np.float32),
            "row_token_offsets": np.concatenate([[0], np.cumsum([len(p[0]) for p in order])]).astype(np.int64),
            "seg_logps": np.concatenate([p[1] for p in order]).astype(np.float64) if n else np.zeros(0, np.float64),
            "seg_tokens": np.concatenate([p[2] for p in order]).astype(np.int64) if n else np.zeros(0, np.int64),
            "row_seg_offsets": np.concatenate([[0], np.cumsum([len(p[1]) for p in order])]).astype(np.int64),
        }
        write_reference(path, key, arrays, meta or {})
    strategy.barrier()


def ensure_reference(shards: ShardSet, key: ReferenceKey, *, model_fn: Any, strategy: Any, token_budget: int,
                     reference_dir: str | Path | None = None, meta: dict[str, str] | None = None) -> ReferenceLogps:
    """Load the cache for (shards, key), computing it first if it does not exist.

    `model_fn()` returns the starting model (called only when computing). A file at the
    expected place made for another key is refused with `ReferenceMismatchError`.
    """
    path = default_path(shards, key, reference_dir)
    usable = strategy.broadcast_object(_usable(path, key, shards) if strategy.is_main else None)
    if not usable:
        compute_reference(model_fn(), shards, key, path, strategy=strategy, token_budget=token_budget, meta=meta)
    return ReferenceLogps.load(path, expect=key, shards=shards)


def _usable(path: Path, key: ReferenceKey, shards: ShardSet) -> bool:
    """Whether the cache file at `path` can be used as is (main rank). A damaged one is removed
    with a warning, to be recomputed; one made for another key is refused (an error)."""
    sweep_temps(path.parent, re.escape(path.name), regex=True)  # a killed write's leftovers
    if not path.is_file():
        return False
    try:
        ReferenceLogps.load(path, expect=key, shards=shards)
        return True
    except CorruptCacheError as e:
        print(f"warning: {e}; recomputing it", file=sys.stderr)
        path.unlink()
        return False


def batch_reference(refs: list[ReferenceLogps], batch: Batch, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The reference values of a training `Batch` (rows from several shard sets, `refs[k]`
    for set k): (log q_t [N_resp] f32 in `response_token_stats` order, log π_ref(y) [S] f64,
    |y| [S] int64)."""
    toks, sums, counts = [], [], []
    for k, i in batch.rows:
        toks.append(refs[k].row_tokens(i))
        s, c = refs[k].row_segments(i)
        sums.append(s)
        counts.append(c)
    dev = device if device is not None else batch.input_ids.device
    return (torch.from_numpy(np.concatenate(toks).astype(np.float32)).to(dev),
            torch.from_numpy(np.concatenate(sums).astype(np.float64)).to(dev),
            torch.from_numpy(np.concatenate(counts).astype(np.int64)).to(dev))


# --------------------------------------------------------------------------- for the loop
def eval_token_budget(cfg: TrainConfig, data: PackedData | None) -> int:
    """Tokens per no-grad forward (reference pass, eval): the micro-batch size, or 4 rows."""
    if cfg.micro_batch_tokens > 0:
        return cfg.micro_batch_tokens
    longest = int(data.lengths.max()) if data is not None and len(data.lengths) else 2048
    return max(1, cfg.micro_batch) * longest


class References:
    """Reference log-probs for `TrainContext`: cached beside the shards, computed with the
    starting model (the training model before its first step, or loaded again on resume).
    With LoRA the starting model is the training model with its adapters disabled, always:
    no second copy of the base is ever loaded."""

    def __init__(self, cfg: TrainConfig, strategy: Strategy, model: Any, model_path: Path, tok_hash: str, *, fresh: bool):
        self.cfg, self.strategy, self.train_model, self.model_path, self.tok_hash = cfg, strategy, model, model_path, tok_hash
        self.fresh = fresh
        self._hash: str | None = None
        self._start: Any = None
        self._resident: Any = AdaptersDisabled(model) if peft_model_of(model) is not None else None

    def key(self, shards: ShardSet) -> ReferenceKey:
        if self._hash is None:
            self._hash = self.strategy.broadcast_object(model_hash(self.model_path) if self.strategy.is_main else None)
        return ReferenceKey(self._hash, shards.tokenizer_hash or self.tok_hash, shards.content_hash)

    def _starting_model(self) -> Any:
        if self._resident is not None:
            return self._resident
        if self.fresh:
            return self.train_model
        if self._start is None:
            self._start = self.model()
        return self._start

    def logps(self, shards: ShardSet) -> ReferenceLogps:
        # at most a training micro-batch of these shards per forward (not micro_batch x 2048 tokens): the
        # reference pass then never needs more memory than a training step
        return ensure_reference(shards, self.key(shards), model_fn=self._starting_model, strategy=self.strategy,
                                token_budget=eval_token_budget(self.cfg, PackedData([shards])), reference_dir=self.cfg.reference_dir,
                                meta={"model": str(self.cfg.model)})

    def model(self) -> Any:
        """A frozen copy of the starting model, resident on the device (LoRA: the base, adapters off)."""
        if self._resident is None:
            m = self.strategy.load_model(self.model_path, attn_implementation=self.cfg.attn_implementation,
                                         trust_remote_code=self.cfg.trust_remote_code)
            m.config.use_cache = False
            self._resident = self.strategy.frozen(m)
        return self._resident

    def release(self) -> None:
        self._start = None  # a resident model handed out by model() stays with its user
