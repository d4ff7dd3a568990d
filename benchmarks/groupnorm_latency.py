"""ORT CPU latency of GroupNorm forms, and of a UNet ResBlock stack before and after ``optimize --target``.

Two measurements, every session ORT CPU with default graph optimizations, timed interleaved in one process:

* ``--forms``: one GroupNorm at 1×128×64×64, G=32, in the four exact forms — GroupNormalization-21
  (ORT's CPU EP has no kernel and expands it), the InstanceNormalization form
  (Reshape → InstanceNormalization → Reshape → Mul → Add), the same with the affine as one
  ``BatchNormalization(γ, β, mean 0, var 1, ε 0)`` (what ``--target ort-cpu`` emits) and the decomposed
  ReduceMean form. This is the measurement behind ``normfold.fusers.lowering``'s choice for ort-cpu.
* default: ``--blocks`` copies of the zoo's ``unet_resblock`` (2 GroupNorms each), exported by dynamo at
  opset 21 (GroupNormalization-21), then ``normfold.optimize`` with ``target="portable"`` (GN-21 kept)
  and ``target="ort-cpu"`` (lowered to the InstanceNormalization form), next to the legacy TorchScript
  export at opset 17 (which emits the InstanceNormalization emulation itself).

* ``--seed``: the seed's hand-written GroupNorm (``optimize_vs_anchors.SeedGroupNorm``: chained single-axis
  ``ReduceSum``s divided by n, ``pow(x − μ, 2)``; two of them around a SiLU) at 1×128×64×64, G=32,
  exported by dynamo at opset 21: raw vs ``optimize --target ort-cpu`` (fused to GN-21, then lowered to
  the InstanceNormalization form).

* ``--prepare DIR`` then ``--profile DIR``: the issue's GroupNorm models (``--models``, names from
  ``optimize_vs_anchors.py``; default timm resnet50_gn, the diffusers UNet, the zoo's unet_resblock and
  the seed's GroupNorm) exported by dynamo at opset 21 (raw), ``optimize --target ort-cpu``, and the legacy
  TorchScript export at opset 17 (the exporter's own InstanceNormalization form). ``--prepare`` does the
  CPU-heavy export/optimize (run it niced on a shared machine); ``--profile`` times the three plus a second
  raw session (A/A noise) interleaved, then runs ORT's profiler on each and prints the time share per op
  type: where the milliseconds that normfold cannot touch (Conv, attention) go.

Run: ``python benchmarks/groupnorm_latency.py [--forms | --seed | --prepare DIR | --profile DIR] [--blocks 4]
[--size 32] [--threads 1] [--iters 50] [--models a,b]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from normfold.models import ZOO, seeded_inputs


class Stack(nn.Module):
    """``blocks`` copies of the zoo's ``unet_resblock`` (2 GroupNorms each) sharing the time embedding."""

    def __init__(self, blocks: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ZOO["unet_resblock"].build() for _ in range(blocks))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, t)
        return x


def interleaved(sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], iters: int) -> dict:
    """name → (median ms, min ms), one run of each session per round."""
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for s in sessions.values():
        s.run(None, feeds)
    for _ in range(iters):
        for name, s in sessions.items():
            start = time.perf_counter()
            s.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}


