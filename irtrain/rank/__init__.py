"""`irtrain rank`: do models agree on which reasoning states are worth more?

Reads two or more score tables (`irtrain score`), aligns their states by
``(example_id, part, step)`` and computes Kendall's τ-b between every pair of models'
values V(s) (FORMULAS.md, "Value ranking"; Rust, `irtrain.stats`):

- **pooled**: over all aligned states at once, with its p-value;
- **per trace**: within each response (``(example_id, part)``), with its p-value, then the
  mean and median over traces (traces whose τ is undefined, e.g. all values equal, are left
  out and counted);
- ``--bootstrap N``: 95% percentile intervals of both, resampling traces with replacement.

Traces of fewer than 3 states (a response of one step: s_0 and its end) carry little of
the per-trace τ (with 2 states it is ±1 or undefined); how many there are is printed and
recorded (``short_traces``).

p-values are scipy's default (`irtrain.stats.kendall_tau`, ``method="auto"``): two-sided,
from the exact null distribution when neither model ties two states and there are at most
33 (the per-trace case), from the normal approximation otherwise.

Outputs, in ``--out``: ``tau_matrix.parquet`` (pooled τ, one row per model, one column per
model), ``tau_pairs.parquet`` (every statistic per ordered pair of models),
``tau_traces.parquet`` (τ and p-value per trace and pair of models), ``tau_heatmap.png``,
``summary.json``; and a table in the terminal. Models are keyed by their table names in the
files; what the table, the heatmap and ``summary.json``'s ``labels`` show is each model's
label (``--labels``, else the one `irtrain score` recorded, else ``run@step``:
`irtrain.labels`).

Bad input is a one-line error: fewer than two tables, a file that is not a score table,
an empty table, NaN values, tables of different states (examples, steps, tokens) or step delimiter or
value temperature, and states present in some tables only (unless ``--intersect``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from irtrain.config import RankConfig, config_to_dict
from irtrain.display import Phase
from irtrain.errors import ConfigError, DataError
from irtrain.labels import assign_labels
from irtrain.paths import OutLock, check_out_dir
from irtrain.rank.outputs import SHORT, SUMMARY, RankResult, nested, print_table, write_outputs
from irtrain.score import read_table_meta
from irtrain.stats import kendall_tau_matrix

KEY = ("example_id", "part", "step")
TRACE = ("example_id", "part")
CI = 0.95
#: settings that must agree for values to be comparable (metadata key, what it is)
_MUST_MATCH = (("states_hash", "states (examples, steps and tokens)"), ("step_delimiter", "step delimiter"),
               ("value_temperature", "value temperature"))


# =========================================================================== entry point
def run(cfg: RankConfig, *, console: Any = None) -> dict[str, Any]:
    """Rank as `cfg` says; write the outputs into `cfg.out`; return the summary."""
    from rich.console import Console

    console = console or Console(highlight=False)
    if not cfg.out:
        raise ConfigError("no output directory: give --out")
    if cfg.bootstrap < 0:
        raise ConfigError(f"bootstrap = {cfg.bootstrap} must be >= 0")
    tables = resolve_tables(cfg.tables)
    loaded = [load_table(label, path) for label, path in tables]
    check_compatible(loaded)
    # shown labels: --labels, else the one score recorded, else run@step; files keep the names
    shown = assign_labels(cfg.labels, [(t.label, [str(t.path), str(t.path.parent)]) for t in loaded], what="table",
                          recorded=[t.meta.get("label") for t in loaded])
    aligned = align(loaded, intersect=cfg.intersect)
    result = rank_values(aligned.values, aligned.trace_starts, bootstrap=cfg.bootstrap, seed=cfg.seed)
    out = check_out_dir(Path(cfg.out))
    out.mkdir(parents=True, exist_ok=True)
    with OutLock(out, "rank"):
        labels = [t.label for t in loaded]
        summary = {
            "irtrain_rank": 1,
            "models": {t.label: str(t.path) for t in loaded},
            "labels": dict(zip(labels, shown)),
            "data_hash": loaded[0].meta.get("data_hash"),
            "states": int(aligned.values.shape[1]), "traces": len(aligned.trace_starts) - 1,
            "short_traces": int((np.diff(aligned.trace_starts) < SHORT).sum()),
            "dropped_states": aligned.dropped, "bootstrap": cfg.bootstrap, "ci": CI if cfg.bootstrap else None,
            "config": config_to_dict(cfg),
            "tau_pooled": nested(labels, result.tau), "pvalue_pooled": nested(labels, result.pvalue),
            "tau_trace_mean": nested(labels, result.trace_mean), "tau_trace_median": nested(labels, result.trace_median),
            "traces_used": nested(labels, result.traces_used),
            "files": {"matrix": "tau_matrix.parquet", "pairs": "tau_pairs.parquet", "traces": "tau_traces.parquet",
                      "heatmap": "tau_heatmap.png"},
        }
        if result.pooled_ci is not None and result.trace_mean_ci is not None:
            summary["tau_pooled_ci"] = nested(labels, np.stack([result.pooled_ci[0], result.pooled_ci[1]], -1))
            summary["tau_trace_mean_ci"] = nested(labels, np.stack([result.trace_mean_ci[0], result.trace_mean_ci[1]], -1))
        write_outputs(out, labels, result, summary, states=int(aligned.values.shape[1]), shown=shown,
                      trace_keys=aligned.trace_keys)
        print_table(shown, result, summary, console)
        return summary


# =========================================================================== inputs
@dataclass
class Table:
    label: str
    path: Path
    meta: dict[str, Any]
    frame: Any  # polars DataFrame: KEY + value


def resolve_tables(items: list[str]) -> list[tuple[str, Path]]:
    """(label, path) per table. A file is labelled by its name; a directory holding one table
    by the directory's name; a directory of several tables (its `summary.json`'s list, or
    every *.parquet) by the tables' names (as `summary.json` names them). Clashing labels get
    their parent's name."""
    found: list[tuple[str, Path]] = []
    for item in items:
        p = Path(item)
        if p.is_file():
            found.append((p.stem, p))
        elif p.is_dir():
            listed = _listed_tables(p)
            if not listed:
                raise DataError("no score tables (*.parquet) in this directory", path=str(p))
            if len(listed) == 1:
                found.append((p.resolve().name, listed[0][1]))
            else:
                found += listed
        else:
            raise DataError("no such file or directory", path=str(p))
    if len(found) < 2:
        what = f"got {len(found)}: {found[0][1]}" if found else "got none"
        raise ConfigError(f"rank needs at least two score tables to compare, {what}")
    labels = [label for label, _ in found]
    out = []
    for label, path in found:
        if labels.count(label) > 1:
            label = f"{path.resolve().parent.name}/{label}"
        out.append((label, path))
    seen: dict[str, int] = {}
    final = []
    for label, path in out:
        k = seen.get(label, 0)
        seen[label] = k + 1
        final.append((label if k == 0 else f"{label}#{k + 1}", path))
    return final


