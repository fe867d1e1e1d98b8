"""The package's shape: no import cycle, modules of a readable size, a loop that reads top to
bottom, one place to add a loss. Read from the source tree (the installed copy is the same
files), with `ast`: nothing is imported."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "irtrain"
MAX_LINES = 450
#: a module over MAX_LINES says why at its top, in its docstring, with this phrase
REASON = "Why one module"


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for p in sorted(PKG.rglob("*.py")):
        if "__pycache__" in p.parts:
            continue
        found[_module_name(p)] = p
    return found


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """irtrain modules `path` imports anywhere (module level or inside functions), except under
    `if TYPE_CHECKING:` (annotations only, never executed)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if _type_checking_block(node):
            skip.update(id(n) for n in ast.walk(node))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in modules:  # `from irtrain.dpo import x` -> irtrain.dpo
                t = t.rpartition(".")[0]
            if t and t != name and t.startswith("irtrain"):
                out.add(t)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    names = set(mods)
    return {name: _imports(path, name, names) for name, path in mods.items()}


def test_the_graph_is_read():
    g = _graph()
    assert len(g) > 30
    assert "irtrain.train.loop" in g["irtrain.sft"] and "irtrain.losses" in g["irtrain.dpo.objective"]


def test_no_import_cycle():
    """Tarjan's strongly connected components over the import graph: every one is a single
    module. A package's __init__ may import its own submodules (they import siblings, never
    the package)."""
    g = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    assert cycles == [], f"import cycles in irtrain/: {cycles}"


def test_modules_are_small_or_say_why():
    long = []
    for name, path in _modules().items():
        n = len(path.read_text(encoding="utf-8").splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
        if n > MAX_LINES and REASON not in doc:
            long.append(f"{name}: {n} lines")
    assert long == [], f"modules over {MAX_LINES} lines without a '{REASON}' paragraph at the top: {long}"


def test_train_reads_in_under_100_lines():
    tree = ast.parse((PKG / "train" / "loop.py").read_text(encoding="utf-8"))
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "train")
    assert fn.end_lineno is not None
    assert fn.end_lineno - fn.lineno + 1 < 100


def test_cli_never_imports_the_extension():
    """The private Rust module is reached through irtrain.data / irtrain.stats only."""
    for path in (ROOT / "cli").glob("*.py"):
        assert "_rust" not in path.read_text(encoding="utf-8"), path
    importers = {name for name, path in _modules().items()
                 if re.search(r"^\s*(from irtrain import _rust|import irtrain\._rust|from irtrain\._rust)",
                              path.read_text(encoding="utf-8"), re.M)}
    assert importers == {"irtrain.data", "irtrain.stats"}


# --------------------------------------------------------------------------- one place to add a loss
def test_config_choices_are_the_registries():
    """A new loss or estimator is one entry in its table: the config's choices and help come
    from the tables."""
    import dataclasses

    from irtrain.config import DPOConfig, SFTConfig
    from irtrain.losses import KL_ESTIMATORS, PREFERENCE_LOSSES, SFT_LOSSES

    fields = {(cls, f.name): f for cls in (SFTConfig, DPOConfig) for f in dataclasses.fields(cls)}
    for (cls, name), registry in (((SFTConfig, "loss"), SFT_LOSSES), ((DPOConfig, "loss"), PREFERENCE_LOSSES),
                                  ((SFTConfig, "kl_estimator"), KL_ESTIMATORS), ((DPOConfig, "kl_estimator"), KL_ESTIMATORS)):
        meta = fields[(cls, name)].metadata
        assert meta["choices"] == tuple(registry), (cls.__name__, name)
        for key, entry in registry.items():
            assert key in meta["help"] and entry.summary and entry.summary in meta["help"], (cls.__name__, name, key)


@pytest.mark.parametrize("table", ["SFT_LOSSES", "PREFERENCE_LOSSES", "KL_ESTIMATORS"])
def test_a_new_table_entry_reaches_the_config(table, monkeypatch):
    """Adding an entry to a table (and nothing else) makes it a valid choice: a fresh copy of
    the config module, built while the table holds the new entry, accepts it."""
    import importlib.util
    import sys

    import irtrain.losses

    registry = getattr(irtrain.losses, table)
    monkeypatch.setitem(registry, "brand_new", next(iter(registry.values())))
    spec = importlib.util.spec_from_file_location("irtrain_config_copy", PKG / "config.py")
    assert spec is not None and spec.loader is not None
    fresh = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "irtrain_config_copy", fresh)  # dataclasses and type hints look it up
    spec.loader.exec_module(fresh)
    cls, field = {"SFT_LOSSES": ("SFTConfig", "loss"), "PREFERENCE_LOSSES": ("DPOConfig", "loss"),
                  "KL_ESTIMATORS": ("SFTConfig", "kl_estimator")}[table]
    assert getattr(fresh.load_config(getattr(fresh, cls), None, {field: "brand_new"}), field) == "brand_new"


def test_the_cli_and_prepare_do_not_import_torch():
    """`irtrain --help`, `irtrain prepare` and the config they parse never touch torch (it
    costs ~2 s and ~600 MiB of resident memory): torch-using modules they import bind it
    lazily (irtrain.lazy)."""
    import subprocess
    import sys

    code = ("import sys, irtrain.cli.main, irtrain.config, irtrain.prepare, irtrain.losses, irtrain.models\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
