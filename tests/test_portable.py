"""`irtrain.train.portable`: the optimizer state by parameter name, whatever layout wrote it.

The single-process `Strategy` on the tiny Llama of conftest: its optimizer.pt read by name,
the portable files written in bounded chunks and read back, and a strategy resumed from
portable files (what a DeepSpeed checkpoint holds) stepping exactly as the original. The
DeepSpeed side (gathering and setting ZeRO partitions) runs in test_train_deepspeed.py.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

import irtrain.train.portable as portable
from irtrain.config import SFTConfig
from irtrain.errors import ConfigError
from irtrain.train.portable import KEYS, PortableWriter, adamw_state, init_adam_state, read_portable, set_portable
from irtrain.train.strategy import Strategy, _group_order

import test_train_common as common

one_torch_thread = common.one_torch_thread


def _trained(model_dir, steps: int = 2):
    cfg = SFTConfig(model=str(model_dir), out="unused", device="cpu", lr=1e-2, weight_decay=0.1)
    strategy = Strategy(cfg)
    model = strategy.setup(strategy.load_model(model_dir, attn_implementation="eager"))
    for _ in range(steps):
        _step(model, strategy)
    return strategy, model


def _step(model, strategy):
    ids = torch.arange(1, 17)[None]
    strategy.backward(model(input_ids=ids, labels=ids).loss)
    strategy.step(1.0, True)


def _write_like_deepspeed(path, strategy, model):
    """What a DeepSpeed run writes, from the single process's own state (fp32 + moments)."""
    state = strategy.optimizer.state
    step = int(max(float(s["step"]) for s in state.values()))
    out = PortableWriter(path, step, enabled=True)
    for name, p in _group_order(model):
        out.add(f"fp32/{name}", p)
        for k in KEYS:
            out.add(f"{k}/{name}", state[p][k])
    out.close()
    return step


def test_optimizer_pt_is_read_by_parameter_name(tiny_model_dir, tmp_path):
    strategy, model = _trained(tiny_model_dir)
    strategy.save_training_state(tmp_path)
    named = _group_order(model)
    got = read_portable(tmp_path, [n for n, _ in named])
    assert got.step == 2
    for name, p in named:
        for k in KEYS:
            assert torch.equal(got.get(k, name), strategy.optimizer.state[p][k]), (name, k)
        assert got.get("fp32", name) is None  # optimizer.pt holds no weights: they are the model's
    with pytest.raises(ValueError, match="parameters, the model trains"):
        read_portable(tmp_path, [n for n, _ in named][:-1])


def test_files_are_bounded_and_read_back_whole(tiny_model_dir, tmp_path, monkeypatch):
    strategy, model = _trained(tiny_model_dir)
    monkeypatch.setattr(portable, "CHUNK_BYTES", 64 * 1024)
    step = _write_like_deepspeed(tmp_path, strategy, model)
    files = sorted((tmp_path / "portable").glob("optimizer-*.safetensors"))
    assert len(files) > 3
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            assert h.metadata() == {"step": "2"}
            # a file passes the bound by at most its last tensor
            sizes = [h.get_slice(k).get_shape() for k in h.keys()]
            total = sum(4 * int(torch.tensor(s).prod()) for s in sizes)
            assert total - 4 * max(int(torch.tensor(s).prod()) for s in sizes) < portable.CHUNK_BYTES
    named = _group_order(model)
    got = read_portable(tmp_path, [n for n, _ in named])
    assert got.step == step and got.names() == {n for n, _ in named}
    for name, p in named:
        assert torch.equal(got.get("fp32", name), p.detach())
        assert torch.equal(got.get("exp_avg_sq", name), strategy.optimizer.state[p]["exp_avg_sq"])


def test_a_strategy_resumed_from_portable_files_steps_as_the_original(tiny_model_dir, tmp_path):
    """The single-process load of a DeepSpeed checkpoint: fp32 weights into the parameters,
    Adam's moments and step into AdamW; the next step equals the uninterrupted one exactly."""
    strategy, model = _trained(tiny_model_dir)
    _write_like_deepspeed(tmp_path, strategy, model)
    fresh_cfg = SFTConfig(model=str(tiny_model_dir), out="unused", device="cpu", lr=1e-2, weight_decay=0.1)
    fresh = Strategy(fresh_cfg)
    model2 = fresh.setup(fresh.load_model(tiny_model_dir, attn_implementation="eager"))  # the start: weights differ
    fresh.load_training_state(tmp_path, same_layout=False)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    _step(model, strategy)
    _step(model2, fresh)
    for (n, p), (_, q) in zip(model.named_parameters(), model2.named_parameters()):
        assert torch.equal(p, q), n
    assert {float(s["step"]) for s in fresh.optimizer.state.values()} == {3.0}


def test_adamw_state_and_zero_style_setting(tiny_model_dir, tmp_path):
    """`adamw_state` builds a loadable AdamW state dict (parameters without moments start
    fresh); `init_adam_state` + `set_portable` set full tensors through per-parameter setters,
    the DeepSpeed accessors' interface, and name what is missing."""
    strategy, model = _trained(tiny_model_dir)
    strategy.save_training_state(tmp_path)
    named = _group_order(model)
    got = read_portable(tmp_path, [n for n, _ in named])
    sd = adamw_state(strategy.optimizer, named, got)
    assert sd["param_groups"] == strategy.optimizer.state_dict()["param_groups"]
    assert sorted(sd["state"]) == list(range(len(named)))
    assert float(sd["state"][0]["step"]) == 2.0

    flats = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW(flats)
    init_adam_state(opt, flats, 5)
    assert [float(s["step"]) for s in opt.state.values()] == [5.0, 5.0]
    assert all(torch.equal(s["exp_avg"], torch.zeros_like(s["exp_avg"])) for s in opt.state.values())

    seen: dict[tuple[str, str], torch.Tensor] = {}
    set_portable(tmp_path, named, got, device=torch.device("cpu"), fp32=lambda p, v: seen.setdefault(("fp32", ""), v),
                 moment=lambda p, v, k: seen.__setitem__((k, str(id(p))), v))
    assert len(seen) == 2 * len(named)  # no fp32 in optimizer.pt: only the moments are set
    with pytest.raises(ConfigError, match="has no exp_avg for extra"):
        set_portable(tmp_path, [("extra", named[0][1])], got, device=torch.device("cpu"), fp32=lambda p, v: None,
                     moment=lambda p, v, k: None)
