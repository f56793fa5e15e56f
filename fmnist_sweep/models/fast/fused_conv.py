"""A convolution and the activation after it as one oneDNN kernel (torch's private
``mkldnn._convolution_pointwise``), on the torch releases private_ops_allowed() names."""

import functools

import torch
from torch import nn

from . import _has_onednn, private_ops_allowed


# Activations oneDNN can apply inside the convolution: the module, torch's function (the
# fallback), and the gradient from the output.
_FUSABLE = {nn.Tanh: "tanh", nn.ReLU: "relu", nn.Sigmoid: "sigmoid"}
_ACTIVATIONS = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid}
_GRAD_FROM_OUTPUT = {"tanh": torch.ops.aten.tanh_backward, "sigmoid": torch.ops.aten.sigmoid_backward,
                     "relu": lambda grad, y: torch.ops.aten.threshold_backward(grad, y, 0)}


class _ConvActivation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, activation):
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, padding, stride, dilation, groups,
                                                    activation, [], "")
        ctx.save_for_backward(x, weight, y)
        ctx.conv = (stride, padding, dilation, groups, activation, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, y = ctx.saved_tensors
        stride, padding, dilation, groups, activation, has_bias = ctx.conv
        grad = _GRAD_FROM_OUTPUT[activation](grad, y).to(x.dtype)
        needs = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.convolution_backward(
            grad, x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation, False, [0, 0],
            groups, [needs[0], needs[1], has_bias and needs[2]])
        return gx, gw, gb, None, None, None, None, None


@functools.cache
def _onednn_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions on this CPU (AVX-512 BW/VL/DQ or AVX-NE-CONVERT):
    without them its fused kernel refuses bf16, and torch's own convolution emulates it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class Conv2dActivation(nn.Conv2d):
    """A Conv2d and the activation after it as one oneDNN convolution with the activation
    applied to its result before it is written (torch's activation is a separate pass over
    memory); the backward pass is torch's own. Holds
    the convolution's own parameters: built by fuse_conv_activations()."""

    activation = "tanh"

    def forward(self, x):
        weight, bias = self.weight, self.bias
        if not (x.device.type == "cpu" and isinstance(self.padding, tuple) and self.padding_mode == "zeros"
                and x.dim() == 4):
            return _ACTIVATIONS[self.activation](super().forward(x))
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        if torch.bfloat16 in (autocast, x.dtype) and not _onednn_bf16():
            return _ACTIVATIONS[self.activation](super().forward(x))
        if autocast is not None:  # what autocast does for a convolution
            dtype = autocast
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        if x.dtype not in (torch.float32, torch.bfloat16) or x.dtype != weight.dtype:
            return _ACTIVATIONS[self.activation](super().forward(x))
        with torch.autocast("cpu", enabled=False):
            return _ConvActivation.apply(x, weight, bias, list(self.stride), list(self.padding),
                                         list(self.dilation), self.groups, self.activation)


def fuse_conv_activations(model: nn.Module) -> int:
    """Replace each Conv2d directly followed by a Tanh, ReLU or Sigmoid in an
    nn.Sequential by one Conv2dActivation (and the activation by an Identity), keeping
    the same Parameter objects (an optimizer built before still updates them) and the
    same state_dict keys. Does nothing without oneDNN or on an untested torch release.
    Returns how many it fused."""
    if not (private_ops_allowed() and _has_onednn("_convolution_pointwise")):
        return 0
    fused = 0
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        for i in range(len(seq) - 1):
            conv, act = seq[i], seq[i + 1]
            if type(conv) is not nn.Conv2d or type(act) not in _FUSABLE:
                continue
            new = Conv2dActivation(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                   conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                                   conv.padding_mode, device="meta")
            new.weight, new.bias = conv.weight, conv.bias
            new.activation = _FUSABLE[type(act)]
            seq[i], seq[i + 1] = new, nn.Identity()
            fused += 1
    return fused
