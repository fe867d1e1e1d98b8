"""irtrain: post-training through the lens of implicit reward."""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

#: what a rebuild of the compiled extension depends on, relative to the checkout root
_RUST_SOURCES = ("rust_ext", "Cargo.toml", "Cargo.lock")


def _extension_problem(package: Path) -> str | None:
    """In a source checkout (`package`/../rust_ext exists), what is wrong with the compiled
    extension `irtrain._rust` found in `package`: missing, older than a Rust source (it would
    run old code silently), or several builds of it (one shadows the other); None when it is
    fine or this is an installed package."""
    import importlib.machinery

    root = package.parent
    if not (root / "rust_ext").is_dir():
        return None
    fix = "build it with `pip install -e '.[dev]'` (or `bash scripts/test`) in " + str(root)
    suffixes = importlib.machinery.EXTENSION_SUFFIXES  # in the order Python tries them
    builds = [package / f"_rust{s}" for s in suffixes if (package / f"_rust{s}").is_file()]
    if not builds:
        return f"{package}/_rust*.so is missing: {fix}"
    if len(builds) > 1:
        return f"several builds of irtrain._rust: {', '.join(b.name for b in builds)}; Python loads {builds[0].name}: remove the others and {fix}"
    built = builds[0].stat().st_mtime
    for name in _RUST_SOURCES:
        top = root / name
        files = [top] if top.is_file() else [p for p in top.rglob("*") if p.suffix in (".rs", ".toml") and "target" not in p.parts]
        for p in files:
            if p.stat().st_mtime > built:
                return f"{builds[0]} is older than {p.relative_to(root)}: it runs the old Rust code; re{fix}"
    return None


def _warn_about_extension() -> None:
    import warnings

    problem = _extension_problem(Path(__file__).resolve().parent)
    if problem is not None:
        warnings.warn(problem, RuntimeWarning, stacklevel=3)


_warn_about_extension()
