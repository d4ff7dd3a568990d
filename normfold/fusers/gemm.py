"""``MatMul(x, W) + b`` → ``Gemm(x, W, b)`` (a Linear layer as one node), rank > 2 through Reshape.

Algebra: for x of shape (d₀, …, d_{r−2}, K), a constant W (K, N) and a bias row b broadcast as (N,),

    MatMul(x, W) + b  =  Reshape(Gemm(Reshape(x, [−1, K]), W, b), [d₀, …, d_{r−2}, N])

because MatMul applies W to every row of x independently, and Gemm(A, W, b) = A·W + b with b broadcast
over the rows (α = β = 1). For r = 2 there is no Reshape. Two Reshapes around it fold away exactly:
``Reshape(Reshape(z, s₀), [−1, K]) = Reshape(z, [−1, K])`` (row-major reshapes compose), and a
following ``Reshape(·, s)`` whose ``s`` has no copy-from-input ``0`` takes the Gemm output directly, so
a transformer's ``Linear → view(B, S, H, D)`` needs no back-Reshape at all. The ``[−1, K]`` Reshape of
one input is shared by every Linear that reads it (Q, K and V).

Measured (ORT 1.31 CPU EP, 1 thread, interleaved medians; README "MatMul + Add → Gemm"): ORT's own
session-level ``MatMulAddFusion`` (``onnxruntime/core/optimizer/matmul_add_fusion.cc``, CPU EP only)
already does this rewrite, Reshapes included, when x's shape is fully static, so latency on ORT CPU does
not change (HF BERT-2L and ViT-4L within ±1 %, the A/A noise). What the rewrite buys is the smaller graph
onnxsim gives (one node per Linear, shared and absorbed Reshapes). So it runs only where it never grows
the graph (a Linear whose Reshapes are neither shared nor absorbed is kept, with the reason: on a
dynamic-batch TorchScript BERT-2L, where ORT skips its fusion, forcing every site with both Reshapes
measured 1–2 % faster, within what a larger graph costs elsewhere), and only for ``--target ort-cpu``,
where it was measured; other targets keep the exporter's standard MatMul + Add.

onnxscript's ``rules/common/_matmul_add_to_gemm.py`` only takes rank-2 operands and checks no addend
shape (a rank-3 addend broadcasts the product up to rank 3, which a Gemm cannot); this rule takes
rank > 2, accepts only a bias row, and gives the reason for every candidate it keeps. The Gemm
carries the MatMul's module path, so ``compare --per-layer`` still finds the Linear.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normfold.fusers import _graph as g
from normfold.fusers._facts import GraphFacts
from normfold.fusers.base import Reject, Rule, Scope, Site, register_rule
from normfold.fusers.reshape import reads_input_dims, reshape_target

logger = logging.getLogger(__name__)

#: numpy dtypes of the float types Gemm takes (MatMul also takes integers; bfloat16 has no numpy dtype here).
#: The targets the rewrite runs for, and why not elsewhere (the skip reason).
GEMM_TARGETS = ("ort-cpu",)
NOT_ON_TARGET = "the rewrite was measured on ORT CPU only; the exporter's MatMul + Add is standard ONNX"
GROWS = (
    "a Reshape before and after the Gemm would make the graph larger than MatMul + Add (ORT CPU fuses them "
    "itself when x's shape is static; with a dynamic batch the larger graph measured only 1-2 % faster)"
)
_GEMM_TYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64)}


@dataclass(frozen=True, eq=False)
class GemmSite(Site):
    """``matmul`` (x, W) and its bias ``add``; ``lead`` is x's dims before K (None where dynamic), empty
    for a rank-2 x; ``source`` is what the ``[−1, K]`` Reshape reads (x, or the input of x's own Reshape),
    ``rows`` an existing ``Reshape(source, [−1, K])`` to share; ``then`` is a following Reshape that takes
    the Gemm output directly (no back-Reshape needed)."""

    matmul: ir.Node
    add: ir.Node
    bias: np.ndarray
    lead: tuple[int | None, ...]
    source: ir.Value
    rows: ir.Value | None
    then: ir.Node | None

    @property
    def x(self) -> ir.Value:
        return self.matmul.inputs[0]  # type: ignore[return-value]  # a MatMul always has two inputs

    @property
    def weight(self) -> ir.Value:
        return self.matmul.inputs[1]  # type: ignore[return-value]

    @property
    def growth(self) -> int:
        """Nodes the rewrite adds: Gemm + new Reshapes − (MatMul, Add and x's own Reshape, if absorbed)."""
        if not self.lead:
            return -1
        new = 1 + (self.rows is None) + (self.then is None)
        return new - 2 - (self.source is not self.x)


def bias_row(b: np.ndarray, n: int, out_rank: int) -> np.ndarray | None:
    """``b`` as a length-``n`` vector when it broadcasts onto a rank-``out_rank`` (…, n) tensor along the
    last axis only, without growing its rank; None otherwise (a per-row or full-matrix addend)."""
    if b.ndim > out_rank or b.ndim == 0 or b.shape[-1] != n or any(d != 1 for d in b.shape[:-1]):
        return None
    return b.reshape(n)


def _source(x: ir.Value) -> ir.Value:
    """What the ``[−1, K]`` Reshape can read instead of x: the input of x's own Reshape when only this
    MatMul reads x (two reshapes compose), else x itself."""
    producer = x.producer()
    if producer is not None and reshape_target(producer) is not None and g.sole_consumer(x) is not None:
        inner = producer.inputs[0]
        if inner is not None:
            return inner
    return x


def _then(y: ir.Value) -> ir.Node | None:
    """A Reshape that is the sole reader of ``y`` and can read the Gemm output instead (no ``0`` that
    copies a dim from its input, unless ``allowzero``)."""
    node = g.sole_consumer(y)
    target = reshape_target(node) if node is not None else None
    if node is None or target is None:
        return None
    return None if reads_input_dims(node, target) else node


@register_rule
class MatMulAddToGemm(Rule[GemmSite]):
    """``MatMul(x, W) → Add(b)`` with a constant 2-D W and a bias row → ``Gemm`` (module docstring)."""

    name = "matmul_add_to_gemm"
    anchors = ("MatMul",)

    def match(self, facts: GraphFacts, node: ir.Node) -> GemmSite | Reject | None:
        x, w = (*node.inputs, None)[:2]
        add = g.sole_consumer(node.outputs[0])
        if x is None or w is None or add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
            return None
        bias_value = g.other_operand(add, node.outputs[0])
        shape = facts.shape(x)
        w_shape = facts.shape(w)
        if shape is None or w_shape is None or len(w_shape) != 2 or len(shape) < 2:
            return None  # a batched (rank-3 W) or vector product is no Linear
        nodes = (node, add)
        weight = g.const_array(w)
        if weight is None:
            return Reject(nodes, g.nonconst_reason(w, "MatMul weight") + ": a product of activations, not a Linear")
        b = g.const_array(bias_value)
        if b is None:
            return Reject(nodes, g.nonconst_reason(bias_value, "Add operand") + ": not a bias")
        row = bias_row(b, weight.shape[1], len(shape))
        if row is None:
            return Reject(
                nodes,
                f"Add operand of shape {list(b.shape)} is not a bias row of length {weight.shape[1]} "
                "(Gemm adds one row to every output row)",
            )
        if weight.dtype not in _GEMM_TYPES or b.dtype != weight.dtype:
            return Reject(nodes, f"weight dtype {weight.dtype}, bias dtype {b.dtype}: Gemm takes one float type")
        source = _source(x) if len(shape) > 2 else x
        return GemmSite(
            nodes=nodes,
            anchor=node,
            matmul=node,
            add=add,
            bias=row,
            lead=tuple(shape[:-1]) if len(shape) > 2 else (),
            source=source,
            rows=_shared_rows(source, weight.shape[0], node.graph) if len(shape) > 2 else None,
            then=_then(add.outputs[0]) if len(shape) > 2 else None,
        )

    def check(self, site: GemmSite) -> Reject | None:
        if self.ctx.target not in GEMM_TARGETS:
            return Reject(site.nodes, f"kept as MatMul + Add on {self.ctx.target}: {NOT_ON_TARGET}")
        if site.lead and site.then is None and sum(d is None for d in site.lead) > 1:
            return Reject(
                site.nodes,
                f"input dims {list(site.lead)} have more than one dynamic dim before K: restoring them after "
                "the Gemm would need Shape arithmetic, so the MatMul + Add is kept",
            )
        if site.growth > 0:
            return Reject(site.nodes, GROWS)
        return None

    def rewrite(self, scope: Scope, site: GemmSite) -> list[ir.Node]:
        matmul, add = site.matmul, site.add
        weight = g.const_array(site.weight)
        assert weight is not None, "match() accepts constant weights only"
        k, n = weight.shape
        created: list[ir.Node] = []
        a = site.x
        if site.lead and site.rows is not None:
            a = site.rows
        elif site.lead:
            shape = scope.constant(np.asarray([-1, k], dtype=np.int64), f"{matmul.name}_rows")
            name = scope.names.fresh(f"{matmul.name}_Reshape_in")
            created.append(ir.Node("", "Reshape", [site.source, shape], num_outputs=1, name=name))
            a = created[-1].outputs[0]
        bias = add.inputs[1] if add.inputs[0] is matmul.outputs[0] else add.inputs[0]
        assert bias is not None
        if bias.shape is None or list(bias.shape) != [n]:
            bias = scope.constant(site.bias, f"{bias.name or matmul.name}_row")
        gemm = ir.Node("", "Gemm", [a, site.weight, bias], num_outputs=1, name=scope.names.fresh(f"{matmul.name}_Gemm"))
        created.append(gemm)
        out = gemm.outputs[0]
        if site.lead and site.then is None:
            dims = [-1 if d is None else d for d in site.lead] + [n]
            back = ir.Node(
                "",
                "Reshape",
                [out, scope.constant(np.asarray(dims, dtype=np.int64), f"{matmul.name}_shape")],
                num_outputs=1,
                name=scope.names.fresh(f"{matmul.name}_Reshape_out"),
            )
            created.append(back)
            out = back.outputs[0]
        for node in created:
            g.stamp(node, matmul)  # the Linear's module: compare --per-layer finds it
        dtype = add.outputs[0].dtype
        g.swap(scope.graph, [matmul, add], created, add.outputs[0], out)
        if site.lead:
            known = [d for d in site.lead if d is not None]
            rows = int(np.prod(known)) if len(known) == len(site.lead) else None
            a.shape, gemm.outputs[0].shape = ir.Shape([rows, k]), ir.Shape([rows, n])
            if dtype is not None:
                a.dtype = gemm.outputs[0].dtype = dtype
        return created

    def describe(self, site: GemmSite, created: list[ir.Node]) -> str:
        if not site.lead:
            return "MatMul + Add → Gemm"
        tail = f", output read by Reshape {site.then.name!r}" if site.then is not None else ", Reshape back"
        return f"MatMul + Add on a rank-{len(site.lead) + 1} input → Reshape [-1, K] + Gemm{tail}"


def _shared_rows(source: ir.Value, k: int, graph: ir.Graph | None) -> ir.Value | None:
    """The output of an existing ``Reshape(source, [−1, K])`` in ``graph`` (Q/K/V share one), else None."""
    for use in source.uses():
        node = use.node
        target = reshape_target(node)
        if use.idx == 0 and node.graph is graph and target is not None and target.tolist() == [-1, k]:
            return node.outputs[0]
    return None
