"""fastbn.torch.SyncBatchNorm: gloo on localhost, 2 and 3 processes, equal to BatchNorm2d
on the concatenated global batch (uneven and empty local batches, channels-last)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="the PyTorch bridge tests need torch")


@pytest.mark.slow
@pytest.mark.parametrize("rows, channels_last", [([5, 9], False), ([1, 0, 8], True),
                                                 ([3, 4, 2], False)])
def test_sync_batch_norm_equals_global_batch_norm(tmp_path, rows, channels_last):
    import torch.multiprocessing as mp

    from . import torch_sync_worker

    world = len(rows)
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(torch_sync_worker.main, args=(world, str(tmp_path / "init"), rows,
                                                     channels_last, results),
                       nprocs=world, start_method="spawn", join=True)
    assert dict(results) == dict.fromkeys(range(world), True)


def test_torch_sync_batch_norm_refuses_cpu_but_ours_does_not():
    import fastbn.torch as fbt

    module = fbt.SyncBatchNorm(3)
    assert isinstance(module, torch.nn.SyncBatchNorm)
    # Without an initialized process group it behaves like a local BatchNorm.
    y = module(torch.randn(6, 3))
    assert torch.allclose(y.mean(0), torch.zeros(3), atol=1e-6)


def test_convert_sync_batchnorm_reuses_parameters():
    import fastbn.torch as fbt

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    weight = model[1].weight
    converted = fbt.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(converted[1], fbt.SyncBatchNorm)
    assert converted[1].weight is weight
