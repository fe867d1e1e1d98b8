"""Output directories: checked before anything is written."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from irtrain.errors import ConfigError, IrtrainIOError


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
