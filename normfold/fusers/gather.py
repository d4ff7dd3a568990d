"""Fold ``Gather``/``GatherElements`` of constant indices from a constant table into the rows they pick.

A transformer exported without its optional inputs reads its embedding tables with constant indices:
HF BERT's position ids (``Gather(position_embeddings, [[0 … S−1]])``) and token-type ids
(``GatherElements(buffer, ids) → Gather(token_type_embeddings, ·)``). The result is a constant:

    Gather(T, I, axis)[…]  =  numpy.take(T, I, axis)
    GatherElements(T, I, axis)  =  numpy.take_along_axis(T, I, axis)      (negative indices wrap)

so the node becomes an initializer holding exactly those rows. Pure selection: bit-exact.

Why not the clean-up's library folding (onnxscript ``FoldConstantsPass``)? It skips any node with an
input over ``input_size_limit`` (8192 elements, smaller than any embedding table), and its evaluator
(onnx's reference ``GatherElements``) fails on these ids ("cannot reshape array of size 1 into shape
(1,64)": its ``np.choose`` fallback is wrong for ``axis=1``). onnxsim folds both sites.

File size: a fold never grows the model by more than :data:`MAX_GROWTH` elements per site (the table
stays when something else reads it); position rows (S×H) are smaller than the table (512×H), which the
unused-initializer clean-up then drops.
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

#: The most elements one fold may add to the model (256 KiB of float32): a larger selection of a table
#: that stays stays computed.
MAX_GROWTH = 1 << 16


@dataclass(frozen=True, eq=False)
class GatherSite(Site):
    """A Gather/GatherElements whose result ``rows`` is known."""

    rows: np.ndarray


def _select(node: ir.Node, table: np.ndarray, indices: np.ndarray) -> np.ndarray | str:
    """The gathered array, or why it cannot be computed (indices out of range)."""
    axis = g.attr_int(node, "axis", 0)
    if not -table.ndim <= axis < table.ndim:
        return f"axis {axis} is out of range for a rank-{table.ndim} table"
    size = table.shape[axis]
    idx = indices.astype(np.int64)
    if idx.size and (idx.min() < -size or idx.max() >= size):
        return f"indices {int(idx.min())}..{int(idx.max())} are out of range for axis size {size}"
    if node.op_type == "Gather":
        return np.take(table, idx, axis=axis)
    if idx.ndim != table.ndim:
        return f"GatherElements indices of rank {idx.ndim} on a rank-{table.ndim} table"
    return np.take_along_axis(table, np.where(idx < 0, idx + size, idx), axis=axis)


def _growth(node: ir.Node, rows: np.ndarray) -> int:
    """Elements the fold adds: the rows, less the table and indices when nothing else reads them."""
    freed = 0
    for value in node.inputs:
        if value is not None and not g.other_users(value, [node]) and not value.is_graph_output():
            array = g.const_array(value)
            freed += 0 if array is None else array.size
    return rows.size - freed


@register_rule
class FoldConstantGather(Rule[GatherSite]):
    """``Gather``/``GatherElements`` of a constant table at constant indices → an initializer."""

    name = "fold_constant_gather"
    anchors = ("Gather", "GatherElements")

    def match(self, facts: GraphFacts, node: ir.Node) -> GatherSite | Reject | None:
        table_value, index_value = (*node.inputs, None)[:2]
        if table_value is None or index_value is None or node.outputs[0].is_graph_output():
            return None
        indices = g.const_array(index_value)
        if indices is None:
            return None  # a real lookup (token ids): nothing to fold
        table = g.const_array(table_value)
        if table is None:
            return None  # indexing an activation with constant indices: a Slice-like op, kept
        rows = _select(node, table, indices)
        if isinstance(rows, str):
            return Reject((node,), rows)
        growth = _growth(node, rows)
        if growth > MAX_GROWTH:
            return Reject(
                (node,),
                f"the folded {list(rows.shape)} rows would add {growth} elements to the model "
                f"(limit {MAX_GROWTH}); the lookup is kept",
            )
        return GatherSite(nodes=(node,), anchor=node, rows=rows)

    def rewrite(self, scope: Scope, site: GatherSite) -> list[ir.Node]:
        node = site.nodes[0]
        out = node.outputs[0]
        value = scope.constant(site.rows.astype(site.rows.dtype, copy=False), f"{out.name or node.name}_rows")
        ir.convenience.replace_all_uses_with(out, value)
        scope.graph.remove(node, safe=True)
        return []

    def describe(self, site: GatherSite, created: list[ir.Node]) -> str:
        return f"folded to constant rows of shape {list(site.rows.shape)}"
