"""examples/resnet_block.py: a NumPy residual network with the fused block trains and is right.

Its gradients match central finite differences (float64), and the fused network
computes the very bits of the same network written op by op (``relu=False``
batch norm, NumPy add and ReLU), step after step.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

_EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "resnet_block.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("fastbn_example_resnet_block", _EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


example = _load_example()


def test_fused_and_unfused_networks_train_to_the_same_bits():
    x, labels = example.make_problem(n=512, seed=1)
    runs = []
    for fused in (True, False):
        model = example.ResNet(16, 24, 4, n_blocks=2, seed=2, fused=fused)
        losses = example.train(model, x, labels, steps=15, batch_size=64, seed=3)
        runs.append((losses, [p.copy() for p, _ in model.parameters_and_gradients()]))
    assert runs[0][0] == runs[1][0]
    for a, b in zip(runs[0][1], runs[1][1], strict=True):
        assert a.tobytes() == b.tobytes()


def test_training_reduces_the_loss_and_classifies():
    x, labels = example.make_problem(n=1024, seed=0, dtype=np.float32)
    model = example.ResNet(16, 64, 4, n_blocks=2, dtype=np.float32, seed=0)
    losses = example.train(model, x, labels, steps=200, batch_size=128, seed=0)
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:5])
    accuracy = np.mean(np.argmax(model.train(False).forward(x), axis=1) == labels)
    assert accuracy > 0.8


def test_gradients_match_finite_differences():
    x, labels = example.make_problem(n=16, n_in=5, n_classes=3, seed=4)
    model = example.ResNet(5, 6, 3, n_blocks=2, seed=5)

    def loss():
        return example.softmax_cross_entropy(model.forward(x), labels)[0]

    _, dlogits = example.softmax_cross_entropy(model.forward(x), labels)
    model.backward(dlogits)
    rng = np.random.default_rng(6)
    h = 1e-6
    for p, g in model.parameters_and_gradients():
        analytic = g.copy()
        for i in rng.choice(p.size, min(4, p.size), replace=False):
            saved = p.flat[i]
            p.flat[i] = saved + h
            plus = loss()
            p.flat[i] = saved - h
            minus = loss()
            p.flat[i] = saved
            numeric = (plus - minus) / (2 * h)
            assert abs(analytic.flat[i] - numeric) <= 1e-6 + 1e-5 * abs(numeric), (
                p.shape, i, analytic.flat[i], numeric)
