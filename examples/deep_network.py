"""Why batch norm matters: a 20-layer ReLU network, measured and drawn with fastbn.

A batch of 100 samples of dimension 1000 goes through 20 hidden layers of 100
units (NumPy affine layers, ReLU, and ``fastbn.BatchNorm``), in three
configurations:

* ``plain``      -- affine -> ReLU (no normalization);
* ``bn_before``  -- affine -> BatchNorm -> ReLU (the paper's placement);
* ``bn_after``   -- affine -> ReLU -> BatchNorm (what much blog code does).

Rows are samples; each BatchNorm normalizes every unit over the batch axis
(``axis=1`` is the channel axis of a ``(batch, units)`` array).

1. One forward and one backward pass (from a random upstream gradient) per
   configuration: per layer, the activations' mean, std and fraction of exact
   zeros, and the std of the input gradient and of the weight gradient.
   Printed as tables and drawn (histograms per layer, std against depth).
2. Training on real data that ships with scikit-learn (``load_digits``, no
   download): the same deep MLP with and without batch norm, SGD, two
   learning rates; loss and accuracy per epoch, train and held-out, and the
   eval-mode accuracy with the running statistics at the end.
3. Three derivations, one answer: the closed form (fastbn's kernels and
   ``reference.backward``), the paper's chain (``reference.paper_backward``)
   and a staged graph (``reference.graph_backward``) on the network's own
   activations, float64.

Run it (figures go to ``--out``, default ``examples/results/``)::

    make demo
    python examples/deep_network.py --init xavier --out /tmp/figures

Needs matplotlib and scikit-learn (``pip install -e '.[examples]'``).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import fastbn
from fastbn import reference

CONFIGS = ("plain", "bn_before", "bn_after")
TITLES = {"plain": "no batch norm", "bn_before": "batch norm before ReLU",
          "bn_after": "batch norm after ReLU"}
INITS = ("small", "xavier", "he")
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------
# The network: affine layers in NumPy, BatchNorm from fastbn, explicit backward
# ---------------------------------------------------------------------------


def init_weights(n_in: int, n_out: int, init: str, rng) -> np.ndarray:
    """Weights of shape (n_in, n_out): small Gaussian (0.01), Xavier/Glorot or He."""
    scale = {"small": 0.01, "xavier": np.sqrt(2.0 / (n_in + n_out)),
             "he": np.sqrt(2.0 / n_in)}[init]
    return rng.standard_normal((n_in, n_out)) * scale


@dataclass
class Layer:
    """affine (W, b), then ReLU, with a BatchNorm before or after the ReLU (or none)."""

    W: np.ndarray
    b: np.ndarray
    bn: fastbn.BatchNorm | None
    bn_before_relu: bool
    cache: dict = field(default_factory=dict)
    dW: np.ndarray | None = None
    db: np.ndarray | None = None

    def forward(self, x: np.ndarray) -> np.ndarray:
        z = x @ self.W + self.b  # affine
        if self.bn is not None and self.bn_before_relu:
            z = self.bn(z)  # normalized over the batch axis (rows are samples)
        out = np.maximum(z, 0)
        if self.bn is not None and not self.bn_before_relu:
            out = self.bn(out)
        self.cache = {"x": x, "pre": z, "out": out}
        return out

    def backward(self, dout: np.ndarray) -> np.ndarray:
        if self.bn is not None and not self.bn_before_relu:
            dout = self.bn.backward(dout)
        dz = dout * (self.cache["pre"] > 0)  # ReLU
        if self.bn is not None and self.bn_before_relu:
            dz = self.bn.backward(dz)
        self.dW = self.cache["x"].T @ dz
        self.db = dz.sum(axis=0)
        return dz @ self.W.T

    def parameters(self):
        """(parameter, gradient) pairs, including the batch norm's gamma and beta."""
        pairs = [(self.W, self.dW), (self.b, self.db)]
        if self.bn is not None:
            pairs += list(zip(self.bn.parameters(), self.bn.gradients(), strict=True))
        return pairs


def build_network(config: str, init: str, n_in: int, width: int = 100, depth: int = 20,
                  seed: int = 0) -> list[Layer]:
    """``depth`` hidden layers of ``width`` units in one of the three configurations."""
    rng = np.random.default_rng(seed)
    layers = []
    for i in range(depth):
        fan_in = n_in if i == 0 else width
        bn = None if config == "plain" else fastbn.BatchNorm(width, dtype=np.float64)
        layers.append(Layer(init_weights(fan_in, width, init, rng), np.zeros(width), bn,
                            bn_before_relu=config == "bn_before"))
    return layers


