"""`irtrain dpo`: the preference objective in the shared loop.

The loss values themselves are tested in test_losses.py; here we test the objective's use
of them: the loss of a packed micro-batch equals the table function applied to log-probs
computed separately (one unpadded forward per sequence, a live reference model), packed =
separate, cached reference = live reference (and a cache made for another model is
refused), KTO's mismatched pairs, every bad input, and that it learns.

All on 2-layer Llamas built from a config (conftest) and data made here or by the real
`irtrain prepare`. Joint / alternating schedules: test_dpo_schedules.py.
"""
from __future__ import annotations

import gc
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import PreTrainedModel
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import DPOConfig, load_config
from irtrain.dpo import PreferenceObjective, batch_examples, mismatched_rows
from irtrain.errors import ConfigError, ReferenceMismatchError
from irtrain.losses import PREFERENCE_LOSSES, PreferenceBatch, response_token_stats
from irtrain.models import model_hash
from irtrain.shards import Segment, ShardSet, write_shard_set
from irtrain.train.batching import PackedData, plan_micro_batches
from irtrain.train.metrics import read_metrics
from irtrain.train.objective import TrainContext
from irtrain.train.reference import ReferenceKey, default_path, ensure_reference
from irtrain.train.strategy import Strategy

from test_train_common import arithmetic_conversations, pack, tokenize_chat, tokenizer_hash

runner = CliRunner()


# --------------------------------------------------------------------------- data made here
def _wrong(conv, answer):
    return [conv[0], {"role": "assistant", "content": conv[1]["content"].rsplit("Answer: ", 1)[0] + f"Answer: {answer}"}]


def _examples(tok, n, seed):
    out = []
    for i, conv in enumerate(arithmetic_conversations(n, seed)):
        right = int(conv[1]["content"].rsplit("Answer: ", 1)[1])
        out.append((i, tokenize_chat(tok, conv), tokenize_chat(tok, _wrong(conv, right + 1)), tokenize_chat(tok, _wrong(conv, right + 5))))
    return out


def pack_examples(examples, max_len):
    """Greedy packing of whole examples (lists of segments) into rows: examples never cross rows."""
    rows, cur, n = [], [], 0
    for segs in examples:
        size = sum(len(s.input_ids) for s in segs)
        if cur and n + size > max_len:
            rows.append(cur)
            cur, n = [], 0
        cur += segs
        n += size
    return rows + ([cur] if cur else [])


def write_pairs(tok, out, *, n, seed=1, max_len=300, drop_rejected_of=None):
    examples = []
    for i, w, l, _ in _examples(tok, n, seed):
        segs = [Segment(*w, example=i, part=0)]
        if i != drop_rejected_of:
            segs.append(Segment(*l, example=i, part=1))
        examples.append(segs)
    write_shard_set(out, "preference", pack_examples(examples, max_len), max_len=max_len, tokenizer_hash=tokenizer_hash(tok))
    return out


def write_unpaired(tok, out, *, n, seed=2, max_len=300, packed=True):
    segs = []
    for i, w, l, _ in _examples(tok, n, seed):
        good = i % 2 == 0
        segs.append(Segment(*(w if good else l), example=i, part=0, score=1.0 if good else 0.0))
    rows = pack(segs, max_len) if packed else [[s] for s in segs]
    write_shard_set(out, "unpaired", rows, max_len=max_len, packed=packed, tokenizer_hash=tokenizer_hash(tok))
    return out


def write_ranked(tok, out, *, n, seed=3, max_len=400):
    rows = []
    for i, w, l, l2 in _examples(tok, n, seed):
        rows.append([Segment(*w, example=i, part=0, score=0.9), Segment(*l, example=i, part=1, score=0.5),
                     Segment(*l2, example=i, part=2, score=0.1)])
    write_shard_set(out, "ranked", rows, max_len=max_len, tokenizer_hash=tokenizer_hash(tok))
    return out


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def other_model_dir(tokenizer_dirs, tmp_path_factory):
    """Another tiny Llama (different init), same tokenizer: a --ref-model."""
    from irtrain.toy import tiny_llama

    return tiny_llama(tokenizer_dirs["chatml"], tmp_path_factory.mktemp("tiny-llama-ref"), seed=1)


