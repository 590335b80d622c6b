"""fastbn.torch.fuse (torch.fx) and the fused BatchNormReLU*d modules, against the unfused model.

Every ReLU and add spelling people write is fused and trains like the model it came
from (outputs, gradients of the input, the residual branch, weights and biases,
running statistics, num_batches_tracked, eval mode); state_dict keys do not change
and checkpoints load both ways; anything unsafe to fuse is left alone; an untraceable
model comes back unchanged with a warning.  Through fastbn's kernels
(``TORCH_BELOW = 0``) and through the small-input path (PyTorch's kernels).
"""

from __future__ import annotations

import copy
import io
import operator
import warnings

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch bridge tests need torch")
fbt = pytest.importorskip("fastbn.torch")

from tests.test_torch_models import (  # noqa: E402  (after the skip: they need torch)
    _assert_close,
    _assert_compiled_step_matches,
    _batch,
    _bn_modules,
    _nan_batch_leaves_stats,
    _resnet,
    _tiny_residual,
)

nn = torch.nn
F = nn.functional
FUSED = (fbt.BatchNormReLU1d, fbt.BatchNormReLU2d, fbt.BatchNormReLU3d)
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Correctness tests on tiny tensors: torch's OpenMP pool spinning against Numba's
    and the machine's other work made them 5-50x slower on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=["fastbn-kernels", "small-input-path"])
def path(request, monkeypatch):
    """Every batch norm through fastbn's kernels, or every one below TORCH_BELOW."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 0 if request.param == "fastbn-kernels" else 1 << 40)
    return request.param


def _fused(model):
    return [m for m in model.modules() if type(m) in FUSED]


def _iadd(out, r):
    out += r
    return out


def _relu_inplace_result_discarded(out):
    F.relu(out, inplace=True)
    return out


RELUS = {
    "nn.ReLU": lambda m, t: m.act(t),
    "nn.ReLU(inplace=True)": lambda m, t: m.act_(t),
    "F.relu": lambda m, t: F.relu(t),
    "F.relu(inplace=True)": lambda m, t: F.relu(t, inplace=True),
    "F.relu(t, True)": lambda m, t: F.relu(t, True),
    "F.relu_": lambda m, t: F.relu_(t),
    "torch.relu": lambda m, t: torch.relu(t),
    "torch.relu_": lambda m, t: torch.relu_(t),
    "Tensor.relu": lambda m, t: t.relu(),
    "Tensor.relu_": lambda m, t: t.relu_(),
}
ADDS = {
    "out + identity": operator.add,
    "identity + out": lambda out, r: r + out,
    "out += identity": _iadd,
    "torch.add(out, identity)": torch.add,
    "torch.add(identity, out)": lambda out, r: torch.add(r, out),
    "out.add(identity)": lambda out, r: out.add(r),
    "out.add_(identity)": lambda out, r: out.add_(r),
    "torch.add(out, identity, alpha=1)": lambda out, r: torch.add(out, r, alpha=1),
}


class Chain(nn.Module):
    """conv -> bn [-> add(skip(x))] -> relu, the add and ReLU spelled as asked."""

    def __init__(self, relu="nn.ReLU", add=None, channels=6):
        super().__init__()
        self.relu, self.add = relu, add
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.skip = nn.Conv2d(channels, channels, 1)  # the residual branch has weights too
        self.act, self.act_ = nn.ReLU(), nn.ReLU(inplace=True)
        with torch.no_grad():
            self.bn.weight.uniform_(0.5, 1.5)
            self.bn.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        out = self.bn(self.conv(x))
        if self.add is not None:
            out = ADDS[self.add](out, self.skip(x))
        return RELUS[self.relu](self, out)


class Spellings(nn.Module):
    """One :class:`Chain` per spelling, side by side: their outputs weighted and summed."""

    def __init__(self, relus, adds):
        super().__init__()
        self.chains = nn.ModuleList(Chain(r, a) for r in relus for a in adds)

    def forward(self, x):
        return sum((i + 1) * chain(x) for i, chain in enumerate(self.chains))


def _ops(graph_module):
    """How many add and ReLU nodes (any spelling) the graph has."""
    counts = {"add": 0, "relu": 0}
    for node in graph_module.graph.nodes:
        name = node.target if isinstance(node.target, str) else node.target.__name__
        if node.op == "call_module":
            name = type(graph_module.get_submodule(node.target)).__name__.lower()
        for op in counts:
            counts[op] += name.strip("_").removeprefix("i") == op or name == op
    return counts


def _check_training_parity(ref, fused, make_batch, steps=3, tol=1e-5, grad_tol=1e-4):
    """``steps`` SGD steps of both models: outputs, input gradients, parameter gradients,
    running statistics and num_batches_tracked agree; then eval mode."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (ref, fused)]
    for step in range(steps):
        x = make_batch(step)
        outs, grads = [], []
        for m, opt in zip((ref, fused), opts, strict=True):
            opt.zero_grad()
            xi = x.clone().requires_grad_()
            out = m(xi)
            (out * torch.linspace(-1, 2, out.numel()).view_as(out).to(out.dtype)).sum().backward()
            outs.append(out)
            grads.append(xi.grad)
        _assert_close(outs[1], outs[0], tol, f"step {step} output")
        _assert_close(grads[1], grads[0], grad_tol, f"step {step} input grad")
        for (name, p), q in zip(fused.named_parameters(), ref.parameters(), strict=True):
            if q.grad is None:  # a branch the model does not use
                assert p.grad is None, name
            else:
                _assert_close(p.grad, q.grad, grad_tol, f"step {step} grad {name}")
        for opt in opts:
            opt.step()
    for a, b in zip(_bn_modules(fused), _bn_modules(ref), strict=True):
        _assert_close(a.running_mean, b.running_mean, tol, "running_mean")
        _assert_close(a.running_var, b.running_var, tol, "running_var")
        assert int(a.num_batches_tracked) == int(b.num_batches_tracked) == steps
    fused.eval(), ref.eval()
    x = make_batch(steps)
    with torch.no_grad():
        _assert_close(fused(x), ref(x), tol, "eval output")
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref(xr).sum().backward()
    fused(xf).sum().backward()  # eval mode with autograd
    _assert_close(xf.grad, xr.grad, grad_tol, "eval input grad")
    fused.train(), ref.train()


