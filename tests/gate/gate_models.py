"""Small models for the gate tests, loaded by the gate as ``tests/gate/gate_models.py:factory``.

Each factory returns ``(module, example_inputs)`` with deterministic weights. ``crash`` and ``hang`` exist
to prove the process executor survives a segfault and a hung case.
"""

from __future__ import annotations

import ctypes
import time

import torch
from torch import nn


class LnNet(nn.Module):
    """Linear → LayerNorm(32) → Linear, with LayerNorm's affine parameters away from 1/0."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.norm = nn.LayerNorm(32)
        self.fc2 = nn.Linear(32, 8)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.norm(self.fc1(x)))


class UnbiasedLayerNorm(nn.Module):
    """A hand-written "LayerNorm" with the classic bug: unbiased (n-1) variance."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


def _example() -> tuple[torch.Tensor]:
    return (torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0)),)


def ln_net() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return LnNet().eval(), _example()


def ln_net_unbiased() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The same weights as :func:`ln_net`, its LayerNorm swapped for :class:`UnbiasedLayerNorm`."""
    module, example = ln_net()
    hand = UnbiasedLayerNorm(32)
    hand.load_state_dict(module.norm.state_dict())
    module.norm = hand
    return module.eval(), example


class Branchy(nn.Module):
    """Python control flow on data: tracing freezes whichever branch the example input took."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.mean() > 0:
            return self.fc(x)
        return self.fc(-x) * 2.0


def branchy() -> tuple[nn.Module, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    positive = torch.randn(2, 16, generator=torch.Generator().manual_seed(1)).abs() + 0.5
    return Branchy().eval(), (positive,)


def crash() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Segfaults the process that loads it (reads address 0), like a broken native runtime would."""
    ctypes.string_at(0)
    raise RuntimeError("unreachable")


def hang() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """Never returns in time: the case must be killed by the executor's timeout."""
    time.sleep(3600)
    raise RuntimeError("unreachable")