@pytest.fixture(scope="module")
def pairs_dir(tok, tmp_path_factory):
    return write_pairs(tok, tmp_path_factory.mktemp("dpo") / "pairs", n=24)


@pytest.fixture(scope="module")
def unpaired_dir(tok, tmp_path_factory):
    return write_unpaired(tok, tmp_path_factory.mktemp("dpo") / "unpaired", n=16)


@pytest.fixture(scope="module")
def ranked_dir(tok, tmp_path_factory):
    return write_ranked(tok, tmp_path_factory.mktemp("dpo") / "ranked", n=8)


def load_model(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    m.config.use_cache = False
    return m.eval()


def perturbed(path, seed=0, scale=0.05):
    """The starting model with noise on every weight: a policy that differs from its reference."""
    m = load_model(path)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return m


def set_up(cfg, model, ref_dir=None):
    """The objective as the loop sets it up (check_data, setup), with `model` as the policy;
    reference caches are computed from the starting model cfg.model (a separate instance)."""
    obj = PreferenceObjective(cfg)
    sets = [ShardSet(d) for d in cfg.data]
    obj.check_data(sets)
    strategy = Strategy(cfg)
    start = Path(cfg.model)
    tok_hash = sets[0].tokenizer_hash

    def logps_for(s):
        key = ReferenceKey(model_hash(start), s.tokenizer_hash or tok_hash, s.content_hash)
        return ensure_reference(s, key, model_fn=lambda: load_model(start), strategy=strategy, token_budget=2048,
                                reference_dir=cfg.reference_dir)

    from transformers import AutoTokenizer

    ctx = TrainContext(cfg=cfg, strategy=strategy, data=PackedData(sets), model_path=start, out=Path(cfg.out),
                       tokenizer=AutoTokenizer.from_pretrained(str(start)), reference_logps_for=logps_for,
                       reference_model=lambda: pytest.fail("no resident reference model"))
    obj.setup(ctx)
    return obj, ctx


def alone(model, ids, labels):
    """logpi(y|x) of one sequence by its own unpadded forward, and |y|."""
    with torch.no_grad():
        st = response_token_stats(model(input_ids=ids[None], use_cache=False).logits, labels[None])
    return st.logps.double().sum(), st.logps.numel()


def separate(model, batch, segs):
    """[B, K] log-probs and lengths of the given segments, each by its own forward."""
    cu = batch.cu_seqlens
    lp, ln = torch.zeros(segs.shape, dtype=torch.float64), torch.zeros(segs.shape, dtype=torch.long)
    for (b, k), j in np.ndenumerate(segs):
        a, e = int(cu[j]), int(cu[j + 1])
        lp[b, k], ln[b, k] = alone(model, batch.input_ids[0, a:e], batch.labels[0, a:e])
    return lp, ln


def cfg_for(model, data, out, **kw):
    return load_config(DPOConfig, None, {"model": str(model), "data": [str(d) for d in data], "out": str(out),
                                         "tensorboard": False, **kw})


# --------------------------------------------------------------------------- 1-3. the objective's loss
CASES = [
    ("sigmoid", {}), ("sigmoid", {"label_smoothing": 0.2}), ("robust", {"label_smoothing": 0.1}), ("hinge", {"beta": 0.5}),
    ("ipo", {}), ("simpo", {"gamma": 0.3}), ("orpo", {"orpo_lambda": 0.2}), ("plackett_luce", {}),
    ("sigmoid", {"sft_coef": 0.7}), ("sigmoid", {"ref_model": "OTHER"}),
]


@pytest.fixture(scope="module")
def shared_refs(tmp_path_factory):
    """One reference-cache directory for the objective tests (the cache is keyed, so reusing it is safe)."""
    return tmp_path_factory.mktemp("refs")


@pytest.mark.parametrize("loss,kw", CASES, ids=[f"{l}-{'-'.join(kw) or 'default'}" for l, kw in CASES])
def test_objective_loss_equals_table_on_separate_logps(loss, kw, tiny_model_dir, other_model_dir, pairs_dir, shared_refs, tmp_path):
    """The micro-step loss of a packed micro-batch (2 rows, several pairs each, one forward)
    equals `PREFERENCE_LOSSES[loss]` on log-probs from separate unpadded forwards, with the
    reference from a LIVE reference model (the objective reads the precomputed cache)."""
    kw = {k: (str(other_model_dir) if v == "OTHER" else v) for k, v in kw.items()}
    cfg = cfg_for(tiny_model_dir, [pairs_dir], tmp_path / "o", loss=loss, reference_dir=str(shared_refs), **kw)
    policy = perturbed(tiny_model_dir)
    obj, ctx = set_up(cfg, policy)
    # no reference model stays resident after setup (with --ref-model, it was loaded and freed)
    gc.collect()
    own = {id(m) for m in policy.modules()}
    assert [type(o).__name__ for o in gc.get_objects() if issubclass(type(o), PreTrainedModel) and id(o) not in own] == []
    batch = ctx.data.batch([0, 1])
    ex = batch_examples(batch, [True], obj.row_lengths)
    assert ex.count >= 4 and list(ex.groups) == [2]
    obj.begin_step(0, [batch])
    D = obj.step_denominator([batch])
    assert D == ex.count
    loss_value, stats = obj.micro_step(policy, batch, D)

    segs = ex.groups[2]
    lp, ln = separate(policy, batch, segs)
    live_ref = load_model(kw.get("ref_model", tiny_model_dir))
    rp, _ = separate(live_ref, batch, segs)
    spec = PREFERENCE_LOSSES[loss]
    beta = cfg.orpo_lambda if loss == "orpo" else (cfg.beta or spec.default_beta)
    pb = PreferenceBatch(policy_logps=lp, ref_logps=rp, lengths=ln)
    expected = spec(pb, beta=beta, **{k: v for k, v in kw.items() if k in ("label_smoothing", "gamma")}).mean()
    if cfg.sft_coef:
        expected = expected + cfg.sft_coef * (-lp[:, 0].sum() / ln[:, 0].sum())
    torch.testing.assert_close(loss_value.double(), expected, rtol=1e-5, atol=1e-6)
    # the TRL-named metrics are the batch means of the same quantities
    s, c = stats["rewards/margins"]
    torch.testing.assert_close(torch.as_tensor(s / c, dtype=torch.float64), (beta * ((lp - rp)[:, 0] - (lp - rp)[:, 1])).mean(), rtol=1e-5, atol=1e-6)
    s, c = stats["logps/rejected"]
    torch.testing.assert_close(torch.as_tensor(s / c, dtype=torch.float64), lp[:, 1].mean(), rtol=1e-5, atol=1e-6)
    for key in ("rewards/chosen", "rewards/accuracies", "logps/chosen", "value/s0", "kl/k1", "kl/k2", "kl/k3", f"loss/{loss}"):
        assert key in stats, key


def test_packed_equals_separate_logps_and_gradients(tiny_model_dir, pairs_dir, shared_refs, tmp_path):
    """Per-sequence log-probs of chosen and rejected from ONE packed forward equal separate
    unpadded forwards (sdpa and eager), and so do the loss gradients."""
    from irtrain.train.packed import packed_forward

    batch = PackedData([ShardSet(pairs_dir)]).batch([0, 1, 2])
    for impl in ("sdpa", "eager"):
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), attn_implementation=impl, dtype=torch.float32).eval()
        with torch.no_grad():
            st = response_token_stats(packed_forward(m, batch), batch.labels)
        seg = torch.zeros(batch.num_segments, dtype=torch.float64).index_add_(0, batch.seg_id[st.index], st.logps.double())
        for j in range(batch.num_segments):
            a, e = int(batch.cu_seqlens[j]), int(batch.cu_seqlens[j + 1])
            torch.testing.assert_close(seg[j], alone(m, batch.input_ids[0, a:e], batch.labels[0, a:e])[0], rtol=1e-5, atol=1e-4)
    # gradients: packed objective vs the loss over separate forwards
    cfg = cfg_for(tiny_model_dir, [pairs_dir], tmp_path / "o", reference_dir=str(shared_refs))
    policy = perturbed(tiny_model_dir, seed=3)
    obj, ctx = set_up(cfg, policy)
    b = ctx.data.batch([0, 1])
    obj.begin_step(0, [b])
    loss, _ = obj.micro_step(policy, b, obj.step_denominator([b]))
    loss.backward()
    g_packed = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    segs = batch_examples(b, [True], obj.row_lengths).groups[2]
    cu = b.cu_seqlens
    lp = torch.stack([torch.stack([response_token_stats(policy(input_ids=b.input_ids[:, int(cu[j]):int(cu[j + 1])]).logits,
                                                        b.labels[:, int(cu[j]):int(cu[j + 1])]).logps.double().sum()
                                   for j in row]) for row in segs])
    rp, _ = separate(load_model(tiny_model_dir), b, segs)
    PREFERENCE_LOSSES["sigmoid"](PreferenceBatch(policy_logps=lp, ref_logps=rp), beta=0.1).mean().backward()
    for n, p in policy.named_parameters():
        torch.testing.assert_close(g_packed[n], p.grad, rtol=1e-4, atol=1e-7)