def _chain_batch(step, shape=(4, 6, 7, 5), dtype=torch.float32):
    g = torch.Generator().manual_seed(step)
    return torch.randn(shape, generator=g, dtype=dtype) * 2 + 0.5


@pytest.mark.parametrize("adds", [[None], ["out + identity"]], ids=["bn-relu", "bn-add-relu"])
def test_every_relu_spelling_is_fused_and_trains_alike(path, adds):
    torch.manual_seed(0)
    ref = Spellings(list(RELUS), adds)
    fused = fbt.fuse(copy.deepcopy(ref))
    assert isinstance(fused, torch.fx.GraphModule)
    assert [type(m) for m in _fused(fused)] == [fbt.BatchNormReLU2d] * len(RELUS)
    assert _ops(fused) == {"add": len(RELUS), "relu": 0}  # the adds left are sum()'s
    _check_training_parity(ref, fused, _chain_batch)


def test_every_add_spelling_is_fused_and_trains_alike(path):
    torch.manual_seed(0)
    ref = Spellings(["nn.ReLU(inplace=True)", "F.relu"], list(ADDS))
    fused = fbt.fuse(copy.deepcopy(ref))
    assert [type(m) for m in _fused(fused)] == [fbt.BatchNormReLU2d] * (2 * len(ADDS))
    assert _ops(fused) == {"add": 2 * len(ADDS), "relu": 0}
    _check_training_parity(ref, fused, _chain_batch)


@pytest.mark.parametrize("kernels, dtype, channels_last, convert", [
    (True, torch.float32, False, True),
    (True, torch.float64, True, False),
    (False, torch.float32, True, True),
    pytest.param(True, torch.float32, True, False, marks=pytest.mark.slow),
    pytest.param(False, torch.float64, False, False, marks=pytest.mark.slow),
], ids=["fastbn-f32-nchw-convert", "fastbn-f64-channels_last", "small-f32-channels_last-convert",
        "fastbn-f32-channels_last", "small-f64-nchw"])
