"""Backpropagation against finite differences, the matrix update against the
book's per-example loop, and the checks on what SGD is given."""

import copy
import math
import warnings

import numpy as np
import pytest

from nabla.errors import ConfigError
from nabla.network import (
    CrossEntropyCost,
    Network,
    QuadraticCost,
    sigmoid,
    sigmoid_prime,
)
from network.reference import update_mini_batch_looped


def random_batch(sizes, m, seed=0, labels=False):
    rng = np.random.default_rng(seed)
    xs = rng.random((m, sizes[0], 1))
    if labels:
        return list(zip(xs, rng.integers(0, sizes[-1], m).tolist()))
    return list(zip(xs, rng.random((m, sizes[-1], 1))))  # targets in (0, 1) exercise both costs


def parameters(net):
    return net.weights + net.biases


def relative_error(a, b):
    a, b = np.concatenate([x.ravel() for x in a]), np.concatenate([x.ravel() for x in b])
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300)


def numerical_gradient(net, f, h=1e-5):
    """Central differences of f() with respect to every weight and bias."""
    grads = []
    for p in parameters(net):
        g = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + h
            up = f()
            p[i] = old - h
            down = f()
            p[i] = old
            g[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


def test_sigmoid():
    z = np.linspace(-30, 30, 101)
    np.testing.assert_allclose(sigmoid(z), 1 / (1 + np.exp(-z)), rtol=1e-14, atol=1e-300)
    h = 1e-6
    np.testing.assert_allclose(sigmoid_prime(z), (sigmoid(z + h) - sigmoid(z - h)) / (2 * h), atol=1e-9)
    with warnings.catch_warnings():  # no overflow warning far out
        warnings.simplefilter("error")
        assert sigmoid(np.array([-1000.0]))[0] == 0.0 and sigmoid(np.array([1000.0]))[0] == 1.0


@pytest.mark.parametrize("cost", [QuadraticCost, CrossEntropyCost])
@pytest.mark.parametrize("sizes", [[5, 4, 3], [6, 5, 4, 3]])
def test_backprop_equals_finite_differences(cost, sizes):
    net = Network(sizes, cost=cost, seed=1)
    batch = random_batch(sizes, m=7)
    X, Y = net._matrices(batch, "batch")
    nabla_b, nabla_w = net.backprop(X, Y)
    numeric = numerical_gradient(net, lambda: cost.fn(net.feedforward(X), Y))
    assert relative_error(nabla_w + nabla_b, numeric) < 1e-6


@pytest.mark.parametrize("cost", [QuadraticCost, CrossEntropyCost])
def test_update_follows_gradient_of_regularised_cost(cost):
    """With L2, one step moves the weights by eta times the gradient of
    (mean cost over the batch) + lmbda/2n * sum of squared weights."""
    sizes, lmbda, n, eta = [5, 4, 3], 0.7, 20, 1.0
    net = Network(sizes, cost=cost, init="scaled", seed=2)
    batch = random_batch(sizes, m=6, seed=3)
    numeric = numerical_gradient(net, lambda: net.total_cost(batch, lmbda, n))
    before = copy.deepcopy(parameters(net))
    net.update_mini_batch(*net._matrices(batch, "batch"), eta, lmbda, n)
    step = [(p0 - p1) / eta for p0, p1 in zip(before, parameters(net))]
    assert relative_error(step, numeric) < 1e-6


@pytest.mark.parametrize("cost", [QuadraticCost, CrossEntropyCost])
@pytest.mark.parametrize("lmbda", [0.0, 5.0])
@pytest.mark.parametrize("labels", [False, True])
def test_matrix_update_equals_per_example_loop(cost, lmbda, labels):
    sizes = [784, 30, 10]
    net = Network(sizes, cost=cost, seed=0)
    looped = copy.deepcopy(net)
    for step in range(3):
        X, Y = net._matrices(random_batch(sizes, m=10, seed=step, labels=labels), "batch")
        net.update_mini_batch(X, Y, 3.0, lmbda, n=8000)
        update_mini_batch_looped(looped, X, Y, 3.0, lmbda, n=8000)
    for a, b in zip(parameters(net), parameters(looped)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12)


def test_backprop_of_a_batch_is_the_sum_over_examples():
    net = Network([8, 6, 4], seed=4)
    X, Y = net._matrices(random_batch([8, 6, 4], m=5), "batch")
    nabla_b, nabla_w = net.backprop(X, Y)
    singles = [net.backprop(X[:, i : i + 1], Y[:, i : i + 1]) for i in range(5)]
    for l in range(2):
        np.testing.assert_allclose(nabla_b[l], sum(s[0][l] for s in singles), rtol=0, atol=1e-12)
        np.testing.assert_allclose(nabla_w[l], sum(s[1][l] for s in singles), rtol=0, atol=1e-12)


def test_sgd_is_seeded_leaves_the_data_alone_and_reports_metrics():
    data = random_batch([6, 5, 3], m=23, seed=5, labels=True)
    original = list(data)
    runs = []
    for _ in range(2):
        net = Network([6, 5, 3], cost="cross-entropy", seed=7)
        lines = []
        metrics = net.SGD(data, 3, 4, 0.5, test_data=data[:9], lmbda=0.1, monitor=True, report=lines.append)
        runs.append((metrics, [w.copy() for w in net.weights]))
    assert data == original
    metrics, weights = runs[0]
    assert metrics == runs[1][0]
    for a, b in zip(weights, runs[1][1]):
        np.testing.assert_array_equal(a, b)
    assert [len(metrics[k]) for k in sorted(metrics)] == [3, 3, 3, 3]
    assert all(0 <= c <= 9 for c in metrics["evaluation_accuracy"])
    assert all(0 <= c <= 23 for c in metrics["training_accuracy"])
    assert lines[0] == f"Epoch 0: {metrics['evaluation_accuracy'][0]} / 9"
    # Without test data or monitoring: nothing measured, the book's line.
    lines = []
    metrics = Network([6, 5, 3], seed=7).SGD(data, 2, 4, 0.5, report=lines.append)
    assert metrics == {"evaluation_accuracy": [], "evaluation_cost": [], "training_accuracy": [], "training_cost": []}
    assert lines == ["Epoch 0 complete", "Epoch 1 complete"]


def test_scaled_init_divides_by_sqrt_of_inputs():
    large, scaled = Network([400, 30, 10], seed=0), Network([400, 30, 10], init="scaled", seed=0)
    np.testing.assert_allclose(scaled.weights[0], large.weights[0] / 20.0)
    np.testing.assert_array_equal(scaled.biases[0], large.biases[0])
    assert abs(large.weights[0].std() - 1) < 0.05


@pytest.mark.parametrize("sizes", [[], [784], [784, 0, 10], [784, -3, 10], [784, 2.5, 10], [784, True, 10]])
def test_bad_sizes(sizes):
    with pytest.raises(ConfigError, match="sizes"):
        Network(sizes)


def test_bad_cost_and_init():
    with pytest.raises(ConfigError, match="cost"):
        Network([2, 2], cost="hinge")
    with pytest.raises(ConfigError, match="init"):
        Network([2, 2], init="xavier")


@pytest.mark.parametrize(
    "epochs, mini_batch_size, eta, lmbda, match",
    [
        (0, 10, 3.0, 0.0, "epochs"),
        (-1, 10, 3.0, 0.0, "epochs"),
        (2.0, 10, 3.0, 0.0, "epochs"),
        (1, 0, 3.0, 0.0, "mini_batch_size"),
        (1, -10, 3.0, 0.0, "mini_batch_size"),
        (1, 10, 0.0, 0.0, "eta"),
        (1, 10, -3.0, 0.0, "eta"),
        (1, 10, math.nan, 0.0, "eta"),
        (1, 10, 3.0, -1.0, "lmbda"),
    ],
)
def test_bad_hyperparameters(epochs, mini_batch_size, eta, lmbda, match):
    net = Network([4, 3, 2], seed=0)
    with pytest.raises(ConfigError, match=match):
        net.SGD(random_batch([4, 3, 2], 5), epochs, mini_batch_size, eta, lmbda=lmbda, report=None)


def test_data_that_does_not_fit_the_network():
    net = Network([4, 3, 2], seed=0)
    with pytest.raises(ConfigError, match=r"first layer has 4 neurons.*sizes\[0\] = 5"):
        net.SGD(random_batch([5, 3, 2], 5), 1, 2, 1.0, report=None)
    with pytest.raises(ConfigError, match=r"last layer has 2 neurons.*sizes\[-1\] = 3"):
        net.SGD(random_batch([4, 3, 3], 5), 1, 2, 1.0, report=None)
    with pytest.raises(ConfigError, match="labels run from"):
        net.evaluate(random_batch([4, 3, 7], 20, labels=True))
    with pytest.raises(ConfigError, match="non-empty list"):
        net.SGD([], 1, 2, 1.0, report=None)
    with pytest.raises(ConfigError, match="same number of values"):
        net.evaluate([(np.zeros(4), 0), (np.zeros(5), 1)])
