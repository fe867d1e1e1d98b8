"""`irtrain.durable`: what irtrain publishes is readable as the umask allows, also the files a
library writes through mkstemp (transformers' save_pretrained writes model.safetensors 0600)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from irtrain.durable import publish, temp_name, umask


@pytest.fixture
def set_umask():
    old = os.umask(0o022)
    yield lambda m: os.umask(m)
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    found = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for p in root.rglob("*"):
        if not p.is_symlink():
            found[p.relative_to(root).as_posix()] = stat.S_IMODE(os.lstat(p).st_mode)
    return found


def test_umask_is_read_without_changing_it(set_umask):
    set_umask(0o027)
    assert umask() == 0o027 and umask() == 0o027


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1))


@pytest.mark.parametrize("mask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775), (0o077, 0o600, 0o700)])
def test_a_saved_model_is_published_with_the_umask_modes(set_umask, tiny_model, tmp_path, mask, file_mode, dir_mode):
    """A real `save_pretrained` into a `mkdtemp` directory (0700), published: every file gets
    0666 & ~umask, every directory 0777 & ~umask; an executable keeps its x bits (as the umask
    allows); a link is left alone."""
    import tempfile

    set_umask(mask)
    tmp = Path(tempfile.mkdtemp(dir=tmp_path))
    tiny_model.save_pretrained(tmp)
    assert stat.S_IMODE(os.stat(tmp / "model.safetensors").st_mode) == 0o600  # what transformers leaves
    (tmp / "sub").mkdir(mode=0o700)
    (tmp / "sub" / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp / "sub" / "run.sh", 0o700)
    (tmp / "link").symlink_to("config.json")
    final = publish(tmp, tmp_path / "checkpoint-0000001")
    modes = _modes(final)
    assert modes.pop(".") == dir_mode and modes.pop("sub") == dir_mode
    assert modes.pop("sub/run.sh") == 0o777 & ~mask
    assert set(modes) >= {"model.safetensors", "config.json"}
    assert modes == dict.fromkeys(modes, file_mode)


def test_a_published_file_gets_the_umask_mode(set_umask, tmp_path):
    set_umask(0o022)
    final = tmp_path / "metrics.jsonl"
    tmp = temp_name(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as mkstemp
    os.close(fd)
    publish(tmp, final)
    assert stat.S_IMODE(os.stat(final).st_mode) == 0o644
