"""normfold optimize (``--target ort-cpu``) against the raw export and the anchors, on real models, ORT CPU.

For each model: export once (normfold's exporter, dynamo at opset 21 unless the model says otherwise),
then build five variants: ``raw``, ``normfold`` (:func:`normfold.optimize`, verified, target ort-cpu),
``onnxsim``, ``onnxslim`` and ``onnxscript`` (``onnxscript.optimizer.optimize``). All sessions are ORT CPU,
1 intra-op thread, default graph optimizations, and are timed **interleaved** in one process (round r runs
a short burst of every variant, in a shuffled order, keeping each burst's fastest run; the statistic is the
median over rounds of those minimums, see :func:`interleaved_ms`) so load from other jobs hits all of them
alike. A second session of the raw model (``raw'``) gives the A/A noise: ``|1 − raw/raw'|`` is printed per
model, and a ratio within it is a tie.

Prints per model: node counts, the raw time, ``normfold / raw``, ``normfold / best anchor`` (the
fastest of onnxsim/onnxslim/onnxscript), the noise, and which anchors produced **the same graph** as
normfold (same multiset of op, attributes and weight shapes: the same kernels, so any latency ratio
between them is noise by construction). ``--per-layer`` also runs
``normfold.compare(..., per_layer=True)`` on the normfold output (fp32 defaults) and prints the verdict.

Weights are random and then perturbed (:func:`trained_like`) so that no bias is exactly zero: fresh
HF/timm inits zero every Linear bias, and removing ``Add(x, 0)`` is a win only a fresh init offers.
Needs the ``bench`` extra (``pip install -e '.[bench]' -c constraints-dev.txt``). Random weights only:
nothing is downloaded. Run: ``python benchmarks/optimize_vs_anchors.py [--models a,b] [--rounds 30]
[--size 224] [--per-layer]``; ``--list`` prints the model names.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import logging
import random
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

Built = tuple[nn.Module, tuple[torch.Tensor, ...]]


def _torchvision() -> Any:
    # torchvision's CUDA wheels register meta kernels that fail to import on the CPU torch build
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torchvision

    return torchvision


def _image(size: int, batch: int = 1, channels: int = 3) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(0)),)


def tv(name: str) -> Callable[[int], Built]:
    def build(size: int) -> Built:
        return getattr(_torchvision().models, name)(weights=None), _image(size)

    return build


def timm_model(name: str) -> Callable[[int], Built]:
    def build(size: int) -> Built:
        _torchvision()  # before timm, which imports torchvision
        import timm

        kwargs = {"img_size": size} if "vit" in name else {}
        return timm.create_model(name, pretrained=False, **kwargs), _image(size)

    return build


class _Logits(nn.Module):
    """HF models return dataclasses; the exporter wants tensors."""

    def __init__(self, inner: nn.Module, field: str) -> None:
        super().__init__()
        self.inner, self.field = inner, field

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return getattr(self.inner(*args), self.field)


def hf_bert(size: int) -> Built:
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        vocab_size=1000, hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512
    )
    ids = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))
    return _Logits(BertModel(cfg), "last_hidden_state"), (ids,)


def hf_vit(size: int) -> Built:
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        image_size=64, patch_size=8, hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768
    )
    return _Logits(ViTModel(cfg), "last_hidden_state"), _image(64)


def hf_llama(size: int) -> Built:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=1000,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        use_cache=False,
    )
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    return _Logits(LlamaForCausalLM(cfg), "logits"), (ids,)


class _Unet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        from diffusers import UNet2DModel

        self.inner = UNet2DModel(
            sample_size=32,
            in_channels=3,
            out_channels=3,
            layers_per_block=1,
            block_out_channels=(32, 64),
            norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        )

    def forward(self, sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.inner(sample, t).sample


def diffusers_unet(size: int) -> Built:
    return _Unet(), (*_image(32), torch.tensor([10], dtype=torch.int64))


class SeedGroupNorm(nn.Module):
    """GroupNorm as the seed wrote it: chained single-axis sums divided by the count, ``pow(x − μ, 2)``."""

    def __init__(self, channels: int, groups: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.groups, self.eps = groups, eps
        self.weight = nn.Parameter(torch.rand(channels) + 0.5)
        self.bias = nn.Parameter(torch.rand(channels) - 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        v = x.view(n, self.groups, c // self.groups, h, w)
        count = (c // self.groups) * h * w
        mean = v.sum(2, keepdim=True).sum(3, keepdim=True).sum(4, keepdim=True) / count
        var = torch.pow(v - mean, 2).sum(2, keepdim=True).sum(3, keepdim=True).sum(4, keepdim=True) / count
        y = ((v - mean) / torch.sqrt(var + self.eps)).view(n, c, h, w)
        return y * self.weight[None, :, None, None] + self.bias[None, :, None, None]


def seed_groupnorm(size: int) -> Built:
    return nn.Sequential(SeedGroupNorm(128, 32), nn.SiLU(), SeedGroupNorm(128, 32)), _image(64, channels=128)


def zoo(name: str, channels: int = 0) -> Callable[[int], Built]:
    def build(size: int) -> Built:
        from normfold.models import ZOO, seeded_inputs

        entry = ZOO[name]
        return entry.build(), tuple(seeded_inputs(entry.inputs))

    return build


MODELS: dict[str, Callable[[int], Built]] = {
    "tv_resnet18": tv("resnet18"),
    "tv_mobilenet_v3_small": tv("mobilenet_v3_small"),
    "tv_efficientnet_b0": tv("efficientnet_b0"),
    "tv_convnext_tiny": tv("convnext_tiny"),
    "tv_densenet121": tv("densenet121"),
    "timm_resnet50_gn": timm_model("resnet50_gn"),
    "timm_vit_tiny": timm_model("vit_tiny_patch16_224"),
    "timm_poolformer_s12": timm_model("poolformer_s12"),
    "timm_levit_128s": timm_model("levit_128s"),  # 46 MatMul→Reshape→BatchNorm1d sites (issue 11)
    "hf_bert_2l": hf_bert,
    "hf_vit_4l": hf_vit,
    "diffusers_unet": diffusers_unet,
    "hf_tiny_llama": hf_llama,
    "seed_groupnorm_128x64x64": seed_groupnorm,
    "zoo_groupnorm_handwritten": zoo("groupnorm_handwritten"),
    "zoo_lenet_custom_bn": zoo("lenet_custom_bn"),
    "zoo_unet_resblock": zoo("unet_resblock"),
}


def _quiet() -> contextlib.ExitStack:
    stack = contextlib.ExitStack()
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore")
    stack.enter_context(contextlib.redirect_stdout(io.StringIO()))
    stack.enter_context(contextlib.redirect_stderr(io.StringIO()))
    return stack


@torch.no_grad()
def trained_like(module: nn.Module) -> None:
    """Perturb every parameter (×(1 ± 5%) + N(0, 0.01)): fresh HF/timm inits have exactly-zero biases and
    unit norm weights, which onnxsim deletes as ``Add(x, 0)`` — a win no trained model offers."""
    gen = torch.Generator().manual_seed(1)
    for p in module.parameters():
        if p.is_floating_point():
            p.mul_(1 + 0.05 * (2 * torch.rand(p.shape, generator=gen) - 1)).add_(
                0.01 * torch.randn(p.shape, generator=gen)
            )


def export_model(name: str, size: int, path: Path) -> tuple[nn.Module, tuple[torch.Tensor, ...], str]:
    from normfold.exporter import export

    torch.manual_seed(0)
    module, inputs = MODELS[name](size)
    module.eval()
    trained_like(module)
    with _quiet():
        try:
            export(module, inputs, path, opset=21)
            how = "dynamo"
        except Exception:  # a model dynamo cannot export still counts, through the TorchScript exporter
            export(module, inputs, path, opset=17, exporter="torchscript")
            how = "torchscript"
    return module, inputs, how


def variants(raw: Path, out: Path) -> tuple[dict[str, onnx.ModelProto | None], str]:
    """name → optimized ModelProto (None when that tool failed on the model), plus normfold's verdict."""
    import onnxscript
    import onnxsim
    import onnxslim

    from normfold.fusers import optimize

    model = onnx.load(str(raw))
    result: dict[str, onnx.ModelProto | None] = {"raw": model}
    report = optimize(raw, out / "normfold.onnx", target="ort-cpu")
    result["normfold"] = onnx.load(str(out / "normfold.onnx"))
    verdict = "verified" if report.verification and report.verification.passed else "NOT verified"
    tools: dict[str, Callable[[onnx.ModelProto], onnx.ModelProto]] = {
        "onnxsim": lambda m: onnxsim.simplify(m)[0],
        "onnxslim": lambda m: onnxslim.slim(m),
        "onnxscript": lambda m: onnxscript.optimizer.optimize(m),
    }
    for tool, fn in tools.items():
        try:
            with _quiet():
                result[tool] = fn(onnx.load(str(raw)))
        except Exception as e:  # an anchor failing on a model is a result, not a crash
            logging.warning("%s failed: %s", tool, str(e).splitlines()[0][:120])
            result[tool] = None
    return result, verdict


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def interleaved_ms(
    sessions: dict[str, ort.InferenceSession], feeds: dict[str, np.ndarray], rounds: int, burst_ms: float = 20.0
) -> dict[str, float]:
    """Median over ``rounds`` of each session's per-round minimum, in ms.

    Every round visits the sessions in a fresh random order, and each session runs a short burst (as many
    runs as fit in ``burst_ms``, at least one) keeping its fastest run. Other jobs on a shared machine only
    ever add time, so a burst's minimum is its least disturbed sample; the median over rounds then drops
    the rounds that were disturbed throughout. The order is shuffled so that no variant always runs right
    after another one's cache footprint.
    """
    times: dict[str, list[float]] = {k: [] for k in sessions}
    reps: dict[str, int] = {}
    for name, s in sessions.items():
        s.run(None, feeds)
        start = time.perf_counter()
        s.run(None, feeds)
        once = (time.perf_counter() - start) * 1e3
        reps[name] = max(1, min(50, int(burst_ms / max(once, 1e-3))))
    order = list(sessions)
    rng = random.Random(0)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            s = sessions[name]
            best = float("inf")
            for _ in range(reps[name]):
                start = time.perf_counter()
                s.run(None, feeds)
                best = min(best, (time.perf_counter() - start) * 1e3)
            times[name].append(best)
    return {k: statistics.median(v) for k, v in times.items()}


