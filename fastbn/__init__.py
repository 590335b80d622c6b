"""fastbn: Numba-compiled batch normalization for NumPy arrays."""

from .functional import (
    BatchNormContext,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_inference,
    batch_stats,
)
from .layer import BatchNorm

__version__ = "0.2.0"

__all__ = [
    "BatchNorm",
    "BatchNormContext",
    "batch_norm_backward",
    "batch_norm_forward",
    "batch_norm_inference",
    "batch_stats",
    "__version__",
]
