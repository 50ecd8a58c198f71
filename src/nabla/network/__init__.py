"""The classic network of "Neural Networks and Deep Learning", in NumPy: sigmoid
neurons, mini-batch SGD and backpropagation, trained on MNIST digits."""

from nabla.network.network import (
    COSTS,
    CrossEntropyCost,
    Network,
    QuadraticCost,
    load,
    sigmoid,
    sigmoid_prime,
)

__all__ = ["COSTS", "CrossEntropyCost", "Network", "QuadraticCost", "load", "sigmoid", "sigmoid_prime"]
