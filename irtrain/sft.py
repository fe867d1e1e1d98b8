"""`irtrain sft`: supervised fine-tuning with the SFT loss family of FORMULAS.md.

The loop is the shared one (`irtrain.train.loop.train`); this module is the SFT
`Objective`: per micro-batch, one padding-free forward, the per-token loss from
`SFT_LOSSES` (and a KL term from `KL_ESTIMATORS`), reduced by the response tokens of the
whole optimizer step, plus the per-step metrics (token accuracy, entropy, value/s0, KL).
"""
from __future__ import annotations

from typing import Any

import torch

from irtrain.config import SFTConfig
from irtrain.display import quiet_transformers
from irtrain.errors import ConfigError, ShardError
from irtrain.losses import KL_ESTIMATORS, SFT_LOSSES, delta_values, first_token_mask, reduce_tokens
from irtrain.shards import IGNORE_INDEX, SFT_FORMATS, ShardSet
from irtrain.train.batching import Batch
from irtrain.train.loop import TrainResult, train
from irtrain.train.objective import Objective, Stats, TrainContext
from irtrain.train.packed import packed_token_stats
from irtrain.train.reference import ReferenceLogps, batch_reference


class SFTObjective(Objective):
    """The SFT objective (see `irtrain.train.objective` for the protocol).

    Per-token loss `SFT_LOSSES[cfg.loss]` (+ `kl_coef` x `KL_ESTIMATORS[cfg.kl_estimator]`),
    summed over the micro-batch's response tokens and divided by the response tokens of the
    whole step (FORMULAS.md "Reduction"). log q_t comes from the reference cache (no
    reference model resident), except for `--kl-estimator full`, which needs the full
    reference distribution and keeps a frozen copy of the starting model.
    """

    name = "sft"
    headline = ("loss", "lr", "grad_norm", "token_accuracy", "eval/pref_accuracy", "eval/pref_loss")

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg
        self.loss = SFT_LOSSES[cfg.loss]
        self.kl = KL_ESTIMATORS[cfg.kl_estimator] if cfg.kl_coef > 0 else None
        if cfg.kl_coef < 0:
            raise ConfigError("--kl-coef must be >= 0")
        self.refs: list[ReferenceLogps] | None = None
        self.ref_model: Any = None

    def check_data(self, sets: list[ShardSet]) -> None:
        for s in sets:
            if s.format not in SFT_FORMATS:
                raise ShardError(f"{s.path}: sft trains on chat or prompt-completion shards, these are `{s.format}` shards")

    def setup(self, ctx: TrainContext) -> None:
        need_logps = self.loss.needs_ref or (self.kl is not None and not self.kl.needs_logits) or self.cfg.kl_metrics
        if need_logps:
            self.refs = [ctx.reference_logps(k) for k in range(len(ctx.data.sets))]
        if self.kl is not None and self.kl.needs_logits:
            self.ref_model = ctx.reference_model()

    def step_denominator(self, batches: list[Batch]) -> float:
        """Response tokens of this rank's micro-batches (FORMULAS.md "Reduction")."""
        return float(sum(int((b.labels != IGNORE_INDEX).sum()) for b in batches if b.weight))

    def micro_step(self, model: Any, batch: Batch, denominator: float) -> tuple[torch.Tensor, Stats]:
        cfg = self.cfg
        # the full logits at the states only for the exact KL; the head runs chunked otherwise
        stats = packed_token_stats(model, batch, tau=cfg.value_temperature, keep_logits=self.ref_model is not None, extras=True)
        n = stats.logps.numel()
        ref_logps = batch_reference(self.refs, batch)[0] if self.refs is not None else None
        delta_v = None
        if self.loss.needs_values:
            delta_v = delta_values(stats.values, stats.is_last)
            if not cfg.value_grad:
                delta_v = delta_v.detach()
        per_token = self.loss(stats.logps, ref_logps if self.loss.needs_ref else None, delta_v)
        loss = reduce_tokens(per_token, denominator)

        out: Stats = {}
        ref_state_logits = None
        if self.ref_model is not None:
            assert stats.logits is not None  # keep_logits=True
            with torch.no_grad():
                ref_state_logits = packed_token_stats(self.ref_model, batch, keep_logits=True).logits
            assert ref_state_logits is not None
            out["kl/full"] = (KL_ESTIMATORS["full"].fn(stats.logits.detach(), ref_state_logits).sum(), n)
        if self.kl is not None:
            if self.kl.needs_logits:
                assert stats.logits is not None and ref_state_logits is not None
                kl_tok = self.kl.fn(stats.logits, ref_state_logits)
            else:
                assert ref_logps is not None  # setup fetched the reference cache
                kl_tok = self.kl.fn(stats.logps, ref_logps)
            loss = loss + cfg.kl_coef * reduce_tokens(kl_tok, denominator)
        loss = loss * batch.weight

        w = batch.weight
        with torch.no_grad():
            out["loss/" + cfg.loss] = (per_token.detach().sum() * w, n * w)
            if n:
                assert stats.correct is not None and stats.entropies is not None  # extras=True
                out["token_accuracy"] = (stats.correct.float().sum() * w, n * w)
                out["entropy"] = (stats.entropies.sum() * w, n * w)
                s0 = stats.values.detach()[first_token_mask(stats.is_last)]
                out["value/s0"] = (s0.sum() * w, s0.numel() * w)
            if ref_logps is not None:
                for name in ("k1", "k2", "k3"):
                    out[f"kl/{name}"] = (KL_ESTIMATORS[name].fn(stats.logps.detach(), ref_logps).sum() * w, n * w)
            if "kl/full" in out:
                out["kl/full"] = (out["kl/full"][0] * w, n * w)
        return loss, out



def run(cfg: SFTConfig) -> TrainResult:
    """`irtrain sft`: train `cfg.model` on `cfg.data` (see `SFTConfig`)."""
    with quiet_transformers():  # its bars would break the display
        return train(cfg, SFTObjective(cfg))