def test_ranked_losses_use_every_candidate(tiny_model_dir, ranked_dir, tmp_path):
    """infonca and plackett_luce on K = 3 ranked candidates: objective == table on separate forwards."""
    policy = perturbed(tiny_model_dir, seed=5)
    live_ref = load_model(tiny_model_dir)
    for loss in ("infonca", "plackett_luce"):
        cfg = cfg_for(tiny_model_dir, [ranked_dir], tmp_path / loss, loss=loss, infonca_alpha=0.5 if loss == "infonca" else 1e-3,
                      reference_dir=str(tmp_path / "refs"))
        obj, ctx = set_up(cfg, policy)
        b = ctx.data.batch([0, 1, 2])
        ex = batch_examples(b, [True], obj.row_lengths)
        assert list(ex.groups) == [3] and ex.count == 3
        obj.begin_step(0, [b])
        value, _ = obj.micro_step(policy, b, obj.step_denominator([b]))
        segs = ex.groups[3]
        lp, _ = separate(policy, b, segs)
        rp, _ = separate(live_ref, b, segs)
        scores = b.seg_score[torch.as_tensor(segs)].double()
        params = {"alpha": 0.5} if loss == "infonca" else {}
        expected = PREFERENCE_LOSSES[loss](PreferenceBatch(policy_logps=lp, ref_logps=rp, scores=scores if loss == "infonca" else None),
                                           beta=0.1, **params).mean()
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- KTO
def test_kto_z_from_mismatched_pairs(tiny_model_dir, unpaired_dir, tok, tmp_path):
    """KTO's mismatched sequences are prompt_i + response_(i+1) of the micro-batch; z and the
    loss equal the table function on separately computed policy and LIVE reference log-probs."""
    # reference: a noisier copy of the model (--ref-model), so the policy is the better one and z > 0
    ref_dir = tmp_path / "noisy"
    perturbed(tiny_model_dir, seed=7).save_pretrained(ref_dir)
    tok.save_pretrained(ref_dir)
    cfg = cfg_for(tiny_model_dir, [unpaired_dir], tmp_path / "o", loss="kto", global_batch=2, micro_batch=2, max_steps=2,
                  reference_dir=str(tmp_path / "refs"), desirable_weight=1.5, ref_model=str(ref_dir))
    policy = load_model(tiny_model_dir)
    obj, ctx = set_up(cfg, policy)
    assert obj.kto_refs is not None and list((tmp_path / "refs").glob("kto-mismatched-*.safetensors"))
    rows, _ = plan_micro_batches(cfg, ctx.data, 1, 0)[0]
    b = ctx.data.batch(rows)
    ex = batch_examples(b, [True], obj.row_lengths)
    segs = ex.groups[1][:, 0]
    B = len(segs)
    assert B >= 2
    # the mismatched sequences, token by token
    mm = mismatched_rows(b, segs)
    cu, ids, labels = b.cu_seqlens, b.input_ids[0].numpy(), b.labels[0].numpy()
    for i in range(B):
        a, e = int(cu[segs[i]]), int(cu[segs[i] + 1])
        a2, e2 = int(cu[segs[(i + 1) % B]]), int(cu[segs[(i + 1) % B] + 1])
        p = a + int(np.flatnonzero(labels[a:e] != -100)[0])
        r = a2 + int(np.flatnonzero(labels[a2:e2] != -100)[0])
        assert mm[i].input_ids.tolist() == ids[a:p].tolist() + ids[r:e2].tolist()
        assert (mm[i].labels[: p - a] == -100).all() and mm[i].labels[p - a :].tolist() == labels[r:e2].tolist()
        assert tok.decode(ids[a:p].tolist()).endswith("assistant\n")
    # objective loss == table on separate forwards
    obj.begin_step(0, [b])
    value, stats = obj.micro_step(policy, b, obj.step_denominator([b]))
    live_ref = load_model(ref_dir)
    lp, _ = separate(policy, b, segs[:, None])
    rp, _ = separate(live_ref, b, segs[:, None])
    mp = torch.stack([alone(policy, torch.from_numpy(r.input_ids.astype(np.int64)), torch.from_numpy(r.labels.astype(np.int64)))[0] for r in mm])
    mr = torch.stack([alone(live_ref, torch.from_numpy(r.input_ids.astype(np.int64)), torch.from_numpy(r.labels.astype(np.int64)))[0] for r in mm])
    labels_b = b.seg_score[torch.as_tensor(segs)] > 0.5
    assert labels_b.any() and (~labels_b).any()
    pb = PreferenceBatch(policy_logps=lp, ref_logps=rp, labels=labels_b, mismatched_policy_logps=mp, mismatched_ref_logps=mr)
    expected = PREFERENCE_LOSSES["kto"](pb, beta=0.1, desirable_weight=1.5).mean()
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    z = float((mp - mr).mean().clamp(min=0))
    assert float(stats["kto/z"][0] / stats["kto/z"][1]) == pytest.approx(z, rel=1e-5, abs=1e-7)
    assert z > 0  # not clamped: the test sees z itself


