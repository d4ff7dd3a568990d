"""The pass pipeline and :func:`optimize`: run the passes to a fixed point, verify, write.

Stages of :func:`run_pipeline`, composed with :class:`onnx_ir.passes.PassManager`:

1. **prepare** (:func:`prepare_passes`, once): pin legacy provenance (it lives in node names) and make
   names unique, then the general clean-up (``cleanup``, :mod:`normfold.fusers.cleanup`: shape
   inference, constant folding including shape subgraphs, duplicate/identity/dead-node removal) when
   it is among the selected passes.
2. **rules** (the selected passes, :func:`default_passes` order, to a fixed point): a nested
   ``PassManager(steps=MAX_STEPS, early_stop=True)``; each pass is timed and followed by unused-node
   clean-up when it modified the model. BN into the layer before it,
   affine chains, BN into the conv after it, then any other registered pass (LayerNorm/GroupNorm
   fusion), and last the report-only standalone-BN rule.
3. **lowering** (:func:`lowering_passes`, once, for ``ctx.target``): ``lower_norms``
   (:mod:`normfold.fusers.lowering`) gives each norm the target's fastest exact form; when it changed
   the model, the clean-up runs again. Once, not in the fixed point: the GroupNorm fusion would fuse a
   lowered GroupNorm back.
4. **finish** (:func:`finish_passes`, once): *hook* for post-rule clean-up passes, then a topological sort.

An error in any pass becomes a :class:`FusionError` naming the pass and the passes that ran before it.

Verification (on by default) compares the optimized model with the input on ORT CPU. When they differ
beyond tolerance the failing rewrite is located by bisection over the applied sites (re-running the
pipeline with a prefix of them enabled), disabled through :attr:`PassContext.disabled_sites`, and the
run is retried; if that does not converge a :class:`FusionError` names the rule and node. A failing
model is never written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass, TopologicalSortPass

from normfold.errors import FusionError, OnnxLoadError, UsageError
from normfold.exporter.provenance import stamp_module_paths
from normfold.fusers import cleanup as _cleanup  # noqa: F401  (registers cleanup)
from normfold.fusers._graph import declared_opset
from normfold.fusers.base import PASS_REGISTRY, NormfoldPass, PassContext, RuleEvent, register_pass
from normfold.fusers.lowering import DEFAULT_TARGET, check_target
from normfold.fusers.report import (
    OptimizeReport,
    VerificationReport,
    initializer_bytes,
    op_histogram,
    summarize,
)
from normfold.fusers.verify import Verifier
from normfold.numerics.tolerances import tolerance_for
from normfold.onnx_files import check_file, has_external_data, load_ir, save_ir

logger = logging.getLogger(__name__)

MAX_STEPS = 4
MAX_DISABLED = 8


@register_pass
class FoldConstants(NormfoldPass):
    """onnxscript's constant folding (no rewrite rules): turns run-time-computed constants such as the
    dynamo exporter's ``Shape→Expand`` zero bias or ``Sqrt(var + eps)`` into initializers the folding
    rules can read. Pure evaluation of constant subgraphs, so always exact."""

    name = "fold_constants"

    def run(self, model: ir.Model) -> bool:
        from onnxscript.optimizer import fold_constants

        return bool(fold_constants(model).modified)


_HEAD = ("fuse_bn_into_conv", "fuse_bn_into_gemm", "fold_affine", "fuse_bn_into_next_conv")
_TAIL = ("standalone_bn",)
PRE_PASSES = ("cleanup",)  # stage 1 (and again after a lowering that changed the model)
FINAL_PASSES = ("lower_norms",)  # stage 3
_OFF_BY_DEFAULT = ("fold_constants",)  # subsumed by cleanup; still selectable by name


def default_passes() -> list[str]:
    """The default order; passes registered by other modules (norm fusions) run before ``standalone_bn``."""
    fixed = {*PRE_PASSES, *_HEAD, *_TAIL, *FINAL_PASSES, *_OFF_BY_DEFAULT}
    middle = [n for n in PASS_REGISTRY if n not in fixed and not n.startswith("_")]
    return [*PRE_PASSES, *_HEAD, *middle, *_TAIL, *FINAL_PASSES]


def resolve_passes(passes: Sequence[str] | str | None) -> list[str]:
    """Validate pass names (a list or ``"a,b"``); unknown ones raise a UsageError listing valid ones.

    ``None`` means the default list; an explicitly empty selection (``""``, ``[]``, ``--passes ,,,``)
    is an error, not "run every pass".
    """
    if passes is None:
        return default_passes()
    valid = ", ".join(sorted(PASS_REGISTRY))
    names = [p.strip() for p in (passes.split(",") if isinstance(passes, str) else passes)]
    names = [n for n in names if n]
    if not names:
        raise UsageError(f"no pass names given (got {passes!r}); name at least one of: {valid}")
    unknown = [n for n in names if n not in PASS_REGISTRY]
    if unknown:
        raise UsageError(f"unknown pass name(s) {unknown!r}; valid names are: {valid}")
    return names


@dataclass
class PipelineRun:
    """One pipeline execution: the rewritten model, its events and timings."""

    model: ir.Model
    events: list[RuleEvent]
    pass_seconds: dict[str, float] = field(default_factory=dict)


class _PinProvenance(ir.passes.InPlacePass):
    """Write legacy provenance (``/layer1/conv1/Conv`` node names) into metadata before anything renames."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(model, stamp_module_paths(model) > 0)


