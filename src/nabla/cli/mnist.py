"""`nabla mnist`: train the classic NumPy network on MNIST digits.

The defaults are the book's first network: 784-30-10 sigmoid neurons, the
quadratic cost, 30 epochs of mini-batches of 10 at eta 3.0.  It trains on the
MNIST images bundled with nabla unless `--data` names others, prints
"Epoch k: correct / total" per epoch, saves the network as JSON and, with
`--plot`, draws the curves and the digits it got wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from nabla.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "mnist",
        help="train the classic NumPy network (Nielsen's book) on MNIST digits",
        description="Train the network of Nielsen's 'Neural Networks and Deep Learning' (NumPy, mini-batch SGD) "
        "on MNIST; the defaults are the book's first network (784-30-10, quadratic cost, eta 3.0).",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="folder of MNIST IDX files (train-images-idx3-ubyte[.gz], t10k-..., ...) or a mnist.pkl.gz "
        "(read with an unpickler that admits only NumPy arrays, so a file cannot run code); "
        "default: the 10,000 bundled images, 8,000 to train and 2,000 held out",
    )
    p.add_argument("--sizes", default="784,30,10", help="neurons per layer, comma-separated (default: 784,30,10)")
    p.add_argument("--epochs", type=int, default=30, help="passes over the training images (default: 30)")
    p.add_argument("--batch-size", type=int, default=10, help="examples per mini-batch (default: 10)")
    p.add_argument("--eta", type=float, default=3.0, help="learning rate (default: 3.0)")
    p.add_argument("--cost", choices=["quadratic", "cross-entropy"], default="quadratic", help="cost function")
    p.add_argument("--lmbda", type=float, default=0.0,
                   help="L2 regularisation; weights decay by eta*lmbda/n (default: 0)")
    p.add_argument(
        "--init",
        choices=["large", "scaled"],
        default="large",
        help="initial weights: standard Gaussian (large, the book's first network) or divided by sqrt(inputs) (scaled)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed for the initial weights and the shuffling (default: 0)")
    p.add_argument("--out", default="mnist-network.json",
                   help="where to save the trained network (default: %(default)s)")
    p.add_argument("--plot", metavar="PNG", help="draw accuracy/cost curves and misclassified digits to this image")
    p.add_argument("--json", action="store_true", help="print the results as JSON on stdout (progress goes to stderr)")
    p.set_defaults(func=run_mnist)


def parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        sizes = []
    if len(sizes) < 2 or min(sizes) <= 0:
        raise ConfigError(f"--sizes {text!r}: give at least two positive integers separated by commas, like 784,30,10")
    return sizes


def run_mnist(args: argparse.Namespace) -> int:
    import numpy as np
    from tqdm.auto import tqdm

    from nabla.network import mnist
    from nabla.network.network import Network, check_hyperparameters

    # Check everything the user typed before spending minutes training.
    sizes = parse_sizes(args.sizes)
    check_hyperparameters(
        args.epochs, args.batch_size, args.eta, args.lmbda, names=("--epochs", "--batch-size", "--eta", "--lmbda")
    )
    for flag, path in (("--out", args.out), ("--plot", args.plot)):
        if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ConfigError(f"{flag} {path}: the folder {os.path.dirname(os.path.abspath(path))} does not exist")

    (train_images, train_labels), (test_images, test_labels) = mnist.load_data(args.data)
    n_pixels = train_images.shape[1]
    if sizes[0] != n_pixels:
        raise ConfigError(f"--sizes {args.sizes}: the first layer must have {n_pixels} neurons, one per pixel")
    if sizes[-1] != 10:
        raise ConfigError(f"--sizes {args.sizes}: the last layer must have 10 neurons, one per digit")

    stream = sys.stderr if args.json else sys.stdout  # with --json, stdout holds only the JSON

    def say(line: str) -> None:
        tqdm.write(line, file=stream)  # above the progress bar, not through it
    source = args.data or "bundled MNIST"
    say(f"Training {'-'.join(map(str, sizes))} on {len(train_labels)} images from {source}, "
        f"holding out {len(test_labels)}")

    net = Network(sizes, cost=args.cost, init=args.init, seed=args.seed)
    metrics = net.SGD(
        mnist.as_pairs(train_images, train_labels, one_hot=True),
        args.epochs,
        args.batch_size,
        args.eta,
        test_data=mnist.as_pairs(test_images, test_labels),
        lmbda=args.lmbda,
        monitor=True,
        report=say,
        progress=True,
    )
    net.save(args.out)
    say(f"Saved the network to {args.out}")

    if args.plot:
        from nabla.network.plot import plot_training

        predicted = net.predict(test_images.T)
        wrong = np.flatnonzero(predicted != test_labels)
        plot_training(
            args.plot, metrics, len(train_labels), len(test_labels),
            test_images[wrong], predicted[wrong], test_labels[wrong],
        )  # fmt: skip
        say(f"Wrote the plot to {args.plot}")

    if args.json:
        correct = metrics["evaluation_accuracy"][-1]
        result = {
            "sizes": sizes,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "eta": args.eta,
            "cost": args.cost,
            "lmbda": args.lmbda,
            "init": args.init,
            "seed": args.seed,
            "data": source,
            "train_size": len(train_labels),
            "test_size": len(test_labels),
            "correct": correct,
            "accuracy": correct / len(test_labels),
            "metrics": metrics,
            "out": args.out,
            "plot": args.plot,
        }
        print(json.dumps(result, indent=2))
    return 0
