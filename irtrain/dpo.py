"""`irtrain dpo`: not built yet (issue 4)."""
from __future__ import annotations

from irtrain.errors import NotBuiltError


def run(cfg) -> None:
    raise NotBuiltError("irtrain dpo is not built yet (issue 4)")
