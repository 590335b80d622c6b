"""fastbn.torch against torch.nn: module level and a small CNN's training step.

    python -m bench.torch_bench              # part of `make bench` (after the main grid)

1. Module level: ``fbt.BatchNorm{1,2}d`` against ``torch.nn.BatchNorm{1,2}d``,
   training-mode forward plus autograd backward through the module API, on
   ``(32, 64, 56, 56)`` contiguous and channels-last and ``BatchNorm1d``
   ``(64, 256)``; interleaved samples, medians, float32.  ``(64, 256)`` is below
   ``fastbn.torch.TORCH_BELOW`` (PyTorch's own kernels, guarded), so it is also
   timed with fastbn's path forced.
2. End to end: one SGD training step (forward, loss, backward, optimizer) of a
   small CNN (Conv-BN-ReLU x 3, pooling, Linear) on a ``(32, 3, 64, 64)``
   batch, before and after :func:`fastbn.torch.convert`, and the same step
   with every batch norm replaced by ``Identity`` to estimate the share of the
   step spent in batch norm.  Run under the threading layer in use (tbb by
   default); ``NUMBA_THREADING_LAYER=omp`` shows the oversubscription of two
   spinning OpenMP pools (torch's and Numba's) on the same cores.
"""

from __future__ import annotations

import argparse
import copy

from .cases import fmt_time, interleaved


def _module_cases(torch, fbt):
    cases = []
    for label, shape, torch_cls, fast_cls, fmt in (
            ("BatchNorm2d (32, 64, 56, 56)", (32, 64, 56, 56), torch.nn.BatchNorm2d,
             fbt.BatchNorm2d, torch.contiguous_format),
            ("BatchNorm2d (32, 64, 56, 56) channels_last", (32, 64, 56, 56),
             torch.nn.BatchNorm2d, fbt.BatchNorm2d, torch.channels_last),
            ("BatchNorm1d (64, 256)", (64, 256), torch.nn.BatchNorm1d, fbt.BatchNorm1d,
             torch.contiguous_format)):
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape).contiguous(memory_format=fmt)

        def step(module, x=x, dy=dy):
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(dy)

        cases.append((label, step, torch_cls(shape[1]), fast_cls(shape[1])))
        if x.numel() < fbt.TORCH_BELOW:  # small: also show what fastbn's own path costs
            def forced(module, s=step):
                saved, fbt.TORCH_BELOW = fbt.TORCH_BELOW, 0
                try:
                    s(module)
                finally:
                    fbt.TORCH_BELOW = saved

            cases.append((f"{label}, fastbn path forced", forced, torch_cls(shape[1]),
                          fast_cls(shape[1])))
    return cases


def _cnn(torch):
    def block(c_in, c_out):
        return [torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                torch.nn.BatchNorm2d(c_out), torch.nn.ReLU()]

    return torch.nn.Sequential(*block(3, 32), torch.nn.MaxPool2d(2), *block(32, 64),
                               torch.nn.MaxPool2d(2), *block(64, 64),
                               torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                               torch.nn.Linear(64, 10))


def _training_step(torch, model, x, labels):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x), labels).backward()
        optimizer.step()

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    import numba
    import torch

    import fastbn.torch as fbt
    from fastbn import _config

    torch.manual_seed(0)
    torch.set_num_threads(numba.get_num_threads())
    print(f"fastbn.torch vs torch.nn, float32, {torch.get_num_threads()} torch threads, "
          f"{numba.get_num_threads()} Numba threads; medians of {args.repeats}")
    print(f"{'module, forward + autograd backward':<46} {'torch.nn':>10} {'fastbn':>10} "
          f"{'speed-up':>9}")
    for label, step, ref, fast in _module_cases(torch, fbt):
        fns = {"torch": lambda s=step, m=ref: s(m), "fastbn": lambda s=step, m=fast: s(m)}
        t = interleaved(fns, args.repeats, target_s=0.02)
        print(f"{label:<46} {fmt_time(t['torch']['median']):>10} "
              f"{fmt_time(t['fastbn']['median']):>10} "
              f"{t['torch']['median'] / t['fastbn']['median']:>8.2f}x")

    x = torch.randn(32, 3, 64, 64)
    labels = torch.randint(0, 10, (32,))
    base = _cnn(torch)
    converted = fbt.convert(copy.deepcopy(base))
    no_bn = copy.deepcopy(base)
    for i, module in enumerate(no_bn):
        if isinstance(module, torch.nn.BatchNorm2d):
            no_bn[i] = torch.nn.Identity()
    steps = {name: _training_step(torch, model, x, labels)
             for name, model in (("torch.nn", base), ("fastbn.convert", converted),
                                 ("no batch norm", no_bn))}
    t = interleaved(steps, args.repeats, target_s=0.05)
    med = {name: t[name]["median"] for name in steps}
    layer = _config.threading_layer()
    print(f"\nsmall CNN training step (32, 3, 64, 64), Numba layer {layer}:")
    for name in ("torch.nn", "fastbn.convert"):
        share = (med[name] - med["no batch norm"]) / med[name]
        print(f"  {name:<16} {fmt_time(med[name]):>10}   batch norm ~{100 * share:.0f}% "
              f"of the step ({fmt_time(med[name] - med['no batch norm'])})")
    print(f"  {'no batch norm':<16} {fmt_time(med['no batch norm']):>10}")
    bn_torch = med["torch.nn"] - med["no batch norm"]
    bn_fast = max(med["fastbn.convert"] - med["no batch norm"], 1e-9)
    print(f"  end-to-end speed-up of convert(): {med['torch.nn'] / med['fastbn.convert']:.2f}x; "
          f"batch norm itself: {bn_torch / bn_fast:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
