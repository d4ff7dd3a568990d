"""Normalization layers written from scratch, as users write them: the models a folding pass must handle
when no ``BatchNormalization``/``GroupNormalization`` op reaches the graph (see the zoo's ``lenet_custom_bn``
and ``groupnorm_handwritten``)."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ScratchBatchNorm", "ScratchGroupNorm"]


def _scratch_batch_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    moving_mean: torch.Tensor,
    moving_var: torch.Tensor,
    eps: float,
    momentum: float,
    training: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The textbook batch norm: ``(x - mean) / sqrt(var + eps) * gamma + beta``.

    In eval it uses the moving statistics; in training the (biased) batch statistics, and it returns the
    updated moving statistics ``momentum * moving + (1 - momentum) * batch``.
    """
    if not training:
        x_hat = (x - moving_mean) / torch.sqrt(moving_var + eps)
    else:
        dims = (0,) if x.dim() == 2 else (0, 2, 3)
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        x_hat = (x - mean) / torch.sqrt(var + eps)
        moving_mean = momentum * moving_mean + (1.0 - momentum) * mean
        moving_var = momentum * moving_var + (1.0 - momentum) * var
    return gamma * x_hat + beta, moving_mean.detach(), moving_var.detach()


class ScratchBatchNorm(nn.Module):
    """BatchNorm written from scratch, the d2l.ai textbook way.

    ``gamma``/``beta`` are parameters; ``moving_mean``/``moving_var`` are *plain tensor attributes*, neither
    buffers nor parameters, so they are not in ``state_dict`` and ``.to()`` does not move them (hence the
    device move in ``forward``). Exporters see them as constants. This is faithful to the textbook and is
    exactly the kind of model a BN-folding pass must handle as ``Sub, Div(Sqrt(Add)), Mul, Add``.
    """

    def __init__(self, num_features: int, num_dims: int, eps: float = 1e-5, momentum: float = 0.9) -> None:
        super().__init__()
        if num_dims not in (2, 4):
            raise ValueError(f"num_dims must be 2 or 4, got {num_dims}")
        shape = (1, num_features) if num_dims == 2 else (1, num_features, 1, 1)
        self.eps = eps
        self.momentum = momentum
        self.gamma = nn.Parameter(torch.ones(shape))
        self.beta = nn.Parameter(torch.zeros(shape))
        self.moving_mean = torch.zeros(shape)
        self.moving_var = torch.ones(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.moving_mean.device != x.device:
            self.moving_mean = self.moving_mean.to(x.device)
            self.moving_var = self.moving_var.to(x.device)
        y, moving_mean, moving_var = _scratch_batch_norm(
            x,
            self.gamma,
            self.beta,
            self.moving_mean,
            self.moving_var,
            self.eps,
            self.momentum,
            self.training,
        )
        # eval never rebinds the stats: under inference_mode that would leave inference tensors behind
        if self.training:
            self.moving_mean, self.moving_var = moving_mean, moving_var
        return y


class ScratchGroupNorm(nn.Module):
    """GroupNorm written by hand: per-group biased variance, eps inside the sqrt, per-channel affine.

    ``y = (x - mean_g) / sqrt(var_g + eps) * weight[c] + bias[c]`` with mean/var over each group's
    ``C/G * H * W`` elements; this is what ``nn.GroupNorm`` computes, spelled out in view/mean/var ops.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels={num_channels} is not divisible by num_groups={num_groups}")
        self.num_groups = num_groups
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g = x.view(n, self.num_groups, -1)
        mean = g.mean(dim=-1, keepdim=True)
        var = g.var(dim=-1, unbiased=False, keepdim=True)
        g = (g - mean) / torch.sqrt(var + self.eps)
        x = g.view(n, c, h, w)
        return x * self.weight[None, :, None, None] + self.bias[None, :, None, None]