def _listed_tables(d: Path) -> list[tuple[str, Path]]:
    """(name, path) of the tables a score directory lists in its `summary.json` (those on
    disk), else of every *.parquet in it (named by file)."""
    s = d / SUMMARY
    if s.is_file():
        try:
            names = json.loads(s.read_text(encoding="utf-8")).get("tables", {})
        except (ValueError, UnicodeDecodeError, AttributeError):
            names = {}
        names = names if isinstance(names, dict) else {}
        listed = [(str(n), d / t) for n, t in names.items() if isinstance(t, str) and (d / t).is_file()]
        if listed:
            return listed
    return [(t.stem, t) for t in sorted(d.glob("*.parquet"))]


def load_table(label: str, path: Path) -> Table:
    """Read a score table's keys and values, refusing anything rank cannot use."""
    import polars as pl

    meta = read_table_meta(path)
    if meta.get("kind") != "irtrain-score":
        raise DataError("not a score table written by `irtrain score` (no irtrain metadata)", path=str(path))
    try:
        frame = pl.read_parquet(path, columns=[*KEY, "value"])
    except Exception as e:  # noqa: BLE001 - polars raises several kinds for a bad file
        raise DataError(f"cannot read the score table: {e}", path=str(path)) from None
    if frame.height == 0:
        raise DataError("the score table is empty (no scored states)", path=str(path))
    bad = frame.filter(pl.col("value").is_null() | pl.col("value").is_nan() | pl.col("value").is_infinite())
    if bad.height:
        r = bad.row(0, named=True)
        raise DataError(f"{bad.height} state(s) have a NaN or infinite value (first: example {r['example_id']}, "
                        f"part {r['part']}, step {r['step']}); re-score with a healthy model", path=str(path))
    if frame.select(pl.struct(list(KEY)).is_duplicated().any()).item():
        raise DataError("the same (example_id, part, step) appears twice", path=str(path))
    return Table(label=label, path=path, meta=meta, frame=frame.sort(list(KEY)))


def check_compatible(tables: list[Table]) -> None:
    """Tables must score the same states: the same (example, part, step) and tokens whatever
    the shards' packing (`states_hash`; tables written before it existed: the shards' content
    hash), with the same step delimiter and value temperature."""
    ref = tables[0]
    by_states = all("states_hash" in t.meta for t in tables)
    checks = _MUST_MATCH if by_states else (("data_hash", "data (content hash)"),) + _MUST_MATCH[1:]
    for t in tables[1:]:
        for key, what in checks:
            if t.meta.get(key) != ref.meta.get(key):
                a, b = ref.meta.get(key), t.meta.get(key)
                if key in ("data_hash", "states_hash"):
                    a, b = str(a)[:12], str(b)[:12]
                raise DataError(f"score tables of different {what}: {ref.path} has {a!r}, {t.path} has {b!r}; "
                                "rank compares models on the same states")


