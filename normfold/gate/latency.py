"""The gate's latency verdict: measured until stable, a suspected regression confirmed before it fails.

Two runs of a sub-millisecond model on a shared machine differ by 20–60% in p50 (issue 13), so one
number against a stored number cannot decide. Here:

1. **Stable or say so.** Windows of ``window_s`` are measured until ``3`` consecutive window medians lie
   within ``stability`` (perf_analyzer's stability window; :func:`normfold.bench.measure.measure_until_stable`).
   A level that never settles is reported ``unstable``, never passed or failed on a guess.
2. **Compare side by side when possible.** With the baseline's own artifact at hand (stored beside the
   baseline by ``--update-baseline``) both models are timed in alternating windows (ABBA) in this
   process, so load from other processes hits both alike; a regression needs the median per-round ratio
   above ``1 + threshold`` and its lower quartile above ``1 + threshold/2``. (Always, not only when the
   stored p50 looks worse: a baseline stored on a busier machine would hide a real slowdown.)
3. **Otherwise suspect, then confirm.** A p50 beyond ``threshold`` over the stored p50 is only a
   suspicion: the case is re-measured until stable and the *faster* of the two p50s must still exceed the
   baseline by the threshold and by both runs' p90−p50 noise band.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from normfold.bench.measure import interleave, measure_until_stable
from normfold.bench.stats import summarize
from normfold.gate.config import CaseSettings
from normfold.gate.records import CaseLatency, LatencyConfirm, LatencyReference, Windows

log = logging.getLogger(__name__)

#: Latency verdicts in ``CaseResult.latency.verdict``.
VERDICTS = ("ok", "regressed", "noise", "unstable", "no baseline")
#: Length of one measurement window (seconds).
WINDOW_S = 0.25


def load_runner(onnx_path: Path, backend: str, precision: str, threads: int) -> Any:
    from normfold.bench.harness import batch_shapes, default_batch_size, onnx_input_metas, session_options_for
    from normfold.runtime.registry import get_backend
    from normfold.runtime.run import random_feeds

    metas = onnx_input_metas(onnx_path)
    batch = default_batch_size(metas, {})
    shapes = batch_shapes(metas, batch, {})
    opts = session_options_for(backend, batch_size=batch, threads=threads, precision=precision)
    runner = get_backend(backend).load(onnx_path, opts)
    feeds = runner.validate(random_feeds(metas, shapes, seed=0))
    return runner, feeds


def timed_runner_call(runner: Any, feeds: dict[str, Any]) -> Any:
    from normfold.bench.harness import timed_call

    return timed_call(runner, feeds)


def measure_latency(
    onnx_path: Path, backend: str, precision: str, settings: CaseSettings, baseline: LatencyReference | None
) -> CaseLatency:
    """p50/p90… of ``onnx_path`` measured until stable, and the verdict against ``baseline`` if given."""
    threads = settings.bench_threads
    stability = settings.bench_stability
    runner, feeds = load_runner(onnx_path, backend, precision, threads)
    with runner:
        call = timed_runner_call(runner, feeds)
        call()  # the first inference is not steady state
        warmup, min_iters = settings.bench_warmup, settings.bench_iters
        run = measure_until_stable(call, window_s=WINDOW_S, stability=stability, warmup=warmup, min_iters=min_iters)
        latency = CaseLatency.of(summarize(run.samples_ns), threads=threads, stability=Windows.of(run))
        if not run.stable:
            latency.verdict = "unstable"
            latency.note = (
                f"p50 did not settle: the last 3 window medians spread {run.spread:.0%} > {stability:.0%} "
                f"after {len(run.window_p50_ns)} windows"
            )
        if baseline is not None:
            _judge(latency, baseline, call, onnx_path, backend, precision, threads, stability)
    return latency


def _judge(
    latency: CaseLatency,
    baseline: LatencyReference,
    call: Any,
    onnx_path: Path,
    backend: str,
    precision: str,
    threads: int,
    stability: float,
) -> None:
    """Suspect on the stored p50, confirm by interleaving with the baseline artifact or by re-measuring."""
    threshold, old, now = baseline.threshold, baseline.p50_ms, latency.p50_ms
    if baseline.artifact and Path(baseline.artifact).is_file():
        # Always interleave when the baseline model is at hand: a baseline p50 stored on a busier
        # machine would otherwise hide a real slowdown behind the suspicion step.
        base_runner, base_feeds = load_runner(Path(baseline.artifact), backend, precision, threads)
        with base_runner:
            ab = interleave(call, timed_runner_call(base_runner, base_feeds), rounds=8, window_s=min(WINDOW_S, 0.1))
        latency.confirm = LatencyConfirm(
            "interleaved with the baseline artifact", rounds=len(ab.ratios), ratio=ab.ratio, low_quartile=ab.low
        )
        regressed = ab.ratio > 1 + threshold and ab.low > 1 + threshold / 2
        latency.verdict = "regressed" if regressed else "noise"
        latency.ratio = ab.ratio
        return
    if now <= old * (1 + threshold):
        latency.verdict = "ok" if latency.verdict != "unstable" else "unstable"
        return
    again = measure_until_stable(call, window_s=WINDOW_S, stability=stability)
    second = summarize(again.samples_ns).p50_ms
    latency.confirm = LatencyConfirm("re-measured", p50_ms=second, stable=again.stable)
    best = min(now, second)
    noise = max(latency.p90_ms - now, (baseline.p90_ms if baseline.p90_ms is not None else old) - old, 0.0)
    if not again.stable:
        latency.verdict = "unstable"
    elif best - old > threshold * old and best - old > noise:
        latency.verdict = "regressed"
    else:
        latency.verdict = "noise"
    latency.ratio = best / old


def describe_regression(latency: CaseLatency, baseline_p50: float) -> str:
    """The failure line of a confirmed regression."""
    how = latency.confirm.method if latency.confirm is not None else "measured"
    ratio = latency.ratio or latency.p50_ms / baseline_p50
    return (
        f"latency regression: p50 {latency.p50_ms:.3f} ms vs baseline {baseline_p50:.3f} ms, {ratio - 1:+.0%} ({how})"
    )


def store_artifact(onnx_path: Path, dst: Path) -> str | None:
    """Copy the measured model beside the baseline, so later runs can interleave with it.

    Models with external data are not copied (their tensors live in other files); returns the path or None.
    """
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        log.info("baseline artifact not stored for %s: it has external data", onnx_path)
        return None
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.copyfile(onnx_path, tmp)
    tmp.replace(dst)
    return str(dst)
