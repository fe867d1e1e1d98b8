"""Metrics out: one JSON object per logged step in ``OUT/metrics.jsonl`` and the same step on the
trackers of --report-to (trackers.py, TRL's names). (What the terminal or a log file shows is
`irtrain.display`.)"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from irtrain.durable import publish
from irtrain.errors import IrtrainIOError
from irtrain.train.trackers import Trackers


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them readable
    return v


class MetricsLog:
    """Append-only metrics.jsonl (main rank only), each row also sent to `trackers` (opened by
    the caller, closed here). On resume, entries after the checkpoint's step are dropped
    first, so the file reads as one uninterrupted run."""

    def __init__(self, out: Path, *, enabled: bool, resume_step: int | None = None, trackers: Trackers | None = None):
        self.path = out / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = trackers
        if not enabled:
            return
        if resume_step is not None and self.path.is_file():
            keep = [ln for ln, row in _rows(self.path) if row.get("step", 0) <= resume_step]
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
            publish(tmp, self.path)
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self._f = open(self.path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()
        if self.trackers is not None:
            self.trackers.log(step, metrics)

    def close(self, status: str = "FINISHED") -> None:
        """`status`: how the run ended, for the trackers (FINISHED, KILLED by a signal, FAILED)."""
        if self.trackers is not None:
            self.trackers.close(status)
        if not self.enabled:
            return
        self._f.close()


def _rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, row) of every complete line of a metrics file. A last line cut short (a crash or a
    full disk mid-write) is left out; a bad line anywhere else is an error naming it."""
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    out = []
    for i, ln in enumerate(lines):
        if not ln.strip():
            continue
        try:
            out.append((ln, json.loads(ln)))
        except ValueError:
            if i == len(lines) - 1:  # no newline after it: the write was torn
                continue
            raise IrtrainIOError(f"{path}:{i + 1}: not a JSON line (the metrics file is damaged)") from None
    return out


def read_metrics(out: str | Path) -> list[dict[str, Any]]:
    """The rows of OUT/metrics.jsonl (a torn last line left out)."""
    return [row for _, row in _rows(Path(out) / "metrics.jsonl")]
