"""Preference losses (FORMULAS.md "Preference losses"): the table `PREFERENCE_LOSSES` and the
TRL-named metrics.

Adding a preference loss is one function and one entry of `PREFERENCE_LOSSES` here:
`irtrain dpo --loss`'s choices and help, and the shard formats it trains on, are derived
from the table.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from irtrain.lazy import lazy

if TYPE_CHECKING:
    import torch
    import torch.nn.functional as F
    from torch import Tensor
else:
    torch, F = lazy("torch"), lazy("torch.nn.functional")

# Preference losses (FORMULAS.md "Preference losses"). Each is
#     fn(batch: PreferenceBatch, *, beta: float, <its own params>) -> per-example loss [B]
# (unreduced; FORMULAS.md's loss is the mean over pairs: reduce with `.mean()`, or with
# sum / pairs-in-the-step under gradient accumulation).


DataFormat = Literal["preference", "unpaired", "ranked"]


@dataclass(frozen=True)
class PreferenceBatch:
    """The tensors every preference loss reads. B examples, K responses each.

    policy_logps: [B, K] logpi_theta(y_k|x), sums over response tokens.
                  preference (K=2): column 0 = chosen y_w, column 1 = rejected y_l.
                  unpaired (K=1, kto). ranked (K>=2): best first (plackett_luce), or with `scores` (infonca).
    ref_logps:    [B, K] logpi_ref(y_k|x), or None for reference-free losses.
    lengths:      [B, K] |y_k| (response tokens); needed by ipo, simpo, orpo.
    scores:       [B, K] candidate scores s_k; needed by infonca.
    labels:       [B] bool, True = desirable; needed by kto.
    mismatched_policy_logps, mismatched_ref_logps: [M] logpi(y_{i+1}|x_i) for kto's z (see `kto_z`).
    """

    policy_logps: Tensor
    ref_logps: Tensor | None = None
    lengths: Tensor | None = None
    scores: Tensor | None = None
    labels: Tensor | None = None
    mismatched_policy_logps: Tensor | None = None
    mismatched_ref_logps: Tensor | None = None

    def __post_init__(self) -> None:
        p = self.policy_logps
        if p.dim() != 2 or p.shape[0] == 0 or p.shape[1] == 0:
            raise ValueError(f"policy_logps must be [B, K] with B, K >= 1, got {tuple(p.shape)}")
        for name in ("ref_logps", "lengths", "scores"):
            t = getattr(self, name)
            if t is not None and t.shape != p.shape:
                raise ValueError(f"{name} {tuple(t.shape)} must match policy_logps {tuple(p.shape)}")
        if self.labels is not None and self.labels.shape != p.shape[:1]:
            raise ValueError(f"labels must be [B] = {tuple(p.shape[:1])}, got {tuple(self.labels.shape)}")
        mp, mr = self.mismatched_policy_logps, self.mismatched_ref_logps
        if (mp is None) != (mr is None):
            raise ValueError("mismatched_policy_logps and mismatched_ref_logps go together")
        if mp is not None and mr is not None and (mp.dim() != 1 or mr.shape != mp.shape):
            raise ValueError(f"mismatched log-probs must both be [M], got {tuple(mp.shape)} and {tuple(mr.shape)}")

    @classmethod
    def pairs(
        cls,
        chosen_logps: Tensor,
        rejected_logps: Tensor,
        ref_chosen_logps: Tensor | None = None,
        ref_rejected_logps: Tensor | None = None,
        chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None,
    ) -> PreferenceBatch:
        """Build a K=2 batch from [B] tensors (TRL's dpo_loss argument order)."""
        def stack(a: Tensor | None, b: Tensor | None, name: str) -> Tensor | None:
            if a is None and b is None:
                return None
            if a is None or b is None:
                raise ValueError(f"{name}: give both chosen and rejected, or neither")
            if a.dim() != 1 or a.shape != b.shape:
                raise ValueError(f"{name}: chosen and rejected must both be [B], got {tuple(a.shape)} and {tuple(b.shape)}")
            return torch.stack([a, b], dim=1)

        policy = stack(chosen_logps, rejected_logps, "logps")
        assert policy is not None
        return cls(
            policy_logps=policy,
            ref_logps=stack(ref_chosen_logps, ref_rejected_logps, "ref_logps"),
            lengths=stack(chosen_lengths, rejected_lengths, "lengths"),
        )

    @property
    def batch_size(self) -> int:
        return self.policy_logps.shape[0]

    @property
    def num_responses(self) -> int:
        return self.policy_logps.shape[1]


def _check_beta(name: str, beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"{name}: beta must be > 0, got {beta}")


def _need_k(name: str, batch: PreferenceBatch, *, exactly: int | None = None, at_least: int | None = None) -> None:
    K = batch.num_responses
    if exactly is not None and K != exactly:
        raise ValueError(f"{name}: expects K = {exactly} responses per example, got policy_logps {tuple(batch.policy_logps.shape)}")
    if at_least is not None and K < at_least:
        raise ValueError(f"{name}: expects K >= {at_least} responses per example, got policy_logps {tuple(batch.policy_logps.shape)}")


def _logratios(name: str, batch: PreferenceBatch) -> Tensor:
    """Delta_k = logpi_theta(y_k) - logpi_ref(y_k): [B, K]."""
    if batch.ref_logps is None:
        raise ValueError(f"{name}: needs reference log-probs (ref_logps)")
    return batch.policy_logps - batch.ref_logps


def _lengths(name: str, batch: PreferenceBatch) -> Tensor:
    if batch.lengths is None:
        raise ValueError(f"{name}: needs response lengths (lengths)")
    if bool((batch.lengths <= 0).any()):
        raise ValueError(f"{name}: response lengths must be > 0")
    return batch.lengths.to(batch.policy_logps.dtype)


def _dpo_margin(name: str, batch: PreferenceBatch, beta: float) -> Tensor:
    """m = beta (Delta_w - Delta_l): [B]."""
    _check_beta(name, beta)
    _need_k(name, batch, exactly=2)
    d = _logratios(name, batch)
    return beta * (d[:, 0] - d[:, 1])


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, stably (FORMULAS.md; Maechler 2012):
    log(-expm1(x)) if x > -ln 2 else log1p(-exp(x)). Elementwise."""
    small = x <= -math.log(2.0)
    # each branch only sees inputs in its own range, so no NaN leaks into the gradient
    near0 = torch.log(-torch.expm1(torch.where(small, torch.full_like(x, -1.0), x)))
    far = torch.log1p(-torch.exp(torch.where(small, x, torch.full_like(x, -1.0))))
    return torch.where(small, far, near0)


def sigmoid_loss(batch: PreferenceBatch, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO: -logsigma(m); with label smoothing eps: -(1-eps) logsigma(m) - eps logsigma(-m). [B, 2] -> [B]."""
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"sigmoid: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    m = _dpo_margin("sigmoid", batch, beta)
    return -(1 - label_smoothing) * F.logsigmoid(m) - label_smoothing * F.logsigmoid(-m)


def robust_loss(batch: PreferenceBatch, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO: (-(1-eps) logsigma(m) + eps logsigma(-m)) / (1 - 2 eps), 0 <= eps < 0.5. [B, 2] -> [B]."""
    eps = label_smoothing
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"robust: label_smoothing (eps) must be in [0, 0.5), got {eps}")
    m = _dpo_margin("robust", batch, beta)
    return (-(1 - eps) * F.logsigmoid(m) + eps * F.logsigmoid(-m)) / (1 - 2 * eps)


def hinge_loss(batch: PreferenceBatch, *, beta: float) -> Tensor:
    """relu(1 - m). [B, 2] -> [B]."""
    return torch.relu(1 - _dpo_margin("hinge", batch, beta))


def ipo_loss(batch: PreferenceBatch, *, beta: float) -> Tensor:
    """IPO with per-token means: ((Delta_w/|y_w| - Delta_l/|y_l|) - 1/(2 beta))^2. [B, 2] -> [B]; needs lengths."""
    _check_beta("ipo", beta)
    _need_k("ipo", batch, exactly=2)
    d = _logratios("ipo", batch) / _lengths("ipo", batch)
    return (d[:, 0] - d[:, 1] - 1 / (2 * beta)).square()


def simpo_loss(batch: PreferenceBatch, *, beta: float, gamma: float = 0.5) -> Tensor:
    """SimPO (reference-free): -logsigma(beta (abar_w - abar_l) - gamma), abar = logpi(y)/|y|. [B, 2] -> [B]; needs lengths."""
    _check_beta("simpo", beta)
    _need_k("simpo", batch, exactly=2)
    a = batch.policy_logps / _lengths("simpo", batch)
    return -F.logsigmoid(beta * (a[:, 0] - a[:, 1]) - gamma)


def orpo_loss(batch: PreferenceBatch, *, beta: float) -> Tensor:
    """ORPO (reference-free): -abar_w - lambda logsigma(L), lambda = beta,
    L = (abar_w - abar_l) - (log1mexp(abar_w) - log1mexp(abar_l)). [B, 2] -> [B]; needs lengths.

    `beta` plays ORPO's lambda (as in TRL's ORPOConfig); `irtrain dpo` sets it from
    `--orpo-lambda` (default 0.1) and refuses `--beta` for orpo.
    """
    _check_beta("orpo", beta)
    _need_k("orpo", batch, exactly=2)
    a = batch.policy_logps / _lengths("orpo", batch)
    log_odds = (a[:, 0] - a[:, 1]) - (log1mexp(a[:, 0]) - log1mexp(a[:, 1]))
    return -a[:, 0] - beta * F.logsigmoid(log_odds)


def kto_z(mismatched_policy_logps: Tensor, mismatched_ref_logps: Tensor) -> Tensor:
    """KTO's reference point z = sg(clamp(mean(logpi_theta(y'|x) - logpi_ref(y'|x)), min=0)).

    Both [M]: log-probs of mismatched pairs (x_i, y_{i+1}) of the batch (`irtrain.dpo.kto`). -> 0-d, detached.
    """
    if mismatched_policy_logps.dim() != 1 or mismatched_ref_logps.shape != mismatched_policy_logps.shape:
        raise ValueError(f"kto_z: both inputs must be [M], got {tuple(mismatched_policy_logps.shape)} and {tuple(mismatched_ref_logps.shape)}")
    if mismatched_policy_logps.numel() == 0:
        raise ValueError("kto_z: no mismatched pairs (kto needs batch size > 1)")
    return (mismatched_policy_logps - mismatched_ref_logps).mean().clamp(min=0).detach()


def kto_loss(batch: PreferenceBatch, *, beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Tensor:
    """KTO (unpaired): desirable w_D (1 - sigma(beta (r - z))), undesirable w_U (1 - sigma(beta (z - r))),
    r = logpi_theta(y) - logpi_ref(y), z = `kto_z` of the batch's mismatched log-probs.
    [B, 1] with labels [B] -> [B]. B must be > 1.
    """
    _check_beta("kto", beta)
    _need_k("kto", batch, exactly=1)
    if batch.labels is None:
        raise ValueError("kto: needs labels [B] (True = desirable)")
    if batch.batch_size < 2:
        raise ValueError("kto: needs batch size > 1 (z comes from mismatched pairs within the batch)")
    if batch.mismatched_policy_logps is None or batch.mismatched_ref_logps is None:
        raise ValueError("kto: needs mismatched_policy_logps / mismatched_ref_logps for z")
    if desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError("kto: desirable_weight and undesirable_weight must be >= 0")
    z = kto_z(batch.mismatched_policy_logps, batch.mismatched_ref_logps)
    r = _logratios("kto", batch)[:, 0]
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (r - z)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (z - r)))
    return torch.where(batch.labels.bool(), desirable, undesirable)


def infonca_loss(batch: PreferenceBatch, *, beta: float, alpha: float = 1e-3) -> Tensor:
    """InfoNCA: -sum_k w_k log_softmax(m)_k, m_k = beta Delta_k, w = softmax(s / alpha). [B, K] with scores -> [B]."""
    _check_beta("infonca", beta)
    _need_k("infonca", batch, at_least=2)
    if not alpha > 0:
        raise ValueError(f"infonca: alpha must be > 0, got {alpha}")
    if batch.scores is None:
        raise ValueError("infonca: needs candidate scores (scores)")
    m = beta * _logratios("infonca", batch)
    w = torch.softmax(batch.scores.to(m.dtype) / alpha, dim=-1)
    return -(w * torch.log_softmax(m, dim=-1)).sum(-1)


def plackett_luce_loss(batch: PreferenceBatch, *, beta: float) -> Tensor:
    """Plackett-Luce over K responses ranked best first: -sum_{k<K} log softmax(m_{k..K})_1,
    m_k = beta Delta_k. [B, K] -> [B]. K = 2 is `sigmoid`."""
    _check_beta("plackett_luce", beta)
    _need_k("plackett_luce", batch, at_least=2)
    m = beta * _logratios("plackett_luce", batch)
    tail_lse = torch.logcumsumexp(m.flip(-1), dim=-1).flip(-1)  # [B, K]: logsumexp(m_k..m_K)
    return -(m - tail_lse)[:, :-1].sum(-1)


# Keyword parameters a preference loss may take, with the value that means "not used".
PREFERENCE_PARAM_DEFAULTS: dict[str, float] = {
    "label_smoothing": 0.0,
    "gamma": 0.5,
    "alpha": 1e-3,
    "desirable_weight": 1.0,
    "undesirable_weight": 1.0,
}


@dataclass(frozen=True)
class PreferenceLoss:
    """An entry of `PREFERENCE_LOSSES`.

    fn:            (batch: PreferenceBatch, *, beta, **params) -> per-example loss [B]
    needs_ref:     needs ref_logps (False: reference-free, `--reference-free` allowed)
    default_beta:  beta when the user gives none
    data_format:   shard kind: "preference" (K=2), "unpaired" (K=1 + labels), "ranked" (K>=2)
    params:        keyword params of fn besides beta (keys of PREFERENCE_PARAM_DEFAULTS)
    needs_lengths: reads batch.lengths
    needs_scores:  reads batch.scores
    summary:       one line for the CLI help

    Call it as `spec(batch, beta=None, **params)`: beta None -> default_beta; params the loss does
    not take are dropped when at their default, and a ValueError when set (e.g. label smoothing on hinge).
    """

    fn: Callable[..., Tensor]
    needs_ref: bool
    default_beta: float
    data_format: DataFormat
    params: tuple[str, ...] = ()
    needs_lengths: bool = False
    needs_scores: bool = False
    summary: str = ""

    def check_params(self, **params: float) -> dict[str, float]:
        """The params this loss takes, from a superset; ValueError on unknown or misapplied ones."""
        kept: dict[str, float] = {}
        for key, value in params.items():
            if key not in PREFERENCE_PARAM_DEFAULTS:
                raise ValueError(f"unknown preference-loss parameter {key!r}; known: {sorted(PREFERENCE_PARAM_DEFAULTS)}")
            if key in self.params:
                kept[key] = value
            elif value != PREFERENCE_PARAM_DEFAULTS[key]:
                raise ValueError(f"{key}={value} has no effect on this loss (it takes {list(self.params) or 'only beta'})")
        return kept

    def __call__(self, batch: PreferenceBatch, *, beta: float | None = None, **params: float) -> Tensor:
        return self.fn(batch, beta=self.default_beta if beta is None else beta, **self.check_params(**params))


PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "sigmoid": PreferenceLoss(sigmoid_loss, needs_ref=True, default_beta=0.1, data_format="preference", params=("label_smoothing",),
                              summary="DPO"),
    "robust": PreferenceLoss(robust_loss, needs_ref=True, default_beta=0.1, data_format="preference", params=("label_smoothing",),
                             summary="robust DPO (label noise)"),
    "hinge": PreferenceLoss(hinge_loss, needs_ref=True, default_beta=0.1, data_format="preference", summary="SLiC hinge"),
    "ipo": PreferenceLoss(ipo_loss, needs_ref=True, default_beta=0.1, data_format="preference", needs_lengths=True, summary="IPO"),
    "simpo": PreferenceLoss(simpo_loss, needs_ref=False, default_beta=2.0, data_format="preference", params=("gamma",), needs_lengths=True,
                            summary="SimPO, reference-free"),
    "orpo": PreferenceLoss(orpo_loss, needs_ref=False, default_beta=0.1, data_format="preference", needs_lengths=True,
                           summary="ORPO, reference-free"),
    "kto": PreferenceLoss(kto_loss, needs_ref=True, default_beta=0.1, data_format="unpaired", params=("desirable_weight", "undesirable_weight"),
                          summary="KTO, unpaired data"),
    "infonca": PreferenceLoss(infonca_loss, needs_ref=True, default_beta=0.1, data_format="ranked", params=("alpha",), needs_scores=True,
                              summary="InfoNCA, ranked data"),
    "plackett_luce": PreferenceLoss(plackett_luce_loss, needs_ref=True, default_beta=0.1, data_format="ranked",
                                    summary="Plackett-Luce, ranked data or pairs"),
}


def preference_metrics(batch: PreferenceBatch, beta: float) -> dict[str, Tensor]:
    """TRL-named metrics (FORMULAS.md "Preference losses"), each a detached 0-d tensor (batch mean).

    rewards/chosen = mean beta Delta_w, rewards/rejected = mean beta Delta_l,
    rewards/margins = mean beta (Delta_w - Delta_l), rewards/accuracies = mean(m > 0),
    logps/chosen, logps/rejected = mean logpi_theta(y_w), logpi_theta(y_l).
    Delta = logpi_theta - logpi_ref; without ref_logps, Delta = logpi_theta (reference-free reward).
    K=2: chosen = column 0, rejected = column 1. Ranked (K>2): chosen = best (column 0),
    rejected = worst (column K-1). Unpaired (K=1, labels): chosen/rejected = desirable/undesirable
    examples; a key is left out when its group is empty, and margins/accuracies are left out.
    """
    _check_beta("preference_metrics", beta)
    with torch.no_grad():
        logps = batch.policy_logps.detach()
        delta = logps if batch.ref_logps is None else logps - batch.ref_logps.detach()
        rewards = beta * delta
        if batch.num_responses == 1:
            if batch.labels is None:
                raise ValueError("preference_metrics: K=1 (unpaired) needs labels")
            out: dict[str, Tensor] = {}
            for group, mask in (("chosen", batch.labels.bool()), ("rejected", ~batch.labels.bool())):
                if bool(mask.any()):
                    out[f"rewards/{group}"] = rewards[mask, 0].mean()
                    out[f"logps/{group}"] = logps[mask, 0].mean()
            return out
        chosen, rejected = rewards[:, 0], rewards[:, -1]
        return {
            "rewards/chosen": chosen.mean(),
            "rewards/rejected": rejected.mean(),
            "rewards/margins": (chosen - rejected).mean(),
            "rewards/accuracies": (chosen > rejected).float().mean(),
            "logps/chosen": logps[:, 0].mean(),
            "logps/rejected": logps[:, -1].mean(),
        }
