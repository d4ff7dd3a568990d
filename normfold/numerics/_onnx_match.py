"""ONNX side of the per-layer comparison: which value of the graph carries each module call's output.

See :mod:`normfold.numerics.layers` for the matching rules (provenance groups, absorbers, nodeless
modules).
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import onnx

from normfold.exporter.provenance import is_ancestor, module_prefixes
from normfold.numerics._eager_trace import EagerTrace, _Call, call_names
from normfold.numerics._onnx_graph import _Graph
from normfold.numerics.functional import match_functional
from normfold.numerics.layer_report import (
    _ROOT_LABEL,
    REASON_CALLS,
    REASON_INLINED,
    REASON_NO_COUNTERPART,
    REASON_NON_TENSOR,
    REASON_SHAPE,
    LayerStatus,
)


def _parent(path: str) -> str | None:
    if path == "":
        return None
    return path.rsplit(".", 1)[0] if "." in path else ""


@dataclass
class _Match:
    """Where one layer's reference is found: an ONNX value (compared) or why there is none."""

    value: str | None = None
    status: LayerStatus = "unmatched"
    reason: str = ""
    reason_kind: str = ""
    fused_into: str | None = None
    alias_of: str = ""


def _pick_value(g: _Graph, group: list[int], shape: tuple[int, ...]) -> tuple[str | None, str]:
    """The last node's first output if its shape fits, else the last boundary value that fits."""
    last = g.nodes[group[-1]]
    first = last.output[0] if last.output else ""
    if first and g.fits(first, shape) is not False:
        return first, ""
    for v in reversed(g.boundary(group)):
        if g.fits(v, shape) is True:
            return v, ""
    got = g.shape(first) if first else None
    shown = "?" if got is None else "x".join("?" if d is None else str(d) for d in got)
    return None, (
        f"{REASON_SHAPE}: the last node {last.name!r} ({last.op_type}) gives {shown}, eager gives "
        f"{'x'.join(map(str, shape))}, and no value leaving the module has the eager shape"
    )


def _match_calls(g: _Graph, calls: list[_Call]) -> dict[tuple[int, int], _Match]:
    """Assign an ONNX value (or a reason) to every (call, output) whose module owns nodes."""
    by_path: dict[str, list[_Call]] = {}
    for c in calls:
        by_path.setdefault(c.path, []).append(c)
    result: dict[tuple[int, int], _Match] = {}
    for path, path_calls in by_path.items():
        if path == "":
            continue  # the root is matched on the graph outputs
        groups = g.groups(path)
        if not groups:
            continue
        if len(groups) == len(path_calls):
            pairs = list(zip(path_calls, groups, strict=True))
        elif len(path_calls) == 1:
            pairs = [(path_calls[0], sorted(i for grp in groups for i in grp))]
        else:
            # The calls cannot be told apart; only the last call's output (the last node) is certain.
            pairs = [(path_calls[-1], sorted(i for grp in groups for i in grp))]
            for c in path_calls[:-1]:
                for j in range(len(c.outputs)):
                    result[(c.order, j)] = _Match(
                        reason=(
                            f"{REASON_CALLS}: {path} runs {len(path_calls)} times in eager but its nodes form "
                            f"{len(groups)} connected groups in the ONNX graph; only its last call is compared"
                        ),
                        reason_kind=REASON_CALLS,
                    )
        for c, group in pairs:
            tensor_outputs = [(j, o) for j, o in enumerate(c.outputs) if o is not None]
            if len(tensor_outputs) == 1:
                j, ref = tensor_outputs[0]
                value, why = _pick_value(g, group, tuple(ref.shape))
                result[(c.order, j)] = (
                    _Match(value=value, status="pass")
                    if value is not None
                    else _Match(reason=why, reason_kind=REASON_SHAPE)
                )
                continue
            leaving = g.boundary(group)
            used: set[str] = set()
            for j, ref in tensor_outputs:
                fits = [v for v in leaving if v not in used and g.fits(v, tuple(ref.shape)) is not False]
                if fits:
                    used.add(fits[0])
                    result[(c.order, j)] = _Match(value=fits[0], status="pass")
                else:
                    result[(c.order, j)] = _Match(
                        reason=f"{REASON_SHAPE}: no value leaving {path} has shape {'x'.join(map(str, ref.shape))}",
                        reason_kind=REASON_SHAPE,
                    )
    return result


