"""The built-in model zoo: a name → factory registry.

A zoo factory builds an ``nn.Module`` in eval mode with deterministic, non-trivial weights (randomized BN
running statistics, LN/GN affine parameters away from 1/0) so that a folding mistake cannot hide. Its
inputs are declared as shapes; example inputs are drawn from a seeded generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

ZooFactory = Callable[[], nn.Module]


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, static shape and torch dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"{self.name}:{'x'.join(str(d) for d in self.shape)}:{dtype}"


@dataclass(frozen=True)
class ZooEntry:
    """A registered zoo model."""

    name: str
    description: str
    factory: ZooFactory
    inputs: tuple[InputSpec, ...]
    tags: tuple[str, ...] = field(default_factory=tuple)

    def build(self) -> nn.Module:
        torch.manual_seed(0)
        return self.factory().eval()


ZOO: dict[str, ZooEntry] = {}


def register(
    name: str,
    description: str,
    inputs: dict[str, tuple[int, ...]],
    tags: tuple[str, ...] = (),
) -> Callable[[ZooFactory], ZooFactory]:
    """Decorator adding a factory to :data:`ZOO` under ``name``."""

    def wrap(factory: ZooFactory) -> ZooFactory:
        if name in ZOO:
            raise ValueError(f"zoo model {name!r} registered twice")
        specs = tuple(InputSpec(n, tuple(s)) for n, s in inputs.items())
        ZOO[name] = ZooEntry(name, description, factory, specs, tags)
        return factory

    return wrap


def seeded_inputs(specs: tuple[InputSpec, ...] | list[InputSpec], seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Reproducible random inputs: standard normal for floats, small non-negative ints otherwise.

    The total size is checked against available memory first (a huge ``--input`` is refused naming it).
    """
    from normfold._memory import ensure_inputs_fit

    ensure_inputs_fit([(s.name, s.shape, torch.empty((), dtype=s.dtype).element_size()) for s in specs])
    gen = torch.Generator().manual_seed(seed)
    out = []
    for spec in specs:
        if spec.dtype.is_floating_point:
            out.append(torch.randn(spec.shape, generator=gen, dtype=torch.float32).to(spec.dtype))
        elif spec.dtype == torch.bool:
            out.append(torch.randint(0, 2, spec.shape, generator=gen).bool())
        else:
            out.append(torch.randint(0, 10, spec.shape, generator=gen, dtype=spec.dtype))
    return tuple(out)
