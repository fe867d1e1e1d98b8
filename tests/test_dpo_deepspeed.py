"""`irtrain dpo` under DeepSpeed ZeRO-2 with 2 CPU processes (gloo) reproduces the
single-process trace for the same global batch: the step-wide denominators (pairs, chosen
tokens for --sft-coef) and KTO's per-rank mismatched-pair reference caches are exact.

Launched as `torchrun --standalone --nproc_per_node 2 -m irtrain.cli.main dpo --deepspeed zero2 ...`.
Tolerance: rtol 1e-5 on the loss and KTO's z (the same arithmetic; only the reduction order
of gradients over ranks differs).
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.train.metrics import read_metrics

from test_dpo import write_pairs, write_unpaired
from test_train_common import cpu_dist_env, torchrun_irtrain

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model_dir))


def launch(args, out, tmp_path):
    env = cpu_dist_env()
    proc = subprocess.run([*torchrun_irtrain(), "dpo", *map(str, args),
                           "--out", str(out), "--deepspeed", "zero2"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("loss", ["sigmoid", "kto"])
def test_zero2_two_processes_match_single(loss, tiny_model_dir, tok, tmp_path):
    if loss == "kto":
        data = write_unpaired(tok, tmp_path / "data", n=48, max_len=200)
        extra = ["--loss", "kto"]
    else:
        data = write_pairs(tok, tmp_path / "data", n=32, max_len=150)
        extra = ["--sft-coef", "0.5"]
    args = ["--model", tiny_model_dir, "--lr", "1e-3", "--global-batch", "4", "--micro-batch", "1", "--max-steps", "3",
            "--no-tensorboard", *extra, data]
    single = CliRunner().invoke(app, ["dpo", *map(str, args), "--out", str(tmp_path / "single")])
    assert single.exit_code == 0, single.output
    launch(args, tmp_path / "ds", tmp_path)
    a = [m for m in read_metrics(tmp_path / "single") if "loss" in m]
    b = [m for m in read_metrics(tmp_path / "ds") if "loss" in m]
    assert len(a) == len(b) == 3
    keys = ["loss", "rewards/chosen"] + (["kto/z"] if loss == "kto" else ["rewards/margins"])
    for k in keys:
        np.testing.assert_allclose([m[k] for m in b], [m[k] for m in a], rtol=1e-5, atol=1e-7, err_msg=k)