# --------------------------------------------------------------------------- bad input: one line, nothing written
def dpo(*args):
    return runner.invoke(app, ["dpo", *map(str, args)])


def assert_refused(result, out, pattern):
    assert result.exit_code == 1, result.output
    msg = result.output.strip()
    assert len(msg.splitlines()) == 1 and msg.startswith("error:"), msg
    assert pattern in msg, msg
    assert not Path(out).exists(), "nothing may be written"


def test_bad_input(tiny_model_dir, other_model_dir, pairs_dir, unpaired_dir, tok, tmp_path):
    out = tmp_path / "out"
    base = ["--model", tiny_model_dir, "--out", out, "--global-batch", "2", "--max-steps", "1", "--no-tensorboard"]
    # preference shards missing their rejected side
    broken = write_pairs(tok, tmp_path / "broken", n=4, drop_rejected_of=2)
    assert_refused(dpo(*base, broken), out, "has no rejected response")
    # kto on paired data, and a paired loss on unpaired data
    assert_refused(dpo(*base, "--loss", "kto", pairs_dir), out, "kto trains on unpaired shards")
    assert_refused(dpo(*base, unpaired_dir), out, "sigmoid trains on preference shards")
    # --reference-free with a loss that needs a reference
    assert_refused(dpo(*base, "--reference-free", pairs_dir), out, "the sigmoid loss needs a reference")
    # batch size 1 with kto (one example per micro-batch)
    single = write_unpaired(tok, tmp_path / "single", n=6, packed=False)
    assert_refused(dpo(*base, "--loss", "kto", "--micro-batch", "1", single), out, "kto needs at least 2 examples per micro-batch")
    # a parameter the loss does not take
    assert_refused(dpo(*base, "--loss", "hinge", "--label-smoothing", "0.1", pairs_dir), out, "--label-smoothing")
    # a reference file made for another model: model B's cache put where model A's belongs
    data = tmp_path / "pairs-copy"
    shutil.copytree(pairs_dir, data, ignore=shutil.ignore_patterns("reference"))
    s = ShardSet(data)
    key_a = ReferenceKey(model_hash(tiny_model_dir), s.tokenizer_hash, s.content_hash)
    key_b = ReferenceKey(model_hash(other_model_dir), s.tokenizer_hash, s.content_hash)
    ensure_reference(s, key_b, model_fn=lambda: load_model(other_model_dir), strategy=Strategy(cfg_for(tiny_model_dir, [data], out)),
                     token_budget=2048)
    default_path(s, key_b).rename(default_path(s, key_a))
    assert_refused(dpo(*base, data), out, "reference log-probs were made for another model")
    with pytest.raises(ReferenceMismatchError):
        from irtrain.train.reference import ReferenceLogps

        ReferenceLogps.load(default_path(s, key_a), expect=key_a)
    # --ref-model that does not exist
    assert_refused(dpo(*base, "--ref-model", tmp_path / "nope", pairs_dir), out, "--ref-model")