def _source_call(
    tensor_id: int, calls: list[_Call], producer: dict[int, tuple[int, int]], before: int
) -> tuple[int, int] | None:
    """The (call, output) that returned this tensor before call ``before``.

    The latest producer can be the asking call itself (an in-place ReLU returns its input), so then the
    earlier calls are searched.
    """
    src = producer.get(tensor_id)
    if src is not None and src[0] < before:
        return src
    for c in reversed(calls[:before]):
        if tensor_id in c.output_ids:
            return c.order, c.output_ids.index(tensor_id)
    return None


def _value_of_tensor(
    tensor_id: int,
    calls: list[_Call],
    producer: dict[int, tuple[int, int]],
    input_ids: list[int],
    g: _Graph,
    matches: dict[tuple[int, int], _Match],
    before: int,
    tracked: dict[int, str] | None = None,
) -> str | None:
    """The ONNX value carrying an eager tensor: a graph input or the matched output of an earlier call."""
    if tensor_id in input_ids:
        i = input_ids.index(tensor_id)
        return g.graph_inputs[i] if i < len(g.graph_inputs) else None
    src = _source_call(tensor_id, calls, producer, before)
    m = None if src is None else matches.get(src)
    if m is not None and m.value is not None:
        return m.value
    return (tracked or {}).get(tensor_id)  # the output of a matched functional op


def _absorber(
    g: _Graph, path: str, inputs: list[str], last_call: dict[str, int], order: int, shape: tuple[int, ...]
) -> tuple[str, onnx.NodeProto] | None:
    """The module (and node) that took over ``path``'s computation: a consumer of its inputs.

    Preference, nearest first: a later sibling (Conv → BN), a descendant of one, then the same one level
    up (timm's ``layer_scale`` after the ``Mlp`` whose ``fc2`` it absorbed), and so on; last an ancestor.
    "Later" means its last call finishes after call ``order``. The absorbing node must give ``path``'s
    eager shape where its shape is known: a consumer of another shape computes something else.
    """
    ancestors = module_prefixes(path)[-2::-1]  # parent first, root last
    best: tuple[int, int, str, onnx.NodeProto] | None = None
    for value in inputs:
        for i in g.consumers(value):
            owner = g.paths[i]
            if owner is None or owner == path or owner.startswith(path + "."):
                continue
            rank = _absorber_rank(owner, path, ancestors, last_call, order)
            node = g.nodes[i]
            if rank is None or (node.output and g.fits(node.output[0], shape) is False):
                continue
            if best is None or (rank, i) < best[:2]:
                best = (rank, i, owner, node)
    return None if best is None else (best[2], best[3])


def _absorber_rank(owner: str, path: str, ancestors: list[str], last_call: dict[str, int], order: int) -> int | None:
    """``2·level`` for a later-called child of the ``level``-th ancestor, +1 for a descendant of one; an
    ancestor of ``path`` itself ranks last; None for anything else (an earlier module)."""
    for level, anc in enumerate(ancestors):
        child = _child_towards(anc, owner)
        if child is None or child == path or is_ancestor(child, path):
            continue
        if last_call.get(child, -1) > order:
            return 2 * level + (0 if child == owner else 1)
    return 2 * len(ancestors) + 2 if is_ancestor(owner, path) else None


def _child_towards(parent: str, path: str) -> str | None:
    """The child of ``parent`` on the way down to ``path`` (``path`` itself for a direct child)."""
    if not is_ancestor(parent, path):
        return None
    rest = path[len(parent) + 1 :] if parent else path
    head = rest.split(".", 1)[0]
    return f"{parent}.{head}" if parent else head


@dataclass(frozen=True)
class _Context:
    """What the nodeless resolution reads: the eager trace, its row names, the graph, functional values."""

    trace: EagerTrace
    names: dict[tuple[int, int], str]
    g: _Graph
    tracked: dict[int, str]  # tensor id of a matched functional op's output -> its ONNX value
    fvalues: dict[int, str]  # functional call index -> its matched ONNX value

    @functools.cached_property
    def _writers(self) -> dict[int, list[tuple[int, int]]]:
        """tensor id -> ``(after_call, index)`` of every functional call that returned it, in run order."""
        out: dict[int, list[tuple[int, int]]] = {}
        for k, f in enumerate(self.trace.functional):
            out.setdefault(f.output_id, []).append((f.after_call, k))
        return out

    def functional_before(self, tensor_id: int, before: int) -> int | None:
        """The last functional call that returned this tensor before module call ``before`` finished.

        Ids alone are not enough: an in-place op (``x += y``, ``Tensor.add_``) returns the tensor it was
        given, so a later functional call can carry the id of a module's output whose value it then changed.
        """
        writers = self._writers.get(tensor_id, [])
        at = bisect.bisect_right(writers, (before, len(self.trace.functional)))
        return writers[at - 1][1] if at else None

    def value_of(self, tensor_id: int, matches: dict[tuple[int, int], _Match], before: int) -> str | None:
        t = self.trace
        return _value_of_tensor(tensor_id, t.calls, t.producer, t.input_ids, self.g, matches, before, self.tracked)


