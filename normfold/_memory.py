"""Refuse inputs that cannot fit in memory before allocating them, naming the size.

``--input x:100000x100000`` or ``--batch 100000000`` would otherwise start allocating tens of GiB and
end in swapping or the OOM killer. The check is an estimate (the model's activations come on top), so
inputs may take at most :data:`INPUT_SHARE` of the memory available now.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from normfold.errors import InputSpecError

#: Inputs may use at most this share of the currently available memory.
INPUT_SHARE = 0.5


def available_bytes() -> int | None:
    """Memory available to a new allocation now (Linux ``MemAvailable``), or None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def ensure_inputs_fit(inputs: Sequence[tuple[str, Sequence[int], int]], available: int | None = None) -> int:
    """Total bytes of ``(name, shape, itemsize)`` inputs; :class:`InputSpecError` when they cannot fit."""
    sizes = [(name, tuple(shape), math.prod(shape) * itemsize) for name, shape, itemsize in inputs]
    total = sum(size for _, _, size in sizes)
    limit = available_bytes() if available is None else available
    if limit is not None and total > INPUT_SHARE * limit:
        name, shape, size = max(sizes, key=lambda s: s[2])
        raise InputSpecError(
            f"the inputs need {human_bytes(total)} ({name}:{'x'.join(map(str, shape))} alone "
            f"{human_bytes(size)}), more than {INPUT_SHARE:.0%} of the {human_bytes(limit)} of memory "
            f"available; use smaller shapes or batch sizes"
        )
    return total
