"""The memory line (irtrain/train/memory.py): its formulas by hand, and its estimate against
the peak resident memory a real CPU run reaches, for a full fine-tune and for LoRA."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from irtrain.train.memory import estimate


def test_estimate_by_hand():
    """nn.Linear(4, 3): 15 parameters."""
    m = torch.nn.Linear(4, 3)
    e = estimate(m)
    assert (e.total_params, e.trainable_params, e.weights, e.gradients, e.optimizer) == (15, 15, 60, 60, 120)  # fp32: 4 + 4 + 2x4
    m.bias.requires_grad_(False)
    e = estimate(m)
    assert (e.trainable_params, e.weights, e.gradients, e.optimizer) == (12, 60, 48, 96)
    m.bias.requires_grad_(True)
    # DeepSpeed, fp32 weights: moments 8 bytes; ZeRO-1 divides the optimizer, ZeRO-2 the gradients too, ZeRO-3 the weights too
    assert (estimate(m, stage=1, world_size=2, deepspeed=True).optimizer, estimate(m, stage=1, world_size=2, deepspeed=True).gradients) == (60, 60)
    e2 = estimate(m, stage=2, world_size=2, deepspeed=True)
    assert (e2.weights, e2.gradients, e2.optimizer) == (60, 30, 60)
    e3 = estimate(m, stage=3, world_size=3, deepspeed=True)
    assert (e3.weights, e3.gradients, e3.optimizer) == (20, 20, 40)
    # bf16 weights under DeepSpeed: 2 + 2 bytes, and an fp32 master copy with fp32 moments (12 bytes)
    e = estimate(m.to(torch.bfloat16), deepspeed=True)
    assert (e.weights, e.gradients, e.optimizer) == (30, 30, 180)
    assert "bfloat16" in e.where


MEASURE = r"""
import json, sys
import torch
torch.set_num_threads(1)
from irtrain.config import load_config, SFTConfig
from irtrain import sft
import peft, transformers, irtrain.train.loop  # imported before the baseline: code is not what the line estimates

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

model, data, out, extra = sys.argv[1:]
cfg = load_config(SFTConfig, None, {"model": model, "data": [data], "out": out, "max_steps": 2, "global_batch": 2, "micro_batch": 1,
                                    "lr": 1e-4, "tensorboard": False, "kl_metrics": False, "gradient_checkpointing": True,
                                    **json.loads(extra)})
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current resident size
base = status("VmRSS")
sft.run(cfg)
print("MEASURED", json.dumps({"base": base, "peak": status("VmHWM")}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc to reset and read the peak RSS")
@pytest.mark.parametrize("extra", [{}, {"lora_r": 8}], ids=["full", "lora"])
def test_estimate_is_within_25_percent_of_the_measured_peak(extra, tokenizer_dirs, tmp_path_factory, tmp_path):
    """A 138 M-parameter Llama (weights 528 MiB), two steps on 128-token rows with gradient
    checkpointing: the growth of resident memory from just before the run to its peak is the
    estimate within 25% (what is left is activations and allocator slack). glibc is told to
    return freed blocks at once (MALLOC_MMAP_THRESHOLD_), so the peak is live memory, not cache."""
    from transformers import AutoTokenizer

    from irtrain.toy import tiny_llama

    from test_train_common import make_sft_shards

    root = tmp_path_factory.getbasetemp() / "memory-model"
    if not (root / "model.safetensors").is_file():
        tiny_llama(tokenizer_dirs["chatml"], root, hidden_size=1536, num_layers=4, num_heads=16, num_kv_heads=4, intermediate_size=6144)
    data = root.parent / "memory-data"
    if not data.is_dir():
        make_sft_shards(AutoTokenizer.from_pretrained(str(root)), data, n=16, max_len=128)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(root), str(data), str(tmp_path / "out"), json.dumps(extra)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if x.startswith("memory:"))
    est_mib = float(re.search(r"= ([\d,.]+) MiB", line).group(1).replace(",", ""))
    m = json.loads(proc.stdout.split("MEASURED", 1)[1])
    measured_mib = (m["peak"] - m["base"]) / 2**20
    assert abs(measured_mib - est_mib) <= 0.25 * measured_mib, (line, measured_mib)
