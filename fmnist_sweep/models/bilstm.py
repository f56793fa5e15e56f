"""The Keras study's BiLSTM: each image row is one time step."""

import torch
from torch import nn

from . import Classifier, Dropout


class BiLSTM(Classifier):
    """Bidirectional LSTMs (last returns its final states) -> dense ReLU/dropout stack -> linear."""

    def __init__(self, hidden=(256, 128), dense=(256, 128), dropout=0.3, num_classes=10):
        super().__init__()
        self.lstms = nn.ModuleList()
        size = 28
        for h in hidden:
            self.lstms.append(nn.LSTM(size, h, batch_first=True, bidirectional=True))
            size = 2 * h
        layers = []
        for d in dense:
            layers += [nn.Linear(size, d), nn.ReLU(), Dropout(dropout)]
            size = d
        self.head = nn.Sequential(*layers, nn.Linear(size, num_classes))

    def logits(self, x):
        seq = x.flatten(1, 2)
        for lstm in self.lstms:
            seq, _ = lstm(seq)
        # Keras' Bidirectional(return_sequences=False) concatenates the forward direction's
        # last state with the backward direction's final state: the forward half of the last
        # step's output and the backward half of the first's (the sequence, not h_n, since
        # torch.export of some releases miscomputes h_n's shape at a dynamic batch size).
        half = seq.shape[2] // 2
        return self.head(torch.cat((seq[:, -1, :half], seq[:, 0, half:]), 1))
