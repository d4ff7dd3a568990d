"""ORT CPU latency of a UNet ResBlock stack: legacy export at opset 17 vs GroupNormalization-21.

The legacy TorchScript exporter writes every GroupNorm as Reshape → InstanceNormalization → Reshape →
Mul → Add; :class:`normfold.fusers.groupnorm.GroupNormFusion` with ``target_opset=21`` turns each into
one GroupNormalization-21. Both models run in this one process, alternately, with the same input; the
script prints the medians and the ratio (goal: the fused model ≥ 1.3× faster).

Run: ``python benchmarks/groupnorm_latency.py [--blocks 4] [--size 16] [--threads 1] [--iters 30]``

Measured 2026-11-23 on the 2-core dev box (load average ~8 from other jobs), onnxruntime 1.31.1:
``--threads 1 --iters 100``: median 6.58 ms before vs 7.11 ms after (0.92x), min 1.98 vs 2.19 ms. The goal
is not met here: ORT's CPU EP has no GroupNormalization kernel and expands GN-21 into its function body
(Reshape/ReduceMean/Sub/Mul/Sqrt/Div + 5 Casts, ~29 nodes per GN, NORMS.md §3), while the legacy form runs
a native InstanceNormalization kernel (5 nodes).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch import nn

from normfold.fusers.base import PassContext, RulePass
from normfold.fusers.groupnorm import GroupNormFusion
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


def median_ms(session: ort.InferenceSession, feeds: dict[str, np.ndarray], iters: int) -> list[float]:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4, help="unet_resblock copies (2 GroupNorms each)")
    parser.add_argument("--size", type=int, default=0, help="spatial size (0: the zoo's 16)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="ORT intra-op threads (0: ORT's default)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = Stack(args.blocks).eval()
    x, t = seeded_inputs(ZOO["unet_resblock"].inputs)
    if args.size:
        x = torch.randn(1, x.shape[1], args.size, args.size, generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        before_path = Path(tmp) / "legacy17.onnx"
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x, t), str(before_path), dynamo=False, opset_version=17)
        fused = ir.load(before_path)
        ctx = PassContext(target_opset=21)
        RulePass(GroupNormFusion, ctx)(fused)
        after_path = Path(tmp) / "gn21.onnx"
        ir.save(fused, after_path)
        applied = sum(e.status == "applied" for e in ctx.events)

        providers = ["CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        before = ort.InferenceSession(str(before_path), options, providers=providers)
        after = ort.InferenceSession(str(after_path), options, providers=providers)
    feeds = {i.name: v.numpy() for i, v in zip(before.get_inputs(), (x, t), strict=True)}
    y_before = before.run(None, feeds)[0]
    y_after = after.run(None, feeds)[0]
    with torch.no_grad():
        eager = model(x, t).numpy()
    for _ in range(args.warmup):
        before.run(None, feeds)
        after.run(None, feeds)
    t_before: list[float] = []
    t_after: list[float] = []
    for _ in range(args.iters):  # interleaved, so drift hits both sides alike
        t_before += median_ms(before, feeds, 1)
        t_after += median_ms(after, feeds, 1)
    m_before, m_after = statistics.median(t_before), statistics.median(t_after)
    print(f"model: {args.blocks} x zoo unet_resblock ({2 * args.blocks} GroupNorms), x {tuple(x.shape)}")
    threads = args.threads or "default"
    print(f"onnxruntime {ort.__version__}, CPU EP, intra-op threads {threads}; {args.iters} interleaved runs")
    print(f"GroupNorm sites fused: {applied}; max |after - before| = {np.abs(y_after - y_before).max():.2e}")
    print(f"max |after - eager| = {np.abs(y_after - eager).max():.2e}")
    print(f"{'model':<34}{'median ms':>10}{'min ms':>10}")
    print(f"{'legacy opset 17 (IN emulation)':<34}{m_before:>10.2f}{min(t_before):>10.2f}")
    print(f"{'fused GroupNormalization-21':<34}{m_after:>10.2f}{min(t_after):>10.2f}")
    print(f"speed-up (before / after): {m_before / m_after:.2f}x  (goal >= 1.3x)")


if __name__ == "__main__":
    main()