def forward(layers: list[Layer], x: np.ndarray) -> np.ndarray:
    for layer in layers:
        x = layer.forward(x)
    return x


def backward(layers: list[Layer], dout: np.ndarray) -> np.ndarray:
    for layer in reversed(layers):
        dout = layer.backward(dout)
    return dout


def set_mode(layers: list[Layer], training: bool) -> None:
    for layer in layers:
        if layer.bn is not None:
            layer.bn.train(training)


# ---------------------------------------------------------------------------
# 1. One pass: activation and gradient statistics per layer
# ---------------------------------------------------------------------------


def one_pass(config: str, init: str, batch: int = 100, n_in: int = 1000, depth: int = 20,
             seed: int = 0) -> dict:
    """Forward and backward once; per-layer statistics and the raw values for plots."""
    rng = np.random.default_rng(seed)
    layers = build_network(config, init, n_in, depth=depth, seed=seed)
    x = rng.standard_normal((batch, n_in))
    out = forward(layers, x)
    upstream = rng.standard_normal(out.shape)  # a random dL/d(output)
    dout = upstream
    input_grads = [None] * depth
    for i in reversed(range(depth)):
        dout = layers[i].backward(dout)
        input_grads[i] = dout
    stats = []
    for i, layer in enumerate(layers):
        act = layer.cache["out"]
        stats.append({
            "layer": i + 1,
            "act_mean": float(act.mean()),
            "act_std": float(act.std()),
            "act_zero": float(np.mean(act == 0)),
            "pre_std": float(layer.cache["pre"].std()),
            "grad_in_std": float(input_grads[i].std()),
            "grad_w_std": float(layer.dW.std()),
        })
    return {"config": config, "init": init, "stats": stats,
            "activations": [layer.cache["out"] for layer in layers],
            "pre_activations": [layer.cache["pre"] for layer in layers],
            "input_grads": input_grads, "layers": layers}


def format_table(result: dict) -> str:
    header = (f"{TITLES[result['config']]} ({result['init']} init)\n"
              f"{'layer':>5} {'act mean':>10} {'act std':>10} {'zeros':>7} "
              f"{'dx std':>10} {'dW std':>10}")
    rows = [f"{s['layer']:>5} {s['act_mean']:>10.3g} {s['act_std']:>10.3g} "
            f"{s['act_zero']:>7.1%} {s['grad_in_std']:>10.3g} {s['grad_w_std']:>10.3g}"
            for s in result["stats"]]
    return "\n".join([header, *rows])


# ---------------------------------------------------------------------------
# 2. Training on load_digits
# ---------------------------------------------------------------------------


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray):
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = len(labels)
    loss = -log_probs[np.arange(n), labels].mean()
    dlogits = np.exp(log_probs)
    dlogits[np.arange(n), labels] -= 1
    return float(loss), dlogits / n


class DeepMLP:
    """``depth`` hidden layers (a configuration of the above) and a linear classifier."""

    def __init__(self, config: str, init: str, n_in: int, n_classes: int, depth: int,
                 seed: int):
        self.hidden = build_network(config, init, n_in, depth=depth, seed=seed)
        rng = np.random.default_rng(seed + 1)
        self.W = init_weights(100, n_classes, "xavier", rng)
        self.b = np.zeros(n_classes)

    def logits(self, x):
        self._h = forward(self.hidden, x)
        return self._h @ self.W + self.b

    def step(self, x, labels, lr: float) -> tuple[float, int]:
        """One SGD step in training mode; (loss, correct predictions) of this minibatch."""
        logits = self.logits(x)
        correct = int(np.sum(logits.argmax(axis=1) == labels))
        loss, dlogits = softmax_cross_entropy(logits, labels)
        dW, db = self._h.T @ dlogits, dlogits.sum(axis=0)
        backward(self.hidden, dlogits @ self.W.T)
        self.W -= lr * dW
        self.b -= lr * db
        for layer in self.hidden:
            for p, g in layer.parameters():
                p -= lr * g
        return loss, correct

    def evaluate(self, x, labels):
        """Eval mode (batch norm with its running statistics): (loss, accuracy)."""
        set_mode(self.hidden, False)
        logits = self.logits(x)
        set_mode(self.hidden, True)
        loss, _ = softmax_cross_entropy(logits, labels)
        return loss, float(np.mean(logits.argmax(axis=1) == labels))