def test_config_errors():
    with pytest.raises(ConfigError, match="orpo has no beta"):
        PreferenceObjective(DPOConfig(loss="orpo", beta=0.3))
    with pytest.raises(ConfigError, match="--reference-free and --ref-model"):
        PreferenceObjective(DPOConfig(loss="simpo", reference_free=True, ref_model="x"))
    with pytest.raises(ConfigError, match=r"must be in \[0, 0.5\)"):
        PreferenceObjective(DPOConfig(loss="robust", label_smoothing=0.5))
    assert PreferenceObjective(DPOConfig(loss="simpo")).loss.beta == 2.0
    assert PreferenceObjective(DPOConfig(loss="orpo", orpo_lambda=0.3)).loss.beta == 0.3
    assert PreferenceObjective(DPOConfig(loss="ipo", beta=0.2)).loss.beta == 0.2


# --------------------------------------------------------------------------- it runs end to end: metrics, reuse, no resident ref
def test_run_metrics_reference_reuse_and_ref_model(tiny_model_dir, other_model_dir, pairs_dir, tmp_path):
    """Through `irtrain dpo`: TRL-named metrics + value/s0 + KL every step; the reference cache is
    written beside the shards once and reused by a second run; --ref-model caches under its own key."""
    args = ["--model", tiny_model_dir, "--lr", "1e-3", "--global-batch", "4", "--micro-batch", "2", "--max-steps", "2",
            "--no-tensorboard", pairs_dir]
    r = dpo("--out", tmp_path / "a", *args)
    assert r.exit_code == 0, r.output
    steps = [m for m in read_metrics(tmp_path / "a") if "loss" in m]
    assert len(steps) == 2
    for m in steps:
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen", "logps/rejected",
                    "value/s0", "kl/k1", "kl/k2", "kl/k3", "loss/sigmoid", "grad_norm", "tokens_per_s"):
            assert isinstance(m.get(key), float | int), key
    assert steps[0]["loss"] == pytest.approx(np.log(2), abs=1e-4) and abs(steps[0]["kl/k1"]) < 1e-4
    caches = sorted((Path(pairs_dir) / "reference").glob("*.safetensors"))
    assert caches
    stamp = {p: p.stat().st_mtime_ns for p in caches}
    r = dpo("--out", tmp_path / "b", *args)
    assert r.exit_code == 0, r.output
    assert {p: p.stat().st_mtime_ns for p in caches} == stamp  # reused, not recomputed
    np.testing.assert_allclose([m["loss"] for m in read_metrics(tmp_path / "b") if "loss" in m], [m["loss"] for m in steps], rtol=1e-6)
    r = dpo("--out", tmp_path / "c", "--ref-model", other_model_dir, *args)
    assert r.exit_code == 0, r.output
    assert len(list((Path(pairs_dir) / "reference").glob("*.safetensors"))) == len(caches) + 1
    first = [m for m in read_metrics(tmp_path / "c") if "loss" in m][0]
    assert abs(first["kl/k1"]) > 1e-2  # against another model, the KL is not 0 at the start


