"""`irtrain.paths`: --out is checked before anything is written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from irtrain.errors import ConfigError, IrtrainIOError
from irtrain.paths import check_out_dir


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
