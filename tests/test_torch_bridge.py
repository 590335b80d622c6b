"""fastbn.torch: drop-in modules equal torch.nn's, convert(), autograd, fallbacks, compile."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch bridge tests need torch")
fbt = pytest.importorskip("fastbn.torch")

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
MODULES = [(torch.nn.BatchNorm1d, fbt.BatchNorm1d, (16, 6)),
           (torch.nn.BatchNorm1d, fbt.BatchNorm1d, (8, 6, 5)),
           (torch.nn.BatchNorm2d, fbt.BatchNorm2d, (4, 6, 5, 3)),
           (torch.nn.BatchNorm3d, fbt.BatchNorm3d, (3, 6, 2, 3, 4))]


@pytest.fixture(autouse=True)
def _fastbn_at_every_size(monkeypatch):
    """These tests are about fastbn's path: send every input to it (by default inputs
    below fbt.TORCH_BELOW run PyTorch's own kernels; the tests at the end cover that)."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 0)


def _assert_close(a, b, tol):
    a, b = a.detach(), b.detach()
    scale = max(float(b.abs().max()), 1.0) if b.numel() else 1.0
    assert a.shape == b.shape
    assert float((a - b).abs().max()) <= tol * scale if a.numel() else True


def _memory_format(ndim, channels_last):
    if not channels_last or ndim < 4:
        return torch.contiguous_format
    return torch.channels_last if ndim == 4 else torch.channels_last_3d


@pytest.mark.parametrize("torch_cls, fast_cls, shape", MODULES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("momentum, affine, track", [(0.1, True, True), (None, True, True),
                                                     (0.1, False, True), (0.1, True, False)])
def test_parity_over_sgd_steps(torch_cls, fast_cls, shape, dtype, channels_last, momentum,
                               affine, track):
    if channels_last and len(shape) < 4:
        pytest.skip("channels-last needs 4 or 5 dimensions")
    torch.manual_seed(0)
    ref = torch_cls(6, momentum=momentum, affine=affine, track_running_stats=track,
                    dtype=dtype)
    fast = fast_cls(6, momentum=momentum, affine=affine, track_running_stats=track,
                    dtype=dtype)
    fast.load_state_dict(ref.state_dict())
    tol = TOL[dtype]
    fmt = _memory_format(len(shape), channels_last)
    for step in range(3):
        x = (torch.randn(shape, dtype=dtype) * 3 + step).contiguous(memory_format=fmt)
        dy = torch.randn(shape, dtype=dtype)
        x_ref, x_fast = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ref, y_fast = ref(x_ref), fast(x_fast)
        _assert_close(y_fast, y_ref, tol)
        (y_ref * dy).sum().backward()
        (y_fast * dy).sum().backward()
        _assert_close(x_fast.grad, x_ref.grad, tol)
        if affine:
            _assert_close(fast.weight.grad, ref.weight.grad, tol)
            _assert_close(fast.bias.grad, ref.bias.grad, tol)
            with torch.no_grad():
                for m in (ref, fast):
                    m.weight -= 0.1 * m.weight.grad
                    m.bias -= 0.1 * m.bias.grad
                    m.weight.grad = m.bias.grad = None
        if track:
            _assert_close(fast.running_mean, ref.running_mean, tol)
            _assert_close(fast.running_var, ref.running_var, tol)
            assert int(fast.num_batches_tracked) == int(ref.num_batches_tracked) == step + 1
    ref.eval()
    fast.eval()
    x = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt)
    _assert_close(fast(x), ref(x), tol)


def test_channels_last_runs_on_a_zero_copy_view(monkeypatch):
    seen = {}
    original = fbt._fn.batch_norm_forward

    def spy(x, *args, **kwargs):
        seen["array"], seen["axis"] = x, kwargs["axis"]
        return original(x, *args, **kwargs)

    monkeypatch.setattr(fbt._fn, "batch_norm_forward", spy)
    x = torch.randn(4, 6, 5, 3).contiguous(memory_format=torch.channels_last)
    y = fbt.BatchNorm2d(6)(x)
    assert seen["axis"] == -1
    assert np.shares_memory(seen["array"], x.detach().numpy())
    assert y.is_contiguous(memory_format=torch.channels_last)


def test_gradcheck_float64():
    module = fbt.BatchNorm2d(3, dtype=torch.float64)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-1, 1)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: module(t), (x,), eps=1e-6, atol=1e-6)


def test_double_backward_raises_a_clear_error():
    module = fbt.BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    with pytest.raises(RuntimeError, match="torch.nn.BatchNorm2d"):
        (grad,) = torch.autograd.grad(module(x).pow(2).sum(), x, create_graph=True)
        grad.sum().backward()


