"""Peak memory and wall time of each command on a model that needs external data.

The model is the one issue 15 reports: nine ``Linear(W, W) + LayerNorm(W)`` blocks, batch 2. At the
default ``--width 8192`` its weights are 2.42 GB (beyond protobuf's 2 GiB, so ONNX must keep them in
``big.onnx.data``). Each command runs as its own process, as a user would run it, and its peak RSS is the
kernel's ``ru_maxrss`` for that child (``os.wait4``), printed as a multiple of the model's size::

    python benchmarks/large_model.py                 # the full 2.4 GB model: needs ~10 GB free RAM
    python benchmarks/large_model.py --width 2048    # 151 MB, for development

Goals (issue 15): every command works; peak RSS <= 2.5x the model for optimize and run, <= 3.5x for
export and compare (torch holds its own copy of the weights). Exits 1 when a command fails or a goal
is missed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FACTORY = """
import torch
from torch import nn

WIDTH = {width}


def make():
    torch.manual_seed(0)
    blocks = []
    for _ in range(9):
        blocks += [nn.Linear(WIDTH, WIDTH), nn.LayerNorm(WIDTH)]
    return nn.Sequential(*blocks).eval(), (torch.randn(2, WIDTH),)
"""

GOALS = {"export": 3.5, "optimize": 2.5, "compare": 3.5, "run": 2.5}


def model_bytes(width: int) -> int:
    """fp32 weights: nine (W·W + W) Linear parameters and 2·W LayerNorm parameters."""
    return 9 * (width * width + 3 * width) * 4


def run(args: list[str], cwd: Path, env: dict[str, str]) -> tuple[int, float, int, str]:
    """Run one command; its exit code, wall seconds, peak RSS in bytes and the tail of its output."""
    start = time.perf_counter()
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    output = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    return proc.returncode, wall, usage.ru_maxrss * 1024, output.strip().splitlines()[-1:][0] if output else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=8192, help="Linear/LayerNorm width (8192: 2.42 GB).")
    parser.add_argument("--dir", type=Path, default=None, help="Work folder (default: a temp dir, removed).")
    parser.add_argument("--keep", action="store_true", help="Keep the work folder.")
    opts = parser.parse_args()

    size = model_bytes(opts.width)
    work = opts.dir or Path(tempfile.mkdtemp(prefix="normfold-large-"))
    work.mkdir(parents=True, exist_ok=True)
    (work / "bigm.py").write_text(FACTORY.format(width=opts.width))
    nf = [sys.executable, "-m", "normfold"]
    commands = {
        "export": [*nf, "export", "bigm.py:make", "-o", "big.onnx"],
        "optimize": [*nf, "optimize", "big.onnx", "-o", "big.opt.onnx"],
        "compare": [*nf, "compare", "bigm.py:make", "big.onnx", "--per-layer"],
        "run": [*nf, "run", "big.onnx", "-o", "out.npz"],
    }
    env = dict(os.environ)
    if size < 1_800_000_000:  # a development size: force the external-data path the full model takes
        env["NORMFOLD_INLINE_LIMIT"] = "0"
    print(f"model: 9 x (Linear({opts.width}, {opts.width}) + LayerNorm), batch 2, {size / 1e9:.3f} GB of weights")
    print(f"{'command':<10} {'exit':>4} {'wall s':>8} {'peak RSS GB':>12} {'x model':>8} {'goal':>6}")
    failed = False
    try:
        for name, args in commands.items():
            code, wall, rss, last = run(args, work, env)
            ratio = rss / size
            ok = code == 0 and ratio <= GOALS[name]
            failed |= not ok
            print(
                f"{name:<10} {code:>4} {wall:>8.1f} {rss / 1e9:>12.2f} {ratio:>7.2f}x {GOALS[name]:>5.1f}x"
                f"{'' if ok else '  MISSED'}"
            )
            if code != 0:
                print(f"    {last}")
        data = work / "big.onnx.data"
        print(f"big.onnx.data: {data.stat().st_size / 1e9:.3f} GB" if data.exists() else "no big.onnx.data written")
    finally:
        if not opts.keep and opts.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
