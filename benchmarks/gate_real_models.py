"""The gate's numerics verdict on real models: false alarms, margins, matching quality.

    pip install -c constraints-dev.txt torchvision timm      # into .venv; random weights, nothing downloaded
    python benchmarks/gate_real_models.py                     # the default set, both exporters
    python benchmarks/gate_real_models.py --models tv:regnet_x_400mf --exporters dynamo

Per model × exporter: export → optimize → ``compare(per_layer=True)`` (layers decide, as the gate does),
then one weight of the first Conv scaled by 1.01 (a 1% fault) in the optimized file and compared again.
Printed side by side:

* verdict of the clean model (want: passed; "FALSE ALARM" otherwise);
* false-alarm margin: worst error ÷ tolerance on the clean model, outputs under both output rules
  (element-wise ``atol + rtol·|ref|`` and magnitude-aware ``atol + rtol·max|ref|``) and layers;
* detection margin: the faulty layer's error ÷ its tolerance, and the outputs' under both rules;
* matching: module outputs of the run, matched (of which aliases: the same value as another layer),
  fused, unmatched (share of the run's module outputs, with the reasons) and, apart, modules the forward
  never called.

``torchvision``'s CUDA build imports ``torchvision._meta_registrations``, which fails on CPU torch; it is
stubbed before the import (it only registers meta kernels for torchvision's own ops).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

DEFAULT_MODELS = (
    "tv:resnet18",
    "tv:mobilenet_v3_small",
    "tv:regnet_x_400mf",
    "tv:efficientnet_b0",
    "timm:convnext_atto",
    "timm:efficientformer_l1",
    "timm:poolformer_s12",
)


#: Models whose shapes are fixed by their architecture (attention biases sized for 224×224 inputs).
NATIVE_SIZE = {"timm:efficientformer_l1": 224}


def build(spec: str) -> torch.nn.Module:
    kind, name = spec.split(":", 1)
    torch.manual_seed(0)
    # timm imports torchvision too: stub before either, or a timm-only --models list fails
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    if kind == "tv":
        import torchvision

        return torchvision.models.get_model(name, weights=None).eval()
    import timm

    return timm.create_model(name, pretrained=False).eval()


def _ratios(produced: list[np.ndarray], reference: list[np.ndarray], atol: float, rtol: float) -> tuple[float, float]:
    """Worst error ÷ tolerance over all outputs: element-wise rule, magnitude-aware rule."""
    elem = mag = 0.0
    for a, e in zip(produced, reference, strict=True):
        a64, e64 = a.astype(np.float64), e.astype(np.float64)
        diff = np.abs(a64 - e64)
        elem = max(elem, float((diff / (atol + rtol * np.abs(e64))).max()))
        mag = max(mag, float(diff.max() / (atol + rtol * np.abs(e64).max())))
    return elem, mag


def _output_margins(model: torch.nn.Module, x: torch.Tensor, path: Path) -> tuple[float, float]:
    from normfold.runtime.base import SessionOptions
    from normfold.runtime.eager import run_eager
    from normfold.runtime.registry import get_backend

    reference = run_eager(model, (x,))
    with get_backend("ort-cpu").load(path, SessionOptions()) as runner:
        out = runner.infer({runner.input_names[0]: x.numpy()})
    return _ratios([out[n] for n in runner.output_names], reference, 1e-5, 1e-4)


def _inject(src: Path, dst: Path) -> str:
    """Weight of the first Conv ×1.01; returns the node's name."""
    proto = onnx.load(str(src))
    conv = next(n for n in proto.graph.node if n.op_type == "Conv")
    tensor = next(t for t in proto.graph.initializer if t.name == conv.input[1])
    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * np.float32(1.01), tensor.name))
    onnx.save(proto, str(dst))
    return conv.name


def _layer_margin(layers: object) -> float:
    return max(
        (row.metrics.max_abs / row.tolerance.atol for row in layers.layers if row.metrics and row.tolerance),
        default=0.0,
    )


