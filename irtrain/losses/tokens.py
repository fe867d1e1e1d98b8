"""Per-token quantities every loss and metric is built from.

The one-token shift (logits at position i predict the token at i+1) happens in exactly
one place: `response_states` (used by `response_token_stats` and the chunked head). Every
loss and metric works on its flat outputs, which hold one entry per response token
(label != -100) in row order (FORMULAS.md "Notation").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from irtrain.lazy import lazy

if TYPE_CHECKING:
    import torch
    from torch import Tensor
else:
    torch = lazy("torch")

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
    if not isinstance(denom, torch.Tensor) and denom <= 0:
        raise ValueError(f"denom (response tokens in the step) must be > 0, got {denom}")
    return per_token.sum() / denom


# ---------------------------------------------------------------------------------------------
# Small metrics


def entropy(logits: Tensor) -> Tensor:
    """Entropy of the policy at each state, -sum_a pi(a|s) log pi(a|s), in nats. [N, V] -> [N]."""
    if logits.dim() != 2:
        raise ValueError(f"entropy: logits must be [N, V], got {tuple(logits.shape)}")
    logp = torch.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)