def _same_value(c: _Call, j: int, ctx: _Context, matches: dict[tuple[int, int], _Match]) -> _Match | None:
    """The match of an identity in this run: output ``j`` of ``c`` is the very tensor it was given
    (Identity, eval Dropout, DropPath(0)) or equal to its only input in shape, dtype and every bit (a no-op
    Flatten). It is the same value as its source, so it shares the source's fate: compared at the source's
    ONNX value, fused where the source was fused, unmatched for the source's reason. None when there is no
    such source (then the module is resolved like any nodeless one)."""
    t, out = ctx.trace, c.outputs[j]
    if c.returns_input:
        tensor_id, by_value = c.output_ids[j], False
    elif len(c.input_ids) == 1 and sum(o is not None for o in c.outputs) == 1:
        tensor_id, by_value = c.input_ids[0], True
    else:
        return None
    if tensor_id in t.input_ids:
        value = ctx.value_of(tensor_id, matches, c.order)
        if by_value or value is None:
            return None
        return _Match(value=value, status="pass", alias_of=f"input {value}", reason="identity in eager")
    src = _source_call(tensor_id, t.calls, t.producer, c.order)
    k = ctx.functional_before(tensor_id, c.order)
    source: np.ndarray | None
    if k is not None and (src is None or t.functional[k].after_call > src[0]):
        src = None  # a functional op wrote this tensor last (after any module that returned it)
        label, source = t.functional[k].name, t.functional[k].output
    elif src is not None:
        source, label = t.calls[src[0]].outputs[src[1]], ctx.names[src]
    else:
        return None
    if out is None or source is None or not _identical(out, source):
        return None  # not the same value after all: an in-place op changed it after this call returned it
    if src is not None:
        m = matches.get(src)
    else:
        m = _Match(value=ctx.fvalues.get(k) if k is not None else None, status="pass")
    if m is None:
        return None
    if m.value is None and src is None:
        return _Match(
            reason=f"{REASON_NO_COUNTERPART}: identity in eager on the output of {label}, a functional op "
            "with no matched ONNX value (the export records no source line to match it by)",
            reason_kind=REASON_NO_COUNTERPART,
        )
    label = m.alias_of or label
    if m.value is not None:
        return _Match(value=m.value, status="pass", alias_of=label, reason=f"identity in eager: same value as {label}")
    if m.status == "fused":
        return dataclasses.replace(m, alias_of=label)
    return _Match(
        reason=f"its output is {label}'s, which is not matched ({m.reason_kind or m.reason})",
        reason_kind=m.reason_kind or REASON_NO_COUNTERPART,
    )


def _identical(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=True)


def _resolve_nodeless(ctx: _Context, matches: dict[tuple[int, int], _Match]) -> None:
    """Give a match or a reason to every (call, output) of a module that owns no ONNX node.

    An identity in this run shares its source's match (:func:`_same_value`); a BatchNorm the exporter
    folded into its Conv is compared at the Conv (:func:`_folded_into_producer`); otherwise the module
    was absorbed by a node that consumes its inputs (:func:`_absorber`) or has no counterpart. Every
    call, with nodes or not, then follows the child that produced its output (:func:`_follow_child`). ``ctx.tracked``
    lets a Dropout fed by ``F.gelu(x)`` be compared at the Gelu's value instead of "untracked ops"."""
    calls = ctx.trace.calls
    last_call = {c.path: c.order for c in calls}
    for c in calls:  # finishing order: a call's sources (children, earlier calls) are settled before it
        if c.path == "":
            continue  # the root is handled by the root match
        for j, out in enumerate(c.outputs):
            key = (c.order, j)
            if out is None and key not in matches:
                matches[key] = _Match(
                    reason=f"{REASON_NON_TENSOR} (returns no tensor here)", reason_kind=REASON_NON_TENSOR
                )
            elif out is not None and key not in matches:
                same = _same_value(c, j, ctx, matches) or _folded_into_producer(c, ctx, matches)
                matches[key] = same if same is not None else _absorbed(c, tuple(out.shape), ctx, matches, last_call)
            _follow_child(c, j, ctx, matches)


