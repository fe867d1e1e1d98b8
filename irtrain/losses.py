"""Losses and the per-token quantities they are built from (FORMULAS.md).

The one-token shift (logits at position i predict the token at i+1) happens in
exactly one place: `response_states` (used by `response_token_stats`). Every loss and metric works on its
flat outputs, which hold one entry per response token (label != -100) in row
order.

Variants are entries in tables, each a pure function of tensors:

- `SFT_LOSSES`: per-token SFT losses `fn(logps, ref_logps, delta_v) -> [N]`
  (FORMULAS.md "SFT losses"), reduced by the caller with `reduce_tokens`.
- `KL_ESTIMATORS`: per-token KL-to-reference terms (FORMULAS.md "KL to the reference").
- `PREFERENCE_LOSSES`: per-example preference losses `fn(PreferenceBatch, beta=..., ...) -> [B]`
  (FORMULAS.md "Preference losses").
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from irtrain.shards import IGNORE_INDEX


@dataclass
class TokenStats:
    """Per response token t (flat, N = number of response tokens in the batch).

    logps:     [N] log p_t = log_softmax(l(s_t))[a_t]
    values:    [N] V(s_t) = tau * logsumexp(l(s_t) / tau)
    is_last:   [N] bool, True when no response token follows a_t in the same turn
               (so that dV_t = 0 there, FORMULAS.md)
    index:     [N] flat index b*T + i of the state position i (whose logits predict a_t)
    logits:    [N, V] float32 logits at the states, kept when asked (full KL)
    targets:   [N] long, the tokens a_t
    correct:   [N] bool, argmax of l(s_t) == a_t, when asked (the `token_accuracy` metric)
    entropies: [N] float32 entropy of pi(.|s_t) in nats, when asked (the `entropy` metric)
    """

    logps: Tensor
    values: Tensor
    is_last: Tensor
    index: Tensor
    logits: Tensor | None = None
    targets: Tensor | None = None
    correct: Tensor | None = None
    entropies: Tensor | None = None


@dataclass
class ResponseStates:
    """Where the response tokens of a [B, T] batch are predicted (the shift and the mask).

    index:   [N] flat index b*T + i of each state position i whose logits predict a_t
    targets: [N] long, the tokens a_t = labels[b, i + 1]
    is_last: [N] bool, True when no response token follows a_t in the same turn
    """

    index: Tensor
    targets: Tensor
    is_last: Tensor


def response_states(labels: Tensor) -> ResponseStates:
    """The shift and the mask, once: labels [B, T] (-100 on non-response tokens, aligned
    to input_ids, not shifted) -> the N states that predict a response token."""
    if labels.dim() != 2:
        raise ValueError(f"labels [B,T] expected, got {tuple(labels.shape)}")
    B, T = labels.shape
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX  # [B, T-1] states i whose next token is trained
    next_mask = torch.zeros_like(mask)
    next_mask[:, :-1] = mask[:, 1:]
    pos = torch.arange(T - 1, device=labels.device).expand(B, T - 1)
    rows = torch.arange(B, device=labels.device)[:, None].expand(B, T - 1)
    return ResponseStates(index=(rows * T + pos)[mask], targets=target[mask].long(), is_last=~next_mask[mask])


def state_token_stats(state_logits: Tensor, states: ResponseStates, *, tau: float = 1.0, keep_logits: bool = False,
                      extras: bool = False) -> TokenStats:
    """TokenStats from the logits at the states only: state_logits [N, V] (any float dtype;
    computed in float32), row k the state `states.index[k]`."""
    if state_logits.dim() != 2 or state_logits.shape[0] != states.targets.shape[0]:
        raise ValueError(f"state_logits [N, V] with N = {states.targets.shape[0]} expected, got {tuple(state_logits.shape)}")
    z = state_logits.float()
    lse = torch.logsumexp(z, dim=-1)
    logps = z.gather(-1, states.targets[:, None]).squeeze(-1) - lse
    values = lse if tau == 1.0 else tau * torch.logsumexp(z / tau, dim=-1)
    correct = ents = None
    if extras:
        with torch.no_grad():
            correct = z.argmax(-1) == states.targets
            ents = entropy(z)
    return TokenStats(logps=logps, values=values, is_last=states.is_last, index=states.index,
                      logits=z if keep_logits else None, targets=states.targets, correct=correct, entropies=ents)


def response_token_stats(logits: Tensor, labels: Tensor, *, tau: float = 1.0, keep_logits: bool = False,
                         extras: bool = False) -> TokenStats:
    """TokenStats of full logits: logits [B, T, V] (any float dtype; computed in float32),
    labels [B, T] with -100 on non-response tokens, aligned to input_ids (not shifted).

    Training computes the LM head at the states only (`irtrain.train.packed.packed_token_stats`);
    both go through `response_states`.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits [B,T,V] and labels [B,T] expected, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    states = response_states(labels)
    return state_token_stats(logits.flatten(0, 1)[states.index], states, tau=tau, keep_logits=keep_logits, extras=extras)


