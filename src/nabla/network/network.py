"""A network of sigmoid neurons, trained by mini-batch stochastic gradient descent.

This is the network of Michael Nielsen's book "Neural Networks and Deep
Learning" (chapters 1 to 3), written again for Python 3 and NumPy.  By default
it behaves like the book's first network (src/network.py): sigmoid neurons,
the quadratic cost, weights and biases drawn from a standard Gaussian.  The
improvements of the book's second network (src/network2.py) are options:
the cross-entropy cost, L2 regularisation (`lmbda`), weights scaled by
1/sqrt(n_in), monitoring of cost and accuracy per epoch, and saving to JSON.

Training takes the book's path: `SGD` deals the examples into mini-batches,
`update_mini_batch` takes one gradient-descent step per mini-batch, and
`backprop` computes the gradient for that step.

What differs from the book: `update_mini_batch` and `backprop` work on a
whole mini-batch at once, the examples being the columns of one matrix (the
book's exercise in chapter 2), so there is no loop over the examples (the
tests and benchmarks/bench_network.py keep the book's loop to compare
against); randomness comes from a seeded `np.random.Generator`; `SGD` never
shuffles the caller's list and returns its per-epoch metrics.

Left out: softmax layers, convolutions, dropout, momentum, learning-rate
schedules and early stopping (the book's chapters 3 and 6), and GPUs.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import secrets
from collections.abc import Callable, Sequence

import numpy as np

from nabla.errors import CheckpointError, ConfigError

#### Neurons


def sigmoid(z):
    """The sigmoid function 1 / (1 + e^-z), applied elementwise."""
    with np.errstate(over="ignore"):  # below z = -709 e^-z is inf, and 1 / inf the 0 it should be
        return 1.0 / (1.0 + np.exp(-z))


def sigmoid_prime(z):
    """Derivative of the sigmoid function."""
    s = sigmoid(z)
    return s * (1 - s)


#### Costs: `fn` is the cost summed over the columns (examples) of `a` and `y`;
#### `delta` is the error of the output layer, dC/dz, one column per example.


class QuadraticCost:
    name = "quadratic"

    @staticmethod
    def fn(a, y):
        """Half the squared distance between output `a` and target `y`."""
        return 0.5 * float(np.sum((a - y) ** 2))

    @staticmethod
    def delta(z, a, y):
        return (a - y) * sigmoid_prime(z)


class CrossEntropyCost:
    name = "cross-entropy"

    @staticmethod
    def fn(a, y):
        """-y ln a - (1-y) ln(1-a), summed.  Where a and y are both 0 (or both 1)
        the term is 0 * -inf = nan; `nan_to_num` makes it the 0 it should be."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return float(np.sum(np.nan_to_num(-y * np.log(a) - (1 - y) * np.log(1 - a))))

    @staticmethod
    def delta(z, a, y):
        # The sigmoid's derivative cancels: no learning slowdown when a saturates.
        return a - y


COSTS = {cost.name: cost for cost in (QuadraticCost, CrossEntropyCost)}
INITS = ("large", "scaled")


