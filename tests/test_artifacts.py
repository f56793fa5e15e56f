"""A run's pictures: drawn on figures a process builds once and reuses for every run
(a worker draws them for each trial), so a picture must not keep anything of the run
drawn before it."""

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
