"""Where fp32 islands are: norm ops, Softmax, and the statistics chain of a norm left decomposed.

See :mod:`normfold.fusers.precision` for why islands exist and the algebra of keeping them fp32.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

DECOMPOSED_NORM = "DecomposedNorm"
"""Pseudo op type in ``fp32_ops``: the statistics chain of a norm that was not fused into one op."""

NORM_OPS: frozenset[str] = frozenset(
    {
        "LayerNormalization",
        "GroupNormalization",
        "InstanceNormalization",
        "BatchNormalization",
        "RMSNormalization",
    }
)
DEFAULT_FP32_OPS: frozenset[str] = NORM_OPS | {"Softmax", DECOMPOSED_NORM}
ALWAYS_FP32_OPS: frozenset[str] = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Range"}
)
FLOAT32_ONLY_INPUTS: dict[str, tuple[int, ...]] = {"Resize": (2,), "Upsample": (1,)}


@dataclass(frozen=True)
class Island:
    """Nodes that stay fp32 together; ``anchor`` names the island (the norm node, or the variance mean)."""

    anchor: str
    kind: str
    nodes: tuple[ir.Node, ...]

    def to_dict(self) -> dict[str, object]:
        return {"anchor": self.anchor, "kind": self.kind, "nodes": [n.name for n in self.nodes]}


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def _is_square(node: ir.Node) -> ir.Value | None:
    """The base ``a`` when ``node`` is ``Pow(a, 2)`` or ``Mul(a, a)``, else None."""
    if node.op_type == "Pow" and len(node.inputs) == 2:
        exponent = _const(node.inputs[1])
        if exponent is not None and exponent.size == 1 and float(exponent.reshape(())) == 2.0:
            return node.inputs[0]
    if node.op_type == "Mul" and len(node.inputs) == 2 and node.inputs[0] is node.inputs[1]:
        return node.inputs[0]
    return None


def _affine_tail(normalized: ir.Node) -> list[ir.Node]:
    """``Mul(n, γ)`` then ``Add(·, β)`` with constant γ/β right after the normalizing Div/Mul.

    They join the island so the Cast back to low precision sits after the whole norm: ORT's
    LayerNormFusion otherwise matches across the Cast and builds a LayerNormalization whose X is fp32
    and Scale fp16, which fails to load ("bound to different types").
    """
    tail = []
    node = normalized
    for op in ("Mul", "Add"):
        uses = list(node.outputs[0].uses())
        if len(uses) != 1:
            break
        user = uses[0][0]
        if user.op_type != op or not any(_const(v) is not None for v in user.inputs):
            break
        tail.append(user)
        node = user
    return tail


def _decomposed_norm_islands(graph: ir.Graph) -> list[Island]:
    """Statistics chains of unfused norms.

    Anchor: ``V = ReduceMean(Pow(a, 2) | Mul(a, a))`` (a second moment). Backwards, when
    ``a = Sub(x, ReduceMean(x))`` the centring belongs to the island too (that is where ``x-μ``
    cancels). Forwards: ``Add(V, const)`` → ``Sqrt`` → ``Reciprocal`` (+ the ``Mul`` that applies it) or
    the ``Div`` that divides by it, then the constant affine ``Mul``/``Add`` (see :func:`_affine_tail`).
    """
    islands = []
    for var in graph:
        if var.op_type != "ReduceMean" or var.inputs[0] is None:
            continue
        square = var.inputs[0].producer()
        if square is None:
            continue
        base = _is_square(square)
        if base is None:
            continue
        members: list[ir.Node] = []
        sub = base.producer()
        if sub is not None and sub.op_type == "Sub" and sub.inputs[1] is not None:
            mean = sub.inputs[1].producer()
            if mean is not None and mean.op_type == "ReduceMean" and mean.inputs[0] is sub.inputs[0]:
                members += [mean, sub]
        members += [square, var]
        frontier = [var.outputs[0]]
        while frontier:
            value = frontier.pop()
            for user, index in value.uses():
                op = user.op_type
                take = (
                    (op == "Add" and any(_const(v) is not None for v in user.inputs))
                    or op in ("Sqrt", "Reciprocal")
                    or (op == "Div" and index == 1)
                    or (op == "Mul" and getattr(value.producer(), "op_type", None) == "Reciprocal")
                )
                if take and user not in members:
                    members.append(user)
                    if op in ("Add", "Sqrt", "Reciprocal"):
                        frontier.append(user.outputs[0])
                    elif op in ("Div", "Mul"):
                        members += _affine_tail(user)
        islands.append(Island(var.name or "", DECOMPOSED_NORM, tuple(members)))
    return islands


def find_islands(graph: ir.Graph, fp32_ops: Collection[str] = DEFAULT_FP32_OPS) -> list[Island]:
    """Candidate fp32 islands of ``graph`` for ``fp32_ops`` (op types, plus :data:`DECOMPOSED_NORM`)."""
    islands = [Island(n.name or "", n.op_type, (n,)) for n in graph if n.op_type in fp32_ops and not n.domain]
    if DECOMPOSED_NORM in fp32_ops:
        claimed = {id(n) for isl in islands for n in isl.nodes}
        for isl in _decomposed_norm_islands(graph):
            if not any(id(n) in claimed for n in isl.nodes):
                islands.append(isl)
                claimed.update(id(n) for n in isl.nodes)
    return islands


def name_nodes(graph: ir.Graph) -> None:
    """Give every node a unique, deterministic name: islands and the auto mode refer to nodes by name."""
    seen: set[str] = set()
    for i, node in enumerate(graph):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def island_io(island: Island) -> tuple[list[str], list[str]]:
    """Float values flowing into an island (constants excluded), and every float value it produces.

    Internal values count as outputs: on a real fp16 backend each is stored in fp16, and a backend
    that quietly widens a chain (ORT CPU inserts fp32 Casts around ops without fp16 kernels) would
    otherwise hide an overflowing variance behind a finite final output.
    """
    members = set(island.nodes)
    ins, outs = [], []
    for node in island.nodes:
        for value in node.inputs:
            if value is None or value.dtype != ir.DataType.FLOAT or _const(value) is not None:
                continue
            if value.producer() not in members and value.name not in ins:
                ins.append(value.name or "")
        outs += [v.name or "" for v in node.outputs if v.dtype == ir.DataType.FLOAT]
    return ins, outs
