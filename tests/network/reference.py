"""The book's mini-batch step, one example at a time, to check the matrix
version of `Network.update_mini_batch` against.

Nielsen's update_mini_batch (src/network2.py) calls backprop once per
example and sums the gradients before it steps.  This does the same with
nabla's `backprop`, given one column of X and Y at a time."""

import numpy as np


def update_mini_batch_looped(net, X, Y, eta, lmbda=0.0, n=None):
    """The step `net.update_mini_batch(X, Y, eta, lmbda, n)` should take:
    backprop each example (column) alone, sum the gradients, then
    w <- (1 - eta*lmbda/n) w - (eta/m) nabla_w and b <- b - (eta/m) nabla_b."""
    m = X.shape[1]
    n = n or m
    nabla_b = [np.zeros(b.shape) for b in net.biases]
    nabla_w = [np.zeros(w.shape) for w in net.weights]
    for i in range(m):
        delta_nabla_b, delta_nabla_w = net.backprop(X[:, i : i + 1], Y[:, i : i + 1])
        nabla_b = [nb + dnb for nb, dnb in zip(nabla_b, delta_nabla_b)]
        nabla_w = [nw + dnw for nw, dnw in zip(nabla_w, delta_nabla_w)]
    net.weights = [(1 - eta * (lmbda / n)) * w - (eta / m) * nw for w, nw in zip(net.weights, nabla_w)]
    net.biases = [b - (eta / m) * nb for b, nb in zip(net.biases, nabla_b)]
