"""`irtrain score` over several processes: `torchrun --nproc_per_node N -m irtrain.cli.main score ...`.

The rank and world size come from the environment (``RANK``, ``LOCAL_RANK``,
``WORLD_SIZE``, as `torchrun` sets them); the processes talk through `torch.distributed`
with gloo (only small Python objects travel: summaries and per-response results), on CPU
and GPU alike, so nothing else is needed. The work is split so that every forward is one
the single process would run, with the same documents in it, and so the result equals the
single process's:

- as many models as processes or more: whole models, round-robin (model ``i`` on rank
  ``i mod N``); each rank writes its tables, the main rank the summary;
- fewer models: every model on every rank, each rank running every N-th forward of the
  single process's sequence (`Share`); the main rank gathers the pieces and writes the tables;
- a reference model always the second way, its log-probs then on every rank.

The main rank (rank 0) alone prepares raw data, holds the ``--out`` lock and prints; its
errors there reach every rank (`Ranks.on_main`).
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from irtrain.errors import IrtrainError

T = TypeVar("T")


@dataclass(frozen=True)
class Share:
    """This process's part of a model's forwards: forward ``b`` (in the single process's
    order) runs here when ``b % world == rank``."""

    rank: int = 0
    world: int = 1

    def mine(self, b: int) -> bool:
        return b % self.world == self.rank


#: the whole of a model's forwards (one process)
ALL = Share()


class MainRankError(IrtrainError):
    """The main rank stopped with an error (its message); raised on the other ranks."""


class Ranks:
    """The processes of one `irtrain score` run; a single process when not launched by
    torchrun. As a context manager: joins the gloo process group when ``WORLD_SIZE > 1``
    (unless one exists already) and leaves it (`destroy_process_group`) at the end."""

    def __init__(self) -> None:
        self.rank = int(os.environ.get("RANK", 0))
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self._owned = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def share(self) -> Share:
        return Share(self.rank, self.world)

    def __enter__(self) -> Ranks:
        if self.world > 1 and not torch.distributed.is_initialized():
            # ranks wait for each other at every model (or round of models): far longer than
            # gloo's default 30 minutes when a large model scores a large set
            torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(hours=24))
            self._owned = True
        return self

    def __exit__(self, *exc: object) -> None:
        if self._owned and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        self._owned = False

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU (``LOCAL_RANK``) when several processes share a node's GPUs."""
        if device.type == "cuda" and self.world > 1 and device.index is None:
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    # ------------------------------------------------------------------ collectives
    def on_main(self, fn: Callable[[], T]) -> T:
        """`fn()` on the main rank; its result on every rank. An `IrtrainError` there is raised
        on every rank (on the others as `MainRankError`, with its message)."""
        if self.world == 1:
            return fn()
        msg: list[Any] = [None]
        error: IrtrainError | None = None
        if self.is_main:
            try:
                msg = [("ok", fn())]
            except IrtrainError as e:
                error, msg = e, [("error", str(e))]
        torch.distributed.broadcast_object_list(msg, src=0)
        if error is not None:
            raise error
        kind, value = msg[0]
        if kind == "error":
            raise MainRankError(value)
        return value

    def gather(self, obj: T) -> list[T] | None:
        """Every rank's `obj` on the main rank (in rank order); None on the others."""
        if self.world == 1:
            return [obj]
        out: list[Any] | None = [None] * self.world if self.is_main else None
        torch.distributed.gather_object(obj, out, dst=0)
        return out

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's `obj` on every rank (in rank order)."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def model_rounds(n_models: int, world: int) -> list[list[int]]:
    """Whole models over ranks: round r runs models ``r*world .. r*world + world - 1``, one per rank."""
    return [list(range(a, min(a + world, n_models))) for a in range(0, n_models, world)]


def merge_parts(parts: list[Any]) -> Any:
    """One `ModelScores` from the ranks' pieces (each filled where its `done` is set)."""
    first = parts[0]
    logp, num_tokens, values = first.logp.copy(), first.num_tokens.copy(), list(first.values)
    done = first.done.copy()
    for p in parts[1:]:
        k = p.done
        if (done & k).any():
            raise RuntimeError("two ranks scored the same response")  # a bug, never the user's
        logp[k], num_tokens[k] = p.logp[k], p.num_tokens[k]
        for i in np.flatnonzero(k):
            values[i] = p.values[i]
        done |= k
    if not done.all():
        raise RuntimeError(f"{int((~done).sum())} response(s) were scored by no rank")
    return dataclasses.replace(first, logp=logp, num_tokens=num_tokens, values=values, tokens=sum(p.tokens for p in parts),
                               done=done)
