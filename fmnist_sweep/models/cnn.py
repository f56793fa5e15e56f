"""The Keras study's CNN (306,906 parameters counted as Keras does)."""

from torch import nn

from . import Classifier, Dropout

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


class CNN(Classifier):
    """Blocks of [conv3x3-BN-conv3x3-BN-maxpool-dropout], then dense-BN-dropout-linear.
    ``dropouts``: one rate per block, or one number for all of them."""

    channels_last_gain = True

    def __init__(self, widths=(32, 64, 128), dropouts=(0.2, 0.3, 0.4), activation="tanh",
                 dense=16, dense_dropout=0.5, num_classes=10):
        super().__init__()
        if isinstance(dropouts, (int, float)):  # one rate for every block
            dropouts = [dropouts] * len(widths)
        if len(widths) != len(dropouts):
            raise ValueError(f"model.widths ({len(widths)}) and model.dropouts ({len(dropouts)}) must have the same length")
        act = ACTIVATIONS[activation]
        layers, c, size = [], 1, 28
        for w, p in zip(widths, dropouts):
            # Keras applies the activation inside Conv2D, before BatchNorm.
            layers += [nn.Conv2d(c, w, 3, padding=1), act(), nn.BatchNorm2d(w),
                       nn.Conv2d(w, w, 3, padding=1), act(), nn.BatchNorm2d(w),
                       nn.MaxPool2d(2), Dropout(p)]
            c, size = w, size // 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(c * size * size, dense), nn.ReLU(), nn.BatchNorm1d(dense),
            Dropout(dense_dropout), nn.Linear(dense, num_classes))

    def logits(self, x):
        return self.head(self.features(x))
