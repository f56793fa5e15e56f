"""Where and how a run computes: the device, the precision, the threads, the allocator,
and the CPU fast paths. Decided from what the machine says (CUDA, /proc/cpuinfo flags,
the cores this process may use), never timed, so a configuration trains the same way
on every run. The figures behind each rule are in docs/PERFORMANCE.md."""

from __future__ import annotations

import ctypes
import os
import sys

import torch

from .models.fast import cpuinfo_field

CPUINFO = "/proc/cpuinfo"


def select_device(name: str) -> torch.device:
    """The torch device ``trainer.device`` names (auto: CUDA if present); CPU with a warning if CUDA is
    missing."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        if name != "auto":
            print(f"warning: trainer.device={name} but CUDA is not available here; training on cpu")
        return torch.device("cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_label(setting: str) -> str:
    """Where runs of this process train, for the record (no warnings printed)."""
    if setting == "cpu" or not torch.cuda.is_available():
        return "cpu"
    index = int(setting.split(":")[1]) if ":" in setting else torch.cuda.current_device()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"cuda:{index} ({torch.cuda.get_device_name(index)}" + (f", CUDA_VISIBLE_DEVICES={visible})" if visible else ")")


# oneDNN's instruction-set levels (ONEDNN_MAX_CPU_ISA values) below its first bf16 level.
ONEDNN_BELOW_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")


def isa_cap() -> str:
    """The setting that keeps torch's or oneDNN's kernels below the CPU's bf16 instructions, if any
    (ATEN_CPU_CAPABILITY=avx2 or default; ONEDNN_MAX_CPU_ISA below AVX512_CORE_BF16): bf16 is then
    emulated whatever the CPU has."""
    aten = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if aten in ("default", "avx2"):
        return f"ATEN_CPU_CAPABILITY={aten}"
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if onednn in ONEDNN_BELOW_BF16:
        return f"ONEDNN_MAX_CPU_ISA={onednn}"
    return ""


def cpu_bf16_slowdown(cpuinfo: str | None = None) -> str:
    """Why bf16 is not this CPU's fast path, for the warning, from its /proc/cpuinfo flags; "" where
    it is: amx_bf16, or avx512_bf16 with vendor_id AuthenticAMD (docs/PERFORMANCE.md measures each),
    unless an instruction-set cap leaves them out (isa_cap)."""
    if cap := isa_cap():
        return f"a CPU whose bf16 instructions {cap} leaves out (autocast emulates them)"
    cpuinfo = cpuinfo or CPUINFO
    flags = cpuinfo_field("flags", cpuinfo).split()
    if "amx_bf16" in flags or ("avx512_bf16" in flags and "AuthenticAMD" in cpuinfo_field("vendor_id", cpuinfo)):
        return ""
    if "avx512_bf16" in flags:
        return "a CPU where bf16 trains slower than fp32 (flags: avx512_bf16 without amx_bf16)"
    return "a CPU where bf16 trains slower than fp32 (flags: no bf16 instructions, autocast emulates them)"


def cpu_has_fast_bf16() -> bool:
    return not cpu_bf16_slowdown()


def select_precision(setting: str, device: torch.device, model) -> str:
    """fp32 or bf16 for this run: ``auto`` takes bf16 where the hardware makes it fast and the model gains."""
    if setting == "bf16" and device.type == "cpu" and (why := cpu_bf16_slowdown()):
        print(f"warning: trainer.precision=bf16 on {why}; precision=auto trains in fp32 here")
    if setting != "auto":
        return setting
    fast = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_fast_bf16()
    return "bf16" if fast and getattr(model, "bf16_gain", False) else "fp32"


def keep_freed_memory(keep: bool = True) -> bool:
    """glibc maps blocks over its mmap threshold (128 KB, raised as large blocks are
    freed) fresh from the OS and trims the heap past twice that, so a step's activation
    tensors are often page-faulted in afresh, which makes small elementwise ops cost more.
    With ``keep`` the heap serves blocks up to 32 MB and is trimmed only past 512 MB free,
    so the next step reuses the same pages (PyTorch's CPU tuning guide gets the same by
    preloading jemalloc or tcmalloc). ``keep=False`` sets glibc's initial thresholds
    (128 KB) back, fixed: its adaptive default cannot be restored once changed.
    Returns False where there is no glibc mallopt (macOS, Windows, musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mmap, trim = (32 << 20, 512 << 20) if keep else (128 << 10, 128 << 10)
    return bool(mallopt(m_mmap_threshold, mmap)) and bool(mallopt(m_trim_threshold, trim))


CPU_MAX = "/sys/fs/cgroup/cpu.max"  # cgroup v2: a container's CPU limit (Kubernetes, docker --cpus)


def cpu_limit(path: str = CPU_MAX) -> int | None:
    """Whole cores a container's CPU limit allows (its quota over its period, at least 1);
    None without a limit."""
    try:
        with open(path) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def threads_for(setting) -> int:
    """Threads for this process: the cores it may run on, within its container's CPU limit
    (more threads than the limit's cores are throttled, not run), unless set."""
    if setting != "auto":
        return int(setting)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return min(cores, cpu_limit(CPU_MAX) or cores)


def compile_for_training(model: torch.nn.Module, mode: str | None) -> torch.nn.Module | None:
    """``model`` wrapped by torch.compile in ``mode`` (trainer.compile: default, reduce-overhead =
    CUDA graphs, max-autotune), sharing its parameters; None when ``mode`` is null. Only the
    training steps call it: evaluation, export and the saved weights use ``model`` itself."""
    if not mode:
        return None
    return torch.compile(model, mode=None if mode == "default" else mode)


def prepare(threads) -> None:
    """This process before a run: ``threads`` torch threads (trainer.threads), freed memory kept."""
    torch.set_num_threads(threads_for(threads))
    keep_freed_memory()