#: Modules the TorchScript exporter folds into the Conv that feeds them (its eval-mode Conv+BN peephole).
_FOLDABLE = frozenset({"BatchNorm1d", "BatchNorm2d", "BatchNorm3d"})


def _folded_into_producer(c: _Call, ctx: _Context, matches: dict[tuple[int, int], _Match]) -> _Match | None:
    """A module folded into the node of the module that fed it: the TorchScript exporter folds an eval
    BatchNorm into its Conv, and the Conv node keeps the *conv's* name.

    Structure, not numbers, decides (a default-initialised BN is within tolerance of the identity, so
    the conv compared at the folded value would pass: a wrong comparison). The module is a BatchNorm that
    owns no node; its only input is the whole output of one matched call ``p``, produced by a Conv of
    ``p``; no other eager call took that tensor, yet nodes outside ``p`` read that value. Then the value
    is what the graph uses as *this* module's output: the module is compared there (a BN the graph really
    dropped fails there, named), and ``p``, whose own output is nowhere in the graph, is "fused into" it.
    Returns this module's match; ``p``'s is rewritten.
    """
    t, g = ctx.trace, ctx.g
    if c.module_type not in _FOLDABLE or len(c.input_ids) != 1 or sum(o is not None for o in c.outputs) != 1:
        return None
    src = _source_call(c.input_ids[0], t.calls, t.producer, c.order)
    fed = matches.get(src) if src is not None else None
    if src is None or fed is None or fed.value is None or fed.alias_of:
        return None
    others = (o for o in t.calls if o is not c and not is_ancestor(o.path, c.path))  # containers pass it down
    if any(c.input_ids[0] in other.input_ids for other in others) or any(
        c.input_ids[0] in f.input_ids for f in t.functional
    ):
        return None
    feeder = t.calls[src[0]].path
    node = g.producer_node(fed.value)
    inside = {i for i in g.by_module.get(feeder, [])}
    readers = [i for i in g.consumers(fed.value) if i not in inside]
    if node is None or node.op_type != "Conv" or not readers or g.producer(fed.value) not in inside:
        return None
    matches[src] = _Match(
        status="fused",
        fused_into=c.path,
        reason=f"{node.op_type} {node.name!r} computes {c.path} (the exporter folded them)",
    )
    return _Match(
        value=fed.value,
        status="pass",
        reason=f"computed by {node.op_type} {node.name!r}, whose provenance names {feeder} (the exporter folded them)",
    )


def _absorbed(
    c: _Call,
    shape: tuple[int, ...],
    ctx: _Context,
    matches: dict[tuple[int, int], _Match],
    last_call: dict[str, int],
) -> _Match:
    """A nodeless module that is no identity: fused into the node that consumes its inputs, or none."""
    t = ctx.trace
    inputs = [v for v in (ctx.value_of(i, matches, c.order) for i in c.input_ids) if v is not None]
    found = _absorber(ctx.g, c.path, inputs, last_call, c.order, shape) if inputs else None
    if found is None:
        feeder = next((s for s in (_source_call(i, t.calls, t.producer, c.order) for i in c.input_ids) if s), None)
        along = _fused_along(c, feeder, ctx, matches, last_call) if not inputs else None
        if along is not None:
            return along
        untracked = (
            f"its input comes from {t.calls[feeder[0]].path or _ROOT_LABEL}, which has no ONNX value of its own"
            if feeder is not None
            else "its inputs come from untracked ops"
        )
        why = (
            "its nodes are not in the graph and no later module consumes its inputs"
            if inputs
            else f"its nodes are not in the graph and {untracked}"
        )
        return _Match(reason=f"{REASON_NO_COUNTERPART}: {why}", reason_kind=REASON_NO_COUNTERPART)
    owner, node = found
    if is_ancestor(owner, c.path):
        return _Match(
            status="fused",
            reason=f"{REASON_INLINED}: {node.op_type} {node.name!r} of {owner or _ROOT_LABEL}",
            reason_kind=REASON_INLINED,
            fused_into=owner,
        )
    return _Match(status="fused", fused_into=owner, reason=f"{node.op_type} {node.name!r}")


