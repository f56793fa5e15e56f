"""Model families. Every model takes images in [0, 1] shaped (N, 1, 28, 28) and
owns its loss: ``forward(x, y=None) -> (output, loss)``; ``task`` tells the
trainer which metrics apply ("classify" or "reconstruct")."""

from torch import nn
from torch.nn import functional as F

# The models' layers with CPU fast paths (re-exported: models import them from here).
from .fast import RNN, ConvTranspose2d, Dropout  # noqa: F401

# Fashion-MNIST training-set pixel statistics (of images scaled to [0, 1]).
MEAN, STD = 0.2860, 0.3530

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class Classifier(nn.Module):
    """Base of the classifiers: standardises its input, returns logits and cross-entropy."""

    task = "classify"
    # precision=auto may train this family in bf16 (hardware.select_precision).
    bf16_gain = True
    channels_last_gain = False
    # Standardise [0, 1] pixels with the training-set statistics before logits().
    standardize = True
    # Cross-entropy against (1 - s) one-hot + s uniform targets.
    label_smoothing = 0.0

    def forward(self, x, y=None):
        logits = self.logits((x - MEAN) / STD if self.standardize else x)
        loss = None if y is None else F.cross_entropy(
            logits.float(), y, label_smoothing=self.label_smoothing if self.training else 0.0)
        return logits, loss


def count_params(model: nn.Module, convention: str = "torch") -> int:
    """Parameter count. ``convention="keras"`` counts as Keras' model.summary()
    does: BatchNorm moving mean/variance included, and one bias per recurrent
    gate where PyTorch keeps two (b_ih and b_hh), so the seed studies' published
    totals can be checked."""
    n = sum(p.numel() for p in model.parameters())
    if convention == "torch":
        return n
    if convention != "keras":
        raise ValueError(f"unknown convention {convention!r}")
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
            n += m.running_mean.numel() + m.running_var.numel()
        if isinstance(m, nn.RNNBase) and m.bias:
            n -= sum(p.numel() for name, p in m.named_parameters() if name.startswith("bias_hh"))
    return n
