"""fastbn: Numba-compiled batch normalization for NumPy arrays."""

from .functional import (
    BatchNormContext,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    batch_stats,
)
from .layer import BatchNorm
from .residual import (
    BatchNormAddReluContext,
    batch_norm_add_relu_backward,
    batch_norm_add_relu_forward,
    batch_norm_add_relu_inference,
)

__version__ = "0.2.0"

__all__ = [
    "BatchNorm",
    "BatchNormAddReluContext",
    "BatchNormContext",
    "batch_norm_add_relu_backward",
    "batch_norm_add_relu_forward",
    "batch_norm_add_relu_inference",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_stats",
    "__version__",
]
