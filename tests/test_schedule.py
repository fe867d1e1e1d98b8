"""`irtrain.train.schedule`: the learning rate as a pure function of the step."""
from __future__ import annotations

import math

import pytest

from irtrain.train.schedule import lr_at, warmup_steps


def test_lr_schedule():
    total, peak = 100, 1.0
    w = warmup_steps(total, 0.1)
    assert w == 10
    lrs = [lr_at(s, total_steps=total, peak=peak, warmup=w, schedule="cosine") for s in range(total)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0) and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 1e-3
    lin = [lr_at(s, total_steps=total, peak=peak, warmup=0, schedule="linear") for s in range(total)]
    assert lin[0] == 1.0 and lin[50] == pytest.approx(0.5)
    assert lr_at(77, total_steps=total, peak=2.0, warmup=0, schedule="constant") == 2.0


def test_lr_values_by_hand():
    """4 steps, 1 of warmup, peak 2: warmup step 0 is peak * 1/1; after it, progress
    (step - 1) / 3 gives cosine 2, 1.5, 0.5 and linear 2, 4/3, 2/3."""
    assert warmup_steps(4, 0.25) == 1
    cos = [lr_at(s, total_steps=4, peak=2.0, warmup=1, schedule="cosine") for s in range(4)]
    assert cos == pytest.approx([2.0, 2.0, 2.0 * 0.5 * (1 + math.cos(math.pi / 3)), 2.0 * 0.5 * (1 + math.cos(2 * math.pi / 3))])
    assert cos[2] == pytest.approx(1.5) and cos[3] == pytest.approx(0.5)
    lin = [lr_at(s, total_steps=4, peak=2.0, warmup=1, schedule="linear") for s in range(4)]
    assert lin == pytest.approx([2.0, 2.0, 4 / 3, 2 / 3])
    # warmup is linear from peak/warmup: 3 warmup steps of peak 0.3 -> 0.1, 0.2, 0.3
    assert [lr_at(s, total_steps=10, peak=0.3, warmup=3, schedule="constant") for s in range(4)] == pytest.approx([0.1, 0.2, 0.3, 0.3])
    # a one-step run without warmup trains at the peak; beyond the end, no negative lr
    assert lr_at(0, total_steps=1, peak=1e-3, warmup=0, schedule="cosine") == 1e-3
    assert lr_at(9, total_steps=4, peak=1.0, warmup=0, schedule="linear") == 0.0


def test_warmup_rounds_and_unknown_schedule_is_an_error():
    assert [warmup_steps(n, 0.1) for n in (4, 5, 6, 15, 100)] == [0, 0, 1, 2, 10]  # round half to even: 0.5 -> 0
    assert warmup_steps(7, 0.0) == 0
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        lr_at(5, total_steps=10, peak=1.0, warmup=0, schedule="step")
