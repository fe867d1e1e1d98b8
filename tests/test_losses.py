"""Losses of FORMULAS.md against hand-computed values and analytic gradients.

Expected numbers are written out (torchtune `test_dpo_loss.py` style); the comment beside each
gives the closed form it was computed from. float64 throughout where exactness matters.
"""
from __future__ import annotations

import math

import pytest
import torch

from irtrain.losses import (
    KL_ESTIMATORS,
    PREFERENCE_LOSSES,
    SFT_LOSSES,
    PreferenceBatch,
    delta_values,
    entropy,
    first_token_mask,
    full_kl,
    k1,
    k2,
    k3,
    kto_z,
    log1mexp,
    preference_metrics,
    reduce_tokens,
    response_token_stats,
    segment_sums,
    sequence_ce,
)

D = torch.float64
LN2 = math.log(2.0)


def t(*xs):
    return torch.tensor(xs, dtype=D)


# ------------------------------------------------------------------------- token stats helpers

def _packed_example(seed: int = 0):
    """logits [2, 6, 5] and labels with two turns in row 0 and padding in row 1."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 6, 5, generator=g, dtype=D)
    labels = torch.tensor([[-100, -100, 3, 1, -100, 2], [-100, 4, 0, 2, 2, -100]])
    return logits, labels


def test_stats_targets_first_tokens_and_segments():
    logits, labels = _packed_example()
    st = response_token_stats(logits, labels)
    assert st.targets.tolist() == [3, 1, 2, 4, 0, 2, 2]
    assert st.index.tolist() == [1, 2, 4, 6, 7, 8, 9]  # state = label position - 1, flat b*T + i
    assert st.is_last.tolist() == [False, True, True, False, False, False, True]
    assert first_token_mask(st.is_last).tolist() == [True, False, True, True, False, False, False]
    # one segment per turn: per-sequence log-probs are sums of per-token ones
    seg = torch.tensor([0, 0, 1, 2, 2, 2, 2])
    sums = segment_sums(st.logps, seg, 3)
    assert torch.allclose(sums, torch.stack([st.logps[:2].sum(), st.logps[2], st.logps[3:].sum()]))
    assert segment_sums(torch.ones(7, dtype=D), seg, 3).tolist() == [2.0, 1.0, 4.0]
    with pytest.raises(ValueError):
        segment_sums(st.logps, seg[:3], 3)


def test_reduce_tokens_is_split_invariant():
    x = t(0.5, 1.5, 2.0, -1.0, 3.0)
    whole = reduce_tokens(x, 5)
    assert whole.item() == pytest.approx(1.2)  # 6 / 5
    split = reduce_tokens(x[:2], 5) + reduce_tokens(x[2:], 5)
    assert split.item() == pytest.approx(whole.item(), abs=1e-15)
    with pytest.raises(ValueError):
        reduce_tokens(x, 0)


# ------------------------------------------------------------------------------ SFT losses

# p = (0.5, 0.25, 0.8), q = (0.4, 0.5, 0.1), dV = (0.1, -0.2, 0)
P, Q, DV = t(0.5, 0.25, 0.8), t(0.4, 0.5, 0.1), t(0.1, -0.2, 0.0)
SFT_EXPECTED = {
    "ce": [0.6931471805599453, 1.3862943611198906, 0.2231435513142097],  # -log p
    "dft": [0.34657359027997264, 0.34657359027997264, 0.17851484105136778],  # -p log p
    "pearson": [-0.05793163276974089, 0.1593653765389909, -0.7],  # -p + q e^dV
    "hellinger": [-0.042224560616423545, 0.1398166741645539, -0.578199424983078],  # sqrt(q e^dV) - sqrt(p)
    "js": [-0.039386658975214706, 0.11999596419505848, -0.4924764850977941],  # log(1 + q e^dV) - log(1 + p)
}


@pytest.mark.parametrize("name", sorted(SFT_EXPECTED))
def test_sft_loss_values(name):
    spec = SFT_LOSSES[name]
    out = spec(P.log(), Q.log() if spec.needs_ref else None, DV if spec.needs_values else None)
    assert out.shape == (3,)
    torch.testing.assert_close(out, t(*SFT_EXPECTED[name]), rtol=0, atol=1e-12)


def test_sft_table_metadata():
    assert set(SFT_LOSSES) == {"ce", "dft", "pearson", "hellinger", "js"}
    assert {n for n, s in SFT_LOSSES.items() if s.needs_ref} == {"pearson", "hellinger", "js"}
    assert {n for n, s in SFT_LOSSES.items() if s.needs_values} == {"pearson", "hellinger", "js"}


@pytest.mark.parametrize("name", ["pearson", "hellinger", "js"])
def test_sft_missing_inputs_and_shapes(name):
    fn = SFT_LOSSES[name].fn
    with pytest.raises(ValueError):
        fn(P.log(), None, DV)
    with pytest.raises(ValueError):
        fn(P.log(), Q.log(), None)
    with pytest.raises(ValueError):
        fn(P.log(), Q.log()[:2], DV)
    with pytest.raises(ValueError):
        SFT_LOSSES["ce"](P.log()[None])


def _grad_log_p(logits, st):
    """[N, V] rows of grad_{l(s_t)} log p_t = onehot(a_t) - softmax(l(s_t))."""
    flat = logits.detach().reshape(-1, logits.shape[-1])[st.index]
    return torch.nn.functional.one_hot(st.targets, logits.shape[-1]).to(D) - flat.softmax(-1)


# coefficient c_t in grad = c_t * grad log p_t, FORMULAS.md's table (value term detached)
ANALYTIC_COEF = {
    "ce": lambda p: -torch.ones_like(p),
    "dft": lambda p: -p,
    "pearson": lambda p: -p,
    "hellinger": lambda p: -0.5 * p.sqrt(),
    "js": lambda p: -p / (1 + p),
}


def _sft_logit_grad(name, *, value_grad=False):
    """Autograd gradient of the summed loss w.r.t. float64 logits [B, T, V]."""
    logits, labels = _packed_example()
    logits.requires_grad_(True)
    # response_token_stats computes in float32; recompute the same quantities in float64 from its
    # index/targets so the comparison can be exact (the shift and mask still come from it).
    st32 = response_token_stats(logits.detach(), labels)
    states = logits.reshape(-1, logits.shape[-1])[st32.index]
    lse = torch.logsumexp(states, -1)
    logps = states.gather(-1, st32.targets[:, None]).squeeze(-1) - lse
    values = lse if value_grad else lse.detach()
    dv = delta_values(values, st32.is_last)
    g = torch.Generator().manual_seed(7)
    ref = torch.log(torch.rand(logps.shape, generator=g, dtype=D) * 0.9 + 0.05)
    spec = SFT_LOSSES[name]
    loss = spec(logps, ref if spec.needs_ref else None, dv if spec.needs_values else None).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    return grad, logits.detach(), st32, logps.detach(), ref, lse.detach()


@pytest.mark.parametrize("name", sorted(ANALYTIC_COEF))
def test_sft_gradients_match_formulas(name):
    grad, logits, st, logps, _, _ = _sft_logit_grad(name)
    # float32 stats agree with the float64 recomputation (same shift/mask)
    torch.testing.assert_close(st.logps.double(), logps, rtol=0, atol=1e-5)
    coef = ANALYTIC_COEF[name](logps.exp())
    expected = torch.zeros(logits.shape[0] * logits.shape[1], logits.shape[2], dtype=D)
    expected.index_add_(0, st.index, coef[:, None] * _grad_log_p(logits, st))
    torch.testing.assert_close(grad.reshape(expected.shape), expected, rtol=0, atol=1e-12)
    # positions that are not states of a response token get no gradient
    untouched = torch.ones(expected.shape[0], dtype=torch.bool)
    untouched[st.index] = False
    assert grad.reshape(expected.shape)[untouched].abs().max() == 0
    # the loop's own path: float32 stats straight from response_token_stats, dV detached
    logits32 = logits.float().requires_grad_(True)
    st32 = response_token_stats(logits32, _packed_example()[1])
    spec = SFT_LOSSES[name]
    ref = _sft_logit_grad(name)[4].float()
    dv = delta_values(st32.values.detach(), st32.is_last)
    (grad32,) = torch.autograd.grad(spec(st32.logps, ref if spec.needs_ref else None, dv if spec.needs_values else None).sum(), logits32)
    torch.testing.assert_close(grad32.double().reshape(expected.shape), expected, rtol=0, atol=1e-6)


def test_pearson_equals_dft_gradient_with_detached_values():
    g_pearson = _sft_logit_grad("pearson")[0]
    g_dft = _sft_logit_grad("dft")[0]
    torch.testing.assert_close(g_pearson, g_dft, rtol=0, atol=1e-13)


def test_pearson_value_grad_adds_the_value_term():
    """--value-grad: d/dl of exp(log q_t + V(s_t) - V(s_{t+1})) adds e_t softmax(l(s_t)) at s_t and
    -e_t softmax(l(s_{t+1})) at s_{t+1} (not at the last token of a turn, where dV = 0)."""
    grad, logits, st, logps, ref, lse = _sft_logit_grad("pearson", value_grad=True)
    flat = logits.reshape(-1, logits.shape[-1])
    pi = flat[st.index].softmax(-1)
    expected = torch.zeros_like(flat)
    expected.index_add_(0, st.index, -logps.exp()[:, None] * _grad_log_p(logits, st))
    not_last = ~st.is_last
    e = (ref + lse - torch.roll(lse, -1)).exp() * not_last
    expected.index_add_(0, st.index, e[:, None] * pi)
    expected.index_add_(0, torch.roll(st.index, -1), -e[:, None] * torch.roll(pi, -1, dims=0))
    torch.testing.assert_close(grad.reshape(expected.shape), expected, rtol=0, atol=1e-12)
    assert not torch.allclose(grad, _sft_logit_grad("dft")[0])


def test_sequence_ce_is_token_reduced_ce():
    token_logps = t(-1.0, -2.0, -0.5, -3.0, -1.5)  # two chosen responses: 2 and 3 tokens
    seq = t(-3.0, -5.0)
    lengths = torch.tensor([2, 3])
    expected = reduce_tokens(SFT_LOSSES["ce"](token_logps), 5)  # 8 / 5
    assert sequence_ce(seq, lengths).item() == pytest.approx(1.6, abs=1e-15)
    assert sequence_ce(seq, lengths).item() == pytest.approx(expected.item(), abs=1e-15)
    assert sequence_ce(seq, lengths, denom=10).item() == pytest.approx(0.8, abs=1e-15)
    with pytest.raises(ValueError):
        sequence_ce(seq, lengths[:1])


# ------------------------------------------------------------------------------ KL estimators

def test_kl_per_token_values():
    # p_t = 0.75, q_t = 0.5, r = log(2/3)
    lp, lq = t(0.75).log(), t(0.5).log()
    assert k1(lp, lq).item() == pytest.approx(0.4054651081081644, abs=1e-14)  # log 1.5
    assert k2(lp, lq).item() == pytest.approx(0.08220097694658274, abs=1e-14)  # (log 1.5)^2 / 2
    assert k3(lp, lq).item() == pytest.approx(0.07213177477483107, abs=1e-14)  # 2/3 - 1 + log 1.5
    with pytest.raises(ValueError):
        k3(lp, t(0.5, 0.5).log())


def _expect(name, logits, ref_logits):
    """E_{a ~ pi}[k(a)] by enumeration over the categorical, sampling weights not differentiated."""
    logp = logits.log_softmax(-1)
    logq = ref_logits.log_softmax(-1)
    return (logp.exp().detach() * KL_ESTIMATORS[name].fn(logp, logq)).sum()


def test_kl_estimators_expected_values_on_a_categorical():
    # pi = (0.75, 0.25), ref = (0.5, 0.5): KL(pi||ref) = 0.75 log 3 - log 2
    lpi, lref = t(0.75, 0.25).log(), t(0.5, 0.5).log()
    kl = 0.130812035941137
    assert full_kl(lpi[None], lref[None]).item() == pytest.approx(kl, abs=1e-14)
    assert full_kl(lref[None], lpi[None]).item() == pytest.approx(0.14384103622589042, abs=1e-14)  # KL(ref||pi) = log(4/3)/2
    assert _expect("k1", lpi, lref).item() == pytest.approx(kl, abs=1e-14)  # E[k1] = KL(pi||ref)
    assert _expect("k3", lpi, lref).item() == pytest.approx(kl, abs=1e-14)  # E[k3] = KL(pi||ref)
    # E[k2] = E[r^2]/2 = (0.75 log(1.5)^2 + 0.25 log(2)^2)/2: not KL, only close to it
    assert _expect("k2", lpi, lref).item() == pytest.approx(0.1217073594497122, abs=1e-14)


def test_k2_matches_kl_to_second_order():
    g = torch.Generator().manual_seed(3)
    base, direction = torch.randn(6, generator=g, dtype=D), torch.randn(6, generator=g, dtype=D)
    gaps = []
    for eps in (1e-1, 1e-2):
        ref = base + eps * direction
        gaps.append(abs(_expect("k2", base, ref).item() - full_kl(base[None], ref[None]).item()))
    assert gaps[1] < gaps[0] * 2e-3  # the gap is O(eps^3)


def test_kl_estimators_expected_gradients_on_a_categorical():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(7, generator=g, dtype=D).requires_grad_(True)
    ref_logits = torch.randn(7, generator=g, dtype=D)
    pi, q = logits.detach().softmax(-1), ref_logits.softmax(-1)

    def grad_of(x):
        return torch.autograd.grad(x, logits)[0]

    # reverse KL gradient, analytic: pi * (log pi - log q - KL)
    kl = full_kl(logits[None], ref_logits[None])[0]
    grad_kl = grad_of(kl)
    torch.testing.assert_close(grad_kl, pi * (pi.log() - q.log() - kl.detach()), rtol=0, atol=1e-14)
    # k1: zero in expectation
    torch.testing.assert_close(grad_of(_expect("k1", logits, ref_logits)), torch.zeros(7, dtype=D), rtol=0, atol=1e-15)
    # k2: at one state (a length-1 sequence) its expected gradient is grad KL(pi||ref)
    torch.testing.assert_close(grad_of(_expect("k2", logits, ref_logits)), grad_kl, rtol=0, atol=1e-14)
    # k3: expected gradient is grad KL(ref||pi) = pi - q, the forward KL
    torch.testing.assert_close(grad_of(_expect("k3", logits, ref_logits)), pi - q, rtol=0, atol=1e-14)


def test_kl_table_and_full_kl_shapes():
    assert set(KL_ESTIMATORS) == {"full", "k1", "k2", "k3"}
    assert [n for n, e in KL_ESTIMATORS.items() if e.needs_logits] == ["full"]
    with pytest.raises(ValueError):
        full_kl(torch.zeros(3, 4), torch.zeros(3, 5))
    assert full_kl(torch.zeros(3, 4), torch.zeros(3, 4)).tolist() == [0.0, 0.0, 0.0]


# ------------------------------------------------------------------------------ small metrics

def test_entropy():
    assert entropy(t(0.5, 0.25, 0.25).log()[None]).item() == pytest.approx(1.0397207708399179, abs=1e-14)  # 1.5 log 2
    assert entropy(torch.zeros(2, 4, dtype=D)).tolist() == pytest.approx([math.log(4)] * 2, abs=1e-14)


# ------------------------------------------------------------------------------ preference losses

# One pair: logpi(y_w) = -5, logpi(y_l) = -8, ref -6 / -7 -> Delta_w = 1, Delta_l = -1; beta 0.1 -> m = 0.2.
# |y_w| = 4, |y_l| = 2.
PAIR = PreferenceBatch.pairs(t(-5.0), t(-8.0), t(-6.0), t(-7.0), torch.tensor([4]), torch.tensor([2]))


@pytest.mark.parametrize(
    "name, params, expected",
    [
        ("sigmoid", {}, 0.5981388693815918),  # softplus(-0.2)
        ("sigmoid", {"label_smoothing": 0.1}, 0.6181388693815918),  # 0.9 softplus(-0.2) + 0.1 softplus(0.2)
        ("robust", {"label_smoothing": 0.1}, 0.5731388693815918),  # (0.9 softplus(-0.2) - 0.1 softplus(0.2)) / 0.8
        ("hinge", {}, 0.8),  # relu(1 - 0.2)
        ("ipo", {}, 18.0625),  # (1/4 + 1/2 - 5)^2
        ("simpo", {"beta": 2.0, "gamma": 0.5}, 0.006715348489118068),  # softplus(-(2 (-5/4 + 4) - 0.5)) = softplus(-5)
        ("orpo", {"beta": 0.1}, 1.254541612228339),  # 1.25 - 0.1 logsigma(L), L = logit(e^-1.25) - logit(e^-4)
    ],
)
def test_pair_losses_hand_values(name, params, expected):
    params = dict(params)
    beta = params.pop("beta", 0.1)
    out = PREFERENCE_LOSSES[name](PAIR, beta=beta, **params)
    assert out.shape == (1,)
    assert out.item() == pytest.approx(expected, abs=1e-12)


def test_orpo_against_direct_computation():
    g = torch.Generator().manual_seed(11)
    lengths = torch.randint(1, 20, (6, 2), generator=g)
    # per-token mean log-probs from very small to near 0, crossing -ln 2
    abar = -torch.tensor([[1e-6, 3.0], [0.5, 0.9], [0.69, 0.70], [2.0, 1e-3], [20.0, 0.1], [0.3, 40.0]], dtype=D)
    batch = PreferenceBatch(policy_logps=abar * lengths, lengths=lengths)
    out = PREFERENCE_LOSSES["orpo"](batch, beta=0.25)
    for i in range(6):
        aw, al = abar[i].tolist()
        odds = lambda a: math.exp(a) / (1 - math.exp(a))  # noqa: E731
        log_odds = math.log(odds(aw)) - math.log(odds(al))
        direct = -aw + 0.25 * math.log1p(math.exp(-log_odds))
        assert out[i].item() == pytest.approx(direct, rel=1e-9)


def test_log1mexp_both_branches():
    x = t(-1e-10, -0.5, -LN2, -1.0, -50.0)
    expected = [math.log(-math.expm1(-1e-10)), math.log(1 - math.exp(-0.5)), math.log(0.5), math.log(1 - math.exp(-1.0)), -math.exp(-50.0)]
    out = log1mexp(x)
    for o, e in zip(out.tolist(), expected):
        assert o == pytest.approx(e, rel=1e-12)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(log1mexp(x).sum(), x)
    assert torch.isfinite(grad).all()  # d/dx log(1 - e^x) = -e^x / (1 - e^x)
    torch.testing.assert_close(grad, -x.detach().exp() / -torch.expm1(x.detach()), rtol=1e-12, atol=0)


def test_ipo_uses_per_token_means():
    # Delta_w = 6 over 3 tokens, Delta_l = -4 over 8 tokens: (2 + 0.5 - 1/(2*0.25))^2 = 0.25
    batch = PreferenceBatch.pairs(t(-1.0), t(-9.0), t(-7.0), t(-5.0), torch.tensor([3]), torch.tensor([8]))
    assert PREFERENCE_LOSSES["ipo"](batch, beta=0.25).item() == pytest.approx(0.25, abs=1e-14)
    # the same sums over other lengths give another loss: lengths matter
    other = PreferenceBatch.pairs(t(-1.0), t(-9.0), t(-7.0), t(-5.0), torch.tensor([1]), torch.tensor([1]))
    assert PREFERENCE_LOSSES["ipo"](other, beta=0.25).item() == pytest.approx(64.0, abs=1e-12)  # (6 + 4 - 2)^2


def _random_pairs(B=5, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PreferenceBatch(
        policy_logps=-torch.rand(B, K, generator=g, dtype=D) * 30,
        ref_logps=-torch.rand(B, K, generator=g, dtype=D) * 30,
        lengths=torch.randint(1, 30, (B, K), generator=g),
    )


def test_sigmoid_gradient_is_the_dpo_gradient():
    b = _random_pairs()
    pol = b.policy_logps.clone().requires_grad_(True)
    batch = PreferenceBatch(policy_logps=pol, ref_logps=b.ref_logps)
    (grad,) = torch.autograd.grad(PREFERENCE_LOSSES["sigmoid"](batch, beta=0.1).sum(), pol)
    d = b.policy_logps - b.ref_logps
    w = 0.1 * torch.sigmoid(-0.1 * (d[:, 0] - d[:, 1]))  # dL/dlogpi(y_w) = -beta sigma(-m) = -dL/dlogpi(y_l)
    torch.testing.assert_close(grad, torch.stack([-w, w], dim=1), rtol=0, atol=1e-15)


def test_plackett_luce_k2_and_robust_eps0_equal_sigmoid():
    b = _random_pairs(B=8)
    sig = PREFERENCE_LOSSES["sigmoid"](b, beta=0.3)
    torch.testing.assert_close(PREFERENCE_LOSSES["plackett_luce"](b, beta=0.3), sig, rtol=0, atol=1e-14)
    torch.testing.assert_close(PREFERENCE_LOSSES["robust"](b, beta=0.3, label_smoothing=0.0), sig, rtol=0, atol=1e-14)


def _ranked_log4_log2_0():
    # beta Delta = (log 4, log 2, 0) with beta = 0.1
    return PreferenceBatch(policy_logps=t(10 * math.log(4), 10 * LN2, 0.0)[None] - 3.0, ref_logps=torch.full((1, 3), -3.0, dtype=D))


def test_plackett_luce_hand_value():
    # -(log(4/7) + log(2/3)) = log(21/8)
    out = PREFERENCE_LOSSES["plackett_luce"](_ranked_log4_log2_0(), beta=0.1)
    assert out.item() == pytest.approx(0.965080896043587, abs=1e-13)


def test_infonca_hand_values_and_one_hot_weights():
    b = _ranked_log4_log2_0()
    # alpha = 1, s = (log 2, 0, 0): w = (1/2, 1/4, 1/4); loss = -(log(4/7)/2 + log(2/7)/4 + log(1/7)/4) = log 7 - 1.25 log 2
    scored = PreferenceBatch(policy_logps=b.policy_logps, ref_logps=b.ref_logps, scores=t(LN2, 0.0, 0.0)[None])
    assert PREFERENCE_LOSSES["infonca"](scored, beta=0.1, alpha=1.0).item() == pytest.approx(1.0794761733553817, abs=1e-13)
    # alpha = 1e-3 with distinct scores: w is one-hot on the best (s = 1), loss = -log(4/7)
    sharp = PreferenceBatch(policy_logps=b.policy_logps, ref_logps=b.ref_logps, scores=t(1.0, 0.0, 0.5)[None])
    assert PREFERENCE_LOSSES["infonca"](sharp).item() == pytest.approx(0.5596157879354227, abs=1e-13)
    # K = 2 with one-hot weights on the chosen: the DPO sigmoid loss
    pairs = _random_pairs(B=6)
    with_scores = PreferenceBatch(policy_logps=pairs.policy_logps, ref_logps=pairs.ref_logps, scores=t(1.0, 0.0).expand(6, 2))
    torch.testing.assert_close(PREFERENCE_LOSSES["infonca"](with_scores), PREFERENCE_LOSSES["sigmoid"](pairs), rtol=0, atol=1e-14)


def _kto_batch(mismatched_delta):
    # r = (1, -1, 0, -1); labels desirable, undesirable, desirable, undesirable
    return PreferenceBatch(
        policy_logps=t(-3.0, -5.0, -4.0, -6.0)[:, None],
        ref_logps=t(-4.0, -4.0, -4.0, -5.0)[:, None],
        labels=torch.tensor([True, False, True, False]),
        mismatched_policy_logps=t(-10.0, -10.0, -10.0, -10.0) + mismatched_delta,
        mismatched_ref_logps=t(-10.0, -10.0, -10.0, -10.0),
    )


def test_kto_z_from_mismatched_pairs():
    # logp[i, j] = log pi(y_j | x_i) for a batch of 3; the mismatched pairs are (x_i, y_{i+1 mod 3})
    pol = t(-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0, -8.0, -9.0).reshape(3, 3)
    ref = t(-1.0, -2.5, -3.0, -4.0, -5.0, -5.0, -9.0, -8.0, -9.0).reshape(3, 3)
    idx = torch.tensor([1, 2, 0])
    rows = torch.arange(3)
    z = kto_z(pol[rows, idx], ref[rows, idx])
    assert z.item() == pytest.approx(0.5, abs=1e-15)  # mean(0.5, -1, 2)
    pol.requires_grad_(True)
    assert not kto_z(pol[rows, idx], ref[rows, idx]).requires_grad
    assert kto_z(t(-3.0, -1.0), t(-1.0, -1.0)).item() == 0.0  # mean -1, clamped at 0
    with pytest.raises(ValueError):
        kto_z(t(), t())


def test_kto_hand_values():
    # z = mean(0.5, 1, 0, 0.5) = 0.5, beta = 0.1
    out = PREFERENCE_LOSSES["kto"](_kto_batch(t(0.5, 1.0, 0.0, 0.5)), beta=0.1)
    expected = [
        0.48750260351578967,  # desirable, r = 1:  1 - sigma(0.1 (1 - 0.5))
        0.4625701546562504,  # undesirable, r = -1: 1 - sigma(0.1 (0.5 + 1))
        0.5124973964842103,  # desirable, r = 0:  1 - sigma(-0.05)
        0.4625701546562504,  # undesirable, r = -1
    ]
    torch.testing.assert_close(out, t(*expected), rtol=0, atol=1e-14)
    weighted = PREFERENCE_LOSSES["kto"](_kto_batch(t(0.5, 1.0, 0.0, 0.5)), beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)
    torch.testing.assert_close(weighted, t(*expected) * t(2.0, 0.5, 2.0, 0.5), rtol=0, atol=1e-14)
    # z clamps at 0: mismatched mean -1 -> desirable r = 1 gives 1 - sigma(0.1)
    clamped = PREFERENCE_LOSSES["kto"](_kto_batch(t(-1.0, -1.0, -1.0, -1.0)), beta=0.1)
    assert clamped[0].item() == pytest.approx(0.47502081252106, abs=1e-13)


def test_kto_errors():
    one = PreferenceBatch(policy_logps=t(-1.0)[:, None], ref_logps=t(-1.0)[:, None], labels=torch.tensor([True]),
                          mismatched_policy_logps=t(-1.0), mismatched_ref_logps=t(-1.0))
    with pytest.raises(ValueError, match="batch size"):
        PREFERENCE_LOSSES["kto"](one)
    b = _kto_batch(t(0.0, 0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="labels"):
        PREFERENCE_LOSSES["kto"](PreferenceBatch(policy_logps=b.policy_logps, ref_logps=b.ref_logps,
                                                 mismatched_policy_logps=b.mismatched_policy_logps, mismatched_ref_logps=b.mismatched_ref_logps))
    with pytest.raises(ValueError, match="mismatched"):
        PREFERENCE_LOSSES["kto"](PreferenceBatch(policy_logps=b.policy_logps, ref_logps=b.ref_logps, labels=b.labels))
    with pytest.raises(ValueError):  # paired data is not kto's
        PREFERENCE_LOSSES["kto"](_random_pairs())


def test_preference_table_metadata():
    expected = {
        "sigmoid": (True, 0.1, "preference"), "robust": (True, 0.1, "preference"), "hinge": (True, 0.1, "preference"),
        "ipo": (True, 0.1, "preference"), "simpo": (False, 2.0, "preference"), "orpo": (False, 0.1, "preference"),
        "kto": (True, 0.1, "unpaired"), "infonca": (True, 0.1, "ranked"), "plackett_luce": (True, 0.1, "ranked"),
    }
    assert {n: (s.needs_ref, s.default_beta, s.data_format) for n, s in PREFERENCE_LOSSES.items()} == expected
    b = _random_pairs()
    free = PreferenceBatch(policy_logps=b.policy_logps, lengths=b.lengths)
    for spec in PREFERENCE_LOSSES.values():
        if spec.data_format != "preference":
            continue
        if spec.needs_ref:
            with pytest.raises(ValueError, match="reference"):
                spec(free)
        else:
            # reference-free losses do not read ref_logps
            torch.testing.assert_close(spec(free), spec(b))
    # default beta is used when none is given
    torch.testing.assert_close(PREFERENCE_LOSSES["simpo"](b), PREFERENCE_LOSSES["simpo"](b, beta=2.0))


def test_preference_param_checks():
    b = _random_pairs()
    with pytest.raises(ValueError):
        PREFERENCE_LOSSES["robust"](b, label_smoothing=0.5)
    with pytest.raises(ValueError):
        PREFERENCE_LOSSES["sigmoid"](b, label_smoothing=0.6)
    with pytest.raises(ValueError):
        PREFERENCE_LOSSES["sigmoid"](b, beta=0.0)
    with pytest.raises(ValueError, match="no effect"):
        PREFERENCE_LOSSES["hinge"](b, label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown"):
        PREFERENCE_LOSSES["sigmoid"](b, lable_smoothing=0.1)
    # a loop can pass all its params at their defaults to every loss
    PREFERENCE_LOSSES["hinge"](b, label_smoothing=0.0, gamma=0.5)
    with pytest.raises(ValueError, match="scores"):
        PREFERENCE_LOSSES["infonca"](b)
    for name in ("ipo", "simpo", "orpo"):
        with pytest.raises(ValueError, match="lengths"):
            PREFERENCE_LOSSES[name](PreferenceBatch(policy_logps=b.policy_logps, ref_logps=b.ref_logps))


def test_preference_shape_errors():
    b = _random_pairs(K=3)
    with pytest.raises(ValueError, match="K = 2"):
        PREFERENCE_LOSSES["sigmoid"](b)
    with pytest.raises(ValueError, match="K >= 2"):
        PREFERENCE_LOSSES["plackett_luce"](PreferenceBatch(policy_logps=b.policy_logps[:, :1], ref_logps=b.ref_logps[:, :1]))
    with pytest.raises(ValueError):
        PreferenceBatch(policy_logps=b.policy_logps, ref_logps=b.ref_logps[:, :2])
    with pytest.raises(ValueError):
        PreferenceBatch(policy_logps=b.policy_logps[:, 0])
    with pytest.raises(ValueError):
        PreferenceBatch(policy_logps=b.policy_logps, labels=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError):
        PreferenceBatch.pairs(t(-1.0, -2.0), t(-1.0))
    with pytest.raises(ValueError):
        PreferenceBatch.pairs(t(-1.0), t(-1.0), ref_chosen_logps=t(-1.0))


def test_preference_metrics_trl_names():
    # Delta = ((1, -1), (-1, 0.5)), beta = 0.1
    b = PreferenceBatch(policy_logps=t(-5.0, -8.0, -3.0, -2.0).reshape(2, 2), ref_logps=t(-6.0, -7.0, -2.0, -2.5).reshape(2, 2))
    m = {k: v.item() for k, v in preference_metrics(b, beta=0.1).items()}
    assert m == pytest.approx({
        "rewards/chosen": 0.0, "rewards/rejected": -0.025, "rewards/margins": 0.025,
        "rewards/accuracies": 0.5, "logps/chosen": -4.0, "logps/rejected": -5.0,
    }, abs=1e-15)
    kto = {k: v.item() for k, v in preference_metrics(_kto_batch(t(0.0, 0.0, 0.0, 0.0)), beta=0.1).items()}
    assert kto == pytest.approx({"rewards/chosen": 0.05, "logps/chosen": -3.5, "rewards/rejected": -0.1, "logps/rejected": -5.5}, abs=1e-15)
