"""`irtrain.train.checkpoint`: atomic checkpoint directories, which of them count, pruning,
the saved state, weights loadable by `from_pretrained`, optimizer and RNG restored, loads
restricted to weights_only, and SIGTERM/SIGINT handling (`StopSignal`).

The model is the tiny 2-layer Llama of conftest (`tiny_model_dir`), run by the real
single-process `Strategy` on CPU.
"""
from __future__ import annotations

import json
import pickle
import signal
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from irtrain.config import SFTConfig, config_to_dict
from irtrain.train.checkpoint import (
    STATE,
    StopSignal,
    TrainState,
    agreed_checkpoint,
    checkpoint_dir,
    file_rank,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    read_state,
    same_layout,
    save_checkpoint,
    saved_layout,
    verify_checkpoint,
)
from irtrain.train.strategy import Strategy

import test_train_common as common

one_torch_thread = common.one_torch_thread


def _strategy_and_model(model_dir, **cfg):
    cfg = SFTConfig(model=str(model_dir), out="unused", device="cpu", lr=1e-2, **cfg)
    strategy = Strategy(cfg)
    model = strategy.setup(strategy.load_model(model_dir, attn_implementation="eager"))
    return cfg, strategy, model


def _train_step(model, strategy):
    """One optimizer step on a fixed input, so the optimizer has state to save."""
    ids = torch.arange(1, 17)[None]
    loss = model(input_ids=ids, labels=ids).loss
    strategy.backward(loss)
    strategy.step(1.0, True)


def _fake_checkpoint(out: Path, step: int) -> Path:
    """A directory that counts as a complete checkpoint: the name and trainer_state.json."""
    d = checkpoint_dir(out, step)
    d.mkdir(parents=True)
    (d / STATE).write_text(json.dumps({"state": {"step": step}}), encoding="utf-8")
    return d


# --------------------------------------------------------------------------- which directories count
def test_only_complete_checkpoint_directories_count(tmp_path):
    """Only `checkpoint-<digits>` directories holding trainer_state.json (written last, just
    before the rename) are checkpoints, ordered by step, not by name or age."""
    assert list_checkpoints(tmp_path / "missing") == [] and latest_checkpoint(tmp_path / "missing") is None
    for step in (10, 2, 300):
        _fake_checkpoint(tmp_path, step)
    leftover = tmp_path / ".checkpoint-0000400.tmp"  # a crash while writing step 400: complete inside, not renamed
    leftover.mkdir()
    (leftover / STATE).write_text("{}", encoding="utf-8")
    (tmp_path / "checkpoint-0000500").mkdir()  # no trainer_state.json
    (tmp_path / "checkpoint-latest").mkdir()
    (tmp_path / "checkpoint-latest" / STATE).write_text("{}", encoding="utf-8")
    (tmp_path / "checkpoint-0000600").write_text("a file")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-0000002", "checkpoint-0000010", "checkpoint-0000300"]
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoint-0000300"


