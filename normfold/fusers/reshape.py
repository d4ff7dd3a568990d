"""Collapse ``Reshape(Reshape(z, s₁), s₂)`` into ``Reshape(z, s₂)``.

Algebra: a Reshape keeps the row-major order of the elements, so two in a row are one:
``Reshape(Reshape(z, s₁), s₂) = Reshape(z, s₂)`` whenever ``s₂`` does not depend on the intermediate
shape — a constant ``s₂`` without a ``0`` (which copies a dim of *its* input; with ``allowzero=1`` a 0
is a literal size and is fine). A ``−1`` in ``s₂`` is inferred from the element count, which both
inputs share. The first Reshape stays when something else reads its output (the unused-node clean-up
removes it otherwise). HF Llama's ``repeat_kv`` exports ``_unsafe_view`` then a second Reshape; onnxsim
collapses them too. onnxscript's rewriter has the same rule (``reshape_reshape``), but its rewriter
scales quadratically here (:mod:`normfold.fusers.cleanup`).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from normfold.fusers import _graph as g
from normfold.fusers._facts import GraphFacts
from normfold.fusers.base import Rule, Scope, Site, register_rule


def reshape_target(node: ir.Node | None) -> np.ndarray | None:
    """The constant shape a default-domain Reshape asks for (flat int64), else None."""
    if node is None or node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    shape = g.const_array(node.inputs[1])
    return None if shape is None else shape.reshape(-1)


def reads_input_dims(node: ir.Node, target: np.ndarray) -> bool:
    """True when the Reshape's ``0`` entries copy dims of its input (``allowzero=0``)."""
    return bool(np.any(target == 0)) and not g.attr_int(node, "allowzero", 0)


@register_rule
class CollapseReshapes(Rule[Site]):
    """``Reshape(Reshape(z, s₁), s₂)`` → ``Reshape(z, s₂)`` for a constant ``s₂`` (module docstring)."""

    name = "collapse_reshapes"
    anchors = ("Reshape",)

    def match(self, facts: GraphFacts, node: ir.Node) -> Site | None:
        x = node.inputs[0]
        first = x.producer() if x is not None else None
        target = reshape_target(node)
        if first is None or target is None or first.op_type != "Reshape" or first.domain not in ("", "ai.onnx"):
            return None
        if reads_input_dims(node, target) or first.inputs[0] is None:
            return None
        return Site(nodes=(first, node), anchor=node)

    def rewrite(self, scope: Scope, site: Site) -> list[ir.Node]:
        first, second = site.nodes
        second.replace_input_with(0, first.inputs[0])
        return []

    def describe(self, site: Site, created: list[ir.Node]) -> str:
        return "two Reshapes in a row → one"
