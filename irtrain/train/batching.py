"""Packed rows -> optimizer steps -> per-rank micro-batches.

Everything here is deterministic: the row order depends only on (seed, epoch), so the
plan of a run can be rebuilt from its config and resuming at step k needs only k.

- The data stream is epoch 0's permutation of all rows, then epoch 1's, and so on.
- An optimizer step takes the next `global_batch` rows of the stream, or, with
  `global_batch_tokens`, the next rows until their tokens reach that budget.
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

    def locate(self, g: int) -> tuple[int, int]:
        """Global row index -> (dataset index, row index within that shard set)."""
        k = int(np.searchsorted(self._starts, g, side="right")) - 1
        return k, g - int(self._starts[k])

    def batch(self, rows: list[int], weight: float = 1.0) -> Batch:
        ids = [self.locate(int(g)) for g in rows]
        return collate([self.sets[k].row(i) for k, i in ids], ids, weight)


# --------------------------------------------------------------------------- the plan
def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row permutation of one epoch: a pure function of (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def _stream(num_rows: int, seed: int, start: int, count: int) -> np.ndarray:
    """Rows `start .. start+count` of the endless stream of epoch permutations."""
    out, pos = [], start
    while pos < start + count:
        epoch, off = divmod(pos, num_rows)
        take = min(num_rows - off, start + count - pos)
        out.append(epoch_order(num_rows, seed, epoch)[off : off + take])
        pos += take
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def plan_steps(lengths: np.ndarray, *, global_batch: int, global_batch_tokens: int = 0, seed: int = 0,
               epochs: float = 1.0, max_steps: int = 0) -> list[np.ndarray]:
    """The global rows of every optimizer step of the run.

    lengths: [R] tokens per packed row. Row budget: each step `global_batch` rows, the run
    `max_steps` steps or floor(epochs * R / global_batch). Token budget
    (`global_batch_tokens` > 0): each step the next rows until their tokens reach the
    budget; the run `max_steps` steps or until epochs * R rows are used (a last partial
    step is dropped).
    """
    n = len(lengths)
    if n == 0:
        raise ConfigError("the training data has no rows")
    if global_batch_tokens > 0:
        limit = math.inf if max_steps > 0 else int(epochs * n)
        steps: list[np.ndarray] = []
        pos, chunk = 0, max(1024, 4 * n)
        buf = _stream(n, seed, 0, chunk)
        cur: list[int] = []
        tokens = 0
        while (max_steps <= 0 or len(steps) < max_steps) and pos < limit:
            if pos >= len(buf):
                buf = np.concatenate([buf, _stream(n, seed, len(buf), chunk)])
            g = int(buf[pos])
            pos += 1
            cur.append(g)
            tokens += int(lengths[g])
            if tokens >= global_batch_tokens:
                steps.append(np.asarray(cur, dtype=np.int64))
                cur, tokens = [], 0
        if not steps:
            raise ConfigError(
                f"--global-batch-tokens {global_batch_tokens} is more than the {int(lengths.sum())} tokens "
                f"of {epochs:g} epoch(s) of the data: no complete optimizer step")
        return steps
    if global_batch <= 0:
        raise ConfigError("--global-batch must be > 0")
    total = max_steps if max_steps > 0 else int(epochs * n) // global_batch
    if total <= 0:
        raise ConfigError(
            f"--global-batch {global_batch} is more than the {int(epochs * n)} rows of {epochs:g} epoch(s) "
            f"of the data: no complete optimizer step (lower it or set --max-steps)")
    stream = _stream(n, seed, 0, total * global_batch)
    return [stream[i * global_batch : (i + 1) * global_batch] for i in range(total)]


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


def plan_micro_batches(cfg: TrainConfig, lengths: np.ndarray, world_size: int, rank: int) -> list[tuple[list[int], float]]:
    """Every micro-batch (global rows, weight) of `rank` over the whole run, in order: the
    plan the loop follows (`plan_steps`, then `split_step` per step)."""
    out = []
    for rows in plan_run(cfg, lengths):
        out += split_micro(cfg, rows, lengths, world_size=world_size, rank=rank)
    return out


def plan_run(cfg: TrainConfig, lengths: np.ndarray) -> list[np.ndarray]:
    """`plan_steps` with a training config's batch, seed and length settings."""
    return plan_steps(lengths, global_batch=cfg.global_batch, global_batch_tokens=cfg.global_batch_tokens,
                      seed=cfg.seed, epochs=cfg.epochs, max_steps=cfg.max_steps)


def split_micro(cfg: TrainConfig, rows: np.ndarray, lengths: np.ndarray, *, world_size: int, rank: int) -> list[tuple[list[int], float]]:
    """`split_step` with a training config's micro-batch settings."""
    return split_step(rows, lengths, world_size=world_size, rank=rank, micro_batch=cfg.micro_batch,
                      micro_batch_tokens=cfg.micro_batch_tokens, by_tokens=cfg.global_batch_tokens > 0)


__all__ = ["Batch", "PackedData", "collate", "epoch_order", "plan_micro_batches", "plan_run", "plan_steps", "split_micro",
           "split_step"]