def test_save_writes_under_a_temporary_name_then_renames(tiny_model_dir, tmp_path):
    """While the files are written, only `.checkpoint-<step>.tmp` exists (a stale one from
    a crashed attempt is replaced); after the call only the complete `checkpoint-<step>`."""
    _, strategy, model = _strategy_and_model(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    out = tmp_path / "out"
    stale = out / ".checkpoint-0000003.tmp"
    stale.mkdir(parents=True)
    (stale / "junk").write_text("from a crashed attempt")
    seen = []

    class Watching:
        """The real tokenizer; on save, records what the output directory holds at that moment."""

        def save_pretrained(self, d):
            seen.append((Path(d).name, sorted(p.name for p in out.iterdir()), sorted(p.name for p in Path(d).iterdir())))
            return tokenizer.save_pretrained(d)

    path = save_checkpoint(out, TrainState(step=3), model=model, tokenizer=Watching(), strategy=strategy, config={})
    assert path == out / "checkpoint-0000003"
    name, in_out, in_tmp = seen[0]
    assert name == ".checkpoint-0000003.tmp" and in_out == [".checkpoint-0000003.tmp"]  # the final name not there yet
    assert "junk" not in in_tmp and "model.safetensors" in in_tmp and STATE not in in_tmp  # the state is written last
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-0000003"]
    assert {"model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "rng-0.pt", STATE} <= {p.name for p in path.iterdir()}
    assert list_checkpoints(out) == [path]


# --------------------------------------------------------------------------- pruning
def test_prune_keeps_the_newest_periodic_and_every_protected(tmp_path):
    for step in range(1, 9):
        _fake_checkpoint(tmp_path, step)
    (tmp_path / ".checkpoint-0000009.tmp").mkdir()
    prune_checkpoints(tmp_path, 0, protected={2})  # 0: keep all
    assert len(list_checkpoints(tmp_path)) == 8
    prune_checkpoints(tmp_path, 2, protected={2, 5})
    assert [int(p.name.split("-")[1]) for p in list_checkpoints(tmp_path)] == [2, 5, 7, 8]
    assert (tmp_path / ".checkpoint-0000009.tmp").is_dir()  # not a checkpoint: not pruned
    prune_checkpoints(tmp_path, 1, protected={2, 5, 8})
    assert [int(p.name.split("-")[1]) for p in list_checkpoints(tmp_path)] == [2, 5, 7, 8]  # 7: the newest unprotected
    prune_checkpoints(tmp_path, 1, protected=set())
    assert [int(p.name.split("-")[1]) for p in list_checkpoints(tmp_path)] == [8]


# --------------------------------------------------------------------------- what a checkpoint holds
def test_state_weights_optimizer_and_rng_round_trip(tiny_model_dir, tmp_path):
    cfg, strategy, model = _strategy_and_model(tiny_model_dir)
    _train_step(model, strategy)
    state = TrainState(step=7, rows_consumed=56, tokens=1234, trained_tokens=567, bad_steps=2, bad_in_row=1, elapsed=12.5,
                       extra={"objective": {"lambda": 0.25, "history": [1, 2]}})
    torch.manual_seed(1234)
    torch.rand(3)
    path = save_checkpoint(tmp_path, state, model=model, tokenizer=None, strategy=strategy, config=config_to_dict(cfg), keep=False)
    after_save = torch.rand(5)  # what the RNG gives next, after the save

    # trainer_state.json: the state, the config, the world size, keep
    restored, payload = read_state(path)
    assert restored == state
    assert payload["config"] == json.loads(json.dumps(config_to_dict(cfg))) and payload["world_size"] == 1
    assert payload["keep"] is False

    # the weights: a plain from_pretrained directory with the trained weights
    loaded = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    trained = model.state_dict()
    assert loaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(loaded.state_dict()[k], trained[k]) for k in trained)
    start = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).state_dict()
    assert not all(torch.equal(start[k], trained[k]) for k in trained)  # it did train

    # load_checkpoint: a fresh strategy gets the optimizer state back, the RNG continues as after the save
    _, strategy2, _ = _strategy_and_model(path)
    torch.manual_seed(0)
    assert load_checkpoint(path, strategy=strategy2) == state
    assert torch.equal(torch.rand(5), after_save)
    opt1, opt2 = strategy.optimizer.state_dict(), strategy2.optimizer.state_dict()
    assert opt1["param_groups"] == opt2["param_groups"]
    assert opt1["state"].keys() == opt2["state"].keys() and len(opt1["state"]) > 0
    for k in opt1["state"]:
        for name, v in opt1["state"][k].items():
            assert torch.equal(v, opt2["state"][k][name]), (k, name)


def test_rank_files_are_verified_by_their_rank(tiny_model_dir, tmp_path):
    """A rank's own files (rng-<r>.pt, DeepSpeed's *zero_pp_rank_<r>_*) are checked by that rank
    only; shared files by every rank; `rank=None` checks everything. The layout is recorded."""
    assert [file_rank(n) for n in ["rng-0.pt", "rng-12.pt", "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt",
                                   "deepspeed/bf16_zero_pp_rank_3_mp_rank_00_optim_states.pt",
                                   "deepspeed/zero_pp_rank_2_mp_rank_00_model_states.pt"]] == [0, 12, 1, 3, 2]
    assert [file_rank(n) for n in ["deepspeed/mp_rank_00_model_states.pt", "model.safetensors",
                                   "portable/optimizer-00001.safetensors"]] == [None, None, None]
    cfg, strategy, model = _strategy_and_model(tiny_model_dir)
    _train_step(model, strategy)
    path = save_checkpoint(tmp_path, TrainState(step=1), model=model, tokenizer=None, strategy=strategy, config=config_to_dict(cfg))
    _, payload = read_state(path)
    assert payload["layout"] == {"world_size": 1, "zero_stage": 0} and "rng-0.pt" in payload["files"]
    # as if rank 1 had written a partition: its hash recorded, then the file damaged
    part = path / "deepspeed" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    part.parent.mkdir()
    part.write_bytes(b"partition of rank 1")
    from irtrain.shards import file_sha256

    payload["files"][part.relative_to(path).as_posix()] = file_sha256(part)
    (path / STATE).write_text(json.dumps(payload), encoding="utf-8")
    assert verify_checkpoint(path) is None and verify_checkpoint(path, rank=1) is None
    part.write_bytes(b"partition of rank 1, damaged")
    assert "zero_pp_rank_1" in verify_checkpoint(path)
    assert "zero_pp_rank_1" in verify_checkpoint(path, rank=1)
    assert verify_checkpoint(path, rank=0) is None  # rank 0 does not read it
    (path / "rng-0.pt").write_bytes(b"x")
    assert "rng-0.pt" in verify_checkpoint(path, rank=0) and "rng-0.pt" not in verify_checkpoint(path, rank=1)
    # one process: the agreed checkpoint is the newest that verifies
    assert agreed_checkpoint(tmp_path, strategy)[0] is None


