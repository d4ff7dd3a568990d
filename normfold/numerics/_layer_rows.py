"""Rows of the per-layer report: naming, input sources, metrics under the effective tolerance, and the
re-attribution of fusions the TorchScript exporter named after their first module.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from torch import nn

from normfold.numerics._eager_trace import EagerTrace, _Call, call_names
from normfold.numerics._onnx_graph import _Graph
from normfold.numerics._onnx_match import _Match, _parent, _source_call
from normfold.numerics.functional import FunctionalCall
from normfold.numerics.layer_report import (
    _ROOT_LABEL,
    REASON_NO_COUNTERPART,
    REASON_NOT_CALLED,
    REASON_SHAPE,
    LayerResult,
    layer_tolerance,
    max_magnitude,
)
from normfold.numerics.metrics import compare_tensors
from normfold.numerics.tolerances import Tolerance


def _depth(path: str) -> int:
    return 0 if path == "" else path.count(".") + 1


def _input_sources(
    c: _Call,
    calls: list[_Call],
    producer: dict[int, tuple[int, int]],
    input_ids: list[int],
    names: dict[tuple[int, int], str],
    g: _Graph,
    fnames: dict[int, str],
) -> list[str]:
    """Where each input tensor of a call came from: a graph input, an earlier layer, a functional op
    (``fnames`` by tensor id), or untracked ops."""
    sources = []
    for t in c.input_ids:
        if t in input_ids:
            idx = input_ids.index(t)
            sources.append(f"input {g.graph_inputs[idx]}" if idx < len(g.graph_inputs) else "input")
            continue
        src = _source_call(t, calls, producer, c.order)
        if src is not None:
            sources.append(names[src])
        else:
            sources.append(fnames.get(t) or f"ops of {_parent(c.path) or _ROOT_LABEL}")
    return sources


def _functional_layers(
    trace: EagerTrace, fvalues: dict[int, str], produced: dict[str, np.ndarray], tol: Tolerance, g: _Graph
) -> dict[int, list[tuple[LayerResult, FunctionalCall]]]:
    """A compared row per matched functional call, keyed by the module call it precedes."""
    rows: dict[int, list[tuple[LayerResult, FunctionalCall]]] = {}
    for k, value in sorted(fvalues.items()):
        call = trace.functional[k]
        actual = produced.get(value)
        if actual is None or tuple(np.shape(actual)) != tuple(call.output.shape):
            continue
        node = g.producer_node(value)
        magnitude = max_magnitude(call.output)
        tolerance = layer_tolerance(tol, magnitude)
        metrics = compare_tensors(call.name, actual, call.output, tolerance)
        rows.setdefault(call.after_call, []).append(
            (
                LayerResult(
                    name=call.name,
                    module=call.owner,
                    module_type=call.op,
                    call=call.index,
                    output_index=0,
                    order=call.after_call,
                    depth=_depth(call.owner) + 1,
                    status="pass" if metrics.passed else "fail",
                    reason=f"functional op at {call.file}:{call.line}",
                    onnx_value=value,
                    onnx_node=None if node is None else node.name,
                    op_type=None if node is None else node.op_type,
                    shape=tuple(call.output.shape),
                    tolerance=tolerance,
                    metrics=metrics,
                    ref_max_abs=magnitude,
                    kind="functional",
                ),
                call,
            )
        )
    return rows


def _fill_metrics(
    layer: LayerResult,
    m: _Match,
    ref: np.ndarray,
    produced: dict[str, np.ndarray],
    tol: Tolerance,
    g: _Graph,
    seen: dict[str, list[tuple[np.ndarray, LayerResult]]],
) -> None:
    """Compare one matched layer under its effective tolerance; a shape mismatch makes it unmatched.

    A block returns its last child's tensor, so the same (value, reference) pair recurs; ``seen`` reuses
    those metrics instead of recomputing them (the metrics dominate the per-layer cost on small models).
    """
    name = m.value or ""
    node = g.producer_node(name)
    layer.onnx_value = name
    layer.onnx_node = node.name if node is not None else f"input {name}"
    layer.op_type = node.op_type if node is not None else "graph input"
    layer.alias_of = m.alias_of or None
    actual = produced.get(name)
    if actual is None:
        layer.status, layer.reason_kind = "unmatched", REASON_NO_COUNTERPART
        layer.reason = f"{REASON_NO_COUNTERPART}: the backend did not return {name!r}"
        return
    if tuple(np.shape(actual)) != tuple(ref.shape):
        layer.status, layer.reason_kind = "unmatched", REASON_SHAPE
        layer.reason = (
            f"{REASON_SHAPE}: ONNX value {name!r} has shape {'x'.join(map(str, np.shape(actual)))}, "
            f"eager {'x'.join(map(str, ref.shape))}"
        )
        return
    for earlier_ref, earlier in seen.get(name, []):
        if earlier.metrics is not None and earlier_ref.dtype == ref.dtype and np.array_equal(earlier_ref, ref):
            layer.ref_max_abs, layer.tolerance = earlier.ref_max_abs, earlier.tolerance
            layer.metrics = dataclasses.replace(earlier.metrics, name=layer.name)
            layer.status = earlier.status
            return
    layer.ref_max_abs = max_magnitude(ref)
    layer.tolerance = layer_tolerance(tol, layer.ref_max_abs)
    layer.metrics = compare_tensors(layer.name, actual, ref, layer.tolerance)
    layer.status = "pass" if layer.metrics.passed else "fail"
    seen.setdefault(name, []).append((ref, layer))


def _credit_exporter_fusions(
    layers: list[LayerResult], calls: list[_Call], produced: dict[str, np.ndarray], tol: Tolerance
) -> None:
    """Re-attribute a fusion whose node kept the *first* module's provenance (Conv+BN folded by the
    TorchScript exporter stays ``/conv1/Conv``).

    Such a layer fails against its own module's output but matches the next sibling that fed on it and
    owns no node (the BN). Then the sibling is compared at that value (and passes) and the first module
    is "fused into" it. A real fault in the fused node fails against both and stays where provenance put
    it, so fault localization is unchanged.
    """
    for k, layer in enumerate(layers):
        if layer.status != "fail" or layer.onnx_value is None:
            continue
        for nxt in layers[k + 1 :]:
            if nxt.onnx_value is not None or layer.name not in nxt.inputs_from:
                continue
            if _parent(nxt.module) != _parent(layer.module) or nxt.shape != layer.shape:
                continue
            ref = calls[nxt.order].outputs[nxt.output_index]
            actual = produced.get(layer.onnx_value)
            if ref is None or actual is None:
                break
            magnitude = max_magnitude(ref)
            tolerance = layer_tolerance(tol, magnitude)
            metrics = compare_tensors(nxt.name, actual, ref, tolerance)
            if not metrics.passed:
                break
            nxt.status, nxt.reason_kind, nxt.fused_into = "pass", "", None
            nxt.reason = f"computed by {layer.op_type} {layer.onnx_node!r}, whose provenance names {layer.module}"
            nxt.onnx_value, nxt.onnx_node, nxt.op_type = layer.onnx_value, layer.onnx_node, layer.op_type
            nxt.metrics, nxt.tolerance, nxt.ref_max_abs = metrics, tolerance, magnitude
            for other in layers:
                if nxt.name in other.absorbed:
                    other.absorbed.remove(nxt.name)
            nxt.absorbed.append(layer.name)
            layer.status, layer.fused_into, layer.reason_kind = "fused", nxt.module, ""
            layer.reason = f"{layer.op_type} {layer.onnx_node!r} computes {nxt.name} (the exporter fused them)"
            layer.onnx_value, layer.metrics, layer.tolerance = None, None, None
            break


def _follow_credited(layers: list[LayerResult]) -> None:
    """A parent left unmatched because its child was (see :func:`_follow_child`) takes the
    child's comparison when :func:`_credit_exporter_fusions` matched the child after all."""
    by_name = {layer.name: layer for layer in layers}
    for layer in layers:  # execution order: a child is settled before its parent
        if layer.status != "unmatched" or not layer.reason.startswith("its output is "):
            continue
        child = by_name.get(layer.reason.removeprefix("its output is ").split("'s, which", 1)[0])
        if child is None or not child.matched or child.metrics is None:
            continue
        layer.status, layer.reason_kind = child.status, ""
        layer.reason = f"its output is {child.name}'s"
        layer.alias_of = child.alias_of or child.name
        layer.onnx_value, layer.onnx_node, layer.op_type = child.onnx_value, child.onnx_node, child.op_type
        layer.metrics = dataclasses.replace(child.metrics, name=layer.name)
        layer.tolerance, layer.ref_max_abs = child.tolerance, child.ref_max_abs


