"""The PNG plot is written atomically and works with and without raw samples."""

from __future__ import annotations

from pathlib import Path

from normfold.bench import benchmark, write_plot
from normfold.bench.plot import build_figure

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_plot_png(tmp_path: Path, dynamic_onnx: Path) -> None:
    report = benchmark(dynamic_onnx, batch_sizes=[1, 4], warmup=1, iters=5)
    out = write_plot(report, tmp_path / "bench.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # no temp file left behind
    fig = build_figure(report)
    dist, scaling = fig.axes
    assert [t.get_text() for t in dist.get_xticklabels()] == ["ort-cpu\nb1", "ort-cpu\nb4"]
    line = scaling.get_lines()[0]  # the p50 line (errorbar caps come after it)
    assert list(line.get_xdata()) == [1, 4]
    assert list(line.get_ydata()) == [r.stats.p50_ms for r in report.results]
    for r in report.results:
        r.samples_ms = []  # a report read back from JSON has no samples
    dist = build_figure(report).axes[0]
    assert not dist.collections  # no sample dots, boxes only
    assert len(dist.get_xticklabels()) == 2
