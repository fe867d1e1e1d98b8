"""irtrain.score.inputs: table names that identify the run, and responses without a step boundary."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl

from irtrain.config import ScoreConfig
from irtrain.score import resolve_models, run, table_names
from irtrain.shards import Segment, write_shard_set

from test_score import encode, responses


def names(*entries):
    return table_names([(Path(g), Path(p), d) for g, p, d in entries])


def test_table_names_identify_the_run(tmp_path):
    a, b = tmp_path / "exp1" / "sft", tmp_path / "exp2" / "sft"
    for d in (a / "checkpoint-0000200", b / "checkpoint-0000200", tmp_path / "base"):
        d.mkdir(parents=True)
    # a checkpoint: <run>-checkpoint-<step>; another model: its directory's name; a hub name: its last part
    assert names((tmp_path / "exp1" / "dpo" / "checkpoint-0000010", a, 2), (tmp_path / "base", tmp_path / "base", 1),
                 ("HuggingFaceTB/SmolLM2-135M", "/hub/snap", 1)) == ["dpo-checkpoint-0000010", "base", "SmolLM2-135M"]
    # two runs of the same name: one parent more each, until they differ
    assert names((a / "checkpoint-0000200", a / "checkpoint-0000200", 2), (b / "checkpoint-0000200", b / "checkpoint-0000200", 2)) \
        == ["exp1-sft-checkpoint-0000200", "exp2-sft-checkpoint-0000200"]
    # the same directory twice: -2
    assert names((a / "checkpoint-0000200", a / "checkpoint-0000200", 2), (a / "checkpoint-0000200", a / "checkpoint-0000200", 2)) \
        == ["sft-checkpoint-0000200", "sft-checkpoint-0000200-2"]
    # odd characters are replaced
    assert names(("my run/checkpoint-1", "/x", 2)) == ["my_run-checkpoint-1"]


def test_model_and_checkpoints_of_different_runs_never_collide(tmp_path, tiny_model_dir):
    for run_dir in ("sft", "dpo"):
        shutil.copytree(tiny_model_dir, tmp_path / run_dir / "checkpoint-0000200")
    shutil.copytree(tiny_model_dir, tmp_path / "dpo" / "merged")
    got = resolve_models(ScoreConfig(data="x", model=str(tmp_path / "sft" / "checkpoint-0000200"),
                                     checkpoints=str(tmp_path / "dpo"), out="o"))
    assert [n for n, _ in got] == ["sft-checkpoint-0000200", "dpo-checkpoint-0000200", "dpo-merged"]
    # --model with a directory that is not a checkpoint: its own name
    got = resolve_models(ScoreConfig(data="x", model=str(tiny_model_dir) + "/", out="o"))
    assert [n for n, _ in got] == [tiny_model_dir.name]


def test_responses_without_a_step_boundary_are_counted_with_a_warning(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    docs = [encode(tok, p, r) for p, r in responses(3)]
    docs += [encode(tok, "say hi", "hi there"), encode(tok, "and?", "\n\nnothing more")]  # never split (a leading delimiter opens no step)
    segs = [Segment(p + r, lab, example=i) for i, (p, r, lab) in enumerate(docs)]
    write_shard_set(tmp_path / "shards", "chat", [[s] for s in segs], max_len=512)
    summary = run(ScoreConfig(data=str(tmp_path / "shards"), model=str(tiny_model_dir), out=str(tmp_path / "o")))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "2 of 5 responses have no step boundary" in warnings[0]
    assert summary["data"]["no_step_boundary"] == 2
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["data"]["no_step_boundary"] == 2
    df = pl.read_parquet(tmp_path / "o" / f"{tiny_model_dir.name}.parquet")
    assert df.filter(pl.col("example_id") >= 3)["num_steps"].unique().to_list() == [1]
    # every response split: no warning, a count of 0
    write_shard_set(tmp_path / "split", "chat", [[s] for s in segs[:3]], max_len=512)
    summary = run(ScoreConfig(data=str(tmp_path / "split"), model=str(tiny_model_dir), out=str(tmp_path / "o2")))
    assert summary["data"]["no_step_boundary"] == 0 and "warning:" not in capsys.readouterr().err
