"""`irtrain.train.batching`: the deterministic data plan, the per-rank micro-batch split, and
the padding-free `collate` / `PackedData` the loop feeds the model."""
from __future__ import annotations

import numpy as np
import pytest

from irtrain.errors import ConfigError
from irtrain.shards import Row
from irtrain.train.batching import collate, epoch_order, mixture_sources, plan_steps, split_step


def test_plan_is_deterministic_and_covers_each_epoch():
    lengths = np.arange(10, 30)
    a = plan_steps(lengths, global_batch=4, seed=3, epochs=2)
    b = plan_steps(lengths, global_batch=4, seed=3, epochs=2)
    assert len(a) == 10 and all((x == y).all() for x, y in zip(a, b))
    first, second = np.concatenate(a[:5]), np.concatenate(a[5:])
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert not (first == second).all()  # each epoch has its own order
    assert (np.concatenate(a) == np.concatenate([epoch_order(20, 3, 0), epoch_order(20, 3, 1)])).all()
    # a longer run starts with the same steps (resume may extend --max-steps)
    longer = plan_steps(lengths, global_batch=4, seed=3, max_steps=12)
    assert all((x == y).all() for x, y in zip(a, longer))
    with pytest.raises(ConfigError, match="no complete optimizer step"):
        plan_steps(lengths, global_batch=64, seed=0, epochs=1)


def test_plan_by_tokens():
    lengths = np.full(50, 10)
    steps = plan_steps(lengths, global_batch=0, global_batch_tokens=35, seed=0, epochs=1)
    assert all(len(s) == 4 for s in steps) and len(steps) == 12  # 4 rows reach 35 tokens; 2 rows left over
    assert len(set(np.concatenate(steps).tolist())) == 48


def test_split_step_ranks_and_micro_batches():
    lengths = np.array([5, 50, 7, 20, 9, 30, 11, 3])
    rows = np.arange(8)
    # row budget: contiguous equal slices, micro-batches of 2 rows
    r0 = split_step(rows, lengths, world_size=2, rank=0, micro_batch=2)
    r1 = split_step(rows, lengths, world_size=2, rank=1, micro_batch=2)
    assert [m for m, _ in r0] == [[0, 1], [2, 3]] and [m for m, _ in r1] == [[4, 5], [6, 7]]
    # token budget: balanced ranks, equal micro-batch counts, fillers weigh 0
    parts = [split_step(rows, lengths, world_size=2, rank=k, micro_batch_tokens=40, by_tokens=True) for k in range(2)]
    assert len(parts[0]) == len(parts[1])
    real = sorted(g for p in parts for m, w in p if w for g in m)
    assert real == list(range(8))
    loads = [sum(int(lengths[g]) for m, w in p if w for g in m) for p in parts]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    for p in parts:
        for m, w in p:
            assert w == 0.0 or sum(int(lengths[g]) for g in m) <= 40 or len(m) == 1
    with pytest.raises(ConfigError, match="divisible"):
        split_step(np.arange(6), lengths, world_size=4, rank=0)


def test_split_step_token_budget_by_hand():
    """Lengths [50, 30, 20, 10] over 2 ranks by tokens: longest first to the least loaded
    rank (ties to the lower rank) gives rank 0 rows 0, 3 (60 tokens) and rank 1 rows 1, 2
    (50). 40-token micro-batches: [0], [3] and [1], [2]. 50-token micro-batches: [0], [3]
    and [1, 2], so rank 1 repeats its first row with weight 0 to match rank 0's count."""
    lengths = np.array([50, 30, 20, 10])
    rows = np.arange(4)
    r0 = split_step(rows, lengths, world_size=2, rank=0, micro_batch_tokens=40, by_tokens=True)
    r1 = split_step(rows, lengths, world_size=2, rank=1, micro_batch_tokens=40, by_tokens=True)
    assert r0 == [([0], 1.0), ([3], 1.0)]
    assert r1 == [([1], 1.0), ([2], 1.0)]
    r0 = split_step(rows, lengths, world_size=2, rank=0, micro_batch_tokens=50, by_tokens=True)
    r1 = split_step(rows, lengths, world_size=2, rank=1, micro_batch_tokens=50, by_tokens=True)
    assert r0 == [([0], 1.0), ([3], 1.0)]
    assert r1 == [([1, 2], 1.0), ([1], 0.0)]


