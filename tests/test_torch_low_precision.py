"""fastbn.torch with 16-bit tensors: bfloat16 and float16 data with float32 parameters
(PyTorch's mixed type), under autocast, modules made 16-bit with ``.to()``, in-place
ReLU after the batch norm, channels_last, eval mode and the CPU SyncBatchNorm.

The oracle is torch.nn's batch norm on the same 16-bit values widened to float32:
fastbn's outputs are float32 arithmetic rounded once, so they must be within one
unit in the last place of the 16-bit format of it.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the PyTorch bridge tests need torch")
fbt = pytest.importorskip("fastbn.torch")

FORMATS = [torch.bfloat16, torch.float16]
IDS = ["bfloat16", "float16"]
LAYOUTS = [torch.contiguous_format, torch.channels_last]
#: unit roundoff of the 16-bit formats: one ulp is at most twice this, relative
UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


@pytest.fixture(autouse=True)
def _fastbn_everywhere(monkeypatch):
    """Every input goes through fastbn's kernels (the small-input fallback is torch's)."""
    monkeypatch.setattr(fbt, "TORCH_BELOW", 0)


def within_one_ulp(value: torch.Tensor, exact: torch.Tensor, fmt) -> bool:
    """``value`` (16-bit) within one 16-bit ulp of ``exact`` (float32 or wider)."""
    exact = exact.double()
    ulp = 2.0 * UNIT[fmt] * exact.abs().clamp(min=torch.finfo(fmt).tiny)
    # plus what float32 arithmetic may add on top of the exact value (far below an ulp)
    return bool(((value.double() - exact).abs() <= ulp * 1.01 + 1e-6 * exact.abs().max()).all())


def _pair(fmt, layout, shape=(8, 16, 12, 12)):
    x16 = torch.randn(shape).mul(2).add(0.5).to(fmt).contiguous(memory_format=layout)
    dy16 = torch.randn(shape).to(fmt).contiguous(memory_format=layout)
    return x16, dy16


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_mixed_type_module_matches_torch_in_float32_within_one_ulp(fmt, layout):
    torch.manual_seed(0)
    x16, dy16 = _pair(fmt, layout)
    reference = torch.nn.BatchNorm2d(16)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.normal_()
    module = fbt.convert(copy.deepcopy(reference))

    x = x16.clone().requires_grad_()
    y = module(x)
    y.backward(dy16)
    assert y.dtype == fmt and x.grad.dtype == fmt
    assert y.is_contiguous(memory_format=layout)
    assert module.weight.grad.dtype == torch.float32

    x32 = x16.float().requires_grad_()
    y32 = reference(x32)
    y32.backward(dy16.float())
    assert within_one_ulp(y, y32, fmt)
    assert within_one_ulp(x.grad, x32.grad, fmt)
    for ours, theirs in ((module.weight.grad, reference.weight.grad),
                         (module.bias.grad, reference.bias.grad),
                         (module.running_mean, reference.running_mean),
                         (module.running_var, reference.running_var)):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    module.eval()
    reference.eval()
    with torch.no_grad():
        assert within_one_ulp(module(x16), reference(x16.float()), fmt)


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_module_converted_to_16_bit(fmt):
    """``.to(torch.bfloat16)`` makes the parameters 16-bit too: fastbn widens them to
    float32 (exactly) and autograd hands their gradients back in 16 bits."""
    torch.manual_seed(1)
    x16, dy16 = _pair(fmt, torch.contiguous_format)
    reference = torch.nn.BatchNorm2d(16)
    module = fbt.convert(copy.deepcopy(reference)).to(fmt)
    x = x16.clone().requires_grad_()
    y = module(x)
    y.backward(dy16)
    assert y.dtype == fmt and module.weight.grad.dtype == fmt
    assert module.running_mean.dtype == fmt
    x32 = x16.float().requires_grad_()
    reference(x32).backward(dy16.float())
    assert within_one_ulp(y, reference.train()(x16.float()), fmt)
    assert within_one_ulp(module.weight.grad, reference.weight.grad, fmt)


@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_autocast_with_inplace_relu(fmt, layout):
    """Under autocast the convolution hands the batch norm 16-bit data and float32
    parameters; the in-place ReLU after it must not meet a view."""
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16),
                                torch.nn.ReLU(inplace=True), torch.nn.Conv2d(16, 4, 1))
    converted = fbt.convert(copy.deepcopy(model)).to(memory_format=layout)
    model = model.to(memory_format=layout)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=layout)
    losses, grads = [], []
    for m in (model, converted):
        with torch.autocast("cpu", dtype=fmt):
            out = m(x)
        loss = out.float().square().mean()
        loss.backward()
        losses.append(loss.detach())
        grads.append(m[0].weight.grad.clone())
    assert out.dtype == fmt
    torch.testing.assert_close(losses[1], losses[0], rtol=0.05, atol=1e-3)
    cosine = torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), 0)
    assert cosine > 0.99


def test_16_bit_nan_stays_in_its_channel_and_running_stats_are_kept():
    x = torch.randn(8, 4, 6, 6).to(torch.bfloat16)
    x[0, 2, 0, 0] = float("nan")
    module = fbt.BatchNorm2d(4)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        y = module(x)
    assert torch.isnan(y[:, 2]).all()
    assert torch.isfinite(y[:, [0, 1, 3]]).all()
    assert torch.isfinite(module.running_mean).all() and torch.isfinite(module.running_var).all()


@pytest.mark.parametrize("fmt", FORMATS, ids=IDS)
def test_sync_batch_norm_16_bit_in_a_one_process_group(tmp_path, fmt):
    import torch.distributed as dist

    torch.manual_seed(3)
    x16, dy16 = _pair(fmt, torch.contiguous_format, shape=(6, 5, 4, 4))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0,
                            world_size=1)
    try:
        sync = fbt.SyncBatchNorm(5)
        x = x16.clone().requires_grad_()
        y = sync(x)
        y.backward(dy16)
    finally:
        dist.destroy_process_group()
    reference = torch.nn.BatchNorm2d(5)
    x32 = x16.float().requires_grad_()
    y32 = reference(x32)
    y32.backward(dy16.float())
    assert y.dtype == fmt and x.grad.dtype == fmt and sync.weight.grad.dtype == torch.float32
    assert within_one_ulp(y, y32, fmt)
    assert within_one_ulp(x.grad, x32.grad, fmt)
    torch.testing.assert_close(sync.weight.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sync.running_var, reference.running_var, rtol=1e-5, atol=1e-6)


def test_16_bit_outputs_are_numpy_free_of_ml_dtypes():
    """fastbn.torch never needs ml_dtypes: bfloat16 reaches the kernels as marked bits."""
    import fastbn.functional as F

    bits = np.zeros((4, 3), np.int16)
    with pytest.raises(TypeError, match="int16"):
        F.batch_norm_forward(bits)  # a plain int16 array is never taken for bfloat16
    y, _ = F.batch_norm_forward(F._bfloat16_bits(torch.randn(4, 3).to(torch.bfloat16)
                                                 .view(torch.int16).numpy()),
                                out=F._bfloat16_bits(np.empty((4, 3), np.int16)))
    assert type(y) is F._BFloat16Bits