def prepare_passes(cleanup: Sequence[ir.passes.PassBase] = ()) -> list[ir.passes.PassBase]:
    """Stage 1, run once before the rules: provenance, unique names, then the selected clean-up."""
    return [_PinProvenance(), NameFixPass(), *cleanup]


def lowering_passes(
    lowering: Sequence[ir.passes.PassBase], cleanup: Sequence[ir.passes.PassBase]
) -> list[ir.passes.PassBase]:
    """Stage 3, run once after the rules' fixed point: the target's lowering, then the clean-up if it
    changed the model (a lowered GroupNorm's ``Shape(x)`` folds to a constant when x is static)."""
    return [_Then(list(lowering), list(cleanup))] if lowering else []


class _Then(ir.passes.InPlacePass):
    """Run ``first``; run ``then`` only when ``first`` modified the model."""

    def __init__(self, first: list[ir.passes.PassBase], then: list[ir.passes.PassBase]) -> None:
        super().__init__()
        self.first, self.then = first, then

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for p in self.first:
            modified |= p(model).modified
        if modified:
            for p in self.then:
                p(model)
        return ir.passes.PassResult(model, modified)


def finish_passes() -> list[ir.passes.PassBase]:
    """Stage 4, run last. Hook: post-rule clean-up passes go before the topological sort."""
    return [TopologicalSortPass()]


@dataclass
class _History:
    """Which rule pass is running and which ran before it (for the error), and each one's seconds."""

    seconds: dict[str, float]
    done: list[str] = field(default_factory=list)
    running: str | None = None


class _Timed(ir.passes.InPlacePass):
    """A rule pass as one step of the fixed point: timed, recorded, followed by unused-node clean-up."""

    def __init__(self, inner: NormfoldPass, history: _History) -> None:
        super().__init__()
        self.inner, self.history = inner, history
        self.cleanup = RemoveUnusedNodesPass()

    def __repr__(self) -> str:
        return self.inner.name

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.history.running = self.inner.name
        start = time.perf_counter()
        result = self.inner(model)
        if result.modified:
            self.cleanup(model)
        self.history.seconds[self.inner.name] += time.perf_counter() - start
        self.history.done.append(self.inner.name)
        self.history.running = None
        return ir.passes.PassResult(model, result.modified)