def signature(model: onnx.ModelProto) -> collections.Counter[tuple[Any, ...]]:
    """The graph as a multiset of (op, attributes, initializer input shapes): equal signatures run the same kernels."""
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    return collections.Counter(
        (
            n.op_type,
            n.domain,
            tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)),
            tuple(shapes.get(i, "x") for i in n.input),
        )
        for n in model.graph.node
    )


def per_layer(module: nn.Module, inputs: tuple[torch.Tensor, ...], path: Path) -> str:
    from normfold.numerics import compare

    try:
        with _quiet():
            report = compare(module, path, inputs, per_layer=True)
    except Exception as e:  # report, do not crash the table
        return f"error: {type(e).__name__}"
    return "pass" if report.passed else "FAIL"


def run_one(name: str, args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        module, inputs, how = export_model(name, args.size, out / "raw.onnx")
        models, verdict = variants(out / "raw.onnx", out)
        ok = {k: m for k, m in models.items() if m is not None}
        sessions = {k: session(m) for k, m in ok.items()}
        sessions["raw'"] = session(models["raw"])  # type: ignore[arg-type]
        names = [i.name for i in sessions["raw"].get_inputs()]
        feeds = {n: t.numpy() for n, t in zip(names, inputs, strict=False)}
        ms = interleaved_ms(sessions, feeds, args.rounds)
        layers = per_layer(module, inputs, out / "normfold.onnx") if args.per_layer else "-"
        nodes = {k: (len(m.graph.node) if m is not None else None) for k, m in models.items()}
        nf_sig = signature(models["normfold"])  # type: ignore[arg-type]
        same = [k for k in ("onnxsim", "onnxslim", "onnxscript") if models.get(k) and signature(models[k]) == nf_sig]  # type: ignore[arg-type]
    anchors = [ms[k] for k in ("onnxsim", "onnxslim", "onnxscript") if k in ms]
    return {
        "model": name,
        "export": how,
        "nodes": nodes,
        "ms": ms,
        "nf_raw": ms["normfold"] / ms["raw"],
        "nf_best": ms["normfold"] / min(anchors) if anchors else float("nan"),
        "noise": abs(1 - ms["raw"] / ms["raw'"]),
        "same": ",".join(same) or "-",
        "verified": verdict,
        "per_layer": layers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="", help="comma-separated subset (default: all; --list names them)")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved timing rounds per model")
    parser.add_argument("--size", type=int, default=224, help="image size for the torchvision/timm models")
    parser.add_argument("--per-layer", action="store_true", help="also run compare --per-layer on normfold's output")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args()
    if args.list:
        print("\n".join(MODELS))
        return
    logging.basicConfig(level=logging.ERROR)
    _torchvision()  # first: timm, transformers and diffusers import torchvision themselves
    chosen = [m.strip() for m in args.models.split(",") if m.strip()] or list(MODELS)
    header = (
        f"{'model':28} {'export':6} {'nodes raw/nf/sim/slim/oss':27} {'raw ms':>8} "
        f"{'nf/raw':>7} {'nf/best':>8} {'noise':>6}  {'same graph as':22} verify / per-layer"
    )
    print(header)
    print("-" * len(header))
    for name in chosen:
        try:
            r = run_one(name, args)
        except Exception as e:  # one model failing must not hide the others
            print(f"{name:28} error: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
            continue
        n = r["nodes"]
        counts = "/".join(str(n.get(k, "-")) for k in ("raw", "normfold", "onnxsim", "onnxslim", "onnxscript"))
        print(
            f"{name:28} {r['export'][:6]:6} {counts:27} {r['ms']['raw']:8.3f} {r['nf_raw']:7.2f} "
            f"{r['nf_best']:8.2f} {r['noise']:6.2f}  {r['same']:22} {r['verified']} / {r['per_layer']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
