"""`irtrain dpo`: preference optimisation with every loss of FORMULAS.md "Preference losses".

The loop is the shared one (`irtrain.train.loop.train`); this package is the preference
`Objective` (`objective.py`). Per micro-batch:

1. ONE padding-free forward over the packed rows. A pair's chosen and rejected (or the K
   candidates of a ranked example) sit in the same packed row as separate segments, so
   both sides come out of the same forward (TRL disabled padding-free DPO, trl#2469).
2. Per-segment sequence log-probs `logpi(y|x)` (sums over response tokens) and lengths,
   grouped into examples (`data.py`): `PreferenceBatch` [B, K].
3. `log pi_ref(y|x)` from the reference cache (`irtrain.train.reference`): computed once
   with the reference model (the starting model, or `--ref-model`), stored beside the
   shards, refused on mismatch. No reference model is resident while training.
4. The loss is `PREFERENCE_LOSSES[cfg.loss]` (a pure tensor function, `irtrain.losses`;
   options checked in `options.py`), summed over the micro-batch's examples and divided
   by the examples of the whole step, so it is the mean over pairs whatever the
   accumulation or world size. `--sft-coef` adds `alpha * ce(y_w)` reduced by the chosen
   tokens of the step.

KTO (unpaired data) also needs `z` from mismatched pairs (`kto.py`). Joint SFT+DPO
(`--joint-sft`, `joint.py`) and the alternating schedule (`--alternate-with`,
`alternating.py`) are the seed paper's App. D experiments.
"""
from __future__ import annotations

from irtrain.config import DPOConfig
from irtrain.display import quiet_transformers
from irtrain.dpo.alternating import run_alternating
from irtrain.dpo.data import batch_examples, check_preference_shards, example_groups
from irtrain.dpo.joint import joint_config
from irtrain.dpo.kto import mismatched_rows
from irtrain.dpo.objective import PreferenceObjective
from irtrain.dpo.options import LossSetup, resolve_loss
from irtrain.train.loop import TrainResult, train

__all__ = ["LossSetup", "PreferenceObjective", "batch_examples", "check_preference_shards", "example_groups",
           "mismatched_rows", "resolve_loss", "run"]


def run(cfg: DPOConfig) -> TrainResult | list[TrainResult]:
    """`irtrain dpo`: train `cfg.model` on the preference shards `cfg.data` (see `DPOConfig`).

    Returns the loop's `TrainResult` (out, steps, last_checkpoint, metrics); for the
    alternating schedule, the list of every stage's result.
    """
    with quiet_transformers():  # its bars would break the display
        if cfg.alternate_with:
            return run_alternating(cfg)
        if cfg.joint_sft:
            cfg = joint_config(cfg)
            return train(cfg, PreferenceObjective(cfg, joint=True))
        return train(cfg, PreferenceObjective(cfg))
