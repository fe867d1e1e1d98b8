"""The LM head at the response states (`irtrain.train.head`, `packed_token_stats`):
the same numbers and gradients as the full logits, a chunk of rows at a time."""
from __future__ import annotations

import math

import pytest
import torch

from irtrain.losses import ResponseStates, response_token_stats, state_token_stats
from irtrain.shards import ShardSet
from irtrain.train.batching import collate
from irtrain.train.head import CHUNK_BYTES, CUDA_CHUNK_BYTES, chunk_rows_for, lm_head_stats
from irtrain.train.packed import PATHS, packed_forward, packed_token_stats

from test_train_common import prepare_task  # noqa: F401


def _full(h, w, b, t, tau):
    """The reference: full logits (as `nn.Linear` computes them) through `state_token_stats`."""
    z = torch.nn.functional.linear(h, w, b)
    states = ResponseStates(index=torch.arange(len(t)), targets=t, is_last=torch.zeros(len(t), dtype=torch.bool))
    return state_token_stats(z, states, tau=tau, extras=True)


def test_hand_computed_values():
    # logits l = h W^T = [1, 0, 0]: logsumexp = log(e + 2), log p(token 0) = 1 - log(e + 2)
    h = torch.tensor([[1.0, 0.0]])
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    logps, values, correct, ents = lm_head_stats(h, w, None, torch.tensor([0]), extras=True)
    lse = math.log(math.e + 2)
    assert logps.item() == pytest.approx(1 - lse, abs=1e-6)
    assert values.item() == pytest.approx(lse, abs=1e-6)
    assert bool(correct.item())
    p = [math.e / (math.e + 2), 1 / (math.e + 2), 1 / (math.e + 2)]
    assert ents.item() == pytest.approx(-sum(q * math.log(q) for q in p), abs=1e-6)
    # tau = 0.5: V = 0.5 * logsumexp(2 l) = 0.5 * log(e^2 + 2)
    _, v_half = lm_head_stats(h, w, None, torch.tensor([1]), tau=0.5)
    assert v_half.item() == pytest.approx(0.5 * math.log(math.e**2 + 2), abs=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck_over_chunks(tau, bias):
    """Analytic gradient (the custom backward) against finite differences, float64, with
    several chunks (chunk_rows 3 over 7 states), both outputs weighted."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    t = torch.randint(0, 11, (7,), generator=g)

    def fn(h, w, *rest):
        logps, values = lm_head_stats(h, w, rest[0] if rest else None, t, tau=tau, chunk_rows=3)
        return logps, values

    assert torch.autograd.gradcheck(fn, (h, w, *([b] if bias else [])), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 0.5])
def test_equals_full_logits_values_and_grads(tau):
    g = torch.Generator().manual_seed(1)
    h0 = torch.randn(40, 16, generator=g)
    w0 = torch.randn(300, 16, generator=g) * 0.3
    b0 = torch.randn(300, generator=g) * 0.1
    t = torch.randint(0, 300, (40,), generator=g)
    up_lp, up_v = torch.randn(40, generator=g), torch.randn(40, generator=g)
    grads = []
    for path in ("full", "head"):
        h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
        if path == "full":
            st = _full(h, w, b, t, tau)
            out = (st.logps, st.values, st.correct, st.entropies)
        else:
            out = lm_head_stats(h, w, b, t, tau=tau, extras=True, chunk_rows=7)
        (out[0] * up_lp + out[1] * up_v).sum().backward()
        grads.append((out, h.grad, w.grad, b.grad))
    (a, *ga), (c, *gc) = grads
    for x, y in zip(a, c):
        if x.dtype == torch.bool:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gc):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5)


def test_no_states_and_bad_shapes():
    w = torch.randn(5, 3, requires_grad=True)
    logps, values = lm_head_stats(torch.zeros(0, 3, requires_grad=True), w, None, torch.zeros(0, dtype=torch.long))
    assert logps.shape == values.shape == (0,)
    (logps.sum() + values.sum()).backward()
    assert torch.count_nonzero(w.grad) == 0
    with pytest.raises(ValueError, match="lm_head_stats"):
        lm_head_stats(torch.zeros(2, 4), w, None, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="tau"):
        lm_head_stats(torch.zeros(2, 3), w, None, torch.zeros(2, dtype=torch.long), tau=0.0)
    assert chunk_rows_for(128_256) == 130 and chunk_rows_for(10) >= 1


def _weighted_run(path, h0, w0, b0, t, tau, dtype, autocast):
    """(stats, grads) of logps * u + values * v, on the head or on the full logits."""
    g = torch.Generator().manual_seed(7)
    up_lp, up_v = torch.randn(len(t), generator=g), torch.randn(len(t), generator=g)
    h, w, b = (x.to(dtype).clone().requires_grad_() for x in (h0, w0, b0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if path == "full":
            st = _full(h, w, b, t, tau)
            out = (st.logps, st.values, st.correct, st.entropies)
        else:
            out = lm_head_stats(h, w, b, t, tau=tau, extras=True, chunk_rows=7)
        (out[0] * up_lp + out[1] * up_v).sum().backward()
    return out, (h.grad, w.grad, b.grad)


@pytest.mark.parametrize("tau", [1.0, 0.5])
@pytest.mark.parametrize("weights", ["bf16", "fp32-autocast-bf16"])
def test_bf16_equals_full_logits(weights, tau):
    """bf16 on CPU, as on a GPU: bf16 weights (gradients come back in bf16), or float32
    weights under bf16 autocast (gradients in float32). The stats equal those of the full
    bf16 logits (both round the same logits to bf16, then compute in float32); the
    gradients differ only by where the bf16 roundings fall (per chunk vs once), within
    two bf16 ulps of the largest entry, and are no further from the exact float64
    gradient than twice the full path's own error."""
    g = torch.Generator().manual_seed(1)
    h0, w0 = torch.randn(40, 16, generator=g), torch.randn(300, 16, generator=g) * 0.3
    b0, t = torch.randn(300, generator=g) * 0.1, torch.randint(0, 300, (40,), generator=g)
    dtype, autocast = (torch.bfloat16, False) if weights == "bf16" else (torch.float32, True)
    exact, g_exact = _weighted_run("full", h0, w0, b0, t, tau, torch.float64, False)
    full, g_full = _weighted_run("full", h0, w0, b0, t, tau, dtype, autocast)
    head, g_head = _weighted_run("head", h0, w0, b0, t, tau, dtype, autocast)
    for x, y in zip(head, full):
        if x.dtype == torch.bool:
            assert torch.equal(x, y)
        else:
            assert x.dtype == torch.float32
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    for gh, gf, ge in zip(g_head, g_full, g_exact):
        assert gh.dtype == gf.dtype == dtype
        scale = float(ge.abs().max())
        assert float((gh.double() - gf.double()).abs().max()) <= 2 ** -6 * scale
        assert float((gh.double() - ge).abs().max()) <= 2 * float((gf.double() - ge).abs().max()) + 2 ** -8 * scale


class _Allocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts ops that return a fresh tensor (no view, no in-place or out= write) of one of `shapes`."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.ops = shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        schema = func._schema
        aliased = any(a.alias_info is not None for a in schema.arguments) or any(r.alias_info is not None for r in schema.returns)
        outs = out if isinstance(out, (tuple, list)) else [out]
        if not aliased and any(isinstance(o, torch.Tensor) and tuple(o.shape) in self.shapes for o in outs):
            self.ops.append(schema.name)
        return out


@pytest.mark.parametrize("weights", ["fp32", "bf16", "fp32-autocast-bf16"])
def test_no_per_chunk_buffers(weights):
    """Forward and backward allocate their [C, V] and [V, H] buffers once: as many
    allocations of those shapes with 8 chunks as with one (the weight cast, the gradient
    accumulator and its scratch, the logits buffers; none inside the chunk loop)."""
    n, hid, vocab, chunk = 24, 8, 50, 3
    dtype, autocast = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False),
                       "fp32-autocast-bf16": (torch.float32, True)}[weights]
    counts = []
    for rows in (chunk, n):
        g = torch.Generator().manual_seed(0)
        h = torch.randn(n, hid, generator=g).to(dtype).requires_grad_()
        w = (torch.randn(vocab, hid, generator=g) * 0.3).to(dtype).requires_grad_()
        t = torch.randint(0, vocab, (n,), generator=g)
        mode = _Allocations({(vocab, hid), (hid, vocab), (rows, vocab), (vocab, rows)})
        with mode, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            lp, v = lm_head_stats(h, w, None, t, tau=0.7, chunk_rows=rows)
            (lp.sum() + v.sum()).backward()
        assert w.grad.dtype == dtype
        counts.append(mode.ops)
    assert len(counts[0]) == len(counts[1]) <= 10, counts


