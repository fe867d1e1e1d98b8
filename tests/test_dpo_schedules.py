"""Joint SFT+DPO with the adaptive lambda, and the alternating SFT/DPO schedule
(FORMULAS.md "Multi-objective and alternating SFT/DPO"), through the real `irtrain dpo`."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.dpo.joint import adapt_lambda
from irtrain.models import model_hash
from irtrain.shards import ShardSet
from irtrain.train.metrics import read_metrics

from test_dpo import write_pairs
from test_train_common import make_sft_shards

runner = CliRunner()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


@pytest.fixture(scope="module")
def sft_dir(tok, tmp_path_factory):
    return make_sft_shards(tok, tmp_path_factory.mktemp("sched") / "sft", n=48, seed=0, max_len=128)


@pytest.fixture(scope="module")
def pairs_dir(tok, tmp_path_factory):
    return write_pairs(tok, tmp_path_factory.mktemp("sched") / "pairs", n=32, max_len=150)


def dpo(*args):
    return runner.invoke(app, ["dpo", *map(str, args)])


def test_adapt_lambda_rule():
    cfg = SimpleNamespace(target_accuracy=0.8, lambda_delta=0.05, lambda_min=0.25, lambda_max=4.0)
    assert adapt_lambda(1.0, 0.76, cfg) == 0.5   # a* - acc = 0.04 <= delta: halve
    assert adapt_lambda(1.0, 0.95, cfg) == 0.5   # above target: halve
    assert adapt_lambda(1.0, 0.70, cfg) == 2.0   # far below target: double
    assert adapt_lambda(0.25, 0.9, cfg) == 0.25  # clamped below
    assert adapt_lambda(4.0, 0.1, cfg) == 4.0    # clamped above


def test_joint_lambda_follows_the_rule_and_resumes_exactly(tiny_model_dir, sft_dir, pairs_dir, tmp_path):
    """--joint-sft: every step samples SFT and preference rows; lambda changes every
    --lambda-interval steps by the rule on the interval's preference accuracy; the run resumes
    with the same lambda / loss trace (lambda is part of the checkpoint)."""
    args = ["--model", tiny_model_dir, "--lr", "2e-3", "--global-batch", "6", "--micro-batch", "3", "--max-steps", "4",
            "--joint-sft", sft_dir, "--lambda-interval", "1", "--target-accuracy", "0.7", "--lambda-delta", "0.0",
            "--lambda-min", "0.125", "--lambda-max", "8", "--save-at", "2", "--no-tensorboard", pairs_dir]
    full = dpo("--out", tmp_path / "full", *args)
    assert full.exit_code == 0, full.output
    m = [x for x in read_metrics(tmp_path / "full") if "loss" in x]
    assert len(m) == 4
    cfg = SimpleNamespace(target_accuracy=0.7, lambda_delta=0.0, lambda_min=0.125, lambda_max=8.0)
    lam = 1.0
    for prev, cur in zip([None] + m[:-1], m):
        if prev is not None:
            lam = adapt_lambda(lam, prev["rewards/accuracies"], cfg)
        assert cur["joint/lambda"] == pytest.approx(lam)
        assert cur["loss/sft"] > 0 and "rewards/margins" in cur
    assert len({x["joint/lambda"] for x in m}) > 1  # it did adapt
    # the SFT rows joined the data (the resolved config says so)
    assert str(sft_dir) in (tmp_path / "full" / "config.toml").read_text()

    # resume from step 2: the same trace, lambda included
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full", part)
    shutil.rmtree(part / "checkpoint-0000004")
    lines = [ln for ln in (part / "metrics.jsonl").read_text().splitlines() if json.loads(ln)["step"] <= 2]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    resumed = dpo("--out", part, *args, "--resume")
    assert resumed.exit_code == 0, resumed.output
    r = [x for x in read_metrics(part) if "loss" in x]
    assert [x["joint/lambda"] for x in r] == [x["joint/lambda"] for x in m]
    np.testing.assert_allclose([x["loss"] for x in r], [x["loss"] for x in m], rtol=1e-6)


def test_alternating_schedule(tiny_model_dir, sft_dir, pairs_dir, tmp_path):
    """--alternate-with SFT --rounds 2: both datasets split in 2 disjoint parts; stages
    SFT_1 -> DPO_1 -> SFT_2 -> DPO_2, each starting from the previous stage's checkpoint and
    using it as its reference; every stage logs its number; --resume skips finished stages."""
    out = tmp_path / "alt"
    args = ["--model", tiny_model_dir, "--out", out, "--lr", "1e-3", "--sft-lr", "2e-3", "--global-batch", "2", "--max-steps", "1",
            "--alternate-with", sft_dir, "--rounds", "2", "--no-tensorboard", pairs_dir]
    r = dpo(*args)
    assert r.exit_code == 0, r.output
    stages = [json.loads(ln) for ln in (out / "stages.jsonl").read_text().splitlines()]
    assert [(s["stage"], s["kind"], s["round"]) for s in stages] == [(1, "sft", 1), (2, "dpo", 1), (3, "sft", 2), (4, "dpo", 2)]
    for s in stages:
        m = [x for x in read_metrics(s["out"]) if "loss" in x]
        assert m and all(x["stage"] == s["stage"] for x in m)
    # the data: each dataset in 2 disjoint parts covering all of it
    for name, src in (("sft", sft_dir), ("pref", pairs_dir)):
        parts = [ShardSet(out / "data" / f"{name}-part-{k}") for k in (1, 2)]
        assert sum(len(p) for p in parts) == len(ShardSet(src)) and all(len(p) for p in parts)
        ids = [int(x) for p in parts for sh in p.shards for x in np.asarray(sh.arrays["seg_example"])]
        assert sorted(ids) == sorted(int(x) for sh in ShardSet(src).shards for x in np.asarray(sh.arrays["seg_example"]))
    # stage k+1 starts from stage k's checkpoint; a DPO stage's reference is its starting model
    for prev, cur in zip(stages, stages[1:]):
        cfg = (out / f"stage-{cur['stage']:02d}-{cur['kind']}" / "config.toml").read_text()
        assert f'model = "{prev["checkpoint"]}"' in cfg
    for s in (stages[1], stages[3]):
        start = stages[s["stage"] - 2]["checkpoint"]
        caches = list((out / "data" / f"pref-part-{s['round']}" / "reference").glob("*.safetensors"))
        assert caches
        with safe_open(str(caches[0]), framework="numpy") as f:
            assert f.metadata()["model_hash"] == model_hash(start)
        first = [x for x in read_metrics(s["out"]) if "loss" in x][0]
        assert first["loss"] == pytest.approx(np.log(2), abs=1e-4)  # policy == reference at the stage's start
    # rerun with --resume: every stage is done, nothing runs again
    before = (out / "stages.jsonl").read_text()
    r = dpo(*args, "--resume")
    assert r.exit_code == 0, r.output
    assert (out / "stages.jsonl").read_text() == before
    # without --resume the finished run is not overwritten
    r = dpo(*args)
    assert r.exit_code == 1 and "already holds an alternating run" in r.output


def test_schedule_bad_input(tiny_model_dir, sft_dir, pairs_dir, tmp_path):
    out = tmp_path / "o"
    base = ["--model", tiny_model_dir, "--out", out, "--global-batch", "2", "--max-steps", "1", pairs_dir]
    for extra, msg in ((["--joint-sft", sft_dir, "--alternate-with", sft_dir], "two different schedules"),
                       (["--joint-sft", sft_dir, "--loss", "kto"], "kto"),
                       (["--joint-sft", pairs_dir], "needs chat or prompt-completion shards"),
                       (["--alternate-with", sft_dir, "--ref-model", tiny_model_dir], "--ref-model does not apply"),
                       (["--alternate-with", pairs_dir], "needs chat or prompt-completion shards"),
                       (["--alternate-with", sft_dir, "--rounds", "0"], "--rounds")):
        r = dpo(*base, *extra)
        assert r.exit_code == 1, (extra, r.output)
        assert msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
        assert not out.exists()
