"""What each CPU fast path of models/fast/ gains: training images/s of a family with every
fast path on, and with that one path off (torch's own layer instead), side by side in one
process, interleaved windows, medians; beside them the family with torch.compile
(trainer.compile=default).

    python bench/fast_paths.py                                   # this CPU, its default precision
    python bench/fast_paths.py --precision fp32                  # fp32 on a bf16 CPU
    ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python bench/fast_paths.py --precision fp32
                                                                 # an AVX2-only CPU's code paths
    python bench/fast_paths.py --quick                           # tiny, to check it runs

A path is worth keeping where its gain (on / off) is at least 10% on some CPU class
where it is on (docs/PERFORMANCE.md has the table)."""

from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch
from hydra.utils import instantiate
from torch import nn

from fmnist_sweep.config import compose
from fmnist_sweep.data import Split
from fmnist_sweep.hardware import compile_for_training, keep_freed_memory, select_precision, threads_for
from fmnist_sweep.models import fast
from fmnist_sweep.models.fast import elman
from fmnist_sweep.train import make_optimizer, train_epoch

BATCH = {"cnn": 100, "rnn": 65, "autoencoder": 100}
OPTIMIZER = {"cnn": "rmsprop", "rnn": "sgd", "autoencoder": "adam"}
LAYERS = {"dropout": (fast.Dropout, nn.Dropout), "conv_transpose": (fast.ConvTranspose2d, nn.ConvTranspose2d),
          "elman_rnn": (fast.RNN, nn.RNN)}
PATHS = {"cnn": ["dropout"], "autoencoder": ["dropout", "conv_transpose"], "rnn": ["elman_rnn", "dropout"]}


def build(name: str, off: str | None = None, compile_mode: str | None = None):
    """The family as the engine builds it on a CPU, with the fast path ``off`` replaced by
    torch's own layer; with ``compile_mode`` as trainer.compile builds it."""
    torch.manual_seed(0)
    cfg = compose([f"model={name}", f"optimizer={OPTIMIZER[name]}"])
    model = instantiate(cfg.model)
    for m in model.modules():
        if off in LAYERS and type(m) is LAYERS[off][0]:
            m.__class__ = LAYERS[off][1]  # a subclass adding no state: the same module
    if getattr(model, "channels_last_gain", False):
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg.optimizer, model.parameters())
    trained = compile_for_training(model, compile_mode) if compile_mode else model
    return trained, optimizer, getattr(model, "channels_last_gain", False), model


def rate(name: str, split: Split, precision: str, built) -> float:
    """Training images/s over ``split`` after a 3-batch warm-up."""
    model, optimizer, cl, _ = built
    ac = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else nullcontext
    b = BATCH[name]
    warm = Split(split.x[:3 * b], split.y[:3 * b])
    train_epoch(model, optimizer, warm, b, torch.Generator().manual_seed(0), ac, cl, lambda s, l: None)
    t = time.perf_counter()
    train_epoch(model, optimizer, split, b, torch.Generator().manual_seed(0), ac, cl, lambda s, l: None)
    return len(split) / (time.perf_counter() - t)


@contextmanager
def blas_products(on: bool):
    """The SimpleRNN's recurrence with torch's BLAS products (where ``on``), whatever the CPU."""
    chosen = elman._gemm_backend
    if on:
        elman._gemm_backend = lambda: "blas"
    try:
        yield
    finally:
        elman._gemm_backend = chosen


def row(name: str, split: Split, precision: str, windows: int, with_compile: bool) -> None:
    """One family: all paths on, each of its paths off, compiled; medians over interleaved windows.
    The rnn on a CPU whose recurrence takes oneDNN's products: also with BLAS's (onednn_products off)."""
    paths = PATHS[name] + (["onednn_products"] if name == "rnn" and elman._gemm_backend() == "onednn" else [])
    variants = {"all on": build(name)} | {f"{p} off": build(name, off=p) for p in paths}
    if with_compile:
        variants["compiled"] = build(name, compile_mode="default")
    rates: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(windows):
        for k, built in variants.items():
            with blas_products(k == "onednn_products off"):
                rates[k].append(rate(name, split, precision, built))
    m = {k: statistics.median(v) for k, v in rates.items()}
    on = m["all on"]
    gains = "  ".join(f"{p} {on / m[f'{p} off']:.2f}x" for p in paths)
    compiled = f"  compiled {m['compiled']:,.0f} ({m['compiled'] / on:.2f}x of all on)" if with_compile else ""
    print(f"{name:<12} {precision:<5} all on {on:>7,.0f} img/s | gain of each path (on / off): {gains}{compiled}",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BATCH))
    ap.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto")
    ap.add_argument("--images", type=int, default=2000, help="images per timed window")
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--threads", default="1")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile column (its compile takes minutes)")
    ap.add_argument("--quick", action="store_true", help="200 images, 1 window, no compile: checks that it runs")
    args = ap.parse_args()
    if args.quick:
        args.images, args.windows, args.no_compile = 200, 1, True
    keep_freed_memory()
    torch.set_num_threads(threads_for(args.threads))
    forced = {k: os.environ[k] for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if k in os.environ}
    print(f"threads {torch.get_num_threads()}, {args.images} images x {args.windows} windows, torch "
          f"{torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
          + (f", forced {forced}" if forced else ""), flush=True)
    g = torch.Generator().manual_seed(0)
    # Throughput does not depend on pixel values: random images of the real shape.
    split = Split(torch.rand(args.images, 1, 28, 28, generator=g), torch.randint(0, 10, (args.images,), generator=g))
    for name in args.models.split(","):
        precision = args.precision
        if precision == "auto":
            precision = select_precision("auto", torch.device("cpu"), build(name)[3])
        row(name, split, precision, args.windows, not args.no_compile)


if __name__ == "__main__":
    main()
