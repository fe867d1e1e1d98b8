"""irtrain.rank: end to end through the CLI, statistics against scipy, and bad input."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import polars as pl
import pytest
import torch
from scipy import stats as sps
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import RankConfig
from irtrain.errors import ConfigError, DataError
from irtrain.rank import print_table, rank_values, run
from irtrain.score import write_table
from irtrain.shards import Segment, write_shard_set

runner = CliRunner()


# --------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def trace_shards(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    segs = []
    for i in range(8):
        p = tok.apply_chat_template([{"role": "user", "content": f"what is {i} plus {i * 3}?"}],
                                    add_generation_prompt=True, tokenize=False)
        r = (f"Let's think.\n\nStep 1: {i} + {i * 3} = {i * 4}.\n\nStep 2: check {i * 4} - {i * 3} = {i}."
             f"\n\nThe answer is {i * 4}.<|im_end|>")
        p_ids, r_ids = tok(p, add_special_tokens=False).input_ids, tok(r, add_special_tokens=False).input_ids
        segs.append(Segment(p_ids + r_ids, [-100] * len(p_ids) + r_ids, example=i))
    out = tmp_path_factory.mktemp("traces") / "shards"
    write_shard_set(out, "chat", [segs[k:k + 2] for k in range(0, 8, 2)], max_len=1024)
    return out, segs


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, trace_shards, tmp_path_factory):
    """Two checkpoints of the tiny model: as initialised, and after a few SGD steps on the traces."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("run")
    shutil.copytree(tiny_model_dir, root / "checkpoint-0000000")
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.manual_seed(0)
    for step in range(4):
        seg = trace_shards[1][step]
        out = model(input_ids=torch.tensor([seg.input_ids]), labels=torch.tensor([seg.labels]))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "checkpoint-0000004")
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(root / "checkpoint-0000004")
    return root