def load_data(seed: int = 0):
    """sklearn's digits (1797 8x8 images, shipped with the package), standardized, 80/20."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = digits.data.astype(np.float64)
    labels = digits.target
    order = np.random.default_rng(seed).permutation(len(labels))
    x, labels = x[order], labels[order]
    n_train = int(0.8 * len(labels))
    mean, std = x[:n_train].mean(axis=0), x[:n_train].std(axis=0) + 1e-8
    x = (x - mean) / std
    return x[:n_train], labels[:n_train], x[n_train:], labels[n_train:]


def train(config: str, init: str, lr: float, epochs: int, depth: int = 20, batch: int = 100,
          seed: int = 0, data=None) -> dict:
    """SGD on minibatches of ``batch`` rows.

    Per epoch: the training loss and accuracy of the minibatches as they were
    trained on (training mode, batch statistics), and the held-out loss and
    accuracy in eval mode (running statistics, as the model would be used).
    """
    x_train, y_train, x_test, y_test = data if data is not None else load_data(seed)
    model = DeepMLP(config, init, x_train.shape[1], 10, depth, seed)
    rng = np.random.default_rng(seed)
    history = []
    with np.errstate(over="ignore", invalid="ignore"):  # a diverging run shows as nan
        _train_epochs(model, x_train, y_train, x_test, y_test, lr, epochs, batch, rng, history)
    return {"config": config, "lr": lr, "history": history,
            "eval_accuracy": history[-1]["test_acc"], "final_loss": history[-1]["train_loss"]}


def _train_epochs(model, x_train, y_train, x_test, y_test, lr, epochs, batch, rng, history):
    steps = 0
    for epoch in range(1, epochs + 1):
        order = rng.permutation(len(y_train))
        losses, correct, seen = [], 0, 0
        for start in range(0, len(order) - batch + 1, batch):  # full batches only
            idx = order[start:start + batch]
            loss, hits = model.step(x_train[idx], y_train[idx], lr)
            losses.append(loss)
            correct += hits
            seen += len(idx)
            steps += 1
        test_loss, test_acc = model.evaluate(x_test, y_test)
        history.append({"epoch": epoch, "steps": steps, "train_loss": float(np.mean(losses)),
                        "train_acc": correct / seen, "test_loss": test_loss,
                        "test_acc": test_acc})


def format_training(runs: list[dict]) -> str:
    lines = [f"{'run':<30} {'epoch':>5} {'train loss':>10} {'train acc':>9} "
             f"{'test loss':>9} {'test acc':>8}"]
    for run in runs:
        name = f"{TITLES[run['config']]}, lr={run['lr']:g}"
        for h in run["history"]:
            lines.append(f"{name:<30} {h['epoch']:>5} {h['train_loss']:>10.4f} "
                         f"{h['train_acc']:>9.1%} {h['test_loss']:>9.4f} {h['test_acc']:>8.1%}")
        lines.append(f"{name:<30} final held-out accuracy, eval mode (running statistics): "
                     f"{run['eval_accuracy']:.1%}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# 3. Three derivations, one answer
# ---------------------------------------------------------------------------


def compare_derivations(pre_activation: np.ndarray, seed: int = 0) -> dict:
    """Largest differences between fastbn's kernels and the three references (float64)."""
    x = np.asarray(pre_activation, np.float64)
    rng = np.random.default_rng(seed)
    gamma = rng.uniform(0.5, 1.5, x.shape[1])
    beta = rng.standard_normal(x.shape[1])
    dy = rng.standard_normal(x.shape)
    _, ctx = fastbn.batch_norm_forward(x, gamma, beta)
    kernels = fastbn.batch_norm_backward(dy, ctx)
    _, cache = reference.forward(x, gamma, beta)
    _, tape = reference.graph_forward(x, gamma, beta)
    derived = {"closed form": reference.backward(dy, cache),
               "paper (dL/dx_hat, dL/dvar, dL/dmean)": reference.paper_backward(dy, cache),
               "staged graph": reference.graph_backward(dy, tape)}
    return {name: max(float(np.max(np.abs(a - b))) for a, b in zip(grads, kernels, strict=True))
            for name, grads in derived.items()}