def test_batch_of_one_raises_like_torch():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fbt.BatchNorm1d(4)(torch.randn(1, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_modules_match_torch(dtype):
    """16-bit modules run fastbn's 16-bit kernels (float32 arithmetic); torch.nn's own
    16-bit batch norm computes in float32 too, so the two agree to an ulp or so
    (tests/test_torch_low_precision.py holds the exact contract)."""
    ref = torch.nn.BatchNorm2d(3, dtype=dtype)
    fast = fbt.BatchNorm2d(3, dtype=dtype)
    x = torch.randn(4, 3, 5, 5).to(dtype)
    y = fast(x)
    assert y.dtype == dtype
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11
    torch.testing.assert_close(y.float(), ref(x).float(), rtol=4 * unit, atol=4 * unit)
    torch.testing.assert_close(fast.running_var.float(), ref.running_var.float(),
                               rtol=2 * unit, atol=0)


def test_mismatched_parameter_dtype_falls_back_to_torch():
    """float64 parameters with float32 data is no mix fastbn runs: PyTorch's forward."""
    fast = fbt.BatchNorm2d(3, dtype=torch.float64)
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError):  # what torch.nn says about it
        torch.nn.BatchNorm2d(3, dtype=torch.float64)(x)
    with pytest.raises(RuntimeError):
        fast(x)


def test_odd_strides_fall_back_to_torch():
    ref, fast = torch.nn.BatchNorm2d(3), fbt.BatchNorm2d(3)
    x = torch.randn(4, 3, 10, 10)[:, :, ::2, ::3]  # neither contiguous nor channels-last
    assert fbt._fastbn_layout(x) is None
    assert torch.allclose(fast(x), ref(x), atol=1e-6)


def test_nonfinite_batch_leaves_running_stats_and_warns():
    module = fbt.BatchNorm1d(3)
    module(torch.randn(8, 3))
    before = (module.running_mean.clone(), module.running_var.clone(),
              int(module.num_batches_tracked))
    x = torch.randn(8, 3)
    x[2, 1] = float("nan")
    fbt._FastBatchNormMixin._warned_nonfinite = False
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = module(x)
    assert torch.isnan(y[:, 1]).all()  # outputs are NaN, as in PyTorch
    assert torch.equal(module.running_mean, before[0])
    assert torch.equal(module.running_var, before[1])
    assert int(module.num_batches_tracked) == before[2]


def _small_cnn():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 16), torch.nn.BatchNorm1d(16),
        torch.nn.Linear(16, 4))


def test_convert_small_cnn_keeps_parameters_and_matches():
    ref, model = _small_cnn(), _small_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # built BEFORE the conversion
    params_before = [id(p) for p in model.parameters()]
    keys_before = list(model.state_dict())
    assert fbt.convert(model) is model
    assert [id(p) for p in model.parameters()] == params_before
    assert list(model.state_dict()) == keys_before
    assert not any(type(m) in (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d) for m in
                   model.modules())
    assert sum(isinstance(m, (fbt.BatchNorm1d, fbt.BatchNorm2d)) for m in model.modules()) == 3
    x = torch.randn(8, 3, 6, 6)
    out_ref, out = ref(x), model(x)
    assert torch.allclose(out, out_ref, atol=1e-5)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for p, q in zip(model.parameters(), ref.parameters(), strict=True):
        assert torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4)
    before = model[0].weight.detach().clone()
    optimizer.step()
    assert not torch.equal(model[0].weight, before)


def test_torch_compile_fullgraph():
    model = fbt.convert(_small_cnn())
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(8, 3, 6, 6)
    expected = _small_cnn()(x)
    out = compiled(x)
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    assert model[0].weight.grad is not None


def test_import_fastbn_does_not_import_torch():
    code = "import sys, fastbn, fastbn.distributed; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# ---------------------------------------------------------------------------
# Small eager inputs: PyTorch's own kernels, fastbn's guard of the running stats
# ---------------------------------------------------------------------------


