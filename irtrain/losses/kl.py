"""KL to the reference (FORMULAS.md "KL to the reference"): the estimators of `KL_ESTIMATORS`.

Adding an estimator is one function and one entry of `KL_ESTIMATORS` here: `--kl-estimator`'s
choices and help are derived from the table.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from irtrain.lazy import lazy

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy("torch")

# KL to the reference (FORMULAS.md "KL to the reference"). r_t = log q_t - log p_t on the data's
# tokens. Exact expectations over a ~ pi_theta(.|s) at one state (tested by enumeration):
#   E[k1] = KL(pi||ref),  E[grad k1] = 0
#   E[k2] = 1/2 E[r^2] (only ~KL to second order),  E[grad k2] = grad KL(pi||ref) (one state)
#   E[k3] = KL(pi||ref) (unbiased, >= 0 per sample),  E[grad k3] = grad KL(ref||pi) (forward KL)


def _check_pair(name: str, logps: Tensor, ref_logps: Tensor) -> None:
    if logps.dim() != 1 or ref_logps.shape != logps.shape:
        raise ValueError(f"{name}: logps and ref_logps must both be [N], got {tuple(logps.shape)} and {tuple(ref_logps.shape)}")


def k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """-r_t = log p_t - log q_t. [N], [N] -> [N]. Gradient grad log p_t: zero in expectation on-policy."""
    _check_pair("k1", logps, ref_logps)
    return logps - ref_logps


def k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """1/2 r_t^2. [N], [N] -> [N]. Gradient = grad KL(pi||ref) only at sequence level, on-policy
    (per token it is the partial gradient, Tang & Munos arXiv 2506.09477)."""
    _check_pair("k2", logps, ref_logps)
    return 0.5 * (ref_logps - logps).square()


def k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """exp(r_t) - 1 - r_t. [N], [N] -> [N]. Value unbiased for KL(pi||ref) on-policy; gradient
    on-policy = grad KL(ref||pi) (forward KL), as GRPO uses it."""
    _check_pair("k3", logps, ref_logps)
    r = ref_logps - logps
    return torch.expm1(r) - r


def full_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """Exact KL(pi_theta(.|s_t) || pi_ref(.|s_t)) per state. logits, ref_logits: [N, V] -> [N].

    Pass `TokenStats.logits` (keep_logits=True) and the reference's logits at the same states.
    """
    if logits.dim() != 2 or ref_logits.shape != logits.shape:
        raise ValueError(f"full_kl: logits and ref_logits must both be [N, V], got {tuple(logits.shape)} and {tuple(ref_logits.shape)}")
    logp = torch.log_softmax(logits, dim=-1)
    logq = torch.log_softmax(ref_logits.to(logp.dtype), dim=-1)
    return (logp.exp() * (logp - logq)).sum(-1)


@dataclass(frozen=True)
class KLEstimator:
    """An entry of `KL_ESTIMATORS`.

    needs_logits False: fn(logps [N], ref_logps [N]) -> [N]          (k1, k2, k3)
    needs_logits True:  fn(logits [N, V], ref_logits [N, V]) -> [N]  (full: needs the
                        full reference logits, so a resident reference model)
    summary: one line for the CLI help
    """

    fn: Callable[[Tensor, Tensor], Tensor]
    needs_logits: bool
    summary: str = ""


KL_ESTIMATORS: dict[str, KLEstimator] = {
    "full": KLEstimator(full_kl, needs_logits=True, summary="exact KL per visited state (keeps the reference model resident)"),
    "k1": KLEstimator(k1, needs_logits=False, summary="log p - log q (gradient zero in expectation on-policy)"),
    "k2": KLEstimator(k2, needs_logits=False, summary="(log q - log p)^2/2 (partial gradient per token)"),
    "k3": KLEstimator(k3, needs_logits=False, summary="exp(r)-1-r, r = log q - log p (forward-KL gradient, as GRPO)"),
}