# ---------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(results: list[dict], key: str, title: str, path: Path,
                    layers=(1, 5, 10, 15, 20)) -> None:
    """A grid: one row per configuration, one column per selected layer."""
    plt = _pyplot()
    layers = [i for i in layers if i <= len(results[0]["stats"])]
    fig, axes = plt.subplots(len(results), len(layers), figsize=(2.6 * len(layers),
                             2.2 * len(results)), squeeze=False)
    for row, result in enumerate(results):
        for col, i in enumerate(layers):
            values = result[key][i - 1].ravel()
            ax = axes[row, col]
            ax.hist(values, bins=50, color=f"C{row}")
            ax.set_title(f"layer {i}: std {values.std():.2g}", fontsize=8)
            ax.tick_params(labelsize=6)
            if col == 0:
                ax.set_ylabel(TITLES[result["config"]], fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_std_vs_depth(results: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for n, result in enumerate(results):
        depth = [s["layer"] for s in result["stats"]]
        axes[0].semilogy(depth, [s["act_std"] for s in result["stats"]], "o-", color=f"C{n}",
                         label=TITLES[result["config"]])
        axes[1].semilogy(depth, [s["grad_w_std"] for s in result["stats"]], "o-",
                         color=f"C{n}", label=TITLES[result["config"]])
    axes[0].set(title="activation std", xlabel="layer")
    axes[1].set(title="weight-gradient std", xlabel="layer")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"20-layer ReLU network, {results[0]['init']} initialization")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_training(runs: list[dict], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for n, run in enumerate(runs):
        epochs = [h["epoch"] for h in run["history"]]
        label = f"{TITLES[run['config']]}, lr={run['lr']:g}"
        axes[0].plot(epochs, [h["train_loss"] for h in run["history"]], "-", color=f"C{n}",
                     label=f"{label} (train)")
        axes[0].plot(epochs, [h["test_loss"] for h in run["history"]], "--", color=f"C{n}")
        axes[1].plot(epochs, [h["test_acc"] for h in run["history"]], "--", color=f"C{n}",
                     label=f"{label} (held-out)")
        axes[1].plot(epochs, [h["train_acc"] for h in run["history"]], "-", color=f"C{n}")
    axes[0].set(title="loss (solid: train, dashed: held-out, eval mode)", xlabel="epoch",
                yscale="log")
    axes[1].set(title="accuracy (solid: train, dashed: held-out, eval mode)", xlabel="epoch",
                ylim=(0, 1))
    axes[1].legend(fontsize=7)
    fig.suptitle("deep MLP on sklearn digits, SGD")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------------------


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the figures")
    parser.add_argument("--init", choices=INITS, default="small",
                        help="weight initialization (default: small Gaussian, sigma = 0.01)")
    parser.add_argument("--train-init", choices=INITS, default="he",
                        help="initialization for the training comparison (default: He)")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs per run")
    parser.add_argument("--lrs", default="0.05,0.5", help="two (or more) learning rates")
    parser.add_argument("--depth", type=int, default=20, help="hidden layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-training", action="store_true", help="skip the training part")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)

    results = [one_pass(c, args.init, depth=args.depth, seed=args.seed) for c in CONFIGS]
    for result in results:
        print(format_table(result), end="\n\n")
    plot_histograms(results, "activations", f"activations per layer ({args.init} init)",
                    args.out / "activations.png")
    plot_histograms(results, "input_grads", f"input gradients per layer ({args.init} init)",
                    args.out / "gradients.png")
    plot_std_vs_depth(results, args.out / "std_vs_depth.png")

    differences = compare_derivations(results[1]["pre_activations"][args.depth // 2], args.seed)
    print("Three derivations vs fastbn's kernels on layer "
          f"{args.depth // 2 + 1}'s pre-activations (float64), largest difference:")
    for name, value in differences.items():
        print(f"  {name:<40} {value:.2e}")
    print()

    runs = []
    if not args.no_training:
        data = load_data(args.seed)
        for lr in (float(v) for v in args.lrs.split(",")):
            for config in ("plain", "bn_before"):
                runs.append(train(config, args.train_init, lr, args.epochs, depth=args.depth,
                                  seed=args.seed, data=data))
        print(f"Training on sklearn digits ({args.train_init} init, {args.depth} hidden layers, "
              "batch 100):")
        print(format_training(runs))
        plot_training(runs, args.out / "training.png")
    print(f"\nfigures in {args.out}; {time.perf_counter() - started:.1f} s")
    return {"one_pass": results, "derivations": differences, "training": runs}


if __name__ == "__main__":
    main()
