"""The SimpleRNN's one-layer fp32 recurrence with a hand-written backward pass (aten's
private backward operators; oneDNN's linear where the CPU favours it), on the torch
releases private_ops_allowed() names."""

import functools
import platform
import re

import torch
from torch import nn

from . import _has_onednn, cpuinfo_field, private_ops_allowed


@functools.cache
def _gemm_backend(cpuinfo: str = "/proc/cpuinfo") -> str:
    """Where the SimpleRNN's fp32 matrix products run: oneDNN on AMD CPUs of family 26 and
    later, whose full-width AVX-512 MKL does not use (MKL takes its AVX2 path on AMD CPUs);
    MKL (torch's own addmm/mm) everywhere else, where its smaller per-call cost wins at the
    small step products. Decided by the CPU, not timed, so that a configuration gives the
    same numbers on every run; docs/PERFORMANCE.md has the measurements."""
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
        # Under torch.compile (Dynamo runs RNN.forward eagerly and compiles this frame), torch's
        # BLAS products: Inductor lowers oneDNN's linear for constant (frozen) weights only.
        backend = "blas" if torch.compiler.is_compiling() else backend
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
    each; products through MKL, or oneDNN where _gemm_backend picks it (not under torch.compile). Same
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