def delta_values(values: Tensor, is_last: Tensor) -> Tensor:
    """dV_t = V(s_t) - V(s_{t+1}), and 0 at the last response token of a turn. [N] -> [N]."""
    if values.shape != is_last.shape:
        raise ValueError(f"values {tuple(values.shape)} and is_last {tuple(is_last.shape)} differ")
    if values.numel() == 0:
        return values
    nxt = torch.roll(values, -1)
    return torch.where(is_last, torch.zeros_like(values), values - nxt)


def first_token_mask(is_last: Tensor) -> Tensor:
    """[N] bool -> [N] bool: True at the first response token of each turn.

    Its state is s_0 (the last prompt position), so `values[first_token_mask(is_last)]`
    are the V(s_0) behind the `value/s0` metric (FORMULAS.md "Implicit-reward metrics").
    """
    if is_last.dim() != 1:
        raise ValueError(f"is_last must be [N], got {tuple(is_last.shape)}")
    first = torch.roll(is_last, 1)
    if first.numel():
        first[0] = True
    return first


def segment_sums(per_token: Tensor, segment_ids: Tensor, num_segments: int) -> Tensor:
    """Sum per-token quantities within segments (e.g. sequence log-probs from a packed batch).

    per_token:   [N] float (differentiable)
    segment_ids: [N] long in [0, num_segments), e.g. `doc_of_position.flatten()[stats.index]`
    returns      [num_segments]; `segment_sums(ones, ids, S)` gives the lengths |y|.
    """
    if per_token.dim() != 1 or per_token.shape != segment_ids.shape:
        raise ValueError(f"per_token and segment_ids must both be [N], got {tuple(per_token.shape)} and {tuple(segment_ids.shape)}")
    if num_segments < 0:
        raise ValueError(f"num_segments must be >= 0, got {num_segments}")
    out = per_token.new_zeros(num_segments)
    return out.index_add(0, segment_ids.long(), per_token)


def reduce_tokens(per_token: Tensor, denom: int | float | Tensor) -> Tensor:
    """FORMULAS.md "Reduction": sum of per-token losses / number of response tokens in the
    whole optimizer step (all micro-batches, all ranks). [N] -> 0-d.

    Summing `reduce_tokens(loss_mb, denom)` over the micro-batches of a step gives the same
    value (and gradient) for any split of the step, since `denom` is the step-wide count.
    """
    if not isinstance(denom, Tensor) and denom <= 0:
        raise ValueError(f"denom (response tokens in the step) must be > 0, got {denom}")
    return per_token.sum() / denom


# ---------------------------------------------------------------------------------------------
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
    _check_tokens("pearson", logps, ref_logps, delta_v, needs_ref=True, needs_values=True)
    return -logps.exp() + (ref_logps + delta_v).exp()


def hellinger(logps: Tensor, ref_logps: Tensor | None, delta_v: Tensor | None) -> Tensor:
    """Squared Hellinger: exp(1/2 (log q_t + dV_t)) - exp(1/2 log p_t). [N] -> [N].

    Gradient with dV detached: -1/2 sqrt(p_t) grad log p_t.
    """
    _check_tokens("hellinger", logps, ref_logps, delta_v, needs_ref=True, needs_values=True)
    return (0.5 * (ref_logps + delta_v)).exp() - (0.5 * logps).exp()


def js(logps: Tensor, ref_logps: Tensor | None, delta_v: Tensor | None) -> Tensor:
    """Jensen-Shannon: softplus(log q_t + dV_t) - softplus(log p_t). [N] -> [N].

    Gradient with dV detached: -p_t/(1+p_t) grad log p_t.
    """
    _check_tokens("js", logps, ref_logps, delta_v, needs_ref=True, needs_values=True)
    return F.softplus(ref_logps + delta_v) - F.softplus(logps)


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


# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Small metrics


def entropy(logits: Tensor) -> Tensor:
    """Entropy of the policy at each state, -sum_a pi(a|s) log pi(a|s), in nats. [N, V] -> [N]."""
    if logits.dim() != 2:
        raise ValueError(f"entropy: logits must be [N, V], got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ---------------------------------------------------------------------------------------------
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
        if mp is not None and (mp.dim() != 1 or mr.shape != mp.shape):
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

        return cls(
            policy_logps=stack(chosen_logps, rejected_logps, "logps"),
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
    if batch.mismatched_policy_logps is None:
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
