"""fastbn.torch against torch.nn: module level, a small CNN's and a ResNet-18's training step.

    python -m bench.torch_bench                       # part of `make bench` (after the main grid)
    python -m bench.torch_bench --only resnet         # just the ResNet-18 section
    python -m bench.torch_bench --only resnet --resnet-dtype float32

1. Module level: ``fbt.BatchNorm{1,2}d`` against ``torch.nn.BatchNorm{1,2}d``,
   training-mode forward plus autograd backward through the module API, on
   ``(32, 64, 56, 56)`` contiguous and channels-last (fastbn's kernels) and on
   the small sizes below ``fastbn.torch.TORCH_BELOW`` (PyTorch's kernels plus
   fastbn's guard of the running statistics: must not be slower than torch.nn);
   ``(64, 256)`` is also timed with fastbn's path forced.  Interleaved samples,
   medians, float32.
2. End to end: one SGD training step (forward, loss, backward, optimizer) of a
   small CNN (Conv-BN-ReLU x 3, pooling, Linear) on a ``(32, 3, 64, 64)``
   batch, before and after :func:`fastbn.torch.convert`, and the same step
   with every batch norm replaced by ``Identity`` to estimate the share of the
   step spent in batch norm.  Run under the threading layer in use (tbb by
   default); ``NUMBA_THREADING_LAYER=omp`` shows the oversubscription of two
   spinning OpenMP pools (torch's and Numba's) on the same cores.
3. A CIFAR ResNet-18 training step (BasicBlock [2, 2, 2, 2], widths 32-256,
   batch 32, 32x32, NCHW) in eager mode, after ``convert``, after
   ``fuse(convert(model))`` (batch norm + ReLU and batch norm + add + ReLU as
   fastbn's fused kernels), under ``torch.compile``, ``torch.compile(convert(model))``
   and ``torch.compile(fuse(convert(model)))`` (and ``compile(convert)`` with
   ``fastbn.torch.COMPILE_WITH = "fastbn"``, fastbn's opaque op, which is what
   the default is measured against), in float32 and under
   ``torch.autocast("cpu", dtype=torch.bfloat16)``; and the eager step with every
   batch norm an ``Identity``, the ceiling of any batch-norm speed-up.  Compiling takes minutes
   on two cores; the compiled models are warmed up before timing.
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
             torch.contiguous_format),
            ("BatchNorm1d (128, 512)", (128, 512), torch.nn.BatchNorm1d, fbt.BatchNorm1d,
             torch.contiguous_format),
            ("BatchNorm2d (32, 64, 8, 8)", (32, 64, 8, 8), torch.nn.BatchNorm2d,
             fbt.BatchNorm2d, torch.contiguous_format)):
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        dy = torch.randn(shape).contiguous(memory_format=fmt)

        def step(module, x=x, dy=dy):
            x.grad = None
            module.zero_grad(set_to_none=True)
            module(x).backward(dy)

        cases.append((label, step, torch_cls(shape[1]), fast_cls(shape[1])))
        if shape == (64, 256):  # below TORCH_BELOW: also show what fastbn's own path costs
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


def _training_step(torch, model, x, labels, params=None, autocast=None):
    """One SGD step of ``model`` (``params``: the parameters, when ``model`` is a compiled
    wrapper); the forward and the loss under ``autocast`` (a dtype) when given."""
    optimizer = torch.optim.SGD(model.parameters() if params is None else params, lr=0.01,
                                momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        if autocast is None:
            loss = loss_fn(model(x), labels)
        else:
            with torch.autocast("cpu", dtype=autocast):
                loss = loss_fn(model(x), labels)
        loss.backward()
        optimizer.step()

    return step


def _resnet18(torch, width=32, classes=10):
    """CIFAR ResNet-18: 3x3 stem, BasicBlock [2, 2, 2, 2], widths width * (1, 2, 4, 8),
    torchvision's block (``ReLU(inplace=True)``, ``out += identity``)."""
    nn = torch.nn

    class BasicBlock(nn.Module):
        def __init__(self, c_in, c_out, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(c_out)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(c_out)
            self.relu = nn.ReLU(inplace=True)
            self.shortcut = nn.Sequential()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                              nn.BatchNorm2d(c_out))

        def forward(self, x):
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            out += self.shortcut(x)
            return self.relu(out)

    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
              nn.ReLU(inplace=True)]
    c_in = width
    for i, c_out in enumerate(width * k for k in (1, 2, 4, 8)):
        stride = 1 if i == 0 else 2
        layers += [BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, classes)]
    return nn.Sequential(*layers)


def _without_batch_norm(torch, model):
    """``model`` with every batch norm an ``Identity`` (in place)."""
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
                setattr(module, name, torch.nn.Identity())
    return model