def _fused_along(
    c: _Call,
    feeder: tuple[int, int] | None,
    ctx: _Context,
    matches: dict[tuple[int, int], _Match],
    last_call: dict[str, int],
) -> _Match | None:
    """A nodeless module fed only by a call that was fused into a later module ``X``: it went into ``X``'s
    node along with its input (efficientformer's ``fc2 → norm2`` folded with the layer scale after them).
    Nothing of it is left in the graph between its input and ``X``, so ``X``'s node computes it too."""
    if feeder is None or len(c.input_ids) != 1:
        return None
    fed = matches.get(feeder)
    if fed is None or fed.status != "fused" or fed.fused_into is None:
        return None
    into = fed.fused_into
    if not (last_call.get(into, -1) > c.order or is_ancestor(into, c.path)):
        return None
    return dataclasses.replace(fed, alias_of="", reason=f"{fed.reason}, with its input {ctx.names[feeder]}")


def _follow_child(c: _Call, j: int, ctx: _Context, matches: dict[tuple[int, int], _Match]) -> None:
    """Provenance checked from the eager side: a module that returns a tensor one of its descendants
    returned must be compared at that descendant's value, or not at all.

    The graph side alone picks "the last node under the module's path", which is a wrong value when
    the exporter lost or misplaced the provenance of the nodes that really end the module (a
    TorchScript mobilenet_v3 block compared its squeeze-excitation Mul, error 7.4, as its output). The
    eager trace knows which call produced each tensor, so the parent follows its child and is its alias:
    the same value when the child is matched, fused where the child was fused, "not matched" with the
    child's reason otherwise. A child fused into an op of this very parent (or of one of its
    descendants) leaves the parent's own match alone (that op computes both).
    """
    calls, key, tensor_id = ctx.trace.calls, (c.order, j), c.output_ids[j]
    if tensor_id == 0 or key not in matches or c.returns_input:
        return
    src = _source_call(tensor_id, calls, ctx.trace.producer, c.order)
    if src is None or not is_ancestor(c.path, calls[src[0]].path):
        return
    mine_ref, child_ref = c.outputs[j], calls[src[0]].outputs[src[1]]
    if mine_ref is None or child_ref is None or not np.array_equal(mine_ref, child_ref, equal_nan=True):
        return  # the same tensor object, changed in place afterwards (``out += identity``)
    child = matches.get(src)
    if child is None:
        return
    label = child.alias_of or ctx.names[src]
    if child.value is not None:
        matches[key] = _Match(value=child.value, status="pass", alias_of=label, reason=f"its output is {label}'s")
    elif child.status == "fused":
        if child.fused_into is None or not (child.fused_into == c.path or is_ancestor(c.path, child.fused_into)):
            matches[key] = dataclasses.replace(child, alias_of=label)
    else:
        matches[key] = _Match(
            reason=f"its output is {ctx.names[src]}'s, which is not matched ({child.reason_kind or child.reason})",
            reason_kind=child.reason_kind or REASON_NO_COUNTERPART,
        )


def _match_all(g: _Graph, trace: EagerTrace) -> tuple[dict[tuple[int, int], _Match], dict[int, str]]:
    """Every module call's value (by provenance, then nodeless resolution, then the root against the
    graph outputs) and every functional call's value (by functional call index)."""
    matches = _match_calls(g, trace.calls)
    fvalues = match_functional(trace.functional, g.nodes, g.paths, g.fits)
    tracked = {trace.functional[k].output_id: value for k, value in fvalues.items()}
    names = call_names(trace.calls)
    _resolve_nodeless(_Context(trace, names, g, tracked, fvalues), matches)
    _match_root(g, trace.calls, matches)
    return matches, fvalues


def _match_root(g: _Graph, calls: list[_Call], matches: dict[tuple[int, int], _Match]) -> None:
    """The root module's tensors are the graph outputs, by position, when their counts agree."""
    root_outputs = list(g.graph_outputs)
    for c in calls:
        if c.path != "":
            continue
        tensor_js = [j for j, o in enumerate(c.outputs) if o is not None]
        for k, j in enumerate(tensor_js):
            if len(tensor_js) == len(root_outputs):
                matches[(c.order, j)] = _Match(value=root_outputs[k], status="pass")
            else:
                matches[(c.order, j)] = _Match(
                    reason=f"{REASON_NO_COUNTERPART}: the graph has {len(root_outputs)} outputs, eager "
                    f"returned {len(tensor_js)} tensors",
                    reason_kind=REASON_NO_COUNTERPART,
                )