def check_hyperparameters(epochs, mini_batch_size, eta, lmbda=0.0,
                          names=("epochs", "mini_batch_size", "eta", "lmbda")) -> None:
    """Raise ConfigError unless epochs and mini_batch_size are positive
    integers, eta is positive and lmbda is not negative.  `names` are what
    the message calls them (the CLI passes its flags)."""
    for name, value in zip(names, (epochs, mini_batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if not (isinstance(eta, numbers.Real) and math.isfinite(eta) and eta > 0):
        raise ConfigError(f"{names[2]} (the learning rate) must be a positive number, got {eta!r}")
    if not (isinstance(lmbda, numbers.Real) and math.isfinite(lmbda) and lmbda >= 0):
        raise ConfigError(f"{names[3]} (the L2 regularisation) must be 0 or more, got {lmbda!r}")


class Network:
    def __init__(self, sizes: Sequence[int], cost=QuadraticCost, init: str = "large", seed: int | None = None):
        """`sizes` lists the neurons per layer: [784, 30, 10] is 784 inputs,
        a hidden layer of 30 and 10 outputs.  The first layer is the input
        and has no biases.  `cost` is a cost class or its name ("quadratic",
        "cross-entropy").  `init` "large" draws weights and biases from a
        Gaussian of mean 0 and deviation 1, as the book's first network;
        "scaled" divides each weight by sqrt(n_in), the number of inputs to
        its neuron, as the second.  `seed` fixes the weights and the order of
        the examples in `SGD`."""
        sizes = list(sizes)
        if len(sizes) < 2 or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0 for s in sizes):
            raise ConfigError(f"sizes must list at least 2 positive layer sizes, like [784, 30, 10]; got {sizes}")
        if init not in INITS:
            raise ConfigError(f"init must be one of {', '.join(INITS)}; got {init!r}")
        self.num_layers = len(sizes)
        self.sizes = [int(s) for s in sizes]
        self.cost = _cost(cost, ConfigError)
        self.rng = np.random.default_rng(seed)
        self.biases = [self.rng.standard_normal((y, 1)) for y in self.sizes[1:]]
        self.weights = [
            self.rng.standard_normal((y, x)) / (math.sqrt(x) if init == "scaled" else 1.0)
            for x, y in zip(self.sizes[:-1], self.sizes[1:])
        ]

    def feedforward(self, a):
        """The output of the network for input `a`: a column of sizes[0]
        values, or a matrix with one example per column."""
        a = np.asarray(a, dtype=float)
        if a.ndim == 1:
            a = a[:, None]
        for b, w in zip(self.biases, self.weights):
            a = sigmoid(np.dot(w, a) + b)
        return a

    def predict(self, x):
        """The digit (index of the most active output neuron) for each column of `x`."""
        return np.argmax(self.feedforward(x), axis=0)

    def SGD(
        self,
        training_data,
        epochs: int,
        mini_batch_size: int,
        eta: float,
        test_data=None,
        *,
        lmbda: float = 0.0,
        monitor: bool = False,
        report: Callable[[str], object] | None = print,
        progress: bool = False,
    ) -> dict[str, list]:
        """Train the network with mini-batch stochastic gradient descent.

        `training_data` is a list of pairs (x, y): x the input column, y the
        desired output, either a column of sizes[-1] values or the index of
        the neuron that should fire.  Each epoch visits the examples in a new
        random order (the list itself is left as it is), in mini-batches of
        `mini_batch_size`, with learning rate `eta` and L2 regularisation
        `lmbda` (weights shrink by a factor 1 - eta*lmbda/n per step, n the
        number of training examples).

        With `test_data` (pairs in the same form), each epoch reports
        "Epoch k: correct / total" to `report` (None for silence).  With
        `monitor`, it also measures the cost on the test data and the cost and
        accuracy on the training data.  `progress` shows a tqdm bar over the
        mini-batches of each epoch.

        Returns a dict of per-epoch lists: "evaluation_accuracy" (number
        correct), "evaluation_cost", "training_accuracy", "training_cost";
        a list stays empty when it was not measured."""
        check_hyperparameters(epochs, mini_batch_size, eta, lmbda)
        # One matrix for the whole set; each mini-batch is a gather of its columns
        # (Fortran order keeps a column's 784 values together in memory).
        X, Y = self._matrices(training_data, "training_data")
        X, Y = np.asfortranarray(X), np.asfortranarray(Y)
        n = X.shape[1]
        if test_data is not None:
            X_test, Y_test = self._matrices(test_data, "test_data")
        metrics = {"evaluation_accuracy": [], "evaluation_cost": [], "training_accuracy": [], "training_cost": []}
        for j in range(epochs):
            order = self.rng.permutation(n)
            starts = range(0, n, mini_batch_size)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc=f"Epoch {j}", unit="batch", leave=False, disable=None)
            for k in starts:
                mini_batch = order[k : k + mini_batch_size]  # the columns of this mini-batch
                self.update_mini_batch(X[:, mini_batch], Y[:, mini_batch], eta, lmbda, n)
            if monitor:
                metrics["training_cost"].append(self._total_cost(X, Y, lmbda, n))
                metrics["training_accuracy"].append(self._accuracy(X, Y))
            if test_data is not None:
                correct = self._accuracy(X_test, Y_test)
                metrics["evaluation_accuracy"].append(correct)
                if monitor:
                    metrics["evaluation_cost"].append(self._total_cost(X_test, Y_test, lmbda, n))
                line = f"Epoch {j}: {correct} / {X_test.shape[1]}"
            else:
                line = f"Epoch {j} complete"
            if report is not None:
                report(line)
        return metrics

    def update_mini_batch(self, X, Y, eta: float, lmbda: float = 0.0, n: int | None = None) -> None:
        """Update the weights and biases by one step of gradient descent on
        one mini-batch, using backpropagation on all its examples at once.

        `X` holds the mini-batch's inputs and `Y` their desired outputs, one
        example per column: shapes (sizes[0], m) and (sizes[-1], m).  `eta`
        is the learning rate, `lmbda` the L2 regularisation and `n` the size
        of the whole training set (by default m, the size of the mini-batch).
        The step is w <- (1 - eta*lmbda/n) w - (eta/m) nabla_w and
        b <- b - (eta/m) nabla_b, where nabla_w and nabla_b are the gradient
        summed over the mini-batch."""
        m = X.shape[1]
        n = n or m
        nabla_b, nabla_w = self.backprop(X, Y)
        # In place, scaling nabla_w where it lies: a step makes no big
        # (sizes[l+1], sizes[l]) matrix besides the gradient backprop returns.
        for w, nw in zip(self.weights, nabla_w):
            if lmbda:
                w *= 1 - eta * (lmbda / n)
            nw *= eta / m
            w -= nw
        for b, nb in zip(self.biases, nabla_b):
            b -= (eta / m) * nb

    def backprop(self, X, Y):
        """Return (nabla_b, nabla_w), the gradient of the cost with respect to
        the biases and weights, layer by layer: lists of arrays shaped like
        `self.biases` and `self.weights`.

        `X` and `Y` hold inputs and desired outputs, one example per column
        (a single column is one example, as in the book).  The gradient is
        the sum of the examples' gradients, computed for all of them at once:
        each layer's delta has one column per example, and the matrix product
        with the activations adds up the examples."""
        nabla_b = [None] * len(self.biases)  # filled from the last layer back
        nabla_w = [None] * len(self.weights)
        # Feedforward, keeping every layer's weighted input z and activation.
        activation = X
        activations = [X]  # (sizes[l], m) for each layer l
        zs = []
        for b, w in zip(self.biases, self.weights):
            z = np.dot(w, activation) + b  # b broadcasts over the m columns
            zs.append(z)
            activation = sigmoid(z)
            activations.append(activation)
        # Backward pass.  np.dot, not @: for one example (a 30x1 times 1x784
        # outer product) NumPy's matmul is about 3x slower, which would slow
        # the book's per-example loop that the benchmark compares against.
        delta = self.cost.delta(zs[-1], activations[-1], Y)
        nabla_b[-1] = delta.sum(axis=1, keepdims=True)
        nabla_w[-1] = np.dot(delta, activations[-2].T)
        # l counts layers from the end: l = 2 is the last hidden layer.
        for l in range(2, self.num_layers):
            a = activations[-l]
            sp = a * (1 - a)  # sigmoid_prime(zs[-l]), from the activation already computed
            delta = np.dot(self.weights[-l + 1].T, delta) * sp
            nabla_b[-l] = delta.sum(axis=1, keepdims=True)
            nabla_w[-l] = np.dot(delta, activations[-l - 1].T)
        return nabla_b, nabla_w

    def evaluate(self, test_data) -> int:
        """How many of the pairs (x, y) in `test_data` the network gets right:
        the most active output neuron is the digit y (or the index of y's
        largest entry when y is a column)."""
        return self._accuracy(*self._matrices(test_data, "test_data"))

    def total_cost(self, data, lmbda: float = 0.0, n: int | None = None) -> float:
        """The cost averaged over the pairs in `data`, plus the L2 term
        (lmbda / 2n) * (sum of squared weights); `n` defaults to len(data)."""
        X, Y = self._matrices(data, "data")
        return self._total_cost(X, Y, lmbda, n or X.shape[1])

    def save(self, filename: str | os.PathLike) -> None:
        """Write the network to a JSON file, atomically: a temporary file in
        the same folder, then renamed over `filename`."""
        data = {
            "format": "nabla.network",
            "sizes": self.sizes,
            "cost": self.cost.name,
            "weights": [w.tolist() for w in self.weights],
            "biases": [b.tolist() for b in self.biases],
        }
        filename = os.fspath(filename)
        folder, name = os.path.split(os.path.abspath(filename))
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        try:
            # Opened outside `with` so that only a failure to create the file becomes a
            # CheckpointError; "x", not mkstemp, keeps the umask's permissions.
            f = open(tmp, "x", encoding="utf-8")  # noqa: SIM115
        except OSError as e:
            raise CheckpointError(f"cannot write {filename}: {e.strerror}; "
                                  f"check that {folder} exists and is writable") from e
        try:
            with f:
                json.dump(data, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filename)
        except BaseException:
            os.unlink(tmp)
            raise

    #### Helpers on matrices

    def _accuracy(self, X, Y) -> int:
        return int(np.sum(self.predict(X) == np.argmax(Y, axis=0)))

    def _total_cost(self, X, Y, lmbda, n) -> float:
        cost = self.cost.fn(self.feedforward(X), Y) / X.shape[1]
        return cost + 0.5 * (lmbda / n) * sum(float(np.sum(w * w)) for w in self.weights)

    def _matrices(self, data, what):
        """Stack pairs (x, y) into X (sizes[0], m) and Y (sizes[-1], m), one
        example per column; a label y (an integer) becomes a one-hot column."""
        try:
            xs, ys = zip(*data)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} must be a non-empty list of (x, y) pairs") from None
        m = len(xs)
        n_in, n_out = self.sizes[0], self.sizes[-1]
        try:
            # (n_in, m); np.array(xs, dtype=float) is 4x slower
            X = np.array(xs).astype(float, copy=False).reshape(m, -1).T
        except ValueError:
            raise ConfigError(f"{what}: the inputs x do not all have the same number of values") from None
        if X.shape[0] != n_in:
            raise ConfigError(
                f"{what}: each input has {X.shape[0]} values but the first layer has {n_in} neurons "
                f"(sizes={self.sizes}); make sizes[0] = {X.shape[0]}"
            )
        try:
            ys = np.array(ys)
        except ValueError:
            raise ConfigError(f"{what}: the outputs y must all be labels or all be columns of the same size") from None
        if ys.ndim == 1:  # labels
            if not np.issubdtype(ys.dtype, np.integer) or ys.min() < 0 or ys.max() >= n_out:
                raise ConfigError(
                    f"{what}: labels run from {ys.min()} to {ys.max()} but the last layer has "
                    f"{n_out} neurons (sizes={self.sizes}); labels must be integers 0 to {n_out - 1}"
                )
            Y = np.zeros((n_out, m))
            Y[ys, np.arange(m)] = 1.0
            return X, Y
        Y = ys.astype(float, copy=False).reshape(m, -1).T
        if Y.shape[0] != n_out:
            raise ConfigError(
                f"{what}: each desired output has {Y.shape[0]} values but the last layer has {n_out} "
                f"neurons (sizes={self.sizes}); make sizes[-1] = {Y.shape[0]}"
            )
        return X, Y


