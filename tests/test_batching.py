"""`irtrain.train.batching`: the deterministic data plan, the per-rank micro-batch split, and
the padding-free `collate` / `PackedData` the loop feeds the model."""
from __future__ import annotations

import numpy as np
import pytest

from irtrain.errors import ConfigError
from irtrain.shards import Row
from irtrain.train.batching import collate, epoch_order, plan_steps, split_step


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