# --------------------------------------------------------------------------- 4. it learns (real prepare output, the real CLI)
def out_of_range_pairs(problems, seed):
    """The project's arithmetic task (irtrain.tasks) with one planted error: the rejected answer
    keeps every worked step but ends with a number outside the task's range of values (30-39)."""
    from irtrain.tasks import ANSWER_PREFIX, STEP_DELIMITER

    rng = random.Random(seed)
    return [{"prompt": p.prompt, "chosen": p.messages(),
             "rejected": p.messages(STEP_DELIMITER.join(p.steps() + [f"{ANSWER_PREFIX}{rng.randint(30, 39)}"]))} for p in problems]


def test_it_learns(tiny_model_dir, tmp_path):
    """`irtrain dpo` (the real CLI) on `irtrain prepare` shards of a generated preference task
    raises held-out rewards/accuracies to >= 0.9 in 12 steps. At step 0 the policy is its
    reference, every margin is exactly 0 and TRL's metric reads 0 (ties count as wrong); the
    chance level, i.e. how often the starting model already prefers the chosen answer, is ~0.5."""
    from irtrain.evaluation import preference_pairs
    from irtrain.tasks import generate_problems, write_jsonl
    from irtrain.train.reference import sequence_logps

    problems = generate_problems(96 + 48, seed=11)
    data = {}
    for name, rows in (("train", out_of_range_pairs(problems[:96], 1)), ("heldout", out_of_range_pairs(problems[96:], 2))):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        r = runner.invoke(app, ["prepare", str(tmp_path / f"{name}.jsonl"), "--out", str(tmp_path / name), "--tokenizer",
                                str(tiny_model_dir), "--format", "preference", "--max-len", "512"])
        assert r.exit_code == 0, r.output
        data[name] = tmp_path / name
    assert ShardSet(data["train"]).format == "preference"
    # chance level: the starting model's own preference between chosen and rejected
    held = ShardSet(data["heldout"])
    start = load_model(tiny_model_dir)
    seg = np.concatenate([s for _, _, s, _ in sequence_logps(start, held, device=torch.device("cpu"), token_budget=4096)])
    chosen, rejected = preference_pairs(held)
    chance = float((seg[chosen] > seg[rejected]).mean())

    out = tmp_path / "run"
    r = dpo("--model", tiny_model_dir, "--out", out, "--lr", "3e-3", "--beta", "0.5", "--global-batch", "4", "--micro-batch", "4",
            "--max-steps", "12", "--warmup-ratio", "0.1", "--eval-pairs", data["heldout"], "--no-tensorboard", data["train"])
    assert r.exit_code == 0, r.output
    evals = [m for m in read_metrics(out) if "eval/rewards/accuracies" in m]
    assert [m["step"] for m in evals] == [0, 12]
    before, after = evals[0], evals[-1]
    print(f"held-out rewards/accuracies: step 0 {before['eval/rewards/accuracies']:.3f} (margins {before['eval/rewards/margins']:.2g}; "
          f"starting model prefers chosen on {chance:.3f}) -> step 12 {after['eval/rewards/accuracies']:.3f}; "
          f"eval/loss {before['eval/loss']:.3f} -> {after['eval/loss']:.3f}")
    assert 0.3 <= chance <= 0.7
    assert abs(before["eval/rewards/margins"]) < 1e-4 and before["eval/loss"] == pytest.approx(np.log(2), abs=1e-4)
    assert after["eval/rewards/accuracies"] >= 0.9
    assert after["eval/loss"] < 0.3 and after["eval/pref_accuracy"] >= 0.9
    assert (out / "checkpoint-0000012" / "model.safetensors").is_file()