def _row(ids, labels, cu, example, part, score):
    return Row(input_ids=np.array(ids), labels=np.array(labels), position_ids=np.concatenate([np.arange(b - a) for a, b in zip(cu, cu[1:])]),
               cu_seqlens=np.array(cu), seg_example=np.array(example), seg_part=np.array(part), seg_score=np.array(score))


def test_collate_concatenates_rows_padding_free():
    """Two rows of 2 and 1 segments -> one [1, 7] sequence of 3 segments: boundaries shift by
    the first row's length, positions restart per segment, seg_id names each token's segment."""
    a = _row([1, 2, 3, 4], [-100, 2, -100, 4], [0, 2, 4], [7, 8], [0, 1], [1.0, 0.0])
    b = _row([5, 6, 7], [-100, 6, 7], [0, 3], [9], [0], [0.5])
    batch = collate([a, b], ids=[(0, 3), (1, 0)], weight=0.0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7]]
    assert batch.labels.tolist() == [[-100, 2, -100, 4, -100, 6, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 0, 1, 0, 1, 2]]
    assert batch.cu_seqlens.tolist() == [0, 2, 4, 7] and batch.max_seqlen == 3
    assert batch.seg_id.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert batch.seg_example.tolist() == [7, 8, 9] and batch.seg_part.tolist() == [0, 1, 0]
    assert batch.seg_score.tolist() == [1.0, 0.0, 0.5]
    assert batch.num_tokens == 7 and batch.num_segments == 3
    assert batch.segment_response_tokens().tolist() == [1, 1, 2]
    assert batch.rows == [(0, 3), (1, 0)] and batch.weight == 0.0
    with pytest.raises(ValueError):
        collate([])


# --------------------------------------------------------------------------- mixtures (--weights) and --global-batch-docs
def test_mixture_sources_stay_within_one_row_of_their_share():
    w = [0.5, 0.3, 0.2]
    src = mixture_sources(w, 10_000)
    counts = np.zeros(3)
    for i, k in enumerate(src):
        counts[k] += 1
        assert np.all(np.abs(counts - (i + 1) * np.asarray(w)) <= 1.0 + 1e-9), (i, counts)
    # unnormalised weights mean the same; a lone source takes every row
    assert (mixture_sources([5, 3, 2], 1000) == src[:1000]).all()
    assert (mixture_sources([1.0], 7) == 0).all()


