"""The deep-network demonstration (examples/deep_network.py): what it shows must hold.

Reduced sizes keep it fast; the numeric claims are the ones README makes.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "deep_network.py"


@pytest.fixture(scope="module")
def demo():
    spec = importlib.util.spec_from_file_location("deep_network", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while defining
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def small_init_pass(demo):
    return {config: demo.one_pass(config, "small", depth=20) for config in demo.CONFIGS}


def test_without_normalization_activations_and_early_gradients_vanish(small_init_pass):
    stats = small_init_pass["plain"]["stats"]
    first, last = stats[0], stats[-1]
    assert last["act_std"] < 1e-15 * first["act_std"]  # many orders of magnitude
    # The gradient reaching the early layers vanishes the same way...
    assert first["grad_in_std"] < 1e-15 * last["grad_in_std"]
    # ...and every weight gradient, dW = h^T dz, multiplies a collapsing activation by a
    # growing gradient: tiny at every depth, orders of magnitude below batch norm's.
    normalized = small_init_pass["bn_before"]["stats"]
    for plain_layer, bn_layer in zip(stats, normalized, strict=True):
        assert plain_layer["grad_w_std"] < 1e-15 * bn_layer["grad_w_std"]


def test_batch_norm_before_relu_keeps_healthy_spreads(small_init_pass):
    stats = small_init_pass["bn_before"]["stats"]
    for s in stats:  # gamma = 1, beta = 0: pre-activations are normalized
        assert 0.9 < s["pre_std"] < 1.1, s
        assert 0.3 < s["act_zero"] < 0.7, s  # about half the units active
    early = np.mean([s["grad_w_std"] for s in stats[:3]])
    late = np.mean([s["grad_w_std"] for s in stats[-3:]])
    assert 1 / 30 < early / late < 30  # a modest factor (no normalization: ~1e20 and worse)
    assert all(1e-3 < s["grad_in_std"] < 1e3 for s in stats)


def test_batch_norm_after_relu_also_keeps_activations_alive(small_init_pass):
    stats = small_init_pass["bn_after"]["stats"]
    assert all(0.5 < s["act_std"] < 2 for s in stats)


def test_statistics_are_over_the_batch_axis(small_init_pass):
    pre = small_init_pass["bn_before"]["pre_activations"][5]
    assert pre.shape == (100, 100)  # rows are samples
    np.testing.assert_allclose(pre.mean(axis=0), 0, atol=1e-10)  # per unit, over the batch
    np.testing.assert_allclose(pre.std(axis=0), 1, rtol=5e-3)  # sqrt(var / (var + eps))


def test_three_derivations_agree_with_the_kernels(demo, small_init_pass):
    differences = demo.compare_derivations(small_init_pass["bn_before"]["pre_activations"][9])
    assert len(differences) == 3
    assert all(value < 1e-12 for value in differences.values()), differences


def test_batch_norm_trains_and_plain_does_not(demo):
    pytest.importorskip("sklearn", reason="the training demo needs scikit-learn")
    data = demo.load_data(0)
    plain = demo.train("plain", "small", 0.05, epochs=4, depth=20, data=data)
    normalized = demo.train("bn_before", "small", 0.05, epochs=4, depth=20, data=data)
    assert plain["history"][-1]["steps"] == normalized["history"][-1]["steps"]
    assert plain["final_loss"] > 2.2  # stuck at log(10): the signal never gets through
    assert normalized["final_loss"] < 0.8 * plain["final_loss"]
    assert normalized["eval_accuracy"] > 0.3 > plain["eval_accuracy"]


def test_example_runs_end_to_end_and_writes_its_figures(demo, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the demo's figures need matplotlib")
    pytest.importorskip("sklearn", reason="the training demo needs scikit-learn")
    result = demo.main(["--out", str(tmp_path), "--epochs", "2", "--depth", "6",
                        "--init", "he", "--train-init", "small"])
    out = capsys.readouterr().out
    for name in ("activations.png", "gradients.png", "std_vs_depth.png", "training.png"):
        path = tmp_path / name
        assert path.exists() and path.stat().st_size > 10_000, name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "batch norm before ReLU (he init)" in out
    assert "final held-out accuracy, eval mode" in out
    assert len(result["training"]) == 4  # two learning rates, with and without batch norm
