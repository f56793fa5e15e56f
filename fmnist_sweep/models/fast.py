"""Faster CPU paths for layers the models use: the same function and gradient as
torch's layer, computed with fewer passes over memory. Each falls back to torch's
own layer wherever its fast path does not apply (other devices, other settings)."""

import functools
import platform
import re

import torch
from torch import nn


# The torch releases whose private oneDNN and aten operators (the fused convolution, the
# SimpleRNN's recurrence) this module is tested with; CI installs the first. On any other
# release those layers take torch's own path, so a changed operator cannot fail a run.
TESTED_TORCH = ("2.13",)
TORCH_VERSION = torch.__version__  # read by private_ops_allowed(); tests set another release here


def private_ops_allowed() -> bool:
    """Whether this torch is a tested release (its major.minor in TESTED_TORCH)."""
    return _tested(TORCH_VERSION)


@functools.cache
def _tested(version: str) -> bool:
    return ".".join(version.split("+")[0].split(".")[:2]) in TESTED_TORCH


@functools.cache
def _has_onednn(op: str) -> bool:
    """torch was built with oneDNN and exposes its fused CPU operator ``op``."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, op)


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


class _FlattenKeepingLayout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.shape = x.shape
        return torch.flatten(x, 1)

    @staticmethod
    def backward(ctx, grad):
        return grad.reshape(ctx.shape).contiguous(memory_format=torch.channels_last)


class Flatten(nn.Flatten):
    """nn.Flatten whose gradient comes back in the channels_last layout its input had.
    torch's flatten hands back a gradient in NCHW order; the max-pool and dropout before
    it then copied their channels_last inputs to that order (and back) in every backward
    pass. Same output (NCHW order) and gradient values."""

    def forward(self, x):
        # (a tensor that is contiguous both ways, one channel or one pixel, needs nothing)
        if not (x.requires_grad and x.dim() == 4 and self.start_dim == 1 and self.end_dim == -1
                and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()):
            return super().forward(x)
        return _FlattenKeepingLayout.apply(x)


class ConvTranspose2d(nn.ConvTranspose2d):
    """nn.ConvTranspose2d that computes a kernel-equals-stride layer (the autoencoder's
    2x2, stride 2: output patches do not overlap) as one matrix product of the input
    pixels with the weight, then places each pixel's k x k patch. torch's transposed
    convolution is several times slower for these thin layers on a CPU and converted memory
    formats around them. Output in channels_last layout; same parameters."""

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
    applied to its result before it is written (torch's tanh alone costs about as much as a
    32-channel 3x3 convolution on the CPU); the backward pass is torch's own. Holds
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


def cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first ``name`` line of /proc/cpuinfo ("vendor_id", "flags", ...), its value
    only; "" where there is no such file or line (not Linux)."""
    try:
        with open(cpuinfo) as f:
            line = next((line for line in f if line.split(":")[0].strip() == name), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


@functools.cache
def _gemm_backend(cpuinfo: str = "/proc/cpuinfo") -> str:
    """Where the SimpleRNN's fp32 matrix products run fastest: oneDNN on AMD CPUs from Zen 5
    (family 26) on, MKL (torch's own addmm/mm) everywhere else. MKL takes its AVX2 path on
    AMD CPUs, which halves its speed only where AVX-512 runs at full width (Zen 5). On
    Zen 4 AVX-512 runs on 256-bit units, so MKL's AVX2 code is as fast and its smaller
    per-call cost wins at the small step products; on Intel MKL is the faster. Decided by
    the CPU, not timed, so that a configuration gives the same numbers on every run."""
    # Linux names vendor and family in /proc/cpuinfo; Windows in platform.processor(),
    # e.g. "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD"
    vendor = cpuinfo_field("vendor_id", cpuinfo) or platform.processor()
    family = cpuinfo_field("cpu family", cpuinfo) or "".join(re.findall(r"Family (\d+)", platform.processor())[:1])
    if ("AuthenticAMD" in vendor and family.isdigit() and int(family) >= 26 and torch.backends.mkl.is_available()
            and _has_onednn("_linear_pointwise")):
        return "onednn"
    return "blas"


def _gemm_ops(backend: str):
    """(linear, recurrence): linear(x, w, b) = x @ w.T + b; recurrence(m) gives step(acc, x)
    = acc + x @ m — in place in acc for torch's BLAS (so acc must be ours to overwrite),
    in a new tensor for oneDNN."""
    if backend == "blas":
        def linear(x, w, b=None):
            return torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())

        def recurrence(m):
            return lambda acc, x: acc.addmm_(x, m)
        return linear, recurrence
    ops = torch.ops.mkldnn

    def linear(x, w, b=None):
        return ops._linear_pointwise(x, w, b, "none", [], "")

    def recurrence(m):
        w = m.t().contiguous()  # oneDNN's weight layout: (out, in)
        return lambda acc, x: ops._linear_pointwise.binary(x, acc, w, None, "add")
    return linear, recurrence


