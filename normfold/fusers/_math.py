"""Pure numpy folding math, in float64, cast to the target dtype only at the end.

Every fold turns a per-channel affine map ``z = s·y + t`` into the weights of the layer that produced
(or consumes) ``y``. For BatchNormalization in inference mode

    s = γ / √(σ² + ε),   t = β − μ·s.

* preceding layer with output channels on weight axis ``a`` (Conv: 0, Gemm transB=1: 0, Gemm transB=0
  and MatMul: 1, ConvTranspose: the per-group output axis):  ``W' = W·s[o]``, ``B' = B·s + t``;
* following Conv (BN on its *input* channels, groups ``g``, ``Cin/g = k`` channels per group):
  ``W'[o, j] = W[o, j]·s[gi·k + j]`` and ``B'[o] = B[o] + Σ_{j, spatial} W[o, j]·t[gi·k + j]`` where
  ``gi = o // (Cout/g)``. Exact only without padding: the padding zeros enter *after* the BN in the
  original model, so at the borders the folded conv would see ``t`` where the original saw 0.

Folding in fp16 arithmetic (what onnxscript's rule does) rounds twice; here the math is fp64 and
:func:`cast_checked` refuses results that do not fit the initializer dtype (NORMS.md §5: eps=0 with a
tiny variance turns most of a channel into ±inf in fp16 while the unfolded BN would not overflow).
"""

from __future__ import annotations

import numpy as np


class FoldOverflowError(ValueError):
    """A folded tensor is not finite, or does not fit the dtype it must be stored in."""


def bn_scale_shift(
    gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray, var: np.ndarray, eps: float
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(s, t)`` with ``BN(y) = s·y + t`` per channel, in float64."""
    g, b, m, v = (np.asarray(a, dtype=np.float64).reshape(-1) for a in (gamma, beta, mean, var))
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # cast_checked reports these
        s = g / np.sqrt(v + float(eps))
        return s, b - m * s


def scale_output_channels(w: np.ndarray, s: np.ndarray, axis: int) -> np.ndarray:
    """``W·s`` with ``s`` broadcast along weight axis ``axis`` (the output-channel axis), in float64."""
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.asarray(w, dtype=np.float64) * np.asarray(s, dtype=np.float64).reshape(shape)


def scale_conv_transpose(w: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """ConvTranspose weight ``(Cin, Cout/g, *k)``: output channel ``o = gi·(Cout/g) + j`` sits at
    ``W[gi·(Cin/g) : (gi+1)·(Cin/g), j]``, so ``s`` is reshaped to ``(g, Cout/g)`` and broadcast."""
    w64 = np.asarray(w, dtype=np.float64)
    cin, cout_g = w64.shape[0], w64.shape[1]
    kernel = w64.shape[2:]
    grouped = w64.reshape(group, cin // group, cout_g, *kernel)
    s_g = np.asarray(s, dtype=np.float64).reshape(group, 1, cout_g, *([1] * len(kernel)))
    return (grouped * s_g).reshape(w64.shape)


def fold_bias(bias: np.ndarray | None, s: np.ndarray, t: np.ndarray) -> np.ndarray:
    """``B' = B·s + t`` (``B`` absent means zero); broadcasts a ``B`` of shape ``(…, C)``."""
    s64, t64 = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    if bias is None:
        return t64.copy()
    return np.asarray(bias, dtype=np.float64) * s64 + t64


def fold_into_next_conv(
    w: np.ndarray, bias: np.ndarray | None, s: np.ndarray, t: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """Fold ``x ↦ s·x + t`` on the conv's *input* channels into ``(W', B')`` (see module docstring)."""
    w64 = np.asarray(w, dtype=np.float64)
    cout, cin_g = w64.shape[0], w64.shape[1]
    s64, t64 = np.asarray(s, dtype=np.float64), np.asarray(t, dtype=np.float64)
    # per output channel, the input channels it reads: (Cout, Cin/g)
    gi = np.arange(cout) // (cout // group)
    idx = gi[:, None] * cin_g + np.arange(cin_g)[None, :]
    extra = (1,) * (w64.ndim - 2)
    w_new = w64 * s64[idx].reshape(cout, cin_g, *extra)
    shift = (w64 * t64[idx].reshape(cout, cin_g, *extra)).reshape(cout, -1).sum(axis=1)
    b64 = np.zeros(cout) if bias is None else np.asarray(bias, dtype=np.float64)
    return w_new, b64 + shift


def cast_checked(x: np.ndarray, dtype: np.dtype | type[np.generic], what: str) -> np.ndarray:
    """Cast the float64 result to ``dtype``, refusing non-finite values and values beyond ``finfo.max``."""
    x64 = np.asarray(x, dtype=np.float64)
    if not np.all(np.isfinite(x64)):
        raise FoldOverflowError(f"folded {what} has non-finite values (a zero variance with eps=0?)")
    target = np.dtype(dtype)
    if np.issubdtype(target, np.floating):
        limit = float(np.finfo(target).max)
        peak = float(np.max(np.abs(x64))) if x64.size else 0.0
        if peak > limit:
            raise FoldOverflowError(f"folded {what} reaches |{peak:.4g}|, beyond the {target.name} maximum {limit:.6g}")
    return x64.astype(target)
