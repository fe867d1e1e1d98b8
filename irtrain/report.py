"""Held-out preference accuracy, plots and the markdown pieces of the `irtrain quickstart`
report (and of the seed experiments in examples/).

Held-out preference accuracy (FORMULAS.md "Implicit-reward metrics"): on preference
shards from `irtrain prepare`, the fraction of pairs whose implicit-reward margin
``m = β((logπ(y_w) - logπ_ref(y_w)) - (logπ(y_l) - logπ_ref(y_l)))`` is > 0, and the
sigmoid DPO loss ``-logσ(m)``. Everything is computed by `irtrain.evaluation`, the one
held-out preference evaluation of the package: segment log-probs by
`evaluation.model_segment_logps` (the training loop's padding-free forward), pairs by
`evaluation.preference_pairs`, margins, losses and accuracies by `evaluation.pair_metrics`;
`preference_accuracy` only summarizes them (means, and a breakdown by group). Without a
reference, the reference-free ranking ``logπ(y_w) > logπ(y_l)`` is reported as
``logp_accuracy``.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from irtrain.evaluation import pair_metrics, preference_pairs
from irtrain.shards import ShardSet

#: A fixed colour per stage, so every plot reads the same.
COLORS = {"untrained": "#999999", "sft": "#1f77b4", "dpo": "#d62728"}


# --------------------------------------------------------------------------- preference accuracy
def pair_index(shards_dir: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(chosen segment, rejected segment, example id) of every pair in preference shards."""
    shards = ShardSet(shards_dir)
    chosen, rejected = preference_pairs(shards)
    ex = np.concatenate([np.asarray(sh.arrays["seg_example"], dtype=np.int64) for sh in shards.shards])
    return chosen, rejected, ex[chosen]


def preference_accuracy(policy: np.ndarray, pairs: tuple[np.ndarray, np.ndarray, np.ndarray], *,
                        reference: np.ndarray | None = None, beta: float = 0.01,
                        groups: Sequence[str] | None = None) -> dict[str, Any]:
    """Held-out preference metrics from per-segment log-probs (see the module docstring).

    policy, reference: [S] segment log-probs (`evaluation.model_segment_logps`); pairs:
    `pair_index`; groups: a label per example id (e.g. the planted error kind) for a breakdown.
    """
    chosen, rejected, examples = pairs
    if len(chosen) == 0:
        raise ValueError("no preference pairs")
    pm = pair_metrics(policy, chosen, rejected, reference=reference, beta=beta)
    ranked = (pm.logp_margin > 0).numpy()
    out: dict[str, Any] = {"n": int(len(chosen)), "logp_accuracy": float(np.mean(ranked)),
                           "logp_correct": [bool(c) for c in ranked]}
    correct = None
    if pm.margin is not None and pm.loss is not None and pm.correct is not None:
        correct = pm.correct.numpy()
        out["accuracy"] = float(np.mean(correct))
        out["correct"] = [bool(c) for c in correct]  # per pair, for paired comparisons between models
        out["loss"] = float(pm.loss.mean())
        out["mean_margin"] = float(pm.margin.mean())
    if groups is not None:
        by: dict[str, dict[str, float]] = {}
        labels = np.asarray([groups[int(e)] for e in examples])
        for g in sorted(set(labels.tolist())):
            sel = labels == g
            entry = {"n": int(sel.sum()), "logp_accuracy": float(np.mean(ranked[sel]))}
            if correct is not None:
                entry["accuracy"] = float(np.mean(correct[sel]))
            by[g] = entry
        out["by_group"] = by
    return out


# --------------------------------------------------------------------------- confidence
#: The significance level of every claim the reports make (two-sided).
ALPHA = 0.05


