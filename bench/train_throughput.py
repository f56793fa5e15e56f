"""Training images/s of our engine vs a PyTorch-tutorial-style loop, side by side, and the
engine's achieved GFLOP/s as a share of this machine's measured large-matmul peak.

Baseline (as the tutorials write it): the model with torch's own layers, torchvision's
FashionMNIST dataset — per item a uint8 image to a PIL image, then ToTensor — +
DataLoader(shuffle=True), fp32, the optimizer's defaults. Engine: the whole split as one
tensor on the device, batches by index slicing, fmnist_sweep.train.train_epoch with what
`python -m fmnist_sweep` picks by default (precision auto = bf16 autocast where the CPU has
AMX/AVX512-BF16, channels_last for conv models, convolutions fused with their activation,
our layers' CPU fast paths), and in fp32 for the equal-precision comparison. Both loops run
with freed memory kept in the process, as `run()` sets it (--system-allocator: neither
does). Same model, batch size and threads; windows interleaved so noise hits all alike;
medians reported.

FLOPs per training image are counted with torch.utils.flop_counter (forward + backward of
one batch; recurrent layers counted analytically); the peak is a large bf16 / fp32 matmul.

    python bench/train_throughput.py                          # all families, ~6 min on 2 cores
    python bench/train_throughput.py --models cnn --compile   # also torch.compile'd engine
    python bench/train_throughput.py --quick                  # tiny, to check it runs
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import numpy as np
import torch
from hydra.utils import instantiate
from PIL import Image

from fmnist_sweep.config import compose
from fmnist_sweep.data import Split
from fmnist_sweep.models import fast
from fmnist_sweep.hardware import (compile_for_training, cpu_has_fast_bf16, isa_cap, keep_freed_memory,
                                   select_precision, threads_for)
from fmnist_sweep.train import make_optimizer, train_epoch

BATCH = {"cnn": 100, "rnn": 65, "bilstm": 64, "autoencoder": 100, "encoder_classifier": 100, "resnet": 128}
OPTIMIZER = {"cnn": "rmsprop", "rnn": "sgd", "bilstm": "adam", "autoencoder": "adam",
             "encoder_classifier": "adam", "resnet": "adamw"}


class TutorialFashionMNIST(torch.utils.data.Dataset):
    """What torchvision.datasets.FashionMNIST(transform=ToTensor()) does per item."""

    def __init__(self, images, labels):
        self.data, self.targets = torch.from_numpy(images), torch.from_numpy(labels)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img, target = self.data[i], int(self.targets[i])
        img = Image.fromarray(img.numpy(), mode="L")
        # transforms.ToTensor(): PIL -> HWC uint8 -> CHW float in [0, 1]
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).view(img.size[1], img.size[0], 1)
        return t.permute(2, 0, 1).contiguous().float().div(255), target


def build(name, engine: bool):
    torch.manual_seed(0)
    cfg = compose([f"model={name}", f"optimizer={OPTIMIZER[name]}"])
    model = instantiate(cfg.model)
    params = model.parameters()
    if engine:  # as run() builds it on a CPU
        return model, make_optimizer(cfg.optimizer, params)
    return stock_layers(model), instantiate(cfg.optimizer)(params)


def stock_layers(model):
    """The model as a tutorial reader writes it: torch's own layers (our CPU fast paths are
    subclasses that add no state, so they become their base class) in the published order
    (ReLU before max-pool)."""
    for m in model.modules():
        # every layer defined in models.fast
        if type(m).__module__.startswith(fast.__name__ + "."):
            m.__class__ = m.__class__.__bases__[0]
        if isinstance(m, torch.nn.Sequential):
            for i in range(len(m) - 1):
                if type(m[i]) is torch.nn.MaxPool2d and type(m[i + 1]) is torch.nn.ReLU:
                    m[i], m[i + 1] = m[i + 1], m[i]
    return model


def _best_rate(fn, flops, reps=4, tries=5) -> float:
    fn()
    best = 0.0
    for _ in range(tries):
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        best = max(best, flops * reps / (time.perf_counter() - t) / 1e9)
    return best


def peak_gflops(dtype, quick=False) -> dict:
    """What the cores do on large GEMMs: a 2048^2 matmul (torch.mm: MKL for fp32) and a
    256-channel 3x3 convolution at 56x56 (oneDNN's implicit GEMM, channels_last); the
    better of the two is the peak. (MKL's fp32 sgemm runs at half speed on some AMD CPUs.)
    ``quick``: a 1024^2 matmul and one image, timed twice, to check that it runs."""
    n, images, reps, tries = (1024, 1, 1, 2) if quick else (2048, 4, 4, 5)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    x = torch.randn(images, 256, 56, 56, dtype=dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 256, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
    out = {"matmul": _best_rate(lambda: a @ b, 2 * n ** 3, reps, tries),
           "conv": _best_rate(lambda: torch.nn.functional.conv2d(x, w, padding=1), 2 * images * 56 * 56 * 256 * 256 * 9,
                              reps, tries)}
    out["peak"] = max(out.values())
    return out


def flops_per_image(name) -> float | None:
    """Training FLOPs per image: forward + backward of one batch, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model, _ = build(name, engine=False)
    b = BATCH[name]
    x, y = torch.rand(b, 1, 28, 28), torch.randint(0, 10, (b,))
    with FlopCounterMode(display=False) as counter:
        _, loss = model(x, y)
        loss.backward()
    total = counter.get_total_flops()
    total += 3 * rnn_forward_flops(model, b)  # fused LSTM/GRU kernels: forward + 2x for backward
    return total / b if total else None


def rnn_forward_flops(model, batch, steps=28) -> int:
    total = 0
    for m in model.modules():
        # torch's counter sees SimpleRNN's matmuls (decomposed on CPU), not the fused LSTM/GRU kernels
        if isinstance(m, torch.nn.RNNBase) and m.mode in ("LSTM", "GRU"):
            gates = {"LSTM": 4, "GRU": 3}[m.mode]
            dirs = 2 if m.bidirectional else 1
            for layer in range(m.num_layers):
                n_in = m.input_size if layer == 0 else m.hidden_size * dirs
                total += dirs * 2 * batch * steps * gates * m.hidden_size * (n_in + m.hidden_size)
    return total


def engine_rate(name, images, labels, precision, channels_last, compile_mode=None):
    model, opt = build(name, engine=True)
    cl = channels_last if channels_last is not None else getattr(model, "channels_last_gain", False)
    if cl:
        model.to(memory_format=torch.channels_last)
    if compile_mode:
        model = compile_for_training(model, compile_mode)
    split = Split(torch.from_numpy(images).unsqueeze(1).float().div(255), torch.from_numpy(labels))
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    warm = Split(split.x[: BATCH[name] * 3], split.y[: BATCH[name] * 3])
    train_epoch(model, opt, warm, BATCH[name], torch.Generator().manual_seed(0), ac, cl, lambda s, l: None)
    t = time.perf_counter()
    train_epoch(model, opt, split, BATCH[name], torch.Generator().manual_seed(0), ac, cl, lambda s, l: None)
    return len(labels) / (time.perf_counter() - t)


def baseline_rate(name, images, labels):
    model, opt = build(name, engine=False)
    model.train()
    loader = torch.utils.data.DataLoader(TutorialFashionMNIST(images, labels), batch_size=BATCH[name], shuffle=True)
    t, n = None, 0
    for i, (x, y) in enumerate(loader):
        if i == 1:  # the first batch is warm-up, as for the engine
            t, n = time.perf_counter(), 0
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        n += len(y)
    return n / (time.perf_counter() - t)


def _args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BATCH))
    ap.add_argument("--images", type=int, default=3000, help="images per timed window")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--threads", default="auto")
    ap.add_argument("--channels-last", choices=("auto", "on", "off"), default="auto")
    ap.add_argument("--compile", action="store_true", help="also time the engine with torch.compile (default precision)")
    ap.add_argument("--profile", metavar="MODEL", help="also profile MODEL's engine step (default precision): "
                    "where the time goes, by operator")
    ap.add_argument("--system-allocator", action="store_true",
                    help="leave glibc's allocator at its defaults (the engine's run() keeps freed memory; the "
                         "bench gives that to both loops, or with this flag to neither)")
    ap.add_argument("--quick", action="store_true", help="300 images, 1 window: checks that it runs")
    return ap.parse_args()


