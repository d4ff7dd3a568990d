"""The pass pipeline and :func:`optimize`: run the passes to a fixed point, verify, write.

Order (:func:`default_passes`): the general clean-up first (:mod:`normfold.fusers.cleanup`: shape
inference, constant folding including shape subgraphs, no-op/identity/duplicate/dead-node removal), then
BN into the layer before it, affine chains, BN into the conv after it, then any other registered pass
(LayerNorm/GroupNorm fusion), and the report-only standalone-BN rule. The list repeats until no pass
changes anything (at most :data:`MAX_STEPS` rounds), with unused-node cleanup after every pass. The
clean-up runs once before that loop (:data:`PRE_PASSES`); after it, once, the per-target norm lowering
(:mod:`normfold.fusers.lowering`) and, if that changed anything, the clean-up again.

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
from normfold.fusers.base import PASS_REGISTRY, NormfoldPass, PassContext, RuleEvent, register_pass
from normfold.fusers.lowering import DEFAULT_TARGET, check_target
from normfold.fusers.report import (
    OptimizeReport,
    VerificationReport,
    initializer_bytes,
    op_histogram,
    summarize,
)
from normfold.fusers.verify import (
    OrtRunError,
    compare_outputs,
    run_model,
    seeded_feeds,
)
from normfold.io import load_onnx, save_onnx
from normfold.numerics.tolerances import tolerance_for

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
#: Run once before the fixed-point loop (the fusions create nothing it would clean; it costs ~0.5 s per 1k nodes).
PRE_PASSES = ("cleanup",)
#: Run once after the fixed point (the GroupNorm fusion would fuse a lowered GroupNorm back), then cleanup.
FINAL_PASSES = ("lower_norms",)
_OFF_BY_DEFAULT = ("fold_constants",)  # subsumed by cleanup; still selectable by name


def default_passes() -> list[str]:
    """The default order; passes registered by other modules (norm fusions) run before ``standalone_bn``."""
    fixed = {*PRE_PASSES, *_HEAD, *_TAIL, *FINAL_PASSES, *_OFF_BY_DEFAULT}
    middle = [n for n in PASS_REGISTRY if n not in fixed and not n.startswith("_")]
    return [*PRE_PASSES, *_HEAD, *middle, *_TAIL, *FINAL_PASSES]


def resolve_passes(passes: Sequence[str] | str | None) -> list[str]:
    """Validate pass names (a list or ``"a,b"``); unknown ones raise a UsageError listing valid ones."""
    if passes is None:
        return default_passes()
    names = [p.strip() for p in passes.split(",")] if isinstance(passes, str) else [p.strip() for p in passes]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in PASS_REGISTRY]
    if unknown or not names:
        valid = ", ".join(sorted(PASS_REGISTRY))
        raise UsageError(f"unknown pass name(s) {unknown or names!r}; valid names are: {valid}")
    return names


@dataclass
class PipelineRun:
    """One pipeline execution: the rewritten model, its events and timings."""

    model: ir.Model
    events: list[RuleEvent]
    pass_seconds: dict[str, float] = field(default_factory=dict)


def run_pipeline(model: ir.Model, names: Sequence[str], ctx: PassContext) -> PipelineRun:
    """Run ``names`` in order, repeatedly until nothing changes; ``model`` is rewritten in place."""
    seconds = dict.fromkeys(names, 0.0)
    stamp_module_paths(model)  # legacy provenance lives in node names: pin it before anything renames
    NameFixPass()(model)
    cleanup = RemoveUnusedNodesPass()
    done: list[str] = []
    for name in (n for n in names if n in PRE_PASSES):
        _run_pass(model, name, ctx, done, seconds)
    looped = [n for n in names if n not in FINAL_PASSES and n not in PRE_PASSES]
    for _step in range(MAX_STEPS):
        changed = False
        for name in looped:
            pass_ = PASS_REGISTRY[name](ctx)
            start = time.perf_counter()
            try:
                result = pass_(model)
            except Exception as e:  # a pass bug must name the pass and its history
                raise FusionError(
                    f"pass {name!r} failed after passes {done}: {type(e).__name__}: {e}; "
                    f"re-run without it (--passes) and report the model"
                ) from e
            if result.modified:
                cleanup(model)
                changed = True
            seconds[name] += time.perf_counter() - start
            done.append(name)
        if not changed:
            break
    final = [n for n in names if n in FINAL_PASSES]
    if any([_run_pass(model, n, ctx, done, seconds) for n in final]):
        for name in (n for n in names if n in PRE_PASSES):
            _run_pass(model, name, ctx, done, seconds)
    TopologicalSortPass()(model)
    return PipelineRun(model, list(ctx.events), seconds)


def _run_pass(model: ir.Model, name: str, ctx: PassContext, done: list[str], seconds: dict[str, float]) -> bool:
    """One pass outside the fixed-point loop; True when it changed the model."""
    start = time.perf_counter()
    try:
        modified = PASS_REGISTRY[name](ctx)(model).modified
    except Exception as e:  # a pass bug must name the pass and its history
        raise FusionError(f"pass {name!r} failed after passes {done}: {type(e).__name__}: {e}") from e
    if modified:
        RemoveUnusedNodesPass()(model)
    seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
    done.append(name)
    return modified


def _load(src: str | Path | onnx.ModelProto) -> tuple[onnx.ModelProto, str]:
    if isinstance(src, onnx.ModelProto):
        return src, "<ModelProto>"
    return load_onnx(src), str(src)


def _to_ir(proto: onnx.ModelProto, where: str) -> ir.Model:
    try:
        return ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx_ir raises SerdeError wrapping many causes
        raise OnnxLoadError(f"'{where}' is not a valid ONNX model: {e}") from e


def _opset(model: ir.Model) -> int | None:
    return model.opset_imports.get("", model.opset_imports.get("ai.onnx"))


def _sites(event: RuleEvent) -> set[tuple[str, str]]:
    return {(event.rule, n) for n in event.nodes if n}


def _attempt(
    proto: onnx.ModelProto,
    names: Sequence[str],
    base: PassContext,
    disabled: set[tuple[str, str]],
    model: ir.Model | None = None,
) -> PipelineRun:
    """Run the pipeline on a fresh copy of ``proto`` (or on ``model``, already deserialized from it)."""
    ctx = PassContext(
        target_opset=base.target_opset,
        allow_weight_copies=base.allow_weight_copies,
        target=base.target,
        disabled_sites=set(disabled),
    )
    return run_pipeline(model if model is not None else _to_ir(proto, "input"), names, ctx)


class _Verifier:
    def __init__(self, proto: onnx.ModelProto, atol: float, rtol: float, seed: int) -> None:
        self.atol, self.rtol, self.seed = atol, rtol, seed
        data = proto.SerializeToString()
        try:
            self.feeds = seeded_feeds(data, seed)
            self.before = run_model(data, self.feeds)
        except OrtRunError as e:
            raise OnnxLoadError(
                f"ONNX Runtime cannot run the input model, so it cannot be verified: {e}; "
                "fix the model or pass verify=False (--no-verify)"
            ) from e

    def check(self, model: ir.Model) -> tuple[bool, list, str]:
        try:
            after = run_model(ir.serde.serialize_model(model).SerializeToString(), self.feeds)
        except OrtRunError as e:
            return False, [], f"ORT cannot run the optimized model: {e}"
        metrics = compare_outputs(self.before, after, self.atol, self.rtol)
        return all(m.passed for m in metrics), metrics, ""


def _bisect(
    proto: onnx.ModelProto,
    names: Sequence[str],
    base: PassContext,
    disabled: set[tuple[str, str]],
    applied: list[RuleEvent],
    verifier: _Verifier,
) -> RuleEvent | None:
    """The first applied event whose enabling makes verification fail (None: not attributable)."""
    lo, hi = 0, len(applied)  # invariant: prefix lo passes (lo=0 assumed), prefix hi fails
    off_all = set(disabled).union(*(_sites(e) for e in applied))
    ok, _, _ = verifier.check(_attempt(proto, names, base, off_all).model)
    if not ok:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        off = set(disabled).union(*(_sites(e) for e in applied[mid:]))
        ok, _, _ = verifier.check(_attempt(proto, names, base, off).model)
        if ok:
            lo = mid
        else:
            hi = mid
    return applied[hi - 1]


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
    proto, where = _load(src)
    original = _to_ir(proto, where)
    ops_before, bytes_before, opset_before = (
        op_histogram(original),
        initializer_bytes(original),
        _opset(original),
    )
    base = PassContext(target_opset=target_opset, allow_weight_copies=allow_weight_copies, target=target)
    tol = tolerance_for("fp32", atol, rtol)  # the project's fp32 defaults unless overridden
    verifier = _Verifier(proto, tol.atol, tol.rtol, seed) if verify else None

    disabled: set[tuple[str, str]] = set()
    disabled_events: list[RuleEvent] = []
    verification: VerificationReport | None = None
    for attempt in range(1, MAX_DISABLED + 2):
        run = _attempt(proto, names, base, disabled, original if attempt == 1 else None)
        if verifier is None:
            break
        ok, metrics, error = verifier.check(run.model)
        verification = VerificationReport(
            ok,
            tol.atol,
            tol.rtol,
            seed,
            {k: list(v.shape) for k, v in verifier.feeds.items()},
            metrics,
            attempt,
            list(disabled_events),
            error,
        )
        if ok:
            break
        applied = [e for e in run.events if e.status == "applied"]
        culprit = _bisect(proto, names, base, disabled, applied, verifier)
        detail = error or "; ".join(f"{m.name}: max abs {m.max_abs:.3g}" for m in metrics if not m.passed)
        if culprit is None:
            modifying = sorted({e.rule for e in applied}) or list(names)
            raise FusionError(
                f"verification failed ({detail}) and no single rewrite explains it; rules involved: "
                f"{modifying}, nodes: {[n for e in applied for n in e.nodes][:10]}. Nothing was written; "
                "re-run with --passes to exclude a rule, or --no-verify to inspect the output"
            )
        if _sites(culprit) <= disabled or attempt > MAX_DISABLED:
            raise FusionError(
                f"rule {culprit.rule!r} at node(s) {list(culprit.nodes)} breaks numerics ({detail}) and "
                "disabling it did not help. Nothing was written; exclude the rule with --passes"
            )
        logger.warning(
            "rule %s at %s failed verification (%s); disabling it and retrying",
            culprit.rule,
            culprit.nodes,
            detail,
        )
        disabled |= _sites(culprit)
        disabled_events.append(
            RuleEvent(
                culprit.rule,
                "skipped",
                culprit.nodes,
                f"disabled: the rewrite failed verification ({detail})",
            )
        )

    optimized = ir.serde.serialize_model(run.model)
    out_path: str | None = None
    if dst is not None:
        save_onnx(optimized, Path(dst))
        out_path = str(dst)
    events = [*run.events, *disabled_events]
    return OptimizeReport(
        source=where,
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
        opset_after=_opset(run.model),
        verification=verification,
    )
