"""The artifacts of a finished run: tables and pictures people look at."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from .models import CLASSES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_class_table(y_true: np.ndarray, y_pred: np.ndarray, out: Path, split: str) -> dict:
    """Precision/recall/F1/support per class (the studies' table), as CSV and text."""
    from sklearn.metrics import classification_report

    labels = list(range(len(CLASSES)))
    report = classification_report(y_true, y_pred, labels=labels, target_names=CLASSES,
                                    digits=4, output_dict=True, zero_division=0)
    text = classification_report(y_true, y_pred, labels=labels, target_names=CLASSES,
                                 digits=4, zero_division=0)
    (out / f"classification_report_{split}.txt").write_text(text)
    with open(out / f"classification_report_{split}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "precision", "recall", "f1-score", "support"])
        for name in list(CLASSES) + ["macro avg", "weighted avg"]:
            r = report[name]
            w.writerow([name, f"{r['precision']:.4f}", f"{r['recall']:.4f}", f"{r['f1-score']:.4f}",
                        int(r["support"])])
    return report


def confusion_matrix_png(y_true: np.ndarray, y_pred: np.ndarray, path: Path, title: str) -> None:
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y_true, y_pred, labels=list(range(len(CLASSES))))
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    im = ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, cm[i, j], ha="center", va="center", fontsize=7,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    fig.colorbar(im, ax=ax)
    # Fixed margins: tight_layout draws the figure once more (a third of the cost of a trial's plots).
    fig.subplots_adjust(left=0.16, bottom=0.18, right=0.98, top=0.94)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def learning_curves_png(history: list[dict], path: Path) -> None:
    """Train/val loss per epoch, and the validation accuracy when there is one."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    has_acc = "val/accuracy" in history[0]
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(10 if has_acc else 5.5, 4), squeeze=False)
    ax = axes[0][0]
    ax.plot(epochs, [h["train/loss"] for h in history], "o-", label="train")
    if "val/loss" in history[0]:  # absent when retraining on train+val
        ax.plot(epochs, [h["val/loss"] for h in history], "o-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    if has_acc:
        ax = axes[0][1]
        ax.plot(epochs, [h["val/accuracy"] for h in history], "o-", color="C2")
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy")
        ax.grid(alpha=0.3)
    fig.subplots_adjust(left=0.12 if not has_acc else 0.07, right=0.98, bottom=0.13, top=0.96, wspace=0.25)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def reconstructions_png(originals: np.ndarray, recons: np.ndarray, path: Path) -> None:
    """Originals (top row) over their reconstructions (bottom row)."""
    plt = _pyplot()
    n = len(originals)
    fig, axes = plt.subplots(2, n, figsize=(n * 1.1, 2.4))
    for i in range(n):
        for row, img in enumerate((originals[i], recons[i])):
            axes[row][i].imshow(img.reshape(28, 28), cmap="gray", vmin=0, vmax=1)
            axes[row][i].axis("off")
    axes[0][0].set_title("original", fontsize=8, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=8, loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.9, wspace=0.05, hspace=0.25)
    fig.savefig(path, dpi=100)
    plt.close(fig)