def _cost(cost, error):
    """The cost class for a class or a name ("cross-entropy", or the book's
    class name "CrossEntropyCost"); `error` is raised for anything else."""
    if isinstance(cost, type) and cost in COSTS.values():
        return cost
    for c in COSTS.values():
        if cost in (c.name, c.__name__):
            return c
    raise error(f"unknown cost {cost!r}; use one of: {', '.join(COSTS)}")


def load(filename: str | os.PathLike) -> Network:
    """Read a network written by `Network.save` (or by the book's network2.py)."""
    try:
        with open(filename, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no network file at {filename}; train one with `nabla mnist --out {filename}`") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{filename} is not a JSON network file (truncated?): {e}") from None
    if not isinstance(data, dict) or not {"sizes", "weights", "biases"} <= data.keys():
        raise CheckpointError(f"{filename} is not a network file: it needs the keys sizes, weights and biases")
    try:
        net = Network(data["sizes"], cost=_cost(data.get("cost", "quadratic"), CheckpointError))
    except ConfigError as e:
        raise CheckpointError(f"{filename}: {e}") from None
    try:
        weights = [np.array(w, dtype=float) for w in data["weights"]]
        biases = [np.array(b, dtype=float) for b in data["biases"]]
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{filename}: weights or biases are not numeric matrices ({e})") from None
    want_w = [w.shape for w in net.weights]
    want_b = [b.shape for b in net.biases]
    if [w.shape for w in weights] != want_w or [b.shape for b in biases] != want_b:
        raise CheckpointError(
            f"{filename}: weights {[w.shape for w in weights]} and biases {[b.shape for b in biases]} "
            f"do not fit sizes {net.sizes} (expected {want_w} and {want_b})"
        )
    net.weights, net.biases = weights, biases
    return net