class _Elman(torch.autograd.Function):
    """One Elman layer over a whole sequence, time-major inside. Forward: the input
    projection of every step as one GEMM, written where the outputs go; then per step
    the product with the previous state added to it, and the activation, in place.
    Backward: per step one GEMM back through the recurrence, accumulated into a copy of
    the incoming gradient; the weight gradients of all steps as one GEMM each."""

    @staticmethod
    def forward(ctx, x, w_ih, w_hh, b_ih, b_hh, nonlinearity, backend):
        linear, recurrence = _gemm_ops(backend)
        step = recurrence(w_hh.t())  # h_t = act(x_t w_ih^T + b + h_{t-1} w_hh^T)
        n, steps, _ = x.shape
        xs = x.transpose(0, 1).reshape(steps * n, -1)
        out = linear(xs, w_ih, b_ih + b_hh).view(steps, n, -1)
        act = torch.tanh if nonlinearity == "tanh" else (lambda z, out: torch.clamp_min(z, 0, out=out))
        outs = out.unbind(0)  # the steps' views, made once
        act(outs[0], out=outs[0])
        for t in range(1, steps):
            act(step(outs[t], outs[t - 1]), out=outs[t])
        ctx.save_for_backward(xs, w_ih, w_hh, out)
        ctx.nonlinearity, ctx.backend = nonlinearity, backend
        return out.transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        linear, recurrence = _gemm_ops(ctx.backend)
        xs, w_ih, w_hh, out = ctx.saved_tensors
        steps, n, hidden = out.shape
        # Per step, in place in one buffer (a copy, not autograd's tensor): the state's
        # gradient is accumulated, then turned into the pre-activation's gradient (dz).
        dz = grad.transpose(0, 1).clone(memory_format=torch.contiguous_format)
        step = recurrence(w_hh)  # the state's gradient: g_{t-1} += dz_t w_hh
        dzs, outs = dz.unbind(0), out.unbind(0)
        if ctx.nonlinearity == "tanh":
            act_backward = torch.ops.aten.tanh_backward.grad_input
        else:
            def act_backward(g, y, grad_input):
                return torch.ops.aten.threshold_backward.grad_input(g, y, 0, grad_input=grad_input)
        g_t = dzs[-1]
        for t in range(steps - 1, -1, -1):
            act_backward(g_t, outs[t], grad_input=dzs[t])
            if t:  # from the output at t - 1 and back through w_hh
                g_t = step(dzs[t - 1], dzs[t])
        z = dz.view(steps * n, hidden)
        zt = z.t().contiguous() if ctx.backend == "onednn" else z.t()  # BLAS reads it transposed
        d_w_hh = linear(zt[:, n:], out[:-1].reshape((steps - 1) * n, hidden).t())
        d_w_ih = linear(zt, xs.t())
        d_b = z.sum(0)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = linear(z, w_ih.t()).view(steps, n, -1).transpose(0, 1)
        return dx, d_w_ih, d_w_hh, d_b, d_b, None, None


class RNN(nn.RNN):
    """nn.RNN whose one-layer, batch-first fp32 case on a CPU runs as _Elman: the input
    projection of all steps as one product, the recurrence accumulated in place, a
    hand-written backward pass with the weight gradients of all steps as one product
    each; products through MKL, or oneDNN on AMD Zen 5 and newer (_gemm_backend). Same
    function and gradients as nn.RNN; everything else (bf16 autocast, stacked or
    bidirectional layers, an initial state, an untested torch release) is torch's own."""

    def forward(self, x, hx=None):
        if not (hx is None and x.device.type == "cpu" and x.dim() == 3 and x.shape[1] > 1 and self.batch_first
                and self.num_layers == 1 and not self.bidirectional and self.bias and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and private_ops_allowed()):
            return super().forward(x, hx)
        out = _Elman.apply(x, self.weight_ih_l0, self.weight_hh_l0, self.bias_ih_l0, self.bias_hh_l0,
                           self.nonlinearity, _gemm_backend())
        return out, out[:, -1].unsqueeze(0)
