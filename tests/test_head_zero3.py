"""The chunked LM head under DeepSpeed ZeRO-3 (2 CPU processes, gloo).

ZeRO-3 partitions the head's weight; `packed_token_stats` runs `lm_head_stats` as the head
module's own forward, so ZeRO-3's module hooks gather the weight for the forward and again
for the backward and reduce-scatter its gradient, as for any `nn.Linear`. A 4-step sft run
equals the single process (losses rtol 1e-5, grad norms and final weights rtol 1e-4 /
atol 1e-5 as in test_train_deepspeed.py: only the order of float additions in the
collectives differs), and the run says the fused head ran on the partitioned weight (the
note `_note_zero3_head` prints once) instead of falling back to full logits.
"""
from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.train.metrics import read_metrics

from test_train_common import cpu_dist_env, make_sft_shards, one_torch_thread, torchrun_irtrain  # noqa: F401

pytest.importorskip("deepspeed")

NOTE = "ZeRO-3: the LM head's partitioned weight is gathered by its own forward"


def test_zero3_fused_head_matches_single_process(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    data = make_sft_shards(AutoTokenizer.from_pretrained(str(tiny_model_dir)), tmp_path / "data", n=64, max_len=128)
    # js with a value gradient at tau = 0.7: the head's log-probs, its values (both logsumexps)
    # and their gradients are on the loss, and the reference pass runs the head under ZeRO-3 too
    common = ["--model", str(tiny_model_dir), "--lr", "1e-3", "--global-batch", "8", "--micro-batch", "2", "--max-steps", "4",
              "--warmup-ratio", "0.25", "--loss", "js", "--value-grad", "--value-temperature", "0.7", "--no-tensorboard", str(data)]
    env = cpu_dist_env()
    proc = subprocess.run([*torchrun_irtrain(), "sft",
                           "--deepspeed", "zero3", "--out", str(tmp_path / "ds"), *common],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count(NOTE) == 1, proc.stderr[-4000:]  # rank 0, once: the fused head ran under ZeRO-3
    single = CliRunner().invoke(app, ["sft", "--out", str(tmp_path / "single"), *common])
    assert single.exit_code == 0, single.output
    assert NOTE not in single.output

    ds, sp = read_metrics(tmp_path / "ds"), read_metrics(tmp_path / "single")
    assert [m["step"] for m in ds] == [m["step"] for m in sp] == [1, 2, 3, 4]
    np.testing.assert_allclose([m["loss"] for m in ds], [m["loss"] for m in sp], rtol=1e-5)
    np.testing.assert_allclose([m["grad_norm"] for m in ds], [m["grad_norm"] for m in sp], rtol=1e-4)
    assert [m["trained_tokens"] for m in ds] == [m["trained_tokens"] for m in sp]
    w_ds = load_file(str(tmp_path / "ds" / "checkpoint-0000004" / "model.safetensors"))
    w_sp = load_file(str(tmp_path / "single" / "checkpoint-0000004" / "model.safetensors"))
    assert w_ds.keys() == w_sp.keys() and "lm_head.weight" in w_ds
    for k in w_ds:
        torch.testing.assert_close(w_ds[k], w_sp[k], rtol=1e-4, atol=1e-5, msg=k)
    # the head trained: its weight moved from the start, the same way in both runs
    start = load_file(str(tiny_model_dir / "model.safetensors"))["lm_head.weight"]
    assert float((w_sp["lm_head.weight"] - start).abs().max()) > 1e-3
