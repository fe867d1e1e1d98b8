"""Output directories: checked before anything is written, and held by one run at a time."""
from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from irtrain.errors import ConfigError, IrtrainIOError, LockedError


def check_out_dir(out: Path) -> Path:
    """`--out` must be given and writable (or creatable)."""
    if not str(out) or str(out) == ".":
        raise ConfigError("--out is required (the output directory)")
    if out.exists() and not out.is_dir():
        raise IrtrainIOError(f"--out {out} exists and is not a directory")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise IrtrainIOError(f"--out {out}: {parent} is not a directory")
    try:  # os.access is not enough (root, read-only mounts): try it, leaving nothing behind
        os.rmdir(tempfile.mkdtemp(prefix=".irtrain-probe-", dir=parent))
    except OSError as e:
        raise IrtrainIOError(f"--out {out} is not writable ({parent}: {e.strerror or e})") from None
    return out


class OutLock:
    """An exclusive hold on an output directory for one run: the file `<parent>/.<name>.lock`
    (beside --out, so that replacing --out by a rename keeps it), created with O_EXCL and
    holding the holder's PID, host and command. A second run on the same --out is refused
    with a one-line error naming the holder; a lock left by a dead process of this host is
    taken over, with a note. Use as a context manager, or `acquire()` / `release()`."""

    def __init__(self, out: Path, command: str):
        self.out = Path(out)
        self.path = self.out.parent / f".{self.out.name}.lock"
        self.command = command
        self.held = False
        self.note: str | None = None  # set when a stale lock was taken over

    def acquire(self) -> OutLock:
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
              "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None and self._age() < 5.0:  # another run is writing it right now
                    time.sleep(0.25)
                    continue
                if holder is None or self._stale(holder):
                    self.note = (f"took over the lock {self.path} left by "
                                 f"{_describe(holder) if holder else 'an unreadable holder'}, no longer running")
                    print(f"note: {self.note}", file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                raise LockedError(f"--out {self.out} is in use by {_describe(holder)}; "
                                  "wait for it to finish or pick another --out") from None
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return self
        raise LockedError(f"--out {self.out}: could not take the lock {self.path}")

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder is not None and holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return 0.0

    def _holder(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    @staticmethod
    def _stale(holder: dict) -> bool:
        """The holder ran on this host and its process is gone."""
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, someone else's
            return False
        return False

    def __enter__(self) -> OutLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _describe(holder: dict) -> str:
    return f"`irtrain {holder.get('command', '?')}` (pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('started', '?')})"