def wilson_interval(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a binomial proportion k/n; (nan, nan) when n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def paired_sign_test(a: Sequence[bool], b: Sequence[bool]) -> dict[str, Any]:
    """Exact McNemar test of two models judged on the same items.

    Of the items where exactly one model is right (``b_only`` where only b is, ``a_only``
    where only a is), under H0 each is b's with probability 1/2: the two-sided p-value is
    ``min(1, 2·P(X <= min(a_only, b_only)))`` for X ~ Binomial(a_only + b_only, 1/2),
    1 when no item is discordant (scipy.stats.binomtest(b_only, a_only + b_only) gives the same).
    """
    if len(a) != len(b):
        raise ValueError(f"paired test of {len(a)} against {len(b)} items")
    a_only = sum(1 for x, y in zip(a, b) if x and not y)
    b_only = sum(1 for x, y in zip(a, b) if y and not x)
    m, k = a_only + b_only, min(a_only, b_only)
    p = 1.0 if m == 0 else min(1.0, 2 * sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m)
    return {"n": len(a), "a_only": a_only, "b_only": b_only, "p_value": p}


def compare_verdict(test: dict[str, Any], *, alpha: float = ALPHA) -> str:
    """"above", "below" or "not distinguishable from" (b against a), from `paired_sign_test`."""
    if test["p_value"] < alpha:
        return "above" if test["b_only"] > test["a_only"] else "below"
    return "not distinguishable from"


def with_interval(k: int, n: int) -> str:
    """``0.860 [0.805, 0.902]`` (k/n with its 95% Wilson interval)."""
    if n <= 0:
        return "—"
    lo, hi = wilson_interval(k, n)
    return f"{k / n:.3f} [{lo:.3f}, {hi:.3f}]"


# --------------------------------------------------------------------------- metrics files
def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (written by `irtrain sft` / `irtrain dpo`)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric, leaving out rows without it and non-finite values."""
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(int(r["step"]))
            ys.append(float(v))
    return xs, ys


def first_key(rows: list[dict[str, Any]], candidates: Sequence[str]) -> str | None:
    """The first of ``candidates`` that some row holds (metric names differ by loss)."""
    for k in candidates:
        if any(k in r for r in rows):
            return k
    return None


# --------------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(ys: list[float], window: int) -> list[float]:
    """Trailing moving average (window >= 1)."""
    if window <= 1 or not ys:
        return list(ys)
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= window:
            acc -= ys[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_lines(path: str | Path, panels: list[dict[str, Any]], *, title: str | None = None) -> Path:
    """One row of line-plot panels. Each panel: ``{"title", "xlabel", "ylabel", "lines":
    [{"x", "y", "label", "color"?, "style"?}], "vlines"?: [(x, label)]}``."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for line in panel["lines"]:
            ax.plot(line["x"], line["y"], line.get("style", "-"), label=line.get("label"), color=line.get("color"),
                    lw=1.6, ms=4)
        for x, label in panel.get("vlines", []):
            ax.axvline(x, color="#888888", ls=":", lw=1)
            ax.annotate(label, (x, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90, va="top", ha="right")
        ax.set_title(panel.get("title", ""), fontsize=10)
        ax.set_xlabel(panel.get("xlabel", "step"))
        ax.set_ylabel(panel.get("ylabel", ""))
        ax.grid(alpha=0.3)
        if any(line.get("label") for line in panel["lines"]):
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bars(path: str | Path, groups: list[str], bars: dict[str, list[float]], *, ylabel: str, title: str,
              ylim: tuple[float, float] | None = (0.0, 1.05), colors: dict[str, str] | None = None) -> Path:
    """Grouped bar chart: ``bars[series][i]`` is the value of ``series`` in ``groups[i]``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.4 + 1.6 * len(groups) * max(1, len(bars)) / 2, 3.8))
    width = 0.8 / max(1, len(bars))
    for j, (name, values) in enumerate(bars.items()):
        xs = [i + (j - (len(bars) - 1) / 2) * width for i in range(len(groups))]
        color = (colors or {}).get(name)
        rects = ax.bar(xs, [0 if v is None or not math.isfinite(v) else v for v in values], width, label=name, color=color)
        for r, v in zip(rects, values):
            if v is not None and math.isfinite(v):
                ax.annotate(f"{v:.2f}", (r.get_x() + r.get_width() / 2, r.get_height()), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if ylim:
        ax.set_ylim(*ylim)
    if len(bars) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- markdown
def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats are printed with 3 decimals."""
    def cell(v: Any) -> str:
        if v is None:
            return "—"
        if isinstance(v, float):
            return "nan" if not math.isfinite(v) else f"{v:.3f}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)
