"""Memory: no growth over many calls; with out= buffers nothing proportional to the input."""

import tracemalloc

import numpy as np

import fastbn

from .subprocess_utils import run_python

SOAK = """
import numpy as np, psutil, fastbn
process = psutil.Process()
rng = np.random.default_rng(0)
layers = [fastbn.BatchNorm(64), fastbn.BatchNorm(16, relu=True, axis=-1, dtype=np.float64)]
inputs = [rng.standard_normal((32, 64), dtype=np.float32),
          rng.standard_normal((4, 5, 5, 16))]
def step(i):
    layer, x = layers[i % 2], inputs[i % 2]
    layer.train(i % 7 != 0)
    y = layer(x)
    layer.backward(y)
for i in range(2000):
    step(i)
before = process.memory_info().rss
for i in range(20000):
    step(i)
after = process.memory_info().rss
print("growth_kib", (after - before) // 1024)
"""


def test_rss_does_not_grow_over_20000_layer_calls():
    result = run_python(["-c", SOAK], timeout=600)
    assert result.returncode == 0, result.stderr
    growth_kib = int(result.stdout.split()[-1])
    # Allocator noise is a few hundred KiB; a leak of even one 8 KiB array
    # per call would be 160 MiB.
    assert growth_kib < 4096, f"RSS grew by {growth_kib} KiB"


def test_out_buffers_allocate_nothing_proportional_to_the_input():
    rng = np.random.default_rng(1)
    n_channels = 256
    x = rng.standard_normal((8192, n_channels), dtype=np.float32)  # 8 MiB
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    gamma, beta = np.ones(n_channels, np.float32), np.zeros(n_channels, np.float32)
    y, dx = np.empty_like(x), np.empty_like(x)

    def step(out_y=None, out_dx=None):
        _, ctx = fastbn.batch_norm_forward(x, gamma, beta, relu=True, out=out_y)
        fastbn.batch_norm_backward(dy, ctx, out=out_dx)

    step(y, dx)  # compile outside the measurement
    tracemalloc.start()
    try:
        for _ in range(5):
            step(y, dx)
        _, peak_with_out = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        step()
        _, peak_without_out = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Only per-channel work arrays: statistics, constants and the reduction
    # partials (at most 64 chunks x 2 float64 = 1 KiB per channel), never
    # anything that scales with the batch.
    assert peak_with_out < 1536 * n_channels, peak_with_out
    assert peak_without_out >= x.nbytes  # the measurement does see array allocations