def test_chunk_rows_on_cuda_follow_free_memory(monkeypatch):
    """On CUDA the rows per chunk come from the free memory (mem_get_info plus the caching
    allocator's unused reserve, less the [V, H] buffers), a quarter of it, clamped to
    [CHUNK_BYTES, CUDA_CHUNK_BYTES], over the bytes of one row (float32 logits, their bf16
    copy, the hidden row and its gradient), rounded down to a power of two. No GPU needed:
    the CUDA queries are faked."""
    free = {"bytes": 0}
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free["bytes"], 80 << 30))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 3 << 30)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 1 << 30)
    cuda = torch.device("cuda", 0)
    vocab, hid = 128_256, 4096
    row = vocab * (4 + 2) + 2 * hid * 2
    fixed = vocab * hid * (2 * 2 + 4)

    def rows(budget: int) -> int:
        return 1 << ((budget // row).bit_length() - 1)

    free["bytes"] = 60 << 30  # plenty: the cap, 1366 rows -> 1024
    assert chunk_rows_for(vocab, hid, device=cuda, compute_bytes=2) == rows(CUDA_CHUNK_BYTES) == 1024
    free["bytes"] = fixed  # only the allocator's 2 GiB unused reserve past the buffers: a quarter of it
    assert chunk_rows_for(vocab, hid, device=cuda, compute_bytes=2) == rows(1 << 29) == 512
    free["bytes"] = 0  # nearly full: never below the CPU budget
    assert chunk_rows_for(vocab, hid, device=cuda, compute_bytes=2) == rows(CHUNK_BYTES) == 64
    free["bytes"] = 60 << 30
    assert chunk_rows_for(32_000, 2048, device=cuda, compute_bytes=2) == 4096  # a small vocabulary: more rows (5152 -> 4096)
    # the CPU ignores all of this: float32 logits plus the hidden rows
    assert chunk_rows_for(vocab, hid) == CHUNK_BYTES // (4 * vocab + 8 * hid)


@pytest.fixture(scope="module")
def packed_batch(tiny_model_dir, tmp_path_factory):
    shards = prepare_task(tmp_path_factory.mktemp("head"), tiny_model_dir, n_sft=24, n_heldout=4, seed=3, max_len=128)
    ss = ShardSet(shards["sft"])
    return collate([ss.row(0), ss.row(1)])


@pytest.mark.parametrize("tau", [1.0, 0.8])
def test_packed_token_stats_equals_full_forward(tiny_model_dir, packed_batch, tau):
    """On the tiny Llama: the fused head (decoder's hidden states at the states), and
    transformers' `logits_to_keep` path (keep_logits=True), both equal the full forward's
    stats, and give the same parameter gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    batch = packed_batch
    results = {}
    for path in ("full", "fused", "keep"):
        model.zero_grad()
        if path == "full":
            st = response_token_stats(packed_forward(model, batch), batch.labels, tau=tau, extras=True)
        else:
            st = packed_token_stats(model, batch, tau=tau, keep_logits=path == "keep", extras=True)
        (st.logps.sum() + 0.3 * st.values.sum()).backward()
        results[path] = (st, {n: p.grad.clone() for n, p in model.named_parameters()})
    full, _ = results["full"]
    assert full.logps.numel() > 50
    for path in ("fused", "keep"):
        st, grads = results[path]
        assert torch.equal(st.index, full.index) and torch.equal(st.targets, full.targets) and torch.equal(st.is_last, full.is_last)
        torch.testing.assert_close(st.logps, full.logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.values, full.values, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.entropies, full.entropies, rtol=1e-5, atol=1e-5)
        assert torch.equal(st.correct, full.correct)
        for n, gr in results["full"][1].items():
            torch.testing.assert_close(grads[n], gr, rtol=1e-4, atol=1e-6, msg=f"{path}: {n}")
    assert results["fused"][0].logits is None and results["keep"][0].logits.shape == (full.logps.numel(), model.config.vocab_size)


@pytest.mark.parametrize("fused", [True, False])
def test_packed_scores_equal_full_forward(tiny_model_dir, packed_batch, fused, monkeypatch):
    """`irtrain score`'s one forward: the response tokens' log-probs and the values at
    arbitrary positions equal those of the full logits, on the fused head and on the
    `logits_to_keep` path."""
    from transformers import AutoModelForCausalLM

    import irtrain.train.packed as packed

    if not fused:
        monkeypatch.setattr(packed, "FUSED_HEAD_MODEL_TYPES", frozenset())
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()
    batch = packed_batch
    positions = torch.tensor([0, 5, 17, batch.input_ids.shape[1] - 1, 5])
    stats, values = packed.packed_scores(model, batch, positions, tau=0.7)
    with torch.no_grad():
        logits = packed_forward(model, batch)
        full = response_token_stats(logits, batch.labels)
        expect = 0.7 * torch.logsumexp(logits[0, positions] / 0.7, dim=-1)
    torch.testing.assert_close(stats.logps, full.logps, rtol=1e-5, atol=1e-5)
    assert torch.equal(stats.index, full.index)
    torch.testing.assert_close(values, expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "phi3", "olmo2"])
def test_every_fused_model_type_equals_its_full_forward(model_type, packed_batch):
    """Each architecture on the fused-head list computes its logits as `lm_head(hidden)`:
    a tiny random model of each type gives the same stats and gradients both ways."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from irtrain.train.packed import FUSED_HEAD_MODEL_TYPES

    assert model_type in FUSED_HEAD_MODEL_TYPES
    vocab = int(packed_batch.input_ids.max()) + 1
    cfg = AutoConfig.for_model(model_type, vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="irtrain_varlen", dtype=torch.float32)
    assert model.config.model_type == model_type
    results = []
    for fused in (False, True):
        model.zero_grad()
        if fused:
            st = packed_token_stats(model, packed_batch, tau=1.0)
        else:
            st = response_token_stats(packed_forward(model, packed_batch), packed_batch.labels)
        (st.logps.sum() + 0.5 * st.values.sum()).backward()
        results.append((st, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(b.logps, a.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.values, a.values, rtol=1e-5, atol=1e-5)
    assert ga.keys() == gb.keys()
    for n in ga:
        torch.testing.assert_close(gb[n], ga[n], rtol=1e-4, atol=1e-6, msg=n)


def test_fused_head_runs_as_the_head_modules_own_call(tiny_model_dir, packed_batch, capsys):
    """The fused head runs inside the model's call of its head module: the module's hooks see
    it (ZeRO-3 gathers a partitioned weight in them), once per forward, on the response
    states only, and the module is itself again afterwards. A weight marked as ZeRO-3
    partitioned (`ds_id`) takes the same path, with a one-line note, instead of the full logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    seen = []
    model.lm_head.register_forward_pre_hook(lambda _m, args: seen.append(tuple(args[0].shape)))
    before = PATHS.copy()
    st = packed_token_stats(model, packed_batch)
    n = st.logps.numel()
    assert seen == [(1, n, model.config.hidden_size)]
    assert "forward" not in model.lm_head.__dict__ and model.lm_head(torch.zeros(1, model.config.hidden_size)).shape[-1] == model.config.vocab_size
    model.lm_head.weight.ds_id = 0
    again = packed_token_stats(model, packed_batch)
    torch.testing.assert_close(again.logps, st.logps, rtol=0, atol=0)
    assert PATHS["head/fused"] - before["head/fused"] == 2 and PATHS["head/zero3"] - before["head/zero3"] == 1
    assert PATHS["head/logits_to_keep"] == before["head/logits_to_keep"] and PATHS["head/full_logits"] == before["head/full_logits"]
    if before["head/zero3"] == 0:
        assert "ZeRO-3" in capsys.readouterr().err
