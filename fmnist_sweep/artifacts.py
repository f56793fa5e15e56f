"""Tables and pictures people look at: a finished run's artifacts and the comparison's plots."""

from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np

from .models import CLASSES


def _pyplot():
    """matplotlib's pyplot on the Agg backend (no screen), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts of (true class, predicted class) over the classes, rows true."""
    k = len(CLASSES)
    return np.bincount(np.asarray(y_true) * k + np.asarray(y_pred), minlength=k * k).reshape(k, k)


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, out: Path, split: str) -> None:
    """Precision/recall/F1/support per class, then their plain and support-weighted means (a
    class never predicted or never present scores 0), as CSV and as a text table."""
    cm = confusion(y_true, y_pred)
    hits, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    precision = np.divide(hits, predicted, out=np.zeros(len(hits)), where=predicted > 0)
    recall = np.divide(hits, support, out=np.zeros(len(hits)), where=support > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(len(hits)), where=both > 0)
    total, weights = int(support.sum()), support / max(1, support.sum())
    rows = [(name, precision[i], recall[i], f1[i], int(support[i])) for i, name in enumerate(CLASSES)]
    rows += [("macro avg", precision.mean(), recall.mean(), f1.mean(), total),
             ("weighted avg", precision @ weights, recall @ weights, f1 @ weights, total)]
    cells = [[name, *(f"{v:.4f}" for v in scores), n] for name, *scores, n in rows]
    header = ["class", "precision", "recall", "f1-score", "support"]
    with open(out / f"classification_report_{split}.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *cells])
    line = "{:>14} {:>10} {:>10} {:>10} {:>10}".format
    text = [line("", *header[1:]), "", *(line(*c) for c in cells[:-2]), "",
            line("accuracy", "", "", f"{hits.sum() / max(1, total):.4f}", total), *(line(*c) for c in cells[-2:])]
    (out / f"classification_report_{split}.txt").write_text("\n".join(text) + "\n")


# One figure per kind and shape, built once per process and redrawn with each run's data:
# building it (axes, ticks, 100 cell labels, colorbar) is a large share of its cost, and a
# worker draws these for every trial. Figures outside pyplot: never closed, never counted
# by pyplot's open-figure warning. Same pixels as a figure built afresh (tested).
_FIGURES: dict = {}


def _figure(key, build):
    if key not in _FIGURES:
        from matplotlib.figure import Figure

        _FIGURES[key] = build(Figure)
    return _FIGURES[key]


def confusion_matrix_png(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str) -> None:
    """The confusion matrix of ``y_true`` against ``y_pred`` as a PNG, counts in the cells."""
    cm = confusion(y_true, y_pred)

    def build(Figure):
        fig = Figure(figsize=(7.5, 6.5))
        ax = fig.add_subplot()
        im = ax.imshow(cm, cmap="Blues")
        ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
        ax.set_yticks(range(len(CLASSES)), CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        cells = [[ax.text(j, i, "", ha="center", va="center", fontsize=7) for j in range(len(CLASSES))]
                 for i in range(len(CLASSES))]
        fig.colorbar(im, ax=ax)
        # Fixed margins: tight_layout draws the figure once more (a third of the cost of a trial's plots).
        fig.subplots_adjust(left=0.16, bottom=0.18, right=0.98, top=0.94)
        return fig, ax, im, cells

    fig, ax, im, cells = _figure("confusion", build)
    im.set_data(cm)
    im.set_clim(cm.min(), cm.max())
    ax.set_title(title)
    for i, row in enumerate(cells):
        for j, cell in enumerate(row):
            cell.set_text(str(cm[i, j]))
            cell.set_color("white" if cm[i, j] > cm.max() / 2 else "black")
    fig.savefig(path, dpi=100)


def learning_curves_png(history: list[dict], path: Path) -> None:
    """Train/val loss per epoch, and the validation accuracy when there is one."""
    epochs = [h["epoch"] for h in history]
    has_val, has_acc = "val/loss" in history[0], "val/accuracy" in history[0]  # no val: retraining on train+val

    def build(Figure):
        fig = Figure(figsize=(10 if has_acc else 5.5, 4))
        axes = fig.subplots(1, 2 if has_acc else 1, squeeze=False)[0]
        ax = axes[0]
        lines = {"train/loss": ax.plot([], [], "o-", label="train")[0]}
        if has_val:
            lines["val/loss"] = ax.plot([], [], "o-", label="validation")[0]
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.legend()
        ax.grid(alpha=0.3)
        if has_acc:
            lines["val/accuracy"] = axes[1].plot([], [], "o-", color="C2")[0]
            axes[1].set_xlabel("epoch")
            axes[1].set_ylabel("validation accuracy")
            axes[1].grid(alpha=0.3)
        fig.subplots_adjust(left=0.12 if not has_acc else 0.07, right=0.98, bottom=0.13, top=0.96, wspace=0.25)
        return fig, axes, lines

    fig, axes, lines = _figure(("curves", has_val, has_acc), build)
    for key, line in lines.items():
        line.set_data(epochs, [h[key] for h in history])
    for ax in axes:
        ax.relim()
        ax.autoscale_view()
    fig.savefig(path, dpi=100)


def reconstructions_png(originals: np.ndarray, recons: np.ndarray, path: Path) -> None:
    """Originals (top row) over their reconstructions (bottom row)."""
    n = len(originals)

    def build(Figure):
        fig = Figure(figsize=(n * 1.1, 2.4))
        axes = fig.subplots(2, n, squeeze=False)
        images = [[ax.imshow(np.zeros((28, 28)), cmap="gray", vmin=0, vmax=1) for ax in row] for row in axes]
        for ax in axes.flat:
            ax.axis("off")
        axes[0][0].set_title("original", fontsize=8, loc="left")
        axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.9, wspace=0.05, hspace=0.25)
        return fig, images

    fig, images = _figure(("reconstructions", n), build)
    for i in range(n):
        for row, img in enumerate((originals[i], recons[i])):
            images[row][i].set_data(img.reshape(28, 28))
    fig.savefig(path, dpi=100)


def factor_plot(study: str, metric: str, rows: list[dict], path: Path) -> None:
    """A study's objective per level (compare.factor_rows) with ± std error bars."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    numeric = all(len(r["key"]) == 1 and isinstance(r["key"][0][1], (int, float)) for r in rows)
    rows = [r for r in rows if r["mean"] is not None]  # failed levels have no point
    xs = [r["key"][0][1] for r in rows] if numeric else list(range(len(rows)))
    ax.errorbar(xs, [r["mean"] for r in rows], yerr=[r["std"] for r in rows], fmt="o-", capsize=4)
    if numeric:
        if min(xs) > 0 and max(xs) / min(xs) >= 8:
            ax.set_xscale("log", base=2 if all(float(x).is_integer() for x in xs) else 10)
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.set_xlabel(rows[0]["key"][0][0])
    else:
        ax.set_xticks(xs, [r["level"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(f"study {study}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def latent_plot(run_id: str, client, path: Path, n: int = 2000) -> str:
    """An autoencoder run's latent vectors of up to n held-out images (its model and data
    reloaded from its artifacts), PCA to 2-D, coloured by class; which split they came from."""
    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from . import data as fmnist

    tmp = tempfile.mkdtemp()
    cfg = OmegaConf.load(client.download_artifacts(run_id, "config.yaml", tmp))
    state = torch.load(client.download_artifacts(run_id, "weights/state_dict.pt", tmp), weights_only=True)
    model = instantiate(cfg.model)
    model.load_state_dict(state)
    model.eval()
    splits = fmnist.load(cfg.data)
    split, name = (splits.val, "validation") if len(splits.val) else (splits.test, "test")
    with torch.no_grad():
        z = model.encoder(split.x[:n]).numpy()
    y = split.y[:n].numpy()
    centred = z - z.mean(0)
    xy = centred @ np.linalg.svd(centred, full_matrices=False)[2][:2].T  # the two principal components
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 6))
    for c, label in enumerate(CLASSES):
        m = y == c
        ax.scatter(xy[m, 0], xy[m, 1], s=5, alpha=0.6, label=label, color=plt.cm.tab10(c))
    ax.legend(markerscale=3, fontsize=8, loc="best")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.set_title(f"latent space (n={z.shape[1]}) of {len(y)} {name} images, PCA")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return name
