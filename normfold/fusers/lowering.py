"""Per-target norm lowering: give every norm the form that the serving runtime runs fastest, exactly.

The fusion passes produce one canonical node per norm (``GroupNormalization``-21, ``LayerNormalization``);
this pass, run once after them, rewrites that node into the form the target runtime has a kernel for.
Each choice below was measured or read from the runtime's own sources, not assumed:

* **ort-cpu** — ORT 1.31's CPU EP registers no ``GroupNormalization`` kernel: it expands GN-21 into its
  ~30-node function body. ``InstanceNormalization`` has a native kernel, so GN-21 is lowered to
  ``Reshape(x,[0,G,-1]) → InstanceNormalization(1, 0, ε) → Reshape(·, Shape(x))`` and the per-channel
  affine is one ``BatchNormalization(γ, β, mean=0, var=1, ε=0)``: one pass over the tensor instead of
  ``Mul(γ) → Add(β)``'s two, 20–25 % faster per GroupNorm and bit-identical on ORT CPU.
  ``benchmarks/groupnorm_latency.py --forms`` (1×128×64×64, G=32, 1 thread) measures the four forms.
  ``LayerNormalization`` and ``RMSNormalization``-23 have CPU kernels (the latter is ORT's
  ``SimplifiedLayerNormalization`` kernel; both measured equal) and are kept.
* **ort-cuda** — the CUDA EP has ``InstanceNormalization`` (cuDNN), ``LayerNormalization`` and
  ``RMSNormalization`` kernels but no ONNX ``GroupNormalization`` one (its ``com.microsoft.GroupNorm`` is
  NHWC-only with fp32 γ/β, so it is not used): GroupNorm is lowered as on CPU, with ``Mul → Add`` for the
  affine (ORT's CUDA BatchNormalization clamps ε up to cuDNN's minimum 1e-5, so ε=0 would not be exact).
* **trt / ort-trt** — onnx-tensorrt's ``GroupNormalization``, ``InstanceNormalization`` and
  ``LayerNormalization`` importers all build one ``INormalizationLayer``, so the one-node forms are kept.
* **portable** — standard ONNX that any runtime loads: the canonical one-node forms are kept.

Algebra of the GroupNorm lowering: with x of shape (N, C, *S), ``v = Reshape(x, [N, G, C/G·ΠS])``
puts the channels of group g in row (n, g); InstanceNormalization with unit scale and zero bias
normalizes each row over its last axis with population variance and ε inside the square root, which is
GN-21's per-group statistic; reshaping back and applying ``γ[c]``, ``β[c]`` (broadcast as (C, 1, …, 1))
is GN-21's per-channel affine. ``BatchNormalization`` in inference mode computes
``(u − mean)/√(var + ε)·γ + β``; with mean 0, var 1 and ε 0 that is ``u·γ + β`` (ORT precomputes
``γ/√1 = γ`` and ``β − 0·γ = β``: the same two roundings as Mul then Add). Exact for float32/float64
(GN-21's ``stash_type=1`` computes in float32, as InstanceNormalization does for float32 inputs); other
dtypes are kept with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from normfold.errors import UsageError
from normfold.fusers._facts import GraphFacts
from normfold.fusers._graph import const_array, stamp, swap
from normfold.fusers.base import NormfoldPass, Scope, register_pass

logger = logging.getLogger(__name__)

TARGETS = ("portable", "ort-cpu", "ort-cuda", "ort-trt", "trt")
DEFAULT_TARGET = "portable"

IN_FORM = "InstanceNormalization form"
BN_AFFINE = "affine as BatchNormalization"
_EXACT_TYPES = {ir.DataType.FLOAT, ir.DataType.DOUBLE}


@dataclass(frozen=True)
class NormForms:
    """The form each norm gets on one target, and the evidence for it (shown in the report)."""

    groupnorm: str
    why_groupnorm: str
    why_kept: str
    bn_affine: bool = False  # the IN form's γ/β as one BatchNormalization(mean 0, var 1, ε 0), not Mul → Add


FORMS: dict[str, NormForms] = {
    "portable": NormForms(
        "GroupNormalization-21", "portable: the standard one-node form", "portable: the standard one-node form"
    ),
    "ort-cpu": NormForms(
        IN_FORM,
        "ORT's CPU EP has no GroupNormalization kernel (it expands the function body); InstanceNormalization has one",
        "ORT's CPU EP has a native kernel for it",
        bn_affine=True,
    ),
    "ort-cuda": NormForms(
        IN_FORM,
        "ORT's CUDA EP has no ONNX GroupNormalization kernel (contrib GroupNorm is NHWC-only); "
        "InstanceNormalization has a cuDNN kernel",
        "ORT's CUDA EP has a native kernel for it",
    ),
    "ort-trt": NormForms(
        "GroupNormalization-21",
        "TensorRT's ONNX parser maps GroupNormalization to one INormalizationLayer",
        "TensorRT's ONNX parser maps it to one INormalizationLayer",
    ),
    "trt": NormForms(
        "GroupNormalization-21",
        "TensorRT's ONNX parser maps GroupNormalization to one INormalizationLayer",
        "TensorRT's ONNX parser maps it to one INormalizationLayer",
    ),
}

_KEPT_NORMS = ("LayerNormalization", "RMSNormalization", "InstanceNormalization")


def check_target(target: str) -> str:
    """``target`` when it names a known runtime; otherwise a UsageError listing the valid ones."""
    if target not in FORMS:
        raise UsageError(f"unknown target {target!r}; valid targets are: {', '.join(TARGETS)}")
    return target


@register_pass
class LowerNorms(NormfoldPass):
    """GroupNormalization-21 → the target's fastest exact form; every norm's choice is recorded.

    Runs once after the fusion passes' fixed point (the GroupNorm fusion would otherwise fuse the
    lowered form back). Norm nodes that stay as they are get a ``skipped`` event whose reason starts
    with ``kept`` and says why, so the report lists a decision for every norm.
    """

    name = "lower_norms"

    def run(self, model: ir.Model) -> bool:
        forms = FORMS[check_target(self.ctx.target)]
        scope = Scope(model, model.graph, GraphFacts(model), in_function=False)
        changed = False
        for node in list(model.graph):
            if node.domain not in ("", "ai.onnx"):
                continue
            if node.op_type == "GroupNormalization":
                changed |= self._groupnorm(scope, node, forms)
            elif node.op_type in _KEPT_NORMS:
                self.skipped([node], f"kept as {node.op_type} on {self.ctx.target}: {forms.why_kept}")
        return changed

    def _groupnorm(self, scope: Scope, node: ir.Node, forms: NormForms) -> bool:
        if forms.groupnorm != IN_FORM:
            self.skipped([node], f"kept as {forms.groupnorm} on {self.ctx.target}: {forms.why_groupnorm}")
            return False
        if self.site_disabled(node.name or ""):
            self.skipped([node], "disabled by verification at this site")
            return False
        reason = _in_form_blocker(node)
        if reason is not None:
            self.skipped([node], f"kept as GroupNormalization-21 on {self.ctx.target}: {reason}")
            return False
        _lower_to_instance_norm(scope, node, forms.bn_affine)
        form = f"{IN_FORM} ({BN_AFFINE})" if forms.bn_affine else IN_FORM
        self.applied([node], f"GroupNormalization-21 → {form} on {self.ctx.target}: {forms.why_groupnorm}")
        return True


def _in_form_blocker(node: ir.Node) -> str | None:
    """None when the GroupNorm can become the InstanceNormalization form exactly; else why not."""
    x = node.inputs[0]
    if x is None or x.shape is None or len(x.shape) < 3:
        return "the input rank is unknown (or below 3)"
    if x.dtype not in _EXACT_TYPES:
        return f"input dtype {x.dtype} would change GN-21's float32 statistics (stash_type=1)"
    channels = x.shape[1]
    if not isinstance(channels, int):
        return "the channel count C is not static"
    for i, what in ((1, "scale"), (2, "bias")):
        value = node.inputs[i] if len(node.inputs) > i else None
        array = const_array(value)
        if array is None or array.size != channels:
            return f"the {what} is not a constant of C={channels} values"
    stash = node.attributes.get("stash_type")
    if stash is not None and stash.as_int() != 1:
        return f"stash_type={stash.as_int()} (only 1, float32 statistics, is reproduced)"
    return None


def _lower_to_instance_norm(scope: Scope, gn: ir.Node, bn_affine: bool) -> None:
    x = gn.inputs[0]
    assert x is not None and x.shape is not None and x.dtype is not None
    groups = gn.attributes["num_groups"].as_int()
    eps_attr = gn.attributes.get("epsilon")
    eps = eps_attr.as_float() if eps_attr is not None else 1e-5
    np_dtype, base = x.dtype.numpy(), gn.name or "groupnorm"

    grouped = ir.node("Reshape", [x, scope.constant(np.array([0, groups, -1], np.int64), f"{base}_groups")])
    norm = ir.node(
        "InstanceNormalization",
        [
            grouped.outputs[0],
            scope.constant(np.ones(groups, np_dtype), f"{base}_in_scale"),
            scope.constant(np.zeros(groups, np_dtype), f"{base}_in_bias"),
        ],
        attributes={"epsilon": float(eps)},
    )
    shape = ir.node("Shape", [x])
    back = ir.node("Reshape", [norm.outputs[0], shape.outputs[0]])
    nodes = [grouped, norm, shape, back, *_affine(scope, gn, back.outputs[0], len(x.shape), np_dtype, bn_affine)]
    out = nodes[-1].outputs[0]
    for i, new in enumerate(nodes):
        new.name = f"{base}_lowered_{new.op_type}_{i}"
        stamp(new, gn)
    grouped.outputs[0].dtype = norm.outputs[0].dtype = back.outputs[0].dtype = x.dtype
    shape.outputs[0].dtype = ir.DataType.INT64
    out.dtype = x.dtype
    swap(scope.graph, [gn], nodes, gn.outputs[0], out)


def _affine(scope: Scope, gn: ir.Node, u: ir.Value, rank: int, np_dtype: np.dtype, bn_affine: bool) -> list[ir.Node]:
    """GN-21's per-channel ``u·γ + β`` on the normalized ``u`` of shape (N, C, *S); identity parts dropped."""
    gamma, beta = const_array(gn.inputs[1]), const_array(gn.inputs[2])
    assert gamma is not None and beta is not None  # checked by _in_form_blocker
    base = gn.name or "groupnorm"
    scale, shift = not np.all(gamma == 1), not np.all(beta == 0)
    if bn_affine and scale and shift:  # one pass: BatchNormalization(u, γ, β, mean 0, var 1), ε = 0
        arrays = {"gamma": gamma, "beta": beta, "mean0": np.zeros(gamma.size), "var1": np.ones(gamma.size)}
        inputs = [u, *(scope.constant(a.astype(np_dtype), f"{base}_{k}") for k, a in arrays.items())]
        return [ir.node("BatchNormalization", inputs, attributes={"epsilon": 0.0})]
    bcast = (gamma.size,) + (1,) * (rank - 2)  # γ/β per channel, broadcast over (N, C, *S)
    nodes: list[ir.Node] = []
    for op, array, keep, what in (("Mul", gamma, scale, "gamma"), ("Add", beta, shift, "beta")):
        if keep:
            prev = nodes[-1].outputs[0] if nodes else u
            nodes.append(ir.node(op, [prev, scope.constant(array.reshape(bcast).astype(np_dtype), f"{base}_{what}")]))
    return nodes
