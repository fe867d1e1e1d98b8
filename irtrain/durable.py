"""Durable outputs: what irtrain writes survives a crash or a power cut whole or not at all,
and what a killed run leaves behind is cleaned up by the next one.

- `publish(tmp, final)`: fsync every file of `tmp` (a file or a directory tree) and its
  directories, then rename it onto `final`, then fsync the parent; when `final` exists it is
  first moved aside (never deleted before its replacement is in place), so `final` is
  always either the old output or the new one.
- `temp_name(final)`: `.NAME.tmp-PID`, the one spelling of a temporary output;
  `sweep_temps(parent, name)` removes the temporaries of `name` left by processes of this
  host that are gone (a live PID's are kept: that run is still writing).
- `share_modes(path)`: what irtrain publishes gets the modes the umask allows (files
  0666 & ~umask, directories 0777 & ~umask), also where a library wrote through `mkstemp`
  (0600: transformers' `save_pretrained` writes model.safetensors so); `publish` calls it.
- `io_error(e, path, doing)`: an `OSError` (a full disk, no permission) as a one-line
  `IrtrainIOError` naming the path.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import stat
from pathlib import Path

from irtrain.errors import IrtrainIOError


def temp_name(final: Path, kind: str = "tmp") -> Path:
    """The temporary (or `old`) path beside `final` for this process."""
    return final.parent / f".{final.name}.{kind}-{os.getpid()}"


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync a file, or every file and directory under `path` (deepest first) and `path`."""
    if path.is_dir():
        for root, _dirs, files in os.walk(path, topdown=False):
            for name in files:
                _fsync_path(Path(root) / name)
            _fsync_path(Path(root))
    else:
        _fsync_path(path)


def umask() -> int:
    """The process umask, read without changing it where Linux shows it (/proc/self/status);
    else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def share_modes(path: Path) -> None:
    """Set the modes of `path` (a file, or a tree: every file and directory, not following
    links) to what `open` and `mkdir` give under the umask: files 0666 & ~umask (0777 &
    ~umask when the owner may execute them), directories 0777 & ~umask; so colleagues on a
    shared filesystem read the weights as the umask allows, and a umask of 077 keeps them
    private."""
    mask = umask()
    paths = [path]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            paths += [Path(root) / n for n in (*dirs, *files)]
    for p in paths:
        st = os.lstat(p)
        if stat.S_ISLNK(st.st_mode):
            continue
        full = 0o777 if stat.S_ISDIR(st.st_mode) or st.st_mode & stat.S_IXUSR else 0o666
        if stat.S_IMODE(st.st_mode) != full & ~mask:
            os.chmod(p, full & ~mask)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(tmp: Path, final: Path) -> Path:
    """Make `tmp` durable and put it at `final` (see the module docstring): a file by one
    atomic rename; a directory onto an existing one by an atomic exchange where the kernel has
    it (else moved aside first, never deleted before its replacement is in place); modes as
    the umask allows (`share_modes`)."""
    share_modes(tmp)
    fsync_tree(tmp)
    old = None
    if final.is_dir() and not final.is_symlink():
        if _exchange(tmp, final):
            old = tmp  # now holds the previous output
        else:
            old = temp_name(final, "old")
            if old.exists():
                _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
    else:
        os.replace(tmp, final)
    _fsync_path(final.parent)
    if old is not None:
        _remove(old)
    return final


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temps(parent: Path, name: str, *, regex: bool = False) -> list[Path]:
    """Remove `.NAME.tmp-PID` / `.NAME.old-PID` left in `parent` by dead processes (and
    `.NAME.tmp` without a PID, the loop's checkpoint temporaries, which only the holder of the
    output's lock writes). `name` is a literal, or a regular expression with `regex=True`.
    Returns what was removed."""
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.(?:{name if regex else re.escape(name)})\.(?:tmp|old)(?:-(\d+))?$")
    removed = []
    for p in parent.iterdir():
        m = pattern.match(p.name)
        if m is None:
            continue
        pid = int(m.group(1)) if m.group(1) else None
        if pid is not None and (pid == os.getpid() or _alive(pid)):
            continue
        _remove(p)
        removed.append(p)
    return removed


def io_error(e: OSError, path: Path | str, doing: str = "write") -> IrtrainIOError:
    """A one-line error naming the path: "cannot write PATH: No space left on device"."""
    reason = e.strerror or str(e)
    if e.errno == errno.ENOSPC:
        reason = "no space left on device (free some space, or point the output elsewhere)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"{e.strerror or 'permission denied'} (check the permissions of the directory)"
    return IrtrainIOError(f"cannot {doing} {path}: {reason}")
