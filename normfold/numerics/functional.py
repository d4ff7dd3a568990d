"""Functional ops (``F.gelu(x)``, ``x * scale``, ``torch.cat``) called in a module's own ``forward``.

Module hooks see only ``nn.Module`` calls, so a fault in a functional op used to be blamed on the next
module, with "its input from ops of <root> is not compared". This module closes that gap from both sides:

Eager side
    While the hooked eager run goes, a :class:`torch.overrides.TorchFunctionMode` sees every torch call.
    A call is *functional* when the first Python frame above torch's own code is user code: a call
    made inside ``torch/nn/modules`` (``Conv2d.forward`` calling ``F.conv2d``) belongs to that module and
    is skipped, and so are the calls of normfold's numerics code itself (the hooks' clones). Each
    functional call records the op, the ``file:line`` of the call, the module whose ``forward`` was
    running (a pre-hook keeps the stack), and a clone of its tensor output.

ONNX side
    The dynamo exporter writes the source stack of every node in ``metadata_props``
    (``pkg.torch.onnx.stack_trace``: ``File "m.py", line 42, in forward`` frames). A functional call is
    matched to the nodes whose module path is its owner (not a child) and whose innermost frame is the same
    ``file:line``, and among them to the FX node of the same aten op (``pkg.torch.onnx.fx_node``), in
    order; its value is the ONNX value named after that FX node, and its static shape must fit the eager
    tensor. Anything less certain stays uncompared. The TorchScript
    exporter keeps no source stack, so there functional ops stay uncompared and the first divergence says
    that its input comes from untracked ops of the owner, naming those ops.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
FX_NODE_KEY = "pkg.torch.onnx.fx_node"
_FX_NAME = re.compile(r"%([\w.]+) :")
_FX_TARGET = re.compile(r"target=torch\.ops\.aten\.(\w+)\.")
_INPLACE = frozenset({"add", "sub", "mul", "truediv", "div", "and", "or"})

# Trailing separators: ``site-packages/torchvision`` must not pass for ``site-packages/torch``.
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + os.sep
_OWN_DIR = str(Path(__file__).resolve().parent) + os.sep  # the hooks' own calls (clones), not the model's
_MODULES_DIR = str(Path(torch.__file__).resolve().parent / "nn" / "modules") + os.sep
_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_FUNCTIONAL_NAMES = frozenset(dir(torch.nn.functional))


@dataclass
class FunctionalCall:
    """One functional op call in eager: where it was written, which module ran it, what it returned."""

    op: str
    file: str
    line: int
    owner: str
    after_call: int  # how many module calls had finished before it (its place in execution order)
    output: np.ndarray
    output_id: int
    input_ids: list[int] = field(default_factory=list)
    index: int = 0  # the how-many-th call of this op at this (owner, file, line)

    @property
    def site(self) -> str:
        return f"{Path(self.file).name}:{self.line}"

    @property
    def name(self) -> str:
        """``c1.act: F.gelu @ model.py:42`` style: the owner, the op and the call site."""
        owner = self.owner or "<root>"
        repeat = f"#{self.index + 1}" if self.index else ""
        return f"{owner}: {self.op} @ {self.site}{repeat}"


def _op_name(func: Any) -> str:
    name = getattr(func, "__name__", None) or type(func).__name__
    if name in _FUNCTIONAL_NAMES and getattr(torch.nn.functional, name, None) is not None:
        return f"F.{name}"
    if getattr(torch, name, None) is func:
        return f"torch.{name}"
    return f"Tensor.{name}"


def _user_site() -> tuple[str, int] | None:
    """The first frame above torch's code when it is user code; None for calls torch or normfold make."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_MODULES_DIR):
            return None  # inside a module's own forward: the module hook covers it
        if not filename.startswith(_TORCH_DIR):
            if filename.startswith(_OWN_DIR):
                return None
            return filename, frame.f_lineno
        frame = frame.f_back  # type: ignore[assignment]
    return None


class _Recorder(TorchFunctionMode):
    """Record functional calls; the result of ``func`` is returned untouched."""

    def __init__(self, log: list[FunctionalCall], owner: Callable[[], str], finished: Callable[[], int]) -> None:
        super().__init__()
        self.log, self.owner, self.finished = log, owner, finished
        self.keep_alive: list[torch.Tensor] = []
        self.counts: dict[tuple[str, str, str, int], int] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return out
        site = _user_site()
        if site is None:
            return out
        owner, op = self.owner(), _op_name(func)
        key = (owner, op, *site)
        index = self.counts.get(key, 0)
        self.counts[key] = index + 1
        inputs = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        self.keep_alive.append(out)
        with torch._C.DisableTorchFunction():
            value = out.detach().clone().cpu().numpy()
        self.log.append(
            FunctionalCall(
                op=op,
                file=site[0],
                line=site[1],
                owner=owner,
                after_call=self.finished(),
                output=value,
                output_id=id(out),
                input_ids=[id(t) for t in inputs],
                index=index,
            )
        )
        return out


