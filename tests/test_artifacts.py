"""A run's tables and pictures. The pictures are drawn on figures a process builds once and
reuses for every run (a worker draws them for each trial), so a picture must not keep
anything of the run drawn before it."""

import csv

import numpy as np
import pytest
from PIL import Image

from fmnist_sweep import artifacts


def _pixels(path):
    return np.asarray(Image.open(path))


def _history(rng, epochs, keys):
    return [{"epoch": e + 1, **{k: float(rng.random()) for k in keys}} for e in range(epochs)]


CURVES = ("train/loss", "val/loss", "val/accuracy")


@pytest.mark.parametrize("draw", ["confusion", "curves", "reconstructions"])
def test_a_reused_figure_draws_exactly_what_a_fresh_one_draws(tmp_path, draw):
    if draw == "confusion":
        def picture(seed, path):
            r = np.random.default_rng(seed)
            y = r.integers(0, 10, 3000)
            pred = np.where(r.random(3000) < 0.4 + 0.5 * r.random(), y, r.integers(0, 10, 3000))
            artifacts.confusion_matrix_png(y, pred, path, f"val set, run {seed}")
    elif draw == "curves":
        def picture(seed, path):  # 3 epochs, then 12 on another scale: the axes must follow
            artifacts.learning_curves_png(_history(np.random.default_rng(seed), 3 + 9 * seed, CURVES), path)
    else:
        def picture(seed, path):
            r = np.random.default_rng(seed)
            artifacts.reconstructions_png(r.random((10, 784)), r.random((10, 784)), path)

    artifacts._FIGURES.clear()
    picture(0, tmp_path / "first.png")
    picture(1, tmp_path / "reused.png")  # drawn on the first one's figure
    assert len(artifacts._FIGURES) == 1
    artifacts._FIGURES.clear()
    picture(1, tmp_path / "fresh.png")
    assert np.array_equal(_pixels(tmp_path / "reused.png"), _pixels(tmp_path / "fresh.png"))
    assert not np.array_equal(_pixels(tmp_path / "first.png"), _pixels(tmp_path / "fresh.png"))


def test_curves_without_validation_or_accuracy_get_their_own_figures(tmp_path):
    """Retraining on train+val logs no validation metrics; an autoencoder no accuracy."""
    rng = np.random.default_rng(0)
    artifacts._FIGURES.clear()
    shapes = {}
    for keys in (CURVES, ("train/loss",), ("train/loss", "val/loss"), CURVES):
        path = tmp_path / f"{len(keys)}.png"
        artifacts.learning_curves_png(_history(rng, 5, keys), path)
        shapes[keys] = _pixels(path).shape
    assert shapes[CURVES] == (400, 1000, 4) and shapes[("train/loss",)] == (400, 550, 4)
    assert len(artifacts._FIGURES) == 3


def test_the_per_class_table_scores_each_class_and_their_means(tmp_path):
    """Five images, counted by hand: a class predicted but never right, a class present but never
    predicted and the seven absent ones score 0 where they divide by 0; the means cover all ten."""
    artifacts.per_class_table(np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), tmp_path, "test")
    rows = {r.pop("class"): list(r.values()) for r in csv.DictReader(open(tmp_path / "classification_report_test.csv"))}
    assert list(rows) == [*artifacts.CLASSES, "macro avg", "weighted avg"]
    assert rows["T-shirt/top"] == ["0.5000", "0.5000", "0.5000", "2"]  # 1 of 2 right, 1 of 2 predicted
    assert rows["Trouser"] == ["0.6667", "1.0000", "0.8000", "2"]
    assert rows["Pullover"] == ["0.0000", "0.0000", "0.0000", "1"] and rows["Dress"] == ["0.0000"] * 3 + ["0"]
    assert rows["macro avg"] == ["0.1167", "0.1500", "0.1300", "5"]
    assert rows["weighted avg"] == ["0.4667", "0.6000", "0.5200", "5"]
    text = (tmp_path / "classification_report_test.txt").read_text().splitlines()
    assert text[0].split() == ["precision", "recall", "f1-score", "support"]
    assert "accuracy 0.6000 5" in " ".join(" ".join(text).split())
    assert text[-1].split() == ["weighted", "avg", "0.4667", "0.6000", "0.5200", "5"]