def run_one(spec: str, exporter: str, tmp: Path, size: int) -> dict[str, object]:
    from normfold.exporter import export
    from normfold.fusers import optimize
    from normfold.numerics import compare

    model = build(spec)
    size = NATIVE_SIZE.get(spec, size)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    stem = spec.replace(":", "_") + "." + exporter
    raw, opt, bad = tmp / f"{stem}.onnx", tmp / f"{stem}.opt.onnx", tmp / f"{stem}.bad.onnx"
    t0 = time.perf_counter()
    export(model, (x,), raw, exporter=exporter, opset=17 if exporter == "torchscript" else 21)
    optimize(raw, opt)
    clean = compare(model, opt, [x], per_layer=True).backends["ort-cpu"]
    layers = clean.layers
    counts = layers.counts
    row: dict[str, object] = {
        "model": spec,
        "exporter": exporter,
        "passed": clean.passed,
        "reason": clean.reason,
        "unmatched": f"{counts['unmatched']}/{counts['layers']}",
        "matching": (
            f"{counts['layers']} layers: {counts['matched']} matched ({counts['aliased']} aliased), "
            f"{counts['fused']} fused, {counts['unmatched']} unmatched; {counts['not_called']} not called"
        ),
        "unmatched_share": counts["unmatched"] / max(counts["layers"], 1),
        "reasons": sorted({r.reason_kind for r in layers.layers if r.status == "unmatched"}),
        "functional": counts["functional"],
        "clean_layer": _layer_margin(layers),
    }
    row["clean_out_elem"], row["clean_out_mag"] = _output_margins(model, x, opt)
    node = _inject(opt, bad)
    faulty = compare(model, bad, [x], per_layer=True).backends["ort-cpu"]
    first = faulty.layers.first_divergence
    row["fault_detected"] = not faulty.passed
    row["fault_layer"] = "-" if first is None else first.name
    row["fault_layer_margin"] = 0.0 if first is None else first.max_abs / first.atol
    row["fault_out_elem"], row["fault_out_mag"] = _output_margins(model, x, bad)
    row["fault_node"] = node
    row["seconds"] = time.perf_counter() - t0
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--exporters", default="dynamo,torchscript")
    parser.add_argument("--size", type=int, default=160, help="input height and width (where the model allows)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gate-real-") as tmp:
        for spec in args.models.split(","):
            for exporter in args.exporters.split(","):
                try:
                    row = run_one(spec, exporter, Path(tmp), args.size)
                except Exception as e:  # a model the exporter cannot take is reported, not fatal
                    print(f"{spec:26s} {exporter:11s} ERROR {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    continue
                rows.append(row)
                verdict = "passed" if row["passed"] else "FALSE ALARM"
                print(
                    f"{spec:26s} {exporter:11s} {verdict:11s} clean err/tol: out elem {row['clean_out_elem']:.3f} "
                    f"mag {row['clean_out_mag']:.3f} layers {row['clean_layer']:.3f} | 1% fault: "
                    f"{'caught' if row['fault_detected'] else 'MISSED'} at {row['fault_layer']} "
                    f"x{row['fault_layer_margin']:.0f}, out elem {row['fault_out_elem']:.2f} "
                    f"mag {row['fault_out_mag']:.2f}"
                    f" | unmatched {row['unmatched']} ({float(row['unmatched_share']):.1%}) {row['reasons']}"
                    f" functional {row['functional']} | {row['matching']}"
                    f" ({row['seconds']:.0f} s)",
                    flush=True,
                )
                if not row["passed"]:
                    print(f"    {row['reason']}")
    if not rows:
        return
    alarms = sum(not r["passed"] for r in rows)
    caught = sum(bool(r["fault_detected"]) for r in rows)
    print()
    print(f"false alarms: {alarms} / {len(rows)}; 1% faults caught: {caught} / {len(rows)}")
    for label, key in (
        ("element-wise", "clean_out_elem"),
        ("magnitude-aware", "clean_out_mag"),
        ("layers", "clean_layer"),
    ):
        print(f"worst clean err/tol, {label:15s}: {max(float(r[key]) for r in rows):.3f}")
    print(f"smallest 1% fault layer margin: x{min(float(r['fault_layer_margin']) for r in rows):.1f}")
    for exporter in args.exporters.split(","):
        shares = [float(r["unmatched_share"]) for r in rows if r["exporter"] == exporter]
        if shares:
            print(f"unmatched share, {exporter}: max {max(shares):.1%}, mean {sum(shares) / len(shares):.1%}")


if __name__ == "__main__":
    main()