def test_layouts_old_and_new():
    """A checkpoint's layout: recorded, or (older checkpoints) read from its world size and
    --deepspeed; a DeepSpeed JSON config of unknown stage counts as the same stage."""
    assert saved_layout({"layout": {"world_size": 2, "zero_stage": 3}}) == {"world_size": 2, "zero_stage": 3}
    assert saved_layout({"world_size": 2, "config": {"deepspeed": "zero2"}}) == {"world_size": 2, "zero_stage": 2}
    assert saved_layout({"world_size": 1, "config": {"deepspeed": ""}}) == {"world_size": 1, "zero_stage": 0}
    assert saved_layout({"world_size": 4, "config": {"deepspeed": "ds.json"}}) == {"world_size": 4, "zero_stage": -1}
    assert same_layout({"world_size": 4, "zero_stage": -1}, {"world_size": 4, "zero_stage": 2})
    assert not same_layout({"world_size": 4, "zero_stage": -1}, {"world_size": 2, "zero_stage": 2})
    assert not same_layout({"world_size": 1, "zero_stage": 0}, {"world_size": 1, "zero_stage": 2})
    assert not same_layout({"world_size": 2, "zero_stage": 2}, {"world_size": 2, "zero_stage": 3})


class _RunsCode:
    """Unpickling this object calls Path.touch(marker): what weights_only=True must refuse."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("file", ["rng-0.pt", "optimizer.pt"])
def test_loading_refuses_pickled_code(tiny_model_dir, tmp_path, file):
    """rng and optimizer files are read with torch.load(weights_only=True): a file holding a
    pickled callable is refused, and the callable never runs."""
    _, strategy, model = _strategy_and_model(tiny_model_dir)
    path = save_checkpoint(tmp_path / "out", TrainState(step=1), model=model, tokenizer=None, strategy=strategy, config={})
    marker = tmp_path / "code-ran"
    torch.save({"torch": _RunsCode(marker)} if file.startswith("rng") else _RunsCode(marker), path / file)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed"):
        load_checkpoint(path, strategy=strategy)
    assert not marker.exists()
    torch.load(path / file, weights_only=False)  # the same file, loaded unsafely, does run the code
    assert marker.exists()


# --------------------------------------------------------------------------- signals
def test_stop_signal_sets_requested_and_restores_handlers():
    """Inside `StopSignal`, SIGTERM or SIGINT sent to the process sets `requested` (the loop
    checkpoints and stops); further signals are ignored until then (a launcher forwards the
    signal a worker already got from its process group; it must not kill the checkpoint);
    entered again (the loop inside the run) it keeps one set of handlers; on exit the previous
    handlers are back."""
    got = []

    def previous(signum, frame):
        got.append(signum)

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for s in saved:
            signal.signal(s, previous)
        for sig in (signal.SIGTERM, signal.SIGINT):
            with StopSignal() as stop:
                assert signal.getsignal(sig) not in (previous, saved[sig])
                assert not stop.requested and stop.signum is None
                with stop:  # re-entered: the same handlers, still active after the inner exit
                    signal.raise_signal(sig)
                assert stop.requested and stop.signum == sig
                signal.raise_signal(sig)  # a second: ignored, not the previous handler, not fatal
                signal.raise_signal(signal.SIGTERM if sig == signal.SIGINT else signal.SIGINT)
                assert got == [] and stop.signum == sig
            assert signal.getsignal(signal.SIGTERM) is previous and signal.getsignal(signal.SIGINT) is previous
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
    assert signal.getsignal(signal.SIGTERM) is saved[signal.SIGTERM]


def test_stop_signal_before_the_loop_says_so(capfd):
    """A signal while the run loads (StopSignal entered once, the loop not yet inside it) says
    that the run stops after its first step; inside the loop, at the end of this step."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with StopSignal() as stop:
            signal.raise_signal(signal.SIGTERM)
            assert stop.requested
        assert "SIGTERM before training started" in capfd.readouterr().err
        with StopSignal() as stop, stop:
            signal.raise_signal(signal.SIGINT)
        err = capfd.readouterr().err
        assert "SIGINT: a checkpoint is written at the end of this step" in err and "before" not in err
    finally:
        for s, h in saved.items():
            signal.signal(s, h)
