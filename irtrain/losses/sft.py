"""SFT losses (FORMULAS.md "SFT losses"): per token, in log space; the table `SFT_LOSSES`.

Adding an SFT loss is one function and one entry of `SFT_LOSSES` here: `irtrain sft
--loss`'s choices and help are derived from the table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from irtrain.lazy import lazy

if TYPE_CHECKING:
    import torch.nn.functional as F
    from torch import Tensor
else:
    F = lazy("torch.nn.functional")

from irtrain.losses.tokens import reduce_tokens

# SFT losses (FORMULAS.md "SFT losses"): per token, in log space.
# Arguments: logps [N] = log p_t, ref_logps [N] = log q_t, delta_v [N] = dV_t (from
# `delta_values`). The caller decides whether dV carries gradient (`--value-grad`; default:
# detached). With dV detached, `pearson` has the same gradient as `dft` (-p_t grad log p_t).


def _check_tokens(name: str, logps: Tensor, ref_logps: Tensor | None, delta_v: Tensor | None, *, needs_ref: bool, needs_values: bool) -> None:
    if logps.dim() != 1:
        raise ValueError(f"{name}: logps must be [N], got {tuple(logps.shape)}")
    if needs_ref and ref_logps is None:
        raise ValueError(f"{name}: needs reference log-probs log q_t")
    if needs_values and delta_v is None:
        raise ValueError(f"{name}: needs the value differences dV_t")
    for other_name, other in (("ref_logps", ref_logps), ("delta_v", delta_v)):
        if other is not None and other.shape != logps.shape:
            raise ValueError(f"{name}: {other_name} {tuple(other.shape)} must match logps {tuple(logps.shape)}")


def _ref_plus_value(name: str, logps: Tensor, ref_logps: Tensor | None, delta_v: Tensor | None) -> Tensor:
    """log q_t + dV_t, for the losses that need both (checked)."""
    _check_tokens(name, logps, ref_logps, delta_v, needs_ref=True, needs_values=True)
    assert ref_logps is not None and delta_v is not None
    return ref_logps + delta_v


def ce(logps: Tensor, ref_logps: Tensor | None = None, delta_v: Tensor | None = None) -> Tensor:
    """Cross-entropy: -log p_t. [N] -> [N]. Gradient -grad log p_t."""
    _check_tokens("ce", logps, ref_logps, delta_v, needs_ref=False, needs_values=False)
    return -logps


def dft(logps: Tensor, ref_logps: Tensor | None = None, delta_v: Tensor | None = None) -> Tensor:
    """Dynamic fine-tuning (arXiv 2508.05629): -sg(p_t) log p_t. [N] -> [N]. Gradient -p_t grad log p_t."""
    _check_tokens("dft", logps, ref_logps, delta_v, needs_ref=False, needs_values=False)
    return -logps.detach().exp() * logps


def pearson(logps: Tensor, ref_logps: Tensor | None, delta_v: Tensor | None) -> Tensor:
    """Pearson chi^2: -p_t + exp(log q_t + dV_t). [N] -> [N].

    Gradient with dV detached: -p_t grad log p_t, the same as `dft`.
    """
    target = _ref_plus_value("pearson", logps, ref_logps, delta_v)
    return -logps.exp() + target.exp()


def hellinger(logps: Tensor, ref_logps: Tensor | None, delta_v: Tensor | None) -> Tensor:
    """Squared Hellinger: exp(1/2 (log q_t + dV_t)) - exp(1/2 log p_t). [N] -> [N].

    Gradient with dV detached: -1/2 sqrt(p_t) grad log p_t.
    """
    target = _ref_plus_value("hellinger", logps, ref_logps, delta_v)
    return (0.5 * target).exp() - (0.5 * logps).exp()


def js(logps: Tensor, ref_logps: Tensor | None, delta_v: Tensor | None) -> Tensor:
    """Jensen-Shannon: softplus(log q_t + dV_t) - softplus(log p_t). [N] -> [N].

    Gradient with dV detached: -p_t/(1+p_t) grad log p_t.
    """
    target = _ref_plus_value("js", logps, ref_logps, delta_v)
    return F.softplus(target) - F.softplus(logps)


@dataclass(frozen=True)
class SFTLoss:
    """An entry of `SFT_LOSSES`.

    fn:           (logps [N], ref_logps [N] | None, delta_v [N] | None) -> per-token loss [N]
    needs_ref:    needs log q_t (precomputed reference log-probs)
    needs_values: needs dV_t = `delta_values(stats.values, stats.is_last)`, detached unless --value-grad
    summary:      one line for the CLI help (the config's choices and help come from this table)
    """

    fn: Callable[[Tensor, Tensor | None, Tensor | None], Tensor]
    needs_ref: bool
    needs_values: bool
    summary: str = ""

    def __call__(self, logps: Tensor, ref_logps: Tensor | None = None, delta_v: Tensor | None = None) -> Tensor:
        return self.fn(logps, ref_logps, delta_v)


SFT_LOSSES: dict[str, SFTLoss] = {
    "ce": SFTLoss(ce, needs_ref=False, needs_values=False, summary="-log p (cross-entropy)"),
    "dft": SFTLoss(dft, needs_ref=False, needs_values=False, summary="-sg(p) log p (DFT)"),
    "pearson": SFTLoss(pearson, needs_ref=True, needs_values=True, summary="Pearson chi^2 (dft's gradient with dV detached)"),
    "hellinger": SFTLoss(hellinger, needs_ref=True, needs_values=True, summary="squared Hellinger"),
    "js": SFTLoss(js, needs_ref=True, needs_values=True, summary="Jensen-Shannon"),
}


def sequence_ce(chosen_logps: Tensor, chosen_lengths: Tensor, denom: int | float | Tensor | None = None) -> Tensor:
    """`ce` on the chosen responses, for `--sft-coef alpha` (FORMULAS.md: adds alpha*ce(y_w)).

    chosen_logps:   [B] sequence log-probs logpi_theta(y_w) (sums over response tokens)
    chosen_lengths: [B] |y_w|
    denom:          chosen response tokens in the whole optimizer step (default: sum(chosen_lengths))
    returns 0-d: -sum_b logpi(y_w,b) / denom, i.e. `reduce_tokens(ce(token logps of y_w), denom)`
    (a sum of per-token -log p_t is the negated sequence log-prob). Add alpha * this to the
    reduced preference loss.
    """
    if chosen_logps.dim() != 1 or chosen_lengths.shape != chosen_logps.shape:
        raise ValueError(f"chosen_logps and chosen_lengths must both be [B], got {tuple(chosen_logps.shape)} and {tuple(chosen_lengths.shape)}")
    return reduce_tokens(-chosen_logps, chosen_lengths.sum() if denom is None else denom)
