"""One gloo rank of tests/test_torch_sync.py (spawned; importable by the children)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def _close(a, b, tol):
    a, b = a.detach(), b.detach()
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or float((a - b).abs().max()) <= tol * max(float(b.abs().max()), 1.0)


def run(rank, world, init_file, rows, channels_last, results):
    import fastbn.torch as fbt

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        ref = torch.nn.BatchNorm2d(4, dtype=torch.float64)
        sync = fbt.SyncBatchNorm(4, dtype=torch.float64)
        start = sum(rows[:rank])
        local = slice(start, start + rows[rank])
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        ok = True
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            x = torch.randn(sum(rows), 4, 3, 5, generator=gen, dtype=torch.float64) * 2 + step
            dy = torch.randn(x.shape, generator=gen, dtype=torch.float64)
            x_ref = x.clone().requires_grad_()
            x_loc = x[local].clone().contiguous(memory_format=fmt).requires_grad_()
            y_ref, y_loc = ref(x_ref), sync(x_loc)
            (y_ref * dy).sum().backward()
            (y_loc * dy[local]).sum().backward()
            grads = torch.stack([sync.weight.grad, sync.bias.grad])
            dist.all_reduce(grads)  # what DDP does with every gradient
            ok &= _close(y_loc, y_ref[local], 1e-10)
            ok &= _close(x_loc.grad, x_ref.grad[local], 1e-10)
            ok &= _close(grads[0], ref.weight.grad, 1e-10)
            ok &= _close(grads[1], ref.bias.grad, 1e-10)
            ok &= _close(sync.running_mean, ref.running_mean, 1e-10)
            ok &= _close(sync.running_var, ref.running_var, 1e-10)
            ok &= int(sync.num_batches_tracked) == int(ref.num_batches_tracked)
            for m, g in ((ref, (ref.weight.grad, ref.bias.grad)), (sync, grads)):
                with torch.no_grad():
                    m.weight -= 0.1 * g[0]
                    m.bias -= 0.1 * g[1]
                m.weight.grad = m.bias.grad = None
        # NaN on the last rank: every rank raises, nothing changes
        before = sync.running_mean.clone()
        bad = torch.randn(max(rows[rank], 1), 4, 3, 5, dtype=torch.float64)
        if rank == world - 1:
            bad[0, 0, 0, 0] = float("nan")
        try:
            sync(bad)
            ok = False
        except FloatingPointError:
            ok &= torch.equal(sync.running_mean, before)
        results[rank] = bool(ok)
    finally:
        dist.destroy_process_group()


def main(rank, world, init_file, rows, channels_last, results):
    try:
        run(rank, world, init_file, rows, channels_last, results)
    except Exception as exc:  # reported to the parent, which fails the test
        results[rank] = f"{type(exc).__name__}: {exc}"
        raise
