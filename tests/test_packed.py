"""Packed attention (`irtrain.train.packed`): which implementation a device gets, which
kernel `irtrain_varlen` picks on a GPU (`varlen_kernel_for`, for every installed torch's
`varlen_attn` signature), and the `varlen_attn` call's plumbing (layouts, causal flag,
scale, grouped-query heads) checked on CPU against per-document SDPA through a stand-in
kernel with `varlen_attn`'s contract. The tests marked `cuda` run the real kernel; they are
skipped without a GPU."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

import irtrain.train.packed as packed
from irtrain.train.batching import Batch
from irtrain.train.packed import (
    PER_DOCUMENT,
    TORCH_VARLEN,
    VARLEN,
    VarlenKernel,
    default_attn_implementation,
    describe_varlen,
    per_document_sdpa,
    torch_varlen_attention,
    varlen_kernel_for,
)

from test_train_common import one_torch_thread  # noqa: F401

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_default_attn_implementation(monkeypatch):
    """CPU: per-document SDPA (irtrain_varlen); a GPU: flash-attn's varlen kernel when it is
    installed, else irtrain_varlen (PyTorch's varlen kernel), never the N^2 mask of `sdpa`."""
    assert default_attn_implementation(torch.device("cpu")) == VARLEN
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    assert default_attn_implementation(torch.device("cuda", 0)) == VARLEN
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    assert default_attn_implementation(torch.device("cuda", 0)) == "flash_attention_2"
    assert default_attn_implementation(torch.device("cpu")) == VARLEN


# the public signatures of torch.nn.attention.varlen.varlen_attn over releases
def _v2_9(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False, return_aux=None): ...


def _v2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)): ...


def _v2_12(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1),
           enable_gqa=False, seqused_k=None, block_table=None, num_splits=None): ...


def _unknown(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k): ...


def test_describe_varlen_signatures():
    assert describe_varlen(_v2_9) == VarlenKernel(_v2_9, {"is_causal": True}, scale=False, gqa=False)
    assert describe_varlen(_v2_10) == VarlenKernel(_v2_10, {"window_size": (-1, 0)}, scale=True, gqa=False)
    assert describe_varlen(_v2_12) == VarlenKernel(_v2_12, {"window_size": (-1, 0)}, scale=True, gqa=True)
    assert describe_varlen(_unknown) is None  # no way to ask for causal attention: never used
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return
    installed = describe_varlen(varlen_attn)  # the installed torch's, whatever its version
    assert installed is not None and installed.causal in ({"is_causal": True}, {"window_size": (-1, 0)})


def test_varlen_kernel_selection():
    """varlen_attn only where it is exact and runs: CUDA, 16-bit, no dropout, flash head dims,
    whole kv groups, a scale it can take; per-document SDPA otherwise."""
    k12, k9 = describe_varlen(_v2_12), describe_varlen(_v2_9)
    bf16, d = torch.bfloat16, 64
    base = dict(device_type="cuda", dtype=bf16, head_dims=(d, d), heads=(8, 2), dropout=0.0, scaling=d ** -0.5, kernel=k12)

    def pick(**change):
        return varlen_kernel_for(**{**base, **change})

    assert pick() == TORCH_VARLEN
    assert pick(dtype=torch.float16) == TORCH_VARLEN
    assert pick(heads=(8, 8)) == TORCH_VARLEN and pick(heads=(8, 1)) == TORCH_VARLEN
    assert pick(scaling=None) == TORCH_VARLEN and pick(scaling=0.1) == TORCH_VARLEN  # 2.10+ takes any scale
    assert pick(head_dims=(256, 256)) == TORCH_VARLEN
    assert pick(device_type="cpu") == PER_DOCUMENT  # the CPU never changes
    assert pick(kernel=None) == PER_DOCUMENT  # torch without varlen_attn, ROCm, pre-Ampere
    assert pick(dtype=torch.float32) == PER_DOCUMENT  # float32 weights without autocast
    assert pick(dropout=0.1) == PER_DOCUMENT  # varlen_attn has no dropout
    assert pick(head_dims=(64, 32)) == PER_DOCUMENT and pick(head_dims=(60, 60)) == PER_DOCUMENT
    assert pick(head_dims=(320, 320)) == PER_DOCUMENT
    assert pick(heads=(8, 3)) == PER_DOCUMENT
    # torch 2.9: no scale argument, so only its default 1/sqrt(D)
    assert pick(kernel=k9) == TORCH_VARLEN and pick(kernel=k9, scaling=None) == TORCH_VARLEN
    assert pick(kernel=k9, scaling=0.1) == PER_DOCUMENT