def test_two_checkpoints_scored_and_ranked_through_the_cli(tmp_path, trace_shards, checkpoints):
    scores, ranked = tmp_path / "scores", tmp_path / "rank"
    # the first checkpoint twice (as --model too): a model against itself must give tau = 1
    res = runner.invoke(app, ["score", str(trace_shards[0]), "--checkpoints", str(checkpoints),
                              "--model", str(checkpoints / "checkpoint-0000000"), "--out", str(scores)])
    assert res.exit_code == 0, res.output
    tables = json.loads((scores / "summary.json").read_text())["tables"]
    run_name = checkpoints.name  # tables are named <run>-checkpoint-<step>; the same directory twice gets -2
    assert list(tables) == [f"{run_name}-checkpoint-0000000", f"{run_name}-checkpoint-0000000-2",
                            f"{run_name}-checkpoint-0000004"]

    res = runner.invoke(app, ["rank", str(scores), "--out", str(ranked), "--bootstrap", "30", "--seed", "1"])
    assert res.exit_code == 0, res.output
    assert "Kendall" in res.output
    assert (ranked / "tau_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    matrix = pl.read_parquet(ranked / "tau_matrix.parquet")
    labels = matrix["model"].to_list()
    assert labels == list(tables)
    tau = matrix.select(labels).to_numpy()
    # every cell against scipy's tau-b over the same states, read from the score tables (keyed by
    # example, part and step, so a missing or misaligned state would show)
    key = ["example_id", "part", "step"]
    values = {name: pl.read_parquet(scores / f"{name}.parquet").sort(key) for name in labels}
    for name in labels[1:]:
        assert values[name].select(key).equals(values[labels[0]].select(key))
    for i, a in enumerate(labels):
        for j, b in enumerate(labels):
            expected = sps.kendalltau(values[a]["value"].to_numpy(), values[b]["value"].to_numpy()).statistic
            assert tau[i, j] == pytest.approx(expected, abs=1e-12), (a, b)
    # the same weights scored twice give the same values, so tau = 1; training moved them
    assert tau[0, 1] == pytest.approx(1.0, abs=1e-12)
    assert tau[0, 2] < 0.999
    pairs = pl.read_parquet(ranked / "tau_pairs.parquet")
    same = pairs.filter((pl.col("model_a") == labels[0]) & (pl.col("model_b") == labels[1])).row(0, named=True)
    assert same["tau_trace_mean"] == pytest.approx(1.0, abs=1e-12) and same["traces_used"] == 8
    assert same["tau_trace_median"] == pytest.approx(1.0, abs=1e-12)
    assert same["states"] == 8 * 6  # s_0, 4 steps, the end-of-turn token
    assert same["tau_pooled_lo"] == pytest.approx(1.0, abs=1e-12) and same["tau_pooled_hi"] == pytest.approx(1.0, abs=1e-12)
    summary = json.loads((ranked / "summary.json").read_text())
    assert summary["states"] == 48 and summary["traces"] == 8 and summary["short_traces"] == 0
    assert "fewer than 3 states" not in res.output
    lo, hi = summary["tau_pooled_ci"][labels[0]][labels[2]]
    assert lo <= hi
    # shown as run@step (the files keep the table names), whole in the 80-column table
    shown = [f"{run_name}@0", f"{run_name}@0-2", f"{run_name}@4"]
    assert list(summary["labels"].values()) == shown and list(summary["labels"]) == labels
    for label in shown:
        assert label in res.output
    # per-trace tau and p-value: scipy's default on the trace's states (6 states with the end-of-turn one, no ties: exact)
    traces = pl.read_parquet(ranked / "tau_traces.parquet")
    assert traces.height == 8 * 3 and traces.columns == ["example_id", "part", "model_a", "model_b", "tau", "pvalue"]
    for row in traces.filter(pl.col("model_b") == labels[2]).iter_rows(named=True):
        sel = [values[n].filter((pl.col("example_id") == row["example_id"]) & (pl.col("part") == row["part"]))["value"]
               .to_numpy() for n in (row["model_a"], row["model_b"])]
        want = sps.kendalltau(*sel)
        assert len(sel[0]) == 6 and row["tau"] == pytest.approx(want.statistic, abs=1e-12)
        assert row["pvalue"] == pytest.approx(want.pvalue, rel=1e-15)
    # --labels, by path (a table file) and by table name
    res = runner.invoke(app, ["rank", str(scores), "--out", str(tmp_path / "rank2"), "--labels",
                              f"init={scores / (labels[0] + '.parquet')}", "--labels", f"trained={labels[2]}"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "rank2" / "summary.json").read_text())
    assert list(summary["labels"].values()) == ["init", shown[1], "trained"]
    res = runner.invoke(app, ["rank", str(scores), "--out", str(tmp_path / "rank3"), "--labels", "a,b"])
    assert res.exit_code == 1 and "--labels: 2 label(s) for 3 table(s)" in res.output


# --------------------------------------------------------------------------- statistics
def test_pooled_and_per_trace_tau_match_scipy():
    # p-values as scipy's default computes them: per trace (2 to 8 states) exact where neither
    # model ties, asymptotic where the rounded row does; pooled asymptotic
    rng = np.random.default_rng(0)
    lens = rng.integers(2, 9, size=25)
    starts = np.concatenate([[0], np.cumsum(lens)])
    base = rng.standard_normal(starts[-1])
    values = np.stack([base, base + 0.5 * rng.standard_normal(len(base)), np.round(rng.standard_normal(len(base)))])
    r = rank_values(values, starts)

    def ktau(a, b):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return sps.kendalltau(a, b)

    exact = 0
    for i in range(3):
        for j in range(3):
            s = ktau(values[i], values[j])
            assert r.tau[i, j] == pytest.approx(s.statistic, abs=1e-12)
            assert r.pvalue[i, j] == pytest.approx(s.pvalue, rel=1e-9)
            per = [ktau(values[i, a:b], values[j, a:b]) for a, b in zip(starts[:-1], starts[1:])]
            for k, want in enumerate(per):
                if np.isnan(want.statistic):
                    assert np.isnan(r.trace_tau[k, i, j]) and np.isnan(r.trace_pvalue[k, i, j])
                    continue
                assert r.trace_tau[k, i, j] == pytest.approx(want.statistic, abs=1e-12)
                assert r.trace_pvalue[k, i, j] == pytest.approx(want.pvalue, rel=1e-9)
                exact += i != j and 2 not in (i, j)
            taus = np.array([p.statistic for p in per])
            taus = taus[np.isfinite(taus)]
            assert r.traces_used[i, j] == len(taus)
            assert r.trace_mean[i, j] == pytest.approx(taus.mean(), abs=1e-12)
            assert r.trace_median[i, j] == pytest.approx(np.median(taus), abs=1e-12)
    assert exact == 2 * 25
    # at n = 2 scipy's default gives p = 1 (exact), not the asymptotic 0.317
    two = int(np.flatnonzero(lens == 2)[0])
    assert r.trace_pvalue[two, 0, 1] == 1.0


def test_table_is_whole_at_80_columns():
    from rich.console import Console

    rng = np.random.default_rng(1)
    starts = np.arange(0, 41 * 5, 5)
    x = rng.standard_normal(starts[-1])
    values = np.stack([x, x + rng.standard_normal(len(x)), rng.standard_normal(len(x)), x])
    r = rank_values(values, starts, bootstrap=20, seed=0)
    r.pvalue[0, 3] = r.pvalue[3, 0] = 0.0  # underflowed (tau = 1 over 205 states)
    labels = ["base", "sft@200", "dpo@200", "dpo-lora@1200"]
    console = Console(width=80, record=True)
    print_table(labels, r, {"states": 205, "traces": 41, "short_traces": 0}, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    lines = text.splitlines()
    for a, b in [(0, 1), (0, 2), (1, 2), (2, 3)]:
        row = next(k for k, line in enumerate(lines) if line.split()[:2] == [labels[a], labels[b]])
        cells = lines[row].split()
        assert cells[2] == f"{r.tau[a, b]:.3f}" and cells[3] == f"{r.pvalue[a, b]:.1e}"
        assert cells[4] == f"{r.trace_mean[a, b]:.3f}" and cells[5] == f"{r.trace_median[a, b]:.3f}"
        ci = f"[{r.pooled_ci[0][a, b]:.3f}, {r.pooled_ci[1][a, b]:.3f}]"
        assert ci in lines[row + 1]
    assert "e-" in text and "< 1e-300" in text  # scientific; an underflow is never printed as 0
    assert "…" not in text and "trace τ over 40 of 41 traces" in " ".join(text.split())
def test_bootstrap_is_seeded_and_brackets_the_estimate():
    rng = np.random.default_rng(1)
    starts = np.arange(0, 41 * 5, 5)
    x = rng.standard_normal(starts[-1])
    values = np.stack([x, x + rng.standard_normal(len(x))])
    a = rank_values(values, starts, bootstrap=200, seed=3)
    b = rank_values(values, starts, bootstrap=200, seed=3)
    np.testing.assert_array_equal(a.pooled_ci[0], b.pooled_ci[0])
    lo, hi = a.pooled_ci[0][0, 1], a.pooled_ci[1][0, 1]
    assert lo < a.tau[0, 1] < hi and hi - lo < 0.5
    lo, hi = a.trace_mean_ci[0][0, 1], a.trace_mean_ci[1][0, 1]
    assert lo < a.trace_mean[0, 1] < hi


# --------------------------------------------------------------------------- bad input
def make_table(path, values, *, data_hash="d" * 64, delimiter="\n\n", keys=None):
    """A score table as `irtrain score` writes it: 3 traces of 4 states unless `keys` given."""
    keys = [(e, 0, s) for e in range(3) for s in range(4)] if keys is None else keys
    frame = pl.DataFrame({"example_id": [k[0] for k in keys], "part": [k[1] for k in keys], "step": [k[2] for k in keys],
                          "value": np.asarray(values, dtype=np.float64)},
                         schema_overrides={"part": pl.Int32, "step": pl.Int32})
    write_table(frame, path, {"kind": "irtrain-score", "version": 1, "model": path.stem, "data_hash": data_hash,
                              "step_delimiter": delimiter, "value_temperature": 1.0})
    return path


def test_bad_input_is_a_clear_error(tmp_path):
    v = np.arange(12.0)
    a = make_table(tmp_path / "a.parquet", v)
    b = make_table(tmp_path / "b.parquet", v[::-1])
    out = str(tmp_path / "out")
    with pytest.raises(ConfigError, match="at least two score tables"):
        run(RankConfig(tables=[str(a)], out=out))
    with pytest.raises(DataError, match="empty"):
        run(RankConfig(tables=[str(a), str(make_table(tmp_path / "e.parquet", [], keys=[]))], out=out))
    with pytest.raises(DataError, match="NaN or infinite value .*example 1, part 0, step 2"):
        run(RankConfig(tables=[str(a), str(make_table(tmp_path / "n.parquet", np.where(v == 6, np.nan, v)))], out=out))
    with pytest.raises(DataError, match="different data"):
        run(RankConfig(tables=[str(a), str(make_table(tmp_path / "h.parquet", v, data_hash="e" * 64))], out=out))
    with pytest.raises(DataError, match="different step delimiter"):
        run(RankConfig(tables=[str(a), str(make_table(tmp_path / "s.parquet", v, delimiter="##"))], out=out))
    plain = tmp_path / "plain.parquet"
    pl.DataFrame({"value": [1.0]}).write_parquet(plain)
    with pytest.raises(DataError, match="not a score table"):
        run(RankConfig(tables=[str(a), str(plain)], out=out))
    with pytest.raises(DataError, match="no such file"):
        run(RankConfig(tables=[str(a), str(tmp_path / "nope.parquet")], out=out))
    # a state missing from one table: an error, unless --intersect
    short = make_table(tmp_path / "short.parquet", v[:11], keys=[(e, 0, s) for e in range(3) for s in range(4)][:11])
    with pytest.raises(DataError, match="1 state\\(s\\) of .*a.parquet are missing .*example 2, part 0, step 3"):
        run(RankConfig(tables=[str(a), str(short)], out=out))
    summary = run(RankConfig(tables=[str(a), str(b), str(short)], out=out, intersect=True))
    assert summary["states"] == 11 and summary["dropped_states"] == 2
    assert summary["tau_pooled"]["a"]["b"] == -1.0 and summary["tau_pooled"]["a"]["short"] == 1.0
    assert not list((tmp_path / "out").glob(".*tmp*"))


def test_traces_of_fewer_than_three_states_are_counted(tmp_path):
    # traces of 4, 2, 1 and 3 states: two are short (per-trace tau is +-1 or undefined there)
    keys = [(e, 0, s) for e, n in enumerate((4, 2, 1, 3)) for s in range(n)]
    v = np.arange(len(keys), dtype=np.float64)
    a = make_table(tmp_path / "a.parquet", v, keys=keys)
    b = make_table(tmp_path / "b.parquet", v ** 2, keys=keys)
    res = runner.invoke(app, ["rank", str(a), str(b), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "2 of 4 traces have fewer than 3 states" in " ".join(res.output.split())
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["short_traces"] == 2 and summary["traces"] == 4
    assert summary["traces_used"]["a"]["b"] == 3  # the one-state trace has no tau


def test_cli_reports_bad_input_in_one_line(tmp_path):
    a = make_table(tmp_path / "a.parquet", np.arange(12.0))
    res = runner.invoke(app, ["rank", str(a), "--out", str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "at least two score tables" in res.output and "Traceback" not in res.output
