"""Losses and the per-token quantities they are built from (FORMULAS.md "Notation").

Variants are entries in tables, each a pure function of tensors (one module per family;
adding a variant touches that module only, the config's choices come from the tables):

- `SFT_LOSSES` (`sft.py`): per-token SFT losses `fn(logps, ref_logps, delta_v) -> [N]`
  (FORMULAS.md "SFT losses"), reduced by the caller with `reduce_tokens`.
- `KL_ESTIMATORS` (`kl.py`): per-token KL-to-reference terms (FORMULAS.md "KL to the reference").
- `PREFERENCE_LOSSES` (`preference.py`): per-example preference losses
  `fn(PreferenceBatch, beta=..., ...) -> [B]` (FORMULAS.md "Preference losses").
- `tokens.py`: the one shift-and-mask helper (`response_states`), per-token stats, values,
  the reduction rule (FORMULAS.md "Reduction").
"""
from __future__ import annotations

from irtrain.losses.kl import KL_ESTIMATORS, KLEstimator, full_kl, k1, k2, k3
from irtrain.losses.preference import (
                                       PREFERENCE_LOSSES,
                                       PREFERENCE_PARAM_DEFAULTS,
                                       DataFormat,
                                       PreferenceBatch,
                                       PreferenceLoss,
                                       hinge_loss,
                                       infonca_loss,
                                       ipo_loss,
                                       kto_loss,
                                       kto_z,
                                       log1mexp,
                                       orpo_loss,
                                       plackett_luce_loss,
                                       preference_metrics,
                                       robust_loss,
                                       sigmoid_loss,
                                       simpo_loss,
)
from irtrain.losses.sft import SFT_LOSSES, SFTLoss, ce, dft, hellinger, js, pearson, sequence_ce
from irtrain.losses.tokens import (
                                       ResponseStates,
                                       TokenStats,
                                       delta_values,
                                       entropy,
                                       first_token_mask,
                                       reduce_tokens,
                                       response_states,
                                       response_token_stats,
                                       segment_sums,
                                       state_token_stats,
)
from irtrain.shards import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX", "KL_ESTIMATORS", "PREFERENCE_LOSSES", "PREFERENCE_PARAM_DEFAULTS", "SFT_LOSSES", "DataFormat",
    "KLEstimator", "PreferenceBatch", "PreferenceLoss", "ResponseStates", "SFTLoss", "TokenStats", "ce", "delta_values",
    "dft", "entropy", "first_token_mask", "full_kl", "hellinger", "hinge_loss", "infonca_loss", "ipo_loss", "js", "k1",
    "k2", "k3", "kto_loss", "kto_z", "log1mexp", "orpo_loss", "pearson", "plackett_luce_loss", "preference_metrics",
    "reduce_tokens", "response_states", "response_token_stats", "robust_loss", "segment_sums", "sequence_ce",
    "sigmoid_loss", "simpo_loss", "state_token_stats",
]
