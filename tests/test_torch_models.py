"""fastbn.torch.convert() on the models people write, against the unconverted model.

A torchvision-style ResNet (BasicBlock and Bottleneck, ``nn.ReLU(inplace=True)``
right after batch norm, ``out += identity``), written here because torchvision
is not a dependency; in NCHW and channels_last, float32 and float64, through
fastbn's kernels and through the small-input path (PyTorch's kernels, guarded).
Then what a training script does with a model: train/eval switching, deepcopy,
torch.save/torch.load of the whole model, its state_dict in the unconverted
model, torch.compile.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch bridge tests need torch")
fbt = pytest.importorskip("fastbn.torch")
nn = torch.nn

#: One training step's gradients (float32) and three SGD steps' parameters (float64).
GRAD_TOL = {torch.float32: 1e-4, torch.float64: 1e-9}
PARAM_TOL_F64 = 1e-9


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, c_in, width, stride=1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                            nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNet(nn.Module):
    """Stem, two BasicBlocks, two Bottlenecks, pooling and a BatchNorm1d head."""

    def __init__(self, width=8, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        self.layer1 = nn.Sequential(BasicBlock(width, width), BasicBlock(width, 2 * width, 2))
        self.layer2 = nn.Sequential(Bottleneck(2 * width, width, 2), Bottleneck(4 * width, width))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Linear(4 * width, 16), nn.BatchNorm1d(16),
                                  nn.ReLU(inplace=True), nn.Linear(16, classes))

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.head(torch.flatten(self.pool(x), 1))


def _resnet(dtype=torch.float32, channels_last=False, seed=0):
    torch.manual_seed(seed)
    model = ResNet().to(dtype)
    with torch.no_grad():  # non-trivial affine parameters
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _batch(dtype, channels_last, seed=1, n=8, size=12):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, 3, size, size, generator=g, dtype=dtype) * 2 + 1)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 5, (n,), generator=g)


def _assert_close(a, b, tol, what=""):
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1.0)
    err = float((a - b).abs().max())
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


def _bn_modules(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.fixture(params=["fastbn-kernels", "small-input-path"])
def path(request, monkeypatch):
    """Every batch norm through fastbn's kernels, or every one below TORCH_BELOW."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 0 if request.param == "fastbn-kernels" else 1 << 40)
    return request.param


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_resnet_training_matches_torch_nn(path, dtype, channels_last):
    ref = _resnet(dtype, channels_last)
    model = fbt.convert(copy.deepcopy(ref))
    assert len(_bn_modules(model)) == 14
    assert all(type(m).__module__ == "fastbn.torch" for m in _bn_modules(model))
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, model)]
    steps = 3 if dtype == torch.float64 else 1
    layouts = []  # the layout survives the converted modules
    model.stem[1].register_forward_hook(lambda m, args, y: layouts.append(
        y.is_contiguous(memory_format=torch.channels_last)))
    for step in range(steps):
        x, labels = _batch(dtype, channels_last, seed=step + 1)
        for m, opt in zip((ref, model), opts, strict=True):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), labels).backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            _assert_close(p.grad, q.grad, GRAD_TOL[dtype], f"step {step} grad {name}")
        for opt in opts:
            opt.step()
    assert layouts == [channels_last] * steps
    if dtype == torch.float64:
        for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
            _assert_close(p, q, PARAM_TOL_F64, f"parameter {name} after 3 steps")
    for a, b in zip(_bn_modules(model), _bn_modules(ref), strict=True):
        _assert_close(a.running_mean, b.running_mean, GRAD_TOL[dtype], "running_mean")
        _assert_close(a.running_var, b.running_var, GRAD_TOL[dtype], "running_var")
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == steps


def test_inplace_relu_after_batch_norm_in_channels_last(path):
    """The issue's repro: the output of the autograd Function must not be a view."""
    model = fbt.convert(nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16),
                                      nn.ReLU(inplace=True)))
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 10, 10).contiguous(memory_format=torch.channels_last)
    y = model[1](model[0](x))
    assert y._base is None and y.is_contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    assert model[0].weight.grad is not None
    model.eval()
    with torch.no_grad():  # eval mode's output too
        assert model[1](model[0](x))._base is None


def test_train_eval_switching(path):
    ref = _resnet()
    model = fbt.convert(copy.deepcopy(ref))
    x, _ = _batch(torch.float32, False)
    for mode in ("train", "eval", "train", "eval"):
        for m in (ref, model):
            getattr(m, mode)()
        with torch.no_grad():
            _assert_close(model(x), ref(x), 1e-5, mode)
        assert all(m.training == (mode == "train") for m in _bn_modules(model))
    for a, b in zip(_bn_modules(model), _bn_modules(ref), strict=True):
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 2


def _assert_compiled_step_matches(compiled, model, ref, x):
    """One training step of ``compiled`` (wrapping ``model``) against eager ``ref``:
    outputs, parameter gradients, running variance, one batch counted."""
    out, out_ref = compiled(x), ref(x)
    _assert_close(out, out_ref, 1e-5, "output")
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        _assert_close(p.grad, q.grad, 1e-4, f"grad {name}")
    for a, b in zip(_bn_modules(model), _bn_modules(ref), strict=True):
        _assert_close(a.running_var, b.running_var, 1e-5, "running_var")
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == 1


