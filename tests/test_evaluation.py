"""Figures of a trained model's evaluation: real PNGs, and no backend switch on import."""

import subprocess
import sys

import numpy as np
from matplotlib.image import imread

from tfstack import evaluation


def test_importing_tfstack_keeps_the_users_matplotlib_backend():
    code = (
        "import matplotlib; matplotlib.use('svg'); "
        "import tfstack.evaluation, tfstack.compare; print(matplotlib.get_backend())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "svg"


def test_figures_save_as_pngs_that_open(tmp_path):
    matrix = evaluation.confusion_matrix(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), 3)
    history = [
        {"epoch": 0, "phase": "head", "loss": 1.0, "val_loss": 1.1, "accuracy": 0.5},
        {"epoch": 1, "phase": "fine_tune", "loss": 0.8, "val_loss": 0.9, "accuracy": 0.6},
    ]
    figures = {
        "confusion": evaluation.confusion_figure(matrix),
        "regression": evaluation.regression_figure(np.arange(5.0), np.arange(5.0) + 0.1),
        "curve": evaluation.learning_curve_figure(history, [(0, "head"), (1, "fine_tune")]),
    }
    for name, figure in figures.items():
        path = tmp_path / f"{name}.png"
        figure.savefig(path, format="png")
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, name
        assert image.std() > 0, f"{name} is blank"
