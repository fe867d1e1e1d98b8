"""`irtrain.evaluation`: the one held-out preference path (FORMULAS.md "Implicit-reward metrics")."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import irtrain.train.loop as loop
from irtrain.config import DPOConfig, load_config
from irtrain.dpo import run as dpo_run
from irtrain.evaluation import pair_metrics, preference_pairs, segment_logps_of
from irtrain.shards import Segment, ShardSet, write_shard_set
from irtrain.train.batching import PackedData
from irtrain.train.metrics import read_metrics
from irtrain.train.reference import eval_token_budget, row_schedule, sequence_logps

from test_dpo import load_model, pairs_dir, tok, write_pairs  # noqa: F401  (fixtures)


def test_pair_metrics_hand_values():
    # segments 0..3: two pairs (0, 1) and (3, 2); beta 0.5
    policy = np.array([-5.0, -8.0, -2.0, -1.0])
    ref = np.array([-6.0, -7.0, -1.0, -3.0])
    pm = pair_metrics(policy, np.array([0, 3]), np.array([1, 2]), reference=ref, beta=0.5)
    # pair 1: 0.5 ((-5 + 6) - (-8 + 7)) = 1.0; pair 2: 0.5 ((-1 + 3) - (-2 + 1)) = 1.5
    assert pm.logp_margin.tolist() == [3.0, 1.0]
    assert pm.margin is not None and pm.margin.tolist() == [1.0, 1.5]
    assert pm.loss is not None and pm.loss.tolist() == pytest.approx([math.log1p(math.exp(-1.0)), math.log1p(math.exp(-1.5))], abs=1e-15)
    assert pm.correct is not None and pm.correct.tolist() == [1.0, 1.0]
    flipped = pair_metrics(policy, np.array([1, 2]), np.array([0, 3]), reference=ref, beta=0.5)
    assert flipped.correct is not None and flipped.correct.tolist() == [0.0, 0.0]
    assert pair_metrics(policy, np.array([0]), np.array([1]), beta=0.5).margin is None  # no reference: log-probs only


def test_preference_pairs_by_example(tmp_path):
    seg = lambda ex, part: Segment([1, 2, 3], [-100, 2, 3], example=ex, part=part)  # noqa: E731
    # rows in any order; example 5 has no rejected side
    write_shard_set(tmp_path / "s", "preference", [[seg(7, 0), seg(7, 1)], [seg(5, 0)], [seg(2, 0), seg(2, 1)]], max_len=8)
    chosen, rejected = preference_pairs(ShardSet(tmp_path / "s"))
    assert chosen.tolist() == [3, 0] and rejected.tolist() == [4, 1]  # by example id: 2, then 7


def test_segment_logps_of_is_the_sequence_pass(tiny_model_dir, pairs_dir):  # noqa: F811
    shards = ShardSet(pairs_dir)
    model = load_model(tiny_model_dir)
    got = segment_logps_of(model, shards, token_budget=700)
    want = np.concatenate([s for _, _, s, _ in sequence_logps(model, shards, device=torch.device("cpu"), token_budget=700)])
    counts = np.concatenate([c for _, _, _, c in sequence_logps(model, shards, device=torch.device("cpu"), token_budget=700)])
    assert got.logps.tolist() == want.tolist() and got.lengths.tolist() == counts.astype(float).tolist()
    assert (got.lengths.numpy() == shards.shards[0].segment_response_tokens).all()


def test_a_dpo_eval_runs_the_policy_over_the_pairs_once(tiny_model_dir, tok, tmp_path, monkeypatch):  # noqa: F811
    """With --eval-pairs, each evaluation of a dpo run is ONE pass of the policy over the pairs
    (the loop's eval/pref_* and dpo's eval/rewards/* and eval/loss share it): forwards counted
    by a hook on the decoder, against the number of forward batches of one pass."""
    train = write_pairs(tok, tmp_path / "train", n=8)
    held = write_pairs(tok, tmp_path / "held", n=12, seed=5)
    cfg = load_config(DPOConfig, None, {"model": str(tiny_model_dir), "data": [str(train)], "out": str(tmp_path / "o"),
                                        "global_batch": 4, "micro_batch": 2, "max_steps": 2, "eval_pairs": str(held),
                                        "eval_steps": 1, "tensorboard": False, "reference_dir": str(tmp_path / "refs")})
    original = loop.evaluate_held_out
    forwards: list[int] = []

    def counted(model, objective, ctx, eval_set, eval_ref):
        n = [0]
        decoder = model.get_decoder()
        handle = decoder.register_forward_hook(lambda *_: n.__setitem__(0, n[0] + 1))
        try:
            return original(model, objective, ctx, eval_set, eval_ref)
        finally:
            handle.remove()
            forwards.append(n[0])

    monkeypatch.setattr(loop, "evaluate_held_out", counted)
    dpo_run(cfg)
    shards = ShardSet(held)
    budget = max(eval_token_budget(cfg, PackedData([ShardSet(train)])), int(shards.row_lengths.max()))
    one_pass = len(row_schedule(shards.row_lengths, budget, 1, 0))
    assert one_pass >= 2
    assert forwards == [one_pass] * 3  # steps 0, 1, 2
    evals = [m for m in read_metrics(tmp_path / "o") if "eval/pref_accuracy" in m]
    assert [m["step"] for m in evals] == [0, 1, 2]
    for m in evals:  # both families of metrics, from the one pass
        assert {"eval/pref_loss", "eval/loss", "eval/rewards/accuracies", "eval/logps/chosen"} <= set(m)
    # at step 0 the policy is the reference for both: the same loss (DPO at margin 0 is log 2)
    assert evals[0]["eval/pref_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
