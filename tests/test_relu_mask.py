"""The fused-ReLU backward recomputes the mask from x: it must equal (y > 0) bit for bit."""

import numpy as np
import pytest

import fastbn


@pytest.mark.parametrize("shape, axis", [((4096, 64), 1), ((16, 8, 32, 32), 1),
                                         ((8, 16, 16, 24), -1), ((3, 5, 4099), 1)])
@pytest.mark.parametrize("offset", [0.0, 1e4, 1e5])
def test_backward_mask_equals_forward_output_sign(shape, axis, offset):
    # Large offsets make (x - mean) sensitive to how the centring is rounded:
    # a kernel that folded mean_hi + mean_lo (e.g. under fastmath) would flip
    # the mask of elements near the kink.
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(shape) + offset).astype(np.float32)
    n_channels = shape[axis]
    gamma = (rng.random(n_channels) + 0.5).astype(np.float32)
    beta = (rng.standard_normal(n_channels) * 1e-3).astype(np.float32)
    y, ctx = fastbn.batch_norm_forward(x, gamma, beta, axis=axis, relu=True)
    _, _, dbeta = fastbn.batch_norm_backward(np.ones_like(x), ctx)
    active = np.moveaxis(y > 0, axis, 0).reshape(n_channels, -1).sum(axis=1)
    np.testing.assert_array_equal(dbeta, active.astype(np.float32))
    # and dx is exactly -k_const (no dy term) where the output was clamped
    dy = rng.standard_normal(shape).astype(np.float32)
    dx_masked, _, _ = fastbn.batch_norm_backward(dy * (y > 0), ctx)
    dx, _, _ = fastbn.batch_norm_backward(dy, ctx)
    np.testing.assert_array_equal(dx, dx_masked)