def _nan_batch_leaves_stats(model, x):
    """A NaN batch leaves every running statistic of ``model`` as it was (the guard)."""
    before = [(m.running_mean.clone(), m.running_var.clone(), int(m.num_batches_tracked))
              for m in _bn_modules(model)]
    x = x.clone()
    x[0, 0, 0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with torch.no_grad():
            model.train()(x)
    for m, (mean, var, tracked) in zip(_bn_modules(model), before, strict=True):
        assert torch.equal(m.running_mean, mean) and torch.equal(m.running_var, var)
        assert int(m.num_batches_tracked) == tracked


def test_deepcopy_is_an_independent_working_model(path):
    model = fbt.convert(_resnet())
    x, _ = _batch(torch.float32, False)
    model(x)  # caches the small-input guard's views of the buffers
    clone = copy.deepcopy(model)
    assert all(type(a) is type(b) for a, b in zip(clone.modules(), model.modules(), strict=True))
    model.eval(), clone.eval()
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    # The copy's guard protects the copy's buffers, and the original is untouched.
    originals = [m.running_mean.clone() for m in _bn_modules(model)]
    _nan_batch_leaves_stats(clone, x)
    clone.train()(x)
    assert all(torch.equal(m.running_mean, r) for m, r in zip(_bn_modules(model), originals,
                                                              strict=True))
    assert not torch.equal(_bn_modules(clone)[0].running_mean, originals[0])


def test_torch_save_and_load_of_the_whole_model(path):
    model = fbt.convert(_resnet())
    x, labels = _batch(torch.float32, False)
    model(x)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert all(type(a) is type(b) for a, b in zip(loaded.modules(), model.modules(), strict=True))
    assert "_fastbn_guard" not in vars(_bn_modules(loaded)[0])  # no cached views pickled
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    _nan_batch_leaves_stats(loaded, x)
    nn.functional.cross_entropy(loaded.train()(x), labels).backward()
    assert all(p.grad is not None for p in loaded.parameters())


def test_state_dict_loads_into_the_unconverted_model(path):
    model = fbt.convert(_resnet(seed=3))
    for seed in (1, 2):
        model(_batch(torch.float32, False, seed=seed)[0])
    plain = _resnet(seed=4)
    plain.load_state_dict(model.state_dict())
    assert all(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in _bn_modules(plain))
    model.eval(), plain.eval()
    x, _ = _batch(torch.float32, False, seed=5)
    with torch.no_grad():
        _assert_close(model(x), plain(x), 1e-5, "eval output")


def test_guard_cache_follows_replaced_and_moved_buffers(monkeypatch):
    """The small path's cached NumPy views are rebuilt when a buffer changes under them."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 1 << 40)
    module = fbt.BatchNorm1d(4)
    x = torch.randn(8, 4)
    module(x)
    module.to(torch.float64)  # replaces the buffers
    x = x.double()
    module(x)
    bad = x.clone()
    bad[0, 0] = float("inf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        before = module.running_mean.clone()
        module(bad)
        assert torch.equal(module.running_mean, before)
        module.running_mean.data = torch.zeros(4, dtype=torch.float64)  # memory moves
        module(bad)
        assert torch.equal(module.running_mean, torch.zeros(4, dtype=torch.float64))
    ref = torch.nn.BatchNorm1d(4, dtype=torch.float64)
    ref.load_state_dict(module.state_dict())
    module(x), ref(x)
    assert torch.equal(module.running_mean, ref.running_mean)
    # Written between steps (load_state_dict, reset): the backup follows the new values.
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    state["running_mean"] += 3.0
    module.load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        module(bad)
    assert torch.equal(module.running_mean, state["running_mean"])
    assert int(module.num_batches_tracked) == int(state["num_batches_tracked"])
    module.reset_running_stats()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        module(bad)
    assert torch.equal(module.running_var, torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_buffers_keep_the_guard(monkeypatch, dtype):
    """Running statistics NumPy cannot view take the torch-ops guard."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 1 << 40)
    module, ref = fbt.BatchNorm1d(4).to(dtype), torch.nn.BatchNorm1d(4).to(dtype)
    x = torch.randn(8, 4).to(dtype)
    module(x), ref(x)
    assert torch.equal(module.running_var, ref.running_var)
    before = module.running_mean.clone()
    bad = x.clone()
    bad[0, 0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        module(bad).sum()
    assert torch.equal(module.running_mean, before)
    assert int(module.num_batches_tracked) == 1


def _tiny_residual(channels_last):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                          nn.ReLU(inplace=True), BasicBlock(8, 8), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 3))
    return model.to(memory_format=torch.channels_last) if channels_last else model


@pytest.mark.parametrize("compile_with", ["torch", "fastbn"])
def test_torch_compile_of_converted_model_matches_eager(monkeypatch, compile_with):
    """inductor on a tiny residual model: outputs, gradients and running statistics equal
    the eager unconverted model's; a NaN batch leaves the running statistics."""
    monkeypatch.setattr(fbt, "COMPILE_WITH", compile_with)
    torch._dynamo.reset()
    ref = _tiny_residual(channels_last=True)
    model = fbt.convert(copy.deepcopy(ref))
    compiled = torch.compile(model)
    x = torch.randn(4, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    _assert_compiled_step_matches(compiled, model, ref, x)
    _nan_batch_leaves_stats(compiled, x)
