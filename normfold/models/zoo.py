"""Built-in zoo models (see :mod:`normfold.models.registry`).

Every model is small (well under a second to export and run on CPU) but faithful to the architecture it
stands for, and every normalization layer carries randomized, non-trivial parameters (see
:func:`_randomize_norms`): with running_var == 1, running_mean == 0, gamma == 1 and beta == 0 a BatchNorm
is the identity up to eps, so a fold that drops or swaps a term would go unnoticed.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from normfold.models.registry import register
from normfold.models.scratch_norms import ScratchBatchNorm, ScratchGroupNorm

__all__ = ["Chain", "ScratchBatchNorm", "ScratchGroupNorm"]


def _uniform_(tensor: torch.Tensor, low: float, high: float) -> None:
    """Fill ``tensor`` in place from U(low, high) on torch's global RNG (seeded by ``ZooEntry.build``)."""
    with torch.no_grad():
        tensor.uniform_(low, high)


def _randomize_affine(weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    # gamma in [0.5, 1.5] and beta in [-0.5, 0.5]: clearly away from the identity defaults 1 and 0.
    if weight is not None:
        _uniform_(weight, 0.5, 1.5)
    if bias is not None:
        _uniform_(bias, -0.5, 0.5)


def _randomize_stats(mean: torch.Tensor, var: torch.Tensor) -> None:
    # running_var must stay positive; U(0.5, 2) keeps the fold scale gamma/sqrt(var+eps) well conditioned.
    _uniform_(mean, -0.5, 0.5)
    _uniform_(var, 0.5, 2.0)


def _calibrate_batchnorm(module: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Set BN running statistics to those of one seeded batch, as after training on real data.

    Random statistics around (0, 1) do not match the actual activation scale; through sigmoids that lets
    the signal fade until the output barely depends on the input, and then a folding mistake could hide
    (a 1% weight fault in LeNet's first conv moved the output by 9e-7). Calibrated statistics keep
    every BN's output at unit scale, as in a trained net.
    """
    saved: dict[_BatchNorm, float | None] = {}
    for sub in module.modules():
        if isinstance(sub, _BatchNorm):
            saved[sub] = sub.momentum
            sub.momentum = 1.0  # running = batch statistics of the calibration batch
    module.train()
    with torch.no_grad():
        module(torch.randn(shape))
    for sub, momentum in saved.items():
        sub.momentum = momentum
    return module.eval()


def _randomize_norms(module: nn.Module) -> nn.Module:
    """Give every normalization layer in ``module`` random statistics and affine parameters.

    Covers torch's BatchNorm/InstanceNorm/LayerNorm/GroupNorm and the zoo's from-scratch norms. Returns
    ``module`` so factories can end with ``return _randomize_norms(net)``.
    """
    for sub in module.modules():
        if isinstance(sub, (_BatchNorm, _InstanceNorm)):
            if sub.track_running_stats and sub.running_mean is not None and sub.running_var is not None:
                _randomize_stats(sub.running_mean, sub.running_var)
            if sub.affine:
                _randomize_affine(sub.weight, sub.bias)
        elif isinstance(sub, (nn.LayerNorm, nn.GroupNorm)):
            _randomize_affine(sub.weight, sub.bias)
        elif isinstance(sub, ScratchBatchNorm):
            _randomize_stats(sub.moving_mean, sub.moving_var)
            _randomize_affine(sub.gamma, sub.beta)
        elif isinstance(sub, ScratchGroupNorm):
            _randomize_affine(sub.weight, sub.bias)
    return module


class Chain(nn.Sequential):
    """``nn.Sequential`` whose forward argument is named ``x``.

    Exporters name graph inputs after forward's parameters; ``nn.Sequential.forward(input)`` would give
    ``input`` where the zoo's input specs (and users' ``--input x:...``) say ``x``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


# --------------------------------------------------------------------------------------------------------
# LeNet


def _lenet(scratch_bn: bool) -> Chain:
    """d2l.ai's LeNet with BN after every conv and hidden linear; ``scratch_bn`` picks the textbook BN."""

    def norm2d(c: int) -> nn.Module:
        return ScratchBatchNorm(c, num_dims=4) if scratch_bn else nn.BatchNorm2d(c)

    def norm1d(c: int) -> nn.Module:
        return ScratchBatchNorm(c, num_dims=2) if scratch_bn else nn.BatchNorm1d(c)

    return Chain(
        nn.Conv2d(1, 6, kernel_size=5, padding=2),
        norm2d(6),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Conv2d(6, 16, kernel_size=5),
        norm2d(16),
        nn.Sigmoid(),
        nn.AvgPool2d(kernel_size=2, stride=2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 120),
        norm1d(120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        norm1d(84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


@register(
    "lenet_bn",
    "LeNet with BatchNorm: Conv-BN2d-Sigmoid-AvgPool ×2, Linear-BN1d-Sigmoid ×2, Linear",
    inputs={"x": (2, 1, 28, 28)},
    tags=("batchnorm", "conv", "linear"),
)
def lenet_bn() -> nn.Module:
    return _lenet_bn()


def _lenet_bn() -> Chain:
    """``lenet_bn`` typed as the Chain it is (``lenet_custom_bn`` walks it layer by layer)."""
    net = _lenet(scratch_bn=False)
    _calibrate_batchnorm(_randomize_norms(net), (64, 1, 28, 28))
    return net


@register(
    "lenet_custom_bn",
    "LeNet with a from-scratch BatchNorm (moving stats as plain tensor attributes, not buffers)",
    inputs={"x": (2, 1, 28, 28)},
    tags=("batchnorm", "handwritten", "conv", "linear"),
)
def lenet_custom_bn() -> nn.Module:
    # Exactly lenet_bn's numbers (weights, affine, calibrated statistics) in the textbook module, so the
    # two must fold to the same graph and the same outputs.
    reference = _lenet_bn()
    net = _lenet(scratch_bn=True)
    for ref, mod in zip(reference, net, strict=True):
        if isinstance(mod, ScratchBatchNorm):
            assert isinstance(ref, _BatchNorm) and ref.running_mean is not None and ref.running_var is not None
            with torch.no_grad():
                mod.gamma.copy_(ref.weight.view_as(mod.gamma))
                mod.beta.copy_(ref.bias.view_as(mod.beta))
            mod.moving_mean = ref.running_mean.detach().clone().view_as(mod.moving_mean)
            mod.moving_var = ref.running_var.detach().clone().view_as(mod.moving_var)
            mod.eps = ref.eps
        else:
            mod.load_state_dict(ref.state_dict())
    return net


# --------------------------------------------------------------------------------------------------------
# ResNet


class BasicBlock(nn.Module):
    """torchvision's BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, + identity or conv1x1-BN downsample, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False), nn.BatchNorm2d(out_ch)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """Stem conv-BN-ReLU, three stages of BasicBlocks (two downsampling), global average pool, fc."""

    def __init__(self, widths: tuple[int, ...] = (8, 16, 32), num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        layers = []
        in_ch = widths[0]
        for i, width in enumerate(widths):
            layers.append(BasicBlock(in_ch, width, stride=1 if i == 0 else 2))
            in_ch = width
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_ch, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@register(
    "resnet_basic",
    "Small ResNet of BasicBlocks with conv1x1+BN downsample shortcuts, global pool, fc",
    inputs={"x": (1, 3, 32, 32)},
    tags=("batchnorm", "conv", "residual"),
)
def resnet_basic() -> nn.Module:
    return _calibrate_batchnorm(_randomize_norms(SmallResNet()), (16, 3, 32, 32))


# --------------------------------------------------------------------------------------------------------
# MobileNet


def _conv_bn_relu6(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU6(inplace=True),
    )


class DepthwiseSeparable(nn.Module):
    """MobileNet-v1 block: depthwise 3x3 (groups=C) + BN + ReLU6, then pointwise 1x1 + BN + ReLU6."""

    def __init__(self, in_ch: int, out_ch: int, stride: int) -> None:
        super().__init__()
        self.depthwise = _conv_bn_relu6(in_ch, in_ch, 3, stride, groups=in_ch)
        self.pointwise = _conv_bn_relu6(in_ch, out_ch, 1, 1, groups=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.depthwise(x))


@register(
    "mobilenet_dw",
    "MobileNet-style depthwise-separable blocks: groups=C conv + BN + ReLU6, pointwise conv + BN + ReLU6",
    inputs={"x": (1, 3, 32, 32)},
    tags=("batchnorm", "conv", "depthwise"),
)
def mobilenet_dw() -> nn.Module:
    net = Chain(
        _conv_bn_relu6(3, 16, 3, 2, groups=1),
        DepthwiseSeparable(16, 32, stride=1),
        DepthwiseSeparable(32, 64, stride=2),
        DepthwiseSeparable(64, 64, stride=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, 10),
    )
    return _calibrate_batchnorm(_randomize_norms(net), (16, 3, 32, 32))


# --------------------------------------------------------------------------------------------------------
# ConvTranspose decoder


@register(
    "convtranspose_decoder",
    "Decoder of ConvTranspose2d + BN + ReLU upsampling blocks, one grouped (groups=4)",
    inputs={"x": (1, 16, 8, 8)},
    tags=("batchnorm", "convtranspose", "grouped"),
)
def convtranspose_decoder() -> nn.Module:
    net = Chain(
        nn.ConvTranspose2d(16, 16, kernel_size=4, stride=2, padding=1, groups=4),
        nn.BatchNorm2d(16),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(16, 8, kernel_size=4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(8, 8, kernel_size=3, stride=1, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 3, kernel_size=3, padding=1),
    )
    return _calibrate_batchnorm(_randomize_norms(net), (16, 16, 8, 8))


# --------------------------------------------------------------------------------------------------------
# Conv1d


@register(
    "conv1d_bn",
    "Conv1d + BatchNorm1d + ReLU on (N, C, L), with and without conv bias",
    inputs={"x": (2, 4, 32)},
    tags=("batchnorm", "conv1d"),
)
def conv1d_bn() -> nn.Module:
    net = Chain(
        nn.Conv1d(4, 16, kernel_size=3, padding=1),
        nn.BatchNorm1d(16),
        nn.ReLU(inplace=True),
        nn.Conv1d(16, 16, kernel_size=5, padding=2, bias=False),
        nn.BatchNorm1d(16),
        nn.ReLU(inplace=True),
        nn.Conv1d(16, 4, kernel_size=1),
    )
    return _calibrate_batchnorm(_randomize_norms(net), (16, 4, 32))


# --------------------------------------------------------------------------------------------------------
# Transformer block


class PreNormTransformerBlock(nn.Module):
    """Pre-norm block: ``x = x + MHA(LN(x))``, then ``x = x + MLP(LN(x))`` with a GELU MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim * mlp_ratio), nn.GELU(), nn.Linear(dim * mlp_ratio, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        attn, _ = self.attn(h, h, h, need_weights=False)
        x = x + attn
        return x + self.mlp(self.ln2(x))


@register(
    "transformer_block",
    "Pre-norm transformer block: LayerNorm + multi-head self-attention, LayerNorm + GELU MLP",
    inputs={"x": (1, 16, 32)},
    tags=("layernorm", "attention"),
)
def transformer_block() -> nn.Module:
    return _randomize_norms(PreNormTransformerBlock())


# --------------------------------------------------------------------------------------------------------
# UNet ResBlock


class UNetResBlock(nn.Module):
    """Diffusion UNet ResBlock (DDPM/ADM style).

    ``h = conv(SiLU(GN(x))) + Linear(SiLU(t))[:, :, None, None]``; ``out = x + conv(SiLU(GN(h)))``.
    """

    def __init__(self, channels: int = 64, time_dim: int = 32, groups: int = 32) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.time_emb = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, channels))
        self.norm2 = nn.GroupNorm(groups, channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.act(self.norm1(x)))
        h = h + self.time_emb(t)[:, :, None, None]
        h = self.conv2(self.act(self.norm2(h)))
        return x + h


@register(
    "unet_resblock",
    "Diffusion UNet ResBlock: GroupNorm(32) + SiLU + conv3x3 twice, time embedding added per channel",
    inputs={"x": (1, 64, 16, 16), "t": (1, 32)},
    tags=("groupnorm", "conv", "two-inputs"),
)
def unet_resblock() -> nn.Module:
    return _randomize_norms(UNetResBlock())


# --------------------------------------------------------------------------------------------------------
# Hand-written GroupNorm


class ConvScratchGroupNorm(nn.Module):
    """conv3x3 followed by the hand-written :class:`ScratchGroupNorm`."""

    def __init__(self, channels: int = 8, groups: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = ScratchGroupNorm(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x))


@register(
    "groupnorm_handwritten",
    "Conv + GroupNorm written by hand (view/mean/var, biased variance, eps inside the sqrt), G=4",
    inputs={"x": (1, 8, 16, 16)},
    tags=("groupnorm", "handwritten"),
)
def groupnorm_handwritten() -> nn.Module:
    return _randomize_norms(ConvScratchGroupNorm())


# --------------------------------------------------------------------------------------------------------
# InstanceNorm


@register(
    "instancenorm_style",
    "Style-transfer style conv + InstanceNorm2d(affine) + ReLU, twice",
    inputs={"x": (1, 3, 32, 32)},
    tags=("instancenorm", "conv"),
)
def instancenorm_style() -> nn.Module:
    net = Chain(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.InstanceNorm2d(16, affine=True),
        nn.ReLU(inplace=True),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.InstanceNorm2d(16, affine=True),
        nn.ReLU(inplace=True),
    )
    return _randomize_norms(net)
