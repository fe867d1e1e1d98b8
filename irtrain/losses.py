"""Losses and the per-token quantities they are built from (FORMULAS.md).

The one-token shift (logits at position i predict the token at i+1) happens in
exactly one place: `response_token_stats`. Every loss and metric works on its
flat outputs, which hold one entry per response token (label != -100) in row
order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

IGNORE_INDEX = -100


@dataclass
class TokenStats:
    """Per response token t (flat, N = number of response tokens in the batch).

    logps:   [N] log p_t = log_softmax(l(s_t))[a_t]
    values:  [N] V(s_t) = tau * logsumexp(l(s_t) / tau)
    is_last: [N] bool, True when no response token follows a_t in the same turn
             (so that dV_t = 0 there, FORMULAS.md)
    index:   [N] flat index b*T + i of the state position i (whose logits predict a_t)
    logits:  [N, V] float32 logits at the states, kept when asked (full KL, entropy)
    """

    logps: Tensor
    values: Tensor
    is_last: Tensor
    index: Tensor
    logits: Tensor | None = None


def response_token_stats(logits: Tensor, labels: Tensor, *, tau: float = 1.0, keep_logits: bool = False) -> TokenStats:
    """The shift and the mask, once.

    logits: [B, T, V] (any float dtype; computed in float32)
    labels: [B, T] with -100 on non-response tokens, aligned to input_ids (not shifted)
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits [B,T,V] and labels [B,T] expected, got {tuple(logits.shape)} and {tuple(labels.shape)}")
    B, T, V = logits.shape
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX  # [B, T-1] states i whose next token is trained
    state_logits = logits[:, :-1][mask].float()  # [N, V]
    tokens = target[mask].long()
    lse = torch.logsumexp(state_logits, dim=-1)
    logps = state_logits.gather(-1, tokens[:, None]).squeeze(-1) - lse
    values = lse if tau == 1.0 else tau * torch.logsumexp(state_logits / tau, dim=-1)
    next_mask = torch.zeros_like(mask)
    next_mask[:, :-1] = mask[:, 1:]
    is_last = ~next_mask[mask]
    pos = torch.arange(T - 1, device=labels.device).expand(B, T - 1)
    rows = torch.arange(B, device=labels.device)[:, None].expand(B, T - 1)
    index = (rows * T + pos)[mask]
    return TokenStats(logps=logps, values=values, is_last=is_last, index=index, logits=state_logits if keep_logits else None)


def delta_values(values: Tensor, is_last: Tensor) -> Tensor:
    """dV_t = V(s_t) - V(s_{t+1}), and 0 at the last response token of a turn. [N] -> [N]."""
    if values.shape != is_last.shape:
        raise ValueError(f"values {tuple(values.shape)} and is_last {tuple(is_last.shape)} differ")
    if values.numel() == 0:
        return values
    nxt = torch.roll(values, -1)
    return torch.where(is_last, torch.zeros_like(values), values - nxt)
