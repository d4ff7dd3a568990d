"""Provenance: which ``nn.Module`` produced an ONNX node.

The two torch exporters record it differently:

* dynamo writes ``metadata_props["pkg.torch.onnx.name_scopes"]``, the string form of a list such as
  ``['', 'layer1', 'layer1.0', 'layer1.0.conv', 'conv2d']``. The last entry is the aten op, the one
  before it the owning module's full path.
* the TorchScript exporter encodes scopes in the node name: ``/layer1/layer1.0/conv/Conv``. Scopes are
  either full paths (``layer1.0``) or names relative to the enclosing scope (``conv``); the last
  component is the op.

normfold normalizes both into one key, :data:`MODULE_PATH_KEY`, that :func:`module_path` reads first.
Passes call :func:`set_module_path` on every node they create, so a Conv that absorbed a BatchNorm
points at the BatchNorm's module (it now produces that module's output).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Collection, Iterable

import onnx
import onnx_ir as ir

MODULE_PATH_KEY = "normfold.module_path"
DYNAMO_SCOPES_KEY = "pkg.torch.onnx.name_scopes"

NodeLike = ir.Node | onnx.NodeProto


def _props(node: NodeLike) -> dict[str, str]:
    if isinstance(node, onnx.NodeProto):
        return {p.key: p.value for p in node.metadata_props}
    return dict(node.metadata_props)


def _from_dynamo(scopes: str) -> str | None:
    try:
        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(parts, list) or len(parts) < 2:
        return None
    return str(parts[-2])


def _from_legacy_name(name: str) -> str | None:
    """``/layer1/layer1.0/conv/Conv`` → ``layer1.0.conv``; ``/Relu`` → ``""``; unscoped → None."""
    if not name.startswith("/"):
        return None
    scopes = [s for s in name.split("/")[1:-1] if s]
    path = ""
    for scope in scopes:
        if (path and scope.startswith(path + ".")) or not path:
            path = scope
        else:
            path = f"{path}.{scope}"
    return path


def module_prefixes(path: str) -> list[str]:
    """``a.b.c`` → ``["", "a", "a.b", "a.b.c"]``."""
    if path == "":
        return [""]
    parts = path.split(".")
    return ["", *(".".join(parts[: i + 1]) for i in range(len(parts)))]


def is_ancestor(anc: str, path: str) -> bool:
    return anc != path and (anc == "" or path.startswith(anc + "."))


def resolve_module_path(path: str | None, modules: Collection[str]) -> str | None:
    """Map a provenance path onto the model's real module paths.

    The TorchScript exporter names a module's second call ``relu_1`` and scopes a child by its name
    relative to an ancestor (``/layer2/downsample/downsample.0/Conv`` reads as
    ``layer2.downsample.downsample.0``). Walking the components, each one is resolved as a child of the
    path so far, without a ``_N`` call suffix, or as a child of an ancestor; unresolvable components are
    skipped, so a node always lands in the deepest real module around it. Exact paths pass unchanged.
    """
    if path is None or not modules or path in modules:
        return path
    current = ""
    for comp in path.split("."):
        stripped = re.sub(r"_\d+$", "", comp)
        for base in reversed(module_prefixes(current)):
            found = next(
                (
                    c
                    for c in (f"{base}.{comp}" if base else comp, f"{base}.{stripped}" if base else stripped)
                    if c in modules
                ),
                None,
            )
            if found is not None and found != current and not is_ancestor(found, current):
                current = found
                break
    return current


def module_path(node: NodeLike) -> str | None:
    """The nn.Module path that produced ``node`` (``""`` is the root module), or None if unknown."""
    props = _props(node)
    if MODULE_PATH_KEY in props:
        return props[MODULE_PATH_KEY]
    if DYNAMO_SCOPES_KEY in props:
        found = _from_dynamo(props[DYNAMO_SCOPES_KEY])
        if found is not None:
            return found
    return _from_legacy_name(node.name or "")


def set_module_path(node: NodeLike, path: str | None) -> None:
    """Record ``path`` as the producer of ``node``; passes call this on every node they create."""
    if path is None:
        return
    if isinstance(node, onnx.NodeProto):
        for prop in node.metadata_props:
            if prop.key == MODULE_PATH_KEY:
                prop.value = path
                return
        node.metadata_props.add(key=MODULE_PATH_KEY, value=path)
    else:
        node.metadata_props[MODULE_PATH_KEY] = path


def stamp_module_paths(
    model: onnx.ModelProto | ir.Model,
    nodes: Iterable[NodeLike] | None = None,
    modules: Collection[str] = (),
) -> int:
    """Write the normalized key on every node whose provenance is known; returns how many got one.

    With ``modules`` (the exporting model's ``named_modules()`` paths), exporter paths that are not real
    modules (TorchScript's ``relu_1``, relative child scopes) are resolved onto the real ones first.
    """
    if nodes is None:
        nodes = model.graph.node if isinstance(model, onnx.ModelProto) else model.graph.all_nodes()
    count = 0
    for node in nodes:
        path = resolve_module_path(module_path(node), modules) if modules else module_path(node)
        if path is not None:
            set_module_path(node, path)
            count += 1
    return count
