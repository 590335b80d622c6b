"""End to end: a NumPy MLP with a fastbn BatchNorm trains, and its gradients are exact.

The network is ``examples/mlp.py`` (affine -> BatchNorm(relu=True) -> affine ->
softmax cross-entropy).  Its full gradient -- every parameter and the input --
is checked against central finite differences in float64, in training mode
(batch statistics: the statistics depend on the input) and in eval mode
(running statistics: constants).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

import fastbn

_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "mlp.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("fastbn_example_mlp", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


mlp = _load_example()


def test_sgd_training_reduces_loss():
    x, labels = mlp.make_problem(n=512, n_in=10, n_classes=3, seed=0)
    model = mlp.MLP(10, 32, 3, seed=0)
    model.train()
    initial = model.loss(x, labels)
    assert initial > 0.9  # near log(3): an untrained network
    losses = mlp.train(model, x, labels, steps=300, lr=0.3, batch_size=32, seed=0)
    assert np.all(np.isfinite(losses))
    final = model.loss(x, labels)
    assert final < 0.5 * initial
    # the running statistics learned during training serve eval mode as well
    model.eval()
    eval_loss = model.loss(x, labels)
    assert eval_loss < 0.5 * initial
    accuracy = (model.forward(x).argmax(axis=1) == labels).mean()
    assert accuracy > 0.75
    assert model.bn.num_batches_tracked == 300 + 2  # 300 steps + 2 full-batch loss calls


def _flat_views(model, x):
    """Every trainable array and the input, paired with the name used in messages."""
    names = ["W1", "b1", "bn.weight", "bn.bias", "W2", "b2"]
    return list(zip(names, model.parameters(), strict=True)) + [("x", x)]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_full_network_gradient_matches_finite_differences(mode):
    rng = np.random.default_rng(1)
    n, n_in, n_hidden, n_out = 8, 5, 6, 3
    model = mlp.MLP(n_in, n_hidden, n_out, dtype=np.float64, seed=1)
    # non-trivial batch-norm parameters and running statistics
    model.bn.weight[...] = rng.uniform(0.5, 1.5, n_hidden)
    model.bn.bias[...] = rng.uniform(-0.5, 0.5, n_hidden)
    model.b1[...] = rng.standard_normal(n_hidden)
    model.b2[...] = rng.standard_normal(n_out)
    model.bn.running_mean[...] = rng.standard_normal(n_hidden)
    model.bn.running_var[...] = rng.uniform(0.5, 2.0, n_hidden)
    model.train(mode == "train")
    x = rng.standard_normal((n, n_in)) * 2 + 1
    labels = rng.integers(0, n_out, n)

    # keep clear of the ReLU kink, where finite differences are meaningless
    z1 = x @ model.W1 + model.b1
    if mode == "train":
        pre_relu, _ = fastbn.batch_norm_forward(z1, model.bn.weight, model.bn.bias)
    else:
        pre_relu = fastbn.batch_norm_inference(z1, model.bn.running_mean, model.bn.running_var,
                                               model.bn.weight, model.bn.bias)
    assert np.abs(pre_relu).min() > 1e-3
    assert (pre_relu > 0).any() and (pre_relu < 0).any()  # the mask matters

    loss, dlogits = mlp.softmax_cross_entropy(model.forward(x), labels)
    dx = model.backward(dlogits)
    analytic = [g.copy() for g in model.gradients()] + [dx]

    h = 1e-6
    for (name, array), grad in zip(_flat_views(model, x), analytic, strict=True):
        numeric = np.empty_like(array)
        for i in np.ndindex(array.shape):
            saved = array[i]
            array[i] = saved + h
            up = model.loss(x, labels)
            array[i] = saved - h
            down = model.loss(x, labels)
            array[i] = saved
            numeric[i] = (up - down) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8, err_msg=name)
    # the loss is unchanged after all the perturbations (nothing leaked into the state)
    assert model.loss(x, labels) == pytest.approx(loss, rel=1e-14)
