"""Packaging: after the README's set-up (an editable install) irtrain imports from the clone
root as from anywhere; a missing, stale or shadowed build of the extension is named."""
from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import irtrain
from irtrain import _extension_problem

ROOT = Path(__file__).resolve().parents[1]


def test_import_from_the_clone_root():
    """`python -c "from irtrain.stats import kendall_tau"` with cwd = the clone root (where
    ./irtrain comes first on sys.path) imports the clone's package with its extension, and no
    warning about the extension."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import warnings; warnings.simplefilter('error')\n"
            "from irtrain.stats import kendall_tau; import irtrain, irtrain._rust as r\n"
            "print(irtrain.__file__); print(r.__file__); print(kendall_tau([1, 2, 3], [1, 3, 2])[0])")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stderr}\n(set up with `pip install -e '.[dev]'` in {ROOT})"
    init, ext, tau = done.stdout.split("\n")[:3]
    assert Path(init) == ROOT / "irtrain" / "__init__.py" and Path(ext).parent == ROOT / "irtrain"
    assert abs(float(tau) - 1 / 3) < 1e-12  # one discordant pair of three


def test_editable_install_is_this_clone():
    """Where irtrain is installed editable (the README's set-up, `scripts/test`), it is this
    clone: CI tests what the README says."""
    try:
        dist = importlib.metadata.distribution("irtrain")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("irtrain is not installed")
    direct = json.loads(dist.read_text("direct_url.json") or "{}")
    if not direct.get("dir_info", {}).get("editable"):
        pytest.skip("irtrain is installed from a wheel, not editable")
    if Path(irtrain.__file__).resolve().parent != ROOT / "irtrain":
        pytest.skip("tests of another tree than the installed one (PYTHONPATH)")
    assert direct["url"] == ROOT.as_uri()


def _tree(tmp_path: Path, *builds: str) -> Path:
    (tmp_path / "rust_ext" / "core" / "src").mkdir(parents=True)
    (tmp_path / "rust_ext" / "core" / "src" / "lib.rs").write_text("// rust\n")
    (tmp_path / "Cargo.toml").write_text("[workspace]\n")
    pkg = tmp_path / "irtrain"
    pkg.mkdir()
    for name in builds:
        (pkg / name).write_bytes(b"")
        os.utime(pkg / name, (2e9, 2e9))  # newer than the sources
    return pkg


def test_a_fresh_build_is_fine(tmp_path):
    assert _extension_problem(_tree(tmp_path, "_rust.abi3.so")) is None


def test_a_stale_build_is_named(tmp_path):
    """A Rust source newer than the build: the build would run old code."""
    pkg = _tree(tmp_path, "_rust.abi3.so")
    os.utime(tmp_path / "rust_ext" / "core" / "src" / "lib.rs", (2e9 + 1, 2e9 + 1))
    problem = _extension_problem(pkg)
    assert problem is not None and "is older than rust_ext/core/src/lib.rs" in problem and "pip install -e '.[dev]'" in problem


def test_a_missing_or_shadowed_build_is_named(tmp_path):
    pkg = _tree(tmp_path)
    assert "_rust*.so is missing" in (_extension_problem(pkg) or "")
    cpython = f"_rust{next(s for s in __import__('importlib.machinery').machinery.EXTENSION_SUFFIXES if 'cpython' in s)}"
    pkg = _tree(tmp_path / "two", "_rust.abi3.so", cpython)
    assert f"Python loads {cpython}" in (_extension_problem(pkg) or "")


def test_an_installed_package_is_not_checked(tmp_path):
    """Without rust_ext/ beside it (an installed wheel) there is nothing to compare."""
    pkg = tmp_path / "irtrain"
    pkg.mkdir()
    assert _extension_problem(pkg) is None


def _documented_outputs() -> set[str]:
    """Relative output paths of the commands the README and examples/ run (`--out PATH`,
    `out = "PATH"`), the quickstart's default and examples/run_all.py's."""
    import re

    from irtrain.config import QuickstartConfig

    texts = [(ROOT / "README.md").read_text(encoding="utf-8")]
    texts += [p.read_text(encoding="utf-8") for p in sorted((ROOT / "examples").glob("*.toml"))]
    found = {m for t in texts for m in re.findall(r"--out[ =]([\w./-]+)", t) + re.findall(r'^out = "([^"]+)"', t, re.M)}
    found |= {QuickstartConfig.out, "examples-out", "examples-out-real"}
    return {p for p in found if not p.startswith(("/", "$", "~", "DIR", "OUT"))}


def test_default_outputs_are_gitignored():
    """Running the README's commands in the clone leaves `git status` clean."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = sorted(_documented_outputs())
    assert {"irtrain-quickstart", "runs/sft", "tiny/sft", "shards/sft", "scores"} <= set(outputs)
    for path in outputs:
        probe = path.rstrip("/") + "/checkpoint-0000001/model.safetensors"
        done = subprocess.run(["git", "check-ignore", "-q", probe], cwd=ROOT, capture_output=True)
        assert done.returncode == 0, f"{path} is not in .gitignore"
