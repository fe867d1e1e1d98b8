"""irtrain.score.table: one --out shared by several score runs: the lock, summary.json
kept across runs of the same data and settings, and rank reading the lot."""
from __future__ import annotations

import json
import shutil

import pytest

from irtrain.config import RankConfig, ScoreConfig
from irtrain.errors import LockedError
from irtrain.paths import OutLock
from irtrain.rank import run as rank
from irtrain.score import run
from irtrain.score.table import merge_summary


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tokenizer_dirs, tmp_path_factory):
    """Two training runs, each with a checkpoint-0000002 (different weights)."""
    from irtrain.toy import tiny_llama

    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(tiny_model_dir, root / "sft" / "checkpoint-0000002")
    tiny_llama(tokenizer_dirs["chatml"], root / "dpo" / "checkpoint-0000002", seed=3)
    return root


def test_runs_sharing_an_out_add_to_its_summary_and_rank_reads_them(tmp_path, runs, chat_shards_dir, capsys):
    out = tmp_path / "scores"
    run(ScoreConfig(data=chat_shards_dir, checkpoints=str(runs / "sft"), out=str(out)))
    summary = run(ScoreConfig(data=chat_shards_dir, checkpoints=str(runs / "dpo"), out=str(out)))
    names = ["sft-checkpoint-0000002", "dpo-checkpoint-0000002"]  # the same checkpoint name, never the same table
    assert list(summary["tables"]) == list(summary["models"]) == names
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["tables"] == {n: f"{n}.parquet" for n in names} and list(on_disk["models"]) == names
    # scoring a model again replaces its entry, in place
    again = run(ScoreConfig(data=chat_shards_dir, checkpoints=str(runs / "sft"), out=str(out)))
    assert list(again["models"]) == names and again["tables"] == on_disk["tables"]
    ranked = rank(RankConfig(tables=[str(out)], out=str(tmp_path / "rank")))
    assert list(ranked["models"]) == names
    # other settings: the summary starts anew (with a note), listing this run's models only
    capsys.readouterr()
    other = run(ScoreConfig(data=chat_shards_dir, checkpoints=str(runs / "dpo"), out=str(out), value_temperature=0.5))
    assert list(other["tables"]) == [names[1]]
    assert "note: summary.json in --out was written for other data or settings" in capsys.readouterr().err


def test_a_second_score_on_a_held_out_is_refused(tmp_path, tiny_model_dir, chat_shards_dir):
    out = tmp_path / "scores"
    run(ScoreConfig(data=chat_shards_dir, model=str(tiny_model_dir), out=str(out)))
    before = (out / "summary.json").read_text()
    with OutLock(out, "score"):  # another score run on the same --out, still running
        with pytest.raises(LockedError, match="is in use by"):
            run(ScoreConfig(data=chat_shards_dir, model=str(tiny_model_dir), value_temperature=2.0, out=str(out)))
    assert (out / "summary.json").read_text() == before


def test_merge_summary_keeps_listed_tables_only():
    cur = {"irtrain_score": 1, "data": {"content_hash": "h"}, "step_delimiter": "\n\n", "value_temperature": 1.0,
           "beta": 0.01, "ref_model": None, "tables": {}, "models": {}}
    prev = {**cur, "tables": {"a": "a.parquet", "b": "b.parquet"}, "models": {"a": {"x": 1}}}
    assert merge_summary(prev, cur)["tables"] == {"a": "a.parquet"}
    assert merge_summary(None, cur) is cur


@pytest.fixture(scope="module")
def chat_shards_dir(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    from irtrain.shards import Segment, write_shard_set

    from test_score import encode, responses

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    segs = [Segment(p + r, lab, example=i) for i, (p, r, lab) in enumerate(encode(tok, *x) for x in responses(4))]
    out = tmp_path_factory.mktemp("shared") / "shards"
    write_shard_set(out, "chat", [segs[:2], segs[2:]], max_len=512)
    return str(out)


def test_labels_run_at_step_one_table_whole_at_80_columns(tmp_path, runs, chat_shards_dir):
    from rich.console import Console

    from irtrain.score.table import _fmt, print_summary

    out = tmp_path / "scores"
    console = Console(width=80, record=True)
    run(ScoreConfig(data=chat_shards_dir, checkpoints=str(runs / "sft"), out=str(out)), console=console)
    summary = run(ScoreConfig(data=chat_shards_dir, checkpoints=str(runs / "dpo"), out=str(out)), console=console)
    names = ["sft-checkpoint-0000002", "dpo-checkpoint-0000002"]  # file names unchanged
    assert list(summary["tables"]) == names and all((out / f"{n}.parquet").is_file() for n in names)
    assert [m["label"] for m in summary["models"].values()] == ["sft@2", "dpo@2"]
    console = Console(width=80, record=True)
    print_summary(summary, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80 and "…" not in text
    rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["sft@2"], ["dpo@2"])]
    assert len(rows) == 2  # one table, a row per model
    for cells, m in zip(rows, summary["models"].values()):
        assert cells[1:] == [_fmt(m[k], k) for k in ("responses", "states", "value/s0", "logp_mean", "tokens_per_second")]
    # rank shows the labels score recorded
    ranked = rank(RankConfig(tables=[str(out)], out=str(tmp_path / "rank")), console=Console(width=80, record=True))
    assert ranked["labels"] == dict(zip(names, ["sft@2", "dpo@2"]))


def test_labels_flag_in_order_and_by_path(tmp_path, runs, chat_shards_dir):
    from typer.testing import CliRunner

    from irtrain.cli.main import app

    out = tmp_path / "scores"
    base = runs / "sft" / "checkpoint-0000002"
    res = CliRunner().invoke(app, ["score", chat_shards_dir, "--model", str(base), "--checkpoints", str(runs / "dpo"),
                                   "--out", str(out), "--labels", "base,tuned"])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["tables"]) == ["sft-checkpoint-0000002", "dpo-checkpoint-0000002"]  # file names unchanged
    assert [m["label"] for m in summary["models"].values()] == ["base", "tuned"]
    assert "base" in res.output and "tuned" in res.output
    from irtrain.score import read_table_meta

    assert read_table_meta(out / "dpo-checkpoint-0000002.parquet")["label"] == "tuned"
    # label=path names some models, the others keep run@step
    summary = run(ScoreConfig(data=chat_shards_dir, checkpoints=str(runs / "dpo"), model=str(base), out=str(out),
                              labels=[f"init={base}"]))
    assert [m["label"] for m in summary["models"].values()] == ["init", "dpo@2"]
    res = CliRunner().invoke(app, ["score", chat_shards_dir, "--checkpoints", str(runs / "dpo"), "--out", str(out),
                                   "--labels", "a,b"])
    assert res.exit_code == 1 and "--labels: 2 label(s) for 1 model(s) (dpo-checkpoint-0000002)" in res.output
