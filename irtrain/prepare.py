"""`irtrain prepare`: not built yet (issue 2)."""
from __future__ import annotations

from irtrain.errors import NotBuiltError


def run(cfg) -> None:
    raise NotBuiltError("irtrain prepare is not built yet (issue 2)")
