"""A three-layer NumPy MLP with a fastbn BatchNorm, trained with plain SGD.

    x -> affine (W1, b1) -> BatchNorm(relu=True) -> affine (W2, b2) -> softmax cross-entropy

Every gradient is explicit: the affine layers are two lines of NumPy each and
the batch norm is ``fastbn.BatchNorm.backward``.  Run it::

    python examples/mlp.py

It prints the loss every 50 steps and the accuracy in eval mode (running
statistics) at the end.  ``tests/test_mlp.py`` imports this file: it trains the
same network and checks every gradient against finite differences.
"""

from __future__ import annotations

import numpy as np

from fastbn import BatchNorm


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    """Mean cross-entropy of integer ``labels`` and its gradient with respect to ``logits``."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    loss = -log_probs[np.arange(n), labels].mean()
    dlogits = np.exp(log_probs)
    dlogits[np.arange(n), labels] -= 1
    return float(loss), dlogits / n


class MLP:
    """affine -> BatchNorm(relu=True) -> affine, with explicit backward and SGD."""

    def __init__(self, n_in: int, n_hidden: int, n_out: int, dtype=np.float64, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.W1 = (rng.standard_normal((n_in, n_hidden)) * np.sqrt(2 / n_in)).astype(dtype)
        self.b1 = np.zeros(n_hidden, dtype)
        self.bn = BatchNorm(n_hidden, relu=True, dtype=dtype)
        self.W2 = (rng.standard_normal((n_hidden, n_out)) * np.sqrt(1 / n_hidden)).astype(dtype)
        self.b2 = np.zeros(n_out, dtype)
        self.dW1, self.db1 = np.zeros_like(self.W1), np.zeros_like(self.b1)
        self.dW2, self.db2 = np.zeros_like(self.W2), np.zeros_like(self.b2)
        self._x = self._h = None

    def train(self, mode: bool = True) -> MLP:
        self.bn.train(mode)
        return self

    def eval(self) -> MLP:
        return self.train(False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits for ``x`` of shape (batch, n_in)."""
        self._x = x
        self._h = self.bn(x @ self.W1 + self.b1)
        return self._h @ self.W2 + self.b2

    def backward(self, dlogits: np.ndarray) -> np.ndarray:
        """Fill the gradient buffers from the last forward call; return ``dL/dx``."""
        self.dW2[...] = self._h.T @ dlogits
        self.db2[...] = dlogits.sum(axis=0)
        dz1 = self.bn.backward(dlogits @ self.W2.T)
        self.dW1[...] = self._x.T @ dz1
        self.db1[...] = dz1.sum(axis=0)
        return dz1 @ self.W1.T

    def parameters(self) -> list:
        return [self.W1, self.b1, *self.bn.parameters(), self.W2, self.b2]

    def gradients(self) -> list:
        return [self.dW1, self.db1, *self.bn.gradients(), self.dW2, self.db2]

    def sgd_step(self, lr: float) -> None:
        for p, g in zip(self.parameters(), self.gradients(), strict=True):
            p -= lr * g

    def loss(self, x: np.ndarray, labels: np.ndarray) -> float:
        return softmax_cross_entropy(self.forward(x), labels)[0]


def make_problem(n: int = 512, n_in: int = 10, n_classes: int = 3, dtype=np.float64,
                 seed: int = 0):
    """A fixed synthetic classification task: labels from a random nonlinear teacher.

    The inputs are deliberately off-centre and badly scaled (per-feature offset
    and scale), which is what batch normalization is for.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, n_in))
    teacher1 = rng.standard_normal((n_in, 16))
    teacher2 = rng.standard_normal((16, n_classes))
    labels = np.argmax(np.tanh(x @ teacher1) @ teacher2, axis=1)
    x = x * rng.uniform(0.5, 5.0, n_in) + rng.uniform(-3.0, 3.0, n_in)
    return x.astype(dtype), labels


def train(model: MLP, x: np.ndarray, labels: np.ndarray, steps: int = 300, lr: float = 0.3,
          batch_size: int = 32, seed: int = 0, log_every: int = 0) -> list:
    """Plain minibatch SGD; returns the minibatch losses."""
    rng = np.random.default_rng(seed)
    model.train()
    losses = []
    for step in range(steps):
        idx = rng.choice(x.shape[0], batch_size, replace=False)
        loss, dlogits = softmax_cross_entropy(model.forward(x[idx]), labels[idx])
        model.backward(dlogits)
        model.sgd_step(lr)
        losses.append(loss)
        if log_every and step % log_every == 0:
            print(f"step {step:4d}  loss {loss:.4f}")
    return losses


def main() -> None:
    x, labels = make_problem()
    model = MLP(x.shape[1], 32, int(labels.max()) + 1)
    model.train()
    print(f"initial loss (training mode, full batch): {model.loss(x, labels):.4f}")
    train(model, x, labels, steps=400, log_every=50)
    model.eval()
    accuracy = (model.forward(x).argmax(axis=1) == labels).mean()
    print(f"final loss (eval mode): {model.loss(x, labels):.4f}  accuracy: {accuracy:.3f}")


if __name__ == "__main__":
    main()
