"""The Keras study's SimpleRNN: each image row is one time step."""

from torch import nn

from . import Classifier, Dropout, fast


class RNN(Classifier):
    """Stacked Elman RNN layers (last one returns its final state) -> BN -> linear."""

    # bf16 autocast slows the SimpleRNN down on a CPU (docs/PERFORMANCE.md): it stays fp32.
    bf16_gain = False

    def __init__(self, hidden=(256, 128, 64), activation="relu", dropout=0.0, num_classes=10):
        super().__init__()
        # Separate layers because Keras stacks layers of different widths.
        self.layers = nn.ModuleList()
        size = 28
        for h in hidden:
            self.layers.append(fast.RNN(size, h, nonlinearity=activation, batch_first=True))
            size = h
        self.dropout = Dropout(dropout)
        self.norm = nn.BatchNorm1d(size)
        self.out = nn.Linear(size, num_classes)

    def logits(self, x):
        seq = x.flatten(1, 2)  # (N, 28 rows, 28 pixels)
        for rnn in self.layers:
            seq, _ = rnn(seq)
        return self.out(self.norm(self.dropout(seq[:, -1])))