def _session(model: onnx.ModelProto | Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def gn_forms(c: int = 128, hw: int = 64, groups: int = 32) -> dict[str, onnx.ModelProto]:
    """The three exact forms of one GroupNorm with a random per-channel affine."""
    rng = np.random.default_rng(0)
    scale, bias = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.uniform(-0.1, 0.1, c).astype(np.float32)
    inits = [
        numpy_helper.from_array(scale, "s"),
        numpy_helper.from_array(bias, "b"),
        numpy_helper.from_array(scale.reshape(c, 1, 1), "s3"),
        numpy_helper.from_array(bias.reshape(c, 1, 1), "b3"),
        numpy_helper.from_array(np.array([0, groups, -1], np.int64), "grouped"),
        numpy_helper.from_array(np.array([1, c, hw, hw], np.int64), "back"),
        numpy_helper.from_array(np.ones(groups, np.float32), "one"),
        numpy_helper.from_array(np.zeros(groups, np.float32), "zero"),
        numpy_helper.from_array(np.array([2], np.int64), "axis"),
        numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
        numpy_helper.from_array(np.zeros(c, np.float32), "mean0"),
        numpy_helper.from_array(np.ones(c, np.float32), "var1"),
    ]
    n = helper.make_node
    tail = [n("Reshape", ["u", "back"], ["r2"]), n("Mul", ["r2", "s3"], ["m"]), n("Add", ["m", "b3"], ["y"])]
    bodies = {
        "GroupNormalization-21": [n("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=groups, epsilon=1e-5)],
        "InstanceNormalization form": [
            n("Reshape", ["x", "grouped"], ["r"]),
            n("InstanceNormalization", ["r", "one", "zero"], ["u"], epsilon=1e-5),
            *tail,
        ],
        "IN form, BatchNorm affine": [
            n("Reshape", ["x", "grouped"], ["r"]),
            n("InstanceNormalization", ["r", "one", "zero"], ["u"], epsilon=1e-5),
            n("Reshape", ["u", "back"], ["r2"]),
            n("BatchNormalization", ["r2", "s", "b", "mean0", "var1"], ["y"], epsilon=0.0),
        ],
        "decomposed ReduceMean form": [
            n("Reshape", ["x", "grouped"], ["r"]),
            n("ReduceMean", ["r", "axis"], ["mu"]),
            n("Sub", ["r", "mu"], ["d"]),
            n("Mul", ["d", "d"], ["d2"]),
            n("ReduceMean", ["d2", "axis"], ["var"]),
            n("Add", ["var", "eps"], ["ve"]),
            n("Sqrt", ["ve"], ["sd"]),
            n("Div", ["d", "sd"], ["u"]),
            *tail,
        ],
    }
    io_ = ([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],)
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, hw, hw])]
    return {
        k: helper.make_model(
            helper.make_graph(body, "gn", io_[0], out, inits),
            opset_imports=[helper.make_opsetid("", 21)],
            ir_version=10,
        )
        for k, body in bodies.items()
    }


def _drop_unused(model: onnx.ModelProto) -> onnx.ModelProto:
    """The forms share one initializer list; keep each form's own (ORT warns about unused ones)."""
    used = {i for node in model.graph.node for i in node.input}
    keep = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


def forms(args: argparse.Namespace) -> None:
    models = {k: _drop_unused(m) for k, m in gn_forms().items()}
    sessions = {k: _session(m, args.threads) for k, m in models.items()}
    x = np.random.default_rng(1).standard_normal((1, 128, 64, 64)).astype(np.float32)
    outs = {k: s.run(None, {"x": x})[0] for k, s in sessions.items()}
    ref = outs["GroupNormalization-21"]
    stats = interleaved(sessions, {"x": x}, args.iters)
    print(f"one GroupNorm 1x128x64x64, G=32; onnxruntime {ort.__version__} CPU EP, threads {args.threads or 'default'}")
    print(f"{'form':<30}{'median ms':>10}{'min ms':>10}{'max |diff|':>12}")
    for k, (med, low) in stats.items():
        print(f"{k:<30}{med:>10.3f}{low:>10.3f}{np.abs(outs[k] - ref).max():>12.2e}")


