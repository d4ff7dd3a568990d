"""Number formatting shared by every renderer (CLI tables, Markdown, HTML)."""

from __future__ import annotations

import math


def num(x: float | None, spec: str = ".3g", missing: str = "–") -> str:
    """``x`` with ``spec``; ``missing`` for None, and ``inf``/``-inf``/``nan`` spelled out."""
    if x is None:
        return missing
    if math.isnan(x):
        return "nan"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)
