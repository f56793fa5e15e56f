"""Evaluation images/s of each model family by evaluation batch size (trainer.eval_batch_size),
side by side in one process, as train.evaluate runs it (validation each epoch, the test).

    python bench/eval_batch.py                      # 2,000 images, sizes 1000, 250, 100, 1 thread
    python bench/eval_batch.py --quick              # 200 images, cnn and rnn: checks it runs
"""

from __future__ import annotations

import argparse
import time

import torch

from fmnist_sweep import hardware, train
from fmnist_sweep.config import compose
from fmnist_sweep.data import Split


def rate(b: train.Built, split: Split, batch: int) -> float:
    """Images/s of one evaluation of ``split`` at ``batch``, after a warm-up batch."""
    train.evaluate(b.model, Split(split.x[:batch], split.y[:batch]), batch, b.autocast, b.channels_last)
    t = time.perf_counter()
    train.evaluate(b.model, split, batch, b.autocast, b.channels_last)
    return len(split) / (time.perf_counter() - t)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--models", default="cnn,rnn,bilstm,resnet,autoencoder")
    ap.add_argument("--sizes", default="1000,250,100")
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.models, args.images = "cnn,rnn", 200
    hardware.keep_freed_memory()
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{args.images:,} images, {args.threads} thread(s); evaluation images/s by batch size "
          f"(x: against the first size)")
    print(f"{'model':<13}" + "".join(f"{s:>16}" for s in sizes))
    for name in args.models.split(","):
        over = [f"model={name}", f"trainer.threads={args.threads}", "data.verify=false", *args.overrides]
        b = train.build(compose(over))
        split = Split(b.data.train.x[:args.images], b.data.train.y[:args.images])
        rates = [rate(b, split, min(s, args.images)) for s in sizes]
        print(f"{name:<13}" + "".join(f"{r:>9,.0f} {r / rates[0]:4.2f}x" for r in rates), flush=True)


if __name__ == "__main__":
    main()
