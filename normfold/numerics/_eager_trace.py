"""Eager side of the per-layer comparison: hook every module call, record its outputs and inputs' origin.

See :mod:`normfold.numerics.layers` for the whole method.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from normfold.numerics.functional import FunctionalCall, record_functional
from normfold.runtime.eager import flatten_leaves, flatten_outputs


@dataclass
class _Call:
    """One finished call of one module, as the forward hook saw it."""

    path: str
    module_type: str
    call: int
    order: int
    outputs: list[np.ndarray | None]
    output_ids: list[int]
    input_ids: list[int]
    returns_input: bool


@dataclass
class EagerTrace:
    """One hooked eager run: every module call's outputs, and where each call's inputs came from.

    ``outputs`` are the model's own flattened outputs (what :func:`normfold.runtime.eager.run_eager`
    returns), so :func:`normfold.numerics.compare` uses one trace both as the output reference and for
    every backend's per-layer comparison: one eager run in all.
    """

    calls: list[_Call]
    producer: dict[int, tuple[int, int]]
    input_ids: list[int]
    never_called: list[str]
    modules: frozenset[str] = frozenset()
    #: Functional ops called in user forwards (:mod:`normfold.numerics.functional`), in execution order.
    functional: list[FunctionalCall] = field(default_factory=list)

    @property
    def outputs(self) -> list[np.ndarray]:
        root = next((c for c in reversed(self.calls) if c.path == ""), None)
        return [] if root is None else [o for o in root.outputs if o is not None]


def call_names(calls: list[_Call]) -> dict[tuple[int, int], str]:
    """The row name of every (call, output): the path (``<root>`` for the model), ``#k`` for the k-th call
    of a module called more than once, ``[j]`` for one of several outputs."""
    n_calls: dict[str, int] = {}
    for c in calls:
        n_calls[c.path] = n_calls.get(c.path, 0) + 1
    names: dict[tuple[int, int], str] = {}
    for c in calls:
        base = (c.path or "<root>") + (f"#{c.call + 1}" if n_calls[c.path] > 1 else "")
        for j in range(len(c.outputs)):
            names[(c.order, j)] = base + (f"[{j}]" if len(c.outputs) > 1 else "")
    return names


def trace_eager(module: nn.Module, inputs: Sequence[torch.Tensor]) -> EagerTrace:
    """Run ``module`` once under ``torch.inference_mode`` on deep copies of ``inputs``, a hook on every module.

    Calls are recorded in finishing order with their outputs cloned; ``producer`` maps ``id(tensor)`` to
    the latest (call, output) that returned it.
    """
    calls: list[_Call] = []
    producer: dict[int, tuple[int, int]] = {}
    keep_alive: list[torch.Tensor] = []
    counts: dict[str, int] = {}
    named = list(module.named_modules())
    paths = {id(sub): path for path, sub in named}

    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        path = paths.get(id(mod))
        if path is None:  # a module of another model (the hook is global while it is installed)
            return
        flat = flatten_leaves(output)
        arg_tensors = flatten_outputs(args) + flatten_outputs(kwargs) if kwargs else flatten_outputs(args)
        index = len(calls)
        outputs: list[np.ndarray | None] = []
        output_ids: list[int] = []
        for j, t in enumerate(flat):
            if isinstance(t, torch.Tensor):
                keep_alive.append(t)
                outputs.append(t.detach().clone().cpu().numpy())
                output_ids.append(id(t))
                producer[id(t)] = (index, j)
            else:
                outputs.append(None)
                output_ids.append(0)
        calls.append(
            _Call(
                path=path,
                module_type=type(mod).__name__,
                call=counts.get(path, 0),
                order=index,
                outputs=outputs,
                output_ids=output_ids,
                input_ids=[id(t) for t in arg_tensors],
                returns_input=bool(flat)
                and all(isinstance(t, torch.Tensor) and any(t is a for a in arg_tensors) for t in flat),
            )
        )
        counts[path] = counts.get(path, 0) + 1

    args = copy.deepcopy(tuple(inputs))
    input_ids = [id(t) for t in args]
    # One global hook instead of one per module: same calls, a fraction of the registration and dispatch cost.
    handle = torch.nn.modules.module.register_module_forward_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode(), record_functional(paths, lambda: len(calls)) as functional:
            module(*args)
    finally:
        handle.remove()
    keep_alive.clear()
    never = [path for path, _ in named if path not in counts]
    return EagerTrace(calls, producer, input_ids, never, frozenset(path for path, _ in named), functional)
