"""`irtrain quickstart`: not built yet (issue 6)."""
from __future__ import annotations

from irtrain.errors import NotBuiltError


def run(cfg) -> None:
    raise NotBuiltError("irtrain quickstart is not built yet (issue 6)")
