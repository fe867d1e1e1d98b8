"""`irtrain rank`'s outputs: the Parquet files, the heatmap, summary.json and the terminal table."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from irtrain.errors import IrtrainIOError
from irtrain.stats import format_pvalue

SUMMARY = "summary.json"
#: traces with fewer states than this are counted as short (per-trace tau is +-1 or undefined)
SHORT = 3


@dataclass
class RankResult:
    """[M, M] matrices (symmetric)."""

    tau: np.ndarray  # pooled tau-b
    pvalue: np.ndarray
    trace_mean: np.ndarray  # mean over traces of the per-trace tau-b
    trace_median: np.ndarray
    traces_used: np.ndarray  # traces with a defined tau, per pair
    trace_tau: np.ndarray  # [T, M, M] tau-b within each trace (NaN where undefined)
    trace_pvalue: np.ndarray  # [T, M, M] its p-value (scipy's default: exact for a short trace without ties)
    pooled_ci: tuple[np.ndarray, np.ndarray] | None = None
    trace_mean_ci: tuple[np.ndarray, np.ndarray] | None = None



def nested(labels: list[str], m: np.ndarray) -> dict[str, dict[str, Any]]:
    def clean(v: Any) -> Any:
        if isinstance(v, np.ndarray):
            return [clean(x) for x in v]
        v = float(v)
        return v if math.isfinite(v) else None

    return {a: {b: clean(m[i, j]) for j, b in enumerate(labels)} for i, a in enumerate(labels)}


def write_outputs(out: Path, labels: list[str], r: RankResult, summary: dict[str, Any], *, states: int,
                  shown: list[str] | None = None, trace_keys: np.ndarray | None = None) -> None:
    import polars as pl

    matrix = pl.DataFrame({"model": labels, **{b: r.tau[:, j] for j, b in enumerate(labels)}})
    rows: dict[str, list[Any]] = {k: [] for k in ("model_a", "model_b", "tau_pooled", "pvalue_pooled", "tau_trace_mean",
                                                  "tau_trace_median", "traces_used", "states")}
    if r.pooled_ci is not None:
        for k in ("tau_pooled_lo", "tau_pooled_hi", "tau_trace_mean_lo", "tau_trace_mean_hi"):
            rows[k] = []
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            rows["model_a"].append(a)
            rows["model_b"].append(b)
            rows["tau_pooled"].append(float(r.tau[i, j]))
            rows["pvalue_pooled"].append(float(r.pvalue[i, j]))
            rows["tau_trace_mean"].append(float(r.trace_mean[i, j]))
            rows["tau_trace_median"].append(float(r.trace_median[i, j]))
            rows["traces_used"].append(int(r.traces_used[i, j]))
            rows["states"].append(states)
            if r.pooled_ci is not None and r.trace_mean_ci is not None:
                rows["tau_pooled_lo"].append(float(r.pooled_ci[0][i, j]))
                rows["tau_pooled_hi"].append(float(r.pooled_ci[1][i, j]))
                rows["tau_trace_mean_lo"].append(float(r.trace_mean_ci[0][i, j]))
                rows["tau_trace_mean_hi"].append(float(r.trace_mean_ci[1][i, j]))
    traces = _trace_rows(labels, r, trace_keys)
    try:
        _atomic(out / "tau_matrix.parquet", lambda p: matrix.write_parquet(p))
        _atomic(out / "tau_pairs.parquet", lambda p: pl.DataFrame(rows).write_parquet(p))
        _atomic(out / "tau_traces.parquet", lambda p: traces.write_parquet(p))
        _atomic(out / "tau_heatmap.png", lambda p: heatmap(shown or labels, r.tau, p, states=states))
        _atomic(out / SUMMARY, lambda p: p.write_text(json.dumps(summary, indent=2, ensure_ascii=False), encoding="utf-8"))
    except OSError as e:
        raise IrtrainIOError(f"{out}: cannot write the rank outputs: {e}") from None


def _trace_rows(labels: list[str], r: RankResult, trace_keys: np.ndarray | None) -> Any:
    """One row per trace and pair of models (a < b): its keys, states, tau-b and p-value."""
    import polars as pl

    t, m = r.trace_tau.shape[:2]
    keys = np.full((t, 2), -1, dtype=np.int64) if trace_keys is None else np.asarray(trace_keys, dtype=np.int64)
    i, j = np.triu_indices(m, 1)
    k = len(i)
    return pl.DataFrame({
        "example_id": np.repeat(keys[:, 0], k), "part": np.repeat(keys[:, 1], k).astype(np.int32),
        "model_a": [labels[a] for a in i] * t, "model_b": [labels[b] for b in j] * t,
        "tau": r.trace_tau[:, i, j].reshape(-1), "pvalue": r.trace_pvalue[:, i, j].reshape(-1),
    })


def _atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def heatmap(labels: list[str], tau: np.ndarray, path: Path, *, states: int) -> None:
    """The pooled tau-b matrix as an annotated heatmap (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = len(labels)
    size = max(4.0, 0.6 * m + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(np.ma.masked_invalid(tau), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(m), labels, rotation=45, ha="right")
    ax.set_yticks(range(m), labels)
    if m <= 20:
        for i in range(m):
            for j in range(m):
                v = tau[i, j]
                ax.text(j, i, "—" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                        color="white" if np.isfinite(v) and abs(v) > 0.6 else "black", fontsize=8)
    fig.colorbar(im, ax=ax, label="Kendall τ-b")
    ax.set_title(f"Agreement of value rankings V(s)\n(pooled over {states} states)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def print_table(labels: list[str], r: RankResult, summary: dict[str, Any], console: Any) -> None:
    """Every pair of models in one table, whole at 80 columns: labels wrap rather than being
    cut, intervals go on a second line, p-values are written ``3.2e-12`` (``< 1e-300`` for
    one below the float range)."""
    from rich import box
    from rich.table import Table as RichTable

    pairs = [(i, j) for i in range(len(labels)) for j in range(i + 1, len(labels))]
    used = {int(r.traces_used[i, j]) for i, j in pairs}
    # the traces with a defined tau: a column only where pairs differ (saves the width otherwise)
    per_pair = len(used) > 1
    note = "" if per_pair or not used else f"; trace τ over {used.pop()} of {summary['traces']} traces"
    t = RichTable(title=f"Kendall τ-b of V(s): {summary['states']} states in {summary['traces']} traces",
                  title_justify="left", caption=f"p: two-sided, pooled states (per trace: tau_traces.parquet){note}",
                  caption_justify="left", box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    for col in ("model A", "model B"):
        t.add_column(col, overflow="fold")
    for col in ("pooled τ", "p", "trace τ mean", "median") + (("traces",) if per_pair else ()):
        t.add_column(col, justify="right", no_wrap=True)
    for i, j in pairs:
        pooled = _f(r.tau[i, j])
        mean = _f(r.trace_mean[i, j])
        if r.pooled_ci is not None and r.trace_mean_ci is not None:
            pooled += f"\n[{_f(r.pooled_ci[0][i, j])}, {_f(r.pooled_ci[1][i, j])}]"
            mean += f"\n[{_f(r.trace_mean_ci[0][i, j])}, {_f(r.trace_mean_ci[1][i, j])}]"
        t.add_row(labels[i], labels[j], pooled, format_pvalue(r.pvalue[i, j]), mean, _f(r.trace_median[i, j]),
                  *((str(int(r.traces_used[i, j])),) if per_pair else ()))
    console.print(t)
    if summary["short_traces"]:
        console.print(f"{summary['short_traces']} of {summary['traces']} traces have fewer than {SHORT} states (one step: "
                      "per-trace τ is ±1 or undefined there, so they add little to the per-trace mean and median)")


def _f(v: float) -> str:
    return f"{v:.3f}" if np.isfinite(v) else "—"
