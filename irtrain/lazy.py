"""Modules imported on first use.

`irtrain.config` (so every command, `--help` included) imports the loss tables and
`irtrain.models`. Where those imported torch at the top, `irtrain prepare` paid about 2 s
and 600 MiB of resident memory for a library it never calls. A module that needs torch only
inside its functions binds `torch = lazy("torch")` instead (and the real import under
`TYPE_CHECKING`, for mypy); the first attribute read imports it.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """Stands for module `name`: attribute reads go to the module, imported on the first."""

    __slots__ = ("_name", "_module")

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def __getattr__(self, attr: str) -> Any:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def lazy(name: str) -> Any:
    return LazyModule(name)
