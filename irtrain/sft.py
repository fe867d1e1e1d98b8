"""`irtrain sft`: not built yet (issue 3)."""
from __future__ import annotations

from irtrain.errors import NotBuiltError


def run(cfg) -> None:
    raise NotBuiltError("irtrain sft is not built yet (issue 3)")