def _call_rows(
    trace: EagerTrace,
    matches: dict[tuple[int, int], _Match],
    fvalues: dict[int, str],
    produced: dict[str, np.ndarray],
    tol: Tolerance,
    g: _Graph,
) -> list[LayerResult]:
    """One row per module call output and per matched functional call, in execution order."""
    calls, producer, input_ids = trace.calls, trace.producer, trace.input_ids
    fnames = {call.output_id: call.name for call in trace.functional}
    names = call_names(calls)
    functional = _functional_layers(trace, fvalues, produced, tol, g)
    for rows in functional.values():
        for row, call in rows:
            pseudo = _Call("", "", 0, call.after_call, [], [], call.input_ids, False)
            row.inputs_from = _input_sources(pseudo, calls, producer, input_ids, names, g, fnames)
    absorbed: dict[str, list[str]] = {}
    for (order, j), m in sorted(matches.items()):
        if m.status == "fused" and m.fused_into is not None:
            absorbed.setdefault(m.fused_into, []).append(names[(order, j)])
    layers: list[LayerResult] = []
    seen: dict[str, list[tuple[np.ndarray, LayerResult]]] = {}
    for c in calls:
        layers.extend(row for row, _ in functional.pop(c.order, []))
        sources = _input_sources(c, calls, producer, input_ids, names, g, fnames)
        for j, ref in enumerate(c.outputs):
            m = matches.get((c.order, j), _Match(reason=REASON_NO_COUNTERPART, reason_kind=REASON_NO_COUNTERPART))
            layer = LayerResult(
                name=names[(c.order, j)],
                module=c.path,
                module_type=c.module_type,
                call=c.call,
                output_index=j,
                order=c.order,
                depth=_depth(c.path),
                status=m.status,
                reason=m.reason,
                reason_kind=m.reason_kind,
                fused_into=m.fused_into,
                shape=tuple(ref.shape) if ref is not None else (),
                inputs_from=sources,
                absorbed=list(absorbed.get(c.path, [])),
                alias_of=m.alias_of or None,
            )
            if m.value is not None and ref is not None:
                _fill_metrics(layer, m, ref, produced, tol, g, seen)
            layers.append(layer)
    for rest in functional.values():
        layers.extend(row for row, _ in rest)
    return layers


def _never_called_rows(module: nn.Module, trace: EagerTrace) -> list[LayerResult]:
    """Submodules no hook saw run in the eager forward: no layer of this run, listed apart (``not_called``).

    Called-ness is the hooks' record, not a guess. A module with parameters may still have them read by
    its owner (``F.linear(x, self.fc.weight)``): that computation is the owner's row, and the row says so.
    """
    rows = []
    for path in trace.never_called:
        sub = module.get_submodule(path)
        owned = next(sub.parameters(), None) is not None
        rows.append(
            LayerResult(
                name=path,
                module=path,
                module_type=type(sub).__name__,
                call=0,
                output_index=0,
                order=len(trace.calls),
                depth=_depth(path),
                status="not_called",
                reason=REASON_NOT_CALLED
                + ("; its parameters may be read directly by the module that owns it" if owned else ""),
                reason_kind=REASON_NOT_CALLED,
            )
        )
    return rows
