"""Accuracy against float64 on the same data: fastbn vs PyTorch.

``python -m bench.accuracy`` prints two Markdown tables (quoted on the docs'
accuracy page):

1. float32 at large mean/std: max-abs error over max-abs value of a float64
   computation (``fastbn.reference`` on ``x.astype(float64)``);
2. 16-bit data (float16, and bfloat16 when ml_dtypes is installed) with float32
   parameters: ``y`` and ``dx`` as the largest error in units in the last place
   of the 16-bit format (of the float64 result), ``dγ`` and the statistics as
   relative errors.

PyTorch columns need torch.
"""

from __future__ import annotations

import numpy as np

import fastbn
from fastbn import reference

OFFSETS = (1e2, 1e3, 1e4, 1e5)
SHAPE = (4096, 64)


def _relative_error(got, want) -> float:
    return float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())


def _torch_grads(x, gamma, beta, dy):
    try:
        import torch
    except ImportError:
        return None
    xt = torch.from_numpy(x).requires_grad_()
    gt = torch.from_numpy(gamma).requires_grad_()
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, torch.from_numpy(beta),
                                        training=True)
    yt.backward(torch.from_numpy(dy))
    return yt.detach().numpy(), xt.grad.numpy(), gt.grad.numpy()


def main() -> None:
    rng = np.random.default_rng(0)
    print("| offset (mean/std) | fastbn y | fastbn dx | fastbn dγ "
          "| PyTorch y | PyTorch dx | PyTorch dγ |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for offset in OFFSETS:
        x = (rng.standard_normal(SHAPE) + offset).astype(np.float32)
        dy = rng.standard_normal(SHAPE).astype(np.float32)
        gamma = (rng.random(SHAPE[1]) + 0.5).astype(np.float32)
        beta = rng.standard_normal(SHAPE[1]).astype(np.float32)
        y, ctx = fastbn.batch_norm_forward(x, gamma, beta)
        dx, dgamma, _ = fastbn.batch_norm_backward(dy, ctx)
        y64, cache = reference.forward(x.astype(np.float64), gamma.astype(np.float64),
                                       beta.astype(np.float64))
        dx64, dgamma64, _ = reference.backward(dy.astype(np.float64), cache)
        truth = (y64, dx64, dgamma64)
        cells = [_relative_error(a, b) for a, b in zip((y, dx, dgamma), truth, strict=True)]
        torch_results = _torch_grads(x, gamma, beta, dy)
        if torch_results is None:
            cells += [float("nan")] * 3
        else:
            cells += [_relative_error(a, b) for a, b in zip(torch_results, truth, strict=True)]
        print(f"| {offset:.0e} | " + " | ".join(f"{c:.1e}" for c in cells) + " |")


SIXTEEN_BIT_SHAPE = (32, 16, 24, 24)
SIXTEEN_BIT_OFFSETS = (0.0, 10.0, 100.0)


def _ulp_error(got, exact: np.ndarray, fmt: np.dtype) -> float:
    """Largest |got - exact| in ulps of the 16-bit format at |exact|."""
    mantissa = {"float16": 10, "bfloat16": 7}[fmt.name]
    tiny = float(np.finfo(np.float16).tiny) if fmt.name == "float16" else 1.2e-38
    exponent = np.floor(np.log2(np.maximum(np.abs(exact), tiny)))
    ulp = np.exp2(exponent - mantissa)
    return float((np.abs(np.asarray(got, np.float64) - exact) / ulp).max())


def _torch_sixteen(x, gamma, beta, dy):
    try:
        import torch
    except ImportError:
        return None
    as_tensor = (lambda a: torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
                 if a.dtype.name == "bfloat16" else torch.from_numpy(a))
    xt = as_tensor(x).requires_grad_()
    gt = torch.from_numpy(gamma).requires_grad_()
    yt = torch.nn.functional.batch_norm(xt, None, None, gt, torch.from_numpy(beta),
                                        training=True)
    yt.backward(as_tensor(dy))
    return yt.detach().double().numpy(), xt.grad.double().numpy(), gt.grad.numpy()


def sixteen_bit_table() -> None:
    formats = [np.dtype(np.float16)]
    try:
        import ml_dtypes

        formats.append(np.dtype(ml_dtypes.bfloat16))
    except ImportError:
        print("(bfloat16 rows need ml_dtypes)")
    rng = np.random.default_rng(1)
    print("| data | offset | fastbn y (ulp) | fastbn dx (ulp) | fastbn dγ | fastbn var "
          "| PyTorch y (ulp) | PyTorch dx (ulp) | PyTorch dγ |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    n_channels = SIXTEEN_BIT_SHAPE[1]
    for fmt in formats:
        for offset in SIXTEEN_BIT_OFFSETS:
            x = (rng.standard_normal(SIXTEEN_BIT_SHAPE) + offset).astype(fmt)
            dy = rng.standard_normal(SIXTEEN_BIT_SHAPE).astype(fmt)
            gamma = (rng.random(n_channels) + 0.5).astype(np.float32)
            beta = rng.standard_normal(n_channels).astype(np.float32)
            y, ctx = fastbn.batch_norm_forward(x, gamma, beta)
            dx, dgamma, _ = fastbn.batch_norm_backward(dy, ctx)
            y64, cache = reference.forward(x.astype(np.float64), gamma.astype(np.float64),
                                           beta.astype(np.float64))
            dx64, dgamma64, _ = reference.backward(dy.astype(np.float64), cache)
            var64 = x.astype(np.float64).var(axis=(0, 2, 3))
            cells = [f"{_ulp_error(y, y64, fmt):.2f}", f"{_ulp_error(dx, dx64, fmt):.2f}",
                     f"{_relative_error(dgamma, dgamma64):.1e}",
                     f"{_relative_error(ctx.var, var64):.1e}"]
            theirs = _torch_sixteen(x, gamma, beta, dy)
            if theirs is None:
                cells += ["-"] * 3
            else:
                cells += [f"{_ulp_error(theirs[0], y64, fmt):.2f}",
                          f"{_ulp_error(theirs[1], dx64, fmt):.2f}",
                          f"{_relative_error(theirs[2], dgamma64):.1e}"]
            print(f"| {fmt.name} | {offset:g} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
    print()
    sixteen_bit_table()
