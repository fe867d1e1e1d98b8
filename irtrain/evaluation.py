"""Held-out preference evaluation: one log-prob pass, one set of pair metrics.

FORMULAS.md "Implicit-reward metrics": on held-out preference pairs, the implicit-reward
margin ``m = β((logπ(y_w) − logπ_ref(y_w)) − (logπ(y_l) − logπ_ref(y_l)))``, the sigmoid
DPO loss ``−logσ(m)`` (`eval/pref_loss`) and the accuracy ``mean(m > 0)``
(`eval/pref_accuracy`). Without a reference, ``logπ(y_w) > logπ(y_l)`` (`logp_accuracy`).

Everything that evaluates pairs goes through here:

- `segment_logps_of(model, shards)`: the ONE pass of a model over a shard set (padding-free
  forwards, rows split over ranks and all-reduced): log π(y|x) and |y| of every segment;
- `preference_pairs(shards)`: the (chosen, rejected) segments of every pair;
- `pair_metrics(...)`: per-pair margin, sigmoid loss and correctness from segment log-probs;
- `held_out_metrics(...)`: their means under the loop's names.

The training loop runs `segment_logps_of` once per evaluation and hands the result to the
objective (dpo adds its own loss and TRL-named rewards on the same log-probs); `irtrain
score` and the quickstart report use `pair_metrics` on their own log-probs.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from irtrain.losses import PREFERENCE_LOSSES, PreferenceBatch
from irtrain.shards import ShardSet
from irtrain.train.reference import sequence_logps

if TYPE_CHECKING:
    from irtrain.train.strategy import Strategy


@dataclass
class SegmentLogps:
    """log π(y|x) [S] float64 and |y| [S] float64 of every segment of a shard set, in global
    segment order, under one model."""

    logps: Tensor
    lengths: Tensor


@torch.no_grad()
def segment_logps_of(model: Any, shards: ShardSet, *, token_budget: int, strategy: Strategy | None = None,
                     device: torch.device | None = None) -> SegmentLogps:
    """One pass of `model` over every row of `shards`. Under a `strategy` the rows are split
    over its ranks and the result is all-reduced (every rank gets the whole); otherwise one
    process on `device` (default CPU)."""
    world, rank = (strategy.world_size, strategy.rank) if strategy is not None else (1, 0)
    dev = strategy.device if strategy is not None else (device or torch.device("cpu"))
    autocast: Callable[[], Any] | None = strategy.autocast if strategy is not None else None
    offsets = np.concatenate([[0], np.cumsum(shards.row_segments)]).astype(np.int64)
    both = torch.zeros(2, shards.num_segments, dtype=torch.float64)
    for i, _, sums, counts in sequence_logps(model, shards, device=dev, token_budget=token_budget,
                                             world_size=world, rank=rank, autocast=autocast):
        a = int(offsets[i])
        both[0, a : a + len(sums)] = torch.from_numpy(np.asarray(sums, dtype=np.float64))
        both[1, a : a + len(sums)] = torch.from_numpy(np.asarray(counts, dtype=np.float64))
    if strategy is not None and strategy.world_size > 1:
        both = strategy.all_reduce(both.to(dev)).cpu()
    return SegmentLogps(logps=both[0], lengths=both[1])


def model_segment_logps(model_dir: str | Path, shards_dir: str | Path, *, token_budget: int = 4096) -> np.ndarray:
    """log π(y) of every segment of a shard set under the model saved in `model_dir`, on the
    CPU in fp32 (the quickstart report and the seed experiments). [S] float64."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    model.config.use_cache = False
    return segment_logps_of(model, ShardSet(shards_dir), token_budget=token_budget).logps.numpy()


def preference_pairs(shards: ShardSet) -> tuple[np.ndarray, np.ndarray]:
    """Global segment indices (chosen, rejected) of every pair in preference shards, by
    example id (computed once per shard set: `ShardSet.preference_pairs`)."""
    return shards.preference_pairs


@dataclass
class PairMetrics:
    """Per pair [P] float64: `logp_margin` = logπ(y_w) − logπ(y_l); with a reference also the
    implicit-reward `margin` m, the sigmoid DPO `loss` −logσ(m) and `correct` = (m > 0)."""

    logp_margin: Tensor
    margin: Tensor | None = None
    loss: Tensor | None = None
    correct: Tensor | None = None


def pair_metrics(policy: Tensor | np.ndarray, chosen: np.ndarray, rejected: np.ndarray, *,
                 reference: Tensor | np.ndarray | None = None, beta: float) -> PairMetrics:
    """Pair metrics from segment log-probs `policy` (and `reference`) [S] and the pairs'
    segment indices (`preference_pairs`)."""
    pol = torch.as_tensor(np.asarray(policy, dtype=np.float64)) if not isinstance(policy, Tensor) else policy.double()
    c, r = torch.as_tensor(chosen, dtype=torch.long), torch.as_tensor(rejected, dtype=torch.long)
    out = PairMetrics(logp_margin=pol[c] - pol[r])
    if reference is not None:
        ref = torch.as_tensor(np.asarray(reference, dtype=np.float64)) if not isinstance(reference, Tensor) else reference.double()
        pb = PreferenceBatch.pairs(pol[c], pol[r], ref[c], ref[r])
        out.loss = PREFERENCE_LOSSES["sigmoid"](pb, beta=beta)
        out.margin = beta * ((pol[c] - ref[c]) - (pol[r] - ref[r]))
        out.correct = (out.margin > 0).double()
    return out


def held_out_metrics(policy: SegmentLogps, shards: ShardSet, reference: Tensor | np.ndarray, *, beta: float) -> dict[str, float]:
    """`eval/pref_loss` and `eval/pref_accuracy` of the policy against `reference` ({} when the
    shards hold no pair)."""
    chosen, rejected = preference_pairs(shards)
    if len(chosen) == 0:
        return {}
    pm = pair_metrics(policy.logps, chosen, rejected, reference=reference, beta=beta)
    assert pm.loss is not None and pm.correct is not None
    return {"eval/pref_loss": float(pm.loss.mean()), "eval/pref_accuracy": float(pm.correct.mean())}
