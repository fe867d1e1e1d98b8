"""`irtrain.train.metrics`: metrics.jsonl (one JSON object per logged step, non-finite values
as strings, trimmed on resume) and `read_metrics`. (The progress display: test_display.py.)"""
from __future__ import annotations

import math

import numpy as np
import pytest

from irtrain.train.metrics import MetricsLog, read_metrics


def test_jsonl_rows_and_non_finite_values(tmp_path):
    """One line per `log` call, `step` first, then the metrics in order; NaN and +-inf are
    written as the strings "nan", "inf", "-inf" (JSON has no such numbers), which is what
    the loop's non-finite steps show; numpy floats are floats."""
    log = MetricsLog(tmp_path, enabled=True)
    log.log(1, {"loss": 0.5, "lr": 1e-3, "tokens": 12})
    log.log(2, {"loss": float("nan"), "grad_norm": math.inf, "kl/k1": -math.inf, "skipped": True, "x": np.float64("nan")})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert lines == ['{"step": 1, "loss": 0.5, "lr": 0.001, "tokens": 12}',
                     '{"step": 2, "loss": "nan", "grad_norm": "inf", "kl/k1": "-inf", "skipped": true, "x": "nan"}']
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 0.5, "lr": 0.001, "tokens": 12},
                                      {"step": 2, "loss": "nan", "grad_norm": "inf", "kl/k1": "-inf", "skipped": True, "x": "nan"}]
    assert not (tmp_path / "tensorboard").exists()  # no trackers given


def test_rows_reach_the_file_at_once(tmp_path):
    """Each row is flushed when logged: a run killed mid-way leaves every logged step."""
    log = MetricsLog(tmp_path, enabled=True)
    log.log(3, {"loss": 1.25})
    assert read_metrics(tmp_path) == [{"step": 3, "loss": 1.25}]
    log.close()


def test_resume_drops_rows_after_the_checkpoint_and_a_new_run_starts_afresh(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for step in range(6):  # step 0: an evaluation before training
        log.log(step, {"loss": float(step)})
    log.close()
    # resumed from the checkpoint of step 3: rows 4 and 5 (written after it) go, the rest stay
    log = MetricsLog(tmp_path, enabled=True, resume_step=3)
    assert [m["step"] for m in read_metrics(tmp_path)] == [0, 1, 2, 3]
    log.log(4, {"loss": 40.0})
    log.close()
    assert read_metrics(tmp_path) == [{"step": s, "loss": float(s)} for s in range(4)] + [{"step": 4, "loss": 40.0}]
    # a new run (not resumed) in the same directory starts an empty file
    log = MetricsLog(tmp_path, enabled=True)
    assert read_metrics(tmp_path) == []
    log.close()


def test_disabled_log_writes_nothing_and_keeps_what_is_there(tmp_path):
    """Not the main rank: no file is created, and another rank's file is left alone."""
    log = MetricsLog(tmp_path / "a", enabled=False)
    log.log(1, {"loss": 1.0})
    log.close()
    assert not (tmp_path / "a").exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n', encoding="utf-8")
    for resume in (None, 0):
        log = MetricsLog(tmp_path, enabled=False, resume_step=resume)
        log.log(2, {"loss": 3.0})
        log.close()
    assert read_metrics(tmp_path) == [{"step": 1, "loss": 2.0}]


def test_a_torn_last_line_is_dropped_on_resume(tmp_path):
    """A crash or a full disk mid-write leaves a last line without its end: reading and
    resuming skip it (instead of a JSONDecodeError); a bad line elsewhere names the file and line."""
    from irtrain.errors import IrtrainIOError

    log = MetricsLog(tmp_path, enabled=True)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.close()
    path = tmp_path / "metrics.jsonl"
    path.write_text(path.read_text() + '{"step": 4, "lo')  # torn
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3]
    log = MetricsLog(tmp_path, enabled=True, resume_step=3)
    log.log(4, {"loss": 4.0})
    log.close()
    assert [m["step"] for m in read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert path.read_text().endswith('"loss": 4.0}\n')
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    with pytest.raises(IrtrainIOError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)