def main():
    args = _args()
    if not args.system_allocator:
        # Both loops: glibc's adaptive default cannot be restored once set, so toggling per
        # window would handicap the baseline; the ratios therefore exclude this gain.
        keep_freed_memory()
    if args.quick:
        args.images, args.windows = 300, 1
    torch.set_num_threads(threads_for(args.threads))
    cl = {"auto": None, "on": True, "off": False}[args.channels_last]
    rng = np.random.default_rng(0)
    # Throughput does not depend on pixel values: random images of the real shape.
    images = rng.integers(0, 256, size=(args.images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=args.images).astype(np.int64)
    measured = {"fp32": peak_gflops(torch.float32, args.quick)}
    # Without bf16 units a bf16 GEMM is emulated (minutes); where they are slow (Intel without
    # AMX) their peak shows why the default is fp32.
    if {"avx512_bf16", "amx_bf16"} & set(fast.cpuinfo_field("flags").split()) and not isa_cap():
        measured["bf16"] = peak_gflops(torch.bfloat16, args.quick)
    peaks = {k: v["peak"] for k, v in measured.items()}
    print(f"threads {torch.get_num_threads()}, {args.images} images x {args.windows} windows, CPU fast bf16: "
          f"{cpu_has_fast_bf16()}; large-GEMM peak (GFLOP/s, matmul / 3x3 conv): "
          + ", ".join(f"{k} {v['matmul']:.0f} / {v['conv']:.0f}" for k, v in measured.items())
          + ("" if "bf16" in measured else " (bf16 not measured: no bf16 units, the engine trains in fp32)"), flush=True)
    print(f"{'model':<19}{'baseline':>9}{'engine fp32':>12}{'engine default':>20}"
          + (f"{'compiled':>10}" if args.compile else "")
          + f"{'fp32 ratio':>11}{'default ratio':>14}{'MFLOP/img':>10}{'% peak fp32':>12}{'% peak default':>15}"
          + f"{'ceiling':>9}")
    for name in args.models.split(","):
        _row(name, images, labels, cl, args, peaks)
    print("images/s, training (forward + backward + optimizer step); ratio = engine / baseline; "
          "% peak = achieved GFLOP/s / large-GEMM peak of the same precision; ceiling = the default ratio an "
          "engine running every FLOP at that peak would reach (the roofline: no ratio above it is possible)")
    if args.profile:
        profile(args.profile, images, labels, cl)


def _row(name, images, labels, cl, args, peaks) -> None:
    """One model's line: the loops' rates over interleaved windows (medians), ratios, % of peak."""
    model, _ = build(name, engine=True)
    default = select_precision("auto", torch.device("cpu"), model)
    rates = {"base": [], "fp32": [], "default": [], "compiled": []}
    for _ in range(args.windows):  # interleaved
        rates["base"].append(baseline_rate(name, images, labels))
        rates["fp32"].append(engine_rate(name, images, labels, "fp32", cl))
        # Where the default is fp32 it is the same run: timing it twice would only show noise.
        rates["default"].append(engine_rate(name, images, labels, default, cl) if default != "fp32"
                                else rates["fp32"][-1])
        if args.compile:
            rates["compiled"].append(engine_rate(name, images, labels, default, cl, compile_mode="default"))
    m = {k: statistics.median(v) for k, v in rates.items() if v}
    flops = flops_per_image(name)
    pct = (lambda rate, p: f"{100 * rate * flops / 1e9 / peaks[p]:.0f}%") if flops else (lambda rate, p: "—")
    print(f"{name:<19}{m['base']:>9,.0f}{m['fp32']:>12,.0f}{m['default']:>14,.0f} ({default})"
          + (f"{m['compiled']:>10,.0f}" if args.compile else "")
          + f"{m['fp32'] / m['base']:>10.2f}x{m['default'] / m['base']:>13.2f}x"
          + (f"{flops / 1e6:>10.0f}" if flops else f"{'—':>10}")
          + f"{pct(m['fp32'], 'fp32'):>12}{pct(m['default'], default):>15}"
          + (f"{peaks[default] * 1e9 / flops / m['base']:>8.2f}x" if flops else f"{'—':>9}"), flush=True)


def profile(name, images, labels, cl, rows=15):
    """Self CPU time per operator over a few engine steps, grouped as convolution /
    matmul (what the peak measures), elementwise and normalisation, optimizer, other."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    model, opt = build(name, engine=True)
    precision = select_precision("auto", torch.device("cpu"), model)
    cl = cl if cl is not None else getattr(model, "channels_last_gain", False)
    if cl:
        model.to(memory_format=torch.channels_last)
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    n = BATCH[name] * 10
    split = Split(torch.from_numpy(images[:n]).unsqueeze(1).float().div(255), torch.from_numpy(labels[:n]))
    train_epoch(model, opt, split, BATCH[name], torch.Generator().manual_seed(0), ac, cl, lambda s, l: None)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train_epoch(model, opt, split, BATCH[name], torch.Generator().manual_seed(0), ac, cl, lambda s, l: None)
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    groups = {"convolution + matmul": ("conv", "mm", "addmm", "matmul", "linear", "bmm", "mkldnn"),
              "optimizer": ("_fused_", "_foreach_", "adam", "rmsprop", "sgd"),
              "normalisation + activation + dropout + pooling": (
                  "batch_norm", "native_batch_norm", "tanh", "relu", "gelu", "silu", "threshold", "dropout",
                  "bernoulli", "max_pool", "avg_pool", "mul", "add", "div", "sub", "sigmoid")}
    shares = dict.fromkeys([*groups, "other (copies, casts, indexing, autograd)"], 0)
    for e in events:
        key = next((g for g, words in groups.items() if any(w in e.key.lower() for w in words)),
                   "other (copies, casts, indexing, autograd)")
        shares[key] += e.self_cpu_time_total
    print(f"\nprofile of {name} ({precision}, channels_last {cl}), {n} images: self CPU time by group")
    for g, t in shares.items():
        print(f"  {g:<50}{100 * t / total:6.1f} %")
    print(f"top {rows} operators:")
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        print(f"  {e.key:<50}{100 * e.self_cpu_time_total / total:6.1f} %  ({e.count} calls)")


if __name__ == "__main__":
    main()
