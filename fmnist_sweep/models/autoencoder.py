"""The PyTorch study's convolutional autoencoder."""

import torch
from torch import nn
from torch.nn import functional as F

from . import ConvTranspose2d, Dropout


class Encoder(nn.Module):
    """2 x [conv3x3 -> ReLU -> maxpool -> dropout] -> linear to the latent vector."""

    def __init__(self, latent_dim=64, dropout=0.2, channels=(16, 32)):
        super().__init__()
        c1, c2 = channels
        # Max-pool before ReLU: the same function and gradient (ReLU is monotonic, so the
        # two commute), with the ReLU on a quarter of the elements.
        self.net = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), Dropout(dropout),
            nn.Conv2d(c1, c2, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(), Dropout(dropout),
            nn.Flatten(), nn.Linear(c2 * 7 * 7, latent_dim))

    def forward(self, x):
        return self.net(x)


OUTPUTS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU}


class Autoencoder(nn.Module):
    """Encoder -> latent n -> linear -> 2 x transposed conv -> sigmoid (or ReLU); MSE loss."""

    task = "reconstruct"
    bf16_gain = True
    channels_last_gain = True

    def __init__(self, latent_dim=64, dropout=0.2, channels=(16, 32), output_activation="sigmoid"):
        super().__init__()
        c1, c2 = channels
        self.encoder = Encoder(latent_dim, dropout, channels)
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, c2 * 7 * 7), nn.ReLU(), Dropout(dropout),
            nn.Unflatten(1, (c2, 7, 7)),
            ConvTranspose2d(c2, c1, 2, stride=2), nn.ReLU(), Dropout(dropout),
            ConvTranspose2d(c1, 1, 2, stride=2), OUTPUTS[output_activation]())

    def forward(self, x, y=None):
        recon = self.decoder(self.encoder(x))
        return recon, F.mse_loss(recon.float(), x)


def encoder_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The encoder's weights out of an autoencoder state_dict."""
    enc = {k.removeprefix("encoder."): v for k, v in state_dict.items() if k.startswith("encoder.")}
    if not enc:
        raise ValueError("this state_dict holds no 'encoder.*' weights: is it an autoencoder's?")
    return enc