def _resnet_section(torch, fbt, repeats, dtype_names, compiled=True):
    """ResNet-18 training step: eager, convert, fuse(convert), compile, compile(convert)
    (both ways), compile(fuse(convert)); ``compiled=False``: the eager ones only."""
    x = torch.randn(32, 3, 32, 32)
    labels = torch.randint(0, 10, (32,))
    saved = fbt.COMPILE_WITH
    for dtype_name in dtype_names:
        torch._dynamo.reset()  # compiled code of earlier models would count to its limits
        autocast = torch.bfloat16 if dtype_name == "bf16-autocast" else None
        torch.manual_seed(0)
        base = _resnet18(torch)
        models = {"eager torch.nn": copy.deepcopy(base),
                  "eager convert": fbt.convert(copy.deepcopy(base)),
                  "eager fuse(convert)": fbt.fuse(fbt.convert(copy.deepcopy(base))),
                  # The ceiling of anything done to batch norm: the step without it
                  # (convolutions, ReLUs, adds, pooling, the head, the optimizer).
                  "eager, no batch norm": _without_batch_norm(torch, copy.deepcopy(base)),
                  "compile": copy.deepcopy(base),
                  "compile(convert)": fbt.convert(copy.deepcopy(base)),
                  "compile(fuse(convert))": fbt.fuse(fbt.convert(copy.deepcopy(base))),
                  "compile(convert), opaque op": fbt.convert(copy.deepcopy(base))}
        if not compiled:
            models = {k: v for k, v in models.items() if not k.startswith("compile")}
        steps = {}
        for name, model in models.items():
            runner = model
            if name.startswith("compile"):
                runner = torch.compile(model)
            steps[name] = _training_step(torch, runner, x, labels, model.parameters(),
                                         autocast)
        for name, step in steps.items():  # compile (and warm up) each before timing
            fbt.COMPILE_WITH = "fastbn" if name.endswith("opaque op") else "torch"
            try:
                for _ in range(3):
                    step()
            finally:
                fbt.COMPILE_WITH = saved

        def with_mode(name, step):
            if not name.endswith("opaque op"):
                return step

            def opaque():  # a guard of the compiled code: its graph is kept per mode
                fbt.COMPILE_WITH = "fastbn"
                try:
                    step()
                finally:
                    fbt.COMPILE_WITH = saved
            return opaque

        t = interleaved({n: with_mode(n, s) for n, s in steps.items()}, repeats, target_s=0.05)
        med = {name: t[name]["median"] for name in steps}
        print(f"\nCIFAR ResNet-18 training step (32, 3, 32, 32), {dtype_name}, NCHW:")
        pairs = {"eager convert": "eager torch.nn", "eager fuse(convert)": "eager torch.nn",
                 "eager, no batch norm": "eager torch.nn",
                 "compile(convert)": "compile", "compile(fuse(convert))": "compile",
                 "compile(convert), opaque op": "compile"}
        for name in steps:
            vs = pairs.get(name)
            extra = (f"   {med[vs] / med[name]:.2f}x {vs}" if vs else "")
            print(f"  {name:<30} {fmt_time(med[name]):>10}{extra}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--only", choices=("modules", "cnn", "resnet"), action="append",
                        help="run only these sections (repeatable); default: all")
    parser.add_argument("--resnet-dtype", choices=("float32", "bf16-autocast"),
                        action="append", help="ResNet-18 section: default both")
    parser.add_argument("--no-compile", action="store_true",
                        help="ResNet-18 section: eager models only (compiling takes minutes)")
    args = parser.parse_args(argv)
    sections = set(args.only or ("modules", "cnn", "resnet"))
    import numba
    import torch

    import fastbn.torch as fbt

    torch.manual_seed(0)
    torch.set_num_threads(numba.get_num_threads())
    print(f"fastbn.torch vs torch.nn, float32, {torch.get_num_threads()} torch threads, "
          f"{numba.get_num_threads()} Numba threads; medians of {args.repeats}")
    if "modules" in sections:
        _modules_section(torch, fbt, args.repeats)
    if "cnn" in sections:
        _cnn_section(torch, fbt, args.repeats)
    if "resnet" in sections:
        _resnet_section(torch, fbt, max(args.repeats // 2, 5),
                        args.resnet_dtype or ("float32", "bf16-autocast"),
                        compiled=not args.no_compile)
    return 0


def _modules_section(torch, fbt, repeats):
    print(f"{'module, forward + autograd backward':<46} {'torch.nn':>10} {'fastbn':>10} "
          f"{'speed-up':>9}")
    for label, step, ref, fast in _module_cases(torch, fbt):
        fns = {"torch": lambda s=step, m=ref: s(m), "fastbn": lambda s=step, m=fast: s(m)}
        t = interleaved(fns, repeats, target_s=0.02)
        print(f"{label:<46} {fmt_time(t['torch']['median']):>10} "
              f"{fmt_time(t['fastbn']['median']):>10} "
              f"{t['torch']['median'] / t['fastbn']['median']:>8.2f}x")


def _cnn_section(torch, fbt, repeats):
    from fastbn import _config

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
    t = interleaved(steps, repeats, target_s=0.05)
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


if __name__ == "__main__":
    raise SystemExit(main())
