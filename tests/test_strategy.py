"""`irtrain.train.strategy`: the single-process `Strategy` (AdamW groups, clipping, the
non-finite skip), the DeepSpeed config it fills in, and which strategy a config gets.

Tensors small enough to check by hand (an nn.Linear with gradients set directly) where the
arithmetic is the point; the tiny Llama of conftest where the model's parameters matter.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from irtrain.cli.main import app
from irtrain.config import SFTConfig
from irtrain.errors import ConfigError
from irtrain.train.strategy import Strategy, deepspeed_config, make_strategy

import test_train_common as common

one_torch_thread = common.one_torch_thread


def _cfg(**kw) -> SFTConfig:
    return SFTConfig(model="unused", out="unused", **{"device": "cpu", **kw})


def _linear(strategy: Strategy) -> torch.nn.Linear:
    """nn.Linear(3 -> 2) with zero weights, set up by `strategy`; weight.grad[0, 0] = 3 and
    bias.grad[1] = 4 (all else 0): a gradient of norm exactly 5."""
    lin = torch.nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    model = strategy.setup(lin)
    model.weight.grad = torch.zeros(2, 3)
    model.weight.grad[0, 0] = 3.0
    model.bias.grad = torch.zeros(2)
    model.bias.grad[1] = 4.0
    return model


# --------------------------------------------------------------------------- AdamW
def test_adamw_groups_no_weight_decay_on_1d_params(tiny_model_dir):
    """Two AdamW groups: every >= 2-D parameter with --weight-decay, every 1-D one (the norm
    weights) without; frozen parameters in neither; lr, betas, eps from the flags. A step
    with zero gradients shows it: decayed weights shrink by exactly (1 - lr * wd), the rest stay."""
    cfg = _cfg(lr=0.01, weight_decay=0.5, adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6)
    strategy = Strategy(cfg)
    model = strategy.load_model(tiny_model_dir, attn_implementation="eager")
    model.model.embed_tokens.weight.requires_grad_(False)
    model = strategy.setup(model)
    groups = strategy.optimizer.param_groups
    assert len(groups) == 2
    assert groups[0]["weight_decay"] == 0.5 and groups[1]["weight_decay"] == 0.0
    for g in groups:
        assert (g["lr"], g["betas"], g["eps"]) == (0.01, (0.8, 0.9), 1e-6)
    trainable = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    decayed = {trainable[id(p)] for p in groups[0]["params"]}
    plain = {trainable[id(p)] for p in groups[1]["params"]}
    params = dict(model.named_parameters())
    assert decayed == {n for n in trainable.values() if params[n].dim() >= 2}
    assert plain == {n for n in trainable.values() if params[n].dim() == 1} and any("norm" in n for n in plain)
    assert "model.embed_tokens.weight" not in decayed | plain
    before = {n: p.detach().clone() for n, p in params.items()}
    for n in trainable.values():
        params[n].grad = torch.zeros_like(params[n])
    norm, applied = strategy.step(1.0, True)
    assert (norm, applied) == (0.0, True)
    for n, p in params.items():
        expect = before[n] * (1 - 0.01 * 0.5) if n in decayed else before[n]
        torch.testing.assert_close(p.detach(), expect, rtol=0, atol=1e-7)


def test_step_clips_to_max_grad_norm_and_returns_the_norm_before():
    """A gradient of norm 5 clipped to 1 is (0.6, 0.8) on its two entries. AdamW's first step
    moves each weight by lr * g / (|g| + eps); with eps = 1 that shows the clipping: 0.375 and
    0.8/1.8 times lr clipped, 0.75 and 0.8 times lr without clipping (--max-grad-norm 0)."""
    lr = 0.1
    for max_norm, (w00, b1) in ((1.0, (0.6 / 1.6, 0.8 / 1.8)), (0.0, (3 / 4, 4 / 5)), (10.0, (3 / 4, 4 / 5))):
        strategy = Strategy(_cfg(lr=lr, adam_eps=1.0, weight_decay=0.0))
        model = _linear(strategy)
        norm, applied = strategy.step(max_norm, True)
        assert norm == pytest.approx(5.0) and applied is True
        expect_w = torch.zeros(2, 3)
        expect_w[0, 0] = -lr * w00
        torch.testing.assert_close(model.weight.detach(), expect_w, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(model.bias.detach(), torch.tensor([0.0, -lr * b1]), rtol=1e-5, atol=1e-7)
        assert model.weight.grad is None and model.bias.grad is None  # gradients dropped after the step


def test_non_finite_loss_or_norm_skips_the_step():
    """A non-finite loss, or a non-finite gradient, skips the step: weights and optimizer state
    untouched, gradients dropped, (norm, False) returned."""
    for finite_loss, bad_grad in ((False, None), (True, float("nan")), (True, float("inf"))):
        strategy = Strategy(_cfg(lr=0.1))
        model = _linear(strategy)
        if bad_grad is not None:
            model.bias.grad[0] = bad_grad
        norm, applied = strategy.step(1.0, finite_loss)
        assert applied is False
        assert norm == pytest.approx(5.0) if bad_grad is None else not math.isfinite(norm)
        assert torch.equal(model.weight.detach(), torch.zeros(2, 3)) and torch.equal(model.bias.detach(), torch.zeros(2))
        assert model.weight.grad is None and model.bias.grad is None
        assert strategy.optimizer.state_dict()["state"] == {}  # no moment was updated
        # the next good step is a first step: as if the skipped one never happened
        model.weight.grad = torch.zeros(2, 3)
        model.weight.grad[0, 0] = 3.0
        assert strategy.step(0.0, True) == (3.0, True)
        assert model.weight.detach()[0, 0].item() == pytest.approx(-0.1 * 3 / (3 + 1e-8))


def test_set_lr_sets_every_group(tiny_model_dir):
    strategy = Strategy(_cfg(lr=1.0, weight_decay=0.1))
    strategy.setup(strategy.load_model(tiny_model_dir, attn_implementation="eager"))
    strategy.set_lr(0.125)
    assert [g["lr"] for g in strategy.optimizer.param_groups] == [0.125, 0.125]


# --------------------------------------------------------------------------- the DeepSpeed config
def test_deepspeed_presets_fill_in_from_the_flags():
    """16 rows a step, 2 per micro-batch, on 2 ranks: 4 accumulation steps; clipping is
    --max-grad-norm; bf16 as the strategy decides (and then its overflow check skips a
    non-finite step)."""
    cfg = _cfg(micro_batch=2, global_batch=16, max_grad_norm=0.5)
    for spec, stage in (("zero1", 1), ("zero2", 2), ("zero3", 3)):
        for bf16 in (True, False):
            ds = deepspeed_config(spec, cfg, bf16=bf16, world_size=2)
            assert ds["zero_optimization"]["stage"] == stage
            assert ("stage3_gather_16bit_weights_on_model_save" in ds["zero_optimization"]) is (stage == 3)
            assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 4, 16)
            assert ds["gradient_clipping"] == 0.5
            assert ds["bf16"] == ({"enabled": True, "check_grad_overflow": True} if bf16 else {"enabled": False})
            assert "optimizer" not in ds and "scheduler" not in ds
    # a token budget per step: the loop decides the micro-batches, DeepSpeed is told 1 accumulation step
    ds = deepspeed_config("zero2", _cfg(micro_batch=3, global_batch_tokens=4096), bf16=False, world_size=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 1, 12)


def test_deepspeed_json_file_auto_values_are_filled_and_the_rest_kept(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto",
        "gradient_clipping": 0.25, "bf16": {"enabled": "auto"}, "steps_per_print": 5,
        "zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "overlap_comm": True}}))
    ds = deepspeed_config(str(path), _cfg(micro_batch=2, global_batch=16, max_grad_norm=1.0), bf16=True, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 4, 16)
    assert ds["gradient_clipping"] == 0.25 and ds["steps_per_print"] == 5  # set in the file: kept
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True}
    assert ds["zero_optimization"] == {"stage": 3, "overlap_comm": True}  # "auto" there: DeepSpeed's default
    # a micro-batch set in the file is kept, and the batch size follows it: 3 x 4 x 2
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3}))
    ds = deepspeed_config(str(path), _cfg(micro_batch=2, global_batch=16), bf16=False, world_size=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (3, 4, 24)
    assert ds["zero_optimization"] == {} and ds["gradient_clipping"] == 1.0


def test_deepspeed_config_errors(tmp_path):
    cfg = _cfg()
    with pytest.raises(ConfigError, match=r"--deepspeed 'zero4' is neither zero1\|zero2\|zero3 nor an existing JSON file"):
        deepspeed_config("zero4", cfg, bf16=False, world_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="bad.json: not valid JSON"):
        deepspeed_config(str(bad), cfg, bf16=False, world_size=1)
    for key in ("optimizer", "scheduler"):
        bad.write_text(json.dumps({key: {"type": "AdamW"}}))
        with pytest.raises(ConfigError, match="must not set 'optimizer' or 'scheduler'"):
            deepspeed_config(str(bad), cfg, bf16=False, world_size=1)


# --------------------------------------------------------------------------- which strategy
def test_make_strategy_is_single_process_without_deepspeed(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    s = make_strategy(_cfg())
    assert type(s) is Strategy and s.name == "single"
    assert (s.rank, s.local_rank, s.world_size, s.device, s.is_main) == (0, 0, 1, torch.device("cpu"), True)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="WORLD_SIZE=2 but without --deepspeed"):
        make_strategy(_cfg())


_PICK = """
import sys
from irtrain.config import SFTConfig
from irtrain.train.strategy import make_strategy
s = make_strategy(SFTConfig(device="cpu"))
print("picked:", type(s).__name__, "deepspeed" in sys.modules)
s = make_strategy(SFTConfig(device="cpu", deepspeed="zero2", micro_batch=2, global_batch=4))
print("picked:", type(s).__name__, s.stage, s.world_size, s.device.type, s.ds_config["gradient_accumulation_steps"])
"""


def test_make_strategy_picks_deepspeed_only_with_the_flag():
    """In a fresh process (DeepSpeed starts a process group): without --deepspeed the single
    strategy, and deepspeed is not even imported; with --deepspeed zero2, a 1-process
    DeepSpeed ZeRO-2 strategy."""
    pytest.importorskip("deepspeed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _PICK], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    picked = [ln for ln in proc.stdout.splitlines() if ln.startswith("picked: ")]  # DeepSpeed prints too
    assert picked == ["picked: Strategy False", "picked: DeepSpeedStrategy 2 1 cpu 2"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_device_cuda_without_a_gpu_is_a_one_line_error(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="^--device cuda was asked for but no CUDA GPU is available$"):
        Strategy(_cfg(device="cuda"))
    from transformers import AutoTokenizer

    data = common.make_sft_shards(AutoTokenizer.from_pretrained(str(tiny_model_dir)), tmp_path / "data", n=8)
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["sft", "--model", str(tiny_model_dir), "--out", str(out), "--device", "cuda", str(data)])
    assert r.exit_code == 1
    assert r.output.strip() == "error: --device cuda was asked for but no CUDA GPU is available"
    assert not out.exists()
