"""`irtrain score`: not built yet (issue 5)."""
from __future__ import annotations

from irtrain.errors import NotBuiltError


def run(cfg) -> None:
    raise NotBuiltError("irtrain score is not built yet (issue 5)")
