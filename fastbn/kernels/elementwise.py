"""Per-element helpers shared by the rows and planes sweeps (inlined into them).

They are inlined at Numba IR level and re-optimized under the *caller's*
fastmath flags, so only sweeps compiled without fastmath may call the ones
that centre in float32 (``(x - mean_hi) - mean_lo`` would be folded).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .._config import CACHE


@njit(cache=CACHE, inline="always")
def relu_active(x_value, hi, lo, s, b):
    """True where the fused-ReLU forward output was > 0 (recomputed bit-for-bit)."""
    return ((x_value - hi) - lo) * s + b > 0


@njit(cache=CACHE, inline="always")
def masked_grad(dy_value, x_value, hi, lo, s, b, relu):
    """dy as float64, zeroed where the fused-ReLU forward output was not > 0."""
    if relu and not relu_active(x_value, hi, lo, s, b):
        return 0.0
    return np.float64(dy_value)


@njit(cache=CACHE, inline="always")
def grad_input(x_value, dy_value, hi, lo, s, b, inv_std, k_dy, k_const, k_xhat, relu, zero):
    """dx for one element: k_dy*dy' - k_const - k_xhat*x_hat, centred as in the forward."""
    xc = (x_value - hi) - lo
    g = dy_value
    if relu and not xc * s + b > zero:
        g = zero
    return k_dy * g - k_const - k_xhat * (xc * inv_std)