@dataclass
class Aligned:
    values: np.ndarray  # [M, n] float64, states sorted by KEY
    trace_starts: np.ndarray  # [T+1] offsets of the traces in the state order
    dropped: int  # states left out by --intersect (over all tables)
    trace_keys: np.ndarray | None = None  # [T, 2] (example_id, part) of each trace


def align(tables: list[Table], *, intersect: bool) -> Aligned:
    keys = [t.frame.select(KEY) for t in tables]
    common = keys[0]
    for k in keys[1:]:
        common = common.join(k, on=list(KEY), how="inner")
    dropped = 0
    for t, k in zip(tables, keys):
        extra = k.height - common.height
        if extra and not intersect:
            missing_from, example = _missing(tables, t)
            raise DataError(f"{extra} state(s) of {t.path} are missing from {missing_from} (e.g. example "
                            f"{example[0]}, part {example[1]}, step {example[2]}); score the same data with "
                            "every model, or pass --intersect to keep only the states all tables have")
        dropped += extra
    if common.height == 0:
        raise DataError("the tables have no state in common")
    common = common.sort(list(KEY))
    values = np.stack([common.join(t.frame, on=list(KEY), how="left", maintain_order="left")["value"].to_numpy()
                       for t in tables]).astype(np.float64)
    trace = common.select(TRACE).to_numpy()
    change = np.flatnonzero((trace[1:] != trace[:-1]).any(axis=1)) + 1
    starts = np.concatenate([[0], change, [common.height]]).astype(np.int64)
    return Aligned(values=values, trace_starts=starts, dropped=int(dropped), trace_keys=trace[starts[:-1]])


def _missing(tables: list[Table], t: Table) -> tuple[str, tuple[int, int, int]]:
    for other in tables:
        if other is t:
            continue
        gone = t.frame.select(KEY).join(other.frame.select(KEY), on=list(KEY), how="anti")
        if gone.height:
            return str(other.path), tuple(int(v) for v in gone.row(0))  # type: ignore[return-value]
    return "another table", (-1, -1, -1)


# =========================================================================== statistics
def per_trace_tau(values: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[T, M, M] tau-b within each trace (NaN where undefined) and its p-value, each trace as
    ``scipy.stats.kendalltau``'s default computes it."""
    per = []
    with Phase("rank: per-trace tau", len(starts) - 1, unit="traces", quiet_below=2.0) as progress:
        for a, b in zip(starts[:-1], starts[1:]):
            per.append(kendall_tau_matrix(values[:, a:b]))
            progress.advance()
    return np.stack([t for t, _ in per]), np.stack([p for _, p in per])


def rank_values(values: np.ndarray, starts: np.ndarray, *, bootstrap: int = 0, seed: int = 0) -> RankResult:
    """Pooled and per-trace Kendall tau-b between the rows of `values` [M, n] (states in
    trace order, traces at `starts`), with bootstrap intervals over traces."""
    tau, p = kendall_tau_matrix(values)
    traces, trace_p = per_trace_tau(values, starts)
    ok = np.isfinite(traces)
    used = ok.sum(0)
    with np.errstate(invalid="ignore"):
        mean = np.where(used > 0, np.nansum(traces, 0) / np.maximum(used, 1), np.nan)
    median = _nanmedian(traces)
    res = RankResult(tau=tau, pvalue=p, trace_mean=mean, trace_median=median, traces_used=used, trace_tau=traces,
                     trace_pvalue=trace_p)
    if bootstrap:
        rng = np.random.default_rng(seed)
        n_tr = len(starts) - 1
        lens = np.diff(starts)
        pooled_bs, mean_bs = [], []
        with Phase("rank: bootstrap", bootstrap, unit="resamples", quiet_below=2.0) as progress:
            for _ in range(bootstrap):
                pick = rng.integers(0, n_tr, n_tr)
                idx = np.concatenate([np.arange(starts[i], starts[i] + lens[i]) for i in pick])
                pooled_bs.append(kendall_tau_matrix(values[:, idx])[0])
                tr = traces[pick]
                k = np.isfinite(tr).sum(0)
                with np.errstate(invalid="ignore"):
                    mean_bs.append(np.where(k > 0, np.nansum(tr, 0) / np.maximum(k, 1), np.nan))
                progress.advance()
        lo, hi = (1 - CI) / 2 * 100, (1 + CI) / 2 * 100
        res.pooled_ci = (np.nanpercentile(pooled_bs, lo, axis=0), np.nanpercentile(pooled_bs, hi, axis=0))
        res.trace_mean_ci = (np.nanpercentile(mean_bs, lo, axis=0), np.nanpercentile(mean_bs, hi, axis=0))
    return res


def _nanmedian(a: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[1:], np.nan)
    for i in np.ndindex(*a.shape[1:]):
        col = a[(slice(None),) + tuple(i)]
        col = col[np.isfinite(col)]
        if len(col):
            out[i] = np.median(col)
    return out

