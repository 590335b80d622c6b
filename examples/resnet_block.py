"""A small residual network in NumPy, trained with fastbn's fused residual block.

    x -> affine -> BatchNorm(relu=True)                                   (stem)
      -> [ h -> affine -> BatchNorm(relu=True) -> affine -> BatchNorm(relu=True)(., residual=h) ]
         x n_blocks                                                        (residual blocks)
      -> affine -> softmax cross-entropy                                   (head)

Each block ends with ``relu(bn(u) + h)`` in one call, ``bn2(u, residual=h)``;
its backward returns the gradients of both inputs, ``du, dh = bn2.backward(dy)``.
``--unfused`` builds the same network with ``relu=False`` and the add and
ReLU written out in NumPy: the fused and unfused networks compute the same
bits (fastbn's fused block does the same float operations in the same
order), so the two runs print the same losses; only the time differs.  Run::

    python examples/resnet_block.py            # fused
    python examples/resnet_block.py --unfused  # the same network op by op

``tests/test_resnet_block_example.py`` imports this file: it checks the
gradients against finite differences and the fused run against the unfused one.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fastbn import BatchNorm


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """Mean cross-entropy of integer ``labels`` and its gradient with respect to ``logits``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    dlogits = np.exp(log_probs)
    dlogits[np.arange(n), labels] -= 1
    return float(-log_probs[np.arange(n), labels].mean()), dlogits / n


class Affine:
    def __init__(self, rng, n_in, n_out, dtype):
        self.W = (rng.standard_normal((n_in, n_out)) * np.sqrt(2 / n_in)).astype(dtype)
        self.b = np.zeros(n_out, dtype)
        self.dW, self.db = np.zeros_like(self.W), np.zeros_like(self.b)

    def forward(self, x):
        self._x = x
        return x @ self.W + self.b

    def backward(self, dy):
        np.matmul(self._x.T, dy, out=self.dW)
        np.sum(dy, axis=0, out=self.db)
        return dy @ self.W.T


class Block:
    """``relu(bn2(affine2(relu(bn1(affine1(h))))) + h)``; fused or op by op."""

    def __init__(self, rng, width, dtype, fused=True):
        self.fc1, self.fc2 = Affine(rng, width, width, dtype), Affine(rng, width, width, dtype)
        self.bn1 = BatchNorm(width, relu=True, dtype=dtype)
        self.bn2 = BatchNorm(width, relu=fused, dtype=dtype)
        self.fused = fused

    def layers(self):
        return [self.fc1, self.bn1, self.fc2, self.bn2]

    def forward(self, h):
        u = self.fc2.forward(self.bn1(self.fc1.forward(h)))
        if self.fused:
            return self.bn2(u, residual=h)  # relu(bn2(u) + h), one fused call
        self._out = np.maximum(self.bn2(u) + h, 0)
        return self._out

    def backward(self, dy):
        if self.fused:
            du, dh = self.bn2.backward(dy)
        else:
            dh = np.where(self._out > 0, dy, 0)
            du = self.bn2.backward(dh)
        return self.fc1.backward(self.bn1.backward(self.fc2.backward(du))) + dh


class ResNet:
    def __init__(self, n_in, width, n_out, n_blocks=3, dtype=np.float64, seed=0, fused=True):
        rng = np.random.default_rng(seed)
        self.stem, self.stem_bn = Affine(rng, n_in, width, dtype), BatchNorm(width, relu=True,
                                                                             dtype=dtype)
        self.blocks = [Block(rng, width, dtype, fused) for _ in range(n_blocks)]
        self.head = Affine(rng, width, n_out, dtype)

    def layers(self):
        return [self.stem, self.stem_bn, *(layer for b in self.blocks for layer in b.layers()),
                self.head]

    def train(self, mode=True):
        for layer in self.layers():
            if isinstance(layer, BatchNorm):
                layer.train(mode)
        return self

    def forward(self, x):
        h = self.stem_bn(self.stem.forward(x))
        for block in self.blocks:
            h = block.forward(h)
        return self.head.forward(h)

    def backward(self, dlogits):
        dh = self.head.backward(dlogits)
        for block in reversed(self.blocks):
            dh = block.backward(dh)
        self.stem.backward(self.stem_bn.backward(dh))

    def parameters_and_gradients(self):
        for layer in self.layers():
            if isinstance(layer, Affine):
                yield from ((layer.W, layer.dW), (layer.b, layer.db))
            else:
                yield from zip(layer.parameters(), layer.gradients(), strict=True)


def make_problem(n=2048, n_in=16, n_classes=4, seed=0, dtype=np.float64):
    """Classes that are regions of a random nonlinear map of Gaussian inputs."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_in))
    hidden = np.tanh(x @ rng.standard_normal((n_in, 32)))
    labels = np.argmax(hidden @ rng.standard_normal((32, n_classes)), axis=1)
    return x.astype(dtype), labels


def train(model, x, labels, steps=300, lr=0.1, batch_size=128, seed=0, log_every=0):
    rng = np.random.default_rng(seed)
    losses = []
    for step in range(steps):
        idx = rng.choice(len(x), batch_size, replace=False)
        loss, dlogits = softmax_cross_entropy(model.forward(x[idx]), labels[idx])
        model.backward(dlogits)
        for p, g in model.parameters_and_gradients():
            p -= lr * g
        losses.append(loss)
        if log_every and step % log_every == 0:
            print(f"step {step:4d}  loss {loss:.4f}")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--unfused", action="store_true", help="add and ReLU op by op")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--width", type=int, default=256)
    args = parser.parse_args(argv)
    x, labels = make_problem(dtype=np.float32)
    model = ResNet(16, args.width, 4, dtype=np.float32, fused=not args.unfused)
    start = time.perf_counter()
    train(model, x, labels, steps=args.steps, log_every=50)
    elapsed = time.perf_counter() - start
    accuracy = np.mean(np.argmax(model.train(False).forward(x), axis=1) == labels)
    print(f"{'unfused' if args.unfused else 'fused'}: {elapsed / args.steps * 1e3:.2f} ms per "
          f"step, eval accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
