"""irtrain.extras: a flag whose optional package is missing is a one-line error naming the pip
command, before anything is written. The absence is real: the subprocess runs with the package
made unimportable (conftest `without`), not with irtrain patched."""
from __future__ import annotations

import subprocess
import sys

import pytest

from irtrain.errors import MissingExtraError
from irtrain.extras import PIP, installed, require

import test_train_common as common

one_torch_thread, task_shards, data_dir = common.one_torch_thread, common.task_shards, common.data_dir


def irtrain(*args: object, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "irtrain.cli.main", *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=600)


def test_require_names_the_pip_command():
    assert require("json", "--x").__name__ == "json"
    with pytest.raises(MissingExtraError, match=r"^--x needs no_such_package_xyz, which is not installed: pip install no_such_package_xyz$"):
        require("no_such_package_xyz.sub", "--x")
    assert installed("json") and not installed("no_such_package_xyz")
    assert PIP["deepspeed"] == "pip install 'irtrain[deepspeed]'"  # the extra in pyproject.toml, not the bare package


def test_blocked_import_is_real(without):
    """The blocker makes the import itself fail, as an uninstalled package does."""
    r = subprocess.run([sys.executable, "-c", "import importlib.util, sys\nassert importlib.util.find_spec('deepspeed') is None\n"
                        "import deepspeed"], env=without("deepspeed"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "ModuleNotFoundError" in r.stderr, r.stderr


def test_deepspeed_missing(without, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    r = irtrain("sft", "--model", tiny_model_dir, "--out", out, "--deepspeed", "zero2", "--max-steps", "1", data_dir,
                env=without("deepspeed"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: --deepspeed zero2 needs deepspeed, which is not installed: pip install 'irtrain[deepspeed]'"]
    assert not out.exists()  # nothing written


@pytest.mark.parametrize("report_to,missing", [("tensorboard,mlflow", "mlflow"), ("wandb", "wandb")])
def test_tracker_missing(without, tiny_model_dir, data_dir, tmp_path, report_to, missing):
    out = tmp_path / "run"
    r = irtrain("sft", "--model", tiny_model_dir, "--out", out, "--report-to", report_to, "--max-steps", "1", data_dir,
                env=without(missing))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"error: --report-to {missing} needs {missing}, which is not installed: pip install {missing}"]
    assert not out.exists()  # nothing written


def test_peft_missing(without, tiny_model_dir, data_dir, tmp_path):
    out = tmp_path / "run"
    r = irtrain("sft", "--model", tiny_model_dir, "--out", out, "--lora-r", "8", "--max-steps", "1", data_dir, env=without("peft"))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: --lora-r needs peft, which is not installed: pip install peft"]
    assert not out.exists()