def test_resnet_trains_like_the_unfused_model(monkeypatch, kernels, dtype, channels_last,
                                              convert):
    """torchvision-style BasicBlocks and Bottlenecks (``nn.ReLU(inplace=True)``,
    ``out += identity``) and a BatchNorm1d head."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 0 if kernels else 1 << 40)
    ref = _resnet(dtype, channels_last)
    model = copy.deepcopy(ref)
    fused = fbt.fuse(fbt.convert(model) if convert else model)
    # stem, 4 bn1 + 2 bn2 (Bottleneck) with ReLU, 4 blocks' add, the head's BatchNorm1d
    assert len(_fused(fused)) == 12
    assert sum(type(m) is fbt.BatchNormReLU1d for m in fused.modules()) == 1
    assert len(_bn_modules(fused)) == 14
    fmt = torch.channels_last if channels_last else torch.contiguous_format

    def batch(step):
        return _batch(dtype, channels_last, seed=step + 1)[0].contiguous(memory_format=fmt)

    tol = TOL[dtype]  # float32: one step (then ReLU masks flip on rounding differences)
    steps = 3 if dtype == torch.float64 else 1
    _check_training_parity(ref, fused, batch, steps=steps, tol=tol * 10, grad_tol=tol * 10)


@pytest.mark.parametrize("cls, shape", [(fbt.BatchNormReLU1d, (16, 6)),
                                        (fbt.BatchNormReLU1d, (8, 6, 5)),
                                        (fbt.BatchNormReLU2d, (4, 6, 5, 3)),
                                        (fbt.BatchNormReLU3d, (3, 6, 2, 3, 4))])
@pytest.mark.parametrize("residual", [False, True])
def test_fused_module_matches_the_composition(path, cls, shape, residual):
    """``BatchNormReLU*d(x[, r])`` == ``relu(torch.nn.BatchNorm*d(x) [+ r])`` in float64:
    outputs, gradients of x, r, weight and bias, running statistics, num_batches_tracked
    over three steps, then eval mode; momentum 0.1 and None, affine=False,
    track_running_stats=False."""
    torch_cls = {fbt.BatchNormReLU1d: nn.BatchNorm1d, fbt.BatchNormReLU2d: nn.BatchNorm2d,
                 fbt.BatchNormReLU3d: nn.BatchNorm3d}[cls]
    for momentum, affine, track in ((0.1, True, True), (None, True, True), (0.1, False, True),
                                    (0.3, True, False)):
        kwargs = dict(momentum=momentum, affine=affine, track_running_stats=track,
                      dtype=torch.float64)
        ref, fused = torch_cls(6, **kwargs), cls(6, **kwargs)
        assert isinstance(fused, torch_cls)
        fused.load_state_dict(ref.state_dict())
        assert list(fused.state_dict()) == list(ref.state_dict())
        _check_composition(ref, fused, shape, residual, affine, track)


def _check_composition(ref, fused, shape, residual, affine, track):
    for step in range(4):
        if step == 3:
            ref.eval(), fused.eval()
        x = _chain_batch(step, shape, torch.float64)
        r = _chain_batch(step + 10, shape, torch.float64)
        dy = _chain_batch(step + 20, shape, torch.float64)
        xs = [x.clone().requires_grad_() for _ in range(2)]
        rs = [r.clone().requires_grad_() for _ in range(2)]
        y_ref = torch.relu(ref(xs[0]) + rs[0]) if residual else torch.relu(ref(xs[0]))
        y = fused(xs[1], rs[1]) if residual else fused(xs[1])
        _assert_close(y, y_ref, 1e-12, "output")
        (y_ref * dy).sum().backward()
        (y * dy).sum().backward()
        _assert_close(xs[1].grad, xs[0].grad, 1e-10, "x grad")
        if residual:
            _assert_close(rs[1].grad, rs[0].grad, 1e-12, "residual grad")
        if affine:
            for p, q in zip(fused.parameters(), ref.parameters(), strict=True):
                _assert_close(p.grad, q.grad, 1e-10, "parameter grad")
        if track:
            _assert_close(fused.running_mean, ref.running_mean, 1e-12, "running_mean")
            _assert_close(fused.running_var, ref.running_var, 1e-12, "running_var")
            assert int(fused.num_batches_tracked) == int(ref.num_batches_tracked)
        if not ref.training:
            with torch.no_grad():  # eval mode without autograd: fastbn's inference kernels
                y_ref = torch.relu(ref(x) + r) if residual else torch.relu(ref(x))
                _assert_close(fused(x, r) if residual else fused(x), y_ref, 1e-12, "no grad")


def test_state_dict_keys_stay_and_checkpoints_load_both_ways():
    model = _resnet(seed=3)
    fused = fbt.fuse(model)
    assert list(fused.state_dict()) == list(model.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert all(p is q for p, q in zip(fused.parameters(), model.parameters(), strict=True))
    for seed in (1, 2):  # train the fused model: the checkpoint goes to a plain model
        fused(_batch(torch.float32, False, seed=seed)[0])
    plain = _resnet(seed=4)
    plain.load_state_dict(fused.state_dict())
    fresh = fbt.fuse(_resnet(seed=5))  # and a plain model's checkpoint to a fused one
    fresh.load_state_dict(plain.state_dict())
    x, _ = _batch(torch.float32, False, seed=6)
    for m in (fused, plain, fresh):
        m.eval()
    with torch.no_grad():
        _assert_close(fused(x), plain(x), 1e-5, "plain model, fused checkpoint")
        _assert_close(fresh(x), plain(x), 1e-5, "fused model, plain checkpoint")
    buffer = io.BytesIO()
    torch.save(fused.state_dict(), buffer)
    buffer.seek(0)
    plain.load_state_dict(torch.load(buffer))


def test_optimizer_of_the_original_model_trains_the_fused_one():
    model = _resnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fused = fbt.fuse(model)
    before = fused.stem[0].weight.detach().clone()
    x, labels = _batch(torch.float32, False)
    F.cross_entropy(fused(x), labels).backward()
    opt.step()
    assert not torch.equal(fused.stem[0].weight, before)
    assert fused.stem[0].weight is model.stem[0].weight


def test_the_original_model_is_left_as_it_was():
    model = _resnet()
    types = [type(m) for m in model.modules()]
    attributes = set(vars(model))
    ref = copy.deepcopy(model)
    fused = fbt.fuse(model)
    assert fused is not model
    assert [type(m) for m in model.modules()] == types
    assert set(vars(model)) == attributes
    x, _ = _batch(torch.float32, False)
    model.eval(), ref.eval()
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))


class _TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        out = self.bn(x)
        return torch.relu(out), out  # bn's output is needed unrectified


class _AddTwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        s = self.bn(x) + x
        return torch.relu(s) * s.mean()


class _AddIntoResidual(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        identity = x * 2
        identity.add_(self.bn(x))  # writes the residual, not bn's output
        return torch.relu(identity)


class _Activation(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(6), act

    def forward(self, x):
        return self.act(self.bn(x) + x)


class _SharedBatchNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(self.bn(x)) + self.bn(x * 2)


class _Alpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        return torch.relu(torch.add(self.bn(x), x, alpha=2)) + torch.relu(self.bn(x) + 1.0)


class _MyBatchNorm(nn.BatchNorm2d):
    pass


class _SubclassAndSync(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn1, self.bn2 = _MyBatchNorm(6), nn.SyncBatchNorm(6)

    def forward(self, x):
        return torch.relu(self.bn1(x)) + torch.relu(self.bn2(x))


@pytest.mark.parametrize("make", [
    _TwoUsers, _AddTwoUsers, _AddIntoResidual, _SharedBatchNorm, _Alpha,
    lambda: _Activation(nn.ReLU6()), lambda: _Activation(nn.LeakyReLU()),
    lambda: _Activation(F.gelu), lambda: _Activation(torch.sigmoid),
], ids=["bn-two-users", "add-two-users", "add-into-residual", "bn-called-twice",
        "alpha-or-scalar", "relu6", "leaky-relu", "gelu", "sigmoid"])
def test_unsafe_or_other_chains_are_left_alone(make):
    torch.manual_seed(0)
    model = make()
    ref = copy.deepcopy(model)
    fused = fbt.fuse(model)
    assert not _fused(fused)
    x = _chain_batch(0)
    out, out_ref = fused(x.clone()), ref(x.clone())
    for a, b in zip(out if isinstance(out, tuple) else (out,),
                    out_ref if isinstance(out_ref, tuple) else (out_ref,), strict=True):
        _assert_close(a, b, 1e-6, "output")


def test_subclasses_sync_batch_norm_and_hooked_batch_norms_are_left_alone():
    model = _SubclassAndSync()
    assert not _fused(fbt.fuse(model))
    chain = Chain("torch.relu")
    chain.bn.register_forward_hook(lambda m, args, out: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to fuse: no warning
        assert not _fused(fbt.fuse(chain))
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    assert fbt.fuse(plain) is plain  # no batch norm at all: the model itself


def test_fused_twice_is_fused_once_and_fused_modules_stay():
    fused = fbt.fuse(_resnet())
    again = fbt.fuse(fused)
    assert len(_fused(again)) == len(_fused(fused)) == 12
    assert list(again.state_dict()) == list(fused.state_dict())


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent Python control flow
            return torch.relu(self.bn(x))
        return self.bn(x)


class _ModeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x):
        if self.training:
            x = x * 0.5
        return torch.relu(self.bn(x))


def test_untraceable_model_comes_back_unchanged_with_a_warning():
    model = _DataDependent()
    with pytest.warns(UserWarning, match=r"fuse: _DataDependent returned unchanged: torch\.fx "
                                         r"cannot trace it \(TraceError: .*"):
        assert fbt.fuse(model) is model
    assert set(vars(model)) == set(vars(_DataDependent()))
    model = _ModeDependent()
    with pytest.warns(UserWarning, match="differs between train.. and eval"):
        assert fbt.fuse(model) is model
    compiled = torch.compile(_resnet())
    with pytest.warns(UserWarning, match="torch.compile"):
        assert fbt.fuse(compiled) is compiled


def test_residual_of_another_shape_dtype_or_layout_runs_the_composition(path):
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.bn2, self.bn3 = nn.BatchNorm2d(6), nn.BatchNorm2d(6), nn.BatchNorm2d(6)

        def forward(self, x):
            a = torch.relu(self.bn1(x) + x.mean((2, 3), keepdim=True))  # broadcast
            b = torch.relu(self.bn2(x) + x.double())  # promotes to float64
            c = self.bn3(x)
            c += x.contiguous(memory_format=torch.channels_last)  # another layout
            return a.sum() + b.sum() + torch.relu(c).sum()

    torch.manual_seed(0)
    ref = Odd()
    fused = fbt.fuse(copy.deepcopy(ref))
    assert len(_fused(fused)) == 3
    _check_training_parity(ref, fused, _chain_batch)


def test_nan_batch_leaves_the_running_statistics(path):
    fused = fbt.fuse(fbt.convert(_resnet()))
    x, _ = _batch(torch.float32, False)
    _nan_batch_leaves_stats(fused, x)


def test_deepcopy_pickle_and_container_calls():
    fused = fbt.fuse(_resnet())
    x, labels = _batch(torch.float32, False)
    fused(x)
    clone = copy.deepcopy(fused)
    assert list(clone.state_dict()) == list(fused.state_dict())
    assert [type(m) for m in clone.modules()][1:] == [type(m) for m in fused.modules()][1:]
    buffer = io.BytesIO()
    torch.save(fused, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert list(loaded.state_dict()) == list(fused.state_dict())
    for m in (fused, clone, loaded):
        m.eval()
    with torch.no_grad():
        assert torch.equal(clone(x), fused(x)) and torch.equal(loaded(x), fused(x))
    # A container whose batch norm now includes the ReLU/add after it refuses to run alone;
    # the model given to fuse() still runs.
    with pytest.raises(RuntimeError, match="container inside the GraphModule"):
        fused.layer1(x)
    assert fused.head[0] is not None and isinstance(fused.layer1, nn.Sequential)


def test_tensor_constants_do_not_enter_the_state_dict():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(6)

        def forward(self, x):
            return torch.relu(self.bn(x * torch.tensor(2.0)))

    model = Scaled()
    fused = fbt.fuse(model)
    assert len(_fused(fused)) == 1
    assert list(fused.state_dict()) == list(model.state_dict())
    assert set(vars(model)) == set(vars(Scaled()))  # the tracer's constant was taken off it
    x = _chain_batch(0)
    _assert_close(fused(x), model(x), 1e-5, "output")


@pytest.mark.parametrize("how", ["autocast", "module.to(bfloat16)"])
def test_bfloat16_runs_and_is_as_close_as_unfused_bfloat16(monkeypatch, how):
    """fastbn's kernels in bfloat16 (autocast: bfloat16 data, float32 parameters; or a
    bfloat16 model): the fused model is as close to float32 as the unfused one in
    bfloat16 (fastbn rounds once where PyTorch rounds after each op)."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 0)
    ref = _tiny_residual(channels_last=False)
    unfused, fused = copy.deepcopy(ref), fbt.fuse(fbt.convert(copy.deepcopy(ref)))
    assert len(_fused(fused)) == 3
    x = _chain_batch(0, (8, 3, 10, 10))
    labels = torch.arange(8) % 3

    def run(model, bf16):
        if bf16 and how == "autocast":
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
        elif bf16:
            model.to(torch.bfloat16)
            out = model(x.to(torch.bfloat16))
        else:
            out = model(x)
        assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
        F.cross_entropy(out.float(), labels).backward()
        return out.float(), [p.grad.float() for p in model.parameters()]

    out_ref, grads_ref = run(ref, False)
    out_unfused, grads_unfused = run(unfused, True)
    out_fused, grads_fused = run(fused, True)

    def error(a, b):
        return float((a - b).norm() / b.norm())

    out_ref, out_unfused, out_fused = (t.detach() for t in (out_ref, out_unfused, out_fused))

    assert error(out_fused, out_ref) <= 2 * error(out_unfused, out_ref) + 1e-2
    for g_fused, g_unfused, g_ref in zip(grads_fused, grads_unfused, grads_ref, strict=True):
        assert error(g_fused, g_ref) <= 2 * error(g_unfused, g_ref) + 2e-2


