"""float32 accuracy at large mean/std: fastbn vs PyTorch against float64 on the same data.

``python -m bench.accuracy`` prints the Markdown table quoted in README.  The
error is max-abs error over max-abs value of a float64 computation
(``fastbn.reference`` on ``x.astype(float64)``).  PyTorch columns need torch.
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


if __name__ == "__main__":
    main()
