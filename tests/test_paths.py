"""`irtrain.paths`: --out is checked before anything is written and held by one run at a time."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from irtrain.errors import ConfigError, IrtrainIOError, LockedError
from irtrain.paths import OutLock, check_out_dir
from irtrain.train.metrics import read_metrics

from test_train_common import data_dir, task_shards  # noqa: F401  (fixtures)


def test_out_dir_checks_leave_nothing_behind(tmp_path):
    assert check_out_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created
    assert list(tmp_path.iterdir()) == []  # the write probe is removed
    with pytest.raises(ConfigError, match=r"--out is required"):
        check_out_dir(Path(""))
    (tmp_path / "file").write_text("x")
    with pytest.raises(IrtrainIOError, match=r"exists and is not a directory"):
        check_out_dir(tmp_path / "file")
    with pytest.raises(IrtrainIOError, match=r"is not a directory"):
        check_out_dir(tmp_path / "file" / "below")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only directories; the probe is tested where it can fail")
def test_out_dir_not_writable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(IrtrainIOError, match="is not writable"):
            check_out_dir(ro / "out")
    finally:
        ro.chmod(0o700)


# --------------------------------------------------------------------------- one run per --out
def test_lock_is_exclusive_names_its_holder_and_is_released(tmp_path):
    out = tmp_path / "run"
    with OutLock(out, "sft") as lock:
        holder = json.loads(lock.path.read_text())
        assert lock.path == tmp_path / ".run.lock" and holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(LockedError, match=rf"^--out {out} is in use by `irtrain sft` \(pid {os.getpid()} on {socket.gethostname()}, since .*\); "
                                              "wait for it to finish or pick another --out$"):
            OutLock(out, "dpo").acquire()
    assert not lock.path.exists()
    assert list(tmp_path.iterdir()) == []


def test_a_stale_lock_is_taken_over_with_a_note(tmp_path, capsys):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that no longer runs
    path = tmp_path / ".run.lock"
    path.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "command": "prepare", "started": "then"}))
    with OutLock(tmp_path / "run", "sft") as lock:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        assert lock.note is not None and f"pid {dead.pid}" in lock.note
    assert f"note: took over the lock {path}" in capsys.readouterr().err
    # a lock held on another host is never taken over (its PID means nothing here)
    path.write_text(json.dumps({"pid": dead.pid, "host": "elsewhere", "command": "sft", "started": "now"}))
    with pytest.raises(LockedError, match=f"pid {dead.pid} on elsewhere"):
        OutLock(tmp_path / "run", "sft").acquire()


def test_two_concurrent_runs_on_one_out(tiny_model_dir, data_dir, tmp_path):  # noqa: F811
    """Two `irtrain sft` on one --out at once: exactly one runs, the other exits 1 with the lock
    message; the survivor's output equals a solo run's. (The first is stopped with SIGSTOP
    while the second tries, so the test does not depend on timing.)"""
    out = tmp_path / "shared"
    args = ["--model", tiny_model_dir, "--lr", "1e-3", "--global-batch", "8", "--micro-batch", "2", "--max-steps", "12",
            "--no-kl-metrics", "--no-tensorboard", data_dir]
    cmd = [sys.executable, "-m", "irtrain.cli.main", "sft", *map(str, args)]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    first = subprocess.Popen([*cmd, "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".shared.lock"
    deadline = time.monotonic() + 120
    while not lock.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert lock.exists(), first.communicate()
    first.send_signal(signal.SIGSTOP)  # hold the first run still while the second tries: no race on timing
    try:
        second = subprocess.run([*cmd, "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1
    assert f"--out {out} is in use by `irtrain sft` (pid {first.pid} on {socket.gethostname()}" in second.stderr + second.stdout
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert not lock.exists()
    solo = subprocess.run([*cmd, "--out", str(tmp_path / "solo")], env=env, capture_output=True, text=True, timeout=300)
    assert solo.returncode == 0, solo.stderr[-3000:]
    keep = ("step", "loss", "grad_norm", "lr", "tokens", "trained_tokens")
    assert [{k: m[k] for k in keep} for m in read_metrics(out)] == [{k: m[k] for k in keep} for m in read_metrics(tmp_path / "solo")]
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in (tmp_path / "solo").iterdir())
