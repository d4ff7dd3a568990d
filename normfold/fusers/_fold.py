"""The one tail every weight-folding rule shares: cast-checked weights → clone → provenance → new nodes.

A fold rule (BN into the layer before or after it, a per-channel affine chain) computes the layer's new
weight ``W'`` and bias ``B'`` in float64 (:mod:`normfold.fusers._math`). :class:`FoldRule` turns that
into ``check``/``rewrite``: ``check`` runs the rule's own ``validate`` and then the cast of the float64
fold to the initializers' dtypes (a value that overflows its dtype is a reason to keep the unfolded form,
since the unfolded graph does not overflow); ``rewrite`` builds the same arrays again from the site
(cheap: one layer's weights) and emits the layer through :func:`fold_layer`. Folds write *new* constants
(the exporter may alias the old initializer with BN statistics) and leave the old ones to the cleanup.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import numpy as np
import onnx_ir as ir

from normfold.fusers import _graph as g
from normfold.fusers import _math
from normfold.fusers.base import Reject, Rule, Scope, Site


@dataclass(frozen=True, eq=False)
class FoldSite(Site):
    """A layer (Conv/ConvTranspose/Gemm/MatMul) whose weights absorb a per-channel affine."""

    layer: ir.Node
    weight: ir.Value | None
    bias: ir.Value | None

    @functools.cached_property
    def weight_array(self) -> np.ndarray | None:
        """The weight's constant value, read once per site (``check`` and ``rewrite`` both need it)."""
        return g.const_array(self.weight)

    @functools.cached_property
    def bias_array(self) -> np.ndarray | None:
        return g.const_array(self.bias)

    def arrays(self) -> tuple[np.ndarray, np.ndarray | None]:
        """The layer's constant weight and optional bias (only for a site whose weights were validated)."""
        assert self.weight_array is not None, "validate() accepts constant weights only"
        return self.weight_array, self.bias_array


F = TypeVar("F", bound=FoldSite)


class FoldRule(Rule[F]):
    """A :class:`Rule` whose rewrite folds float64 weights into a clone of ``site.layer``."""

    #: What stays when the fold would overflow, for the skip reason ("the unfolded BN does not overflow").
    kept: ClassVar[str] = "BN"

    @abc.abstractmethod
    def validate(self, site: F) -> str | None:
        """The rule's own reason not to fold (non-constant weights, shared weights, channel counts)."""

    @abc.abstractmethod
    def fold(self, site: F) -> tuple[np.ndarray, np.ndarray]:
        """The folded weight and bias in float64 (only called on a site that passed :meth:`validate`)."""

    def check(self, site: F) -> Reject | None:
        reason = self.validate(site)
        if reason is None:
            folded = self.folded(site)
            reason = folded if isinstance(folded, str) else None
        return None if reason is None else Reject(site.nodes, reason)

    def folded(self, site: F) -> tuple[np.ndarray, np.ndarray] | str:
        """:meth:`fold` cast to the weight's and bias's dtypes, or why a value would overflow."""
        w, b = site.arrays()
        w64, b64 = self.fold(site)
        try:
            return (
                _math.cast_checked(w64, w.dtype, "weight"),
                _math.cast_checked(b64, b.dtype if b is not None else w.dtype, "bias"),
            )
        except _math.FoldOverflowError as e:
            return f"{e}; the unfolded {self.kept} does not overflow, so it is kept"

    def folded_weights(self, site: F) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`folded` for :meth:`rewrite`, where :meth:`check` has already accepted the site."""
        folded = self.folded(site)
        assert not isinstance(folded, str), folded
        return folded

    def describe(self, site: F, created: list[ir.Node]) -> str:
        return f"folded into {site.layer.op_type}{cloned_note(site.weight)}"


def weight_reason(site: FoldSite, allow_copies: bool) -> str | None:
    """Why the layer's weight/bias cannot be folded into: not constants, or shared without permission."""
    layer, weight, bias = site.layer, site.weight, site.bias
    if site.weight_array is None or weight is None:
        return g.nonconst_reason(weight, f"{layer.op_type} weight")
    if bias is not None and site.bias_array is None:
        return g.nonconst_reason(bias, f"{layer.op_type} bias")
    return g.shared_weight_reason(weight, layer, allow_copies)


def fold_layer(
    scope: Scope,
    site: FoldSite,
    x: ir.Value | None,
    arrays: tuple[np.ndarray, np.ndarray],
    *,
    source: ir.Node,
    add_name: str,
) -> list[ir.Node]:
    """A clone of ``site.layer`` reading ``x`` with the folded weight and bias, stamped with the module
    path of ``source`` (the node whose output it now produces). MatMul has no bias input, so it gets an
    ``Add`` named ``add_name``; Gemm's β is folded into the bias and dropped."""
    layer, weight = site.layer, site.weight
    assert weight is not None
    w_init = scope.constant(arrays[0], f"{weight.name}_nf")
    bias_base = site.bias.name if site.bias is not None else f"{weight.name}_bias"
    b_init = scope.constant(arrays[1], f"{bias_base}_nf")
    if layer.op_type == "MatMul":
        mm = g.clone_node(layer, [x, w_init])
        nodes = [mm, ir.Node("", "Add", [mm.outputs[0], b_init], num_outputs=1, name=add_name)]
    else:
        drop = ("beta",) if layer.op_type == "Gemm" else ()
        nodes = [g.clone_node(layer, [x, w_init, b_init], drop_attrs=drop)]
    for node in nodes:
        g.stamp(node, source)
    return nodes


def cloned_note(weight: ir.Value | None) -> str:
    """After the swap, a weight still read elsewhere was shared, so the fold cloned it."""
    return " (weight cloned: it is shared)" if weight is not None and g.other_users(weight, []) else ""
