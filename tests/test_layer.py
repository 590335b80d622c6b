"""fastbn.BatchNorm: PyTorch semantics, state handling, files, folding and every error path.

PyTorch (``torch.nn.BatchNorm1d/2d``) is the oracle where it is installed;
the tests that need it skip cleanly otherwise, and the tests below them check
the same semantics against NumPy formulas.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest

import fastbn
from fastbn import BatchNorm

# layout name -> (shape, axis); C = 4 everywhere
LAYOUTS = {
    "NC": ((8, 4), 1),
    "NCL": ((5, 4, 3), 1),
    "NCHW": ((3, 4, 3, 2), 1),
    "NHWC": ((3, 3, 2, 4), -1),
}
C = 4


def rtol_for(dtype) -> float:
    return 1e-10 if np.dtype(dtype) == np.float64 else 1e-5


def assert_close(actual, expected, dtype, what=""):
    """Relative to the largest magnitude of ``expected`` (zero entries are fine)."""
    expected = np.asarray(expected, dtype=np.float64)
    actual = np.asarray(actual)
    assert actual.shape == expected.shape, what
    tol = rtol_for(dtype)
    scale = max(float(np.abs(expected).max(initial=0.0)), 1e-30)
    np.testing.assert_allclose(actual.astype(np.float64), expected, rtol=tol, atol=tol * scale,
                               err_msg=what)


def data(rng, shape, dtype, offset=0.3, scale=1.5):
    return (rng.standard_normal(shape) * scale + offset).astype(dtype)


def snapshot(bn: BatchNorm) -> dict:
    """Everything a failed call must leave alone, as bytes (bitwise comparison)."""
    state = {}
    for name in ("weight", "bias", "running_mean", "running_var", "grad_weight", "grad_bias"):
        value = getattr(bn, name)
        state[name] = None if value is None else (value.dtype.str, value.tobytes())
    state["num_batches_tracked"] = bn.num_batches_tracked
    state["training"] = bn.training
    state["repr"] = repr(bn)
    state["ctx"] = id(bn._ctx)
    return state


def trained_layer(rng, dtype=np.float32, steps=3, **kwargs) -> BatchNorm:
    """A layer with non-trivial parameters, statistics, gradients and a backward context."""
    bn = BatchNorm(C, dtype=dtype, **kwargs)
    if bn.affine:
        bn.weight[...] = rng.uniform(0.5, 1.5, C)
        bn.bias[...] = rng.uniform(-0.5, 0.5, C)
    for _ in range(steps):
        x = data(rng, (6, C, 2), dtype)
        bn(x)
        bn.backward(data(rng, x.shape, dtype, offset=0.0, scale=1.0))
    return bn


# ---------------------------------------------------------------------------
# PyTorch parity
# ---------------------------------------------------------------------------


def torch_layer(torch, ndim, dtype, **kwargs):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}[ndim]
    tdtype = torch.float64 if np.dtype(dtype) == np.float64 else torch.float32
    return cls(C, dtype=tdtype, **kwargs)


def torch_step(torch, tbn, x, dy, axis, relu=False):
    """y, dx, grad_weight, grad_bias from torch; channels-last data is permuted in and out."""
    perm = axis == -1
    xt = torch.tensor(np.moveaxis(x, -1, 1) if perm else x, requires_grad=True)
    dyt = torch.tensor(np.moveaxis(dy, -1, 1) if perm else dy)
    if tbn.weight is not None:
        tbn.weight.grad = tbn.bias.grad = None
    yt = tbn(xt)
    if relu:
        yt = torch.relu(yt)
    yt.backward(dyt)
    y, dx = yt.detach().numpy(), xt.grad.numpy()
    if perm:
        y, dx = np.moveaxis(y, 1, -1), np.moveaxis(dx, 1, -1)
    gw = None if tbn.weight is None else tbn.weight.grad.numpy()
    gb = None if tbn.bias is None else tbn.bias.grad.numpy()
    return y, dx, gw, gb


def check_steps(torch, rng, bn, tbn, shape, axis, dtype, steps, relu=False, what=""):
    for step in range(steps):
        x = data(rng, shape, dtype)
        dy = data(rng, shape, dtype, offset=0.0, scale=1.0)
        y = bn(x)
        dx = bn.backward(dy)
        ty, tdx, tgw, tgb = torch_step(torch, tbn, x, dy, axis, relu)
        tag = f"{what} step {step}"
        assert y.dtype == dx.dtype == np.dtype(dtype)
        assert_close(y, ty, dtype, f"y {tag}")
        assert_close(dx, tdx, dtype, f"dx {tag}")
        if bn.affine:
            assert bn.grad_weight.dtype == np.dtype(dtype)
            assert_close(bn.grad_weight, tgw, dtype, f"grad_weight {tag}")
            assert_close(bn.grad_bias, tgb, dtype, f"grad_bias {tag}")


def check_running_stats(bn, tbn, dtype):
    if not bn.track_running_stats:
        assert bn.running_mean is None and bn.running_var is None
        assert bn.num_batches_tracked is None
        assert tbn.running_mean is None
        return
    assert bn.running_mean.dtype == bn.running_var.dtype == np.dtype(dtype)
    assert_close(bn.running_mean, tbn.running_mean.numpy(), dtype, "running_mean")
    assert_close(bn.running_var, tbn.running_var.numpy(), dtype, "running_var")
    assert bn.num_batches_tracked == int(tbn.num_batches_tracked)


def random_affine(torch, rng, bn, tbn):
    w, b = rng.uniform(0.5, 1.5, C), rng.uniform(-0.5, 0.5, C)
    bn.weight[...] = w
    bn.bias[...] = b
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor(w))
        tbn.bias.copy_(torch.tensor(b))


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_torch_parity_train_then_eval(rng, dtype, layout, momentum):
    torch = pytest.importorskip("torch")
    shape, axis = LAYOUTS[layout]
    bn = BatchNorm(C, momentum=momentum, axis=axis, dtype=dtype)
    tbn = torch_layer(torch, len(shape), dtype, momentum=momentum)
    random_affine(torch, rng, bn, tbn)
    check_steps(torch, rng, bn, tbn, shape, axis, dtype, steps=5, what="train")
    assert bn.num_batches_tracked == 5
    check_running_stats(bn, tbn, dtype)
    bn.eval()
    tbn.eval()
    check_steps(torch, rng, bn, tbn, shape, axis, dtype, steps=2, what="eval")
    check_running_stats(bn, tbn, dtype)  # eval mode changes nothing
    assert bn.num_batches_tracked == 5


@pytest.mark.parametrize("layout", ["NC", "NCHW", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_torch_parity_relu(rng, dtype, layout):
    torch = pytest.importorskip("torch")
    shape, axis = LAYOUTS[layout]
    bn = BatchNorm(C, axis=axis, relu=True, dtype=dtype)
    tbn = torch_layer(torch, len(shape), dtype)
    random_affine(torch, rng, bn, tbn)
    check_steps(torch, rng, bn, tbn, shape, axis, dtype, steps=3, relu=True, what="train")
    check_running_stats(bn, tbn, dtype)
    bn.eval()
    tbn.eval()
    check_steps(torch, rng, bn, tbn, shape, axis, dtype, steps=1, relu=True, what="eval")


@pytest.mark.parametrize("layout", ["NCL", "NHWC"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_torch_parity_affine_false(rng, dtype, layout):
    torch = pytest.importorskip("torch")
    shape, axis = LAYOUTS[layout]
    bn = BatchNorm(C, affine=False, axis=axis, dtype=dtype)
    tbn = torch_layer(torch, len(shape), dtype, affine=False)
    assert bn.weight is None and bn.bias is None
    assert bn.parameters() == [] and bn.gradients() == []
    check_steps(torch, rng, bn, tbn, shape, axis, dtype, steps=3, what="train")
    check_running_stats(bn, tbn, dtype)
    bn.eval()
    tbn.eval()
    check_steps(torch, rng, bn, tbn, shape, axis, dtype, steps=1, what="eval")


@pytest.mark.parametrize("layout", ["NC", "NCHW"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_torch_parity_no_running_stats(rng, dtype, layout):
    """track_running_stats=False: batch statistics in both modes, nothing tracked."""
    torch = pytest.importorskip("torch")
    shape, axis = LAYOUTS[layout]
    bn = BatchNorm(C, track_running_stats=False, axis=axis, dtype=dtype)
    tbn = torch_layer(torch, len(shape), dtype, track_running_stats=False)
    random_affine(torch, rng, bn, tbn)
    check_steps(torch, rng, bn, tbn, shape, axis, dtype, steps=2, what="train")
    check_running_stats(bn, tbn, dtype)
    bn.eval()
    tbn.eval()
    check_steps(torch, rng, bn, tbn, shape, axis, dtype, steps=2, what="eval")
    check_running_stats(bn, tbn, dtype)


@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_state_dict_keys_shapes_dtypes_match_torch(affine, track):
    torch = pytest.importorskip("torch")
    bn = BatchNorm(C, affine=affine, track_running_stats=track)
    tbn = torch.nn.BatchNorm2d(C, affine=affine, track_running_stats=track)
    ours = bn.state_dict()
    theirs = {k: v.numpy() for k, v in tbn.state_dict().items()}
    assert list(ours) == list(theirs)
    for key in theirs:
        assert ours[key].shape == theirs[key].shape, key
        assert ours[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(ours[key], theirs[key], err_msg=key)


@pytest.mark.parametrize("torch_dtype", ["float32", "float64"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_torch_state_dict_loads_and_gives_torch_eval_output(rng, dtype, torch_dtype):
    """A torch state dict converted with .numpy() loads as is (float64 <-> float32 cast)."""
    torch = pytest.importorskip("torch")
    tdtype = getattr(torch, torch_dtype)
    tbn = torch.nn.BatchNorm2d(C, momentum=0.3, dtype=tdtype)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, C)))
        tbn.bias.copy_(torch.tensor(rng.uniform(-0.5, 0.5, C)))
        for _ in range(4):
            tbn(torch.tensor(data(rng, (3, C, 4, 4), np.float64, offset=2.0, scale=3.0),
                             dtype=tdtype))
    tbn.eval()
    state = {k: v.numpy() for k, v in tbn.state_dict().items()}
    bn = BatchNorm(C, momentum=0.3, dtype=dtype)
    bn.load_state_dict(state)
    bn.eval()
    assert bn.num_batches_tracked == 4
    assert bn.running_var.dtype == np.dtype(dtype)
    x = data(rng, (2, C, 3, 3), dtype, offset=2.0, scale=3.0)
    with torch.no_grad():
        expected = tbn(torch.tensor(x, dtype=tdtype)).numpy()
    # a float32 source holds float32-rounded values: compare at float32 precision then
    tol_dtype = np.float64 if (dtype == np.float64 and torch_dtype == "float64") else np.float32
    assert_close(bn(x), expected, tol_dtype)
    # torch tensors themselves (CPU, no grad) go through np.asarray as well
    direct = BatchNorm(C, momentum=0.3, dtype=dtype).eval()
    direct.load_state_dict(tbn.state_dict())
    np.testing.assert_array_equal(direct(x), bn(x))


def test_batch_of_one_raises_like_torch(rng):
    torch = pytest.importorskip("torch")
    tbn = torch.nn.BatchNorm1d(C)
    x = data(rng, (1, C), np.float32)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tbn(torch.tensor(x))
    bn = trained_layer(rng)
    before = snapshot(bn)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(x)
    assert snapshot(bn) == before
    # (1, C, L) with L > 1 has L values per channel: fine in both
    tbn(torch.tensor(data(rng, (1, C, 3), np.float32)))
    bn(data(rng, (1, C, 3), np.float32))
    # eval mode with running statistics accepts a batch of one
    tbn.eval()
    bn.eval()
    tbn(torch.tensor(x))
    assert np.isfinite(bn(x)).all()
    # without running statistics eval mode uses batch statistics: a batch of one fails
    tbn = torch.nn.BatchNorm1d(C, track_running_stats=False).eval()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        tbn(torch.tensor(x))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm(C, track_running_stats=False).eval()(x)


# ---------------------------------------------------------------------------
# Semantics without torch (NumPy formulas)
# ---------------------------------------------------------------------------


def test_running_stats_formula_momentum(rng):
    bn = BatchNorm(C, momentum=0.25, dtype=np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    for _ in range(3):
        x = data(rng, (7, C, 3), np.float64)
        bn(x)
        mean = x.mean(axis=(0, 2))
        unbiased = x.var(axis=(0, 2), ddof=1)
        rm = 0.75 * rm + 0.25 * mean
        rv = 0.75 * rv + 0.25 * unbiased
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-12)
    assert bn.num_batches_tracked == 3


def test_running_stats_cumulative_average(rng):
    """momentum=None: the running statistics are the plain average over the batches."""
    bn = BatchNorm(C, momentum=None, dtype=np.float64)
    batches = [data(rng, (5, C), np.float64, offset=float(i)) for i in range(4)]
    for x in batches:
        bn(x)
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(0) for x in batches], axis=0),
                               rtol=1e-12)
    np.testing.assert_allclose(bn.running_var,
                               np.mean([x.var(0, ddof=1) for x in batches], axis=0), rtol=1e-12)
    assert bn.num_batches_tracked == 4


def test_training_output_uses_batch_stats_eval_uses_running(rng):
    bn = BatchNorm(C, dtype=np.float64)
    bn.running_mean[...] = [1.0, 2.0, 3.0, 4.0]
    bn.running_var[...] = [4.0, 1.0, 0.25, 9.0]
    bn.weight[...] = 2.0
    bn.bias[...] = 0.5
    x = data(rng, (6, C), np.float64)
    y = bn(x)
    expected = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * 2 + 0.5
    np.testing.assert_allclose(y, expected, rtol=1e-12)
    bn.eval()
    y = bn(x)
    rm, rv = bn.running_mean, bn.running_var
    np.testing.assert_allclose(y, (x - rm) / np.sqrt(rv + 1e-5) * 2 + 0.5, rtol=1e-12)
    # eval backward: statistics are constants
    dy = data(rng, x.shape, np.float64)
    dx = bn.backward(dy)
    np.testing.assert_allclose(dx, dy * 2 / np.sqrt(rv + 1e-5), rtol=1e-12)
    x_hat = (x - rm) / np.sqrt(rv + 1e-5)
    np.testing.assert_allclose(bn.grad_weight, (dy * x_hat).sum(0), rtol=1e-12)
    np.testing.assert_allclose(bn.grad_bias, dy.sum(0), rtol=1e-12)


def test_non_contiguous_input_matches_contiguous(rng):
    x = data(rng, (4, C, 5), np.float32)
    strided = np.asfortranarray(x)
    a, b = BatchNorm(C), BatchNorm(C)
    np.testing.assert_array_equal(a(x), b(strided))
    dy = data(rng, x.shape, np.float32)
    np.testing.assert_array_equal(a.backward(dy), b.backward(dy[:, :, ::-1][:, :, ::-1]))
    np.testing.assert_array_equal(a.running_var, b.running_var)


def test_any_rank_and_channels_last_3d(rng):
    """(N, C, D, H, W) and (N, D, H, W, C) behave alike (channels-last via axis=-1)."""
    x = data(rng, (2, C, 2, 3, 2), np.float64)
    first, last = BatchNorm(C, dtype=np.float64), BatchNorm(C, axis=-1, dtype=np.float64)
    y1 = first(x)
    y2 = last(np.ascontiguousarray(np.moveaxis(x, 1, -1)))
    np.testing.assert_allclose(np.moveaxis(y2, -1, 1), y1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(last.running_var, first.running_var, rtol=1e-12)


def test_list_input_is_accepted_when_dtype_matches():
    bn = BatchNorm(2, dtype=np.float64)
    y = bn([[1.0, 2.0], [3.0, 5.0]])
    np.testing.assert_allclose(y, [[-1, -1], [1, 1]], atol=1e-5)


# ---------------------------------------------------------------------------
# Backward: several calls, overwriting, snapshots
# ---------------------------------------------------------------------------


def test_several_backward_calls_per_forward_overwrite_gradients(rng):
    bn = BatchNorm(C, relu=True, dtype=np.float64)
    bn.weight[...] = rng.uniform(0.5, 1.5, C)
    bn.bias[...] = rng.uniform(-0.5, 0.5, C)
    x = data(rng, (6, C, 2), np.float64)
    dy = data(rng, x.shape, np.float64)
    bn(x)
    grads = bn.gradients()
    dx1 = bn.backward(dy)
    g1 = [g.copy() for g in grads]
    dx2 = bn.backward(dy)
    np.testing.assert_array_equal(dx1, dx2)
    for g, before in zip(bn.gradients(), g1, strict=True):
        np.testing.assert_array_equal(g, before)  # overwritten, not accumulated
    assert all(a is b for a, b in zip(bn.gradients(), grads, strict=True))  # same buffers
    dx3 = bn.backward(2 * dy)
    np.testing.assert_allclose(dx3, 2 * dx1, rtol=1e-12)
    np.testing.assert_allclose(bn.grad_bias, 2 * g1[1], rtol=1e-12)


def test_backward_uses_parameters_of_the_forward_call(rng):
    """An SGD update between forward and backward does not change the backward."""
    for dtype in (np.float32, np.float64):
        bn = BatchNorm(C, relu=True, dtype=dtype)
        bn.bias[...] = rng.uniform(-0.5, 0.5, C)
        x = data(rng, (6, C), dtype)
        dy = data(rng, x.shape, dtype)
        bn(x)
        dx = bn.backward(dy)
        expected = [g.copy() for g in bn.gradients()]
        for p in bn.parameters():
            p += 0.7  # the ReLU mask and dx depend on weight and bias
        np.testing.assert_array_equal(bn.backward(dy), dx)
        for g, e in zip(bn.gradients(), expected, strict=True):
            np.testing.assert_array_equal(g, e)


def test_backward_after_mode_switch_uses_the_forward_mode(rng):
    bn = trained_layer(rng, dtype=np.float64)
    x = data(rng, (5, C), np.float64)
    dy = data(rng, x.shape, np.float64)
    bn(x)  # training forward
    dx_train = bn.backward(dy)
    bn.eval()
    np.testing.assert_array_equal(bn.backward(dy), dx_train)  # still the training context
    bn(x)
    assert not np.allclose(bn.backward(dy), dx_train)


def test_sgd_loop_with_parameters_and_gradients(rng):
    bn = BatchNorm(C, dtype=np.float64)
    params, grads = bn.parameters(), bn.gradients()
    assert params[0] is bn.weight and params[1] is bn.bias
    assert grads[0] is bn.grad_weight and grads[1] is bn.grad_bias
    target = rng.uniform(1, 2, C)
    x = data(rng, (16, C), np.float64)
    for _ in range(50):  # fit the output scale to target: loss = ||y_std - target||^2 / 2
        y = bn(x)
        dy = y - target * (y - bn.bias) / bn.weight
        bn.backward(dy)
        for p, g in zip(bn.parameters(), bn.gradients(), strict=True):
            p -= 0.05 * g
    assert params[0] is bn.weight  # updated in place
    assert not np.allclose(bn.weight, 1.0)
    bn.zero_grad()
    assert np.all(bn.grad_weight == 0) and np.all(bn.grad_bias == 0)
    assert grads[0] is bn.grad_weight


def test_reset_running_stats_and_parameters(rng):
    bn = trained_layer(rng)
    weight = bn.weight
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, np.zeros(C))
    np.testing.assert_array_equal(bn.running_var, np.ones(C))
    assert bn.num_batches_tracked == 0
    assert not np.all(bn.weight == 1)  # parameters untouched by reset_running_stats
    trained = trained_layer(rng)
    trained.reset_parameters()
    np.testing.assert_array_equal(trained.weight, np.ones(C))
    np.testing.assert_array_equal(trained.bias, np.zeros(C))
    np.testing.assert_array_equal(trained.running_var, np.ones(C))
    assert weight is bn.weight
    BatchNorm(C, affine=False, track_running_stats=False).reset_parameters()  # no-op


# ---------------------------------------------------------------------------
# Construction, configuration, repr, modes
# ---------------------------------------------------------------------------


def test_defaults_and_repr():
    bn = BatchNorm(64)
    assert repr(bn) == ("BatchNorm(64, eps=1e-05, momentum=0.1, affine=True, "
                        "track_running_stats=True, axis=1, relu=False, dtype=float32)")
    assert bn.training
    assert bn.weight.dtype == bn.running_var.dtype == np.float32
    np.testing.assert_array_equal(bn.weight, np.ones(64))
    np.testing.assert_array_equal(bn.bias, np.zeros(64))
    np.testing.assert_array_equal(bn.running_mean, np.zeros(64))
    np.testing.assert_array_equal(bn.running_var, np.ones(64))
    assert bn.num_batches_tracked == 0
    other = BatchNorm(3, eps=1e-3, momentum=None, affine=False, track_running_stats=False,
                      axis=-1, relu=True, dtype="float64")
    assert repr(other) == ("BatchNorm(3, eps=0.001, momentum=None, affine=False, "
                           "track_running_stats=False, axis=-1, relu=True, dtype=float64)")
    assert other.weight is None and other.running_mean is None
    assert other.num_batches_tracked is None and other.grad_weight is None


def test_train_eval_flags():
    bn = BatchNorm(2)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    assert bn.train(False).training is False
    with pytest.raises(TypeError):
        bn.train("no")


def test_settable_eps_and_momentum_are_validated():
    bn = BatchNorm(2)
    bn.eps = 1e-3
    bn.momentum = None
    assert bn.eps == 1e-3 and bn.momentum is None
    with pytest.raises(ValueError):
        bn.eps = 0.0
    with pytest.raises(ValueError):
        bn.momentum = 1.5
    assert bn.eps == 1e-3 and bn.momentum is None
    with pytest.raises(AttributeError):
        bn.num_features = 3
    with pytest.raises(AttributeError):
        bn.dtype = np.float64


@pytest.mark.parametrize(
    "kwargs, error",
    [
        (dict(num_features=0), ValueError),
        (dict(num_features=-3), ValueError),
        (dict(num_features=2.0), TypeError),
        (dict(num_features=True), TypeError),
        (dict(num_features="4"), TypeError),
        (dict(num_features=None), TypeError),
        (dict(eps=0.0), ValueError),
        (dict(eps=-1e-5), ValueError),
        (dict(eps=math.inf), ValueError),
        (dict(eps=math.nan), ValueError),
        (dict(eps="1e-5"), TypeError),
        (dict(momentum=-0.1), ValueError),
        (dict(momentum=1.01), ValueError),
        (dict(momentum=math.nan), ValueError),
        (dict(momentum="0.1"), TypeError),
        (dict(momentum=True), TypeError),
        (dict(affine=1), TypeError),
        (dict(track_running_stats=None), TypeError),
        (dict(relu="yes"), TypeError),
        (dict(axis=1.0), TypeError),
        (dict(dtype=np.float16), TypeError),
        (dict(dtype=np.int32), TypeError),
        (dict(dtype="complex128"), TypeError),
        (dict(dtype="not a dtype"), TypeError),
    ],
)
def test_bad_constructor_arguments(kwargs, error):
    kwargs = {"num_features": 4, **kwargs}
    with pytest.raises(error):
        BatchNorm(**kwargs)


def test_constructor_accepts_numpy_scalars():
    bn = BatchNorm(np.int64(3), eps=np.float32(1e-3), momentum=np.float64(0.5), axis=np.int8(1),
                   affine=np.bool_(True), dtype=np.dtype("float64"))
    assert bn.num_features == 3 and type(bn.num_features) is int
    assert bn.momentum == 0.5 and bn.affine is True


# ---------------------------------------------------------------------------
# Bad input leaves the layer unchanged
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_x, error, match",
    [
        (lambda rng: data(rng, (5, C), np.float64), TypeError, "dtype float32"),
        (lambda rng: np.ones((5, C), np.int64), TypeError, "dtype float32"),
        (lambda rng: data(rng, (5, C), np.complex64), TypeError, "dtype float32"),
        (lambda rng: data(rng, (5, C + 1), np.float32), ValueError, "expected 4 channels"),
        (lambda rng: data(rng, (5, 2, C), np.float32), ValueError, "expected 4 channels"),
        (lambda rng: data(rng, (C,), np.float32), ValueError, "at least 2 dimensions"),
        (lambda rng: np.ones((0, C), np.float32), ValueError, "empty"),
        (lambda rng: None, TypeError, "None"),
        (lambda rng: data(rng, (1, C), np.float32), ValueError, "more than 1 value"),
    ],
    ids=["float64", "int", "complex64", "channels", "channel-axis", "1d", "empty", "none",
         "batch-of-one"],
)
def test_bad_input_raises_and_leaves_state_unchanged(rng, make_x, error, match):
    bn = trained_layer(rng)
    before = snapshot(bn)
    with pytest.raises(error, match=match):
        bn(make_x(rng))
    assert snapshot(bn) == before


def test_axis_out_of_range_for_input(rng):
    bn = BatchNorm(C, axis=3)
    with pytest.raises(ValueError, match="out of range"):
        bn(data(rng, (2, C, 2), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("track", [True, False])
def test_non_finite_batch_raises_and_leaves_state_unchanged(rng, bad, track):
    bn = trained_layer(rng, track_running_stats=track)
    x_prev = data(rng, (6, C), np.float32)
    dy = data(rng, x_prev.shape, np.float32)
    bn(x_prev)
    dx_prev = bn.backward(dy)
    before = snapshot(bn)
    x = data(rng, (6, C), np.float32)
    x[2, 1] = bad
    x[4, 3] = bad
    with pytest.raises(FloatingPointError, match=r"channel\(s\) 1, 3"):
        bn(x)
    assert snapshot(bn) == before
    # the previous forward's context survives: backward still differentiates x_prev
    np.testing.assert_array_equal(bn.backward(dy), dx_prev)
    if not track:  # batch statistics in eval mode too
        bn.eval()
        with pytest.raises(FloatingPointError):
            bn(x)
        assert snapshot(bn) == dict(before, training=False)


def test_non_finite_input_in_eval_mode_propagates_without_raising(rng):
    bn = trained_layer(rng)
    bn.eval()
    before = snapshot(bn)
    x = data(rng, (5, C), np.float32)
    x[1, 2] = np.nan
    y = bn(x)
    assert np.isnan(y[1, 2]) and np.isfinite(np.delete(y.ravel(), 1 * C + 2)).all()
    assert snapshot(bn) | {"ctx": None} == before | {"ctx": None}


def test_running_var_overflow_raises_and_leaves_state_unchanged(rng):
    """float32 data with spread 1e20: the statistics (float64) are finite, running_var is not."""
    bn = trained_layer(rng)
    before = snapshot(bn)
    x = data(rng, (6, C), np.float32) * np.float32(1e20)
    with pytest.raises(FloatingPointError, match="overflow"):
        bn(x)
    assert snapshot(bn) == before


def test_backward_errors(rng):
    bn = BatchNorm(C)
    with pytest.raises(RuntimeError, match="before forward"):
        bn.backward(data(rng, (5, C), np.float32))
    x = data(rng, (5, C), np.float32)
    bn(x)
    dy = data(rng, x.shape, np.float32)
    dx = bn.backward(dy)
    before = snapshot(bn)
    with pytest.raises(ValueError, match="shape"):
        bn.backward(data(rng, (4, C), np.float32))
    with pytest.raises(TypeError, match="dtype"):
        bn.backward(dy.astype(np.float64))
    with pytest.raises(TypeError):
        bn.backward(None)
    assert snapshot(bn) == before
    np.testing.assert_array_equal(bn.backward(dy), dx)


# ---------------------------------------------------------------------------
# fold_into_linear
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_fold_into_linear_matches_affine_then_bn(rng, dtype, affine):
    bn = trained_layer(rng, dtype=dtype, affine=affine, steps=4)
    bn.eval()
    n_in = 5
    W = data(rng, (n_in, C), dtype)
    b = data(rng, (C,), dtype)
    x = data(rng, (7, n_in), dtype)
    expected = bn(x @ W + b)
    W2, b2 = bn.fold_into_linear(W, b)
    assert W2.dtype == b2.dtype == np.dtype(dtype) and W2.shape == W.shape
    assert_close(x @ W2 + b2, expected, dtype)
    # PyTorch's (out, in) layout
    W2t, b2t = bn.fold_into_linear(np.ascontiguousarray(W.T), b, transposed=True)
    assert W2t.shape == (C, n_in)
    np.testing.assert_array_equal(W2t, W2.T)
    np.testing.assert_array_equal(b2t, b2)
    # no bias
    W3, b3 = bn.fold_into_linear(W)
    assert_close(x @ W3 + b3, bn(x @ W), dtype)


def test_fold_into_linear_errors(rng):
    W = data(rng, (3, C), np.float32)
    bn = BatchNorm(C)
    with pytest.raises(RuntimeError, match="eval mode"):
        bn.fold_into_linear(W)
    bn.eval()
    with pytest.raises(ValueError, match="shape"):
        bn.fold_into_linear(W.T)
    with pytest.raises(ValueError, match="shape"):
        bn.fold_into_linear(W, transposed=True)
    with pytest.raises(ValueError, match="shape"):
        bn.fold_into_linear(W, np.zeros(C + 1, np.float32))
    with pytest.raises(TypeError):
        bn.fold_into_linear(W.astype(np.int32))
    with pytest.raises(TypeError):
        bn.fold_into_linear(W, np.zeros(C, np.int32))
    with pytest.raises(ValueError, match="relu"):
        BatchNorm(C, relu=True).eval().fold_into_linear(W)
    with pytest.raises(RuntimeError, match="running statistics"):
        BatchNorm(C, track_running_stats=False).eval().fold_into_linear(W)


# ---------------------------------------------------------------------------
# state_dict / load_state_dict
# ---------------------------------------------------------------------------


def test_state_dict_is_a_copy_and_load_copies_in_place(rng):
    bn = trained_layer(rng)
    state = bn.state_dict()
    assert state["num_batches_tracked"].shape == ()
    assert state["num_batches_tracked"].dtype == np.int64
    state["weight"][...] = 99
    assert not np.any(bn.weight == 99)
    params = bn.parameters()
    running_var = bn.running_var
    other = trained_layer(rng)
    bn.load_state_dict(other.state_dict())
    assert bn.parameters()[0] is params[0] and bn.running_var is running_var
    assert snapshot(bn)["weight"] == snapshot(other)["weight"]
    assert snapshot(bn)["running_var"] == snapshot(other)["running_var"]
    assert bn.num_batches_tracked == other.num_batches_tracked
    state = bn.state_dict()
    bn.load_state_dict(state)
    state["running_mean"][...] = 5  # the layer took a copy
    assert not np.any(bn.running_mean == 5)


def test_load_state_dict_non_strict(rng):
    bn = trained_layer(rng)
    before = snapshot(bn)
    bn.load_state_dict({"bias": np.full(C, 0.25), "extra": np.zeros(3)}, strict=False)
    np.testing.assert_array_equal(bn.bias, np.full(C, 0.25, np.float32))
    after = snapshot(bn)
    assert {k: v for k, v in after.items() if k != "bias"} == {
        k: v for k, v in before.items() if k != "bias"}


def _good_state(bn):
    return {k: v.astype(np.float64) if v.dtype.kind == "f" else v
            for k, v in trained_layer(np.random.default_rng(7)).state_dict().items()}


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda s: s.pop("running_var"), ValueError, "missing key"),
        (lambda s: s.pop("num_batches_tracked"), ValueError, "missing key"),
        (lambda s: s.update(extra=np.zeros(C)), ValueError, "unexpected key"),
        (lambda s: s.update(weight=np.ones(C + 1)), ValueError, "shape"),
        (lambda s: s.update(running_mean=np.zeros((1, C))), ValueError, "shape"),
        (lambda s: s.update(bias=np.zeros(C, np.int64)), TypeError, "float"),
        (lambda s: s.update(running_var=np.ones(C, bool)), TypeError, "float"),
        (lambda s: s.update(weight=np.ones(C, np.complex128)), TypeError, "float"),
        (lambda s: s.update(running_var=np.array(["1"] * C)), TypeError, "float"),
        (lambda s: s.update(num_batches_tracked=np.array(3.0)), TypeError, "integer"),
        (lambda s: s.update(num_batches_tracked=np.array([3])), ValueError, "0-d"),
        (lambda s: s.update(num_batches_tracked=np.array(-1)), ValueError, "non-negative"),
        (lambda s: s.update(running_var=np.array([1.0, -0.5, 1.0, 1.0])), ValueError,
         "non-negative"),
        (lambda s: s.update(running_mean=np.array([0.0, np.nan, 0.0, 0.0])), ValueError, "NaN"),
        (lambda s: s.update(weight=np.array([1.0, np.inf, 1.0, 1.0])), ValueError, "NaN"),
        (lambda s: s.update(running_var=np.full(C, 1e300)), ValueError, "overflow"),
    ],
)
def test_load_state_dict_rejects_bad_state_and_leaves_layer_unchanged(rng, change, error, match):
    bn = trained_layer(rng)
    state = _good_state(bn)
    change(state)
    before = snapshot(bn)
    with pytest.raises(error, match=match):
        bn.load_state_dict(state)
    assert snapshot(bn) == before


def test_load_state_dict_validates_everything_before_assigning(rng):
    """Valid new weight/bias/running stats with one bad last entry: nothing is assigned."""
    bn = trained_layer(rng)
    state = {k: v + 1 if v.dtype.kind == "f" else v for k, v in bn.state_dict().items()}
    state["num_batches_tracked"] = np.array(-5)  # validated last
    before = snapshot(bn)
    with pytest.raises(ValueError):
        bn.load_state_dict(state)
    assert snapshot(bn) == before
    with pytest.raises(TypeError, match="mapping"):
        bn.load_state_dict([("weight", np.ones(C))])
    assert snapshot(bn) == before


# ---------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------


def assert_same_layer(a: BatchNorm, b: BatchNorm):
    sa, sb = snapshot(a), snapshot(b)
    for key in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked",
                "training", "repr"):
        assert sa[key] == sb[key], key
    assert a.eps == b.eps and a.momentum == b.momentum


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine, track", [(True, True), (False, True), (True, False),
                                            (False, False)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_save_load_round_trip_is_bitwise(rng, tmp_path, dtype, affine, track, training):
    bn = trained_layer(rng, dtype=dtype, affine=affine, track_running_stats=track,
                       eps=1e-3 / 3, momentum=None if track else 0.3, axis=1, relu=True)
    bn.train(training)
    path = tmp_path / "layer"  # no suffix: written exactly there
    bn.save(path)
    assert path.exists() and not (tmp_path / "layer.npz").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["layer"]  # no temporary left behind
    loaded = BatchNorm.load(path)
    assert_same_layer(loaded, bn)
    x = data(rng, (5, C, 2), dtype)
    np.testing.assert_array_equal(loaded(x), bn(x))


def test_save_load_file_objects(rng):
    bn = trained_layer(rng, dtype=np.float64)
    buffer = io.BytesIO()
    bn.save(buffer)
    buffer.seek(0)
    assert_same_layer(BatchNorm.load(buffer), bn)


def test_saved_file_is_plain_npz_without_pickles(rng, tmp_path):
    bn = trained_layer(rng)
    path = tmp_path / "bn.npz"
    bn.save(path)
    with np.load(path, allow_pickle=False) as f:
        assert sorted(f.files) == sorted(["__config__", *bn.state_dict()])
        config = json.loads(str(f["__config__"]))
    assert config["num_features"] == C and config["dtype"] == "float32"


def _write_npz(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _saved_arrays(bn):
    buffer = io.BytesIO()
    bn.save(buffer)
    buffer.seek(0)
    with np.load(buffer) as f:
        return {k: f[k] for k in f.files}


def _with_config(arrays, **changes):
    config = json.loads(str(arrays["__config__"]))
    config.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del config[key]
    return dict(arrays, __config__=np.array(json.dumps(config)))


_DROP = object()


@pytest.mark.parametrize(
    "change",
    [
        lambda a: dict(a, weight=np.ones(C + 1, np.float32)),
        lambda a: _with_config(a, num_features=C + 1),
        lambda a: {k: v for k, v in a.items() if k != "running_mean"},
        lambda a: dict(a, surprise=np.zeros(2)),
        lambda a: dict(a, bias=np.zeros(C, np.int32)),
        lambda a: dict(a, running_var=-np.ones(C, np.float32)),
        lambda a: {k: v for k, v in a.items() if k != "__config__"},
        lambda a: dict(a, __config__=np.array("{not json")),
        lambda a: dict(a, __config__=np.array(b"bytes, not unicode")),
        lambda a: dict(a, __config__=np.array(["[]"])),
        lambda a: dict(a, __config__=np.array("[1, 2]")),
        lambda a: _with_config(a, format="something.else"),
        lambda a: _with_config(a, version=99),
        lambda a: _with_config(a, eps=-1.0),
        lambda a: _with_config(a, dtype="int8"),
        lambda a: _with_config(a, training="yes"),
        lambda a: _with_config(a, colour="blue"),
        lambda a: _with_config(a, relu=_DROP),
        lambda a: _with_config(a, affine=False),  # weight/bias then unexpected
    ],
    ids=["weight-shape", "num-features", "missing-key", "extra-key", "int-dtype",
         "negative-var", "no-config", "bad-json", "bytes-config", "config-shape",
         "config-list", "format", "version", "bad-eps", "bad-dtype", "bad-training",
         "unknown-field", "missing-field", "affine-mismatch"],
)
def test_load_rejects_mismatched_files(rng, tmp_path, change):
    arrays = change(_saved_arrays(trained_layer(rng)))
    path = tmp_path / "bad.npz"
    _write_npz(path, arrays)
    with pytest.raises((ValueError, TypeError)):
        BatchNorm.load(path)


CORRUPTIONS = {
    "random": lambda raw: np.random.default_rng(0).bytes(len(raw)),
    "empty": lambda raw: b"",
    "half": lambda raw: raw[: len(raw) // 2],
    "tail-cut": lambda raw: raw[:-7],
    "zip-magic-then-garbage": lambda raw: raw[:4] + np.random.default_rng(1).bytes(200),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_load_rejects_corrupt_and_truncated_files(rng, tmp_path, corruption):
    good = tmp_path / "good.npz"
    trained_layer(rng).save(good)
    bad = tmp_path / "bad.npz"
    bad.write_bytes(CORRUPTIONS[corruption](good.read_bytes()))
    with pytest.raises(ValueError, match="not a valid fastbn BatchNorm file"):
        BatchNorm.load(bad)


def test_load_rejects_other_files(rng, tmp_path):
    bad = tmp_path / "bad.npz"
    # a bare .npy is not a layer file
    with open(bad, "wb") as f:
        np.save(f, np.ones(3))
    with pytest.raises(ValueError, match="not an .npz"):
        BatchNorm.load(bad)
    # a pickled object array inside an otherwise valid archive is refused
    _write_npz(bad, dict(_saved_arrays(trained_layer(rng)), weight=np.array([object()] * C)))
    with pytest.raises(ValueError, match="pickle"):
        BatchNorm.load(bad)
    with pytest.raises(FileNotFoundError):
        BatchNorm.load(tmp_path / "missing.npz")


def test_load_single_byte_corruption_never_loads_wrong_values(rng, tmp_path):
    """Flip each byte of a saved file: load raises ValueError/TypeError or gives the same layer.

    (Some bytes -- zip timestamps, padding -- carry no information; everything
    else is covered by zip CRCs, the npy header checks and the state checks.)
    """
    bn = trained_layer(rng)
    good = tmp_path / "good.npz"
    bn.save(good)
    raw = bytearray(good.read_bytes())
    bad = tmp_path / "bad.npz"
    loaded = 0
    for pos in range(0, len(raw), 3):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x5A
        bad.write_bytes(bytes(flipped))
        try:
            layer = BatchNorm.load(bad)
        except (ValueError, TypeError):
            continue
        loaded += 1
        assert_same_layer(layer, bn)
    assert loaded < len(raw) // 6  # most flips are detected


def test_loading_a_mismatched_file_into_an_existing_layer_leaves_it_unchanged(rng, tmp_path):
    path = tmp_path / "five.npz"
    BatchNorm(C + 1).save(path)
    bn = trained_layer(rng)
    before = snapshot(bn)
    with pytest.raises(ValueError, match="shape"):
        bn.load_state_dict(BatchNorm.load(path).state_dict())
    assert snapshot(bn) == before


def test_public_name():
    assert fastbn.BatchNorm is BatchNorm
    assert "BatchNorm" in fastbn.__all__
