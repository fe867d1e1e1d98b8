"""Packed rows -> optimizer steps -> per-rank micro-batches.

Everything here is deterministic: the row order depends only on (seed, epoch), so the
plan of a run can be rebuilt from its config and resuming at step k needs only k.

- The data stream is epoch 0's permutation of all rows, then epoch 1's, and so on.
- With `weights` (one per shard set), the stream is a mixture instead: each source has its
  own endless stream of epoch permutations, and the sources take turns so that after every
  row each source's share of the rows so far is within one row of its weight (at row i the
  source with the largest deficit (i+1)·w_s - used_s goes next). Exact and deterministic
  from the seed; each source's epochs are counted on its own.
- An optimizer step takes the next `global_batch` rows of the stream, or, with
  `global_batch_tokens`, the next rows until their tokens reach that budget, or, with
  `global_batch_docs`, rows holding exactly that many documents (conversations, preference
  pairs): rows are taken in stream order while they fit, and the remainder is filled from
  the next `DOCS_LOOKAHEAD` rows (rows taken ahead are skipped when the stream reaches
  them), so a step holds more only when no row that fits is in sight.
- A step's rows are split over ranks (contiguously for a row budget, balanced by tokens
  for a token budget), and each rank's rows into micro-batches of `micro_batch` rows or
  at most `micro_batch_tokens` tokens. Every rank gets the same number of micro-batches
  (collectives must line up); a rank short of rows repeats one with weight 0.
- A micro-batch is padding-free: its rows are concatenated into one [1, N] sequence whose
  `position_ids` restart at every segment (`Batch`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from irtrain.errors import ConfigError
from irtrain.shards import Row, ShardSet, response_tokens_per_segment

if TYPE_CHECKING:
    from irtrain.config import TrainConfig


@dataclass
class Batch:
    """One padding-free micro-batch: R packed rows concatenated into one sequence of N tokens,
    holding S segments (documents; a preference pair's chosen and rejected are two segments).

    input_ids:    [1, N] int64
    labels:       [1, N] int64, -100 where not trained (not shifted)
    position_ids: [1, N] int64, restarting at 0 at every segment
    cu_seqlens:   [S + 1] int32, segment boundaries (0 ... N)
    max_seqlen:   longest segment
    seg_id:       [N] int64, the segment (0..S-1) of each token
    seg_example, seg_part, seg_score: [S] the shard's per-segment fields (example id,
                  0 chosen / 1 rejected / k-th candidate, score or label)
    rows:         the R rows as (dataset index, row index) pairs, in order
    weight:       1.0, or 0.0 for a filler micro-batch that only keeps ranks in lockstep
    """

    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    cu_seqlens: Tensor
    max_seqlen: int
    seg_id: Tensor
    seg_example: Tensor
    seg_part: Tensor
    seg_score: Tensor
    rows: list[tuple[int, int]] = field(default_factory=list)
    weight: float = 1.0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def num_segments(self) -> int:
        return int(self.cu_seqlens.shape[0]) - 1

    def segment_response_tokens(self) -> np.ndarray:
        """[S] int64 response tokens (label != -100) of each segment."""
        return response_tokens_per_segment(self.labels[0].cpu().numpy(), self.cu_seqlens.cpu().numpy())

    def to(self, device: torch.device | str) -> Batch:
        moved = {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return Batch(**moved)  # type: ignore[arg-type]  # the same fields, tensors moved


def collate(rows: list[Row], ids: list[tuple[int, int]] | None = None, weight: float = 1.0) -> Batch:
    """Concatenate packed rows into one padding-free `Batch`."""
    if not rows:
        raise ValueError("collate needs at least one row")
    input_ids = np.concatenate([np.asarray(r.input_ids, dtype=np.int64) for r in rows])
    labels = np.concatenate([np.asarray(r.labels, dtype=np.int64) for r in rows])
    position_ids = np.concatenate([np.asarray(r.position_ids, dtype=np.int64) for r in rows])
    cu, offset = [np.zeros(1, dtype=np.int64)], 0
    for r in rows:
        cu.append(np.asarray(r.cu_seqlens[1:], dtype=np.int64) + offset)
        offset += r.num_tokens
    cu_seqlens = np.concatenate(cu)
    seg_len = np.diff(cu_seqlens)
    return Batch(
        input_ids=torch.from_numpy(input_ids)[None],
        labels=torch.from_numpy(labels)[None],
        position_ids=torch.from_numpy(position_ids)[None],
        cu_seqlens=torch.from_numpy(cu_seqlens.astype(np.int32)),
        max_seqlen=int(seg_len.max()) if len(seg_len) else 0,
        seg_id=torch.from_numpy(np.repeat(np.arange(len(seg_len), dtype=np.int64), seg_len)),
        seg_example=torch.from_numpy(np.concatenate([np.asarray(r.seg_example, dtype=np.int64) for r in rows])),
        seg_part=torch.from_numpy(np.concatenate([np.asarray(r.seg_part, dtype=np.int64) for r in rows])),
        seg_score=torch.from_numpy(np.concatenate([np.asarray(r.seg_score, dtype=np.float32) for r in rows])),
        rows=list(ids) if ids is not None else [],
        weight=weight,
    )


class PackedData:
    """One or more shard sets read as a single list of packed rows (global row index)."""

    def __init__(self, sets: list[ShardSet]):
        self.sets = sets
        self._starts = np.cumsum([0] + [len(s) for s in sets])
        self.lengths = np.concatenate([s.row_lengths for s in sets]) if sets else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def sizes(self) -> list[int]:
        """Packed rows of each shard set."""
        return [len(s) for s in self.sets]

    @cached_property
    def documents(self) -> np.ndarray:
        """[R] documents (distinct examples: a conversation, a preference pair) in each packed row."""
        out = [row_documents(s) for s in self.sets]
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)

    def source_of(self, rows: np.ndarray) -> np.ndarray:
        """The shard set (index into `sets`) of each global row."""
        return np.searchsorted(self._starts, np.asarray(rows, dtype=np.int64), side="right") - 1

    def labels(self) -> list[str]:
        """A short distinct name per shard set (its directory name; a number added to repeats)."""
        names = [s.path.name or str(s.path) for s in self.sets]
        return [n if names.count(n) == 1 else f"{n}.{i}" for i, n in enumerate(names)]

    def locate(self, g: int) -> tuple[int, int]:
        """Global row index -> (dataset index, row index within that shard set)."""
        k = int(np.searchsorted(self._starts, g, side="right")) - 1
        return k, g - int(self._starts[k])

    def batch(self, rows: list[int], weight: float = 1.0) -> Batch:
        ids = [self.locate(int(g)) for g in rows]
        return collate([self.sets[k].row(i) for k, i in ids], ids, weight)


def row_documents(shards: ShardSet) -> np.ndarray:
    """[R] distinct examples in each packed row of `shards` (segments of one example — a pair's
    chosen and rejected, a conversation's parts — are adjacent and count once)."""
    counts = shards.row_segments
    if not len(counts):
        return np.zeros(0, dtype=np.int64)
    ex = np.concatenate([np.asarray(sh.arrays["seg_example"], dtype=np.int64) for sh in shards.shards])
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    new = np.ones(len(ex), dtype=np.int64)
    new[1:] = ex[1:] != ex[:-1]
    new[starts[counts > 0]] = 1  # a row starts a document
    out = np.zeros(len(counts), dtype=np.int64)
    nonempty = counts > 0
    out[nonempty] = np.add.reduceat(new, starts[nonempty])
    return out


# --------------------------------------------------------------------------- the plan
#: --global-batch-docs: how far ahead of the stream a step looks for a row that fills it exactly.
DOCS_LOOKAHEAD = 256


def epoch_order(num_rows: int, seed: int, epoch: int, source: int | None = None) -> np.ndarray:
    """The row permutation of one epoch: a pure function of (seed, epoch), and of the source
    in a mixture (each source is shuffled on its own)."""
    key = [seed, epoch] if source is None else [seed, epoch, source, 1]
    return np.random.default_rng(key).permutation(num_rows)


def mixture_sources(weights: list[float], count: int) -> np.ndarray:
    """The source of each of the first `count` rows of a mixture: at row i the source with the
    largest deficit (i+1)·w_s - used_s (the lowest index on a tie), so after every row each
    source's count is within one row of its share (weights are normalised)."""
    w = np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    used = np.zeros(len(w), dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    for i in range(count):
        k = int(np.argmax((i + 1) * w - used))
        out[i] = k
        used[k] += 1
    return out


class RowStream:
    """The endless stream of global rows: epoch permutations of all rows, or a weighted mixture
    of the sources' own streams (see the module docstring). `take(start, count)`."""

    def __init__(self, sizes: list[int], seed: int, weights: list[float] | None = None):
        self.sizes, self.seed = list(sizes), seed
        self.weights = list(weights) if weights else None
        self.starts = np.cumsum([0] + self.sizes)
        if self.weights is not None and (len(self.weights) != len(self.sizes) or min(self.sizes, default=0) <= 0):
            raise ConfigError(f"--weights gives {len(self.weights)} weight(s) for {len(self.sizes)} data source(s)")

    def take(self, start: int, count: int) -> np.ndarray:
        if self.weights is None:
            return _stream(int(self.starts[-1]), self.seed, start, count)
        src = mixture_sources(self.weights, start + count)
        out = np.empty(count, dtype=np.int64)
        for k, n in enumerate(self.sizes):
            before = int((src[:start] == k).sum())
            mine = np.flatnonzero(src[start:] == k)
            if len(mine):
                out[mine] = self.starts[k] + _stream(n, self.seed, before, len(mine), source=k)
        return out


def _stream(num_rows: int, seed: int, start: int, count: int, source: int | None = None) -> np.ndarray:
    """Rows `start .. start+count` of the endless stream of epoch permutations."""
    out, pos = [], start
    while pos < start + count:
        epoch, off = divmod(pos, num_rows)
        take = min(num_rows - off, start + count - pos)
        out.append(epoch_order(num_rows, seed, epoch, source)[off : off + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def plan_steps(lengths: np.ndarray, *, global_batch: int, global_batch_tokens: int = 0, seed: int = 0,
               epochs: float = 1.0, max_steps: int = 0, global_batch_docs: int = 0, documents: np.ndarray | None = None,
               sizes: list[int] | None = None, weights: list[float] | None = None) -> list[np.ndarray]:
    """The global rows of every optimizer step of the run.

    lengths: [R] tokens per packed row. Row budget: each step `global_batch` rows, the run
    `max_steps` steps or floor(epochs * R / global_batch). Token budget
    (`global_batch_tokens` > 0): each step the next rows until their tokens reach the
    budget. Document budget (`global_batch_docs` > 0, `documents` [R] per row): each step
    rows holding that many documents (module docstring). For both budgets the run is
    `max_steps` steps or until epochs * R rows are used (a last partial step is dropped).
    `sizes` (rows per source, summing to R) and `weights`: a weighted mixture of the sources.
    """
    n = len(lengths)
    if n == 0:
        raise ConfigError("the training data has no rows")
    if global_batch_tokens > 0 and global_batch_docs > 0:
        raise ConfigError("--global-batch-tokens and --global-batch-docs are two budgets for one step: give one")
    stream = RowStream(sizes if sizes is not None else [n], seed, weights)
    if global_batch_tokens > 0 or global_batch_docs > 0:
        if global_batch_docs > 0:
            if documents is None or len(documents) != n:
                raise ValueError("a document budget needs the documents of every row")
            budget, per_row, flag = global_batch_docs, np.asarray(documents, dtype=np.int64), "--global-batch-docs"
        else:
            budget, per_row, flag = global_batch_tokens, np.asarray(lengths, dtype=np.int64), "--global-batch-tokens"
        steps = _budget_steps(stream, per_row, budget, exact=global_batch_docs > 0, max_steps=max_steps,
                              limit=math.inf if max_steps > 0 else int(epochs * n), chunk=max(1024, 4 * n))
        if not steps:
            what = "tokens" if global_batch_tokens > 0 else "documents"
            raise ConfigError(
                f"{flag} {budget} is more than the {int(per_row.sum())} {what} "
                f"of {epochs:g} epoch(s) of the data: no complete optimizer step")
        return steps
    if global_batch <= 0:
        raise ConfigError("--global-batch must be > 0")
    total = max_steps if max_steps > 0 else int(epochs * n) // global_batch
    if total <= 0:
        raise ConfigError(
            f"--global-batch {global_batch} is more than the {int(epochs * n)} rows of {epochs:g} epoch(s) "
            f"of the data: no complete optimizer step (lower it or set --max-steps)")
    rows = stream.take(0, total * global_batch)
    return [rows[i * global_batch : (i + 1) * global_batch] for i in range(total)]


def _budget_steps(stream: RowStream, per_row: np.ndarray, budget: int, *, exact: bool, max_steps: int, limit: float,
                  chunk: int) -> list[np.ndarray]:
    """Steps of rows whose `per_row` amounts reach `budget` (tokens: the next rows until the
    sum reaches it; `exact` (documents): rows that fit, the remainder filled from the next
    DOCS_LOOKAHEAD rows of the stream, see the module docstring). At most `limit` rows."""
    steps: list[np.ndarray] = []
    buf = stream.take(0, chunk)
    taken = np.zeros(len(buf), dtype=bool)
    pos, used = 0, 0
    cur: list[int] = []
    total = 0
    while (max_steps <= 0 or len(steps) < max_steps) and used < limit:
        if pos + (DOCS_LOOKAHEAD if exact else 0) >= len(buf):
            more = stream.take(len(buf), chunk)
            buf, taken = np.concatenate([buf, more]), np.concatenate([taken, np.zeros(len(more), dtype=bool)])
        if taken[pos]:
            pos += 1
            continue
        g, at = int(buf[pos]), pos
        if exact and cur and total + int(per_row[g]) > budget:
            # fill the remainder from the rows ahead (in stream order); else take this one anyway
            room = budget - total
            ahead = [j for j in range(pos + 1, pos + 1 + DOCS_LOOKAHEAD) if not taken[j] and int(per_row[int(buf[j])]) <= room]
            if ahead:
                at = ahead[0]
                g = int(buf[at])
        taken[at] = True
        if at == pos:
            pos += 1
        used += 1
        cur.append(g)
        total += int(per_row[g])
        if total >= budget:
            steps.append(np.asarray(cur, dtype=np.int64))
            cur, total = [], 0
    return steps


def split_step(rows: np.ndarray, lengths: np.ndarray, *, world_size: int, rank: int, micro_batch: int = 1,
               micro_batch_tokens: int = 0, by_tokens: bool = False) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of one step: a list of (global rows, weight).

    `by_tokens` (token-budget steps) balances ranks by tokens (longest first to the least
    loaded rank); otherwise ranks get equal contiguous slices. Every rank returns the same
    number of micro-batches; fillers have weight 0.
    """
    if by_tokens:
        per_rank: list[list[int]] = [[] for _ in range(world_size)]
        load = [0] * world_size
        order = sorted(range(len(rows)), key=lambda i: (-int(lengths[rows[i]]), i))
        owner = {}
        for i in order:
            r = min(range(world_size), key=lambda q: (load[q], q))
            owner[i] = r
            load[r] += int(lengths[rows[i]])
        for i in range(len(rows)):
            per_rank[owner[i]].append(int(rows[i]))
    else:
        if len(rows) % world_size:
            raise ConfigError(f"the global batch ({len(rows)} rows) must be divisible by the world size {world_size}")
        k = len(rows) // world_size
        per_rank = [[int(g) for g in rows[r * k : (r + 1) * k]] for r in range(world_size)]

    def micro(own: list[int]) -> list[list[int]]:
        if micro_batch_tokens > 0:
            out: list[list[int]] = []
            cur: list[int] = []
            tok = 0
            for g in own:
                n = int(lengths[g])
                if cur and tok + n > micro_batch_tokens:
                    out.append(cur)
                    cur, tok = [], 0
                cur.append(g)
                tok += n
            if cur:
                out.append(cur)
            return out
        return [own[i : i + micro_batch] for i in range(0, len(own), micro_batch)]

    all_micro = [micro(own) for own in per_rank]
    count = max(len(m) for m in all_micro)
    mine = [(m, 1.0) for m in all_micro[rank]]
    filler = [per_rank[rank][0] if per_rank[rank] else int(rows[0])]
    mine += [(filler, 0.0)] * (count - len(mine))
    return mine


def plan_micro_batches(cfg: TrainConfig, data: PackedData, world_size: int, rank: int) -> list[tuple[list[int], float]]:
    """Every micro-batch (global rows, weight) of `rank` over the whole run, in order: the
    plan the loop follows (`plan_steps`, then `split_step` per step)."""
    out = []
    for rows in plan_run(cfg, data):
        out += split_micro(cfg, rows, data.lengths, world_size=world_size, rank=rank)
    return out


def plan_run(cfg: TrainConfig, data: PackedData) -> list[np.ndarray]:
    """`plan_steps` with a training config's batch, seed, length and mixture settings."""
    if cfg.weights and len(cfg.weights) != len(data.sets):
        raise ConfigError(f"--weights gives {len(cfg.weights)} weight(s) for {len(data.sets)} data source(s): one per shard directory")
    return plan_steps(data.lengths, global_batch=cfg.global_batch, global_batch_tokens=cfg.global_batch_tokens,
                      seed=cfg.seed, epochs=cfg.epochs, max_steps=cfg.max_steps, global_batch_docs=cfg.global_batch_docs,
                      documents=data.documents if cfg.global_batch_docs > 0 else None, sizes=data.sizes,
                      weights=list(cfg.weights) or None)


def split_micro(cfg: TrainConfig, rows: np.ndarray, lengths: np.ndarray, *, world_size: int, rank: int) -> list[tuple[list[int], float]]:
    """`split_step` with a training config's micro-batch settings (a token or document budget
    gives steps of varying rows: ranks are balanced by tokens)."""
    return split_step(rows, lengths, world_size=world_size, rank=rank, micro_batch=cfg.micro_batch,
                      micro_batch_tokens=cfg.micro_batch_tokens, by_tokens=cfg.global_batch_tokens > 0 or cfg.global_batch_docs > 0)


class DataUse:
    """What the plan has used of each source so far (rows, documents), for the metrics: the
    realised mixture (`data/<source>/fraction`, `data/<source>/epochs`) and the documents of
    a step (`docs`). Rebuilt from the plan on resume: a pure function of the step."""

    def __init__(self, cfg: TrainConfig, data: PackedData, plan: list[np.ndarray], step: int):
        self.data, self.plan = data, plan
        self.mixture = bool(cfg.weights) or len(data.sets) > 1
        self.docs = cfg.global_batch_docs > 0
        self.labels = data.labels()
        self.rows = np.zeros(len(data.sets), dtype=np.int64)
        for s in range(step):
            self.rows += np.bincount(data.source_of(plan[s]), minlength=len(data.sets))

    def step_metrics(self, step: int) -> dict[str, float]:
        """Count step `step` (0-based) in; its metrics."""
        rows = self.plan[step]
        self.rows += np.bincount(self.data.source_of(rows), minlength=len(self.data.sets))
        out: dict[str, float] = {}
        if self.docs:
            out["docs"] = float(self.data.documents[rows].sum())
        if self.mixture:
            total = max(int(self.rows.sum()), 1)
            for label, used, size in zip(self.labels, self.rows, self.data.sizes):
                out[f"data/{label}/fraction"] = float(used) / total
                out[f"data/{label}/epochs"] = float(used) / size
        return out


__all__ = ["Batch", "DataUse", "PackedData", "RowStream", "collate", "epoch_order", "mixture_sources", "plan_micro_batches",
           "plan_run", "plan_steps", "row_documents", "split_micro", "split_step"]
