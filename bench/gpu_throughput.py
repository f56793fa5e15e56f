"""On a CUDA device: training images/s per family, our engine against the tutorial loop on
the same GPU (and with trainer.compile: CUDA graphs by default), and trials/hour of a small
study at K = 1, 2, 4, 8 workers on one GPU.

Engine: the split resident on the GPU, batches by index slicing, fmnist_sweep.train's
train_epoch with what a run picks (precision auto: bf16 autocast where the device has it).
Baseline (as the tutorials write it): the images in host memory, DataLoader(shuffle=True),
each batch copied to the GPU, fp32, the optimizer's defaults. Same model and batch size.

    python bench/gpu_throughput.py                  # every family; K = 1, 2, 4, 8
    python bench/gpu_throughput.py --quick          # cnn only, K = 1, 2
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

BATCH = {"cnn": 256, "resnet": 256, "rnn": 256, "bilstm": 256, "autoencoder": 256, "encoder_classifier": 256}


def data(n: int):
    from fmnist_sweep.config import compose
    from fmnist_sweep.data import load

    cfg = compose(["data.val_fraction=0.0", "data.verify=false"]).data  # a carried slice has other checksums
    split = load(cfg, "cpu").train
    return split.x[:n], split.y[:n]


def engine_rate(family: str, x, y, seconds: float, mode: str | None = None) -> tuple[float, str, float]:
    """Images/s of the engine, its precision, and the seconds of its first (warm-up) epoch,
    which holds the compilation where ``mode`` (trainer.compile) is set."""
    from hydra.utils import instantiate

    from fmnist_sweep.config import compose
    from fmnist_sweep.data import Split
    from fmnist_sweep.hardware import compile_for_training, select_precision
    from fmnist_sweep.train import make_optimizer, train_epoch

    cfg = compose([f"model={family}"])
    device = torch.device("cuda")
    model = instantiate(cfg.model).to(device)
    optimizer = make_optimizer(cfg.optimizer, model.parameters())
    precision = select_precision("auto", device, model)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if precision == "bf16" else (
        lambda: torch.autocast("cuda", enabled=False))
    split = Split(x.to(device), y.to(device))
    generator = torch.Generator().manual_seed(0)
    stepped = model if mode is None else compile_for_training(model, mode)  # a module has no truth value
    epoch = lambda: train_epoch(stepped, optimizer, split, BATCH[family], generator, autocast, False,  # noqa: E731
                                lambda *a: None)
    t0 = time.perf_counter()
    epoch()  # warm-up: kernels chosen (or compiled), memory pooled
    torch.cuda.synchronize()
    return _rate(epoch, len(y), seconds), precision, time.perf_counter() - t0


def baseline_rate(family: str, x, y, seconds: float) -> float:
    from hydra.utils import instantiate

    from fmnist_sweep.config import compose

    cfg = compose([f"model={family}"])
    model = instantiate(cfg.model).cuda()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    images = (x * 255).to(torch.uint8)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, y), batch_size=BATCH[family],
                                         shuffle=True)

    def epoch():
        model.train()
        for xb, yb in loader:
            xb, yb = xb.cuda().float().div(255), yb.cuda()
            out, loss = model(xb, yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    epoch()
    return _rate(epoch, len(y), seconds)


def _rate(epoch, images: int, seconds: float) -> float:
    torch.cuda.synchronize()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        epoch()
        done += images
    torch.cuda.synchronize()
    return done / (time.perf_counter() - t0)


def trials_per_hour(k: int, extra: list[str]) -> float:
    """`workers -n K --per-gpu K` on GPU 0 with a 2K-trial quickstart study: trials/hour."""
    with tempfile.TemporaryDirectory() as work:
        cmd = [sys.executable, "-m", "fmnist_sweep", "workers", "-n", str(k), "--per-gpu", str(k),
               "+experiment=quickstart", f"study.n_trials={2 * k}", "trainer.device=cuda", *extra]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=600,
                              env={**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")[:1]})
        wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"workers -n {k} failed:\n{proc.stdout[-1500:]}{proc.stderr[-1500:]}")
    return 2 * k / wall * 3600


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(BATCH))
    ap.add_argument("--images", type=int, default=12000)
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--per-gpu", default="1,2,4,8")
    ap.add_argument("--compile", default="reduce-overhead", help="the trainer.compile mode measured beside eager")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing measured")
        return
    if args.quick:
        args.models, args.images, args.seconds, args.per_gpu = "cnn", 2000, 1, "1,2"
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, {args.images:,} real training images")
    print(f"| family | precision | tutorial loop (img/s) | engine (img/s) | ratio | engine, trainer.compile="
          f"{args.compile} (img/s) | its first epoch, compiling (s) |\n|---|---|---|---|---|---|---|")
    x, y = data(args.images)
    for family in args.models.split(","):
        base = baseline_rate(family, x, y, args.seconds)
        rate, precision, _ = engine_rate(family, x, y, args.seconds)
        fast, _, first = engine_rate(family, x, y, args.seconds, args.compile)
        print(f"| {family} | {precision} | {base:,.0f} | {rate:,.0f} | {rate / base:.2f}x | {fast:,.0f} "
              f"| {first:.0f} |", flush=True)
    print("\nquickstart study (2K trials, trainer.epochs=2, data.train_fraction=0.2) on one GPU:")
    print("| workers per GPU | trials/hour |\n|---|---|")
    for k in map(int, args.per_gpu.split(",")):
        extra = ["trainer.epochs=2", "data.train_fraction=0.2", "data.verify=false"]
        print(f"| {k} | {trials_per_hour(k, extra):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
