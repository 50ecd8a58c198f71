"""Draw what `nabla mnist --plot` shows: accuracy and cost per epoch, and a
grid of held-out digits the network got wrong, each with its guess.

Uses matplotlib's Agg canvas directly (no pyplot, no window, no global
state), so it works on machines without a display.  Left out: interactive
plots, other file formats than what `savefig` infers from the name.
"""

from __future__ import annotations

import math
import os

import numpy as np


def plot_training(
    path: str | os.PathLike,
    metrics: dict[str, list],
    n_train: int,
    n_test: int,
    images: np.ndarray,
    predicted: np.ndarray,
    labels: np.ndarray,
    max_digits: int = 24,
) -> None:
    """Write a PNG (or any format `savefig` knows from the name) to `path`.

    `metrics` is what `Network.SGD` returned (accuracies are counts, out of
    `n_train` and `n_test`); `images` are the misclassified digits, one
    flattened square image per row, with the `predicted` and true `labels`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    curves, digits = fig.subfigures(2, 1, height_ratios=[1, 1.2])
    ax_acc, ax_cost = curves.subplots(1, 2)

    for key, n, label in (("training_accuracy", n_train, "training"), ("evaluation_accuracy", n_test, "held out")):
        if metrics.get(key):
            ax_acc.plot(range(len(metrics[key])), [100.0 * c / n for c in metrics[key]], marker=".", label=label)
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="% correct")
    for key, label in (("training_cost", "training"), ("evaluation_cost", "held out")):
        if metrics.get(key):
            ax_cost.plot(range(len(metrics[key])), metrics[key], marker=".", label=label)
    ax_cost.set(title="Cost", xlabel="epoch", ylabel="cost per example")
    for ax in (ax_acc, ax_cost):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()

    shown = min(len(images), max_digits)
    digits.suptitle(f"Misclassified held-out digits: {len(images)} of {n_test} "
                    f"(showing {shown}: the guess, then the true digit)")
    if shown == 0:
        digits.text(0.5, 0.5, "none", ha="center", va="center")
    else:
        side = math.isqrt(images.shape[1])
        cols = min(shown, 8)
        axes = np.atleast_1d(digits.subplots(math.ceil(shown / cols), cols)).ravel()
        for ax in axes:
            ax.set_axis_off()
        for ax, image, guess, true in zip(axes, images[:shown], predicted, labels):
            ax.imshow(image.reshape(side, side), cmap="gray_r", vmin=0.0, vmax=1.0)
            ax.set_title(f"{guess} (true {true})", fontsize=9, color="tab:red")
    fig.savefig(path, dpi=100)
