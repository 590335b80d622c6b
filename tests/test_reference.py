"""The oracles themselves: the plain and graph-based NumPy references agree with each
other, with PyTorch, with a per-channel loop written out by hand, and keep the
structure the module documents (dtype preserved, a topologically ordered tape,
NumPy the only import)."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest

from fastbn import reference

EPS = 1e-5
CASES = [((7, 3), 1), ((2, 4), 1), ((4, 3, 5), 1), ((3, 4, 5, 6), 1), ((3, 5, 6, 4), -1),
         ((3, 4, 5), 0), ((5, 3, 4), -2)]
IDS = [f"{'x'.join(map(str, s))}-axis{a}" for s, a in CASES]


def rel_err(a, b, scale=None):
    scale = np.max(np.abs(b)) if scale is None else scale
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / scale)


def dx_scale(cache, dy):
    """Size of the closed form's terms: with 2 values per channel dx itself is
    ~eps/var smaller than them, and rounding scales with the terms."""
    return float(np.max(np.abs(cache["gamma"] * cache["inv_std"] * dy)))


def make(rng, shape, axis, dtype=np.float64):
    n = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    gamma = (rng.uniform(0.5, 2, n) * rng.choice([-1, 1], n)).astype(dtype)
    beta = rng.uniform(-1, 1, n).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, gamma, beta, dy


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(("shape", "axis"), CASES, ids=IDS)
def test_plain_and_graph_references_agree(rng, shape, axis, relu, affine):
    x, gamma, beta, dy = make(rng, shape, axis)
    if not affine:
        gamma = beta = None
    y, cache = reference.forward(x, gamma, beta, eps=EPS, axis=axis, relu=relu)
    y_graph, tape = reference.graph_forward(x, gamma, beta, eps=EPS, axis=axis, relu=relu)
    assert rel_err(y_graph, y) <= 1e-14
    dx, dg, db = reference.backward(dy, cache)
    gdx, gdg, gdb = reference.graph_backward(dy, tape)
    assert dx.shape == x.shape and dg.shape == db.shape == (shape[axis],)
    assert gdx.shape == x.shape and gdg.shape == gdb.shape == (shape[axis],)
    assert rel_err(gdx, dx, dx_scale(cache, dy)) <= 1e-12
    assert rel_err(gdg, dg) <= 1e-12
    assert rel_err(gdb, db) <= 1e-12
    if relu:
        assert np.all(y >= 0) and np.any(y == 0)


def test_against_a_hand_written_per_channel_loop(rng):
    """(N, C) data, one channel at a time, every formula spelled out."""
    x, gamma, beta, dy = make(rng, (9, 4), 1)
    y, cache = reference.forward(x, gamma, beta, eps=EPS)
    dx, dg, db = reference.backward(dy, cache)
    n = x.shape[0]
    for c in range(x.shape[1]):
        col, g = x[:, c], dy[:, c]
        mu = sum(col) / n
        var = sum((v - mu) ** 2 for v in col) / n
        inv_std = 1 / np.sqrt(var + EPS)
        x_hat = (col - mu) * inv_std
        np.testing.assert_allclose(y[:, c], gamma[c] * x_hat + beta[c], rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(db[c], sum(g), rtol=1e-13)
        np.testing.assert_allclose(dg[c], sum(g * x_hat), rtol=1e-12, atol=1e-13)
        # dx via the chain rule through mu and var, term by term.
        dx_hat = g * gamma[c]
        dvar = sum(dx_hat * (col - mu)) * -0.5 * (var + EPS) ** -1.5
        dmu = sum(-dx_hat * inv_std) + dvar * sum(-2 * (col - mu)) / n
        expected = dx_hat * inv_std + dvar * 2 * (col - mu) / n + dmu / n
        np.testing.assert_allclose(dx[:, c], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_references_compute_in_the_dtype_of_x(rng, dtype):
    x, gamma, beta, dy = make(rng, (6, 3, 4), 1, dtype)
    y, cache = reference.forward(x, gamma, beta)
    dx, dg, db = reference.backward(dy, cache)
    y_graph, tape = reference.graph_forward(x, gamma, beta)
    gdx, gdg, gdb = reference.graph_backward(dy, tape)
    for a in (y, dx, dg, db, y_graph, gdx, gdg, gdb):
        assert a.dtype == dtype
    assert reference.inference(x, np.zeros(3), np.ones(3)).dtype == dtype
    # float32 results are still close to the float64 ones on well-conditioned data.
    up = [a.astype(np.float64) for a in (x, gamma, beta, dy)]
    y64, cache64 = reference.forward(*up[:3])
    dx64 = reference.backward(up[3], cache64)[0]
    assert rel_err(y, y64) <= (1e-5 if dtype == np.float32 else 1e-15)
    assert rel_err(dx, dx64) <= (1e-4 if dtype == np.float32 else 1e-15)


@pytest.mark.parametrize("relu", [False, True])
def test_inference_reference(rng, relu):
    x, gamma, beta, _ = make(rng, (5, 3, 4), 1)
    rm, rv = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    y = reference.inference(x, rm, rv, gamma, beta, eps=EPS, relu=relu)
    shape = (1, 3, 1)
    expected = ((x - rm.reshape(shape)) / np.sqrt(rv.reshape(shape) + EPS) * gamma.reshape(shape)
                + beta.reshape(shape))
    if relu:
        expected = np.maximum(expected, 0)
    np.testing.assert_allclose(y, expected, rtol=1e-14, atol=1e-14)
    # With the batch's own statistics it is the training forward.
    _, cache = reference.forward(x, gamma, beta, eps=EPS)
    y_train, _ = reference.forward(x, gamma, beta, eps=EPS, relu=relu)
    y_eval = reference.inference(x, cache["mean"].ravel(), cache["var"].ravel(), gamma, beta,
                                 eps=EPS, relu=relu)
    np.testing.assert_allclose(y_eval, y_train, rtol=1e-13, atol=1e-13)


def test_channels_last_equals_moved_channels_first(rng):
    x, gamma, beta, dy = make(rng, (3, 5, 6, 4), -1)
    y, cache = reference.forward(x, gamma, beta, axis=-1)
    dx, dg, db = reference.backward(dy, cache)
    xf, dyf = np.moveaxis(x, -1, 1), np.moveaxis(dy, -1, 1)
    yf, cachef = reference.forward(xf, gamma, beta, axis=1)
    dxf, dgf, dbf = reference.backward(dyf, cachef)
    np.testing.assert_allclose(np.moveaxis(yf, 1, -1), y, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(np.moveaxis(dxf, 1, -1), dx, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(dgf, dg, rtol=1e-12)
    np.testing.assert_allclose(dbf, db, rtol=1e-12)


# ---------------------------------------------------------------------------
# Graph structure
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
def test_tape_is_topologically_ordered_and_ends_with_the_output(rng, relu):
    x, gamma, beta, _ = make(rng, (4, 3, 2), 1)
    y, tape = reference.graph_forward(x, gamma, beta, relu=relu)
    assert all(isinstance(node, reference.Node) for node in tape)
    assert tape[-1].value is y
    assert [node.name for node in tape[:3]] == ["x", "gamma", "beta"]
    assert tape[-1].name == ("relu" if relu else "shifted")
    seen = set()
    for node in tape:
        assert all(id(p) in seen for p in node.parents), node
        seen.add(id(node))
    names = [node.name for node in tape]
    for name in ["mean", "centred", "square", "var", "var_eps", "std", "inv_std", "x_hat"]:
        assert name in names
    assert "shape=" in repr(tape[-1])


def test_graph_backward_resets_gradients_between_calls(rng):
    x, gamma, beta, dy = make(rng, (6, 3), 1)
    _, tape = reference.graph_forward(x, gamma, beta)
    first = reference.graph_backward(dy, tape)
    second = reference.graph_backward(dy, tape)  # must not accumulate into the first
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
    third = reference.graph_backward(2 * dy, tape)
    np.testing.assert_allclose(third[0], 2 * first[0], rtol=1e-13, atol=1e-15)
    # Every node that took part received a gradient of its own shape.
    for node in tape:
        assert node.grad is not None and np.shape(node.grad) == np.shape(node.value), node


def test_reference_imports_only_numpy():
    tree = ast.parse(inspect.getsource(reference))
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add((node.module or "").split(".")[0] if node.level == 0 else ".")
    assert modules <= {"numpy", "math", "__future__"}, modules


# ---------------------------------------------------------------------------
# PyTorch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize(("shape", "axis"), CASES[:5], ids=IDS[:5])
def test_references_match_torch(rng, shape, axis, relu):
    torch = pytest.importorskip("torch")
    x, gamma, beta, dy = make(rng, shape, axis)
    xt = torch.tensor(x, requires_grad=True)
    gt = torch.tensor(gamma, requires_grad=True)
    bt = torch.tensor(beta, requires_grad=True)
    yt = torch.nn.functional.batch_norm(xt.movedim(axis, 1), None, None, gt, bt, training=True,
                                        eps=EPS)
    if relu:
        yt = torch.relu(yt)
    yt = yt.movedim(1, axis)
    (yt * torch.tensor(dy)).sum().backward()
    _, cache = reference.forward(x, gamma, beta, eps=EPS, axis=axis)
    for forward, backward in [(reference.forward, reference.backward),
                              (reference.graph_forward, reference.graph_backward)]:
        y, state = forward(x, gamma, beta, eps=EPS, axis=axis, relu=relu)
        dx, dg, db = backward(dy, state)
        assert rel_err(y, yt.detach().numpy()) <= 1e-13
        assert rel_err(dx, xt.grad.numpy(), dx_scale(cache, dy)) <= 1e-12
        assert rel_err(dg, gt.grad.numpy()) <= 1e-12
        assert rel_err(db, bt.grad.numpy()) <= 1e-12
