"""The ``torch`` backend: PyTorch eager, the reference every other backend is compared with.

It runs the ``nn.Module`` itself (not the ONNX file) under ``torch.inference_mode`` on deep copies of
the inputs, so a module that mutates its inputs cannot change what the ONNX side sees.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normfold.errors import UsageError
from normfold.runtime.base import Backend, Runner, SessionOptions, TensorMeta


def flatten_leaves(obj: Any) -> list[torch.Tensor | None]:
    """Flatten a module's output (tensor, tuple/list, dict, nested) in the order torch.onnx uses; a
    non-tensor leaf is ``None``, so positions still line up with the output structure."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for item in obj for t in flatten_leaves(item)]
    if isinstance(obj, dict):
        return [t for key in obj for t in flatten_leaves(obj[key])]
    return [None]


def flatten_outputs(obj: Any) -> list[torch.Tensor]:
    """The tensors of a module's output in the order torch.onnx uses (the graph outputs' order)."""
    return [t for t in flatten_leaves(obj) if t is not None]


def run_eager(module: nn.Module, inputs: Sequence[torch.Tensor]) -> list[np.ndarray]:
    """Run ``module`` once under inference mode on deep-copied inputs; outputs flattened to numpy."""
    args = copy.deepcopy(tuple(inputs))
    with torch.inference_mode():
        out = module(*args)
    return [t.detach().cpu().numpy() for t in flatten_outputs(out)]


class TorchRunner(Runner):
    """Eager runner: feeds by name → positional args; outputs named like the ONNX outputs when given."""

    backend = "torch"

    def __init__(self, module: nn.Module, inputs: list[TensorMeta], output_names: Sequence[str] = ()) -> None:
        super().__init__(inputs, [TensorMeta(n, (), np.dtype(np.float32)) for n in output_names])
        self.module = module.eval()

    def infer_impl(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in self.inputs]
        values = run_eager(self.module, args)
        names = self.output_names or [f"output_{i}" for i in range(len(values))]
        if len(names) != len(values):
            names = [f"output_{i}" for i in range(len(values))]
        return dict(zip(names, values, strict=True))


class TorchBackend(Backend):
    name = "torch"
    description = "PyTorch eager on CPU (the reference)"

    def probe(self) -> str | None:
        return None

    def load(self, onnx_path: str | Path, options: SessionOptions | None = None) -> Runner:
        raise UsageError("the torch backend runs the PyTorch model itself; pass a model reference (--model)")

    def load_module(self, module: nn.Module, inputs: list[TensorMeta], output_names: Sequence[str] = ()) -> TorchRunner:
        return TorchRunner(module, inputs, output_names)
