"""The score table (one row per state), its Parquet metadata, and `summary.json`.

Per-pair columns (``margin``, ``dpo_loss``, ``dpo_accuracy``) come from
`irtrain.evaluation.pair_metrics` (FORMULAS.md "Implicit-reward metrics"), the one
held-out preference evaluation every command shares.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from irtrain.errors import DataError, IrtrainIOError
from irtrain.evaluation import pair_metrics
from irtrain.score.forward import ModelScores
from irtrain.score.inputs import ScoredSegment

#: Parquet metadata key of a score table, and the version of its layout.
META_KEY = b"irtrain"
TABLE_VERSION = 2  # 2: the end-of-turn token is its own (terminal) state
SUMMARY = "summary.json"
#: the columns every table has, in order
BASE_COLUMNS = ("example_id", "part", "step", "position", "terminal", "value", "num_steps",
                "logp", "logp_mean", "num_tokens", "value_s0")
REF_COLUMNS = ("ref_logp", "reward")
PAIR_COLUMNS = ("margin", "dpo_loss", "dpo_accuracy")


# --------------------------------------------------------------------------- the table
def build_table(segments: list[ScoredSegment], res: ModelScores, *, ref_logps: np.ndarray | None, beta: float,
                preference: bool) -> Any:
    """The score table (polars), one row per state; see `irtrain.score`."""
    import polars as pl

    counts = np.array([s.num_states for s in segments], dtype=np.int64)
    rep = lambda a: np.repeat(np.asarray(a), counts)  # noqa: E731 - per segment -> per state
    steps = np.concatenate([np.arange(n, dtype=np.int32) for n in counts])
    logp = res.logp
    cols: dict[str, Any] = {
        "example_id": rep([s.example for s in segments]).astype(np.int64),
        "part": rep([s.part for s in segments]).astype(np.int32),
        "step": steps,
        "position": np.concatenate([s.states for s in segments]).astype(np.int32),
        "terminal": np.concatenate([np.arange(n) == n - 1 if s.terminal else np.zeros(n, bool)
                                    for s, n in zip(segments, counts)]),
        "value": np.concatenate(res.values).astype(np.float64),
        "num_steps": rep([s.num_steps for s in segments]).astype(np.int32),
        "logp": rep(logp),
        "logp_mean": rep(logp / np.maximum(res.num_tokens, 1)),
        "num_tokens": rep(res.num_tokens).astype(np.int32),
        "value_s0": rep([v[0] for v in res.values]).astype(np.float64),
    }
    if ref_logps is not None:
        reward = beta * (logp - ref_logps)
        cols["ref_logp"] = rep(ref_logps)
        cols["reward"] = rep(reward)
        if preference:
            margin, loss, acc = _pair_metrics(segments, logp, ref_logps, beta)
            cols["margin"], cols["dpo_loss"], cols["dpo_accuracy"] = rep(margin), rep(loss), rep(acc)
    return pl.DataFrame(cols)


def _pair_metrics(segments: list[ScoredSegment], logp: np.ndarray, ref: np.ndarray, beta: float) -> tuple[np.ndarray, ...]:
    """Per segment: its pair's margin, sigmoid DPO loss and accuracy (NaN without a partner)."""
    chosen: dict[int, int] = {}
    rejected: dict[int, int] = {}
    for k, s in enumerate(segments):
        (chosen if s.part == 0 else rejected)[s.example] = k
    pairs = [(chosen[e], rejected[e]) for e in chosen if e in rejected]
    margin = np.full(len(segments), np.nan)
    loss = np.full(len(segments), np.nan)
    acc = np.full(len(segments), np.nan)
    if pairs:
        c, r = (np.array(x, dtype=np.int64) for x in zip(*pairs))
        pm = pair_metrics(logp, c, r, reference=ref, beta=beta)
        assert pm.margin is not None and pm.loss is not None and pm.correct is not None
        m, pair_loss, correct = pm.margin.numpy(), pm.loss.numpy(), pm.correct.numpy()
        for idx in (c, r):
            margin[idx], loss[idx], acc[idx] = m, pair_loss, correct
    return margin, loss, acc


def write_table(frame: Any, path: Path, meta: dict[str, Any]) -> None:
    """Write a score table atomically, with `meta` as JSON under the Parquet key ``irtrain``."""
    import pyarrow.parquet as pq

    table = frame.to_arrow()
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise IrtrainIOError(f"{path}: cannot write the score table: {e}") from None


def read_table_meta(path: str | Path) -> dict[str, Any]:
    """The ``irtrain`` metadata of a score table ({} when it has none)."""
    import pyarrow.parquet as pq

    try:
        md = pq.read_schema(path).metadata or {}
    except (OSError, ValueError) as e:
        raise DataError(f"not a readable Parquet file: {e}", path=str(path)) from None
    raw = md.get(META_KEY)
    return json.loads(raw) if raw else {}