def test_double_backward_and_inplace_change_of_the_output_raise(monkeypatch):
    monkeypatch.setattr(fbt, "TORCH_BELOW", 0)
    m = fbt.BatchNormReLU2d(6)
    x, r = _chain_batch(0).requires_grad_(), _chain_batch(1).requires_grad_()
    for args in ((x,), (x, r)):
        with pytest.raises(RuntimeError, match="double backward"):
            (g,) = torch.autograd.grad(m(*args).square().sum(), x, create_graph=True)
            g.sum().backward()
    y = m(x, r)
    y.mul_(2)  # the ReLU mask comes from y: like torch.relu, an in-place change is caught
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_torch_compile_of_fused_converted_model_matches_eager():
    """inductor on a tiny residual model: outputs, gradients, running statistics."""
    torch._dynamo.reset()
    ref = _tiny_residual(channels_last=False)
    model = fbt.fuse(fbt.convert(copy.deepcopy(ref)))
    assert len(_fused(model)) == 3
    compiled = torch.compile(model)
    _assert_compiled_step_matches(compiled, model, ref, torch.randn(4, 3, 8, 8))


def test_fused_model_compiles_without_graph_breaks(monkeypatch):
    """fullgraph=True (aot_eager: fast), with PyTorch's batch norm and with fastbn's
    opaque op (COMPILE_WITH="fastbn") before the add and ReLU."""
    ref = _tiny_residual(channels_last=False)
    x = torch.randn(4, 3, 8, 8)
    for compile_with in ("torch", "fastbn"):
        monkeypatch.setattr(fbt, "COMPILE_WITH", compile_with)
        torch._dynamo.reset()
        model = fbt.fuse(fbt.convert(copy.deepcopy(ref)))
        out = torch.compile(model, backend="aot_eager", fullgraph=True)(x)
        out.sum().backward()
        _assert_close(out, copy.deepcopy(ref)(x), 1e-5, f"output, {compile_with}")


def test_convert_sync_batchnorm_refuses_fused_modules_instead_of_dropping_the_relu():
    fused = fbt.fuse(Chain(add="out + identity"))
    assert _fused(fused)
    with pytest.raises(ValueError, match="convert_sync_batchnorm on the model first"):
        fbt.SyncBatchNorm.convert_sync_batchnorm(fused)
    # the documented order: sync first, then fuse (SyncBatchNorm stays unfused)
    synced = fbt.SyncBatchNorm.convert_sync_batchnorm(Chain(add="out + identity"))
    assert isinstance(synced.bn, fbt.SyncBatchNorm)
