"""A small residual CNN with BatchNorm: the stronger family the studies did not try.

Stem conv3x3 -> stages of basic residual blocks (the first block of each later
stage halves the resolution) -> global average pool -> dropout -> linear.
Trained with label smoothing; augmentation and the learning-rate schedule are the
trainer's (``trainer.augment``, ``trainer.lr_schedule``)."""

from torch import nn

from . import Classifier, Dropout
from .cnn import ACTIVATIONS


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride, act):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), act(),
            nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out))
        nn.init.zeros_(self.body[-1].weight)  # each block starts as the identity
        self.shortcut = nn.Identity() if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))
        self.act = act()

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))


class ResNet(Classifier):
    channels_last_gain = True

    def __init__(self, widths=(32, 64, 128), blocks=(1, 1, 1), activation="relu", dropout=0.0,
                 label_smoothing=0.1, num_classes=10):
        super().__init__()
        if isinstance(blocks, int):
            blocks = [blocks] * len(widths)
        if len(blocks) != len(widths):
            raise ValueError(f"model.blocks ({len(blocks)}) and model.widths ({len(widths)}) must have the same length")
        act = ACTIVATIONS[activation]
        layers = [nn.Conv2d(1, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), act()]
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks)):
            for j in range(n):
                layers.append(Block(c, w, 2 if i > 0 and j == 0 else 1, act))
                c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), Dropout(dropout),
                                  nn.Linear(c, num_classes))
        self.label_smoothing = label_smoothing

    def logits(self, x):
        return self.head(self.features(x))