def _stand_in(gqa_ok: bool, causal_key: str):
    """A CPU kernel with varlen_attn's contract ([T, H, D] tensors, cumulative offsets, the
    causal flag, kv heads equal to query heads unless enable_gqa), by per-document SDPA in
    float64; it records how it was called."""
    calls = []

    def kernel(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), is_causal=False, enable_gqa=False):
        calls.append({"window_size": window_size, "is_causal": is_causal, "enable_gqa": enable_gqa, "scale": scale,
                      "same_cu": cu_q is cu_k, "max": (max_q, max_k), "kv_heads": k.shape[1], "contiguous": q.is_contiguous()})
        assert (window_size == (-1, 0)) if causal_key == "window_size" else is_causal
        assert q.dim() == 3 and cu_q.dtype == torch.int32
        if k.shape[1] != q.shape[1]:
            assert gqa_ok and enable_gqa
            k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
        bounds = cu_q.tolist()
        outs = [F.scaled_dot_product_attention(*(x[a:b].transpose(0, 1) for x in (q, k, v)), is_causal=True, scale=scale)
                for a, b in zip(bounds[:-1], bounds[1:])]
        return torch.cat([o.transpose(0, 1) for o in outs])

    return kernel, calls


@pytest.mark.parametrize("version", ["2.9", "2.10", "2.12"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_torch_varlen_call_equals_per_document_sdpa(version, kv_heads):
    """The `varlen_attn` call (layouts [1, H, N, D] -> [N, H, D] -> [1, N, H, D], the causal
    flag of each release, the scale, enable_gqa or repeated kv heads) gives per-document
    SDPA's output on a packed sequence of 3 documents."""
    causal_key = "is_causal" if version == "2.9" else "window_size"
    fn, calls = _stand_in(gqa_ok=version == "2.12", causal_key=causal_key)
    kernel = VarlenKernel(fn, {"is_causal": True} if version == "2.9" else {"window_size": (-1, 0)}, scale=version != "2.9",
                          gqa=version == "2.12")
    g = torch.Generator().manual_seed(0)
    n, h, d = 17, 4, 8
    # the model's layout: projections viewed as [1, N, H, D], then transposed to [1, H, N, D]
    q = torch.randn(1, n, h, d, dtype=torch.float64, generator=g).transpose(1, 2)
    k = torch.randn(1, n, kv_heads, d, dtype=torch.float64, generator=g).transpose(1, 2)
    v = torch.randn(1, n, kv_heads, d, dtype=torch.float64, generator=g).transpose(1, 2)
    cu = torch.tensor([0, 5, 6, 17], dtype=torch.int32)
    scaling = d ** -0.5 if version == "2.9" else 0.3
    out = torch_varlen_attention(kernel, q, k, v, cu, 11, scaling)
    expect = per_document_sdpa(q, k, v, cu.tolist(), 0.0, scaling)
    assert out.shape == expect.shape == (1, n, h, d)
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)
    (call,) = calls
    assert call["same_cu"] and call["max"] == (11, 11) and call["contiguous"]
    assert call["scale"] == (None if version == "2.9" else 0.3)
    assert call["enable_gqa"] == (version == "2.12" and kv_heads < h)
    assert call["kv_heads"] == (kv_heads if version == "2.12" else h)


def test_autocast_inputs_cast_q_k_v_to_the_autocast_dtype():
    """fp32 weights + bf16 autocast: RoPE leaves q, k in fp32 and v in bf16 (the case of
    `--dtype auto` on one GPU); the kernel choice must see bf16 for all three. Checked under
    CPU autocast (the same function runs under CUDA autocast)."""
    q, k, v = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cq, ck, cv = packed.autocast_inputs(q, k, v)
    assert (cq.dtype, ck.dtype, cv.dtype) == (torch.bfloat16,) * 3
    assert torch.equal(cq, q.bfloat16()) and torch.equal(cv, v)
    same = packed.autocast_inputs(q, k, v)  # no autocast: untouched
    assert same[0] is q and same[2] is v


def test_cpu_attention_is_per_document_sdpa(tiny_model_dir):
    """On CPU irtrain_varlen is one causal SDPA call per document (counted in PATHS), and a
    packed forward equals each document run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation=VARLEN).eval()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, model.config.vocab_size, (n,), generator=g) for n in (7, 1, 12)]
    batch = Batch(input_ids=torch.cat(docs)[None], labels=torch.cat(docs)[None],
                         position_ids=torch.cat([torch.arange(len(x)) for x in docs])[None],
                         cu_seqlens=torch.tensor([0, 7, 8, 20], dtype=torch.int32), max_seqlen=12,
                         seg_id=torch.repeat_interleave(torch.arange(3), torch.tensor([7, 1, 12])), seg_example=torch.arange(3),
                         seg_part=torch.zeros(3, dtype=torch.long), seg_score=torch.zeros(3))
    before = packed.PATHS["attention/" + PER_DOCUMENT]
    with torch.no_grad():
        logits = packed.packed_forward(model, batch)[0]
        alone = torch.cat([model(input_ids=x[None], use_cache=False).logits[0] for x in docs])
    assert packed.PATHS["attention/" + PER_DOCUMENT] - before == model.config.num_hidden_layers
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)


@cuda
@pytest.mark.parametrize("kv_heads", [8, 2])
def test_cuda_varlen_attn_equals_per_document_sdpa(kv_heads):
    """On a GPU: the real varlen_attn (bf16, causal, GQA) against per-document SDPA, forward
    and backward."""
    kernel = packed.torch_varlen()
    if kernel is None:
        pytest.skip("this torch/GPU has no usable varlen_attn")
    dev, n, h, d = torch.device("cuda"), 300, 8, 64
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    k = torch.randn(1, n, kv_heads, d, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    v = torch.randn(1, n, kv_heads, d, device=dev, dtype=torch.bfloat16, generator=g).transpose(1, 2).requires_grad_()
    cu = torch.tensor([0, 100, 101, 250, 300], dtype=torch.int32, device=dev)
    up = torch.randn(1, n, h, d, device=dev, dtype=torch.bfloat16, generator=g)
    results = []
    for run in ("varlen", "per-document"):
        for x in (q, k, v):
            x.grad = None
        if run == "varlen":
            out = torch_varlen_attention(kernel, q, k, v, cu, 150, d ** -0.5)
        else:
            out = per_document_sdpa(q, k, v, cu.tolist(), 0.0, d ** -0.5)
        (out.float() * up.float()).sum().backward()
        results.append([out.float(), *(x.grad.float() for x in (q, k, v))])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


@cuda
def test_cuda_packed_forward_uses_varlen_attn(tiny_model_dir):
    """On a GPU under bf16 autocast, irtrain_varlen takes varlen_attn and equals sdpa's
    block-diagonal mask on the same packed batch."""
    from transformers import AutoModelForCausalLM

    if packed.torch_varlen() is None:
        pytest.skip("this torch/GPU has no usable varlen_attn")
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 200, (n,), generator=g) for n in (40, 3, 77)]
    bounds = torch.tensor([0, 40, 43, 120], dtype=torch.int32)
    batch = Batch(input_ids=torch.cat(docs)[None], labels=torch.cat(docs)[None],
                         position_ids=torch.cat([torch.arange(len(x)) for x in docs])[None], cu_seqlens=bounds, max_seqlen=77,
                         seg_id=torch.repeat_interleave(torch.arange(3), bounds.diff().long()), seg_example=torch.arange(3),
                         seg_part=torch.zeros(3, dtype=torch.long), seg_score=torch.zeros(3)).to(dev)
    outs = {}
    for impl in (VARLEN, "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32, attn_implementation=impl).to(dev).eval()
        before = packed.PATHS["attention/" + TORCH_VARLEN]
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs[impl] = packed.packed_forward(model, batch).float()
        if impl == VARLEN:
            assert packed.PATHS["attention/" + TORCH_VARLEN] - before == model.config.num_hidden_layers
    torch.testing.assert_close(outs[VARLEN], outs["sdpa"], rtol=3e-2, atol=3e-2)


@cuda
def test_cuda_bf16_head_equals_full_logits():
    """The chunked head on a GPU with bf16 weights (and its free-memory chunk size) against
    the full bf16 logits."""
    from irtrain.train.head import lm_head_stats

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(3000, 256, device=dev, generator=g, dtype=torch.bfloat16).requires_grad_()
    w = (torch.randn(32000, 256, device=dev, generator=g) * 0.05).bfloat16().requires_grad_()
    t = torch.randint(0, 32000, (3000,), device=dev, generator=g)
    logps, values = lm_head_stats(h, w, None, t)
    (logps.sum() + 0.5 * values.sum()).backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    z = F.linear(h, w).float()
    lse = torch.logsumexp(z, -1)
    (((z.gather(1, t[:, None]).squeeze(1) - lse)).sum() + 0.5 * lse.sum()).backward()
    torch.testing.assert_close(logps, z.gather(1, t[:, None]).squeeze(1) - lse, rtol=1e-4, atol=1e-3)
    assert gw.dtype == torch.bfloat16
    torch.testing.assert_close(gh.float(), h.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gw.float(), w.grad.float(), rtol=2e-2, atol=5e-2)
