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
    path so far, with or without a ``_N`` call suffix; other components are skipped, so a node always
    lands in the deepest real module around it, never beside it. Exact paths pass unchanged.
    """
    if path is None or not modules or path in modules:
        return path
    current = ""
    for comp in path.split("."):
        stripped = re.sub(r"_\d+$", "", comp)
        # Only ever descend: a component that is no child of the path so far repeats an ancestor's
        # name (``downsample`` in ``downsample.downsample.0``) and is skipped. Jumping to a sibling of
        # an ancestor instead put ``features.1.block.2.0``'s Conv under ``features.0`` (mobilenet_v3).
        prefix = f"{current}." if current else ""
        found = next((c for c in (prefix + comp, prefix + stripped) if c in modules), None)
        if found is not None:
            current = found
    return current


def _resolve_legacy_scopes(name: str, modules: Collection[str]) -> str:
    """``/features/features.1/block/block.0/block.0.2/Relu`` → ``features.1.block.0.2`` on real modules.

    Each TorchScript scope is a full path (``features.1``), a child name (``block``), a name relative to
    an ancestor (``block.0.2`` under ``features.1.block.0`` is ``features.1`` + ``block.0.2``) or a
    repeated call (``relu_1``). Scopes are resolved whole, only ever descending; splitting them at the dots
    instead read ``block.0.2`` as ``… .0`` + ``2`` and put a ReLU on its sibling Conv.
    """
    current = ""
    for scope in (s for s in name.split("/")[1:-1] if s):
        stripped = re.sub(r"_\d+$", "", scope)
        bases = [current, *reversed(module_prefixes(current)[:-1])] if current else [""]
        for base in bases:
            prefix = f"{base}." if base else ""
            found = next(
                (c for c in (prefix + scope, prefix + stripped) if c in modules and is_ancestor(current, c)), None
            )
            if found is not None:
                current = found
                break
    return current


def resolve_node_path(node: NodeLike, modules: Collection[str]) -> str | None:
    """:func:`module_path` mapped onto the model's real module paths (see :func:`resolve_module_path`)."""
    props = _props(node)
    name = node.name or ""
    if modules and MODULE_PATH_KEY not in props and DYNAMO_SCOPES_KEY not in props and name.startswith("/"):
        return _resolve_legacy_scopes(name, modules)
    return resolve_module_path(module_path(node), modules) if modules else module_path(node)


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
        path = resolve_node_path(node, modules)
        if path is not None:
            set_module_path(node, path)
            count += 1
    return count