def _fastbn_must_not_run(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("fastbn's kernels ran for a small input")

    monkeypatch.setattr(fbt._fn, "batch_norm_forward", fail)
    monkeypatch.setattr(fbt._fn, "batch_norm_inference", fail)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_small_inputs_run_torch_kernels_bitwise(monkeypatch, momentum):
    monkeypatch.setattr(fbt, "TORCH_BELOW", 10_000)
    _fastbn_must_not_run(monkeypatch)
    torch.manual_seed(0)
    ref, fast = torch.nn.BatchNorm1d(6, momentum=momentum), fbt.BatchNorm1d(6, momentum=momentum)
    for step in range(3):
        x = (torch.randn(16, 6) * 3 + step).requires_grad_()
        x2 = x.detach().clone().requires_grad_()
        dy = torch.randn(16, 6)
        y_ref = ref(x)
        y_ref.backward(dy)
        y = fast(x2)
        y.backward(dy)
        assert torch.equal(y, y_ref)
        assert torch.equal(x2.grad, x.grad)
        assert torch.equal(fast.weight.grad, ref.weight.grad)
        assert torch.equal(fast.bias.grad, ref.bias.grad)
    assert torch.equal(fast.running_mean, ref.running_mean)
    assert torch.equal(fast.running_var, ref.running_var)
    assert int(fast.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    fast.eval(), ref.eval()
    x = torch.randn(16, 6)
    assert torch.equal(fast(x), ref(x))


def test_threshold_splits_torch_and_fastbn(monkeypatch):
    calls = []
    original = fbt._fn.batch_norm_forward
    monkeypatch.setattr(fbt._fn, "batch_norm_forward",
                        lambda *a, **k: calls.append(a[0].size) or original(*a, **k))
    monkeypatch.setattr(fbt, "TORCH_BELOW", 100)
    module = fbt.BatchNorm1d(4)
    module(torch.randn(24, 4))   # 96 elements: torch
    module(torch.randn(25, 4))   # 100 elements: fastbn
    assert calls == [100]


def test_small_nonfinite_batch_leaves_running_stats_and_warns(monkeypatch):
    """The deliberate difference holds on the small-input (torch) path too."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 10_000)
    _fastbn_must_not_run(monkeypatch)
    for momentum in (0.1, None):
        module = fbt.BatchNorm1d(3, momentum=momentum)
        module(torch.randn(8, 3))
        before = (module.running_mean.clone(), module.running_var.clone(),
                  int(module.num_batches_tracked))
        x = torch.randn(8, 3)
        x[2, 1] = float("inf")
        fbt._FastBatchNormMixin._warned_nonfinite = False
        with pytest.warns(RuntimeWarning, match="non-finite"):
            y = module(x)
        assert torch.isnan(y[:, 1]).all()
        assert torch.equal(module.running_mean, before[0])
        assert torch.equal(module.running_var, before[1])
        assert int(module.num_batches_tracked) == before[2]
        # a finite batch afterwards updates as torch.nn would
        ref = torch.nn.BatchNorm1d(3, momentum=momentum)
        ref.load_state_dict(module.state_dict())
        x = torch.randn(8, 3)
        module(x), ref(x)
        assert torch.equal(module.running_mean, ref.running_mean)
        assert int(module.num_batches_tracked) == int(ref.num_batches_tracked)


def test_small_path_leaves_already_nonfinite_stats_to_torch(monkeypatch):
    """Running stats that were NaN before (a loaded state) are not 'restored' each step."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 10_000)
    module, ref = fbt.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    for m in (module, ref):
        m.running_mean[0] = float("nan")
    x = torch.randn(8, 3)
    module(x), ref(x)
    assert int(module.num_batches_tracked) == int(ref.num_batches_tracked) == 1
    assert torch.equal(module.running_var, ref.running_var)


def test_torch_below_from_environment(monkeypatch):
    monkeypatch.setenv("FASTBN_TORCH_BELOW", "4096")
    assert fbt._config.env_count("FASTBN_TORCH_BELOW", 1 << 18) == 4096
    monkeypatch.setenv("FASTBN_TORCH_BELOW", "-3")
    assert fbt._config.env_count("FASTBN_TORCH_BELOW", 1 << 18) == 0
    monkeypatch.setenv("FASTBN_TORCH_BELOW", "many")
    with pytest.warns(RuntimeWarning, match="FASTBN_TORCH_BELOW"):
        assert fbt._config.env_count("FASTBN_TORCH_BELOW", 1 << 18) == 1 << 18
    monkeypatch.delenv("FASTBN_TORCH_BELOW")
    assert fbt._config.env_count("FASTBN_TORCH_BELOW", 1 << 18) == 1 << 18


def test_small_path_matches_torch_errors_and_3d_inputs(monkeypatch):
    """The small path calls torch.batch_norm itself: torch.nn's checks and bits hold."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 10_000)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        fbt.BatchNorm1d(4)(torch.randn(1, 4))
    with pytest.raises(ValueError, match="expected 2D or 3D input"):
        fbt.BatchNorm1d(4)(torch.randn(2, 4, 3, 3))
    fast, ref = fbt.BatchNorm1d(4, affine=False), torch.nn.BatchNorm1d(4, affine=False)
    x = torch.randn(3, 4, 5)
    assert torch.equal(fast(x), ref(x))
    assert torch.equal(fast.running_var, ref.running_var)
    assert int(fast.num_batches_tracked) == int(ref.num_batches_tracked) == 1