def test_weighted_plan_realises_the_proportions_over_1000_steps():
    """3 sources of 40, 25 and 10 rows at 0.5 / 0.3 / 0.2, 1,000 steps of 8 rows: within 1% of
    the weights (exact to one row), each source's epochs are permutations of its own rows, and
    the plan is a pure function of the seed (a resumed run rebuilds the same steps)."""
    sizes = [40, 25, 10]
    lengths = np.full(sum(sizes), 10)
    steps = plan_steps(lengths, global_batch=8, seed=5, max_steps=1000, sizes=sizes, weights=[0.5, 0.3, 0.2])
    rows = np.concatenate(steps)
    starts = np.cumsum([0] + sizes)
    src = np.searchsorted(starts, rows, side="right") - 1
    frac = np.bincount(src, minlength=3) / len(rows)
    np.testing.assert_allclose(frac, [0.5, 0.3, 0.2], atol=0.01)
    assert np.all(np.abs(np.bincount(src, minlength=3) - len(rows) * np.array([0.5, 0.3, 0.2])) <= 1)
    for k, n in enumerate(sizes):  # each source: whole epochs of its own permutation, one after the other
        mine = rows[src == k] - starts[k]
        for e in range(len(mine) // n):
            assert sorted(mine[e * n:(e + 1) * n].tolist()) == list(range(n))
        assert (mine[:n] == epoch_order(n, 5, 0, source=k)).all()
    again = plan_steps(lengths, global_batch=8, seed=5, max_steps=1000, sizes=sizes, weights=[0.5, 0.3, 0.2])
    assert all((a == b).all() for a, b in zip(steps, again))
    other = plan_steps(lengths, global_batch=8, seed=6, max_steps=1000, sizes=sizes, weights=[0.5, 0.3, 0.2])
    assert not all((a == b).all() for a, b in zip(steps, other))
    # --epochs with weights: as many rows as that many epochs of the concatenated sources
    by_epochs = plan_steps(lengths, global_batch=5, seed=5, epochs=2, sizes=sizes, weights=[0.5, 0.3, 0.2])
    assert len(by_epochs) == 2 * sum(sizes) // 5
    with pytest.raises(ConfigError, match="--weights gives 2 weight"):
        plan_steps(lengths, global_batch=8, seed=5, max_steps=10, sizes=sizes, weights=[0.5, 0.5])


def test_unweighted_plan_is_unchanged_by_sources():
    """Without weights the sources are concatenated, as before (old runs resume on the same plan)."""
    lengths = np.arange(10, 40)
    a = plan_steps(lengths, global_batch=4, seed=3, epochs=2)
    b = plan_steps(lengths, global_batch=4, seed=3, epochs=2, sizes=[10, 20])
    assert all((x == y).all() for x, y in zip(a, b))


def test_plan_by_documents_is_exact():
    """Rows of 1 to 6 documents, steps of 16 documents: every step holds exactly 16 (the
    remainder filled from the rows ahead), and the rows are used as often as the epochs say."""
    rng = np.random.default_rng(0)
    docs = rng.integers(1, 7, size=300)
    lengths = docs * 20
    steps = plan_steps(lengths, global_batch=0, global_batch_docs=16, documents=docs, seed=1, epochs=1)
    assert all(int(docs[s].sum()) == 16 for s in steps), [int(docs[s].sum()) for s in steps if int(docs[s].sum()) != 16]
    used = np.concatenate(steps)
    # each position of the stream is used once; near the epoch's end a row taken ahead can come
    # from the next epoch's order (and is then skipped there)
    assert len(used) - len(set(used.tolist())) <= 2
    assert len(used) >= 300 - 16  # at most the rows of one incomplete step are left
    long = np.concatenate(plan_steps(lengths, global_batch=0, global_batch_docs=16, documents=docs, seed=1, epochs=4))
    counts = np.bincount(long, minlength=300)
    assert counts.min() >= 3 and counts.max() <= 5 and abs(len(long) - 1200) <= 16
    # rows bigger than the budget can only overshoot, and say so by their count
    big = plan_steps(np.full(10, 5), global_batch=0, global_batch_docs=3, documents=np.full(10, 4), seed=0, epochs=1)
    assert all(len(s) == 1 for s in big)
    with pytest.raises(ConfigError, match="--global-batch-tokens and --global-batch-docs"):
        plan_steps(lengths, global_batch=0, global_batch_tokens=100, global_batch_docs=16, documents=docs)
    with pytest.raises(ConfigError, match="--global-batch-docs 5000 is more than"):
        plan_steps(lengths, global_batch=0, global_batch_docs=5000, documents=docs, epochs=1)


def test_row_documents_counts_examples_not_segments(tmp_path):
    """A preference row holds each pair as two segments of one example: one document."""
    from irtrain.shards import Segment, ShardSet, write_shard_set
    from irtrain.train.batching import PackedData, row_documents

    rows = [[Segment([1, 2, 3], [-100, 2, 3], example=0, part=0), Segment([1, 2, 4], [-100, 2, 4], example=0, part=1),
             Segment([1, 5], [-100, 5], example=1, part=0), Segment([1, 6], [-100, 6], example=1, part=1)],
            [Segment([1, 7, 8], [-100, 7, 8], example=2, part=0), Segment([1, 9], [-100, 9], example=2, part=1)]]
    write_shard_set(tmp_path / "p", "preference", rows, max_len=16, tokenizer_hash="x")
    shards = ShardSet(tmp_path / "p")
    assert row_documents(shards).tolist() == [2, 1]
    assert PackedData([shards, shards]).documents.tolist() == [2, 1, 2, 1]
