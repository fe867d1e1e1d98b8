"""The learning-rate schedule: a pure function of the step (nanoGPT's `get_lr`)."""
from __future__ import annotations

import math


def warmup_steps(total_steps: int, warmup_ratio: float) -> int:
    """Steps of linear warmup: round(warmup_ratio * total_steps)."""
    return int(round(warmup_ratio * total_steps))


def lr_at(step: int, *, total_steps: int, peak: float, warmup: int, schedule: str = "cosine") -> float:
    """Learning rate of optimizer step `step` (0-based) of `total_steps`.

    Linear warmup from peak/warmup to peak over the first `warmup` steps, then
    `cosine` (to 0 at the end), `linear` (to 0 at the end) or `constant`.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total_steps - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if schedule == "linear":
        return peak * (1.0 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")
