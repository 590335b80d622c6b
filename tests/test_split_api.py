"""The split training API (statistics and gradient sums from elsewhere) equals the fused one.

Splitting a batch into parts, normalizing each with the whole batch's statistics
and summing the parts' gradient sums must give the single-call forward and
backward: this is what synchronized batch norm (fastbn.distributed) builds on.
"""

import numpy as np
import pytest

import fastbn
from fastbn.functional import (
    batch_norm_backward_apply,
    batch_norm_backward_reduce,
    batch_norm_normalize,
)

CASES = [((64, 16), 1), ((9, 4, 5, 5), 1), ((7, 5, 3, 4), -1), ((300, 7), 1)]


@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-12), (np.float32, 2e-5)])
def test_parts_equal_whole(shape, axis, relu, dtype, tol):
    rng = np.random.default_rng(sum(shape))
    x = (rng.standard_normal(shape) * 3 + 2).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    n_channels = shape[axis]
    gamma = rng.standard_normal(n_channels).astype(dtype)
    beta = rng.standard_normal(n_channels).astype(dtype)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=relu)
    dx, dgamma, dbeta = fastbn.batch_norm_backward(dy, ctx)

    mean, var = fastbn.batch_stats(x, axis)
    count = x.size // n_channels
    parts = [slice(0, 1), slice(1, shape[0] // 2), slice(shape[0] // 2, None)]
    outputs, contexts = [], []
    total_dy = np.zeros(n_channels)
    total_dy_xc = np.zeros(n_channels)
    for part in parts:
        y_part, ctx_part = batch_norm_normalize(x[part], mean, var, count, gamma, beta,
                                                axis=axis, relu=relu)
        assert ctx_part.count == count and ctx_part.batch_stats
        sum_dy, sum_dy_xc = batch_norm_backward_reduce(dy[part], ctx_part)
        assert sum_dy.dtype == np.float64 and sum_dy.shape == (n_channels,)
        total_dy += sum_dy
        total_dy_xc += sum_dy_xc
        outputs.append(y_part)
        contexts.append(ctx_part)
    dx_parts = [batch_norm_backward_apply(dy[part], c, total_dy, total_dy_xc)
                for part, c in zip(parts, contexts, strict=True)]

    scale = np.abs(y).max() + 1
    assert np.abs(np.concatenate(outputs) - y).max() <= tol * scale
    assert np.abs(np.concatenate(dx_parts) - dx).max() <= tol * (np.abs(dx).max() + 1)
    assert np.allclose(contexts[0].inv_std * total_dy_xc, dgamma, rtol=tol, atol=tol)
    assert np.allclose(total_dy, dbeta, rtol=tol, atol=tol)


def test_count_validation():
    x = np.ones((4, 3))
    mean, var = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="at least"):
        batch_norm_normalize(x, mean, var, 3)
    with pytest.raises(ValueError, match="more than 1 value"):
        batch_norm_normalize(x[:1], mean, var, 1)
    with pytest.raises(TypeError, match="count"):
        batch_norm_normalize(x, mean, var, 4.5)


def test_backward_args_validated():
    x = np.random.default_rng(0).standard_normal((6, 3))
    _, ctx = batch_norm_normalize(x, np.zeros(3), np.ones(3), 12)
    with pytest.raises(ValueError, match="shape"):
        batch_norm_backward_reduce(np.ones((5, 3)), ctx)
    with pytest.raises(TypeError, match="dtype"):
        batch_norm_backward_reduce(np.ones((6, 3), np.float32), ctx)
    with pytest.raises(ValueError, match="shape"):
        batch_norm_backward_apply(np.ones((6, 3)), ctx, np.zeros(2), np.zeros(3))
