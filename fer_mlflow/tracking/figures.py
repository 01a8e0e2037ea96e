"""Matplotlib figures that the stages log with `mlflow.log_figure`. Each function returns a Figure."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # no display on training machines and CI

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fer_mlflow.data.dataset import SPLITS, Dataset  # noqa: E402


def class_counts(dataset: Dataset, title: str = "Images per class") -> Figure:
    """Grouped bars: images per class, one bar colour per split present."""
    counts = dataset.counts()
    fig, ax = plt.subplots(figsize=(9, 4), layout="constrained")
    x = np.arange(len(dataset.class_names))
    width = 0.8 / max(len(counts), 1)
    for i, (split, per_class) in enumerate(counts.items()):
        bars = ax.bar(x + i * width, list(per_class.values()), width, label=split)
        ax.bar_label(bars, fontsize=7)
    ax.set_xticks(x + width * (len(counts) - 1) / 2, dataset.class_names)
    ax.set_ylabel("images")
    ax.set_title(title)
    ax.legend()
    return fig


def image_grid(cells: list[tuple[np.ndarray | None, str]], columns: int, suptitle: str) -> Figure:
    """(image, title) cells in a grid of `columns`; an image of None leaves its cell blank.

    The grid is one mosaic image on one axes: a subplot per image costs seconds per figure.
    """
    rows = max(1, -(-len(cells) // columns))
    cell_h, cell_w, pad_top, pad = 48, 48, 16, 4
    mosaic = np.full((rows * (cell_h + pad_top), columns * (cell_w + pad)), 255, np.uint8)
    fig, ax = plt.subplots(figsize=(0.75 * columns + 0.4, 0.9 * rows + 0.6))
    for k, (image, title) in enumerate(cells):
        top, left = (k // columns) * (cell_h + pad_top) + pad_top, (k % columns) * (cell_w + pad)
        if image is not None:
            mosaic[top:top + cell_h, left:left + cell_w] = image
        ax.text(left + cell_w / 2, top - 2, title, ha="center", va="bottom", fontsize=5)
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.axis("off")
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return fig


def _row(cells: list[tuple[np.ndarray, str]], columns: int, empty: str) -> list:
    """One grid row: the cells, padded with blanks; `empty` titles a row that has no cell."""
    return cells + [(None, "" if cells or i else empty) for i in range(columns - len(cells))]


def samples_per_class(dataset: Dataset, per_class: int = 5, seed: int = 0) -> Figure:
    """`per_class` random images of each class, one row per class."""
    rng = np.random.default_rng(seed)
    cells = []
    for code, name in enumerate(dataset.class_names):
        members = np.flatnonzero(dataset.labels == code)
        chosen = rng.choice(members, size=min(per_class, len(members)), replace=False)
        cells += _row([(dataset.images[i], name) for i in chosen], per_class, f"{name}: none")
    return image_grid(cells, per_class, f"{per_class} samples per class")


def mean_pixel_boxplot(dataset: Dataset, mean_low: float, mean_high: float) -> Figure:
    """Box plot of each image's mean pixel / 255 per split, with the cleaning thresholds drawn."""
    means = dataset.images.reshape(len(dataset), -1).mean(axis=1) / 255.0
    present = [s for s in SPLITS if (dataset.splits == s).any()]
    fig, ax = plt.subplots(figsize=(6, 4), layout="constrained")
    ax.boxplot([means[dataset.splits == s] for s in present], tick_labels=present)
    ax.axhline(mean_low, color="tab:red", linestyle="--", label=f"mean_low = {mean_low}")
    ax.axhline(mean_high, color="tab:orange", linestyle="--", label=f"mean_high = {mean_high}")
    ax.set_ylabel("mean pixel / 255")
    ax.set_title("Mean pixel value per image")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def removed_images(dataset: Dataset, removed: dict[str, np.ndarray], per_rule: int = 8) -> Figure:
    """Up to `per_rule` removed images for each rule, one row per rule, titled rule/class/split."""
    cells = []
    for rule, indices in removed.items():
        shown = [
            (dataset.images[i], f"{rule}\n{dataset.class_names[dataset.labels[i]]}/{dataset.splits[i]}")
            for i in indices[:per_rule]
        ]
        cells += _row(shown, per_rule, f"{rule}: none")
    return image_grid(cells, per_rule, "Images removed, by rule")


def confusion(matrix: np.ndarray, classes: list[str], title: str) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted), each cell annotated."""
    fig, ax = plt.subplots(figsize=(7, 6), layout="constrained")
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    integer = np.issubdtype(matrix.dtype, np.integer)
    threshold = matrix.max() / 2 if matrix.size else 0
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, f"{value:d}" if integer else f"{value:.2f}", ha="center", va="center", fontsize=8,
                color="white" if value > threshold else "black")
    ax.set_title(title)
    return fig


def confident_mistakes(dataset: Dataset, predicted: np.ndarray, probabilities: np.ndarray,
                       count: int = 24) -> Figure:
    """The `count` wrong predictions made with the highest probability, titled true -> predicted."""
    wrong = np.flatnonzero(predicted != dataset.labels)
    order = wrong[np.argsort(-probabilities[wrong, predicted[wrong]])][:count]
    names = dataset.class_names
    cells = [(dataset.images[i], f"{names[dataset.labels[i]]} -> {names[predicted[i]]}\n"
                                 f"p={probabilities[i, predicted[i]]:.2f}") for i in order]
    return image_grid(cells or [(None, "no mistakes")], 8, "Most confident mistakes (true -> predicted)")


def label_counts(labels: list[str], classes: list[str], title: str = "Faces per predicted emotion") -> Figure:
    """Bars: how many faces got each label (empty labels, images without a face, left out)."""
    counts = [sum(1 for label in labels if label == name) for name in classes]
    fig, ax = plt.subplots(figsize=(7, 4), layout="constrained")
    bars = ax.bar(classes, counts, color="tab:blue")
    ax.bar_label(bars, fontsize=8)
    ax.set_ylabel("faces")
    ax.set_title(title)
    return fig


def emotion_over_time(series: dict[str, tuple[np.ndarray, np.ndarray]], classes: list[str], title: str) -> Figure:
    """One panel per entry of `series` (its title -> times in seconds, and probabilities N x classes,
    NaN where it has none), each class's probability against time; no entry gives one empty panel."""
    panels = max(1, len(series))
    fig, axes = plt.subplots(panels, 1, figsize=(10, 1.2 + 2.4 * panels), sharex=True, squeeze=False,
                             layout="constrained")
    for ax, (label, (times, probabilities)) in zip(axes[:, 0], series.items()):
        for column, name in enumerate(classes):  # a class keeps its colour in every panel
            ax.plot(times, probabilities[:, column], label=name, color=f"C{column}", linewidth=1.2)
        ax.set_title(label, loc="left", fontsize=9)
    for ax in axes[:, 0]:
        ax.set_ylabel("probability")
        ax.set_ylim(0, 1)
    axes[-1, 0].set_xlabel("time (s)")
    fig.suptitle(title)
    if series:
        axes[0, 0].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return fig


def reliability(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], title: str) -> Figure:
    """A reliability diagram: for each named curve (mean confidence, accuracy, count per confidence
    bin, as `calibration.reliability` gives), accuracy against confidence; the diagonal is calibrated."""
    fig, ax = plt.subplots(figsize=(6, 6), layout="constrained")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="calibrated")
    for label, (confidence, accuracy, counts) in curves.items():
        filled = counts > 0
        ax.plot(confidence[filled], accuracy[filled], marker="o", label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (probability of the predicted class)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    return fig
