"""The `Objective` protocol: what a command (sft, dpo, ...) plugs into the shared loop.

`irtrain.train.loop.train(cfg, objective)` owns everything generic: config checks, model
and data loading, the deterministic data plan, gradient accumulation, the strategy
(single process / DeepSpeed), clipping, the lr schedule, the non-finite guard,
checkpoints and exact resume, signals, metrics and the held-out preference eval. An
objective only says how a micro-batch becomes a loss.

Lifecycle, in the order `train` calls it::

    objective.check_data(sets)            # before anything is written; raise ShardError /
                                          # ConfigError for data of the wrong kind
    objective.setup(ctx)                  # once, model loaded, before the first step: fetch
                                          # what you need, e.g. ctx.reference_logps(k) (computed
                                          # with the STARTING model and cached beside the shards)
                                          # or ctx.reference_model() (a frozen, resident copy)
    for each optimizer step:
        objective.begin_step(step, batches)        # hook: step-wide state (e.g. dpo's lambda)
        d = objective.step_denominator(batches)    # pure: this rank's count for the step
        D = all-reduce sum of d over ranks         # e.g. SFT: response tokens, DPO: pairs
        for each micro-batch b of this rank:
            loss, stats = objective.micro_step(model, b, D)
            backward(loss)                         # the loop does this
        clip, step (skipped and counted if the loss or grad norm is not finite)
        objective.end_step(step, reduced)          # hook: the step's stats summed over ranks
    every --eval-steps, with --eval-pairs:
        policy = segment_logps_of(model, eval_pairs)   # the loop's one pass over the pairs
        objective.evaluate(policy, ctx)                # extra metrics on the same log-probs

The reduction rule (FORMULAS.md "Reduction"): `micro_step` returns this micro-batch's
*share* of the step loss, i.e. sum over its items / D. Summed over the micro-batches of
all ranks it is the step loss, whatever the split, so loss and gradients do not depend
on micro-batch size, accumulation or world size. (The strategy undoes DeepSpeed's
averaging over ranks.) A filler micro-batch (`batch.weight == 0`, keeps ranks in
lockstep) must contribute zero: multiply by `batch.weight`.

`state_dict() -> dict` (JSON-serialisable) is saved in every checkpoint and handed back to
`load_state_dict(d)` on --resume, for objectives with state of their own (dpo's adaptive
lambda). Every hook has a no-op default in `Objective`.

`stats` maps metric names to (sum, count) pairs of 0-d tensors (or floats); the loop adds
them over micro-batches and ranks and logs sum / count, so a metric is a mean over
whatever `count` counts (tokens, segments, pairs). Keep them detached.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from irtrain.config import TrainConfig
    from irtrain.evaluation import SegmentLogps
    from irtrain.shards import ShardSet
    from irtrain.train.batching import Batch, PackedData
    from irtrain.train.reference import ReferenceLogps
    from irtrain.train.strategy import Strategy

Stats = dict[str, tuple[Any, Any]]


class Objective:
    """Base class of the objectives (see the module docstring); `name` is used in messages
    ("sft", "dpo"); `headline` are the metrics the progress display shows, in order of
    importance (those that do not fit are dropped; `irtrain.display`). Subclasses implement
    `check_data`, `step_denominator` and `micro_step`; the other hooks default to doing nothing."""

    name = "objective"
    headline: tuple[str, ...] = ("loss", "lr", "grad_norm", "eval/pref_accuracy", "eval/pref_loss")

    def check_data(self, sets: list[ShardSet]) -> None:
        """Raise `ShardError`/`ConfigError` if the shard sets are of the wrong kind."""
        raise NotImplementedError

    def setup(self, ctx: TrainContext) -> None:
        """Called once before the first step (also on resume)."""

    def begin_step(self, step: int, batches: list[Batch]) -> None:
        """Before optimizer step `step` (0-based): this rank's micro-batches of the step."""

    def step_denominator(self, batches: list[Batch]) -> float:
        """This rank's count for the step (the loop all-reduces the sum). Pure."""
        raise NotImplementedError

    def micro_step(self, model: Any, batch: Batch, denominator: float) -> tuple[Tensor, Stats]:
        """(loss share to backward, detached (sum, count) metrics) of one micro-batch."""
        raise NotImplementedError

    def end_step(self, step: int, stats: dict[str, tuple[float, float]]) -> None:
        """After optimizer step `step`: every metric's (sum, count) over the step's
        micro-batches of all ranks."""

    def evaluate(self, policy: SegmentLogps, ctx: TrainContext) -> dict[str, float]:
        """Extra held-out metrics from the policy's log-probs on --eval-pairs (may be {})."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """The objective's own state, saved in checkpoints (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` on --resume."""


@dataclass
class TrainContext:
    """What `Objective.setup` / `evaluate` may use.

    cfg:        the command's config (a `TrainConfig` subclass)
    strategy:   the `Strategy` (rank, world size, device, all_reduce, ...)
    data:       the training rows (`PackedData`; `data.sets[k]` is the k-th shard set)
    model_path: the resolved starting model (local directory)
    out:        the output directory
    reference_logps(k): `ReferenceLogps` of training shard set k under the starting model
                (computed once and cached beside the shards; see `reference.py`)
    reference_logps_for(shard_set): the same for any shard set (e.g. eval data)
    reference_model(): a frozen, resident copy of the starting model (only for what
                truly needs full reference logits, e.g. --kl-estimator full)
    """

    cfg: TrainConfig
    strategy: Strategy
    data: PackedData
    model_path: Path
    out: Path
    tokenizer: Any
    reference_logps_for: Callable[[ShardSet], ReferenceLogps]
    reference_model: Callable[[], Any]

    def reference_logps(self, k: int) -> ReferenceLogps:
        return self.reference_logps_for(self.data.sets[k])
