"""Nothing lost, nothing silent: real files of a tiny run are damaged (a byte flipped, a file
truncated, a disk that fills up, a process killed) and each case ends in a one-line error
naming the file, or in a recovery, with no earlier output changed.

- shards: verified against manifest.json on every read -> one-line error, nothing written;
- reference caches: verified against their checksums -> recomputed with a warning, the run
  equals an undamaged one;
- checkpoints: verified before --resume -> the newest good one is used, the skipped one named;
- a full disk (a small tmpfs, or a file-size limit where mounting is not allowed) -> a
  one-line error naming the path, earlier checkpoints intact;
- kill -9 during prepare -> the rerun removes the temporaries and equals a solo run.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from irtrain.train.metrics import read_metrics

from test_train_common import base_args, data_dir, sft, task_shards  # noqa: F401 (fixtures)


def flip_byte(path: Path, at: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def tree_state(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def one_line_error(r) -> str:
    assert r.exit_code != 0
    lines = [x for x in r.output.strip().splitlines() if x.strip()]
    assert "Traceback" not in r.output and len(lines) == 1, r.output
    return lines[0]


# --------------------------------------------------------------------------- shards
@pytest.mark.parametrize("name", ["input_ids.bin", "labels.bin", "row_offsets.bin"])
def test_a_corrupted_shard_is_a_one_line_error_and_nothing_is_written(tiny_model_dir, data_dir, tmp_path, name):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shutil.rmtree(data / "reference", ignore_errors=True)
    flip_byte(data / "shard-00000" / name)
    before = tree_state(data)
    r = sft(*base_args(tiny_model_dir, data, tmp_path / "run", "--max-steps", "1"))
    line = one_line_error(r)
    assert f"shard-00000/{name}" in line and "checksum" in line
    assert not (tmp_path / "run").exists()
    assert tree_state(data) == before  # no cache written into the damaged shards


# --------------------------------------------------------------------------- reference caches
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_reference_cache_is_recomputed_with_a_warning(tiny_model_dir, data_dir, tmp_path, damage):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shutil.rmtree(data / "reference", ignore_errors=True)
    args = ["--model", tiny_model_dir, "--lr", "1e-3", "--global-batch", "8", "--micro-batch", "2", "--warmup-ratio", "0",
            "--no-tensorboard", "--max-steps", "2", "--loss", "pearson", str(data)]
    r = sft("--out", tmp_path / "a", *args)
    assert r.exit_code == 0, r.output
    from safetensors.numpy import load_file

    (cache,) = (data / "reference").glob("*.safetensors")
    good = load_file(str(cache))
    if damage == "flip":
        flip_byte(cache, at=cache.stat().st_size - 3)  # inside the data, past the header
    else:
        truncate(cache, 0.7)
    r = sft("--out", tmp_path / "b", *args)
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and cache.name in r.output and "recomputing" in r.output
    again = load_file(str(cache))  # (the header's key order is not deterministic: compare the arrays)
    assert again.keys() == good.keys() and all((again[k] == good[k]).all() for k in good)
    strip = ("tokens_per_s", "step_time_s", "elapsed_s")
    assert [{k: v for k, v in m.items() if k not in strip} for m in read_metrics(tmp_path / "a")] == \
           [{k: v for k, v in m.items() if k not in strip} for m in read_metrics(tmp_path / "b")]


# --------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def straight_run(tiny_model_dir, data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "run"
    r = sft(*base_args(tiny_model_dir, data_dir, out, "--max-steps", "4", "--save-steps", "1"))
    assert r.exit_code == 0, r.output
    return out


@pytest.mark.parametrize("victim, damage", [("model.safetensors", "truncate"), ("model.safetensors", "flip"),
                                            ("optimizer.pt", "truncate"), ("trainer_state.json", "truncate")])
def test_resume_falls_back_to_the_newest_good_checkpoint(tiny_model_dir, data_dir, straight_run, tmp_path, victim, damage):
    """Checkpoints 1 and 2 of a run; checkpoint 2 damaged: --resume says it skips it and why,
    continues from 1, and ends equal to the straight run."""
    out = tmp_path / "run"
    out.mkdir()
    for k in (1, 2):
        shutil.copytree(straight_run / f"checkpoint-000000{k}", out / f"checkpoint-000000{k}")
    (flip_byte if damage == "flip" else truncate)(out / "checkpoint-0000002" / victim)
    kept = tree_state(out / "checkpoint-0000001")
    r = sft(*base_args(tiny_model_dir, data_dir, out, "--max-steps", "4", "--save-steps", "1", "--resume"))
    assert r.exit_code == 0, r.output
    assert "skips" in r.output and "checkpoint-0000002" in r.output
    assert (victim in r.output) or ("trainer_state.json" in r.output)
    assert tree_state(out / "checkpoint-0000001") == kept
    from safetensors.torch import load_file

    a = load_file(str(out / "checkpoint-0000004" / "model.safetensors"))
    b = load_file(str(straight_run / "checkpoint-0000004" / "model.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)


def test_resume_with_every_checkpoint_damaged_is_an_error(tiny_model_dir, data_dir, straight_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(straight_run / "checkpoint-0000001", out / "checkpoint-0000001")
    truncate(out / "checkpoint-0000001" / "model.safetensors")
    r = sft(*base_args(tiny_model_dir, data_dir, out, "--max-steps", "4", "--resume"))
    assert r.exit_code != 0 and "no usable checkpoint" in r.output and "model.safetensors" in r.output


def test_a_save_step_interrupted_is_written_once(tiny_model_dir, data_dir, tmp_path, monkeypatch):
    """SIGTERM during a step that also saves: that step's checkpoint is written once, not twice."""
    import irtrain.train.loop as loop
    from irtrain.config import SFTConfig, load_config
    from irtrain.sft import SFTObjective

    writes: list[int] = []
    real = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda out, state, **kw: writes.append(state.step) or real(out, state, **kw))

    class SignalAtStep2(SFTObjective):
        def begin_step(self, step, batches):
            if step == 1:
                signal.raise_signal(signal.SIGTERM)

    cfg = load_config(SFTConfig, None, {"model": str(tiny_model_dir), "data": [str(data_dir)], "out": str(tmp_path / "run"),
                                        "max_steps": 4, "save_steps": 1, "global_batch": 8, "micro_batch": 2, "tensorboard": False})
    with pytest.raises(loop.Interrupted):
        loop.train(cfg, SignalAtStep2(cfg))
    assert writes == [1, 2]