def run_pipeline(model: ir.Model, names: Sequence[str], ctx: PassContext) -> PipelineRun:
    """Run the stages (module docstring) with the passes ``names``; ``model`` is rewritten in place."""
    history = _History(dict.fromkeys(names, 0.0))

    def timed(stage: Sequence[str]) -> list[ir.passes.PassBase]:
        return [_Timed(PASS_REGISTRY[name](ctx), history) for name in names if name in stage]

    looped = [name for name in names if name not in PRE_PASSES and name not in FINAL_PASSES]
    manager = ir.passes.PassManager(
        [
            *prepare_passes(timed(PRE_PASSES)),
            *([ir.passes.PassManager(timed(looped), steps=MAX_STEPS, early_stop=True)] if looped else []),
            *lowering_passes(timed(FINAL_PASSES), timed(PRE_PASSES)),
            *finish_passes(),
        ]
    )
    try:
        manager(model)
    except Exception as e:  # a pass bug must name the pass and its history
        root: BaseException = e
        while isinstance(root, ir.passes.PassError) and root.__cause__ is not None:
            root = root.__cause__
        where = f"pass {history.running!r}" if history.running else f"a pipeline stage ({e})"
        raise FusionError(
            f"{where} failed after passes {history.done}: {type(root).__name__}: {root}; "
            "re-run without it (--passes) and report the model"
        ) from e
    return PipelineRun(model, list(ctx.events), history.seconds)


class _Source:
    """Where fresh copies of the input model come from: the file (onnx-ir memory-maps its external
    tensors, so a copy costs the graph, never the weights) or an in-memory proto."""

    def __init__(self, src: str | Path | onnx.ModelProto) -> None:
        self.src: Path | onnx.ModelProto = src if isinstance(src, onnx.ModelProto) else Path(src)
        self.where = "<ModelProto>" if isinstance(src, onnx.ModelProto) else str(src)
        self.external = isinstance(self.src, Path) and has_external_data(check_file(self.src))

    def fresh(self) -> ir.Model:
        if isinstance(self.src, Path):
            return load_ir(self.src)
        try:
            return ir.serde.deserialize_model(self.src)
        except Exception as e:  # onnx_ir raises SerdeError wrapping many causes
            raise OnnxLoadError(f"'{self.where}' is not a valid ONNX model: {e}") from e

    def runnable(self) -> bytes | Path:
        """What ORT opens: the file itself (external data found beside it), or the proto's bytes."""
        return self.src if isinstance(self.src, Path) else self.src.SerializeToString()


def _sites(event: RuleEvent) -> set[tuple[str, str]]:
    return {(event.rule, n) for n in event.nodes if n}


@dataclass(frozen=True)
class _Job:
    """What every attempt of one :func:`optimize` call shares: the input, the passes, the options."""

    source: _Source
    names: list[str]
    base: PassContext
    target: str = DEFAULT_TARGET  # the serving runtime, read by the lowering stage from ``ctx.target``

    def attempt(self, disabled: set[tuple[str, str]], model: ir.Model | None = None) -> PipelineRun:
        """Run the pipeline on a fresh copy of the input (or on ``model``, already deserialized from it)."""
        ctx = PassContext(
            target_opset=self.base.target_opset,
            allow_weight_copies=self.base.allow_weight_copies,
            target=self.target,
            disabled_sites=set(disabled),
        )
        fresh = model if model is not None else self.source.fresh()
        return run_pipeline(fresh, self.names, ctx)


def _bisect(
    job: _Job, disabled: set[tuple[str, str]], applied: list[RuleEvent], verifier: Verifier
) -> RuleEvent | None:
    """The first applied event whose enabling makes verification fail (None: not attributable)."""
    lo, hi = 0, len(applied)  # invariant: prefix lo passes (lo=0 assumed), prefix hi fails
    off_all = set(disabled).union(*(_sites(e) for e in applied))
    if not verifier.check(job.attempt(off_all).model)[0]:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        off = set(disabled).union(*(_sites(e) for e in applied[mid:]))
        if verifier.check(job.attempt(off).model)[0]:
            lo = mid
        else:
            hi = mid
    return applied[hi - 1]


def _culprit(job: _Job, run: PipelineRun, disabled: set[tuple[str, str]], verifier: Verifier, detail: str) -> RuleEvent:
    """The rewrite that broke verification; a :class:`FusionError` when none can be singled out."""
    applied = [e for e in run.events if e.status == "applied"]
    culprit = _bisect(job, disabled, applied, verifier)
    if culprit is None:
        modifying = sorted({e.rule for e in applied}) or list(job.names)
        raise FusionError(
            f"verification failed ({detail}) and no single rewrite explains it; rules involved: "
            f"{modifying}, nodes: {[n for e in applied for n in e.nodes][:10]}. Nothing was written; "
            "re-run with --passes to exclude a rule, or --no-verify to inspect the output"
        )
    return culprit


