"""Layers on torch's public operators: dropout with a cheaper mask and a kernel-equals-stride
transposed convolution as one matrix product."""

import torch
from torch import nn


class Dropout(nn.Dropout):
    """nn.Dropout with a faster mask on the CPU. torch draws the CPU dropout mask with
    ``bernoulli_``, one Mersenne-Twister draw per element (a large share of the
    autoencoder's step); this draws 64 random bits per 4 elements and keeps an element
    when its 16 bits clear ``p``. Same distribution up to p's
    rounding to 1/65,536, same seeding (torch's default generator), same scaling by
    1 / (1 - p) and the same gradient; other devices, eval mode and p of 0 or 1 take
    torch's own dropout."""

    def forward(self, x):
        if not (self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and not self.inplace):
            return super().forward(x)
        n = x.numel()
        bits = torch.empty((n + 3) // 4, dtype=torch.int64).random_(-2 ** 63, None).view(torch.int16)[:n]
        # The mask laid out as x (channels_last too), so the product keeps x's memory format.
        bits = (bits.as_strided(x.shape, x.stride()) if x.dim() == 4 and x.is_contiguous(
            memory_format=torch.channels_last) else bits.view(x.shape))
        keep = bits >= round(self.p * 65536) - 32768  # P = 1 - p
        # bool -> float is torch's scalar cast; uint8 -> float is vectorised.
        return x * keep.view(torch.uint8).to(x.dtype).mul_(1.0 / (1.0 - self.p))


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d that computes a kernel-equals-stride layer (the autoencoder's
    2x2, stride 2: output patches do not overlap) as one matrix product of the input
    pixels with the weight, then places each pixel's k x k patch. torch's transposed
    convolution is slower for these thin layers on a CPU and converts memory formats around
    them. Output in channels_last layout; same parameters."""

    def forward(self, x, output_size=None):
        (kh, kw), co = self.kernel_size, self.out_channels
        if not (output_size is None and x.device.type == "cpu" and x.dim() == 4 and self.groups == 1
                and self.stride == self.kernel_size and self.padding == (0, 0) and self.output_padding == (0, 0)
                and self.dilation == (1, 1)):
            return super().forward(x, output_size)
        n, c, h, w = x.shape
        pixels = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view when x is channels_last
        weight = self.weight.permute(0, 2, 3, 1).reshape(c, kh * kw * co)  # columns ordered (row, col, channel)
        y = pixels @ weight if self.bias is None else torch.addmm(self.bias.repeat(kh * kw), pixels, weight)
        # (n, h, w, kh, kw, co) -> (n, h, kh, w, kw, co): output pixel (h*kh + i, w*kw + j), channels last
        y = y.view(n, h, w, kh, kw, co).transpose(2, 3).reshape(n, h * kh, w * kw, co)
        return y.permute(0, 3, 1, 2)
