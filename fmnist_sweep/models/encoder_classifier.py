"""A classifier on the autoencoder's encoder, pretrained (optionally frozen) or from scratch."""

import torch
from torch import nn

from . import Classifier
from .autoencoder import Encoder, encoder_state


class EncoderClassifier(Classifier):
    """Autoencoder encoder -> ReLU -> linear head."""

    channels_last_gain = True
    # The encoder is pretrained on [0, 1] images, as the autoencoder sees them.
    standardize = False

    def __init__(self, latent_dim=64, dropout=0.2, channels=(16, 32), pretrained=None,
                 freeze=False, num_classes=10):
        super().__init__()
        self.encoder = Encoder(latent_dim, dropout, channels)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(latent_dim, num_classes))
        if pretrained is not None:
            state = torch.load(pretrained, map_location="cpu", weights_only=True)
            self.encoder.load_state_dict(encoder_state(state))
        # Freezing acts on a pretrained encoder only: a frozen random one learns nothing.
        self.freeze = freeze and pretrained is not None
        if self.freeze:
            self.encoder.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        if self.freeze:  # a frozen encoder keeps its dropout off too
            self.encoder.eval()
        return self

    def logits(self, x):
        return self.head(self.encoder(x))
