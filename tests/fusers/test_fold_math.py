"""Property tests of the fold math against torch.nn.utils.fusion and against direct convolution."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from normfold.fusers import _math

settings.register_profile("normfold-ci", derandomize=True, max_examples=25, deadline=None)
settings.load_profile("normfold-ci")


def _bn(c: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(c, generator=gen, dtype=torch.float64)
    var = torch.rand(c, generator=gen, dtype=torch.float64) * 2 + 1e-3
    gamma = torch.randn(c, generator=gen, dtype=torch.float64)
    beta = torch.randn(c, generator=gen, dtype=torch.float64)
    return mean, var, gamma, beta


@given(
    cout=st.integers(1, 6),
    cin=st.integers(1, 4),
    ndim=st.integers(1, 3),
    bias=st.booleans(),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_conv_fold_matches_torch(cout: int, cin: int, ndim: int, bias: bool, eps: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 1)
    w = torch.randn(cout, cin, *([3] * ndim), generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    mean, var, gamma, beta = _bn(cout, seed)
    ref_w, ref_b = fuse_conv_bn_weights(w, b, mean, var, eps, gamma, beta)
    s, t = _math.bn_scale_shift(gamma.numpy(), beta.numpy(), mean.numpy(), var.numpy(), eps)
    got_w = _math.scale_output_channels(w.numpy(), s, 0)
    got_b = _math.fold_bias(None if b is None else b.numpy(), s, t)
    np.testing.assert_allclose(got_w, ref_w.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got_b, ref_b.detach().numpy(), rtol=1e-12, atol=1e-12)


@given(cin=st.integers(1, 4), cout=st.integers(1, 6), bias=st.booleans(), seed=st.integers(0, 2**16))
def test_conv_transpose_fold_matches_torch(cin: int, cout: int, bias: bool, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 2)
    w = torch.randn(cin, cout, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    mean, var, gamma, beta = _bn(cout, seed)
    ref_w, ref_b = fuse_conv_bn_weights(w, b, mean, var, 1e-5, gamma, beta, transpose=True)
    s, t = _math.bn_scale_shift(gamma.numpy(), beta.numpy(), mean.numpy(), var.numpy(), 1e-5)
    np.testing.assert_allclose(_math.scale_conv_transpose(w.numpy(), s, 1), ref_w.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        _math.fold_bias(None if b is None else b.numpy(), s, t), ref_b.detach().numpy(), rtol=1e-12, atol=1e-12
    )


@settings(max_examples=10)
@given(groups=st.sampled_from([1, 2, 3]), per=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_grouped_conv_transpose_fold_matches_convolution(groups: int, per: int, seed: int) -> None:
    """torch's helper ignores groups for transposed convs, so check the grouped case by running it."""
    gen = torch.Generator().manual_seed(seed)
    cin, cout = 2 * groups, per * groups
    w = torch.randn(cin, per, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(1, cin, 4, 4, generator=gen, dtype=torch.float64)
    mean, var, gamma, beta = _bn(cout, seed)
    ref = F.batch_norm(F.conv_transpose2d(x, w, groups=groups), mean, var, gamma, beta, eps=1e-5)
    s, t = _math.bn_scale_shift(gamma.numpy(), beta.numpy(), mean.numpy(), var.numpy(), 1e-5)
    w2 = torch.from_numpy(_math.scale_conv_transpose(w.numpy(), s, groups))
    got = F.conv_transpose2d(x, w2, torch.from_numpy(_math.fold_bias(None, s, t)), groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


@given(n_out=st.integers(1, 8), n_in=st.integers(1, 8), seed=st.integers(0, 2**16))
def test_linear_fold_matches_torch(n_out: int, n_in: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed + 3)
    w = torch.randn(n_out, n_in, generator=gen, dtype=torch.float64)
    b = torch.randn(n_out, generator=gen, dtype=torch.float64)
    mean, var, gamma, beta = _bn(n_out, seed)
    ref_w, ref_b = fuse_linear_bn_weights(w, b, mean, var, 1e-5, gamma, beta)
    s, t = _math.bn_scale_shift(gamma.numpy(), beta.numpy(), mean.numpy(), var.numpy(), 1e-5)
    # Gemm transB=1 stores W as (N, K): the feature axis is 0; transB=0 stores W.T: axis 1
    np.testing.assert_allclose(_math.scale_output_channels(w.numpy(), s, 0), ref_w.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(_math.scale_output_channels(w.numpy().T, s, 1), ref_w.detach().numpy().T, rtol=1e-12)
    np.testing.assert_allclose(_math.fold_bias(b.numpy(), s, t), ref_b.detach().numpy(), rtol=1e-12, atol=1e-12)


@settings(max_examples=10)
@given(
    groups=st.sampled_from([1, 2, 4]),
    per_in=st.integers(1, 3),
    per_out=st.integers(1, 2),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fold_into_next_conv_is_exact_without_padding(
    groups: int, per_in: int, per_out: int, bias: bool, seed: int
) -> None:
    gen = torch.Generator().manual_seed(seed)
    cin, cout = groups * per_in, groups * per_out
    w = torch.randn(cout, per_in, 3, 3, generator=gen, dtype=torch.float64)
    b = torch.randn(cout, generator=gen, dtype=torch.float64) if bias else None
    x = torch.randn(2, cin, 6, 6, generator=gen, dtype=torch.float64)
    mean, var, gamma, beta = _bn(cin, seed)
    ref = F.conv2d(F.batch_norm(x, mean, var, gamma, beta, eps=1e-5), w, b, groups=groups)
    s, t = _math.bn_scale_shift(gamma.numpy(), beta.numpy(), mean.numpy(), var.numpy(), 1e-5)
    w2, b2 = _math.fold_into_next_conv(w.numpy(), None if b is None else b.numpy(), s, t, groups)
    got = F.conv2d(x, torch.from_numpy(w2), torch.from_numpy(b2), groups=groups)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)


def test_fold_into_next_conv_is_wrong_at_padded_borders() -> None:
    """The reason the rule refuses padding (NORMS.md §5): interior exact, borders off by about t."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 2, 3, 3, generator=gen, dtype=torch.float64)
    x = torch.randn(1, 2, 6, 6, generator=gen, dtype=torch.float64)
    mean, var, gamma, beta = _bn(2, 0)
    ref = F.conv2d(F.batch_norm(x, mean, var, gamma, beta, eps=1e-5), w, padding=1)
    s, t = _math.bn_scale_shift(gamma.numpy(), beta.numpy(), mean.numpy(), var.numpy(), 1e-5)
    w2, b2 = _math.fold_into_next_conv(w.numpy(), None, s, t, 1)
    got = F.conv2d(x, torch.from_numpy(w2), torch.from_numpy(b2), padding=1)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], ref[..., 1:-1, 1:-1], rtol=1e-10, atol=1e-10)
    assert (got - ref).abs().max() > 1e-3


def test_fold_runs_in_float64_then_casts() -> None:
    """fp16 parameters: the fp64 fold rounded once matches the fp64 reference to half an ulp."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8)).astype(np.float16)
    gamma, var = rng.uniform(0.5, 2, 64).astype(np.float16), rng.uniform(0.5, 2, 64).astype(np.float16)
    s, _ = _math.bn_scale_shift(gamma, np.zeros(64, np.float16), np.zeros(64, np.float16), var, 1e-5)
    got = _math.cast_checked(_math.scale_output_channels(w, s, 0), np.float16, "weight")
    exact = w.astype(np.float64) * (gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5))[:, None]
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, exact.astype(np.float16))


@pytest.mark.parametrize(
    ("values", "dtype", "match"),
    [
        (np.array([7e4]), np.float16, "beyond the float16 maximum"),
        (np.array([np.inf]), np.float32, "non-finite"),
        (np.array([np.nan]), np.float32, "non-finite"),
    ],
)
def test_cast_checked_refuses_overflow(values: np.ndarray, dtype: type, match: str) -> None:
    with pytest.raises(_math.FoldOverflowError, match=match):
        _math.cast_checked(values, dtype, "weight")


def test_cast_checked_accepts_values_that_fit() -> None:
    out = _math.cast_checked(np.array([6.5e4, -1.0]), np.float16, "weight")
    assert out.dtype == np.float16 and np.isfinite(out).all()