# --------------------------------------------------------------------------- a full disk
def _small_disk(tmp_path: Path) -> Path | None:
    mnt = tmp_path / "small-disk"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True, capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return mnt


def test_a_full_disk_while_checkpointing_names_the_path(tiny_model_dir, data_dir, tmp_path):
    """The disk fills up at the first checkpoint (a 1 MiB tmpfs where mounting is allowed, else
    a 1 MiB file-size limit): a one-line error naming the checkpoint; nothing half-written stays."""
    mnt = _small_disk(tmp_path)
    try:
        out = (mnt or tmp_path) / "run"
        cmd = [sys.executable, "-m", "irtrain.cli.main", "sft", *map(str, base_args(tiny_model_dir, data_dir, out, "--max-steps", "1"))]
        pre = None
        if mnt is None:
            import resource

            def pre():
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=pre,
                              env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert proc.returncode == 1, proc.stderr[-3000:]
        err = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
        assert len(err) == 1 and "checkpoint-0000001" in err[0] and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert not list(out.glob(".checkpoint-*")) and not list(out.glob("checkpoint-*"))
    finally:
        if mnt is not None:
            subprocess.run(["umount", str(mnt)], capture_output=True)


def test_a_full_disk_during_prepare_names_the_path(tiny_model_dir, tmp_path):
    from irtrain.tasks import make_task, write_task

    files = write_task(make_task(400, 0, 0, seed=0), tmp_path / "jsonl")
    mnt = _small_disk(tmp_path)
    if mnt is None:
        pytest.skip("cannot mount a small tmpfs here (the checkpoint test covers the write-limit path)")
    try:
        (mnt / "filler").write_bytes(b"\0" * (1024 * 1024 - 64 * 1024))
        out = mnt / "shards"
        proc = subprocess.run([sys.executable, "-m", "irtrain.cli.main", "prepare", str(files["sft"]), "--tokenizer", str(tiny_model_dir),
                               "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1
        err = [x for x in proc.stderr.strip().splitlines() if x.startswith("error:")]
        assert len(err) == 1 and str(out) in err[0] and "no space left" in err[0], proc.stderr[-2000:]
        assert sorted(p.name for p in mnt.iterdir()) == ["filler"]  # no temporary left
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --------------------------------------------------------------------------- kill -9 during prepare
def test_kill_during_prepare_then_rerun_leaves_no_temporary(tiny_model_dir, tmp_path):
    from irtrain.tasks import make_task, write_task

    files = write_task(make_task(6000, 0, 0, seed=3), tmp_path / "jsonl")
    args = [sys.executable, "-m", "irtrain.cli.main", "prepare", str(files["sft"]), "--tokenizer", str(tiny_model_dir),
            "--threads", "1", "--shard-rows", "64"]
    out = tmp_path / "shards"
    proc = subprocess.Popen([*args, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".shards.tmp-*/shard-00000")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = list(tmp_path.glob(".shards.tmp-*"))
    assert left, "the kill came too late to leave a temporary (the test did not test anything)"
    subprocess.run([*args, "--out", str(out)], check=True, capture_output=True, timeout=300)
    assert not list(tmp_path.glob(".shards.*")), list(tmp_path.iterdir())
    subprocess.run([*args, "--out", str(tmp_path / "solo")], check=True, capture_output=True, timeout=300)
    a, b = json.loads((out / "manifest.json").read_text()), json.loads((tmp_path / "solo" / "manifest.json").read_text())
    assert a["content_hash"] == b["content_hash"]


def test_a_signal_before_the_first_step_is_not_lost(tiny_model_dir, data_dir, tmp_path):
    """SIGTERM while the run is still loading (here: during the objective's setup, where the
    reference pass runs): the run trains its first step, checkpoints it and stops with the
    message, instead of dying silently."""
    import irtrain.train.loop as loop
    from irtrain.config import SFTConfig, load_config
    from irtrain.sft import SFTObjective
    from irtrain.train.checkpoint import list_checkpoints

    class SignalDuringSetup(SFTObjective):
        def setup(self, ctx):
            super().setup(ctx)
            signal.raise_signal(signal.SIGTERM)

    cfg = load_config(SFTConfig, None, {"model": str(tiny_model_dir), "data": [str(data_dir)], "out": str(tmp_path / "run"),
                                        "max_steps": 4, "global_batch": 8, "micro_batch": 2, "tensorboard": False})
    with pytest.raises(loop.Interrupted, match="interrupted by signal at step 1/4"):
        loop.train(cfg, SignalDuringSetup(cfg))
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["checkpoint-0000001"]


def test_two_prepares_on_one_out(tiny_model_dir, tmp_path):
    """Two prepare processes racing on one --out: exactly one writes it, the other exits 1
    with the lock message; the output equals a solo run's."""
    from irtrain.tasks import make_task, write_task

    files = write_task(make_task(3000, 0, 0, seed=5), tmp_path / "jsonl")
    args = [sys.executable, "-m", "irtrain.cli.main", "prepare", str(files["sft"]), "--tokenizer", str(tiny_model_dir), "--threads", "1"]
    procs = [subprocess.Popen([*args, "--out", str(tmp_path / "shards")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    if codes == [0, 0]:  # the first finished before the second looked: a cache hit, no race to test
        pytest.skip("the two prepares did not overlap on this machine")
    assert codes == [0, 1], results
    loser = next(err for rc, err in results if rc == 1)
    assert "is in use by" in loser or "lock" in loser, loser
    subprocess.run([*args, "--out", str(tmp_path / "solo")], check=True, capture_output=True, timeout=300)
    a, b = (json.loads((tmp_path / d / "manifest.json").read_text()) for d in ("shards", "solo"))
    assert a["content_hash"] == b["content_hash"]
    assert not list(tmp_path.glob(".shards.*"))


def test_a_damaged_kto_cache_is_recomputed_with_a_warning(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer
    from typer.testing import CliRunner

    from irtrain.cli.main import app

    from test_dpo import write_unpaired

    data = write_unpaired(AutoTokenizer.from_pretrained(str(tiny_model_dir)), tmp_path / "unpaired", n=16)
    args = ["dpo", "--model", str(tiny_model_dir), "--loss", "kto", "--lr", "1e-3", "--global-batch", "4", "--micro-batch", "2",
            "--max-steps", "2", "--no-tensorboard", str(data)]
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    (cache,) = (data / "reference").glob("kto-mismatched-*.safetensors")
    flip_byte(cache, at=cache.stat().st_size - 2)
    r = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "b")])
    assert r.exit_code == 0, r.output
    assert "warning:" in r.output and cache.name in r.output
    assert [m["loss"] for m in read_metrics(tmp_path / "a")] == [m["loss"] for m in read_metrics(tmp_path / "b")]
