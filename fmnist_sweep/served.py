"""The model a run logs to MLflow: its trained network as an exported torch program (MLflow's
PyTorch flavor, ``pt2`` format) that takes raw pixels, with a signature and an input example.
The program holds torch's own operators only (no fast layer of ``models/fast/``, no class
of this package), so ``mlflow.pyfunc.load_model``, ``mlflow models serve`` and ``predict``
run it in any process with torch and MLflow."""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager

import numpy as np
import torch
from torch import nn

from .models import fast

# Each fast layer's torch parent: the same parameters and function.
STOCK_LAYERS = {fast.Dropout: nn.Dropout, fast.ConvTranspose2d: nn.ConvTranspose2d, fast.RNN: nn.RNN}
PIP_REQUIREMENTS = [f"torch=={torch.__version__.split('+')[0]}"]


def stock(model: nn.Module) -> nn.Module:
    """A copy of ``model`` on the CPU in eval mode, built of torch's own layers: each fast
    layer becomes its torch parent."""
    model = copy.deepcopy(model).cpu().float().eval()
    for module in list(model.modules()):
        if type(module) in STOCK_LAYERS:
            module.__class__ = STOCK_LAYERS[type(module)]  # a subclass adding no state: same module
    return model


class Served(nn.Module):
    """uint8 images (N, 28, 28) -> class probabilities (N, 10) for a classifier, or
    reconstructions (N, 28, 28) in [0, 1] for an autoencoder. Scaling to [0, 1] is here and
    the model's standardisation inside it: callers pass raw pixels."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.classify = model.task == "classify"

    def forward(self, images):
        out = self.model(images.to(torch.float32).div(255).unsqueeze(1))[0].float()
        return out.softmax(1) if self.classify else out.squeeze(1)


def signature(classify: bool):
    """The MLflow signature: unnamed tensors (a named one makes pyfunc pass a dict)."""
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    out = (-1, 10) if classify else (-1, 28, 28)
    return ModelSignature(Schema([TensorSpec(np.dtype(np.uint8), (-1, 28, 28))]),
                          Schema([TensorSpec(np.dtype(np.float32), out)]))


def as_pixels(x: torch.Tensor) -> np.ndarray:
    """Images of a split ((N, 1, 28, 28) in [0, 1]) as the uint8 (N, 28, 28) the served model takes."""
    return x.squeeze(1).mul(255).round().to(torch.uint8).cpu().numpy()


@contextmanager
def using_tracking_uri(uri: str):
    """MLflow's model logging reads the process-wide tracking URI: ``uri`` while inside."""
    import mlflow

    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)


def log(tracker, run_id: str, model: nn.Module, example: np.ndarray, step: int) -> str:
    """Log ``model`` as the run's MLflow Model (its metrics at ``step`` linked to it); its id.
    ``example``: two or more uint8 images, so that the batch size is exported as dynamic."""
    import mlflow

    served = Served(stock(model))
    logged = tracker.client.create_logged_model(tracker.experiment_id, name="model", source_run_id=run_id,
                                                model_type="classifier" if served.classify else "autoencoder")
    with using_tracking_uri(tracker.uri), warnings.catch_warnings():
        # nn.RNN/LSTM re-point their flat weights while traced: torch's note on it is not the user's concern.
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        # Weights that are views of one storage (on the CPU here) are archived whole: torch says so.
        warnings.filterwarnings("ignore", message="No complete tensor found in the group")
        # The signature and requirements given: MLflow infers neither (each costs a model load).
        mlflow.pytorch.log_model(served, name="model", model_id=logged.model_id, run_id=run_id, step=step,
                                 signature=signature(served.classify), input_example=example,
                                 serialization_format="pt2", pip_requirements=PIP_REQUIREMENTS,
                                 validate_serving_input=False)
    return logged.model_id
