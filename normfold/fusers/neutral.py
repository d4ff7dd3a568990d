"""Remove arithmetic with a neutral constant: ``x + 0``, ``x − 0``, ``x · 1``, ``x / 1`` → ``x``.

A transformer exported without an attention mask adds an all-zero additive mask to every score matrix
(HF BERT: ``Add(scores, zeros(1, 1, S, S))``); a constant folded by the clean-up can leave ``· 1`` too.
Algebra: ``x + 0 = x − 0 = x · 1 = x / 1 = x`` elementwise (NaN stays NaN; ``−0 + 0 = +0`` compares
equal), so the node can go when the constant does not change x's shape by broadcasting (ONNX gives
both operands one dtype): its rank is at most x's and each of its dims is 1 or x's dim. Which operand
is x matters for ``−`` and ``/`` (``0 − x`` and ``1 / x`` are not neutral).

onnxscript's rewriter has these no-op rules (``rules/common/_no_op.py``), but its rewriter scales
quadratically here (:mod:`normfold.fusers.cleanup`); this rule is one linear sweep with a reason for a
neutral constant it must keep (it would broadcast x up, or x's shape is unknown).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normfold.fusers import _graph as g
from normfold.fusers._facts import GraphFacts
from normfold.fusers.base import Reject, Rule, Scope, Site, register_rule

logger = logging.getLogger(__name__)

#: op → (the neutral value, whether x may be either operand).
_NEUTRAL = {"Add": (0.0, True), "Sub": (0.0, False), "Mul": (1.0, True), "Div": (1.0, False)}


def _broadcasts_into(const: tuple[int, ...], x: tuple[int | None, ...]) -> bool:
    """True when a constant of shape ``const`` broadcast against x leaves x's shape as it is."""
    if len(const) > len(x):
        return False
    return all(c == 1 or c == d for c, d in zip(reversed(const), reversed(x), strict=False))


@dataclass(frozen=True, eq=False)
class NeutralSite(Site):
    """The neutral node (``anchor``) and which of its inputs is x."""

    x_index: int


@register_rule
class DropNeutralOp(Rule[NeutralSite]):
    """``Add/Sub(x, 0)`` and ``Mul/Div(x, 1)`` with a constant that keeps x's shape → x (module docstring)."""

    name = "drop_neutral_ops"
    anchors = tuple(_NEUTRAL)

    def match(self, facts: GraphFacts, node: ir.Node) -> NeutralSite | Reject | None:
        if len(node.inputs) != 2 or node.outputs[0].is_graph_output():
            return None
        neutral, commutes = _NEUTRAL[node.op_type]
        for x_index in (0, 1) if commutes else (0,):
            x, k = node.inputs[x_index], node.inputs[1 - x_index]
            const = g.const_array(k)
            if x is None or const is None or const.size == 0 or not np.all(const == neutral):
                continue
            shape = facts.shape(x)
            if shape is None:
                return Reject((node,), f"{node.op_type} of a neutral constant on a value of unknown rank")
            if not _broadcasts_into(tuple(const.shape), shape):
                return Reject(
                    (node,),
                    f"the neutral {list(const.shape)} constant broadcasts x of shape {list(shape)} up: the "
                    f"{node.op_type} changes the shape, so it is kept",
                )
            return NeutralSite(nodes=(node,), anchor=node, x_index=x_index)
        return None

    def rewrite(self, scope: Scope, site: NeutralSite) -> list[ir.Node]:
        node = site.anchor
        x = node.inputs[site.x_index]
        assert x is not None
        ir.convenience.replace_all_uses_with(node.outputs[0], x)
        scope.graph.remove(node, safe=True)
        return []

    def describe(self, site: NeutralSite, created: list[ir.Node]) -> str:
        return f"removed {site.anchor.op_type} of a neutral constant"