def _verified_run(
    job: _Job, original: ir.Model, verifier: Verifier | None
) -> tuple[PipelineRun, VerificationReport | None, list[RuleEvent]]:
    """Run, verify, and on failure disable the culprit site and retry (at most :data:`MAX_DISABLED` times).

    Returns the accepted run, its verification report and the ``skipped`` events of disabled sites.
    """
    disabled: set[tuple[str, str]] = set()
    disabled_events: list[RuleEvent] = []
    run = job.attempt(disabled, original)
    if verifier is None:
        return run, None, disabled_events
    for attempt in range(1, MAX_DISABLED + 2):
        if attempt > 1:
            run = job.attempt(disabled)
        ok, metrics, error = verifier.check(run.model)
        verification = verifier.report(ok, metrics, attempt, list(disabled_events), error)
        if ok:
            break
        detail = error or "; ".join(f"{m.name}: max abs {m.max_abs:.3g}" for m in metrics if not m.passed)
        culprit = _culprit(job, run, disabled, verifier, detail)
        if _sites(culprit) <= disabled or attempt > MAX_DISABLED:
            raise FusionError(
                f"rule {culprit.rule!r} at node(s) {list(culprit.nodes)} breaks numerics ({detail}) and "
                "disabling it did not help. Nothing was written; exclude the rule with --passes"
            )
        logger.warning(
            "rule %s at %s failed verification (%s); disabling it and retrying", culprit.rule, culprit.nodes, detail
        )
        disabled |= _sites(culprit)
        reason = f"disabled: the rewrite failed verification ({detail})"
        disabled_events.append(RuleEvent(culprit.rule, "skipped", culprit.nodes, reason))
    return run, verification, disabled_events


def optimize(
    src: str | Path | onnx.ModelProto,
    dst: str | Path | None = None,
    *,
    passes: Sequence[str] | None = None,
    verify: bool = True,
    target: str = DEFAULT_TARGET,
    target_opset: int | None = None,
    allow_weight_copies: bool = False,
    atol: float | None = None,
    rtol: float | None = None,
    seed: int = 0,
) -> OptimizeReport:
    """Run the normalization passes on ``src`` and, when ``dst`` is given, write the result atomically.

    ``passes`` picks and orders passes by name (default :func:`default_passes`). With ``verify`` the
    result is checked against the input on ORT CPU; a rewrite that breaks it is disabled and the run
    retried, and a model that still fails is never written (:class:`FusionError`). ``target`` names the
    runtime that will serve the model (:data:`normfold.fusers.lowering.TARGETS`): each norm gets the
    form that runtime runs fastest; ``portable`` keeps standard one-node forms any runtime loads.
    """
    start = time.perf_counter()
    check_target(target)
    names = resolve_passes(passes)
    source = _Source(src)
    original = source.fresh()  # external tensors are mapped lazily: nothing is read until a pass needs it
    ops_before, bytes_before, opset_before = (
        op_histogram(original),
        initializer_bytes(original),
        declared_opset(original),
    )
    job = _Job(source, names, PassContext(target_opset=target_opset, allow_weight_copies=allow_weight_copies), target)
    tol = tolerance_for("fp32", atol, rtol)  # the project's fp32 defaults unless overridden
    scratch = Path(dst).parent if dst is not None else None  # big candidates are verified from a file here
    verifier = Verifier(source.runnable(), tol, seed, scratch) if verify else None
    run, verification, disabled_events = _verified_run(job, original, verifier)

    out_path: str | None = None
    if dst is not None:
        save_ir(run.model, Path(dst), external=True if source.external else None)
        out_path = str(dst)
    events = [*run.events, *disabled_events]
    return OptimizeReport(
        source=source.where,
        output=out_path,
        target=target,
        passes=names,
        rules=summarize(events, names),
        ops_before=ops_before,
        ops_after=op_histogram(run.model),
        initializer_bytes_before=bytes_before,
        initializer_bytes_after=initializer_bytes(run.model),
        pass_seconds=run.pass_seconds,
        total_seconds=time.perf_counter() - start,
        opset_before=opset_before,
        opset_after=declared_opset(run.model),
        verification=verification,
    )