# --------------------------------------------------------------------------- the summary
def write_json(path: Path, obj: Any) -> None:
    """`obj` as indented JSON, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default), encoding="utf-8")
    os.replace(tmp, path)


def read_summary(path: Path) -> dict[str, Any] | None:
    """A `summary.json` written by `irtrain score`, or None (none there, unreadable, another kind)."""
    try:
        s = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return s if isinstance(s, dict) and "irtrain_score" in s else None


#: what must agree for a new run's models to join an --out's summary.json
_SAME_RUN = (("irtrain_score",), ("data", "content_hash"), ("step_delimiter",), ("value_temperature",), ("beta",),
             ("ref_model",))


def merge_summary(previous: dict[str, Any] | None, current: dict[str, Any]) -> dict[str, Any]:
    """The summary a run writes into an --out that has one: the previous run's models (those
    whose table is still listed) kept ahead of this run's when the data and settings agree
    (a model scored again replaces its entry); otherwise this run's alone, with a note."""
    if previous is None:
        return current

    def get(s: dict[str, Any], key: tuple[str, ...]) -> Any:
        for k in key:
            s = s.get(k) if isinstance(s, dict) else None  # type: ignore[assignment]
        return s

    if any(get(previous, k) != get(current, k) for k in _SAME_RUN):
        print(f"note: {SUMMARY} in --out was written for other data or settings; it now lists this run's "
              "models only (the other tables stay on disk)", file=sys.stderr)
        return current
    out = dict(current)
    tables, models = previous.get("tables") or {}, previous.get("models") or {}
    out["tables"] = {n: t for n, t in tables.items() if n in models}
    out["models"] = {n: models[n] for n in out["tables"]}
    return out


def _json_default(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return str(v)


def _mean(x: Any) -> float | None:
    x = np.asarray(x, dtype=np.float64)
    x = x[np.isfinite(x)]
    return float(x.mean()) if len(x) else None


def model_summary(frame: Any, path: Path, seconds: float, tokens: int) -> dict[str, Any]:
    """One model's entry of `summary.json`: means over its responses and states."""
    first = frame.filter(frame["step"] == 0)  # one row per response
    s: dict[str, Any] = {
        "path": str(path), "responses": first.height, "states": frame.height,
        "value/s0": _mean(first["value_s0"]), "value": _mean(frame["value"]),
        "logp": _mean(first["logp"]), "logp_mean": _mean(first["logp_mean"]),
        "num_tokens": _mean(first["num_tokens"]), "num_steps": _mean(first["num_steps"]),
        "seconds": round(seconds, 3), "tokens_per_second": round(tokens / seconds, 1) if seconds > 0 else None,
    }
    if "reward" in frame.columns:
        s["reward"] = _mean(first["reward"])
    if "margin" in frame.columns:
        pairs = first.filter(first["part"] == 0)
        s["rewards/margins"] = _mean(pairs["margin"])
        s["eval/pref_loss"] = _mean(pairs["dpo_loss"])
        s["eval/pref_accuracy"] = _mean(pairs["dpo_accuracy"])
    return s


#: (summary key, column header): short headers, so that the table stays whole at 80 columns
_COLUMNS = (("responses", "resp."), ("states", "states"), ("value/s0", "V(s0)"), ("logp_mean", "logp/tok"),
            ("reward", "reward"), ("eval/pref_accuracy", "pref acc"), ("tokens_per_second", "tok/s"))
_CAPTION = {"value/s0": "V(s0): mean value at s_0", "logp_mean": "logp/tok: mean log-prob per response token",
            "reward": "reward: mean beta*log(pi/pi_ref)", "eval/pref_accuracy": "pref acc: held-out preference accuracy",
            "tokens_per_second": "tok/s: tokens scored per second"}


def model_labels(models: dict[str, dict[str, Any]]) -> list[str]:
    """The display label of each model of a summary: the one recorded (``--labels``), else
    ``run@step`` (`irtrain.labels`); a label two models share gives way to their names."""
    from irtrain.labels import assign_labels

    return assign_labels([], [(n, []) for n in models], what="model", recorded=[m.get("label") for m in models.values()])


def print_summary(summary: dict[str, Any], console: Any) -> None:
    """The summary as one table in the terminal, every model a row, whole at 80 columns."""
    from rich import box
    from rich.table import Table

    models = summary["models"]
    cols = [(k, h) for k, h in _COLUMNS if any(k in m for m in models.values())]
    t = Table(title=f"score ({summary['data']['format']}, {summary['data']['segments']} responses)", title_justify="left",
              caption="; ".join(_CAPTION[k] for k, _ in cols if k in _CAPTION), caption_justify="left",
              box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False)
    t.add_column("model", overflow="fold")  # a long label wraps, whole, never "checkpoin…"
    for _, header in cols:
        t.add_column(header, justify="right", no_wrap=True)
    for label, m in zip(model_labels(models), models.values()):
        t.add_row(label, *(_fmt(m.get(k), k) for k, _ in cols))
    console.print(t)


def _fmt(v: Any, key: str = "") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    if key == "tokens_per_second":
        return f"{v:.0f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
