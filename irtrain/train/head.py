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

On a GPU the same code runs in the compute dtype (bf16 under autocast or with bf16
weights): the weight is cast once per pass, not per chunk; every [chunk, V] and [V, H]
buffer is allocated once and reused (`_Workspace`); the weight gradient is accumulated
in place (`addmm_`) in the parameter's dtype when the weights are bf16, in float32
otherwise; the statistics are always float32.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: CPU budget: float32 logits held at once, rows per chunk = this / (4 V) bytes (130 rows at V = 128K).
CHUNK_BYTES = 1 << 26
#: CUDA budget: this share of the memory free at the call, between CHUNK_BYTES and CUDA_CHUNK_BYTES.
CUDA_FREE_SHARE = 0.25
CUDA_CHUNK_BYTES = 1 << 30


def chunk_rows_for(vocab: int, hidden: int = 0, *, device: torch.device | None = None, compute_bytes: int = 4,
                   acc_bytes: int = 4) -> int:
    """Rows per chunk, from what one row of a chunk holds and the memory there is for it.

    A row costs V * acc_bytes (its float32 logits), V * compute_bytes more when the head
    computes in another dtype (the logits' copy in that dtype), and 2 H * compute_bytes (its
    hidden state and their gradient). The budget is CHUNK_BYTES on a CPU; on CUDA a quarter
    of the free memory (`torch.cuda.mem_get_info` plus what the caching allocator holds
    unused) once the [V, H] buffers of the backward are set aside, clamped to
    [CHUNK_BYTES, CUDA_CHUNK_BYTES]: big chunks keep the [C, H] x [H, V] matmuls
    compute-bound (1024 rows at V = 128K, H = 4096 in bf16), and the budget keeps them from
    taking memory the activations need. CUDA rows are a power of two, so that the chunking
    (and with it the order of the bf16 roundings of the weight gradient) does not change
    from step to step with small changes of free memory.
    """
    vocab, hidden = max(1, vocab), max(0, hidden)
    row = vocab * acc_bytes + (vocab * compute_bytes if compute_bytes != acc_bytes else 0) + 2 * hidden * compute_bytes
    if device is None or device.type != "cuda":
        return max(1, CHUNK_BYTES // row)
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    fixed = vocab * hidden * (2 * compute_bytes + acc_bytes)  # cast weight, gradient scratch and accumulator
    rows = max(1, int(min(CUDA_CHUNK_BYTES, max(CHUNK_BYTES, (free - fixed) * CUDA_FREE_SHARE))) // row)
    return 1 << (rows.bit_length() - 1)


def _grad_dtype(weight: Tensor, acc: torch.dtype) -> torch.dtype:
    """The weight gradient's accumulator: the parameter's own dtype when it is 16-bit (a
    float32 [V, H] buffer would double the head's gradient memory), else float32/64."""
    return weight.dtype if weight.dtype in (torch.bfloat16, torch.float16) else acc


class _Workspace:
    """The per-chunk buffers, allocated once per pass: `z` [C, V] float32 logits, `zc` their
    copy in the compute dtype (only when that is not float32), `aux` [C, V] float32 (only
    for tau != 1: l / tau)."""

    def __init__(self, rows: int, vocab: int, acc: torch.dtype, cd: torch.dtype, device: torch.device, tau: float):
        self.z = torch.empty(rows, vocab, dtype=acc, device=device)
        self.zc = torch.empty(rows, vocab, dtype=cd, device=device) if cd != acc else None
        self.aux = torch.empty(rows, vocab, dtype=acc, device=device) if tau != 1.0 else None

    def logits(self, h: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
        """z[:C] = h w^T + b, computed in w's dtype (h, w, b already in it), into the buffers."""
        c = h.shape[0]
        z = self.z[:c]
        out = z if self.zc is None else self.zc[:c]
        if b is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(b, h, w.t(), out=out)
        if self.zc is not None:
            z.copy_(out)
        return z

    def in_compute_dtype(self, g: Tensor) -> Tensor:
        """g [C, V] float32 in the compute dtype (its copy in `zc`, or g itself)."""
        if self.zc is None:
            return g
        zc = self.zc[: g.shape[0]]
        zc.copy_(g)
        return zc


def _cast(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x.to(dtype)


class _LMHeadStats(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, tau: float, chunk: int,
                extras: bool, cd: torch.dtype) -> tuple[Tensor | None, ...]:
        # statistics in float32 (float64 when the head is float64, e.g. for gradcheck)
        acc = torch.promote_types(cd, torch.float32)
        n, vocab = h.shape[0], weight.shape[0]
        with torch.autocast(h.device.type, enabled=False):  # the dtypes are explicit below
            hc, w, b = h.to(cd), weight.to(cd), _cast(bias, cd)  # once, not per chunk
            logps, lse, lse_tau = (torch.empty(n, dtype=acc, device=h.device) for _ in range(3))
            correct = torch.zeros(n, dtype=torch.bool, device=h.device) if extras else None
            ents = torch.empty(n, dtype=acc, device=h.device) if extras else None
            ws = _Workspace(min(n, chunk), vocab, acc, cd, h.device, tau)
            for a in range(0, n, chunk):
                sl = slice(a, min(n, a + chunk))
                z = ws.logits(hc[sl], w, b)  # [C, V] logits
                target_logit = z.gather(1, targets[sl, None]).squeeze(1)
                if correct is not None:
                    correct[sl] = z.argmax(-1) == targets[sl]
                m = z.amax(-1, keepdim=True)
                z.sub_(m)  # l - max l
                if ws.aux is not None:  # logsumexp(l / tau) = max l / tau + log sum exp((l - max l) / tau)
                    lse_tau[sl] = m.squeeze(1) / tau + torch.div(z, tau, out=ws.aux[: z.shape[0]]).exp_().sum(-1).log()
                e = z.exp_()  # in place: exp(l - max l)
                total = e.sum(-1)
                lse[sl] = m.squeeze(1) + total.log()
                logps[sl] = target_logit - lse[sl]
                if ents is not None:
                    # H = -sum p log p with p = e / total: log(total) - sum(e log e) / total
                    ents[sl] = total.log() - torch.special.xlogy(e, e).sum(-1) / total
            del ws, hc, w, b
        if tau == 1.0:
            lse_tau = lse
        # the weight itself is saved, not its cast copy: under ZeRO-3 the parameter is
        # released after the forward and gathered again for the backward
        ctx.save_for_backward(h, weight, bias, targets, lse, lse_tau)
        ctx.tau, ctx.chunk, ctx.compute_dtype, ctx.acc_dtype = tau, chunk, cd, acc
        values = lse.clone() if tau == 1.0 else tau * lse_tau  # a fresh tensor: lse is saved
        if extras:
            ctx.mark_non_differentiable(correct, ents)
            return logps, values, correct, ents
        return logps, values

    @staticmethod
    def backward(ctx: Any, g_logps: Tensor | None, g_values: Tensor | None, *_: Any) -> tuple[Tensor | None, ...]:
        h, weight, bias, targets, lse, lse_tau = ctx.saved_tensors
        tau, chunk, cd, acc = ctx.tau, ctx.chunk, ctx.compute_dtype, ctx.acc_dtype
        n, vocab = h.shape[0], weight.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(h.device.type, enabled=False):
            zeros = torch.zeros(n, dtype=acc, device=h.device)
            g_lp = zeros if g_logps is None else g_logps.to(acc)
            g_v = zeros if g_values is None else g_values.to(acc)
            hc, w, b = h.to(cd), weight.to(cd), _cast(bias, cd)
            grad_h = torch.empty_like(h) if need_h else None
            gdt = _grad_dtype(weight, acc)
            grad_w = torch.zeros(weight.shape, dtype=gdt, device=weight.device) if need_w else None
            # a float32 accumulator of a bf16 product: one [V, H] scratch for all chunks
            scratch = torch.empty(weight.shape, dtype=cd, device=weight.device) if need_w and gdt != cd else None
            grad_b = torch.zeros(vocab, dtype=acc, device=weight.device) if need_b else None
            ws = _Workspace(min(n, chunk), vocab, acc, cd, h.device, tau)
            for a in range(0, n, chunk):
                sl = slice(a, min(n, a + chunk))
                z = ws.logits(hc[sl], w, b)
                # dL/dl = g_v * softmax(l / tau) - g_lp * softmax(l) + g_lp * onehot(a_t), in place
                if ws.aux is None:
                    gz = z.sub_(lse[sl, None]).exp_().mul_((g_v[sl] - g_lp[sl])[:, None])
                else:
                    q = torch.div(z, tau, out=ws.aux[: z.shape[0]]).sub_(lse_tau[sl, None]).exp_().mul_(g_v[sl, None])
                    gz = z.sub_(lse[sl, None]).exp_().mul_(-g_lp[sl, None]).add_(q)
                gz.scatter_add_(1, targets[sl, None], g_lp[sl, None])
                if grad_b is not None:
                    grad_b.add_(gz.sum(0))
                gzc = ws.in_compute_dtype(gz)
                if grad_h is not None:
                    _mm_into(grad_h[sl], gzc, w)
                if grad_w is not None:
                    _addmm_into(grad_w, gzc.t(), hc[sl], scratch)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None)


def _mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b, written in place (a [C, H] copy when out's dtype is not the product's)."""
    if out.dtype == a.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a @ b)


def _addmm_into(acc: Tensor, a: Tensor, b: Tensor, scratch: Tensor | None) -> None:
    """acc += a @ b with no allocation: `addmm_` when acc has the product's dtype, else the
    product into `scratch` (one [V, H] buffer for all chunks) and an in-place add."""
    if scratch is None:
        acc.addmm_(a, b)
    else:
        torch.mm(a, b, out=scratch)
        acc.add_(scratch)


def compute_dtype(device_type: str, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the head's matmuls run in: the autocast dtype under autocast (as `nn.Linear`
    would), else the weight's; the backward, outside autocast, uses the same one."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight_dtype


def lm_head_stats(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, *, tau: float = 1.0,
                  extras: bool = False, chunk_rows: int | None = None) -> tuple[Tensor, ...]:
    """Per state, from the hidden states at the states (the head's input).

    h [N, H], weight [V, H], bias [V] or None, targets [N] long ->
    logps [N] f32 = log_softmax(l)[a_t], values [N] f32 = tau * logsumexp(l / tau),
    and with `extras` also correct [N] bool (argmax l == a_t) and entropies [N] f32 (no
    gradient), where l = h W^T + b. Differentiable in h, weight and bias. `chunk_rows`
    defaults to `chunk_rows_for` the vocabulary, hidden size, dtype and device.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1] or targets.shape != h.shape[:1]:
        raise ValueError(f"lm_head_stats: h [N, H], weight [V, H], targets [N] expected, got {tuple(h.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(targets.shape)}")
    if tau <= 0:
        raise ValueError(f"lm_head_stats: tau must be > 0, got {tau}")
    cd = compute_dtype(h.device.type, weight.dtype)
    acc = torch.promote_types(cd, torch.float32)
    chunk = chunk_rows or chunk_rows_for(weight.shape[0], weight.shape[1], device=h.device, compute_bytes=cd.itemsize,
                                         acc_bytes=acc.itemsize)
    return _LMHeadStats.apply(h, weight, bias, targets.long(), float(tau), int(chunk), bool(extras), cd)
