"""PNG plot of a bench report: the latency distribution per backend and p50 against batch size.

matplotlib is driven through its object API on an Agg canvas (no display, no global pyplot state), so
plotting works headless and from threads. The left panel draws one box per (backend, batch size):
box = p25..p75, line = p50, whiskers = min and p99, with the raw samples as faint dots when the report
still holds them, on a log axis because latency tails span decades. The right panel draws p50 against
batch size per backend, the bars spanning p25..p75.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normfold.io import atomic_path

if TYPE_CHECKING:
    from normfold.bench.report import BenchReport

log = logging.getLogger(__name__)

#: Most raw samples drawn per box (evenly strided); enough to show the shape, few enough to stay small.
MAX_DOTS = 2000


def _box_stats(report: BenchReport) -> list[dict[str, Any]]:
    boxes = []
    for r in report.results:
        s = r.stats
        boxes.append(
            {
                "label": f"{r.backend}\nb{r.batch_size}",
                "med": s.p50_ms,
                "q1": s.p25_ms,
                "q3": s.p75_ms,
                "whislo": s.min_ms,
                "whishi": s.p99_ms,
                "fliers": [],
            }
        )
    return boxes


def build_figure(report: BenchReport) -> Any:
    """The two-panel :class:`matplotlib.figure.Figure` for ``report`` (not yet saved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    dist, scaling = fig.subplots(1, 2, width_ratios=(3, 2))

    boxes = _box_stats(report)
    if boxes:
        dist.bxp(boxes, showfliers=False)
        for i, r in enumerate(report.results, start=1):
            if not r.samples_ms:
                continue
            step = max(1, len(r.samples_ms) // MAX_DOTS)
            ys = r.samples_ms[::step]
            xs = [i + 0.25 * (((k * 7919) % 101) / 100.0 - 0.5) for k in range(len(ys))]
            dist.scatter(xs, ys, s=2, alpha=0.25, color="tab:blue", linewidths=0)
    dist.set_yscale("log")  # tails span decades; a linear axis would flatten every box into a line
    dist.set_ylabel("latency per call (ms, log scale)")
    dist.set_title("latency distribution (box p25–p75, whiskers min–p99)")
    dist.grid(axis="y", alpha=0.3)

    by_backend: dict[str, list[Any]] = {}
    for r in report.results:
        by_backend.setdefault(r.backend, []).append(r)
    for backend, rows in by_backend.items():
        rows.sort(key=lambda r: r.batch_size)
        xs = [r.batch_size for r in rows]
        ys = [r.stats.p50_ms for r in rows]
        err = [[r.stats.p50_ms - r.stats.p25_ms for r in rows], [r.stats.p75_ms - r.stats.p50_ms for r in rows]]
        scaling.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=backend)
    sizes = sorted({r.batch_size for r in report.results})
    if len(sizes) > 1 and sizes[-1] / sizes[0] >= 4:
        scaling.set_xscale("log", base=2)
    scaling.set_xticks(sizes, [str(b) for b in sizes])
    scaling.set_xlabel("batch size")
    scaling.set_ylabel("p50 latency (ms)")
    scaling.set_title("p50 vs batch size (bars p25–p75)")
    scaling.grid(alpha=0.3)
    if by_backend:
        scaling.legend()

    env = report.environment
    threads = env.get("threads", {}).get("intra_op_threads")
    fig.suptitle(f"{Path(report.onnx_path).name} on {env.get('cpu_model', '?')} ({threads} intra-op threads)")
    return fig


def write_plot(report: BenchReport, path: str | Path) -> Path:
    """Render ``report`` to a PNG at ``path`` (atomically)."""
    fig = build_figure(report)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    log.info("wrote plot %s", path)
    return Path(path)
