"""torch → ONNX with an opset check, provenance, and an atomic write.

* ``exporter="dynamo"`` (default) uses ``torch.onnx.export(dynamo=True, optimize=False)`` followed by
  constant folding and constant lifting only. torch's own ``optimize=True`` would also fold BatchNorm,
  but without verification and without pointing the fused node at the BN module; normfold's passes do
  that instead (``normfold optimize``).
* ``exporter="torchscript"`` is the legacy exporter (opset ≤ 20). It folds Conv+BN itself but leaves
  ConvTranspose+BN and Gemm+BN.
* The result must carry the opset that was asked for. The dynamo exporter silently produces opset 18
  when asked for 17 when its down-conversion fails (NORMS.md §2); that is an :class:`ExportError`.
* A model that arrives in training mode (or that :func:`~normfold.models.load_model` found in training
  mode and switched) is exported in eval mode with a WARNING: the dynamo exporter would otherwise export
  a train-mode BatchNorm as an inference BatchNorm without saying so.
* The exporter runs the user's ``forward``: it runs under :func:`~normfold.models.guard.user_code`, so a
  ``sys.exit`` in it is an error, not the end of the process.
* Below opset 18 the dynamo path exports at 18 and converts down itself, putting each node's metadata
  back by name (torch's conversion drops it: 0% provenance at opset 17). Coverage still below
  :data:`PROVENANCE_WARN` is a WARNING naming the cause.
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import re
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import onnx
import onnx_ir as ir
import torch
from torch import nn

from normfold.errors import ExportError, UsageError
from normfold.exporter.provenance import module_path, stamp_module_paths
from normfold.models.guard import user_code
from normfold.onnx_files import save_ir

if TYPE_CHECKING:
    from normfold.models.loader import LoadedModel

log = logging.getLogger(__name__)

ExporterName = Literal["dynamo", "torchscript"]
NormExport = Literal["native", "decomposed", "custom"]
EXPORTERS: tuple[str, ...] = ("dynamo", "torchscript")
NORM_EXPORTS: tuple[str, ...] = ("native", "decomposed", "custom")
TORCHSCRIPT_MAX_OPSET = 20
DYNAMO_MIN_OPSET = 17
DYNAMO_NATIVE_OPSET = 18  # torchlib's own opset: lower ones are a conversion afterwards
#: Below this share of nodes with a module path, per-layer diffs cannot place most numbers: warn.
PROVENANCE_WARN = 0.5


@dataclass
class ExportResult:
    """What was written, at which opset, and how much of it can be traced to an nn.Module."""

    path: Path
    opset: int
    exporter: str
    norm_export: str
    dynamic_batch: bool
    input_names: list[str]
    output_names: list[str]
    node_count: int
    op_histogram: dict[str, int]
    provenance_coverage: float
    warnings: list[str] = field(default_factory=list)

    @property
    def provenance(self) -> float:
        return self.provenance_coverage

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


def op_histogram(model: onnx.ModelProto | ir.Model) -> dict[str, int]:
    """Op type → count over the main graph (``domain::Op`` for non-default domains)."""
    nodes = model.graph.node if isinstance(model, onnx.ModelProto) else model.graph
    counts = collections.Counter(
        f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in nodes
    )
    return dict(sorted(counts.items()))


def default_opset(model: onnx.ModelProto | ir.Model) -> int:
    if isinstance(model, ir.Model):
        version = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
        if version is not None:
            return int(version)
    else:
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
    raise ExportError("the exported model has no default-domain opset import")


def _as_module(model: nn.Module | LoadedModel) -> tuple[nn.Module, list[str]]:
    if isinstance(model, nn.Module):
        return model, []
    return model.module, list(model.input_names)


def _input_names(module: nn.Module, n: int, given: Sequence[str] | None) -> list[str]:
    if given:
        if len(given) != n:
            raise UsageError(f"{len(given)} input names {list(given)} for {n} example inputs")
        return list(given)
    import inspect

    try:
        params = [
            p.name
            for p in inspect.signature(module.forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return params[:n] if len(params) >= n else [f"input_{i}" for i in range(n)]


def _export_dynamo(
    module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], opset: int, dynamic_batch: bool
) -> ir.Model:
    """The exported model as onnx-ir: its initializers still share memory with the module's parameters,
    so nothing is copied until :func:`normfold.onnx_files.save_ir` streams them to disk."""
    from onnx_ir.passes import common as common_passes
    from onnxscript import optimizer

    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        dynamic_shapes = tuple({0: batch} for _ in args)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=max(opset, DYNAMO_NATIVE_OPSET),
            optimize=False,
            input_names=names,
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export returned no program")
    model: ir.Model = program.model
    optimizer.fold_constants(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    common_passes.RemoveUnusedNodesPass()(model)
    if opset < DYNAMO_NATIVE_OPSET:
        _convert_keeping_provenance(model, opset)
    return model


def _convert_keeping_provenance(model: ir.Model, opset: int) -> None:
    """Down-convert to ``opset`` as torch would, but keep each node's metadata (its provenance).

    torch converts with onnx's C API as a fallback, which round-trips through protobuf and drops
    ``metadata_props``, leaving 0% provenance at opset 17. Node names survive the round trip, so the
    metadata is put back by name.
    """
    from onnxscript import version_converter

    props = {node.name: dict(node.metadata_props) for node in model.graph.all_nodes() if node.name}
    with contextlib.redirect_stdout(io.StringIO()):
        version_converter.convert_version(model, target_version=opset, fallback=True)
    for node in model.graph.all_nodes():
        if node.name in props and not node.metadata_props:
            node.metadata_props.update(props[node.name])


def _export_torchscript(
    module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], opset: int, dynamic_batch: bool
) -> onnx.ModelProto:
    if opset > TORCHSCRIPT_MAX_OPSET:
        raise ExportError(
            f"the TorchScript exporter supports opset ≤ {TORCHSCRIPT_MAX_OPSET}, {opset} was asked for; "
            f"pass --opset 17 (or use --exporter dynamo)"
        )
    dynamic_axes = {n: {0: "batch"} for n in names} if dynamic_batch else None
    with tempfile.TemporaryDirectory(prefix="normfold-export-") as tmp:
        out = Path(tmp) / "model.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(out),
                dynamo=False,
                opset_version=opset,
                input_names=names,
                dynamic_axes=dynamic_axes,
                do_constant_folding=True,
                training=torch.onnx.TrainingMode.EVAL,
            )
        return onnx.load(str(out))


def export(
    model: nn.Module | LoadedModel,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor | None,
    path: str | Path,
    *,
    opset: int = 21,
    dynamic_batch: bool = False,
    norm_export: str = "native",
    exporter: str = "dynamo",
    input_names: Sequence[str] | None = None,
) -> ExportResult:
    """Export ``model`` to ``path`` (written atomically) and return what was produced.

    ``model`` is an ``nn.Module`` or a :class:`~normfold.models.loader.LoadedModel` (whose example
    inputs and input names are used when ``example_inputs``/``input_names`` are not given).
    """
    if exporter not in EXPORTERS:
        raise UsageError(f"unknown exporter {exporter!r}; expected one of {', '.join(EXPORTERS)}")
    if norm_export not in NORM_EXPORTS:
        raise UsageError(f"unknown norm export mode {norm_export!r}; expected one of {', '.join(NORM_EXPORTS)}")
    module, loaded_names = _as_module(model)
    if example_inputs is None:
        example_inputs = getattr(model, "example_inputs", None)
        if not example_inputs:
            raise UsageError("no example inputs: pass them, or --input NAME:SHAPE on the command line")
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    names = _input_names(module, len(args), input_names or loaded_names or None)
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise ExportError(f"the dynamo exporter needs opset ≥ {DYNAMO_MIN_OPSET}; use --exporter torchscript")
    notes: list[str] = []
    if module.training or getattr(model, "was_training", False):
        msg = "the model arrived in training mode; exporting it in eval mode (running BN statistics, no dropout)"
        log.warning(msg)
        notes.append(msg)
        module.eval()
    try:
        with user_code(f"{type(module).__name__}.forward (run by the {exporter} exporter)", catch_all=False):
            if exporter == "dynamo":
                model_ir = _export_dynamo(module, args, names, opset, dynamic_batch)
            else:
                model_ir = ir.serde.deserialize_model(_export_torchscript(module, args, names, opset, dynamic_batch))
    except (ExportError, UsageError):
        raise
    except Exception as e:
        raise ExportError(f"{exporter} export failed: {_root_cause(e)}") from e
    got = default_opset(model_ir)
    if got != opset:
        raise ExportError(
            f"asked for opset {opset} but the {exporter} exporter produced opset {got} "
            f"(its down-conversion failed); use --opset {got} or --exporter torchscript"
        )
    modules = frozenset(name for name, _ in module.named_modules())
    stamp_module_paths(model_ir, modules=modules)
    if norm_export != "native":
        model_ir = ir.serde.deserialize_model(_apply_norm_export(ir.serde.serialize_model(model_ir), norm_export))
    nodes = list(model_ir.graph)
    traced = sum(1 for n in nodes if module_path(n) is not None)
    _warn_provenance(traced, len(nodes), exporter, opset, notes)
    target = Path(path)
    save_ir(model_ir, target)
    result = ExportResult(
        path=target,
        opset=got,
        exporter=exporter,
        norm_export=norm_export,
        dynamic_batch=dynamic_batch,
        input_names=[v.name or "" for v in model_ir.graph.inputs],
        output_names=[v.name or "" for v in model_ir.graph.outputs],
        node_count=len(nodes),
        op_histogram=op_histogram(model_ir),
        provenance_coverage=traced / max(1, len(nodes)),
        warnings=notes,
    )
    log.info("exported %s nodes at opset %s to %s", result.node_count, got, target)
    return result


def _warn_provenance(traced: int, total: int, exporter: str, opset: int, notes: list[str]) -> None:
    """Say how much provenance is left and why, so a per-layer diff's "not in the graph" is not a surprise."""
    if total == 0 or traced >= PROVENANCE_WARN * total:
        return
    cause = (
        f"the conversion to opset {opset} renamed or dropped nodes; export at opset 18 or newer for full provenance"
        if exporter == "dynamo" and opset < DYNAMO_NATIVE_OPSET
        else "the exporter recorded no module scopes for most nodes"
    )
    msg = (
        f"only {traced} of {total} nodes ({traced / total:.0%}) carry provenance: {cause}; "
        f"per-layer diffs will miss the rest"
    )
    log.warning(msg)
    notes.append(msg)


def _root_cause(e: BaseException) -> str:
    """The innermost exception's first line: torch wraps the real error in pages of advice."""
    while e.__cause__ is not None:
        e = e.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:400]}"


def _apply_norm_export(proto: onnx.ModelProto, mode: str) -> onnx.ModelProto:
    if mode == "custom":
        try:
            from normfold.exporter.custom_norms import to_plugin_ops
        except ImportError as e:
            raise UsageError("--norm-export custom is not available in this build") from e
        return to_plugin_ops(proto)
    from normfold.exporter.decompose import decompose_norms

    return decompose_norms(proto)