@contextmanager
def record_functional(paths: dict[int, str], finished: Callable[[], int]) -> Iterator[list[FunctionalCall]]:
    """Record the functional calls of one eager run; ``paths`` maps ``id(module)`` to its path."""
    stack: list[str] = []
    log: list[FunctionalCall] = []

    def push(mod: nn.Module, args: Any) -> None:
        stack.append(paths.get(id(mod), stack[-1] if stack else ""))

    def pop(mod: nn.Module, args: Any, output: Any) -> None:
        if stack:
            stack.pop()

    pre = torch.nn.modules.module.register_module_forward_pre_hook(push)
    post = torch.nn.modules.module.register_module_forward_hook(pop, always_call=True)
    recorder = _Recorder(log, lambda: stack[-1] if stack else "", finished)
    try:
        with recorder:
            yield log
    finally:
        pre.remove()
        post.remove()
        recorder.keep_alive.clear()


def node_sites(node: onnx.NodeProto) -> list[tuple[str, int]]:
    """Every ``(file, line)`` of the node's recorded source stack (dynamo exports), innermost last."""
    for prop in node.metadata_props:
        if prop.key == STACK_TRACE_KEY:
            return [(f, int(line)) for f, line in _FRAME.findall(prop.value)]
    return []


def site_key(file: str) -> str:
    """A source file as both sides can name it: the path inside its ``site-packages`` (or
    ``dist-packages``) folder for installed code, else its last two path parts.

    The export records absolute paths of the machine and environment it ran in; a model exported in
    one virtualenv or checkout and compared from another must still pair its functional calls.
    """
    parts = Path(file).parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("site-packages", "dist-packages"):
            return "/".join(parts[i + 1 :])
    return "/".join(parts[-2:])


def _fx_node(node: onnx.NodeProto) -> tuple[str, str] | None:
    """``(fx node name, aten op)`` from the dynamo exporter's ``pkg.torch.onnx.fx_node`` record."""
    for prop in node.metadata_props:
        if prop.key == FX_NODE_KEY:
            name, op = _FX_NAME.match(prop.value), _FX_TARGET.search(prop.value)
            if name and op:
                return name.group(1), op.group(1)
    return None


def _base_op(op: str) -> str:
    """``F.gelu`` → ``gelu``, ``Tensor.__iadd__`` → ``add``: the name aten gives the same op."""
    name = op.rsplit(".", 1)[-1].strip("_")
    return name[1:] if name.startswith("i") and name[1:] in _INPLACE else name.rstrip("_")


def match_functional(
    calls: list[FunctionalCall],
    nodes: list[onnx.NodeProto],
    paths: list[str | None],
    fits: Callable[[str, tuple[int, ...]], bool | None],
) -> dict[int, str]:
    """The ONNX value of each functional call (by position in ``calls``) that can be matched for certain.

    Per call site the exporter's FX nodes are taken in order, and each eager call is paired with the next
    one of the same aten op; its value is the ONNX value named after that FX node (dynamo keeps the
    name), and its static shape must fit the eager tensor. ``paths[i]`` is node ``i``'s module path.
    """
    produced = {out for node in nodes for out in node.output if out}
    by_site: dict[tuple[str, str, int], list[tuple[str, str]]] = {}
    for i, node in enumerate(nodes):
        owner, fx = paths[i], _fx_node(node)
        sites = node_sites(node)
        if owner is None or fx is None or not sites:
            continue
        file, line = sites[-1]
        entries = by_site.setdefault((owner, site_key(file), line), [])
        if fx not in entries:
            entries.append(fx)
    found: dict[int, str] = {}
    cursor: dict[tuple[str, str, int], int] = {}
    for k, call in enumerate(calls):
        key = (call.owner, site_key(call.file), call.line)
        entries = by_site.get(key, [])
        start = cursor.get(key, 0)
        base = _base_op(call.op)
        for j in range(start, len(entries)):
            fx_name, aten = entries[j]
            if aten.rstrip("_") != base:
                continue
            cursor[key] = j + 1
            if fx_name in produced and fits(fx_name, tuple(call.output.shape)) is True:
                found[k] = fx_name
            break
    return found
