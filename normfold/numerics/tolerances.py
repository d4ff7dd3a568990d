"""Default tolerances per precision: the one documented place.

The check for every element is ``|a - b| <= atol + rtol·|b|`` (``b`` is the eager reference); pure
relative error is meaningless near zero. Figures from ../shared/NORMS.md §5, measured on a
ResNet-18-style model (max |y| = 1.8):

* fp32, ORT CPU, folded or not: max-abs 2–3.4e-6 against torch fp32. Folding BN moves results by about
  1e-6, so ``atol=1e-5, rtol=1e-4`` never flags a correct fold while a 1% weight fault (≥1e-3) fails.
* tf32 (emulated): 3.3e-3 → ``1e-2/1e-2`` plus cosine ≥ 0.9999.
* fp16: 5.2e-3 (2.9e-3 of max) → ``1e-2/1e-2`` plus cosine ≥ 0.999.
* bf16: 3.8e-2 → ``5e-2/5e-2`` plus cosine ≥ 0.99.

Per-layer comparisons use the same numbers; see :mod:`normfold.numerics.layers` for how they grow with depth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from normfold.errors import UsageError


@dataclass(frozen=True)
class Tolerance:
    """``|a-b| <= atol + rtol·|b|`` element-wise, plus an optional floor on cosine similarity."""

    atol: float
    rtol: float
    min_cosine: float | None = None

    def to_dict(self) -> dict[str, float | None]:
        return asdict(self)

    def describe(self) -> str:
        cos = f", cosine ≥ {self.min_cosine}" if self.min_cosine is not None else ""
        return f"atol={self.atol:g}, rtol={self.rtol:g}{cos}"


DEFAULT_TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-5, rtol=1e-4),
    "tf32": Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.9999),
    "fp16": Tolerance(atol=1e-2, rtol=1e-2, min_cosine=0.999),
    "bf16": Tolerance(atol=5e-2, rtol=5e-2, min_cosine=0.99),
}


def tolerance_for(precision: str, atol: float | None = None, rtol: float | None = None) -> Tolerance:
    """The default tolerance of ``precision`` with any explicit ``atol``/``rtol`` overriding it."""
    try:
        base = DEFAULT_TOLERANCES[precision]
    except KeyError:
        raise UsageError(f"unknown precision {precision!r}; expected one of {', '.join(DEFAULT_TOLERANCES)}") from None
    for label, value in (("atol", atol), ("rtol", rtol)):
        if value is not None and (value < 0 or value != value):
            raise UsageError(f"{label} must be a non-negative number, got {value}")
    return Tolerance(
        atol=base.atol if atol is None else float(atol),
        rtol=base.rtol if rtol is None else float(rtol),
        min_cosine=base.min_cosine,
    )