def stack(args: argparse.Namespace) -> None:
    from normfold.exporter import export
    from normfold.fusers import optimize

    torch.manual_seed(0)
    model = Stack(args.blocks).eval()
    x, t = seeded_inputs(ZOO["unet_resblock"].inputs)
    if args.size:
        x = torch.randn(1, x.shape[1], args.size, args.size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            export(model, (x, t), d / "dynamo21.onnx", opset=21)
            export(model, (x, t), d / "legacy17.onnx", opset=17, exporter="torchscript")
        optimize(d / "dynamo21.onnx", d / "portable.onnx", target="portable")
        report = optimize(d / "dynamo21.onnx", d / "ort_cpu.onnx", target="ort-cpu")
        paths = {
            "dynamo opset 21 (GN-21), raw": d / "dynamo21.onnx",
            "optimize --target portable": d / "portable.onnx",
            "optimize --target ort-cpu": d / "ort_cpu.onnx",
            "TorchScript opset 17 (IN form)": d / "legacy17.onnx",
        }
        sessions = {k: _session(p, args.threads) for k, p in paths.items()}
    feeds = {i.name: v.numpy() for i, v in zip(sessions["optimize --target ort-cpu"].get_inputs(), (x, t), strict=True)}
    with torch.no_grad():
        eager = model(x, t).numpy()
    lowered = sessions["optimize --target ort-cpu"].run(None, feeds)[0]
    stats = interleaved(sessions, feeds, args.iters)
    print(f"model: {args.blocks} x zoo unet_resblock ({2 * args.blocks} GroupNorms), x {tuple(x.shape)}")
    print(f"onnxruntime {ort.__version__} CPU EP, threads {args.threads or 'default'}; {args.iters} interleaved runs")
    err = np.abs(lowered - eager).max()
    print(f"lowered GroupNorms: {report.rules['lower_norms'].applied}; max |ort-cpu - eager| = {err:.2e}")
    print(f"{'model':<34}{'median ms':>10}{'min ms':>10}")
    for k, (med, low) in stats.items():
        print(f"{k:<34}{med:>10.2f}{low:>10.2f}")
    raw, cpu = stats["dynamo opset 21 (GN-21), raw"][0], stats["optimize --target ort-cpu"][0]
    print(f"speed-up raw dynamo / --target ort-cpu: {raw / cpu:.2f}x  (goal >= 1.3x)")


def seed(args: argparse.Namespace) -> None:
    from optimize_vs_anchors import seed_groupnorm

    from normfold.exporter import export
    from normfold.fusers import optimize

    torch.manual_seed(0)
    model, (x,) = seed_groupnorm(0)
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            export(model, (x,), d / "raw.onnx", opset=21)
        report = optimize(d / "raw.onnx", d / "ort_cpu.onnx", target="ort-cpu")
        paths = {"dynamo opset 21, raw": d / "raw.onnx", "optimize --target ort-cpu": d / "ort_cpu.onnx"}
        sessions = {k: _session(p, args.threads) for k, p in paths.items()}
        counts = {k: len(onnx.load(p).graph.node) for k, p in paths.items()}
    feeds = {sessions["dynamo opset 21, raw"].get_inputs()[0].name: x.numpy()}
    with torch.no_grad():
        eager = model(x).numpy()
    err = np.abs(sessions["optimize --target ort-cpu"].run(None, feeds)[0] - eager).max()
    stats = interleaved(sessions, feeds, args.iters)
    print(f"model: seed hand-written GroupNorm x2, x {tuple(x.shape)}, G=32")
    print(f"onnxruntime {ort.__version__} CPU EP, threads {args.threads or 'default'}; {args.iters} interleaved runs")
    print(
        f"fused: {report.rules['fuse_groupnorm'].applied}, lowered: {report.rules['lower_norms'].applied}; "
        f"max |ort-cpu - eager| = {err:.2e}"
    )
    print(f"{'model':<30}{'nodes':>7}{'median ms':>11}{'min ms':>10}")
    for k, (med, low) in stats.items():
        print(f"{k:<30}{counts[k]:>7}{med:>11.2f}{low:>10.2f}")
    (raw_med, raw_min), (cpu_med, cpu_min) = stats["dynamo opset 21, raw"], stats["optimize --target ort-cpu"]
    print(
        f"speed-up raw / --target ort-cpu: median {raw_med / cpu_med:.2f}x, min {raw_min / cpu_min:.2f}x (goal >= 1.3x)"
    )


PROFILED = "timm_resnet50_gn,diffusers_unet,zoo_unet_resblock,seed_groupnorm_128x64x64"
VARIANTS = {"raw": "raw dynamo (GN-21)", "nf": "--target ort-cpu", "ts": "TorchScript (IN form)"}


def prepare(args: argparse.Namespace) -> None:
    """Export each model (dynamo opset 21 and TorchScript opset 17), optimize for ort-cpu, save inputs."""
    import optimize_vs_anchors as ova

    from normfold.exporter import export
    from normfold.fusers import optimize

    ova._torchvision()
    for name in args.models.split(","):
        out = Path(args.prepare) / name
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        module, inputs = ova.MODELS[name](args.size or 224)
        module.eval()
        ova.trained_like(module)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            export(module, inputs, out / "raw.onnx", opset=21)
            export(module, inputs, out / "ts.onnx", opset=17, exporter="torchscript")
        report = optimize(out / "raw.onnx", out / "nf.onnx", target="ort-cpu")
        np.savez(out / "inputs.npz", *[t.numpy() for t in inputs])
        lowered = report.rules["lower_norms"].applied
        print(f"{name}: {lowered} GroupNorms lowered, verified {report.verification and report.verification.passed}")


def op_shares(session: ort.InferenceSession, feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """op type → share of kernel time over ``runs`` profiled runs (ORT's own profiler)."""
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per: Counter[str] = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per[e["args"]["op_name"]] += e["dur"]
    total = sum(per.values()) or 1
    return {op: us / total for op, us in per.most_common()}


def profile(args: argparse.Namespace) -> None:
    """Interleaved medians of raw / --target ort-cpu / TorchScript, then per-op-type time shares."""
    print(f"onnxruntime {ort.__version__} CPU EP, threads {args.threads or 'default'}; {args.iters} interleaved runs")
    print(f"{'model':<26}{'variant':<24}{'nodes':>6}{'median ms':>11}{'min ms':>9}{'raw/this':>9}  top op types")
    for name in args.models.split(","):
        d = Path(args.profile) / name
        data = np.load(d / "inputs.npz")
        paths = {k: d / f"{k}.onnx" for k in VARIANTS}
        sessions = {k: _session(p, args.threads) for k, p in paths.items()}
        sessions["raw'"] = _session(paths["raw"], args.threads)
        feeds = {i.name: data[f"arr_{j}"] for j, i in enumerate(sessions["raw"].get_inputs())}
        stats = interleaved(sessions, feeds, args.iters)
        for k, label in VARIANTS.items():
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.enable_profiling = args.threads, True
            opts.profile_file_prefix = str(d / f"profile_{k}")
            prof = ort.InferenceSession(str(paths[k]), opts, providers=["CPUExecutionProvider"])
            shares = op_shares(prof, feeds, max(3, args.iters // 5))
            top = ", ".join(f"{op} {100 * v:.0f}%" for op, v in list(shares.items())[:5])
            med, low = stats[k]
            nodes = len(onnx.load(str(paths[k]), load_external_data=False).graph.node)
            print(f"{name:<26}{label:<24}{nodes:>6}{med:>11.2f}{low:>9.2f}{stats['raw'][0] / med:>9.2f}  {top}")
        noise = abs(1 - stats["raw"][0] / stats["raw'"][0])
        print(f"{name:<26}{'A/A noise':<24}{'':>6}{noise:>11.2f}  (|1 - raw/raw'|, a second raw session)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--forms", action="store_true", help="time the four forms of one GroupNorm instead")
    parser.add_argument("--seed", action="store_true", help="time the seed's hand-written GroupNorm instead")
    parser.add_argument("--blocks", type=int, default=4, help="unet_resblock copies (2 GroupNorms each)")
    parser.add_argument("--size", type=int, default=0, help="spatial size (0: the zoo's 16)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads (0: ORT's default)")
    parser.add_argument("--prepare", metavar="DIR", help="export and optimize --models into DIR (CPU heavy)")
    parser.add_argument("--profile", metavar="DIR", help="time and profile the models --prepare wrote to DIR")
    parser.add_argument("--models", default=PROFILED, help="optimize_vs_anchors.py names for --prepare/--profile")
    args = parser.parse_args()
    if args.prepare or args.profile:
        prepare(args) if args.prepare else profile(args)
    else:
        forms(args) if args.forms else seed(args) if args.seed else stack(args)


if __name__ == "__main__":
    main()
