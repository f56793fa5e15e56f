"""Faster CPU paths for layers the models use: the same function and gradient as
torch's layer, computed with fewer passes over memory. Each falls back to torch's own
layer wherever its fast path does not apply (other devices, other settings). By risk:
layers.py builds on torch's public operators; elman.py calls oneDNN's fused linear and
aten's private backward operators, only on the torch releases this package is tested with
(private_ops_allowed). docs/PERFORMANCE.md has what each one gains on each CPU class."""

import functools

import torch

# The torch releases whose private oneDNN and aten operators (the SimpleRNN's recurrence)
# this module is tested with; CI installs the first. On any other
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


def cpuinfo_field(name: str, cpuinfo: str = "/proc/cpuinfo") -> str:
    """The first ``name`` line of /proc/cpuinfo ("vendor_id", "flags", ...), its value
    only; "" where there is no such file or line (not Linux)."""
    try:
        with open(cpuinfo) as f:
            line = next((line for line in f if line.split(":")[0].strip() == name), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


from .elman import RNN  # noqa: E402,F401  (after the gate, which they import)
from .layers import ConvTranspose2d, Dropout  # noqa: E402,F401
