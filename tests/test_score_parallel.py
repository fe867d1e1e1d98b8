"""irtrain.score.parallel: `torchrun --nproc_per_node 2 -m irtrain.cli.main score ...` on 2 CPU
processes (gloo) writes what one process writes, and one summary.

- one model (and a reference): each rank runs every other forward of the single process's
  sequence, the main rank gathers them;
- three checkpoints: whole models round-robin (the second round leaves rank 1 idle);
- an --out held by another run: refused on every rank, nothing written.

Each launch starts two Python processes that import torch and transformers (~20-30 s on a
busy 2-core machine).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.paths import OutLock
from irtrain.score.parallel import Share, model_rounds
from irtrain.shards import Segment, write_shard_set

from test_score import encode

runner = CliRunner()


def torchrun(args: list[str], *, timeout: int = 600) -> subprocess.CompletedProcess:
    launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m", "torch.distributed.run"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([*launcher, "--standalone", "--nproc_per_node", "2", "-m", "irtrain.cli.main", "score", *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def tables_equal(a, b) -> None:
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["tables"] == sb["tables"]
    assert sa["data"] == sb["data"] and sa["processes"] == 2 and sb["processes"] == 1
    for name, file in sa["tables"].items():
        ta, tb = pl.read_parquet(a / file), pl.read_parquet(b / file)
        assert ta.columns == tb.columns and ta.height == tb.height
        keys = ["example_id", "part", "step", "position", "num_steps", "num_tokens"]
        assert ta.select(keys).equals(tb.select(keys)), name
        for col in set(ta.columns) - set(keys):  # the same forwards: equal up to float noise of thread counts
            np.testing.assert_allclose(ta[col].to_numpy(), tb[col].to_numpy(), rtol=0, atol=1e-6, err_msg=f"{name} {col}")
    assert not list(a.parent.glob(f".{a.name}.lock")) and not list(a.glob(".*tmp*"))


@pytest.fixture(scope="module")
def pref_shards(tiny_model_dir, tmp_path_factory):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    rows = []
    for i in range(6):
        p, good, _ = encode(tok, f"what is {i} plus {i}?", f"Step 1: {i} + {i}.\n\nThe answer is {2 * i}.")
        _, bad, _ = encode(tok, f"what is {i} plus {i}?", f"The answer is {2 * i + 1}.")
        rows.append([Segment(p + good, [-100] * len(p) + good, example=i, part=0),
                     Segment(p + bad, [-100] * len(p) + bad, example=i, part=1)])
    out = tmp_path_factory.mktemp("pref") / "shards"
    write_shard_set(out, "preference", rows, max_len=256)
    return out


def test_shares_and_rounds():
    assert [b for b in range(7) if Share(1, 2).mine(b)] == [1, 3, 5]
    assert model_rounds(3, 2) == [[0, 1], [2]] and model_rounds(2, 2) == [[0, 1]] and model_rounds(1, 1) == [[0]]


def test_one_model_split_over_two_processes_equals_one_process(tmp_path, tiny_model_dir, pref_shards):
    from irtrain.toy import tiny_llama

    ref = tiny_llama(tiny_model_dir, tmp_path / "ref", seed=1)
    args = [str(pref_shards), "--model", str(tiny_model_dir), "--ref-model", str(ref), "--beta", "0.1",
            "--batch-tokens", "120"]  # several forwards to share out
    proc = torchrun([*args, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = runner.invoke(app, ["score", *args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    tables_equal(tmp_path / "two", tmp_path / "one")
    df = pl.read_parquet(tmp_path / "two" / f"{tiny_model_dir.name}.parquet")
    assert df["ref_logp"].is_not_null().all() and df["dpo_accuracy"].is_not_null().all()
    assert proc.stdout.count("score (preference") == 1  # the summary table printed once, by the main rank


def test_checkpoints_split_over_two_processes_equal_one_process(tmp_path, tiny_model_dir, tokenizer_dirs, pref_shards):
    from irtrain.toy import tiny_llama

    run = tmp_path / "run"
    for step, seed in ((1, 0), (2, 1), (3, 2)):  # three different models: rank 0, rank 1, then rank 0 alone
        tiny_llama(tokenizer_dirs["chatml"], run / f"checkpoint-{step:07d}", seed=seed)
    args = [str(pref_shards), "--checkpoints", str(run)]
    proc = torchrun([*args, "--out", str(tmp_path / "two")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    single = runner.invoke(app, ["score", *args, "--out", str(tmp_path / "one")])
    assert single.exit_code == 0, single.output
    tables_equal(tmp_path / "two", tmp_path / "one")
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert list(summary["models"]) == [f"run-checkpoint-000000{k}" for k in (1, 2, 3)]  # in step order


def test_an_out_held_by_another_run_is_refused_on_every_rank(tmp_path, tiny_model_dir, pref_shards):
    out = tmp_path / "scores"
    with OutLock(out, "score"):
        proc = torchrun([str(pref_shards), "--model", str(tiny_model_dir), "--out", str(out)])
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and all("is in use by" in e for e in errors), proc.stderr[-3000:]
    # no traceback of irtrain's (torchrun prints its own, of the launcher, on a failed worker)
    assert not [line for line in proc.stderr.splitlines() if line.strip().startswith("File") and "irtrain" in line]
    assert not (out / "summary.json").exists() and not list(out.glob("*.parquet"))
