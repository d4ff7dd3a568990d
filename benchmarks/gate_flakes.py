"""Does the gate's latency verdict flake? Re-run it with a baseline on unchanged zoo artifacts, then on
the same artifacts with a real ~25% slowdown injected (an extra op branch, outputs bit-identical).

    python benchmarks/gate_flakes.py                 # 20 clean runs + 20 slowed runs, 3 zoo models
    python benchmarks/gate_flakes.py --runs 5 --models lenet_bn
    python benchmarks/gate_flakes.py --no-artifact   # without the stored baseline model (re-measure path)

Prints per run the cases that failed and why, then: false failures on clean runs (want 0) and runs that
flagged the slowdown (want >= 19 of 20), with the slowdown each slowed model really has (measured by
interleaving it with its clean model in this process).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _slowdown import add_side_branch

from normfold.bench.measure import interleave
from normfold.exporter import export
from normfold.fusers import optimize
from normfold.gate import config_from_dict, run_gate
from normfold.gate.latency import load_runner, timed_runner_call
from normfold.models.loader import load_model

SIZES = (32, 64, 96, 128, 160, 192, 224, 256, 320, 384, 512)


def _slowdown(clean: Path, dst: Path, target: float) -> tuple[Path, float]:
    """The smallest side branch whose slowdown, measured side by side, reaches ``target`` (e.g. 1.25)."""
    runner, feeds = load_runner(clean, "ort-cpu", "fp32", 1)
    with runner:
        base = timed_runner_call(runner, feeds)
        for size in SIZES:
            slow = add_side_branch(clean, dst.with_name(f"{dst.stem}.{size}.onnx"), size, repeats=4)
            r2, f2 = load_runner(slow, "ort-cpu", "fp32", 1)
            with r2:
                ratio = interleave(timed_runner_call(r2, f2), base, rounds=6, window_s=0.1).ratio
            if ratio >= target:
                break
    shutil.copyfile(slow, dst)
    return dst, ratio


def _config(models: list[str], artifacts: dict[str, Path], baseline: Path) -> object:
    entries = [{"name": m, "ref": f"zoo:{m}", "onnx": str(artifacts[m]), "bench": True} for m in models]
    return config_from_dict(
        {"baseline": str(baseline), "models": entries}, source="gate_flakes", base_dir=baseline.parent
    )


def _run(models: list[str], artifacts: dict[str, Path], baseline: Path, runs: int, label: str) -> list[bool]:
    failed_runs = []
    for i in range(runs):
        t0 = time.perf_counter()
        report = run_gate(_config(models, artifacts, baseline), executor="local")
        bad = [c for c in report.cases if c.status != "passed"]
        ratios = ", ".join(
            f"{c.model} {c.latency.get('verdict')} x{c.latency.get('ratio', float('nan')):.3f}"
            for c in report.cases
            if c.latency
        )
        print(f"{label} run {i + 1:2d}: {'FAILED' if bad else 'passed'} ({time.perf_counter() - t0:.1f} s) {ratios}")
        for c in bad:
            print(f"    {c.model}: {c.status}: {c.reason[:160]}")
        failed_runs.append(bool(bad))
    return failed_runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--models", default="lenet_bn,resnet_basic,mobilenet_dw")
    parser.add_argument("--slowdown", type=float, default=1.25)
    parser.add_argument("--no-artifact", action="store_true", help="drop the stored baseline models")
    args = parser.parse_args()
    models = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="gate-flakes-") as tmp_dir:
        tmp = Path(tmp_dir)
        clean, slow, measured = {}, {}, {}
        for m in models:
            raw = export(load_model(f"zoo:{m}"), None, tmp / f"{m}.onnx").path
            optimize(raw, tmp / f"{m}.opt.onnx")
            clean[m] = tmp / f"{m}.opt.onnx"
            slow[m], measured[m] = _slowdown(clean[m], tmp / f"{m}.slow.onnx", args.slowdown)
            print(f"{m}: injected slowdown measured side by side: x{measured[m]:.3f}")
        baseline = tmp / "baseline.json"
        run_gate(_config(models, clean, baseline), executor="local", update_baseline_file=True)
        if args.no_artifact:
            shutil.rmtree(tmp / "baseline-artifacts", ignore_errors=True)
        clean_failed = _run(models, clean, baseline, args.runs, "clean ")
        slow_failed = _run(models, slow, baseline, args.runs, "slowed")
        print()
        print(f"false failures on unchanged artifacts: {sum(clean_failed)} / {args.runs}")
        print(f"slowdown flagged:                      {sum(slow_failed)} / {args.runs}")
        print(
            "injected slowdowns (side by side): "
            + ", ".join(f"{m} x{r:.3f}" for m, r in measured.items())
            + f" (median x{statistics.median(measured.values()):.3f})"
        )


if __name__ == "__main__":
    main()
