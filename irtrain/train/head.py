"""The LM head at the response states only, a chunk of rows at a time.

A language model's last matmul, hidden [N, H] x W^T [H, V], is where training memory
goes for real vocabularies: at V = 128K one float32 row of logits is 0.5 MB, so a
micro-batch of 16K tokens holds 8 GB of logits, and autograd keeps them (and the
log-softmax around them) until the backward. `lm_head_stats` never holds more than
`chunk_rows` rows of logits: the forward keeps only what the losses read per state
(log p(a_t), V(s_t), the two logsumexps) and the backward recomputes each chunk's logits
and writes its gradient in place, using

    d log p_t / d l  = onehot(a_t) - softmax(l)
    d V(s_t) / d l   = softmax(l / tau)                 (V = tau * logsumexp(l / tau))

so memory is O(N + chunk_rows * V) instead of O(T * V), and only positions that carry a
loss pay for the head (prompts, padding and document ends do not). The values are those
of `irtrain.losses.state_token_stats` on the full logits (tests compare them, and check
the gradient with `torch.autograd.gradcheck`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

#: Float32 logits held at once: rows per chunk = this / (4 V) bytes (130 rows at V = 128K).
CHUNK_BYTES = 1 << 26


def chunk_rows_for(vocab: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    return max(1, chunk_bytes // (4 * max(1, vocab)))


def _logits_into(buf: Tensor, h: Tensor, weight: Tensor, bias: Tensor | None, compute_dtype: torch.dtype) -> Tensor:
    """buf[:C] = h W^T + b in `buf`'s dtype, computed in `compute_dtype`; one [chunk, V]
    buffer serves every chunk (no allocation per chunk: on CPU each fresh buffer of this
    size is new pages from the kernel)."""
    z = buf[: h.shape[0]]
    if compute_dtype == buf.dtype and h.dtype == buf.dtype and weight.dtype == buf.dtype:
        torch.mm(h, weight.t(), out=z)
        if bias is not None:
            z.add_(bias)
    else:
        z.copy_(F.linear(h.to(compute_dtype), weight.to(compute_dtype), None if bias is None else bias.to(compute_dtype)))
    return z


class _LMHeadStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, tau: float, chunk: int,
                extras: bool) -> tuple[Tensor | None, ...]:
        dev = h.device.type
        # Under autocast the head runs in the autocast dtype (as `nn.Linear` would); the
        # backward, which runs outside autocast, uses the same dtype explicitly.
        cd = ctx.compute_dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        # statistics in float32 (float64 when the head is float64, e.g. for gradcheck)
        acc = ctx.acc_dtype = torch.promote_types(cd, torch.float32)
        n, vocab = h.shape[0], weight.shape[0]
        logps, lse = torch.empty(n, dtype=acc, device=h.device), torch.empty(n, dtype=acc, device=h.device)
        lse_tau = torch.empty(n, dtype=acc, device=h.device)
        correct = torch.zeros(n, dtype=torch.bool, device=h.device) if extras else None
        ents = torch.empty(n, dtype=acc, device=h.device) if extras else None
        buf = torch.empty(min(n, chunk), vocab, dtype=acc, device=h.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            z = _logits_into(buf, h[a:b], weight, bias, cd)  # [C, V] logits
            t = targets[a:b, None]
            target_logit = z.gather(1, t).squeeze(1)
            if correct is not None:
                correct[a:b] = z.argmax(-1) == targets[a:b]
            if tau != 1.0:
                lse_tau[a:b] = torch.logsumexp(z / tau, dim=-1)
            m = z.amax(-1, keepdim=True)
            e = z.sub_(m).exp_()  # in place: exp(l - max l)
            total = e.sum(-1)
            lse[a:b] = m.squeeze(1) + total.log()
            logps[a:b] = target_logit - lse[a:b]
            if ents is not None:
                # H = -sum p log p with p = e / total: log(total) - sum(e log e) / total
                ents[a:b] = total.log() - torch.special.xlogy(e, e).sum(-1) / total
        del buf
        if tau == 1.0:
            lse_tau = lse
        ctx.save_for_backward(h, weight, bias, targets, lse, lse_tau)
        ctx.tau, ctx.chunk = tau, chunk
        values = lse.clone() if tau == 1.0 else tau * lse_tau  # a fresh tensor: lse is saved
        if extras:
            ctx.mark_non_differentiable(correct, ents)
            return logps, values, correct, ents
        return logps, values

    @staticmethod
    def backward(ctx: Any, g_logps: Tensor | None, g_values: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        h, weight, bias, targets, lse, lse_tau = ctx.saved_tensors
        tau, chunk, cd, acc = ctx.tau, ctx.chunk, ctx.compute_dtype, ctx.acc_dtype
        n = h.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        zeros = torch.zeros(n, dtype=acc, device=h.device)
        g_lp = zeros if g_logps is None else g_logps.to(acc)
        g_v = zeros if g_values is None else g_values.to(acc)
        w = weight.to(cd)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None
        buf = torch.empty(min(n, chunk), weight.shape[0], dtype=acc, device=h.device)
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            hc = h[a:b].to(cd)
            z = _logits_into(buf, hc, w, bias, cd)
            # dL/dl = g_v * softmax(l / tau) - g_lp * softmax(l) + g_lp * onehot(a_t), in place
            if tau == 1.0:
                gz = z.sub_(lse[a:b, None]).exp_().mul_((g_v[a:b] - g_lp[a:b])[:, None])
            else:
                q = (z / tau).sub_(lse_tau[a:b, None]).exp_().mul_(g_v[a:b, None])
                gz = z.sub_(lse[a:b, None]).exp_().mul_(-g_lp[a:b, None]).add_(q)
                del q
            gz.scatter_add_(1, targets[a:b, None], g_lp[a:b, None])
            gzc = gz.to(cd)
            if grad_h is not None:
                grad_h[a:b] = gzc @ w
            if grad_w is not None:
                if cd == acc:
                    grad_w.addmm_(gzc.t(), hc)
                else:
                    grad_w.add_(gzc.t() @ hc)
            if grad_b is not None:
                grad_b.add_(gz.sum(0))
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None)


def lm_head_stats(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *, tau: float = 1.0,
                  extras: bool = False, chunk_rows: int | None = None) -> tuple[Tensor, ...]:
    """Per state, from the hidden states at the states (the head's input).

    h [N, H], weight [V, H], bias [V] or None, targets [N] long ->
    logps [N] f32 = log_softmax(l)[a_t], values [N] f32 = tau * logsumexp(l / tau),
    and with `extras` also correct [N] bool (argmax l == a_t) and entropies [N] f32 (no
    gradient), where l = h W^T + b. Differentiable in h, weight and bias.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"lm_head_stats: h [N, H], weight [V, H], targets [N] expected, got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if tau <= 0:
        raise ValueError(f"lm_head_stats: tau must be > 0, got {tau}")
    chunk = chunk_rows or chunk_rows_for(weight.shape[0])
    return _LMHeadStats.apply(h, weight, bias, targets.long(), float(tau), int(chunk), bool(extras))
